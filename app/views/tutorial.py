"""A short tutorial: how to mark cells, with example alive and dead cells (skippable)."""

from __future__ import annotations

import streamlit as st
from appkit import resources, roles

from cellspot.render import ImageUnavailableError, example_crop
from cellspot.store.models import Image, Project
from cellspot.workflows.classroom import tutorial_examples

EXAMPLE_WIDTH = 144  # CSS px per example crop: two or three to a row on a phone, six on a laptop

student = roles.require_student()


def _to_labelling() -> None:
    st.session_state["tutorial_done"] = True
    st.session_state.pop("welcome_back", None)
    st.session_state.pop(roles.JOIN_CONFIRM, None)  # going on to label answers "is that you?" with yes
    st.switch_page("views/label.py")


st.title("How to spot cells")
# set by the join page for a nickname someone is labelling under right now: asked before any image
asking = roles.ask_if_same_student()
if "welcome_back" in st.session_state:  # set by the join page for a nickname with earlier work
    st.info(st.session_state["welcome_back"], icon=":material/waving_hand:")
if st.button("Skip the tutorial", key="skip",
             help="Go straight to labelling" + (" (as the student above)." if asking else ".")):
    _to_labelling()

st.markdown(
    """
1. **Pick a label** with the buttons beside the image (below it on a phone), or with the keys
   **A** (alive), **D** (dead) and **N** (not sure).
2. **Click or tap the centre of each cell** to place a mark of that label. Each label has its
   own shape and letter: alive ◯ **A**, dead ☒ **D**, not sure △ **?**.
3. Click a mark again to **remove** it (or, with another label picked, to **change** it).
   **Undo** (key **U**) takes back the last change, **Clear** removes every mark.
4. Use **Zoom** for small cells; the arrow buttons (or arrow keys) move the view.
5. When every cell is marked, press **Submit** (**Ctrl+Enter**). The next image appears.

**Alive** cells are flat and spread out, with a clear outline and a nucleus.
**Dead** cells (apoptotic) are small, round, bright or shrunken, often detached or in pieces.
If you cannot tell, mark **not sure**: that is better than guessing.
"""
)

with resources.session() as session:
    project = session.get(Project, student.project_id)
    examples = tutorial_examples(session, project, n=3)
    images = {e.image_id: session.get(Image, e.image_id) for e in examples}

if examples:
    st.subheader("Examples from this class's images")
    crops, captions = [], []
    for example in examples:
        try:
            rgb = resources.display_rgb(images[example.image_id])
        except ImageUnavailableError:
            continue
        word = "Alive" if example.label == "alive" else "Dead"
        crops.append(example_crop(rgb, example.x, example.y, example.label, size=96, zoom=2.0))
        captions.append(f"{word} ({'expert' if example.source == 'gold' else 'class consensus'})")
    if crops:  # one row that wraps (in columns, a phone stacked them at full width: 3,500 px of page)
        st.image(crops, caption=captions, width=EXAMPLE_WIDTH)
else:
    st.info("This class has no example cells yet.")

if st.button("Start labelling", type="primary", key="start"):
    _to_labelling()

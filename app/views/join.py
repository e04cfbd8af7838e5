"""Join a class: class code + nickname (no account, no personal data).

Joining with a nickname someone is labelling under right now (its draft changed, or a new
nickname joined, within the project's lease time) asks "is that you?" on the next page
(:func:`roles.ask_if_same_student`) before any image is shown: two students typing "Max" and
"max" would otherwise become one annotator and overwrite each other's marks. A reload carries
the class and nickname in the URL and never comes here (:func:`roles.restore_student_from_url`).
"""

from __future__ import annotations

import streamlit as st
from appkit import roles

from cellspot.workflows.classroom import NICKNAME_MAX_CHARS, ClassNotFoundError, InvalidNicknameError

state = st.session_state

st.title("Cell spotting")
st.write(
    "Mark the cells in microscopy images as **alive**, **dead** or **not sure**. "
    "Your marks help researchers build a clean dataset of how cells react to drugs."
)
if roles.JOIN_NOTICE in state:  # a reload whose class code was withdrawn, a nickname taken right now
    st.warning(state[roles.JOIN_NOTICE], icon=":material/info:")

with st.form("join", enter_to_submit=True):
    code = st.text_input("Class code", key="join_code", placeholder="e.g. DEMO",
                         help="The code your teacher gave you.")
    # no max_chars: the browser refused a longer paste outright (an empty field, then "the
    # nickname is empty") and counted an emoji as two; the server says what is too long
    nickname = st.text_input(
        "Nickname", key="join_nickname",
        help=f"Any name you like, 1 to {NICKNAME_MAX_CHARS} characters; please not your real full name.",
    )
    joined = st.form_submit_button("Join", type="primary")

if joined:
    try:
        use = roles.use_of(code, nickname)
        student = roles.join(code, nickname)
    except (ClassNotFoundError, InvalidNicknameError) as exc:
        text = str(exc)  # only the first letter is raised: codes and project names keep their case
        st.error(text[:1].upper() + text[1:])
    else:
        if use.active:  # asked on the next page, before any image is shown
            state[roles.JOIN_CONFIRM] = {"code": student.class_code, "nickname": student.nickname}
            st.query_params.clear()  # not in the URL until "Yes": a reload would skip the question
        elif use.runs:
            # a nickname that has labelled before continues that student's work: say so, since two
            # students of one class who type the same nickname become one annotator
            state["welcome_back"] = (
                f"Welcome back, {roles.plain(student.nickname)}: the {use.runs} image(s) labelled with this "
                f"nickname in class {student.class_code} count as yours. Not you? Press Leave (in the page menu) "
                "and join with another nickname.")
        st.rerun()  # the navigation now offers the student pages, the tutorial first

"""The labelling page: pick a label, click the cells, submit, get the next image.

The draft (marks, undo history, zoom) lives in the session, and the marks also in the store
(:func:`cellspot.workflows.classroom.save_draft`, on every change), so a reload or a phone
dropping the tab brings the student back to the same image with their marks. A submit stores
one task run through :func:`cellspot.workflows.classroom.submit_run` with a ``client_key``
made once per displayed image, so a double click on Submit, a rerun during the submit or a
second submit of the same image stores one run.
"""

from __future__ import annotations

import logging
import uuid

import streamlit as st
from appkit import canvas, keys, resources, roles
from appkit.marks import ZOOMS, apply_click, counts, pan, view_window

from cellspot.active.scheduler import LeaseContentionError
from cellspot.render import ImageUnavailableError, draw_markers
from cellspot.store.models import Annotator, Image
from cellspot.store.queries import ClientKeyConflictError, InvalidClickError
from cellspot.workflows.classroom import (
    GoldFeedback,
    ImageNotFoundError,
    Progress,
    draft_of,
    next_image,
    save_draft,
    student_progress,
    submit_run,
)

LABELS = {  # label -> (button text, key, what the marker looks like)
    "alive": ("◯ Alive", "A", "circle with A"),
    "dead": ("☒ Dead", "D", "square with X and D"),
    "not_sure": ("△ Not sure", "N", "triangle with ?"),
}
HISTORY_LIMIT = 200
#: a second click within this time (ms) on the spot of the click before is the other half of a
#: double click: it would take the mark just placed away again, so it is ignored
DOUBLE_CLICK_MS = 350

log = logging.getLogger(__name__)

student = roles.require_student()
state = st.session_state
if roles.ask_if_same_student():  # no image (nor anyone's marks) before the student says who they are
    st.stop()
state.setdefault("current_label", "alive")
state.setdefault("zoom", 1)


# --------------------------------------------------------------------------- task


def new_task(exclude: tuple[int, ...] = ()) -> dict | None:
    """The student's next image with a new client key: the one of their saved draft with its
    marks (a reload, another device; also when the image closed meanwhile, so no mark is
    lost), else a new pick with no marks (held as the student's empty draft by ``next_image``,
    so a reload before the first mark keeps the image too)."""
    marks: list = []
    closed = False
    with resources.session() as session:
        annotator = session.get(Annotator, student.annotator_id)
        # images whose pixels cannot be shown stay out for the rest of the session: with only the
        # last one excluded, two such images would send the page back and forth for ever
        skip = (*state.get("unshowable", ()), *exclude)
        draft = draft_of(session, annotator, exclude_ids=skip) if annotator else None
        if draft is not None:
            image, marks, closed = draft
        else:
            try:
                image = next_image(session, annotator, exclude_ids=skip) if annotator else None
            except LeaseContentionError as exc:  # the whole class asking at once, for many seconds
                log.warning("annotator %d: %s", student.annotator_id, exc)
                image, state["busy"] = None, True
        task = None if image is None else {
            "image_id": image.id, "name": image.name, "width": image.width, "height": image.height,
            "client_key": f"app-{uuid.uuid4().hex}", "annotator_id": student.annotator_id,
        }
    if closed:
        state["notice"] = ("warning", f"This image was closed meanwhile (the class has enough marks on it), but "
                                      f"your {len(marks)} mark(s) on it are kept: finish it and press Submit.")
    elif marks:
        state["notice"] = ("info", f"Your {len(marks)} unsubmitted mark(s) on this image are back.")
    # every image starts at 1x: a zoom carried over hid most of the next image, and a student
    # who marked only the visible part was told on a check image that they missed the rest
    state.update(task=task, marks=marks, history=[], centre=None, zoom=1, last_click=None)
    state.pop("confirm_empty", None)
    return task


def keep_draft() -> None:
    """Store the marks of the image on screen as the student's draft (a failure is logged: the
    marks stay in the session and the submit reports any problem)."""
    task = state.get("task")
    if not task:
        return
    try:
        with resources.session() as session:
            kept = save_draft(session, session.get(Annotator, student.annotator_id), task["image_id"],
                              state["marks"])
    except (InvalidClickError, ImageNotFoundError) as exc:
        log.warning("draft of image %s not kept: %s", task["image_id"], exc)
        return
    if not kept:  # a stale tab: say so now, not only at its Submit
        state["notice"] = ("warning", "You already submitted this image in another tab or device: marks here "
                                      "are not saved. Press Submit for your next image.")


def set_marks(marks: list) -> None:
    state["history"] = [*state.get("history", []), list(state["marks"])][-HISTORY_LIMIT:]
    state["marks"] = marks
    state.pop("confirm_empty", None)  # an empty submit asks again after the marks changed
    keep_draft()


def undo() -> None:
    if state.get("history"):
        state["marks"] = state["history"].pop()
        state.pop("confirm_empty", None)
        keep_draft()


def clear() -> None:
    if state.get("marks"):
        set_marks([])


def set_label(label: str) -> None:
    state["current_label"] = label


def set_zoom(step: int) -> None:
    i = ZOOMS.index(state["zoom"]) if state["zoom"] in ZOOMS else 0
    state["zoom"] = ZOOMS[min(max(i + step, 0), len(ZOOMS) - 1)]
    state["scroll_top"] = True  # on a phone the zoom buttons are below the image: bring it into view


def move(dx: int, dy: int) -> None:
    task = state["task"]
    view = view_window(task["width"], task["height"], state["zoom"], state.get("centre"))
    state["centre"] = pan(view, dx, dy)


@st.cache_data(ttl=15, show_spinner=False)
def _progress(annotator_id: int, session_token: str, submitted: int, unshowable: tuple[int, ...]) -> Progress:
    """The student's progress, cached briefly per browser session (``session_token``; the
    submit counter restarts in every session) and refreshed after each submit (``submitted``)
    or image found unshowable (``unshowable``: counted apart, not as images left)."""
    with resources.session() as session:
        return student_progress(session, session.get(Annotator, annotator_id), exclude_ids=unshowable)


def progress() -> Progress:
    token = state.setdefault("progress_token", uuid.uuid4().hex)
    unshowable = tuple(sorted(state.get("unshowable", ())))
    return _progress(student.annotator_id, token, state.get("submitted", 0), unshowable)


def progress_line(p: Progress) -> str:
    broken = f" ({p.images_unshowable} more cannot be shown)" if p.images_unshowable else ""
    return (f"Today you did **{p.done_today}** image(s) ({p.done_total} in all) · "
            f"your class did **{p.class_total_today}** today · {p.images_left} left for you{broken}")


def submit(client_key: str) -> None:
    """Store the draft as one run (idempotent on the task's client key), then move on.

    A click on the Submit button of an image that is no longer shown does nothing. An image
    without marks asks first (an image may have no cells, but an empty submit is more often a
    slip): the first press only arms the confirmation, the second stores the empty run.
    """
    task = state.get("task")
    if not task or task["client_key"] != client_key:
        return
    marks = [(float(x), float(y), str(label)) for x, y, label in state["marks"]]
    if not marks and state.get("confirm_empty") != client_key:
        state["confirm_empty"] = client_key
        return
    state.pop("confirm_empty", None)
    try:
        with resources.session() as session:
            annotator = session.get(Annotator, student.annotator_id)
            result = submit_run(session, annotator, task["image_id"], marks, task["client_key"])
    except (InvalidClickError, ClientKeyConflictError, ImageNotFoundError) as exc:
        state["notice"] = ("error", f"This image could not be saved: {exc}. Here is another one.")
        new_task(exclude=(task["image_id"],))
        return
    state["submitted"] = state.get("submitted", 0) + 1
    if result.gold_feedback is not None:
        state["feedback"] = {"task": task, "marks": marks, "result": result.gold_feedback}
    else:
        state.pop("feedback", None)
    # short (no file name: the student knows which image it was), so the line under Submit stays
    # above the fold on a 1024x768 tablet also on a gold image
    if result.other_submit:
        state["notice"] = ("warning", f"Not saved: you had already submitted this image ({result.n_clicks} "
                                      "mark(s)) in another tab or device; the marks here were dropped.")
    else:
        state["notice"] = ("success", f"{'Saved' if result.created else 'Already saved'}: "
                                      f"{result.n_clicks} mark(s).")
    state["scroll_top"] = True
    new_task()


# --------------------------------------------------------------------------- feedback


def feedback_headline(fb: GoldFeedback) -> str:
    s = fb.summary()
    return (f"Check image: you found {s['found']} of {s['gold']} cells with the right label"
            f" · {s['mislabelled']} with the other label · {s['missed']} missed"
            f" · {s['unsure']} marked not sure · {s['extra']} extra mark(s)")


def show_feedback(feedback: dict) -> None:
    """How the last (gold) image compares with the expert's cells: your marks beside the
    expert cells you missed or labelled differently."""
    fb: GoldFeedback = feedback["result"]
    with st.expander(feedback_headline(fb), expanded=True):
        task = feedback["task"]
        with resources.session() as session:
            image = session.get(Image, task["image_id"])
        try:
            rgb = resources.display_rgb(image)
        except (ImageUnavailableError, AttributeError):
            return
        to_learn = [(c.x, c.y, c.label) for c in (*fb.missed, *fb.mislabelled)]
        left, right = st.columns(2)
        left.image(draw_markers(rgb, feedback["marks"], scale=2.0, radius=13), caption="Your marks",
                   width="stretch")
        right.image(draw_markers(rgb, to_learn, scale=2.0, radius=13),
                    caption=f"The expert's cells you missed or labelled differently ({len(to_learn)})",
                    width="stretch")
        st.button("Hide", key="hide_feedback", on_click=lambda: state.pop("feedback", None))


# --------------------------------------------------------------------------- page

if state.get("task") is None or state["task"].get("annotator_id") != student.annotator_id:
    new_task()
task = state["task"]

# The "saved" line goes under the Submit button, where it moves nothing a student is about to
# tap (a toast covered the label buttons on tablets); an error goes on top, where it is seen.
saved = state.pop("saved_carry", None)  # a submit's "Saved" kept across a skipped unshowable image
if "notice" in state:
    kind, text = state.pop("notice")
    if kind == "success":
        saved = text + (" Check result below." if state.get("feedback") else "")
    elif kind == "warning":
        st.warning(text, icon=":material/warning:")
    elif kind == "info":
        st.info(text, icon=":material/restore:")
    else:
        st.error(text)
# on a phone the image is above the button just pressed (Submit, zoom): scroll up to it
scroll_top = state.pop("scroll_top", False)

if task is None:
    p = progress()
    if state.pop("busy", False):
        st.title("Busy right now")
        st.write("Your classmates are all getting their next image at the same moment: press **Look for new "
                 "images** in a few seconds.")
    elif p.images_waiting:
        st.title("Nothing free right now")
        st.write(f"The {p.images_waiting} image(s) left for you are being labelled by classmates at the "
                 "moment. One comes back when a classmate leaves it unfinished: look again in a few minutes.")
    elif p.images_unshowable:  # not "all done": these images are open, their files are missing or damaged
        st.title("No image can be shown")
        st.write(f"{p.images_unshowable} image(s) left for you could not be shown (a missing or damaged file). "
                 "Tell your teacher; look again later.")
    elif p.done_total == 0:  # nothing labelled, nothing open: no images yet, or all finished before
        st.title("Nothing to label here yet")
        st.write("This class has no image open for labelling right now: none has been added yet, or the "
                 "class finished them all. Look again later, or ask your teacher.")
    else:
        st.title("All done!")
        st.write("You have labelled every image that is open to you. Thank you!")
    if saved:
        st.success(saved, icon=":material/check_circle:")
    st.markdown(progress_line(p))
    if st.button("Look for new images", type="primary"):
        st.rerun()
    if state.get("feedback"):
        show_feedback(state["feedback"])
    st.stop()

key = f"canvas-{task['client_key']}"
view = view_window(task["width"], task["height"], state["zoom"], state.get("centre"))
click = canvas.take_click(key)
if click is not None:
    tolerance = canvas.click_tolerance(view)
    stamp, before = canvas.click_stamp(key), state.get("last_click")
    double = (before is not None and stamp is not None and 0 <= stamp - before[0] < DOUBLE_CLICK_MS
              and abs(click[0] - before[1]) <= tolerance and abs(click[1] - before[2]) <= tolerance)
    state["last_click"] = None if double else (stamp, click[0], click[1])
    if not double:
        set_marks(apply_click(state["marks"], click[0], click[1], state["current_label"], tolerance))
    if state.get("notice", ("",))[0] == "warning":  # set by keep_draft on a stale tab: show it now
        st.warning(state.pop("notice")[1], icon=":material/warning:")

with resources.session() as session:
    image = session.get(Image, task["image_id"])
try:
    rgb = resources.display_rgb(image) if image is not None else None
except ImageUnavailableError:
    rgb = None
if rgb is None:
    state["unshowable"] = {*state.get("unshowable", ()), task["image_id"]}
    following = new_task()
    # "here is another one" only when there is one; the next image's own notice (its marks are
    # back, it closed meanwhile) is kept, after this one
    after = state.pop("notice", ("", ""))[1]
    state["notice"] = ("error", f"The image {task['name']} cannot be shown; "
                                + ("here is another one." if following else "no other image is open to you.")
                                + (f" {after}" if after else ""))
    if saved:  # the submit just made: its "Saved" line stays (it vanished behind the error)
        state["saved_carry"] = saved
    st.rerun()

keys.forward_keys_from_image_frames(scroll_nonce=uuid.uuid4().hex if scroll_top else None)
picture_col, tools_col = st.columns([3, 1], gap="medium")

with tools_col:
    st.markdown(f"**{roles.plain(student.nickname)}** · class {roles.plain(student.class_code)}")
    current = state["current_label"]
    st.markdown(f"Label: **{LABELS[current][0]}** ({LABELS[current][2]})")
    # no tooltips on the buttons a student taps all the time: on a touch screen a tooltip stays after
    # the tap and covers the button beside it (the "Label:" line above and the key hints say it all)
    for label, (text, shortcut, _) in LABELS.items():
        st.button(text, key=f"label-{label}", type="primary" if label == current else "secondary",
                  on_click=set_label, args=(label,), shortcut=shortcut, width="stretch")
    n = counts(state["marks"])
    st.markdown(f"◯ Alive **{n['alive']}** · ☒ Dead **{n['dead']}** · △ Not sure **{n['not_sure']}**")
    undo_col, clear_col = st.columns(2)
    undo_col.button("Undo", key="undo", on_click=undo, shortcut="U", disabled=not state["history"],
                    width="stretch", help="Take back the last change (key U)")
    clear_col.button("Clear", key="clear", on_click=clear, disabled=not state["marks"], width="stretch",
                     help="Remove every mark (Undo brings them back)")
    # one row for both zoom buttons, the level in the image caption: the Submit button and its
    # "Saved" line stay above the fold on a 1024x768 tablet
    zoom_out_col, zoom_in_col = st.columns(2)
    zoom_out_col.button("", key="zoom_out", icon=":material/zoom_out:", on_click=set_zoom, args=(-1,),
                        shortcut="Shift+Z", disabled=state["zoom"] == ZOOMS[0], width="stretch")
    zoom_in_col.button("", key="zoom_in", icon=":material/zoom_in:", on_click=set_zoom, args=(1,),
                       shortcut="Z", disabled=state["zoom"] == ZOOMS[-1], width="stretch")
    confirming = not state["marks"] and state.get("confirm_empty") == task["client_key"]
    st.button("Submit with no cells" if confirming else "Submit", key=f"submit-{task['client_key']}",
              type="primary", shortcut="Ctrl+Enter", on_click=submit, args=(task["client_key"],), width="stretch",
              help="Save the marks of this image and get the next one (Ctrl+Enter)")
    if confirming:  # under the button, which stays where it was (above the fold on a tablet)
        st.warning("No marks. No cells on this image? Press **Submit with no cells**.", icon=":material/help:")
    if saved:
        st.success(saved, icon=":material/check_circle:")

with picture_col:
    last = len(state["marks"]) - 1 if state["marks"] else None
    where = "" if state["zoom"] == 1 else (
        f" · zoom {state['zoom']}× · showing x {view.x0}-{view.x0 + view.width - 1}, "
        f"y {view.y0}-{view.y0 + view.height - 1}")
    canvas.show(canvas.marked_picture(rgb, state["marks"], view, highlight=last), view, key)
    # the pan arrows right under the zoomed image, in one row that does not stack on a phone
    # (there the tools column goes below the picture: arrows there moved a view out of sight)
    if state["zoom"] > 1:
        with st.container(horizontal=True, gap="small"):
            for name, dx, dy, icon in (("Left", -1, 0, "arrow_back"), ("Up", 0, -1, "arrow_upward"),
                                       ("Down", 0, 1, "arrow_downward"), ("Right", 1, 0, "arrow_forward")):
                # an icon as the label: the shortcut hint beside it is the arrow key itself
                st.button("", key=f"pan-{name}", icon=f":material/{icon}:", on_click=move, args=(dx, dy),
                          shortcut=name, help=f"Move the view {name.lower()} ({name.lower()} arrow key)")
    st.caption(f"{task['name']} ({task['width']}×{task['height']} px){where}")
    # on a phone the Saved line under Submit is far below, out of sight after the page scrolled up
    # to the next image: the line under the image says it too (on a desktop it is below the fold),
    # and after a check image that the check result is further down
    check = " · your check result is below" if saved and state.get("feedback") else ""
    st.markdown((f"✓ {saved.split('.')[0]}{check} · " if saved else "") + progress_line(progress()))

if state.get("feedback"):
    show_feedback(state["feedback"])

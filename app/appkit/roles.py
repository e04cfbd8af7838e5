"""Who is using this browser session: nobody yet, a student, or a logged-in researcher.

The role lives only in ``st.session_state`` (server side, per browser session): a browser
cannot claim a role. The navigation offers each role only its own pages, and every page
checks the role again before showing anything (:func:`require_student`,
:func:`require_researcher`).

A student's class code and nickname are also put in the page URL (``?class=..&nick=..``):
they are no secret (anyone may join with them) and let a reloaded tab carry on labelling.
A researcher's role is never put in the URL (a projector in a classroom shows it): a reload
starts a session without a role, and the entry script serves the login page at the reloaded
researcher page's URL (:func:`researcher_page_of`), which becomes that page after the login.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import streamlit as st

from appkit import resources
from cellspot.workflows.classroom import (
    ClassCodeSharedError,
    ClassNotFoundError,
    InvalidNicknameError,
    NicknameUse,
    join_class,
    leave_class,
    nickname_use,
    normalize_class_code,
)

log = logging.getLogger(__name__)

STUDENT = "student"
RESEARCHER = "researcher"
STUDENT_KEYS = ("annotator_id", "project_id", "nickname", "class_code", "tutorial_done")
#: the join page's notice after a reload whose class code is no longer open, and its pending "is that you?"
JOIN_NOTICE, JOIN_CONFIRM = "join_notice", "join_confirm"
LABEL_KEYS = ("task", "marks", "history", "feedback", "last_click", "current_label", "zoom", "centre")


@dataclass(frozen=True)
class Student:
    """The student of this browser session."""

    annotator_id: int
    project_id: int
    nickname: str
    class_code: str


def role() -> str | None:
    """``"student"``, ``"researcher"`` or ``None``."""
    return st.session_state.get("role")


def join(class_code: str, nickname: str) -> Student:
    """Join the class (creates the student on first join) and make this session a student's.

    Raises :class:`ClassNotFoundError` / :class:`InvalidNicknameError` with a message for the
    student.
    """
    with resources.session() as session:
        annotator = join_class(session, class_code, nickname)
        student = Student(annotator.id, annotator.project_id, annotator.nickname, annotator.class_code)
    forget_student()
    for key in (JOIN_NOTICE, JOIN_CONFIRM):
        st.session_state.pop(key, None)
    st.session_state.update(role=STUDENT, annotator_id=student.annotator_id,
                            project_id=student.project_id, nickname=student.nickname,
                            class_code=student.class_code)
    st.query_params.update({"class": student.class_code, "nick": student.nickname})
    return student


def use_of(class_code: str, nickname: str) -> NicknameUse:
    """What joining with ``nickname`` would continue (:func:`cellspot.workflows.classroom.nickname_use`);
    raises :class:`ClassNotFoundError` / :class:`InvalidNicknameError` as :func:`join` does."""
    with resources.session() as session:
        return nickname_use(session, class_code, nickname)


def restore_student_from_url() -> None:
    """Re-join the student named in the URL (after a reload), if this session has no role.

    A reload is the same student carrying on: no "is that you?" question. When the class code
    is no longer open (withdrawn or expired), the join page says so, with the nickname filled in.
    """
    if role() is not None:
        return
    code, nick = st.query_params.get("class"), st.query_params.get("nick")
    if not code or not nick:
        return
    try:
        join(code, nick)
        st.session_state["tutorial_done"] = True
    except (ClassNotFoundError, InvalidNicknameError) as exc:
        log.info("the class in the URL cannot be joined again (%s); the join page says so", exc)
        st.query_params.clear()
        if isinstance(exc, ClassNotFoundError):
            text = str(exc) if isinstance(exc, ClassCodeSharedError) else (
                f"The class code {normalize_class_code(code)} is no longer open: ask your teacher for the current one.")
            st.session_state[JOIN_NOTICE] = plain(text[:1].upper() + text[1:])
            st.session_state["join_nickname"] = str(nick)  # the join form's nickname field, filled in


def keep_student_in_url() -> None:
    """Put the student's class code and nickname back into the URL when a page change dropped
    them (Streamlit clears query parameters on navigation), so a reload carries on. Not while
    "is that you?" is open: a reload then rejoined from the URL without asking, onto the other
    student's marks."""
    if role() != STUDENT or st.session_state.get(JOIN_CONFIRM):
        return
    wanted = {"class": st.session_state["class_code"], "nick": st.session_state["nickname"]}
    if any(st.query_params.get(k) != v for k, v in wanted.items()):
        st.query_params.update(wanted)


def current_student() -> Student | None:
    """The student of this session, or ``None``."""
    if role() != STUDENT:
        return None
    s = st.session_state
    return Student(s["annotator_id"], s["project_id"], s["nickname"], s["class_code"])


def require_student() -> Student:
    """The student of this session; otherwise a notice and the page stops."""
    student = current_student()
    if student is None:
        st.warning("Join a class first (class code and nickname).")
        st.stop()
    return student


def forget_student(*, leave: bool = True) -> None:
    """Drop the student and their draft from this session (and from the URL); the image leased
    to them goes back to the round's queue at once (:func:`leave_class`). ``leave=False``, or
    a session that has not said it is the student labelling under that nickname right now
    (:func:`ask_if_same_student`): this session only, the store untouched (the draft and lease
    may be another student's)."""
    if st.session_state.get(JOIN_CONFIRM):
        leave = False
    if leave and role() == STUDENT and st.session_state.get("annotator_id") is not None:
        with resources.session() as session:
            leave_class(session, int(st.session_state["annotator_id"]))
    for key in (*STUDENT_KEYS, *LABEL_KEYS):
        st.session_state.pop(key, None)
    if st.session_state.get("role") == STUDENT:
        st.session_state.pop("role")
    for key in ("class", "nick"):
        st.query_params.pop(key, None)


def ask_if_same_student() -> bool:
    """When this session joined with a nickname someone is labelling under right now (the join
    page set :data:`JOIN_CONFIRM`), ask whether that is this student on another device: "Yes"
    carries on, "No" leaves this session only (the other student's draft and lease stay) and
    goes back to the join form with the class code filled in. True while the question is open."""
    pending = st.session_state.get(JOIN_CONFIRM)
    if not pending:
        return False
    st.warning(
        f"Someone is labelling as **{plain(pending['nickname'])}** in class {plain(pending['code'])} right now. "
        "Is that you, on another device or tab? If not, pick another nickname: with one nickname, two "
        "students share (and overwrite) each other's marks.", icon=":material/group:")
    mine, other = st.columns(2)
    mine.button("Yes, that is me", key="same_student_yes", width="stretch", on_click=_confirm_same_student)
    other.button("No, pick another nickname", key="same_student_no", type="primary", width="stretch",
                 on_click=_not_the_same_student)
    return True


def _confirm_same_student() -> None:
    st.session_state.pop(JOIN_CONFIRM, None)
    keep_student_in_url()  # a reload carries on from now


def _not_the_same_student() -> None:
    pending = st.session_state.pop(JOIN_CONFIRM, None) or {}
    forget_student(leave=False)
    st.session_state.update({
        "join_code": pending.get("code", ""), "join_nickname": "",
        JOIN_NOTICE: f"{plain(pending.get('nickname', 'That nickname'))} is taken in this class right now: "
                     "pick another nickname."})


def researcher_page_of(url: str | None, paths: list[str]) -> str | None:
    """The researcher page (one of ``paths``) that ``url`` (the browser's, :attr:`st.context.url`)
    opens, else None; noted in the session for the login page's notice."""
    from urllib.parse import urlparse

    last = urlparse(url or "").path.rstrip("/").rsplit("/", 1)[-1]
    wanted = last if last in paths else None
    if wanted is None:
        st.session_state.pop("researcher_page_wanted", None)
    else:
        st.session_state["researcher_page_wanted"] = wanted
    return wanted


def wanted_researcher_page() -> str | None:
    """The researcher page whose URL this session without a role opened (see :func:`researcher_page_of`)."""
    return st.session_state.get("researcher_page_wanted")


def is_researcher() -> bool:
    """True when this session logged in with the researcher password."""
    return role() == RESEARCHER and st.session_state.get("researcher_ok") is True


def login_researcher() -> None:
    """Make this session a researcher's (call only after the password was verified)."""
    forget_student()
    st.session_state.pop("researcher_page_wanted", None)
    st.session_state.update(role=RESEARCHER, researcher_ok=True)


def logout() -> None:
    """End any role of this session."""
    forget_student()
    for key in ("role", "researcher_ok", "r_project_id"):
        st.session_state.pop(key, None)


def require_researcher() -> None:
    """Stop the page unless this session is a logged-in researcher's."""
    if not is_researcher():
        st.error("This page is for researchers: log in with the researcher password.")
        st.stop()


#: the characters Streamlit's markdown gives a meaning (emphasis, links, code, LaTeX, HTML, lists)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$])")


def plain(text: str) -> str:
    """``text`` (a nickname, a class code) escaped for ``st.markdown`` and the other elements that
    render markdown, so it shows as typed: ``**md**`` is not bold, ``$x$`` no formula."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))

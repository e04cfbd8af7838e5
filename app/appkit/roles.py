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
    ClassNotFoundError,
    InvalidNicknameError,
    join_class,
    leave_class,
    runs_submitted,
)

log = logging.getLogger(__name__)

STUDENT = "student"
RESEARCHER = "researcher"
STUDENT_KEYS = ("annotator_id", "project_id", "nickname", "class_code", "tutorial_done")
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
    st.session_state.update(role=STUDENT, annotator_id=student.annotator_id,
                            project_id=student.project_id, nickname=student.nickname,
                            class_code=student.class_code)
    st.query_params.update({"class": student.class_code, "nick": student.nickname})
    return student


def runs_of(student: Student) -> int:
    """How many task runs ``student`` has submitted (in any session)."""
    with resources.session() as session:
        return runs_submitted(session, student.annotator_id)


def restore_student_from_url() -> None:
    """Re-join the student named in the URL (after a reload), if this session has no role."""
    if role() is not None:
        return
    code, nick = st.query_params.get("class"), st.query_params.get("nick")
    if not code or not nick:
        return
    try:
        join(code, nick)
        st.session_state["tutorial_done"] = True
    except (ClassNotFoundError, InvalidNicknameError) as exc:
        log.info("ignoring the class in the URL: %s", exc)
        st.query_params.clear()


def keep_student_in_url() -> None:
    """Put the student's class code and nickname back into the URL when a page change dropped
    them (Streamlit clears query parameters on navigation), so a reload carries on."""
    if role() != STUDENT:
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


def forget_student() -> None:
    """Drop the student and their draft from this session (and from the URL); the image leased
    to them goes back to the round's queue at once (:func:`leave_class`)."""
    if role() == STUDENT and st.session_state.get("annotator_id") is not None:
        with resources.session() as session:
            leave_class(session, int(st.session_state["annotator_id"]))
    for key in (*STUDENT_KEYS, *LABEL_KEYS):
        st.session_state.pop(key, None)
    if st.session_state.get("role") == STUDENT:
        st.session_state.pop("role")
    for key in ("class", "nick"):
        st.query_params.pop(key, None)


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

"""Join a class: class code + nickname (no account, no personal data)."""

from __future__ import annotations

import streamlit as st
from appkit import roles

from cellspot.workflows.classroom import NICKNAME_MAX_CHARS, ClassNotFoundError, InvalidNicknameError

st.title("Cell spotting")
st.write(
    "Mark the cells in microscopy images as **alive**, **dead** or **not sure**. "
    "Your marks help researchers build a clean dataset of how cells react to drugs."
)

with st.form("join", enter_to_submit=True):
    code = st.text_input("Class code", key="join_code", placeholder="e.g. DEMO",
                         help="The code your teacher gave you.")
    nickname = st.text_input(
        "Nickname", key="join_nickname", max_chars=NICKNAME_MAX_CHARS,
        help="Any name you like; please not your real full name.",
    )
    joined = st.form_submit_button("Join", type="primary")

if joined:
    try:
        student = roles.join(code, nickname)
    except (ClassNotFoundError, InvalidNicknameError) as exc:
        text = str(exc)  # only the first letter is raised: codes and project names keep their case
        st.error(text[:1].upper() + text[1:])
    else:
        # a nickname that has labelled before continues that student's work: say so, since two
        # students of one class who type the same nickname become one annotator
        done = roles.runs_of(student)
        if done:
            st.session_state["welcome_back"] = (
                f"Welcome back, {roles.plain(student.nickname)}: the {done} image(s) labelled with this nickname "
                f"in class {student.class_code} count as yours. Not you? Press Leave (in the page menu) and join with "
                "another nickname.")
        st.rerun()  # the navigation now offers the student pages, the tutorial first

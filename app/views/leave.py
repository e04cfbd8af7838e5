"""Leave the class on this device (the submitted runs stay; the draft is dropped)."""

from __future__ import annotations

import streamlit as st
from appkit import roles

student = roles.require_student()
st.title("Leave")
st.write(f"You are labelling as **{roles.plain(student.nickname)}** (class {roles.plain(student.class_code)}).")
st.write("Your submitted images are saved. Marks on the image you have not submitted are dropped.")
st.button("Leave this class", type="primary", on_click=roles.forget_student)

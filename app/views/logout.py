"""Log the researcher out of this browser session."""

from __future__ import annotations

import streamlit as st
from appkit import roles

roles.require_researcher()
st.title("Log out")
st.button("Log out", type="primary", on_click=roles.logout)

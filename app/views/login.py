"""Researcher login: one password (environment or Streamlit secrets), checked against a salted
hash, never echoed; wrong passwords are refused and slowed down for the whole server."""

from __future__ import annotations

import streamlit as st
from appkit import resources, roles

st.title("Researcher login")
wanted = roles.wanted_researcher_page()
if wanted:
    st.info(f"Log in to open the {wanted.capitalize()} page: a reload ends the "
            "researcher session (it lives only on the server, never in the browser).", icon=":material/lock:")
auth = resources.researcher_auth()
if auth is None:
    st.error("The configured researcher password hash is malformed; fix "
             "CELLSPOT_RESEARCHER_PASSWORD_HASH (see the server log). Login is closed.")
    st.stop()
if not auth.configured:
    st.warning("No researcher password is configured: set CELLSPOT_RESEARCHER_PASSWORD "
               "(or CELLSPOT_RESEARCHER_PASSWORD_HASH, or researcher_password in "
               "streamlit_config/secrets.toml) and restart the app.")
    st.stop()

with st.form("login", clear_on_submit=True, enter_to_submit=True):
    password = st.text_input("Password", type="password", key="login_password")
    submitted = st.form_submit_button("Log in", type="primary")

if submitted:
    result = auth.login(password)
    if result.ok:
        roles.login_researcher()
        st.rerun()  # the navigation now offers the researcher pages
    else:
        st.error(result.message)

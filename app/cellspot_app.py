"""cellspot: the classroom labelling station and the researcher dashboard (Streamlit).

Start it with ``cellspot app`` (what ``make run`` does); Streamlit options follow, e.g.
``cellspot app --server.port 8600``. Its Streamlit config is ``streamlit_config/``
(``app/.streamlit`` links there). The navigation offers each role only its own pages:

* nobody yet: Join a class, Researcher login;
* a student: Tutorial, Label, Leave;
* a researcher: Class, Review, Results, Models, Rounds, Setup, Export, Log out.

Pages are thin: they call ``cellspot`` workflow functions and hold no SQL or algorithms.
"""

from __future__ import annotations

import streamlit as st
from appkit import roles

st.set_page_config(page_title="cellspot", page_icon=":microscope:", layout="wide")

roles.restore_student_from_url()
roles.keep_student_in_url()

JOIN = st.Page("views/join.py", title="Join a class", icon=":material/login:", url_path="join")
LOGIN = st.Page("views/login.py", title="Researcher login", icon=":material/lock:", url_path="login")
TUTORIAL = st.Page("views/tutorial.py", title="Tutorial", icon=":material/school:", url_path="tutorial")
LABEL = st.Page("views/label.py", title="Label", icon=":material/ads_click:", url_path="label")
LEAVE = st.Page("views/leave.py", title="Leave", icon=":material/logout:", url_path="leave")
CLASS = st.Page("views/class_view.py", title="Class", icon=":material/groups:", url_path="class")
REVIEW = st.Page("views/review.py", title="Review", icon=":material/rule:", url_path="review")
RESULTS = st.Page("views/results.py", title="Results", icon=":material/bar_chart:", url_path="results")
MODELS = st.Page("views/models.py", title="Models", icon=":material/model_training:", url_path="models")
ROUNDS = st.Page("views/rounds.py", title="Rounds", icon=":material/low_priority:", url_path="rounds")
SETUP = st.Page("views/setup.py", title="Setup", icon=":material/settings:", url_path="setup")
EXPORT = st.Page("views/export.py", title="Export", icon=":material/download:", url_path="export")
LOGOUT = st.Page("views/logout.py", title="Log out", icon=":material/logout:", url_path="logout")

RESEARCHER_PAGES = [CLASS, REVIEW, RESULTS, MODELS, ROUNDS, SETUP, EXPORT, LOGOUT]

if roles.role() == roles.STUDENT:
    # the tutorial opens first after joining; once done or skipped, the label page is the home
    first = LABEL if st.session_state.get("tutorial_done") else TUTORIAL
    pages = [first, *(p for p in (TUTORIAL, LABEL) if p is not first), LEAVE]
elif roles.is_researcher():
    pages = RESEARCHER_PAGES
else:
    # a researcher page's URL without a researcher session (a reload ends it: the role lives
    # only in this server-side session): the login page answers at that URL, so there is no
    # "page not found", and once logged in the same URL is that page again
    wanted = roles.researcher_page_of(st.context.url, [p.url_path for p in RESEARCHER_PAGES if p is not LOGOUT])
    login = LOGIN if wanted is None else st.Page("views/login.py", title="Researcher login",
                                                 icon=":material/lock:", url_path=wanted)
    pages = [JOIN, login]

st.navigation(pages, position="top").run()

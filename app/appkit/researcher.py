"""Shared by the researcher pages: the project picker and short-lived cached summaries.

Summaries are cached with ``st.cache_data`` for a few seconds, keyed by the database URL and
the project, so several researcher tabs and the auto-refreshing class view do not repeat the
same queries; pages clear the cache after they write.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

from appkit import resources, roles
from cellspot.consensus import DEFAULT_METHOD
from cellspot.store.models import Project
from cellspot.store.queries import project_summaries
from cellspot.workflows.dashboard import (
    Activity,
    ConsensusBasis,
    Results,
    class_activity,
    consensus_basis,
    results,
)

SUMMARY_TTL_S = 5


@st.cache_data(ttl=SUMMARY_TTL_S, show_spinner=False)
def projects(url: str) -> pd.DataFrame:
    """One row per project with its counts (:func:`cellspot.store.queries.project_summaries`)."""
    with resources.session() as session:
        return project_summaries(session)


@st.cache_data(ttl=SUMMARY_TTL_S, show_spinner=False)
def activity(url: str, project_id: int, window_minutes: int, class_code: str | None) -> Activity:
    """:func:`cellspot.workflows.dashboard.class_activity` of a project (cached briefly)."""
    with resources.session() as session:
        project = session.get(Project, project_id)
        return class_activity(session, project, window_minutes=window_minutes, class_code=class_code)


@st.cache_data(ttl=SUMMARY_TTL_S, show_spinner=False)
def project_results(url: str, project_id: int, min_confidence: float = 0.0) -> Results:
    """:func:`cellspot.workflows.dashboard.results` of a project (cached briefly)."""
    with resources.session() as session:
        project = session.get(Project, project_id)
        return results(session, project, min_confidence=min_confidence)


@st.cache_data(ttl=SUMMARY_TTL_S, show_spinner=False)
def project_basis(url: str, project_id: int) -> ConsensusBasis:
    """:func:`cellspot.workflows.dashboard.consensus_basis` of a project (cached briefly)."""
    with resources.session() as session:
        return consensus_basis(session, session.get(Project, project_id))


#: seconds within which the same request again is taken for a double click, not a new request
REPEAT_WINDOW_S = 5.0
_DONE = "done."


def repeated(action: str, request: tuple) -> bool:
    """True when ``action`` with the same ``request`` was started (see :func:`act`) or succeeded
    less than :data:`REPEAT_WINDOW_S` ago in this session (see :func:`done`): a double click on a
    button that queues work (a second training run, a second round) rather than a new request."""
    last = st.session_state.get(f"{_DONE}{action}")
    if not isinstance(last, dict) or last.get("failed"):
        return False
    return last["request"] == request and time.monotonic() - last["at"] < REPEAT_WINDOW_S


def done(action: str, request: tuple) -> dict:
    """The session state that records ``action``'s ``request`` as done now (for :func:`repeated`;
    :func:`act` writes it before the action runs)."""
    return {f"{_DONE}{action}": {"request": request, "at": time.monotonic(), "failed": False}}


def act(notice_key: str, errors: tuple[type[Exception], ...], action, *args, remember: dict | None = None) -> None:
    """Run a page action: its message goes to ``st.session_state[notice_key]`` for the page to
    show after the rerun, an error of ``errors`` is shown at once; ``remember``: session state
    for a successful action (e.g. :func:`done`). Forgets the cached summaries before the rerun.

    ``remember`` is written *before* the action, the :func:`done` marks last, and taken back when
    the action fails. A second click is a new run that interrupts this one at its next ``st``
    call, and writing ``st.session_state`` is one: a mark written after the action was lost when
    the second click came while the job was being queued, and the second run queued it again.
    From the mark's write to the action there is no ``st`` call, and the mark is a dict that
    later steps change in place, which cannot be interrupted.
    """
    remember = remember or {}
    marks = [key for key in remember if key.startswith(_DONE)]
    before = {key: st.session_state.get(key) for key in remember}
    for key in sorted(remember, key=lambda k: k in marks):  # the marks last: nothing runs between them and the action
        st.session_state[key] = remember[key]
    try:
        message = action(*args)
    except Exception as exc:  # not Streamlit's rerun / stop: a rerun leaves the marks standing
        for key in marks:
            remember[key]["failed"] = True  # in place: no interruption between the failure and this
        for key, value in before.items():
            if value is None:
                st.session_state.pop(key, None)
            else:
                st.session_state[key] = value
        if not isinstance(exc, errors):
            raise  # a bug: shown by Streamlit, and the next click is a new request, not "a moment ago"
        st.error(str(exc))
        return
    for key in marks:
        remember[key]["at"] = time.monotonic()  # the window counts from the action's end
    st.session_state[notice_key] = message
    refresh()
    st.rerun()


def refresh() -> None:
    """Forget the cached summaries (after a write)."""
    for cached in (projects, activity, project_results, project_basis):
        cached.clear()


def url() -> str:
    return resources.settings().resolved_database_url


def page_header(title: str) -> Project | None:
    """The page title with the project picker beside it; returns the chosen project (``None``
    when there is none). Stops the page unless a researcher is logged in."""
    roles.require_researcher()
    title_col, pick_col = st.columns([3, 1], vertical_alignment="bottom")
    title_col.title(title)
    table = projects(url())
    if table.empty:
        return None
    ids = table["project_id"].astype(int).tolist()
    names = dict(zip(ids, table["project"].astype(str)))
    current = st.session_state.get("r_project_id")
    if current not in ids:
        default = resources.settings().default_project
        current = next((i for i in ids if names[i] == default), ids[0])
    # ``r_project_id`` is the project; the picker shows it. Its value is written under its key
    # on every run, before it is drawn: the browser keeps a widget's value across reruns and
    # ignores a changed default (a project created on Setup stayed unpicked), and each page has
    # its own picker (one left on another page showed the first project). A pick by hand
    # updates ``r_project_id`` in its callback, which runs before the page.
    st.session_state["r_project_id"] = current
    st.session_state["r_project_pick"] = current
    pick_col.selectbox("Project", ids, format_func=names.get, key="r_project_pick", on_change=_follow_pick)
    with resources.session() as session:
        return session.get(Project, current)


def _follow_pick() -> None:
    st.session_state["r_project_id"] = st.session_state["r_project_pick"]


def switch_project(project_id: int) -> None:
    """Make ``project_id`` the picked project from the next run on (after creating it, say)."""
    st.session_state["r_project_id"] = project_id


def recompute_consensus(project_id: int) -> str:
    """Recompute the consensus of a project now (with a spinner), drop the cached summaries and
    return the report's one-line summary."""
    from cellspot.workflows.aggregate import aggregate

    with st.spinner("Computing consensus..."):
        with resources.session() as session:
            report = aggregate(session, session.get(Project, project_id), method=DEFAULT_METHOD)
    refresh()
    return report.summary()


def csv_name(project_name: str, what: str, min_confidence: float = 0.0) -> str:
    """File name of a Results download: with the confidence threshold when one is set, so the
    files of two thresholds are not mixed up (``demo-per-image-min-confidence-0.95.csv``)."""
    suffix = f"-min-confidence-{min_confidence:.2f}" if min_confidence > 0 else ""
    return f"{project_name}-{what}{suffix}.csv"

"""Live class view: who is labelling, how fast, which images are done, how well students agree.

The numbers refresh on their own every few seconds (``st.fragment(run_every=...)``); the
rest of the page does not rerun. The annotators table lists everyone whose runs the numbers
count: class students, annotators imported from click files, experts and researchers.
"""

from __future__ import annotations

import streamlit as st
from appkit import charts, researcher, roles

from cellspot.workflows.dashboard import annotator_counts

REFRESH_S = 5
#: how the caption names the annotators of each role (one, several)
ROLE_NOUNS = {"student": ("class student", "class students"), "imported": ("imported annotator", "imported annotators"),
              "expert": ("expert", "experts"), "researcher": ("researcher", "researchers")}
ROLE_HELP = ("student: joined the class with its code · imported: runs from a click file (`cellspot import clicks`) · "
             "expert: expert cells · researcher: adjudications on the Review page")
CONSENSUS_CLICKS_HELP = (
    "Clicks the latest consensus counted (n_clicks in the export's annotators.csv). It sets aside a click "
    "within 1 px of an earlier click of the same run (the same spot clicked twice), so this can be lower "
    "than clicks; clicks made after the snapshot are not in it until you recompute. Empty before a consensus.")

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Class")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()

codes = list((project.settings or {}).get("class_codes") or [])
top = st.columns([2, 2, 2, 3])
class_code = top[0].selectbox("Class", [None, *codes], format_func=lambda c: "all classes" if c is None else c,
                              key="class_filter")
window = top[1].selectbox("Window", [5, 10, 30, 60], index=1, format_func=lambda m: f"last {m} min",
                          key="class_window")
live = top[2].toggle("Live (every 5 s)", value=True, key="class_live")
with top[3]:
    if st.button("Recompute consensus", help="Update cells, reliability and retirement from every click now"):
        st.success(researcher.recompute_consensus(project.id))


def _who(act) -> str:
    """``"3 class students (2 active), 105 imported annotators (105 active)"``: every role in the table."""
    parts = []
    for r in annotator_counts(act.students).itertuples(index=False):
        one, many = ROLE_NOUNS.get(r.role, (r.role, r.role))
        parts.append(f"{r.annotators} {one if r.annotators == 1 else many} ({r.active} active)")
    return ", ".join(parts) or "no annotators yet"


def _metrics(act) -> None:
    row = st.columns(6)
    row[0].metric("Students active", f"{act.students_active} / {act.students_total}",
                  help=f"Class students (joined with a class code) with a run or a join in the last "
                       f"{act.window_minutes} minutes, of all class students. Imported annotators, experts and "
                       "researchers are not counted here; they are in the annotators table, and their runs count "
                       "in the rates and totals.")
    rate_help = (f"Over the last {act.window_minutes} minutes, every annotator's runs: imported runs count at "
                 "their file's timestamps, or at the import when the file had none")
    row[1].metric("Runs per minute", f"{act.runs_per_minute:.1f}", help=rate_help)
    row[2].metric("Clicks per minute", f"{act.clicks_per_minute:.1f}", help=rate_help)
    row[3].metric("Images unseen", act.images_unseen)
    row[4].metric("In progress", act.images_in_progress)
    row[5].metric("Retired", act.images_retired, help="Consensus certain enough: no more students needed")
    st.caption(f"{act.runs_total} runs, {act.clicks_total} clicks in all, by {_who(act)} · "
               f"updated {act.now:%H:%M:%S} UTC · "
               + (f"consensus snapshot {act.snapshot_id} of {act.snapshot_at:%Y-%m-%d %H:%M} UTC"
                  if act.snapshot_id else "no consensus yet (Recompute consensus)"))


def _charts(act) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Runs and clicks per minute")
        if int(act.timeline["runs"].sum()) == 0:
            st.info(f"No task runs in the last {act.window_minutes} minutes.")
        else:
            st.altair_chart(charts.timeline_chart(act.timeline), width="stretch")
    with right:
        st.subheader("Consensus confidence per image")
        hist = charts.confidence_histogram(act.agreement)
        if act.agreement.dropna(subset=["mean_confidence"]).empty:
            st.info("No consensus yet.")
        elif hist.n_images == 0:
            st.info(f"No image with {hist.min_runs}+ runs has a consensus yet: "
                    "confidence shows agreement only where several students saw an image.")
        else:
            st.altair_chart(charts.confidence_chart(hist), width="stretch")
        if not act.agreement.empty:
            st.caption(charts.confidence_note(hist))


def _students(act) -> None:
    st.subheader("Annotators")
    table = act.students.drop(columns=["annotator_id"])
    if table.empty:
        st.info("No annotators yet: students appear here when they join, imported ones after an import.")
        return
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={
            "nickname": st.column_config.TextColumn("nickname", width=130, pinned=True),
            "role": st.column_config.TextColumn("role", width="small", help=ROLE_HELP),
            "runs": st.column_config.NumberColumn("runs", width="small", help="Task runs submitted, all time"),
            "weight": st.column_config.NumberColumn(
                "weight", format="%.2f", width="small",
                help="Reliability weight in the latest consensus (sensitivity x balanced label accuracy)"),
            "clicks": st.column_config.NumberColumn("clicks", width="small", help="Every stored click of the runs"),
            "consensus_clicks": st.column_config.NumberColumn("clicks used", width="small", help=CONSENSUS_CLICKS_HELP),
            "runs_in_window": st.column_config.NumberColumn(
                "recent runs", width="small", help=f"Task runs in the last {act.window_minutes} minutes"),
            "last_seen": st.column_config.DatetimeColumn("last seen", format="HH:mm:ss", width="small",
                                                         help="Last run (or join), UTC"),
            "active": st.column_config.CheckboxColumn(
                "active", width="small", help=f"A run or a join in the last {act.window_minutes} minutes"),
            "class_code": st.column_config.TextColumn("class", width="small"),
            "gold_checks": st.column_config.NumberColumn("gold", width="small", help="Runs on gold (expert) images"),
            **{c: st.column_config.NumberColumn(c.replace("accuracy_", "acc. "), format="%.2f", width="small")
               for c in ("sensitivity", "precision", "accuracy_alive", "accuracy_dead")},
        },
    )
    st.download_button("Download annotators (CSV)", table.to_csv(index=False), "class-annotators.csv", "text/csv")


@st.fragment(run_every=REFRESH_S if live else None)
def live_view(project_id: int, window_minutes: int, code: str | None) -> None:
    act = researcher.activity(researcher.url(), project_id, window_minutes, code)
    _metrics(act)
    _charts(act)
    _students(act)
    if not act.agreement.empty:
        with st.expander("Consensus confidence per image (table)"):
            st.dataframe(act.agreement, hide_index=True, width="stretch")


live_view(project.id, int(window), class_code)

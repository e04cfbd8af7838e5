"""Live class view: who is labelling, how fast, which images are done, how well students agree.

The numbers refresh on their own every few seconds (``st.fragment(run_every=...)``); the
rest of the page does not rerun.
"""

from __future__ import annotations

import altair as alt
import streamlit as st
from appkit import researcher, roles

REFRESH_S = 5

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


def _metrics(act) -> None:
    row = st.columns(6)
    row[0].metric("Students active", f"{act.students_active} / {act.students_total}",
                  help=f"With a run or a join in the last {act.window_minutes} minutes")
    row[1].metric("Runs per minute", f"{act.runs_per_minute:.1f}")
    row[2].metric("Clicks per minute", f"{act.clicks_per_minute:.1f}")
    row[3].metric("Images unseen", act.images_unseen)
    row[4].metric("In progress", act.images_in_progress)
    row[5].metric("Retired", act.images_retired, help="Consensus certain enough: no more students needed")
    st.caption(f"{act.runs_total} runs, {act.clicks_total} clicks in all · updated {act.now:%H:%M:%S} UTC · "
               + (f"consensus snapshot {act.snapshot_id} of {act.snapshot_at:%Y-%m-%d %H:%M} UTC"
                  if act.snapshot_id else "no consensus yet (Recompute consensus)"))


def _charts(act) -> None:
    left, right = st.columns(2)
    with left:
        st.subheader("Runs and clicks per minute")
        timeline = act.timeline.melt("minute", var_name="what", value_name="count")
        st.altair_chart(
            alt.Chart(timeline).mark_line(point=True).encode(
                x=alt.X("minute:T", title="minute (UTC)"), y=alt.Y("count:Q", title="per minute"),
                color="what:N", strokeDash="what:N"),
            width="stretch")
    with right:
        st.subheader("Agreement per image")
        agreement = act.agreement.dropna(subset=["mean_confidence"])
        if agreement.empty:
            st.info("No consensus yet.")
        else:
            st.altair_chart(
                alt.Chart(agreement).mark_bar().encode(
                    x=alt.X("mean_confidence:Q", bin=alt.Bin(extent=[0, 1], step=0.05),
                            title="mean consensus confidence of the image's cells"),
                    y=alt.Y("count():Q", title="images"), color=alt.Color("status:N")),
                width="stretch")


def _students(act) -> None:
    st.subheader("Students")
    table = act.students.drop(columns=["annotator_id"]).rename(columns={"runs_in_window": "runs (window)"})
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={
            "active": st.column_config.CheckboxColumn("active"),
            "last_seen": st.column_config.DatetimeColumn("last seen", format="HH:mm:ss"),
            **{c: st.column_config.NumberColumn(c, format="%.2f")
               for c in ("sensitivity", "precision", "accuracy_alive", "accuracy_dead", "weight")},
        },
    )
    st.download_button("Download students (CSV)", table.to_csv(index=False), "students.csv", "text/csv")


@st.fragment(run_every=REFRESH_S if live else None)
def live_view(project_id: int, window_minutes: int, code: str | None) -> None:
    act = researcher.activity(researcher.url(), project_id, window_minutes, code)
    _metrics(act)
    _charts(act)
    _students(act)
    if not act.agreement.empty:
        with st.expander("Agreement per image (table)"):
            st.dataframe(act.agreement, hide_index=True, width="stretch")


live_view(project.id, int(window), class_code)

"""Results: alive / dead counts and viability per image, and viability by condition (plots).

Every table here can be downloaded as CSV; the numbers come from the latest consensus
snapshot (:func:`cellspot.workflows.dashboard.results`).
"""

from __future__ import annotations

import altair as alt
import streamlit as st
from appkit import charts, researcher, roles

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Results")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()

if "results_message" in st.session_state:
    st.success(st.session_state.pop("results_message"))
min_confidence = st.slider("Count only cells with a consensus confidence of at least", 0.0, 1.0, 0.0, 0.05,
                           key="results_min_conf")
res = researcher.project_results(researcher.url(), project.id, float(min_confidence))
per_image, by_condition = res.per_image, res.by_condition
if per_image.empty:
    st.info("This project has no images yet.")
    st.stop()
# the counts are those of the latest consensus snapshot: say which, and when the store moved on
basis = researcher.project_basis(researcher.url(), project.id)
if basis.snapshot_id is None or basis.behind:
    note, button = st.columns([4, 1], vertical_alignment="center")
    if basis.snapshot_id is None:
        note.info("No consensus yet, so no cells are counted: recompute it from the students' clicks.",
                  icon=":material/info:")
    else:
        note.warning(f"These counts are out of date: {basis.behind.split('; recompute')[0]}.",
                     icon=":material/history:")
    if button.button("Recompute consensus", key="results_aggregate", type="primary"):
        st.session_state["results_message"] = researcher.recompute_consensus(project.id)
        st.rerun()
else:
    st.caption(f"From consensus snapshot {basis.snapshot_id} of {basis.snapshot_at:%Y-%m-%d %H:%M} UTC, "
               "up to date with every click.")

counted = per_image.dropna(subset=["viability_pct"])
row = st.columns(4)
row[0].metric("Images", len(per_image))
row[1].metric("Alive cells", int(per_image["n_alive"].sum()))
row[2].metric("Dead cells", int(per_image["n_dead"].sum()))
total = per_image["n_alive"].sum() + per_image["n_dead"].sum()
row[3].metric("Viability", f"{100 * per_image['n_alive'].sum() / total:.1f} %" if total else "-")

st.subheader("Viability by condition")
plot, groups = charts.condition_plot_frame(by_condition)
if by_condition.empty or not groups:
    st.info("No condition metadata to group by.")
else:
    st.altair_chart(charts.viability_chart(plot, groups), width="stretch")
    st.caption("Bars: viability pooled over the cells of each condition. Diamonds and whiskers: mean ± SD of "
               "the images' viability, the whiskers cut at 0 and 100 % (none for a condition with one counted "
               "image).")
    st.dataframe(by_condition, hide_index=True, width="stretch")
    st.download_button("Download by condition (CSV)", by_condition.to_csv(index=False),
                       researcher.csv_name(project.name, "viability-by-condition", min_confidence),
                       "text/csv")

dose = next((c for c in ("meta_dose_uM", "meta_dose") if c in counted.columns), None)
if dose is not None and counted[dose].notna().any():
    st.subheader("Viability against dose")
    time_col = next((c for c in ("meta_time_h", "meta_time") if c in counted.columns), None)
    encoding = {"x": alt.X(f"{dose}:Q", title=dose.removeprefix("meta_")),
                "y": alt.Y("viability_pct:Q", title="viability %", scale=alt.Scale(domain=[0, 100])),
                "tooltip": ["image", dose, "n_alive", "n_dead", "viability_pct"]}
    if time_col is not None:
        encoding["color"] = alt.Color(f"{time_col}:N", title=time_col.removeprefix("meta_"))
        encoding["shape"] = alt.Shape(f"{time_col}:N", title=time_col.removeprefix("meta_"))
    st.altair_chart(alt.Chart(counted).mark_point(size=80, filled=True).encode(**encoding), width="stretch")

st.subheader("Per image")
st.dataframe(per_image, hide_index=True, width="stretch",
             column_config={"viability_pct": st.column_config.NumberColumn("viability %", format="%.1f"),
                            "mean_confidence": st.column_config.NumberColumn("mean confidence", format="%.2f")})
st.download_button("Download per image (CSV)", per_image.to_csv(index=False),
                   researcher.csv_name(project.name, "per-image", min_confidence), "text/csv")

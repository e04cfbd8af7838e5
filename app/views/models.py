"""Models: train the alive/dead classifier and the cell detector, watch them train, compare
runs, promote or roll back, and predict the whole project with the active models.

The page only queues jobs (:mod:`cellspot.workflows.models`, :mod:`cellspot.jobs`): a
``cellspot worker`` process trains and predicts. Runs that are queued or running refresh on
their own every 2 s (``st.fragment(run_every=...)``); the rest of the page does not rerun.
"""

from __future__ import annotations

from functools import partial

from datetime import datetime, timezone

import pandas as pd
import streamlit as st
from appkit import charts, model_runs, researcher, resources, roles

from cellspot.jobs import JobQueueError
from cellspot.ml.overlay import draw_overlay
from cellspot.ml.predict import DEFAULT_DIAMETER
from cellspot.ml.registry import (
    RegistryError,
    RunNotFoundError,
    format_metric,
    metric_columns,
    metric_labels,
    scored_on_note,
)
from cellspot.render import ImageUnavailableError
from cellspot.store.models import MODEL_KINDS
from cellspot.workflows.models import LOST_AFTER_S, STORE_SOURCES, WorkflowError

REFRESH_S = 2
PRESETS = ("cpu-fast", "quality")
PRESET_HELP = "cpu-fast: small model, minutes on a laptop CPU · quality: larger model, meant for a GPU worker"
ERRORS = (WorkflowError, RegistryError, RunNotFoundError, JobQueueError, LookupError)
WORKER_HINT = ("No worker seems to be running: {version} has waited {waited} in the queue. Start one in a "
               "terminal with `cellspot worker` (same CELLSPOT_HOME and database as this app); it picks the "
               "run up at once.")

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Models")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()
URL = model_runs.url()

notice = st.session_state.pop("models_notice", None)
if isinstance(notice, tuple):  # (level, text): an action that ended otherwise than asked
    getattr(st, notice[0])(notice[1])
elif notice:
    st.success(notice)


act = partial(researcher.act, "models_notice", ERRORS)  # message after the rerun, error at once


# --------------------------------------------------------------------------- train

with st.container(border=True):
    st.subheader("Train a model")
    # outside the form: the config fields' example below follows the kind at once (a form's
    # widgets send their values only on submit, and "polarity=auto" is no classifier field)
    kind = st.radio("Model", MODEL_KINDS, key="train_kind", horizontal=True,
                    help="classifier: alive or dead for each cell · detector: finds the cells (U-Net)")
    train_form = st.form("models_train", border=False)
with train_form:
    cols = st.columns([2, 2, 2])
    preset = cols[0].radio("Preset", PRESETS, key="train_preset", horizontal=True, help=PRESET_HELP)
    source = cols[1].radio("Train on", STORE_SOURCES, key="train_source", horizontal=True,
                           help="consensus: the latest consensus snapshot · expert: expert cells only")
    epochs = cols[2].number_input("Epochs (optional)", min_value=1, max_value=1000, value=None, step=1,
                                  key="train_epochs", placeholder="preset default")
    fields_text = st.text_input(
        "Config fields (optional)", key="train_set", placeholder=f"e.g. {model_runs.CONFIG_EXAMPLES[kind]}",
        help=f"FIELD=VALUE pairs separated by spaces, over the preset: any field of the {kind}'s config. "
             "polarity=auto is a detector field, for stained or brightfield images (dark nuclei on a light "
             "background). Lists as decoder_channels=[64, 32, 16, 16] or 64,32,16,16.")
    submitted = st.form_submit_button("Train", type="primary", icon=":material/model_training:")
    st.caption("Training runs in the background worker (`cellspot worker`); this page queues it and "
               "shows its progress.")
train_request = (project.id, kind, preset, epochs, source, fields_text)
if submitted and researcher.repeated("train", train_request):
    st.info("This training was queued a moment ago (a double click?), so it was not queued again.")
elif submitted:
    act(lambda: f"{model_runs.train(project.name, kind, preset, epochs, source, fields_text)} queued.",
        remember=researcher.done("train", train_request))



def live_states(table: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    """``(version, status)`` of the queued and running runs of ``table``."""
    rows = table[table["status"].isin(model_runs.LIVE_STATUSES)]
    return tuple(zip(rows["version"], rows["status"]))


runs = model_runs.runs(URL, project.id)
live = live_states(runs)


# --------------------------------------------------------------------------- live runs

def show_charts(long: pd.DataFrame, key: str, title: str = "") -> None:
    """Losses and metrics of :func:`charts.curves_long` rows side by side."""
    parts = charts.curves_charts(long, title)
    for i, (col, chart) in enumerate(zip(st.columns(len(parts)), parts)):
        col.altair_chart(chart, width="stretch", key=f"{key}-{i}")


def show_curves(curves: pd.DataFrame, key: str, title: str = "") -> None:
    long = charts.curves_long(curves)
    if long.empty:
        st.caption("No finished epoch yet.")
    else:
        show_charts(long, key, title)


def live_run(version: str) -> None:
    view = model_runs.run_view(URL, version)
    with st.container(border=True):
        st.markdown(f"**{view.version}** · {view.status} · preset {view.preset}")
        st.progress(charts.progress_fraction(view.progress), text=charts.progress_text(view.progress, view.status))
        waited = view.queued_for_s()
        busy = [v for v, status in live if status == "running" and v != view.version]
        if view.status == "queued" and not busy:  # the worker may be training another project's run
            busy = [f"{v} (another project)" for v in model_runs.running_elsewhere(URL, project.id)]
        silent = view.silent_s
        other_jobs = model_runs.busy_jobs() if view.status == "queued" and not busy else []
        if view.status == "queued" and busy:
            st.caption(f"Queued behind {', '.join(busy)}: the worker takes it when that one ends.")
        elif other_jobs:
            job = other_jobs[0]
            running = charts.format_seconds((datetime.now(timezone.utc) - job.since).total_seconds())
            st.caption(f"Queued behind {job.describe()} (running for {running}): the worker takes it when that "
                       "ends.")
        elif waited > model_runs.WORKER_WAIT_S:
            st.warning(WORKER_HINT.format(version=view.version, waited=charts.format_seconds(waited)),
                       icon=":material/warning:")
        elif view.status == "queued":
            st.caption("Queued: waiting for a worker to pick it up.")
        elif silent > model_runs.SILENT_WARN_S:
            st.warning(f"No progress from {view.version} for {charts.format_seconds(silent)}: its worker may have "
                       f"stopped. After {charts.format_seconds(LOST_AFTER_S)} without progress, Cancel "
                       "marks it failed (and a new `cellspot worker` does so when it starts).",
                       icon=":material/warning:")
        show_curves(view.curves, key=f"live-curves-{version}")
        if st.button("Cancel", key=f"cancel-{version}", icon=":material/stop:",
                     help="A queued run is cancelled at once; a running one stops at its next check and "
                          "can be resumed later"):
            act(model_runs.cancel, version)


@st.fragment(run_every=REFRESH_S if live else None)
def live_runs(expected: tuple[tuple[str, str], ...]) -> None:
    now = live_states(model_runs.runs(URL, project.id))
    if now != expected:  # a run started, finished or was added: history and buttons change too
        st.rerun()
    for version, _status in now:
        live_run(version)


if live:
    st.subheader("Training now")
    live_runs(live)


# --------------------------------------------------------------------------- history

st.subheader("Run history")
if runs.empty:
    st.info("No model yet: train one above (a classifier and a detector are both needed to predict).")
    st.stop()

# the table keeps the columns' names (``dead_f1``, as in the CSV); its headings say them in words
metric_names = {c: metric_labels(kind_name).get(metric, c) for c, kind_name, metric in metric_columns(MODEL_KINDS)}
metric_cols = [c for c in metric_names if c in runs.columns and runs[c].notna().any()]
history = runs[["version", "kind", "status", "preset", "active", *metric_cols, "scored_on", "progress", "seconds",
                "created", "data_snapshot_id", "error"]].copy()
# the table is read once per page load: a live run's progress here would lag the bar under "Training now"
history.loc[history["status"].isin(model_runs.LIVE_STATUSES), "progress"] = None
st.dataframe(history, hide_index=True, width="stretch", key="models_history", column_config={
    "active": st.column_config.CheckboxColumn("active"),
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
    "seconds": st.column_config.NumberColumn("seconds", format="%.0f"),
    "created": st.column_config.DatetimeColumn("created (UTC)", format="YYYY-MM-DD HH:mm"),
    **{c: st.column_config.NumberColumn(metric_names[c], format="%.3f") for c in metric_cols},
})
st.download_button("Download run history (CSV)", history.to_csv(index=False), f"{project.name}-model-runs.csv",
                   "text/csv")

versions = runs["version"].tolist()
chosen = st.selectbox("Run", versions, key="models_run", help="Details, curves and actions of one run")
view = model_runs.run_view(URL, chosen)
with st.container(border=True):
    st.markdown(f"**{view.version}** · {view.kind} · {view.status} · preset {view.preset}"
                + (" · **active**" if view.is_active else "")
                + (f" · data {view.data_snapshot_id}" if view.data_snapshot_id else ""))
    if view.error:
        (st.error if view.status == "failed" else st.caption)(view.error)
    if view.metrics:
        st.caption(charts.short_metrics(view.metrics, limit=6, labels=metric_labels(view.kind)))
    show_curves(view.curves, key=f"curves-{view.version}")
    buttons = st.columns(4)
    if buttons[0].button("Promote", key="models_promote", icon=":material/verified:",
                         disabled=view.status != "done" or view.is_active,
                         help="Make this run the active model of its kind (used by Predict project)"):
        act(model_runs.promote, view.version)
    if buttons[1].button("Resume", key="models_resume", icon=":material/play_arrow:",
                         disabled=not view.resumable,
                         help="Queue a cancelled or failed run again from its last checkpoint (resume.pt; "
                              "a run that failed before saving one has nothing to go on from)"):
        act(model_runs.resume, view.version)
    if buttons[2].button("Cancel", key="models_cancel", icon=":material/stop:",
                         disabled=view.status not in model_runs.LIVE_STATUSES):
        act(model_runs.cancel, view.version)
    with st.expander("Config and all metrics"):
        st.json({"config": view.config, "metrics": view.metrics}, expanded=False)


# --------------------------------------------------------------------------- compare

st.subheader("Compare two runs")
if len(versions) < 2:
    st.info("Train a second run to compare it with the first.")
else:
    pick = st.columns(2)
    kinds = dict(zip(runs["version"], runs["kind"]))
    # by default the second-newest run of the newest kind with two runs (B: the newest of it):
    # a pair that can be compared, not a lone detector beside two classifiers
    pairable = [v for v in versions if sum(kinds[w] == kinds[v] for w in versions) > 1]
    newest_kind = [v for v in pairable if kinds[v] == kinds[pairable[0]]] if pairable else []
    first = pick[0].selectbox("Run A", versions, key="compare_a",
                              index=versions.index(newest_kind[1]) if newest_kind else 1)
    same_kind = [v for v in versions if kinds[v] == kinds[first] and v != first]  # newest first
    second = pick[1].selectbox("Run B", same_kind, index=0, key="compare_b") if same_kind else None
    if second is None:
        st.info(f"No other {kinds[first]} run to compare {first} with: runs are compared with runs of their kind.")
    else:
        table = model_runs.compare(URL, first, second)
        # one metric per row: counts (n, epochs) without decimals, scores with four
        st.dataframe(table.map(lambda v: format_metric(v, 4)), width="stretch", key="models_compare")
        if (note := scored_on_note(table)) is not None:
            st.warning(note[0].upper() + note[1:] + ".", icon=":material/warning:")
        st.download_button("Download the comparison (CSV)", table.to_csv(), f"compare-{first}-{second}.csv",
                           "text/csv", key="models_compare_csv")
        overlaid = pd.concat([charts.curves_long(model_runs.run_view(URL, v).curves, run=v) for v in (first, second)],
                             ignore_index=True)
        if overlaid.empty:
            st.caption("Neither run has finished an epoch yet.")
        else:
            show_charts(overlaid, key="compare-curves")
            st.caption(f"Solid / dashed: {first} / {second} (by run).")


# --------------------------------------------------------------------------- active models, predictions

st.subheader("Active models and predictions")
active = model_runs.active_versions(URL, project.id)
row = st.columns(4)
for i, kind_name in enumerate(MODEL_KINDS):
    # text, not st.metric: its large figure cut "classifier-0007" to "classifier-0…" at 1024 px
    row[2 * i].markdown(f"Active {kind_name}:  \n**{active[kind_name] or 'none'}**")
    if row[2 * i + 1].button(f"Roll back {kind_name}", key=f"rollback-{kind_name}", icon=":material/undo:",
                             disabled=not model_runs.can_roll_back(URL, project.id, kind_name),
                             help=f"Make the previously promoted {kind_name} active again"):
        act(model_runs.rollback, project.id, kind_name)

missing = model_runs.missing_model(project.id)
predict_key = f"models_predict_since_{project.id}"
if st.button("Predict project", key="models_predict", icon=":material/batch_prediction:", disabled=missing is not None,
             help="Queue a job that finds and classifies the cells of every image with the active models"):
    request = (project.id, active["detector"], active["classifier"])
    if researcher.repeated("predict", request):
        st.info("This prediction was queued a moment ago (a double click?), so it was not queued again.")
    else:
        # per project (the watch below belongs to this one); written before the job is queued and taken
        # back if it fails (researcher.act); the queue itself also takes this prediction once
        act(model_runs.predict, project.name, active["detector"], active["classifier"],
            remember={predict_key: datetime.now(timezone.utc), **researcher.done("predict", request)})
if missing:
    absent = [kind_name for kind_name in ("detector", "classifier") if not active[kind_name]] or ["model"]
    st.caption(f"Predict project needs an active detector and classifier; this project has no active "
               f"{' and no active '.join(absent)} yet. Train {'them' if len(absent) > 1 else 'one'} above: a "
               "finished run becomes active when its kind has none, and Promote makes another one active.")

since = st.session_state.get(predict_key)
if since is None:  # queued in another session (or before a reload) and running now
    running = [job for job in model_runs.busy_jobs(project.name) if job.task == "predict"]
    since = running[0].since if running else None


@st.fragment(run_every=REFRESH_S if since is not None else None)
def prediction_watch(queued: datetime) -> None:
    """While a queued prediction has not stored its cells: say so, and rerun the page when it has."""
    if model_runs.predicted_since(URL, project.id, queued):
        st.session_state.pop(predict_key, None)
        st.rerun()
    waited = (datetime.now(timezone.utc) - queued).total_seconds()
    working = any(job.task == "predict" for job in model_runs.busy_jobs(project.name))
    if working:  # a worker has it: no hint about a missing worker, however long a big project takes
        st.info(f"Predicting every image with the active models… ({charts.format_seconds(waited)})",
                icon=":material/hourglass_top:")
    elif waited > model_runs.PREDICT_WAIT_S:
        st.session_state.pop(predict_key, None)
        st.warning(f"No new predictions {charts.format_seconds(waited)} after Predict project: is `cellspot "
                   "worker` running (same CELLSPOT_HOME and database as this app)? Reload to check again.",
                   icon=":material/warning:")
    elif waited > model_runs.WORKER_WAIT_S:
        # the page cannot tell a busy worker from none: a project of many images takes minutes
        st.info(f"Still predicting after {charts.format_seconds(waited)}… If nothing happens, check that `cellspot "
                "worker` is running (same CELLSPOT_HOME and database as this app).", icon=":material/hourglass_top:")
    else:
        st.info(f"Predicting every image with the active models… ({charts.format_seconds(waited)})",
                icon=":material/hourglass_top:")


if since is not None:
    prediction_watch(since)

cells = model_runs.predictions(URL, project.id)
if cells.empty:
    st.info("No predictions yet: they show here when the prediction is done." if since is not None else
            "No predictions yet: press Predict project once a classifier and a detector are active.")
    st.stop()

pairs = cells[["detector_version", "classifier_version"]].drop_duplicates().apply(tuple, axis=1).tolist()
wanted = (active["detector"], active["classifier"])
# the choice follows the active pair whenever it or the stored pairs change (a promotion, a
# rollback, a new "Predict project"); a kept widget value would go on showing the old pair
listing = (wanted, tuple(pairs))
if st.session_state.get("models_pair_listing") != listing or st.session_state.get("models_pair") not in pairs:
    st.session_state["models_pair_listing"] = listing
    st.session_state["models_pair"] = wanted if wanted in pairs else pairs[-1]
pair = st.selectbox("Predictions of", pairs, format_func=lambda p: f"detector {p[0]} + classifier {p[1]}",
                    key="models_pair")
if None not in wanted and wanted not in pairs:  # a promotion since the last prediction
    st.info(f"The active models ({wanted[0]} + {wanted[1]}) have no predictions yet: press Predict project. "
            f"Shown: the predictions of detector {pair[0]} + classifier {pair[1]}.", icon=":material/info:")
cells = cells[(cells["detector_version"] == pair[0]) & (cells["classifier_version"] == pair[1])]
per_image = researcher.project_results(researcher.url(), project.id).per_image
names = dict(zip(per_image["image_id"].astype(int), per_image["image"].astype(str)))
summary = model_runs.summary(cells, list(names.values()))

left, right = st.columns([3, 2], gap="medium")
with right:
    totals = summary[["alive", "dead"]].sum()
    counted = int(totals.sum())
    st.markdown(f"**{counted}** cells on **{int((summary['n_cells'] > 0).sum())}** images · viability "
                + (f"**{100 * totals['alive'] / counted:.1f} %**" if counted else "-"))
    st.download_button("Download per-image counts (CSV)", summary.to_csv(index=False),
                       f"{project.name}-predicted-counts.csv", "text/csv")
    st.download_button("Download predicted cells (CSV)", cells.to_csv(index=False),
                       f"{project.name}-predicted-cells.csv", "text/csv")
with left:
    image_id = st.selectbox("Image", list(names), format_func=names.get, key="models_image")
    size = st.slider("Mark size (px)", 4, 60, int(DEFAULT_DIAMETER), key="models_mark_size")
    shown = cells[cells["image_id"] == image_id].assign(diameter=float(size))
    try:
        rgb = resources.display_rgb(model_runs.image_row(image_id))
    except ImageUnavailableError as exc:
        st.warning(f"{exc}. Its predicted cells are counted in the table.")
    else:
        st.image(draw_overlay(rgb, shown[shown["label"].isin(("alive", "dead"))]), width="stretch",
                 caption=f"{names[image_id]}: {len(shown)} predicted cells (○ alive, □ with X dead)")

# the per-image table below the image and its totals, at the page's width: beside the image,
# at 1024 px, "viability %" and "n_cells" were cut off
st.dataframe(summary, hide_index=True, width="stretch", key="models_summary", column_config={
    "viability_pct": st.column_config.NumberColumn("viability %", format="%.1f")})

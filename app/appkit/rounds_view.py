"""The Rounds page's reads (briefly cached), actions, thumbnails and learning-curve chart, over
:mod:`cellspot.workflows.rounds` and :mod:`cellspot.workflows.auto_rounds`.

Glue only: which images are queued, why, and when the automatic mode fires are decided by the
workflow. Reads are cached with ``st.cache_data`` for :data:`TTL_S` seconds and forgotten by
:func:`refresh` after a write; actions return a short message for the page and raise the
workflow's own errors (the page shows their text).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image as PILImage

from appkit import resources
from cellspot.active.rounds import DEFAULT_TARGET_RUNS, target_runs_for
from cellspot.active.scheduler import max_runs_of
from cellspot.active.strategies import list_strategies
from cellspot.imaging import ImageReadError
from cellspot.render import ImageUnavailableError, image_file, read_display_rgb
from cellspot.store.models import Image, Project
from cellspot.workflows import auto_rounds as auto_workflow
from cellspot.workflows import rounds as workflow

TTL_S = 2.0
THUMB_PX = 64  # longest side of a queue thumbnail
THUMB_ROWS = 60  # thumbnails for the best N queued images (the rest of the table has none)
TARGET_RUNS_MAX = 50  # the most runs per image the page offers (a larger project default raises it)
# the progress columns before the long reason, so they stay on screen at 1024 px
QUEUE_SHOWN = ["thumbnail", "rank", "image", "score", "status", "runs_round", "leased", "n_runs", "reason"]
HISTORY_SHOWN = ["round", "status", "strategy", "images", "top", "target_runs", "detector_version",
                 "classifier_version", "snapshot_id", "task_runs_at_open", "task_runs", "created_at", "closed_at"]
#: column headers of the history table on the page (its CSV keeps the machine names)
HISTORY_LABELS = {
    "round": "round", "status": "status", "strategy": "strategy", "images": "images queued", "top": "top N",
    "target_runs": "runs per image", "detector_version": "detector", "classifier_version": "classifier",
    "snapshot_id": "consensus snapshot", "task_runs_at_open": "task runs at open", "task_runs": "task runs in round",
    "created_at": "opened (UTC)", "closed_at": "closed (UTC)",
}
#: what an empty history cell means, by column
HISTORY_MISSING = {"top": "all", "detector_version": "none", "classifier_version": "none",
                   "snapshot_id": "none"}  # and closed_at: "still open"
#: learning-curve metrics left out of the chart: lower is better, unlike the others on its axis
#: (they stay in the CSV)
CURVE_LEFT_OUT = ("ece",)
#: short legend names of the learning-curve metrics (``classifier balanced_accuracy`` was cut off)
METRIC_LABELS = {"balanced_accuracy": "balanced acc.", "accuracy": "accuracy", "f1": "F1", "roc_auc": "ROC AUC",
                 "precision": "precision", "recall": "recall"}
#: what a run's metrics were measured on, by its ``split`` (test images when it had them)
SPLIT_WORDS = {"test": "its own test images", "val": "its validation images where it had no test images",
               "train": "its own training data where it had no held-out images"}


def url() -> str:
    return resources.settings().resolved_database_url


def _project(session, project_id: int) -> Project:  # noqa: ANN001 - a Session
    project = session.get(Project, project_id)
    if project is None:
        raise LookupError(f"no project with id {project_id}")
    return project


# --------------------------------------------------------------------------- reads


@st.cache_data(ttl=TTL_S, show_spinner=False)
def current(url: str, project_id: int) -> workflow.RoundInfo | None:
    """The open round (:func:`cellspot.workflows.rounds.current_round_info`)."""
    with resources.session() as session:
        return workflow.current_round_info(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def history(url: str, project_id: int) -> pd.DataFrame:
    """Every round, newest first (:func:`cellspot.workflows.rounds.history`)."""
    with resources.session() as session:
        return workflow.history(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def queue(url: str, project_id: int) -> pd.DataFrame:
    """The open round's queue, best first (:func:`cellspot.workflows.rounds.queue_table`)."""
    with resources.session() as session:
        return workflow.queue_table(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def curve(url: str, project_id: int) -> pd.DataFrame:
    """Task runs vs model metrics per round (:func:`cellspot.workflows.rounds.learning_curve`)."""
    with resources.session() as session:
        return workflow.learning_curve(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def sources(url: str, project_id: int) -> workflow.ScoringSources:
    """The active models and the predictions a new round would score."""
    with resources.session() as session:
        return workflow.scoring_sources(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def auto(url: str, project_id: int) -> auto_workflow.AutoStatus:
    """The automatic mode's settings and counter (:func:`cellspot.workflows.auto_rounds.auto_status`)."""
    with resources.session() as session:
        return auto_workflow.auto_status(session, _project(session, project_id))


@st.cache_data(show_spinner=False)
def strategies() -> pd.DataFrame:
    """``name, summary`` of every acquisition strategy a round can be opened with (not ``bald``,
    which needs MC-dropout samples that rounds do not compute)."""
    return list_strategies(from_signals_only=True)


def refresh() -> None:
    """Forget the cached reads (after a write)."""
    for cached in (current, history, queue, curve, sources, auto):
        cached.clear()


def queue_status(queue: pd.DataFrame, target_runs: int) -> tuple[str, str | None]:
    """A line on the open round's progress, and the message once the round has nothing left to
    serve (``None`` before): every queued image still active has its ``target_runs`` runs of
    the round, or every queued image retired (its consensus settled) before getting them."""
    active = queue[queue["status"] == "active"]
    done = int((active["runs_round"] >= target_runs).sum())
    leased = int(active["leased"].sum())
    at_max = int((queue["status"] == workflow.AT_MAX_RUNS).sum())
    retired = len(queue) - len(active) - at_max
    after = ("students now get the open images outside the queue, fewest runs first, then gold images. "
             "Retrain and open a new round to rank the images again.")
    if active.empty:
        line = (f"All {len(queue)} queued image(s) retired since the round opened (their consensus settled, or "
                "they reached the most runs an image gets): none needs more runs")
        return line, (f"The queued images retired before getting their {target_runs} run(s) of this round, so none "
                      f"is left to serve: {after}")
    line = (f"{done} of {len(active)} queued image(s) have their {target_runs} run(s) of this round · "
            f"{leased} being labelled now" + (f" · {retired} retired since the round opened" if retired else "")
            + (f" · {at_max} at the most runs an image gets (served no more; the next consensus retires them)"
               if at_max else ""))
    if done < len(active):
        return line, None
    has = "has its runs" + (" or retired" if retired or at_max else "")
    return line, f"Every queued image {has}: {after}"


def history_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """The history columns :data:`HISTORY_SHOWN` of ``rounds`` (:func:`history`) as the page
    shows them: ``rolled_back`` -> ``rolled back``, an empty cell says what it means
    (:data:`HISTORY_MISSING`: ``all``, ``none``); the column names stay (the page labels
    them with :data:`HISTORY_LABELS`; the CSV keeps them as they are)."""
    table = rounds[HISTORY_SHOWN].copy()
    table["status"] = table["status"].astype(str).str.replace("_", " ", regex=False)
    table["target_runs"] = pd.to_numeric(table["target_runs"], errors="coerce").astype("Int64")
    for column, missing in HISTORY_MISSING.items():
        table[column] = [missing if _missing(v) else str(int(v)) if isinstance(v, float) else str(v)
                         for v in table[column]]
    for column in ("created_at", "closed_at"):  # times as text: a missing one says why
        table[column] = ["still open" if _missing(v) else pd.Timestamp(v).strftime("%Y-%m-%d %H:%M")
                         for v in table[column]]
    return table


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value))


def auto_counter(status: auto_workflow.AutoStatus) -> str:
    """The automatic mode's counter as one line: the task runs counted, from what (the last
    training, the last automatic round, or, before either, every run so far), and when the
    next automatic round starts."""
    since = {"training": "since the last training", "automatic round": "since the last automatic round"}
    counted = status.counted_from
    if counted in since:
        text = f"{status.new_runs} new task runs {since[counted]}"
    else:
        text = f"{status.new_runs} task runs so far (no model trained yet)"
    if not status.settings.enabled:
        return text + "."
    if status.due:
        return text + ": the next automatic round is due and starts at the worker's next check (once a minute)."
    return text + f"; {status.runs_to_go} more start the next automatic round."


def default_target_runs(project: Project) -> int:
    """Runs per queued image a new round of ``project`` gets unless told otherwise
    (:func:`cellspot.active.rounds.target_runs_for`); :data:`DEFAULT_TARGET_RUNS` when the
    project's ``target_runs`` setting is not a whole number >= 1 (the page sends its own). At
    most the project's maximum of runs (:func:`max_runs`): a store saved before the Setup page
    refused it may hold a target above it, which no image would ever reach."""
    try:
        target = target_runs_for(project)
    except (TypeError, ValueError):
        target = DEFAULT_TARGET_RUNS
    cap = max_runs(project)
    return min(target, cap) if cap is not None else target


def max_runs(project: Project) -> int | None:
    """The most runs an image of ``project`` gets in all (the Setup page's "Retire after at most
    ... runs", setting ``retire_max_runs``); ``None`` for no maximum (0 or unset and switched
    off), or for retirement settings the policy refuses (the Setup page says why)."""
    try:
        cap = max_runs_of(project)
    except (TypeError, ValueError):
        return None
    return int(cap) if cap else None


def runs_over_max(target_runs: int | None, cap: int | None, round_number: int | None = None) -> str | None:
    """The warning when ``target_runs`` runs per image (of round ``round_number``, or chosen for
    a new round) exceed the project's maximum ``cap`` (:func:`max_runs`); ``None`` otherwise."""
    if target_runs is None or cap is None or int(target_runs) <= int(cap):
        return None
    what = (f"Round {round_number} asks for {target_runs} runs per image, more than" if round_number is not None
            else f"{target_runs} runs per image is more than")
    return (f"{what} the {cap} runs an image gets at most (Setup page: \"Retire after at most {cap} "
            f"runs\"): an image is served no more once it has {cap} runs in all, earlier rounds included, so no "
            f"queued image gets {target_runs} runs in this round. Choose {cap} or fewer, or raise the maximum "
            "on the Setup page.")


def score_warning(queue: pd.DataFrame, strategy: str) -> str | None:
    """The warning when the queue's scores do not rank it: no image got a ``strategy`` score, or
    every scored image got the same one (``conflict`` with no conflict anywhere, ``diversity``
    with every image labelled: 0.000), so the order is only the seeded tie-break; ``None``
    when the scores tell the images apart (or one image is queued)."""
    scored = pd.to_numeric(queue["score"], errors="coerce").dropna()
    if scored.empty:
        return (f"No image got a {strategy} score (it needs model predictions): every image ties and the queue "
                "is in a random (seeded) order. Before a model exists, open a combined, crowd or coverage round.")
    if len(scored) < 2 or scored.max() - scored.min() > 1e-9:
        return None
    every = ("Every queued image" if len(scored) == len(queue)
             else f"Every scored image ({len(scored)} of {len(queue)}; the others have no score and come last)")
    other = "" if strategy == "combined" else " A combined round blends several signals and may tell them apart."
    return (f"{every} has the same {strategy} score ({float(scored.iloc[0]):.3f}): the score does not tell them "
            f"apart, so their order is only a random (seeded) tie-break, not a ranking.{other}")


def rank_caption(queue: pd.DataFrame) -> str | None:
    """A note when a queued image has a higher score than the one ranked just above it (the
    batch-aware selection pushes near-duplicates down); ``None`` when rank follows score."""
    ordered = queue.sort_values("rank", kind="stable") if "rank" in queue.columns else queue
    scores = pd.to_numeric(ordered["score"], errors="coerce").dropna()
    if not (scores.diff() > 1e-9).any():
        return None
    return ("Rank is the order in which the images were selected, not the order of their scores: selection is "
            "batch-aware, so an image much like one ranked above it moves down, below images with lower scores.")


# --------------------------------------------------------------------------- actions


def open_round(project_id: int, strategy: str, top: int | None, target_runs: int | None = None,
               replacing: int | None | object = workflow.ANY_ROUND) -> str:
    """Open the next round with ``strategy`` (the best ``top`` images, or all), each queued
    image served to ``target_runs`` students (``None``: the project's default), unless another
    round than ``replacing`` (the one the page showed) is open by now; the message."""
    try:
        with resources.session() as session:
            info = workflow.open_new_round(session, _project(session, project_id), strategy=strategy,
                                           top=int(top) if top else None,
                                           target_runs=int(target_runs) if target_runs is not None else None,
                                           replacing=replacing)
    finally:
        refresh()  # also when refused: the page then shows the round that is open now
    if info.empty:
        return (f"Opened {info.describe()}: no open image was left to rank, so the queue is empty and students "
                "get gold images (and any open image outside the queue).")
    runs = f"{info.target_runs} run{'s' if info.target_runs != 1 else ''} per image"
    return f"Opened {info.describe()}: students get its images first, {runs}."


def close(project_id: int, number: int) -> str:
    """Close round ``number`` if it is still the open one, without opening another; the message."""
    try:
        with resources.session() as session:
            project = _project(session, project_id)
            closed = workflow.close_current(session, project, number=number)
            auto = auto_workflow.AutoSettings.from_project(project)
    finally:
        refresh()  # also when refused: the page then shows the round that is open now
    text = (f"Round {closed.number} closed; no round is open now: students get the images with the fewest runs "
            "until you open the next round.")
    if auto.enabled:
        text += (f" Automatic mode is on: it opens a new round after {auto.every_runs} new task runs (switch it "
                 "off below to stay without rounds).")
    return text


def rollback(project_id: int, number: int) -> str:
    """Roll back round ``number`` if it is still the open one; the message says which round is
    open now."""
    with resources.session() as session:
        undone, restored = workflow.rollback_current(session, _project(session, project_id), number=number)
    refresh()
    again = f"round {restored.number} is open again" if restored is not None else "no round is open now"
    return f"Round {undone.number} rolled back; {again}."


def save_auto(project_id: int, enabled: bool, every_runs: int, strategy: str, top: int | None) -> str:
    """Store the automatic-mode settings; the message."""
    with resources.session() as session:
        new = auto_workflow.set_auto_settings(session, _project(session, project_id), enabled=bool(enabled),
                                         every_runs=every_runs, strategy=strategy, top=int(top) if top else None)
    refresh()
    if not new.enabled:
        return "Automatic mode is off."
    return (f"Automatic mode is on: after every {new.every_runs} new task runs the worker retrains both models "
            f"and opens a new {new.strategy} round.")


def run_auto_now(project_id: int) -> str:
    """Queue an automatic round now (retrain, predict, open a round); the message."""
    with resources.session() as session:
        decision = auto_workflow.maybe_auto_retrain(session, resources.settings(), _project(session, project_id),
                                               force=True)
    refresh()
    if not decision.queued:
        raise workflow.RoundsWorkflowError(decision.reason[0].upper() + decision.reason[1:] + ".")
    return "Automatic round queued: the worker retrains both models, predicts and opens a new round."


def forget_auto(project_id: int) -> str:
    """Clear the pending mark of the automatic round; the message."""
    with resources.session() as session:
        since = auto_workflow.forget_pending(session, _project(session, project_id))
    refresh()
    return (f"The automatic round pending since {since:%H:%M} UTC is forgotten: a new one can start. If its job is "
            "still queued, it does nothing when a worker takes it; if a worker is already running it, it finishes.")


# --------------------------------------------------------------------------- thumbnails


def data_uri(rgb: np.ndarray, size: int = THUMB_PX) -> str:
    """``rgb`` ((H, W, 3) uint8) shrunk to at most ``size`` px a side, as a PNG data URI."""
    picture = PILImage.fromarray(np.asarray(rgb, dtype=np.uint8))
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@st.cache_data(show_spinner=False, max_entries=2048)
def _thumbnail(path: str, mtime: float, bit_depth: int, size: int) -> str:
    return data_uri(read_display_rgb(path, bit_depth), size)


def thumbnails(image_ids: list[int], size: int = THUMB_PX) -> dict[int, str | None]:
    """``image_id -> data URI`` (``None`` for an image without readable pixels)."""
    settings = resources.settings()
    with resources.session() as session:
        rows = [session.get(Image, int(i)) for i in image_ids]
        files = {}
        for image_id, image in zip(image_ids, rows):
            try:
                files[int(image_id)] = (str(image_file(settings, image)), int(image.bit_depth or 8))
            except (ImageUnavailableError, AttributeError):
                files[int(image_id)] = None
    out: dict[int, str | None] = {}
    for image_id, found in files.items():
        try:
            out[image_id] = (_thumbnail(found[0], Path(found[0]).stat().st_mtime, found[1], size)
                             if found else None)
        except (ImageReadError, OSError):
            out[image_id] = None
    return out


def queue_with_thumbnails(table: pd.DataFrame, rows: int = THUMB_ROWS) -> pd.DataFrame:
    """The queue table to show: :data:`QUEUE_SHOWN` then the score components, a ``thumbnail``
    data URI for the best ``rows`` images (``None`` below); statuses read as words (``at max runs``)."""
    components = [c for c in table.columns if c not in (*QUEUE_SHOWN, "image_id", "components")]
    ids = table["image_id"].astype(int).tolist()
    shown = thumbnails(ids[:rows])
    out = table.assign(thumbnail=[shown.get(i) for i in ids],
                       status=table["status"].astype(str).str.replace("_", " ", regex=False))
    return out[QUEUE_SHOWN + components]


# --------------------------------------------------------------------------- learning curve


def curve_chart(points: pd.DataFrame) -> alt.Chart:
    """Model metric (y) against task runs collected (x), one line per series, from
    :func:`cellspot.workflows.rounds.learning_curve`; the metrics of :data:`CURVE_LEFT_OUT`
    (lower is better) are left out, and each line is named in short (``classifier balanced acc.``,
    :data:`METRIC_LABELS`), the legend below the plot at full length."""
    shown = points[~points["metric"].isin(CURVE_LEFT_OUT)] if "metric" in points.columns else points
    shown = shown.assign(line=[curve_label(s) for s in shown["series"]])
    tooltip = ["round", "task_runs", alt.Tooltip("line:N", title="metric"), "version",
               *(["split"] if "split" in shown.columns else []), alt.Tooltip("value:Q", format=".3f")]
    return (alt.Chart(shown).mark_line(point=True)
            .encode(x=alt.X("task_runs:Q", title="task runs collected", axis=alt.Axis(format="d", tickMinStep=1)),
                    y=alt.Y("value:Q", title="model metric (higher is better)", scale=alt.Scale(zero=False)),
                    color=alt.Color("line:N", title=None,
                                    legend=alt.Legend(orient="bottom", columns=3, labelLimit=0)),
                    tooltip=tooltip)
            # fit-x: with the default autosize and a legend below, the plot was squeezed to a few pixels
            .properties(height=280, autosize=alt.AutoSizeParams(type="fit-x", contains="padding")))


def curve_label(series: str) -> str:
    """``"classifier balanced_accuracy"`` -> ``"classifier balanced acc."`` (:data:`METRIC_LABELS`)."""
    kind, _, metric = str(series).partition(" ")
    if (kind, metric) == ("classifier", "f1"):  # the dead class's F1, not the detector's F1 of found cells
        return "classifier dead-class F1"
    return f"{kind} {METRIC_LABELS.get(metric, metric.replace('_', ' '))}".strip()


def curve_caption(points: pd.DataFrame) -> str:
    """What the learning curve plots: the split each model was scored on (the ``split`` column
    of :func:`cellspot.workflows.rounds.learning_curve`) and the metrics left out of the chart."""
    splits = set(points["split"].dropna()) if "split" in points.columns else set()
    parts = [words for split, words in SPLIT_WORDS.items() if split in splits]
    measured = ("each model's metrics on " + ", or ".join(parts) if parts else "each model's stored metrics")
    if len(parts) > 1:
        measured += " (the CSV's split column says which)"
    left_out = [m for m in CURVE_LEFT_OUT if "metric" in points.columns and (points["metric"] == m).any()]
    text = (f"One point per round (rolled-back rounds left out): {measured}. Each model drew its own split, so "
            "read the trend rather than exact differences.")
    if left_out:
        text += f" Left out of the chart: {', '.join(m.upper() for m in left_out)} (calibration error, lower is "
        text += "better), in the CSV."
    return text


def models_caption(found: workflow.ScoringSources) -> str:
    """One line on what a round opened now scores."""
    if found.crowd_only:
        active = " (the active models have no predictions yet: predict the project on the Models page)" \
            if found.active_detector or found.active_classifier else ""
        return "No model predictions yet: the ranking uses crowd and coverage signals only" + active + "."
    text = f"Scores the predictions of {found.scored_detector} + {found.scored_classifier}"
    if found.stale:
        text += (f"; the active models ({found.active_detector} + {found.active_classifier}) have none yet: "
                 "predict the project on the Models page first")
    return text + "."

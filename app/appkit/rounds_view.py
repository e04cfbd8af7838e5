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
QUEUE_SHOWN = ["thumbnail", "rank", "image", "score", "reason", "status", "runs_round", "leased", "n_runs"]
HISTORY_SHOWN = ["round", "status", "strategy", "images", "top", "target_runs", "detector_version",
                 "classifier_version", "snapshot_id", "task_runs_at_open", "task_runs", "created_at", "closed_at"]


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


def queue_status(queue: pd.DataFrame, target_runs: int) -> tuple[str, bool]:
    """A line on the open round's progress, and whether it is complete (every queued image
    that is still active has its ``target_runs`` runs of the round)."""
    active = queue[queue["status"] == "active"]
    done = int((active["runs_round"] >= target_runs).sum())
    leased = int(active["leased"].sum())
    retired = len(queue) - len(active)
    line = (f"{done} of {len(active)} queued image(s) have their {target_runs} run(s) of this round · "
            f"{leased} being labelled now" + (f" · {retired} retired since the round opened" if retired else ""))
    return line, done == len(active)


def default_target_runs(project: Project) -> int:
    """Runs per queued image a new round of ``project`` gets unless told otherwise
    (:func:`cellspot.active.rounds.target_runs_for`); :data:`DEFAULT_TARGET_RUNS` when the
    project's ``target_runs`` setting is not a whole number >= 1 (the page sends its own)."""
    try:
        return target_runs_for(project)
    except (TypeError, ValueError):
        return DEFAULT_TARGET_RUNS


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
    runs = f"{info.target_runs} run{'s' if info.target_runs != 1 else ''} per image"
    return f"Opened {info.describe()}: students get its images first, {runs}."


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
    data URI for the best ``rows`` images (``None`` below)."""
    components = [c for c in table.columns if c not in (*QUEUE_SHOWN, "image_id", "components")]
    ids = table["image_id"].astype(int).tolist()
    shown = thumbnails(ids[:rows])
    out = table.assign(thumbnail=[shown.get(i) for i in ids])
    return out[QUEUE_SHOWN + components]


# --------------------------------------------------------------------------- learning curve


def curve_chart(points: pd.DataFrame) -> alt.Chart:
    """Model metric (y) against task runs collected (x), one line per ``series`` (e.g.
    ``classifier balanced_accuracy``), from :func:`cellspot.workflows.rounds.learning_curve`."""
    return (alt.Chart(points).mark_line(point=True)
            .encode(x=alt.X("task_runs:Q", title="task runs collected", axis=alt.Axis(format="d", tickMinStep=1)),
                    y=alt.Y("value:Q", title="model metric", scale=alt.Scale(zero=False)),
                    color=alt.Color("series:N", title=None),
                    tooltip=["round", "task_runs", "series", "version", alt.Tooltip("value:Q", format=".3f")])
            .properties(height=280))


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

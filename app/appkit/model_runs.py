"""The Models page's reads (briefly cached) and actions, over :mod:`cellspot.ml.registry`,
:mod:`cellspot.workflows.models`, :mod:`cellspot.jobs` and :mod:`cellspot.ml.predict`.

Glue only: every decision (versions, statuses, which run is active, what a job does) is made
by those modules. Reads are cached with ``st.cache_data`` for :data:`TTL_S` seconds (the live
view refreshes every 2 s); :func:`refresh` forgets them after a write. Actions return a short
message for the page and raise the workflow's own errors (the page shows their text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import streamlit as st

from appkit import resources
from cellspot.ml import registry
from cellspot.ml.predict import NoActiveModelError, summarize
from cellspot.ml.project_predictions import active_runs, predictions_frame
from cellspot.store.models import Image, Project
from cellspot.workflows import models as workflow

TTL_S = 1.5
LIVE_STATUSES = ("queued", "running")
#: a run still queued this long after it was created suggests that no worker is running
WORKER_WAIT_S = 20.0
#: a running run silent this long gets a warning (its worker may be gone)
SILENT_WARN_S = 120.0
#: the Models page stops waiting for a queued prediction after this long
PREDICT_WAIT_S = 600.0
#: the example in the empty "Config fields" box, per model kind: fields that kind's config has
#: (``polarity`` is a detector field only; a classifier refused the old shared example)
CONFIG_EXAMPLES = {"classifier": "tta=false patience=3", "detector": "polarity=auto tta=true"}


@dataclass(frozen=True)
class RunView:
    """What the page shows of one run (plain values, safe to cache)."""

    id: int
    version: str
    kind: str
    status: str
    preset: str
    is_active: bool
    progress: dict[str, Any]
    metrics: dict[str, Any]
    curves: pd.DataFrame
    error: str | None
    created_at: datetime | None
    config: dict[str, Any] = field(default_factory=dict)
    data_snapshot_id: str | None = None
    silent_s: float = 0.0  # a running run's seconds without progress (workflow.silent_seconds)
    resumable: bool = False

    def queued_for_s(self, now: datetime | None = None) -> float:
        """Seconds since the run was queued (created, or queued again by a resume: ``queued_at``
        in its progress) while it is still queued (0 otherwise)."""
        if self.status != "queued":
            return 0.0
        queued = self.created_at
        try:
            queued = datetime.fromisoformat(str(self.progress["queued_at"]))
        except (KeyError, TypeError, ValueError):
            pass
        if queued is None:
            return 0.0
        queued = queued if queued.tzinfo else queued.replace(tzinfo=timezone.utc)
        return max(0.0, ((now or datetime.now(timezone.utc)) - queued).total_seconds())


def url() -> str:
    return resources.settings().resolved_database_url


def _project(session: Any, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise LookupError(f"no project with id {project_id}")
    return project


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(url: str, project_id: int) -> pd.DataFrame:
    """:func:`cellspot.ml.registry.runs_frame` of the project, newest first."""
    with resources.session() as session:
        return registry.runs_frame(session, _project(session, project_id))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def running_elsewhere(url: str, project_id: int) -> list[str]:
    """Versions of the runs training now for other projects or on folders: the worker is busy
    with them (one at a time), so this project's queued runs wait behind them."""
    from sqlalchemy import or_, select

    from cellspot.store.models import ModelRun

    with resources.session() as session:
        stmt = (select(ModelRun.version).where(ModelRun.status == "running",
                                               or_(ModelRun.project_id.is_(None), ModelRun.project_id != project_id))
                .order_by(ModelRun.id))
        return list(session.scalars(stmt))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def run_view(url: str, version: str) -> RunView:
    """One run's status, progress, metrics and curves (:func:`registry.run_curves`)."""
    with resources.session() as session:
        run = registry.get_run(session, version)
        return RunView(run.id, run.version, run.kind, run.status, run.preset, bool(run.is_active),
                       dict(run.progress or {}), dict(run.metrics or {}), registry.run_curves(run), run.error,
                       run.created_at, dict(run.config or {}), run.data_snapshot_id,
                       workflow.silent_seconds(run), workflow.can_resume(resources.settings(), run))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def compare(url: str, a: str, b: str) -> pd.DataFrame:
    """:func:`cellspot.ml.registry.compare_runs` of versions ``a`` and ``b``, its rows named as the
    run captions name them (the classifier's ``f1`` is "dead F1", :func:`registry.metric_labels`)."""
    with resources.session() as session:
        frame = registry.compare_runs(session, a, b)
    labelled = frame.rename(index=registry.metric_labels(frame.attrs["kind"]))
    labelled.attrs = dict(frame.attrs)
    return labelled


@st.cache_data(ttl=TTL_S, show_spinner=False)
def active_versions(url: str, project_id: int) -> dict[str, str | None]:
    """``{"classifier": version | None, "detector": version | None}`` of the active models."""
    with resources.session() as session:
        project = _project(session, project_id)
        out: dict[str, str | None] = {}
        for kind in ("classifier", "detector"):
            run = registry.active_run(session, project, kind)
            out[kind] = run.version if run is not None else None
        return out


@st.cache_data(ttl=TTL_S, show_spinner=False)
def predictions(url: str, project_id: int) -> pd.DataFrame:
    """Every stored predicted cell of the project (:func:`cellspot.ml.project_predictions.predictions_frame`)."""
    with resources.session() as session:
        return predictions_frame(session, _project(session, project_id))


def summary(cells: pd.DataFrame, images: list[str]) -> pd.DataFrame:
    """Per image: alive, dead, viability %, cells (:func:`cellspot.ml.predict.summarize`)."""
    return summarize(cells, images)


def refresh() -> None:
    """Forget the cached reads (after a write)."""
    for cached in (runs, run_view, compare, active_versions, predictions, can_roll_back, running_elsewhere):
        cached.clear()


# --------------------------------------------------------------------------- actions


def train(project_name: str, kind: str, preset: str, epochs: int | None, source: str, fields: str = "") -> str:
    """Queue a training run (:func:`cellspot.workflows.models.queue_training`); its version.

    ``fields``: config overrides typed as ``FIELD=VALUE`` pairs separated by spaces.
    """
    from cellspot.ml.common import TrainingError, parse_overrides, split_overrides

    try:
        overrides = parse_overrides(split_overrides(fields))
    except TrainingError as exc:
        raise workflow.WorkflowError(f"config fields: {exc}") from None
    run = workflow.queue_training(resources.settings(), project_name, kind, preset=preset, epochs=epochs,
                                  source=source, overrides=overrides)
    refresh()
    return run.version


def cancel(version: str) -> str | tuple[str, str]:
    """Cancel a queued run at once or ask a running one to stop; the status message, or
    ``("warning", message)`` when the run turned out lost and was marked failed."""
    with resources.session() as session:
        run = workflow.cancel_run(session, version)
        message = (f"{run.version} cancelled." if run.status == "cancelled"
                   else ("warning", f"{run.version} was not running any more: its worker had stopped, so it is "
                                    "marked failed (the reason is under the run).") if run.status == "failed"
                   else f"{run.version} will stop at its next check (it saves a checkpoint to resume from).")
    refresh()
    return message


def resume(version: str) -> str:
    """Queue a cancelled or failed run again from its checkpoint (:func:`queue_resume`)."""
    run = workflow.queue_resume(resources.settings(), version)
    refresh()
    return f"{run.version} queued again: it goes on from its last checkpoint."


def promote(version: str) -> str:
    """Make ``version`` the active model of its kind."""
    with resources.session() as session:
        run = registry.promote(session, registry.get_run(session, version), resources.settings())
        message = f"{run.version} is now the active {run.kind}."
    refresh()
    return message


def rollback(project_id: int, kind: str) -> str:
    """Give the active ``kind`` back to the previously promoted run."""
    with resources.session() as session:
        run = registry.rollback(session, _project(session, project_id), kind)
        message = f"Rolled back: {run.version} is the active {kind} again."
    refresh()
    return message


def missing_model(project_id: int) -> str | None:
    """Why the project cannot be predicted with its active models, or ``None`` when it can."""
    with resources.session() as session:
        try:
            active_runs(session, _project(session, project_id))
        except NoActiveModelError as exc:
            return str(exc)
    return None


def predict(project_name: str, detector: str | None, classifier: str | None) -> str | tuple[str, str]:
    """Queue a prediction of every image of the project with ``detector`` and ``classifier`` (its
    active models; ``None``: whichever is active when the job runs); the message, or ``("info",
    message)`` when that prediction is already queued or running (:func:`cellspot.jobs.enqueue_prediction`
    queues it once)."""
    from cellspot.jobs import PredictionPendingError, enqueue_prediction

    try:
        enqueue_prediction(resources.settings(), project_name, detector=detector, classifier=classifier)
    except PredictionPendingError as exc:
        return ("info", f"A prediction with {detector} and {classifier} is already {exc.state}, so it was not "
                        "queued again; its cells show below when it is done.")
    return (f"Prediction queued with {detector} and {classifier}: the worker stores the cells of every "
            "image; they show below when it is done.")


def busy_jobs(project_name: str | None = None) -> list:
    """What the workers run now that has no model run to show it (predictions, automatic
    rounds), of ``project_name`` or all (:func:`cellspot.jobs.busy_jobs`)."""
    from cellspot.jobs import busy_jobs as jobs_now

    return jobs_now(resources.settings(), project_name)


def predicted_since(url: str, project_id: int, since: datetime) -> bool:
    """Whether the project has predicted cells stored at or after ``since`` (UTC; naive stored
    times are UTC)."""
    cells = predictions(url, project_id)
    if cells.empty or "created_at" not in cells.columns:
        return False
    stamps = pd.to_datetime(cells["created_at"], utc=True)
    since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    return bool((stamps >= pd.Timestamp(since)).any())


@st.cache_data(ttl=TTL_S, show_spinner=False)
def can_roll_back(url: str, project_id: int, kind: str) -> bool:
    """Whether ``kind`` has an active run and an earlier promoted one to give it back to."""
    with resources.session() as session:
        return registry.previous_active(session, _project(session, project_id), kind) is not None


def image_row(image_id: int) -> Image:
    """The store image ``image_id`` (for its pixels)."""
    with resources.session() as session:
        image = session.get(Image, image_id)
        if image is None:
            raise LookupError(f"no image with id {image_id}")
        return image


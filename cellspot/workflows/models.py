"""Training as a job: the one path from a model run in the store to a checkpoint folder.

:func:`run_training` is used by ``cellspot train`` (foreground), the worker (``cellspot
worker`` via :mod:`cellspot.jobs`), the dashboard (through the queue) and the tests. It
loads the run's training data (consensus snapshot, expert cells or an annotated folder),
calls the kind's ``fit`` function and keeps the run row up to date with its own short
sessions, so the dashboard sees progress while training runs:

* ``progress``: the latest :class:`~cellspot.ml.common.Progress` (at most about once per
  :data:`PROGRESS_INTERVAL_S`, always at the end of an epoch);
* ``curves``: one row per finished epoch;
* ``cancel_requested`` is read at most every :data:`CANCEL_POLL_S` seconds and stops the
  fit (which saves ``resume.pt`` first);
* ``status`` queued -> running -> done | failed | cancelled, with times, error, metrics.

The first ``done`` run of a kind in a project becomes active; later ones need
:func:`cellspot.ml.registry.promote`.

Starting a job is two steps in this order: :func:`start_training` adds the queued run
(caller commits), then :func:`enqueue` puts it on the queue; :func:`queue_training` does
both with its own session. Runs on a plain folder (``cellspot train --images ...``) are
stored the same way with ``project_id`` NULL, so there is one training path.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cellspot.ml import registry
from cellspot.ml.files import RUN_FILE
from cellspot.store.models import ModelRun, Project, parse_utc, utcnow

if TYPE_CHECKING:
    from cellspot.ml.common import FitResult, Progress, ProgressFn
    from cellspot.ml.data import TrainingData
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 1.0
CANCEL_POLL_S = 1.0
#: a running run that has not written its progress for this long has lost its worker
LOST_AFTER_S = 600.0
#: a database that has not answered a training's progress writes and cancel polls for this long
#: stops it (it saves ``resume.pt`` and ends failed, resumable); shorter outages are waited out
DB_OUTAGE_S = 60.0
#: waits (seconds) between the tries of a run's final status write when the database does not
#: answer: doubling to 15 s, for as long as :data:`LOST_AFTER_S` (after that the run would be
#: taken for lost anyway: Cancel, Resume or a starting worker then mark it failed, resumable)
FINISH_RETRY_S: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, *[15.0] * 39)
STORE_SOURCES = ("consensus", "expert")


class WorkflowError(ValueError):
    """A training job cannot be started, cancelled or resumed as asked."""


@dataclass(frozen=True)
class Trainer:
    """How one model kind trains: ``config_for(preset, **overrides)`` -> typed config and
    ``fit(data, config, out_dir, *, progress, should_stop, resume, device)`` -> FitResult."""

    config_for: Callable[..., Any]
    fit: Callable[..., FitResult]


def _classifier_config(preset: str, **overrides: Any) -> Any:
    from cellspot.ml import classifier

    return classifier.config_for(preset, **overrides)


def _classifier_fit(*args: Any, **kwargs: Any) -> FitResult:
    from cellspot.ml import classifier

    return classifier.fit_classifier(*args, **kwargs)


def _detector_config(preset: str, **overrides: Any) -> Any:
    from cellspot.ml import detector

    return detector.config_for(preset, **overrides)


def _detector_fit(*args: Any, **kwargs: Any) -> FitResult:
    from cellspot.ml import detector

    return detector.fit_detector(*args, **kwargs)


#: model kind -> trainer (the real ones import torch lazily; tests swap in a fake one)
TRAINERS: dict[str, Trainer] = {
    "classifier": Trainer(_classifier_config, _classifier_fit),
    "detector": Trainer(_detector_config, _detector_fit),
}


def get_trainer(kind: str) -> Trainer:
    """The trainer of ``kind``; :class:`WorkflowError` lists the known kinds."""
    try:
        return TRAINERS[kind]
    except KeyError:
        raise WorkflowError(f"no trainer for model kind {kind!r}; known: {', '.join(TRAINERS)}") from None


# ---------------------------------------------------------------------------------------------
# training data
# ---------------------------------------------------------------------------------------------

def _load_store_source(session: Session, settings: Settings, run: ModelRun) -> TrainingData:
    from cellspot.ml.data import load_store

    source = run.data_source
    project = session.get(Project, run.project_id) if run.project_id is not None else None
    if project is None:
        raise WorkflowError(f"run {run.version} trains on {source.get('kind')!r} data but has no project")
    return load_store(session, settings, project, source=source["kind"], snapshot=source.get("snapshot_id"))


def _load_folder_source(session: Session, settings: Settings, run: ModelRun) -> TrainingData:
    from cellspot.ml.data import load_folder

    source = run.data_source
    masks = source.get("masks")
    return load_folder(Path(source["images"]), Path(source["annotations"]), Path(masks) if masks else None)


#: ``data_source["kind"]`` -> loader(session, settings, run) -> TrainingData
DATA_SOURCES: dict[str, Callable[[Session, Settings, ModelRun], TrainingData]] = {
    "consensus": _load_store_source,
    "expert": _load_store_source,
    "folder": _load_folder_source,
}


def load_training_data(session: Session, settings: Settings, run: ModelRun) -> TrainingData:
    """The training data named by ``run.data_source``."""
    kind = (run.data_source or {}).get("kind")
    loader = DATA_SOURCES.get(kind)  # type: ignore[arg-type]
    if loader is None:
        raise WorkflowError(f"run {run.version} has data source {kind!r}; known: {', '.join(DATA_SOURCES)}")
    return loader(session, settings, run)


# ---------------------------------------------------------------------------------------------
# creating, queueing, cancelling and resuming runs
# ---------------------------------------------------------------------------------------------

def _overrides(epochs: int | None, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(overrides or {})
    if epochs is not None:
        if epochs < 1:
            raise WorkflowError(f"epochs must be >= 1, got {epochs}")
        out["epochs"] = int(epochs)
    return out


def check_config(kind: str, preset: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` as a dict once ``kind``'s ``config_for(preset, **overrides)`` accepts them;
    else :class:`WorkflowError` saying which field is wrong (checked before a run is queued,
    so a typo does not wait in the queue to fail)."""
    trainer = get_trainer(kind)
    if "preset" in overrides:
        raise WorkflowError(f"bad {kind} config: the preset is not a field; choose it with --preset (or the "
                            "Preset box)")
    wrong = _wrong_type(trainer, preset, overrides) or _wrong_value(overrides)
    if wrong is not None:
        raise WorkflowError(f"bad {kind} config: {wrong}")
    try:
        _resolve_config(trainer, preset, overrides)
    except WorkflowError:
        raise
    except (ValueError, TypeError) as exc:
        text, prefix = str(exc), f"bad {kind} config: "  # the detector's own checks say it already
        raise WorkflowError(text if text.startswith(prefix) else prefix + text) from None
    return dict(overrides)


def _wrong_value(overrides: Mapping[str, Any]) -> str | None:
    """Checks of fields whose preset value is None, made before the run is queued (not in the
    config class, which also loads saved checkpoints on machines without the weights file)."""
    threads, weights = overrides.get("threads"), overrides.get("weights_path")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, float)) or threads < 1):
        return f"threads must be a whole number >= 1 (or left out: every CPU), got {threads!r}"
    if weights is not None and not Path(str(weights)).expanduser().is_file():
        return f"weights_path {weights!r} is not a file (pretrained encoder weights, a state_dict .pt/.pth)"
    return None


def _int_field(config_type: type, name: str) -> bool:
    """True when field ``name`` of the dataclass ``config_type`` takes whole numbers only."""
    try:
        hint = typing.get_type_hints(config_type).get(name)
    except (NameError, TypeError):
        return False
    allowed = set(typing.get_args(hint)) or {hint}
    return int in allowed and float not in allowed


def _wrong_type(trainer: Trainer, preset: str, overrides: Mapping[str, Any]) -> str | None:
    """Which override has a value of the wrong type for its field (e.g. ``lr=abc``, ``seed=1.5``),
    or None."""
    try:
        default = trainer.config_for(preset)
    except (ValueError, TypeError):
        return None
    for name, value in overrides.items():
        if not hasattr(default, name) or value is None:
            continue
        if (dataclasses.is_dataclass(default) and isinstance(value, float) and not value.is_integer()
                and _int_field(type(default), name)):
            return f"{name} must be a whole number, got {value!r}"
        current = getattr(default, name)
        if isinstance(current, bool) and not isinstance(value, bool):
            return f"{name} must be true or false, got {value!r}"
        if isinstance(current, (int, float)) and not isinstance(current, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{name} must be a number (the preset has {current!r}), got {value!r}"
        if isinstance(current, str) and not isinstance(value, str):
            return f"{name} must be text (the preset has {current!r}), got {value!r}"
    return None


def check_new_out_dir(out_dir: Path) -> None:
    """A checkpoint folder given by hand must be new or empty: a run writes ``weights``,
    ``config.json`` and ``metrics.json`` there, and would silently replace another run's model
    (its registry entry would then describe weights it no longer has). :class:`WorkflowError`."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise WorkflowError(f"--out {path} is a file; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        what = "another run's model" if (path / "config.json").is_file() else "files"
        raise WorkflowError(f"--out {path} already holds {what}; give a new or empty folder (to go on from a "
                            "cancelled run there, add --resume)")
    try:  # made now, empty: a folder that cannot be made is refused before a run is stored
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkflowError(f"--out {path}: the folder cannot be created ({exc.strerror or exc})") from None


def start_training(
    session: Session,
    settings: Settings,
    project: Project,
    kind: str,
    *,
    preset: str = registry.DEFAULT_PRESET,
    epochs: int | None = None,
    source: str = "consensus",
    overrides: Mapping[str, Any] | None = None,
    out_dir: Path | None = None,
) -> ModelRun:
    """Add a queued run of ``kind`` trained on ``project``'s ``source`` data; flush, no commit.

    ``source``: "consensus" (pinned to the project's latest snapshot now) or "expert".
    Then commit and call :func:`enqueue` (or :func:`run_training` in the foreground).
    """
    from cellspot.store.queries import latest_snapshot

    get_trainer(kind)
    if source not in STORE_SOURCES:
        raise WorkflowError(f"unknown data source {source!r}; use one of: {', '.join(STORE_SOURCES)}")
    data_source: dict[str, Any] = {"kind": source, "project": project.name}
    snapshot_id = None
    if source == "consensus":
        snapshot = latest_snapshot(session, project)
        if snapshot is None:
            raise WorkflowError(
                f"project {project.name!r} has no consensus snapshot yet; run `cellspot aggregate` (or press "
                "\"Recompute consensus\" in the dashboard) first")
        snapshot_id = data_source["snapshot_id"] = snapshot.id
    elif not _has_expert_cells(session, project):
        raise WorkflowError(
            f"project {project.name!r} has no expert cells on images with pixels; import them (`cellspot import "
            "gold`, or the Setup page), accept cells on the Review page, or train on the consensus")
    if kind == "classifier":
        _check_both_labels(session, project, source, snapshot_id)
    return registry.create_run(
        session, kind, project=project, preset=preset,
        config=check_config(kind, preset, _overrides(epochs, overrides)),
        data_source=data_source, snapshot_id=snapshot_id,
        path=registry.relative_path(settings, out_dir) if out_dir is not None else None,
        models_dir=settings.models_dir,
    )


def _check_both_labels(session: Session, project: Project, source: str, snapshot_id: int | None) -> None:
    """:class:`WorkflowError` when the cells a classifier would train on (those the trainer's own
    :func:`cellspot.ml.data.load_store` keeps: its source's cells at its default confidence, on
    images with pixels) are all alive or all dead: the run would only fail in the worker
    ("training needs alive and dead cells in the train split"). The whole set is checked, not
    the train split, which needs the images' pixels read."""
    from sqlalchemy import select

    from cellspot.ml.data import _store_cells, load_store
    from cellspot.store.models import Image

    min_confidence = float(load_store.__kwdefaults__["min_confidence"])
    cells, _ = _store_cells(session, project, source, snapshot_id, min_confidence)
    with_pixels = select(Image.id).where(Image.project_id == project.id, Image.has_pixels.is_(True),
                                         Image.path.is_not(None))
    kept = cells[(cells["confidence"] >= min_confidence) & cells["image_id"].isin(list(session.scalars(with_pixels)))]
    alive, dead = int((kept["label"] == "alive").sum()), int((kept["label"] == "dead").sum())
    if (alive > 0) == (dead > 0):  # both; or no cell at all, which the data loader reports in its own words
        return
    what = f"consensus snapshot {snapshot_id}" if source == "consensus" else "expert cells"
    raise WorkflowError(
        f"training needs alive and dead cells in the train split; got {alive} alive, {dead} dead in all the "
        f"{what} of project {project.name!r} (cells at confidence >= {min_confidence:g} on images with pixels). "
        f"Label some {'dead' if alive else 'alive'} cells first (expert cells, or more runs and a new consensus)")


def _has_expert_cells(session: Session, project: Project) -> bool:
    """Whether ``project`` has an expert (gold) cell on an image with pixels."""
    from sqlalchemy import select

    from cellspot.store.models import GoldCell, Image

    stmt = (select(GoldCell.id).join(Image, GoldCell.image_id == Image.id)
            .where(Image.project_id == project.id, Image.has_pixels.is_(True)).limit(1))
    return session.scalar(stmt) is not None


def start_folder_training(
    session: Session,
    settings: Settings,
    kind: str,
    images: Path,
    annotations: Path,
    masks: Path | None = None,
    *,
    preset: str = registry.DEFAULT_PRESET,
    epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    out_dir: Path | None = None,
) -> ModelRun:
    """Add a queued run (no project) trained on an annotated folder; flush, no commit.

    The folder is checked first (:func:`cellspot.ml.data.check_folder`: folders, CSV, image
    files), so a bad one raises :class:`cellspot.ml.data.DataError` and adds no run."""
    from cellspot.ml.data import check_folder

    get_trainer(kind)
    check_folder(images, annotations, masks)
    data_source = {
        "kind": "folder",
        "images": str(Path(images).resolve()),
        "annotations": str(Path(annotations).resolve()),
        "masks": str(Path(masks).resolve()) if masks is not None else None,
    }
    return registry.create_run(
        session, kind, project=None, preset=preset,
        config=check_config(kind, preset, _overrides(epochs, overrides)),
        data_source=data_source,
        path=registry.relative_path(settings, out_dir) if out_dir is not None else None,
        models_dir=settings.models_dir,
    )


def enqueue(settings: Settings, run_id: int, *, resume: bool | None = None, device: str | None = None) -> None:
    """Put the committed run ``run_id`` on the job queue (see :mod:`cellspot.jobs`).

    When the queue cannot take it (:class:`cellspot.jobs.JobQueueError`), the run is marked
    failed with the reason, so no "queued" run waits for a job that does not exist, and the
    error is raised again.
    """
    from cellspot.jobs import JobQueueError, enqueue_training

    try:
        enqueue_training(settings, run_id, resume=resume, device=device)
    except JobQueueError as exc:
        def fail(session: Session) -> ModelRun:
            run = session.get(ModelRun, run_id)
            run.status, run.finished_at, run.error = "failed", utcnow(), f"could not be queued: {exc}"
            return run

        _own_session(settings, fail)
        log.error("run %d could not be queued: %s", run_id, exc)
        raise


def _own_session(settings: Settings, work: Callable[[Session], ModelRun]) -> ModelRun:
    from cellspot.store.db import make_engine, transaction

    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            return work(session)
    finally:
        engine.dispose()


def queue_training(
    settings: Settings, project_name: str, kind: str, *, preset: str = registry.DEFAULT_PRESET,
    epochs: int | None = None, source: str = "consensus", device: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ModelRun:
    """Create the run in its own committed transaction, then enqueue it (dashboard button);
    ``overrides``: config fields over the preset (:func:`check_config`)."""
    from cellspot.store.queries import get_project

    def work(session: Session) -> ModelRun:
        project = get_project(session, project_name)
        return start_training(session, settings, project, kind, preset=preset, epochs=epochs, source=source,
                              overrides=overrides)

    run = _own_session(settings, work)
    enqueue(settings, run.id, device=device)
    return run


def silent_seconds(run: ModelRun, now: datetime | None = None) -> float:
    """Seconds since a running ``run`` last wrote its progress (``reported_at``; else since it
    started); 0 for a run that is not running."""
    if run.status != "running":
        return 0.0
    last = parse_utc((run.progress or {}).get("reported_at")) or parse_utc(run.started_at)
    if last is None:
        return 0.0
    return max(0.0, ((now or utcnow()) - last).total_seconds())


def is_lost(run: ModelRun, now: datetime | None = None) -> bool:
    """True for a running run that has not reported for :data:`LOST_AFTER_S`: its worker was
    stopped or crashed (a live training writes its progress every few seconds); False for a run
    in any other status."""
    return silent_seconds(run, now) > LOST_AFTER_S


def _mark_lost(run: ModelRun, now: datetime | None = None) -> None:
    """Mark a lost ``run`` failed; it ended when it last reported (its time does not count the
    minutes its dead worker kept it "running")."""
    minutes = silent_seconds(run, now) / 60
    last = parse_utc((run.progress or {}).get("reported_at")) or parse_utc(run.started_at)
    run.status, run.finished_at, run.cancel_requested = "failed", last or now or utcnow(), False
    run.error = (f"its worker stopped reporting {minutes:.0f} min ago (stopped or crashed); marked failed. "
                 "Resume goes on from the last resume.pt if one was saved, else start a new run")
    log.warning("run %s: %s", run.version, run.error)


def reap_lost_runs(session: Session, now: datetime | None = None) -> list[str]:
    """Mark every running run whose worker is gone (:func:`is_lost`) failed; their versions.
    Called when a worker starts, and by :func:`cancel_run` / :func:`resume_run` on such a run.
    Flush, no commit."""
    lost = [r for r in session.scalars(select(ModelRun).where(ModelRun.status == "running")) if is_lost(r, now)]
    for run in lost:
        _mark_lost(run, now)
    session.flush()
    return [r.version for r in lost]


def reap_lost_runs_in_store(settings: Settings) -> list[str]:
    """:func:`reap_lost_runs` in its own committed transaction (``cellspot worker`` at start)."""
    return _own_session(settings, reap_lost_runs)


def cancel_run(session: Session, run: ModelRun | int | str) -> ModelRun:
    """Ask ``run`` to stop: a queued run is cancelled at once, a running one at its next
    check (it saves ``resume.pt`` first); a running run whose worker is gone (:func:`is_lost`)
    is marked failed at once. Flush, no commit."""
    run = registry.get_run(session, run)
    if is_lost(run):
        _mark_lost(run)
    elif run.status == "queued":
        run.status = "cancelled"
        run.finished_at = utcnow()
        run.error = "cancelled before it started"
    elif run.status == "running":
        run.cancel_requested = True
    else:
        raise WorkflowError(f"run {run.version} is already {run.status}; only queued or running runs can be cancelled")
    session.flush()
    log.info("cancel of run %s requested (status now %s)", run.version, run.status)
    return run


def resume_run(session: Session, settings: Settings, run: ModelRun | int | str) -> ModelRun:
    """Queue a cancelled or failed run again, to go on from its ``resume.pt``; flush, no commit.

    Then commit and call ``enqueue(settings, run.id, resume=True)`` (:func:`queue_resume`
    does both).
    """
    from cellspot.ml.files import RESUME_FILE  # noqa: PLC0415 - no torch import for the dashboard

    run = registry.get_run(session, run)
    if is_lost(run):
        _mark_lost(run)
    if run.status not in ("cancelled", "failed"):
        raise WorkflowError(f"run {run.version} is {run.status}; only cancelled or failed runs can be resumed")
    checkpoint = registry.model_dir(settings, run) / RESUME_FILE
    if not checkpoint.is_file():
        raise WorkflowError(f"run {run.version} has no {checkpoint} to resume from; start a new run instead")
    foreign = checkpoint_owner(checkpoint.parent, run)
    if foreign is not None:
        raise WorkflowError(f"run {run.version} cannot resume from {checkpoint}: {foreign}; start a new run instead")
    run.status = "queued"
    run.cancel_requested = False
    run.error = None
    run.finished_at = None
    # when it was queued again (the dashboard's "no worker?" hint counts from here, not from created_at)
    run.progress = {**(run.progress or {}), "queued_at": utcnow().isoformat()}
    session.flush()
    return run


def _mark_if_lost(session: Session, ref: int | str) -> ModelRun:
    run = registry.get_run(session, ref)
    if is_lost(run):
        _mark_lost(run)
        session.flush()
    return run


def can_resume(settings: Settings, run: ModelRun) -> bool:
    """True when :func:`resume_run` would queue ``run``: cancelled or failed (or lost, see
    :func:`is_lost`) with a ``resume.pt`` in its folder."""
    from cellspot.ml.files import RESUME_FILE  # noqa: PLC0415 - no torch import for the dashboard

    if run.status not in ("cancelled", "failed") and not is_lost(run):
        return False
    folder = registry.model_dir(settings, run)
    return (folder / RESUME_FILE).is_file() and checkpoint_owner(folder, run) is None


def queue_resume(settings: Settings, ref: int | str, *, device: str | None = None) -> ModelRun:
    """:func:`resume_run` in its own committed transaction, then enqueue with ``resume=True``.

    A lost run (:func:`is_lost`) is marked failed in a transaction of its own first, so the mark
    stays when the resume itself is refused (no ``resume.pt``)."""
    _own_session(settings, lambda session: _mark_if_lost(session, ref))
    run = _own_session(settings, lambda session: resume_run(session, settings, ref))
    enqueue(settings, run.id, resume=True, device=device)
    return run


# ---------------------------------------------------------------------------------------------
# running a training job
# ---------------------------------------------------------------------------------------------

class RunTakenOver(Exception):  # noqa: N818 - a state, not an error of this code
    """The run no longer belongs to this training (marked failed as lost and resumed elsewhere,
    claimed by another worker, deleted): it stops at once, writes nothing more to the store and
    saves no ``resume.pt`` (the folder may be another training's now)."""


def _transient(exc: DBAPIError) -> bool:
    """Whether ``exc`` is the database or its connection failing (worth another try), not a bad
    statement."""
    return isinstance(exc, (OperationalError, InterfaceError)) or bool(exc.connection_invalidated)


@dataclass
class _Attempt:
    """One claim of run ``run_id`` by a training: ``token`` (stored as ``progress["attempt"]``
    when claimed) says which training owns the run; every later write is conditional on it.
    ``before_s``: the run's training time in its earlier attempts (a resumed run)."""

    run_id: int
    token: str
    before_s: float = 0.0
    outage_since: float | None = None  # monotonic time of the first failed call of an outage

    def owns(self) -> tuple[Any, ...]:
        """WHERE clauses: the run is still running under this attempt."""
        return (ModelRun.id == self.run_id, ModelRun.status == "running",
                ModelRun.progress["attempt"].as_string() == self.token)

    def owned_by_me(self, status: str | None, progress: Mapping[str, Any] | None) -> bool:
        return status == "running" and (progress or {}).get("attempt") == self.token

    def stamp(self, progress: Mapping[str, Any]) -> dict[str, Any]:
        """``progress`` with this attempt's token and the earlier attempts' training time."""
        return {**progress, "attempt": self.token, "trained_before_s": self.before_s}

    def taken_over(self, now: str) -> typing.NoReturn:
        message = (f"run {self.run_id} is no longer this training's (now {now}; another worker or a lost-run "
                   "check took it): stopping without writing to it")
        log.warning(message)
        raise RunTakenOver(message)

    def db_failed(self, what: str, exc: Exception) -> bool:
        """Note a failed database call; True once the outage has lasted :data:`DB_OUTAGE_S`."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        down = now - self.outage_since
        log.warning("run %d: %s skipped, the database did not answer for %.0f s (%s); trying again later",
                    self.run_id, what, down, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return down >= DB_OUTAGE_S

    def db_ok(self) -> None:
        self.outage_since = None


class _StoreReporter:
    """Progress callback: forwards every event, writes ``progress``/``curves`` to the store while
    ``attempt`` owns the run. A write the database does not take (a short outage) is skipped
    with a warning and made with a later event; a write that finds the run no longer this
    attempt's raises :class:`RunTakenOver`."""

    def __init__(self, factory: sessionmaker[Session], attempt: _Attempt, curves: list[dict[str, Any]],
                 forward: ProgressFn | None) -> None:
        self.factory, self.attempt, self.forward = factory, attempt, forward
        self.run_id = attempt.run_id
        self.curves = curves
        self.last_write = float("-inf")
        self.latest: dict[str, Any] = {}

    def __call__(self, event: Progress) -> None:
        if self.forward is not None:
            self.forward(event)
        self.latest = registry.jsonable(event.to_dict())
        now = time.monotonic()
        if event.phase == "epoch_end":
            row = {"epoch": event.epoch, "train_loss": event.train_loss, "val_loss": event.val_loss,
                   **dict(event.metrics), "elapsed_s": event.elapsed_s}
            self.curves = [r for r in self.curves if r.get("epoch", 0) < event.epoch] + [registry.jsonable(row)]
        elif now - self.last_write < PROGRESS_INTERVAL_S:
            return
        self.flush(now)

    def flush(self, now: float | None = None) -> None:
        values: dict[str, Any] = {"curves": self.curves}
        if self.latest:  # reported_at: the sign of life that tells a lost run (is_lost)
            values["progress"] = self.attempt.stamp({**self.latest, "reported_at": utcnow().isoformat()})
        self.last_write = time.monotonic() if now is None else now
        try:
            with self.factory() as session, session.begin():
                result = session.execute(update(ModelRun).where(*self.attempt.owns()).values(**values)
                                         .execution_options(synchronize_session=False))
        except DBAPIError as exc:
            if not _transient(exc):
                raise
            self.attempt.db_failed("progress write", exc)  # the cancel poll stops a long outage
            return
        self.attempt.db_ok()
        if result.rowcount != 1:
            self.attempt.taken_over(self._now())

    def _now(self) -> str:
        with self.factory() as session:
            status = session.scalar(select(ModelRun.status).where(ModelRun.id == self.run_id))
        return status or "deleted"


class _CancelPoll:
    """``should_stop``: at most every :data:`CANCEL_POLL_S` seconds reads the run's
    ``cancel_requested``, status and owner. True on a cancel request, when this process's worker
    stops, or once the database has not answered for :data:`DB_OUTAGE_S` (``db_down``; shorter
    outages are waited out); the fit then saves ``resume.pt``. Raises :class:`RunTakenOver` when
    the run is no longer ``attempt``'s (no checkpoint: another training may own the folder)."""

    def __init__(self, factory: sessionmaker[Session], attempt: _Attempt) -> None:
        self.factory, self.attempt, self.run_id = factory, attempt, attempt.run_id
        from cellspot.jobs import STOPPING  # noqa: PLC0415 - jobs imports huey

        self.last_poll = float("-inf")
        self.stop = False
        self.worker_stopping = False
        self.db_down = False
        self.stopping = STOPPING

    def __call__(self) -> bool:
        if self.stopping.is_set():  # the worker of this process is stopping (SIGTERM / SIGINT)
            self.worker_stopping = self.stop = True
        now = time.monotonic()
        if self.stop or now - self.last_poll < CANCEL_POLL_S:
            return self.stop
        self.last_poll = now
        try:
            with self.factory() as session:
                row = session.execute(select(ModelRun.cancel_requested, ModelRun.status, ModelRun.progress)
                                      .where(ModelRun.id == self.run_id)).one_or_none()
        except DBAPIError as exc:
            if not _transient(exc):
                raise
            if self.attempt.db_failed("cancel check", exc):
                log.error("run %d: the database has not answered for %.0f s; stopping (saving resume.pt)",
                          self.run_id, DB_OUTAGE_S)
                self.db_down = self.stop = True
            return self.stop
        self.attempt.db_ok()
        if row is None or not self.attempt.owned_by_me(row.status, row.progress):
            self.attempt.taken_over("deleted" if row is None else row.status)
        self.stop = bool(row.cancel_requested)
        return self.stop


class _GentleInterrupt:
    """In the main thread (a foreground ``cellspot train``), the first Ctrl-C asks the training
    to stop at its next check, which saves ``resume.pt`` as a cancel does; a second Ctrl-C
    stops at once (``KeyboardInterrupt``). Elsewhere (worker threads) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def __enter__(self) -> _GentleInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping at the next step and saving resume.pt (Ctrl-C again stops at once, "
                    "without it)")


def _claim(factory: sessionmaker[Session], run_id: int) -> _Attempt | None:
    """Atomically move run ``run_id`` from queued to running under a new attempt token (stored
    as ``progress["attempt"]``); None when the run is not queued."""
    attempt = _Attempt(run_id, uuid.uuid4().hex)
    with factory() as session, session.begin():
        before = session.execute(select(ModelRun.progress, ModelRun.started_at)
                                 .where(ModelRun.id == run_id)).one_or_none()
        if before is not None:
            attempt.before_s = _trained_s(before.progress, before.started_at)
        result = session.execute(
            update(ModelRun)
            .where(ModelRun.id == run_id, ModelRun.status == "queued")
            .values(status="running", started_at=utcnow(), finished_at=None, cancel_requested=False, error=None,
                    progress=attempt.stamp({}))
        )
        return attempt if result.rowcount == 1 else None


def _trained_s(progress: Mapping[str, Any] | None, started_at: datetime | None) -> float:
    """The training seconds of a run's attempts so far: what :func:`_finish` recorded
    (``trained_s``), else (a run marked lost) up to its last report."""
    progress = progress or {}
    before = float(progress.get("trained_before_s") or 0.0)
    if progress.get("trained_s") is not None:
        return float(progress["trained_s"])
    start, last = parse_utc(started_at), parse_utc(progress.get("reported_at"))
    return before + max(0.0, (last - start).total_seconds()) if start and last else before


def _resolve_config(trainer: Trainer, preset: str, stored: Mapping[str, Any]) -> Any:
    """The typed config from ``preset`` and the stored overrides (unknown stored keys dropped
    when the config is a dataclass, so a stored full config resolves to itself)."""
    overrides = {k: v for k, v in stored.items() if k != "preset"}
    default = trainer.config_for(preset)
    if dataclasses.is_dataclass(default):
        fields = dataclasses.fields(default)
        unknown = sorted(set(overrides) - {f.name for f in fields})
        if unknown:
            allowed = ", ".join(sorted(f.name for f in fields if f.init and f.name != "preset"))
            raise WorkflowError(f"unknown config fields {unknown}; allowed: {allowed}")
        derived = {f.name for f in fields if not f.init}
        overrides = {k: v for k, v in overrides.items() if k not in derived}
    return trainer.config_for(preset, **overrides)


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return registry.jsonable(dataclasses.asdict(config))
    return registry.jsonable(dict(config))


def _finish(factory: sessionmaker[Session], attempt: _Attempt, **values: Any) -> tuple[ModelRun, bool]:
    """Record the end of ``attempt`` (status, error, metrics, ...) when it still owns the run;
    the first ``done`` run of its project and kind becomes active. Returns the stored run and
    whether this attempt wrote it (False: the run was taken over, the store keeps what the new
    owner wrote). A database that does not answer is tried again after each of
    :data:`FINISH_RETRY_S`, then the error is raised."""
    for wait in (*FINISH_RETRY_S, None):
        try:
            return _finish_once(factory, attempt, values)
        except DBAPIError as exc:
            if wait is None or not _transient(exc):
                raise
            log.warning("run %d: the database did not take its end (%s); trying again in %.1f s",
                        attempt.run_id, str(exc).splitlines()[0], wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _finish_once(factory: sessionmaker[Session], attempt: _Attempt, values: Mapping[str, Any]
                 ) -> tuple[ModelRun, bool]:
    values = dict(values)
    progress = values.pop("progress", None)
    now = utcnow()
    with factory() as session, session.begin():
        result = session.execute(update(ModelRun).where(*attempt.owns())
                                 .values(**values, finished_at=now, cancel_requested=False)
                                 .execution_options(synchronize_session=False))
        run = session.get(ModelRun, attempt.run_id, populate_existing=True)
        if run is None:
            raise WorkflowError(f"run {attempt.run_id} was deleted while it trained")
        if result.rowcount != 1:
            log.warning("run %s: not recording its end as %s, it is no longer this training's (now %s)",
                        run.version, values.get("status"), run.status)
            session.expunge(run)
            return run, False
        started = parse_utc(run.started_at)
        trained = attempt.before_s + ((now - started).total_seconds() if started else 0.0)
        run.progress = attempt.stamp({**(run.progress if progress is None else progress), "trained_s": trained})
        if run.status == "done":
            registry.promote_if_first(session, run)
        session.flush()
        session.expunge(run)
    return run, True


def _prepare(session: Session, settings: Settings, attempt: _Attempt, resume: bool | None
             ) -> tuple[Trainer, Any, TrainingData, Path, bool, list[dict[str, Any]]]:
    run = session.get(ModelRun, attempt.run_id)
    assert run is not None
    trainer = get_trainer(run.kind)
    config = _resolve_config(trainer, run.preset, run.config or {})
    if settings.torch_threads is not None and getattr(config, "threads", "absent") is None:
        config = dataclasses.replace(config, threads=settings.torch_threads)  # the fit sets its own threads
    out_dir = registry.model_dir(settings, run)
    resume_flag = _resume_decision(out_dir, run, resume)
    data = load_training_data(session, settings, run)
    run.config = _config_dict(config)
    run.data_snapshot_id = data.snapshot_id
    if data.source.get("kind") == "consensus" and data.source.get("snapshot_id") is not None:
        run.snapshot_id = int(data.source["snapshot_id"])
    curves = [dict(r) for r in (run.curves or [])] if resume_flag else []
    run.curves = curves
    run.progress = attempt.stamp({})
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_run_file(out_dir, run)  # names the run that owns the folder (and the resume.pt it writes)
    return trainer, config, data, out_dir, resume_flag, curves


def checkpoint_owner(out_dir: Path, run: ModelRun) -> str | None:
    """None when ``out_dir``'s ``resume.pt`` is ``run``'s own, else why not (for messages).

    Its own: the folder's :data:`RUN_FILE` names ``run`` (id, version and creation time, written
    when it starts training); a folder without that record (a run started before cellspot kept
    it) counts as the run's when the checkpoint is not older than the run. A deleted run's
    folder (a rebuilt demo project's) holds another run's record, or an older checkpoint."""
    from cellspot.ml.common import RESUME_FILE, read_json

    try:
        record = read_json(out_dir / RUN_FILE) if (out_dir / RUN_FILE).is_file() else {}
    except (OSError, ValueError):
        record = {}
    created = parse_utc(run.created_at)
    if isinstance(record, Mapping) and record.get("created_at"):
        mine = (record.get("run_id"), record.get("version"), parse_utc(record["created_at"])) == (
            run.id, run.version, created)
        return None if mine else (f"it belongs to run {record.get('version')} (id {record.get('run_id')}, "
                                  f"created {record.get('created_at')}), a deleted or another run")
    try:
        written = datetime.fromtimestamp((out_dir / RESUME_FILE).stat().st_mtime, tz=created.tzinfo)
    except (OSError, AttributeError):
        return "it cannot be read"
    if created is not None and written.timestamp() < created.timestamp() - 1.0:
        return f"it was written at {written:%Y-%m-%d %H:%M:%S}, before run {run.version} was created"
    return None


def _resume_decision(out_dir: Path, run: ModelRun, resume: bool | None) -> bool:
    """Whether to go on from ``out_dir/resume.pt``: ``resume`` None = when it is the run's own
    (:func:`checkpoint_owner`), True = must (one in a folder given with ``--resume --out`` and
    no record of a run is taken; another run's is refused), False = start over. A checkpoint
    that is not the run's is moved aside as ``stale-resume.pt`` when the run starts over."""
    from cellspot.ml.common import RESUME_FILE, TrainingError

    path = out_dir / RESUME_FILE
    if not path.is_file():
        if resume:
            raise TrainingError(f"cannot resume {run.version}: {path} does not exist")
        return False
    foreign = checkpoint_owner(out_dir, run)
    if foreign is None:
        return resume is not False
    if resume and not (out_dir / RUN_FILE).is_file():
        log.info("run %s goes on from %s as asked (%s)", run.version, path, foreign)
        return True
    if resume:
        raise TrainingError(f"cannot resume {run.version}: {path} is not its own checkpoint ({foreign}); start a "
                            "new run")
    stale = path.with_name(f"stale-{RESUME_FILE}")
    path.replace(stale)
    log.warning("run %s: ignoring %s (%s); moved to %s, training from scratch", run.version, path, foreign, stale)
    return False


def _write_run_file(out_dir: Path, run: ModelRun) -> None:
    from cellspot.ml.common import write_json

    created = parse_utc(run.created_at)
    write_json(out_dir / RUN_FILE, {
        "version": run.version, "run_id": run.id, "created_at": created.isoformat() if created else None,
        "kind": run.kind, "preset": run.preset, "data_source": run.data_source,
        "data_snapshot_id": run.data_snapshot_id, "snapshot_id": run.snapshot_id,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    })


def run_training(
    settings: Settings,
    run_id: int,
    *,
    progress: ProgressFn | None = None,
    resume: bool | None = None,
    device: str | None = None,
) -> ModelRun:
    """Train the queued run ``run_id`` and record everything in the store; returns the final
    run (detached). A run that is not queued (already taken, cancelled) is left alone.

    ``progress`` also receives every event (the CLI's progress bars). ``resume``: ``None`` =
    go on from ``resume.pt`` when the run's folder has one that this run wrote (another run's
    is moved aside, see :func:`_resume_decision`), ``True`` = must, ``False`` = start over.
    Errors end the run as ``failed`` with the message in ``error`` (not raised); Ctrl-C ends it
    as ``cancelled`` and is re-raised. The run is claimed under a new attempt token: when
    someone else takes it meanwhile (marked lost, resumed by another worker), this training
    stops at its next check and writes nothing (:class:`RunTakenOver`). Database outages
    shorter than :data:`DB_OUTAGE_S` are waited out; a longer one saves ``resume.pt`` and
    ends the run failed (resumable).
    """
    from cellspot.ml.common import TrainingCancelled, TrainingError, configure_threads
    from cellspot.ml.data import DataError
    from cellspot.store.db import make_engine, session_factory

    engine = make_engine(settings=settings)
    factory = session_factory(engine)
    try:
        attempt = _claim(factory, run_id)
        if attempt is None:
            return _stored_run(factory, run_id, "not queued: not training it")
        threads = configure_threads(settings.torch_threads)
        reporter: _StoreReporter | None = None
        interrupt = _GentleInterrupt()
        poll = _CancelPoll(factory, attempt)
        try:
            with factory() as session, session.begin():
                trainer, config, data, out_dir, resume_flag, curves = _prepare(session, settings, attempt, resume)
            log.info("training run %d: %d images, %d cells, %d CPU threads, resume=%s",
                     run_id, len(data.images), data.n_cells(), threads, resume_flag)
            reporter = _StoreReporter(factory, attempt, curves, progress)
            with interrupt:
                result = trainer.fit(data, config, out_dir, progress=reporter,
                                     should_stop=lambda: interrupt.requested or poll(),
                                     resume=resume_flag, device=device)
        except RunTakenOver:
            return _stored_run(factory, run_id, "taken over: this training stopped without writing")
        except TrainingCancelled:
            _flush_quietly(reporter)
            if poll.db_down:
                return _finish(factory, attempt, status="failed",
                               error=f"the database did not answer for {DB_OUTAGE_S:.0f} s, so the training stopped "
                                     "(resume.pt saved); resume to go on")[0]
            why = ("interrupted (Ctrl-C)" if interrupt.requested else
                   "its worker was stopped" if poll.worker_stopping else "cancelled on request")
            return _finish(factory, attempt, status="cancelled", error=f"{why}; resume to go on")[0]
        except KeyboardInterrupt:
            _flush_quietly(reporter)
            _finish(factory, attempt, status="cancelled", error="interrupted (Ctrl-C)")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with its message
            bad_input = isinstance(exc, (DataError, TrainingError, WorkflowError))  # the message says it all
            if bad_input:
                log.error("training run %d failed: %s", run_id, exc)
            else:
                log.exception("training run %d failed", run_id)
            _flush_quietly(reporter)
            return _finish(factory, attempt, status="failed",
                           error=str(exc) if bad_input else f"{type(exc).__name__}: {exc}")[0]
        final = {**reporter.latest, "phase": "done", "fraction": 1.0}
        run, mine = _finish(factory, attempt, status="done", error=None, metrics=registry.jsonable(result.metrics),
                            curves=registry.jsonable(result.curves) or reporter.curves, progress=final)
        if not mine:
            return run
        _write_run_file(out_dir, run)
        log.info("training run %s done in %.1f s: %s", run.version, result.seconds, run.metrics)
        return run
    finally:
        engine.dispose()


def _stored_run(factory: sessionmaker[Session], run_id: int, why: str) -> ModelRun:
    """Run ``run_id`` as stored (detached), after a warning that this training leaves it alone."""
    with factory() as session:
        run = registry.get_run(session, run_id)
        session.expunge(run)
    log.warning("run %s is %s, %s", run.version, run.status, why)
    return run


def _flush_quietly(reporter: _StoreReporter | None) -> None:
    if reporter is None:
        return
    try:
        reporter.flush()
    except RunTakenOver:
        pass  # _finish says so
    except Exception:  # noqa: BLE001 - the final status write matters more
        log.exception("could not write the last progress")

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
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
    return registry.create_run(
        session, kind, project=project, preset=preset,
        config=check_config(kind, preset, _overrides(epochs, overrides)),
        data_source=data_source, snapshot_id=snapshot_id,
        path=registry.relative_path(settings, out_dir) if out_dir is not None else None,
    )


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
    return (registry.model_dir(settings, run) / RESUME_FILE).is_file()


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

class _StoreReporter:
    """Progress callback: forwards every event, writes ``progress``/``curves`` to the store."""

    def __init__(self, factory: sessionmaker[Session], run_id: int, curves: list[dict[str, Any]],
                 forward: ProgressFn | None) -> None:
        self.factory, self.run_id, self.forward = factory, run_id, forward
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
            values["progress"] = {**self.latest, "reported_at": utcnow().isoformat()}
        with self.factory() as session, session.begin():
            session.execute(update(ModelRun).where(ModelRun.id == self.run_id).values(**values))
        self.last_write = time.monotonic() if now is None else now


class _CancelPoll:
    """``should_stop``: reads ``cancel_requested`` at most every :data:`CANCEL_POLL_S` seconds."""

    def __init__(self, factory: sessionmaker[Session], run_id: int) -> None:
        self.factory, self.run_id = factory, run_id
        from cellspot.jobs import STOPPING  # noqa: PLC0415 - jobs imports huey

        self.last_poll = float("-inf")
        self.stop = False
        self.worker_stopping = False
        self.stopping = STOPPING

    def __call__(self) -> bool:
        if self.stopping.is_set():  # the worker of this process is stopping (SIGTERM / SIGINT)
            self.worker_stopping = self.stop = True
        now = time.monotonic()
        if self.stop or now - self.last_poll < CANCEL_POLL_S:
            return self.stop
        self.last_poll = now
        with self.factory() as session:
            flag = session.scalar(select(ModelRun.cancel_requested).where(ModelRun.id == self.run_id))
        self.stop = flag is None or bool(flag)
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


def _claim(factory: sessionmaker[Session], run_id: int) -> bool:
    """Atomically move run ``run_id`` from queued to running (False when not queued)."""
    with factory() as session, session.begin():
        result = session.execute(
            update(ModelRun)
            .where(ModelRun.id == run_id, ModelRun.status == "queued")
            .values(status="running", started_at=utcnow(), finished_at=None, cancel_requested=False, error=None)
        )
        return result.rowcount == 1


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


def _finish(factory: sessionmaker[Session], run_id: int, **values: Any) -> ModelRun:
    with factory() as session, session.begin():
        run = session.get(ModelRun, run_id)
        assert run is not None  # claimed by this job; rows are not deleted while running
        for key, value in values.items():
            setattr(run, key, value)
        run.finished_at = utcnow()
        run.cancel_requested = False
        if run.status == "done" and registry.active_run(session, _project_of(session, run), run.kind) is None:
            registry.promote(session, run)
        session.flush()
        session.expunge(run)
    return run


def _project_of(session: Session, run: ModelRun) -> Project | None:
    return session.get(Project, run.project_id) if run.project_id is not None else None


def _prepare(session: Session, settings: Settings, run_id: int, resume: bool | None
             ) -> tuple[Trainer, Any, TrainingData, Path, bool, list[dict[str, Any]]]:
    from cellspot.ml.common import RESUME_FILE, TrainingError

    run = session.get(ModelRun, run_id)
    assert run is not None
    trainer = get_trainer(run.kind)
    config = _resolve_config(trainer, run.preset, run.config or {})
    if settings.torch_threads is not None and getattr(config, "threads", "absent") is None:
        config = dataclasses.replace(config, threads=settings.torch_threads)  # the fit sets its own threads
    out_dir = registry.model_dir(settings, run)
    has_resume = (out_dir / RESUME_FILE).is_file()
    if resume and not has_resume:
        raise TrainingError(f"cannot resume {run.version}: {out_dir / RESUME_FILE} does not exist")
    resume_flag = has_resume if resume is None else bool(resume)
    data = load_training_data(session, settings, run)
    run.config = _config_dict(config)
    run.data_snapshot_id = data.snapshot_id
    if data.source.get("kind") == "consensus" and data.source.get("snapshot_id") is not None:
        run.snapshot_id = int(data.source["snapshot_id"])
    curves = [dict(r) for r in (run.curves or [])] if resume_flag else []
    run.curves = curves
    run.progress = {}
    return trainer, config, data, out_dir, resume_flag, curves


def _write_run_file(out_dir: Path, run: ModelRun) -> None:
    from cellspot.ml.common import write_json

    write_json(out_dir / RUN_FILE, {
        "version": run.version, "kind": run.kind, "preset": run.preset, "data_source": run.data_source,
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
    go on from ``resume.pt`` when the run's folder has one, ``True`` = must, ``False`` =
    start over. Errors end the run as ``failed`` with the message in ``error`` (not raised);
    Ctrl-C ends it as ``cancelled`` and is re-raised.
    """
    from cellspot.ml.common import TrainingCancelled, TrainingError, configure_threads
    from cellspot.ml.data import DataError
    from cellspot.store.db import make_engine, session_factory

    engine = make_engine(settings=settings)
    factory = session_factory(engine)
    try:
        if not _claim(factory, run_id):
            with factory() as session:
                run = registry.get_run(session, run_id)
                session.expunge(run)
            log.warning("run %s is %s, not queued: not training it", run.version, run.status)
            return run
        threads = configure_threads(settings.torch_threads)
        reporter: _StoreReporter | None = None
        interrupt = _GentleInterrupt()
        poll = _CancelPoll(factory, run_id)
        try:
            with factory() as session, session.begin():
                trainer, config, data, out_dir, resume_flag, curves = _prepare(session, settings, run_id, resume)
            log.info("training run %d: %d images, %d cells, %d CPU threads, resume=%s",
                     run_id, len(data.images), data.n_cells(), threads, resume_flag)
            reporter = _StoreReporter(factory, run_id, curves, progress)
            with interrupt:
                result = trainer.fit(data, config, out_dir, progress=reporter,
                                     should_stop=lambda: interrupt.requested or poll(),
                                     resume=resume_flag, device=device)
        except TrainingCancelled:
            _flush_quietly(reporter)
            why = ("interrupted (Ctrl-C)" if interrupt.requested else
                   "its worker was stopped" if poll.worker_stopping else "cancelled on request")
            return _finish(factory, run_id, status="cancelled", error=f"{why}; resume to go on")
        except KeyboardInterrupt:
            _flush_quietly(reporter)
            _finish(factory, run_id, status="cancelled", error="interrupted (Ctrl-C)")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends the run with its message
            bad_input = isinstance(exc, (DataError, TrainingError, WorkflowError))  # the message says it all
            if bad_input:
                log.error("training run %d failed: %s", run_id, exc)
            else:
                log.exception("training run %d failed", run_id)
            _flush_quietly(reporter)
            return _finish(factory, run_id, status="failed",
                           error=str(exc) if bad_input else f"{type(exc).__name__}: {exc}")
        final = {**reporter.latest, "phase": "done", "fraction": 1.0}
        run = _finish(factory, run_id, status="done", error=None, metrics=registry.jsonable(result.metrics),
                      curves=registry.jsonable(result.curves) or reporter.curves, progress=final)
        _write_run_file(out_dir, run)
        log.info("training run %s done in %.1f s: %s", run.version, result.seconds, run.metrics)
        return run
    finally:
        engine.dispose()


def _flush_quietly(reporter: _StoreReporter | None) -> None:
    if reporter is None:
        return
    try:
        reporter.flush()
    except Exception:  # noqa: BLE001 - the final status write matters more
        log.exception("could not write the last progress")

"""The automatic mode of active-learning rounds: retrain and refresh the queue after N task runs.

Settings live in ``project.settings["auto_rounds"]`` (see :class:`AutoSettings`). Once
``every_runs`` task runs have been submitted since the last training, the worker

1. aggregates the clicks into a new consensus snapshot and applies adaptive retirement,
2. trains a detector and a classifier on it (the one training path,
   :func:`cellspot.workflows.models.run_training`; the runs show on the Models page),
3. promotes the runs that finished (``promote``; roll back on the Models page),
4. predicts every image with the active pair (skipped when that pair already has predictions),
5. opens a new round with ``strategy`` / ``top``
   (:func:`cellspot.workflows.rounds.open_new_round`): the queue is refreshed.

The trigger is :func:`maybe_auto_retrain`: it marks the project pending and puts
:func:`run_auto_round` on the job queue once the caller commits. The worker calls it for every
project once a minute (huey periodic task ``cellspot.auto_check`` -> :func:`check_auto_rounds`),
so the student's submit path is untouched. Bookkeeping lives in
``project.settings["auto_rounds_state"]`` (``baseline_runs``, ``pending_since``, ``last``).
Functions that take a session never commit (the caller owns it); :func:`run_auto_round` and
:func:`check_auto_rounds` open their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from cellspot.active import rounds as al
from cellspot.ml import registry
from cellspot.store.models import Image, ModelRun, Project, TaskRun, parse_utc, utcnow
from cellspot.store.queries import as_project
from cellspot.workflows.dashboard import int_in
from cellspot.workflows.rounds import DEFAULT_STRATEGY, MODEL_ORDER, RoundsWorkflowError, open_new_round

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from cellspot.settings import Settings

log = logging.getLogger(__name__)

AUTO_KEY = "auto_rounds"
AUTO_STATE_KEY = "auto_rounds_state"
DEFAULT_AUTO_EVERY = 50
AUTO_PRESETS = ("cpu-fast", "quality")
#: a pending automatic round older than this is taken as lost (worker killed) and may start again
AUTO_STALE_AFTER = timedelta(hours=6)
#: model runs that count as "a training" for the automatic mode's run counter
TRAINING_STATUSES = ("queued", "running", "done")


class AutoSettingsError(RoundsWorkflowError):
    """An automatic-mode setting out of its allowed range."""


# --------------------------------------------------------------------------- automatic mode: settings


@dataclass(frozen=True)
class AutoSettings:
    """Automatic mode of a project (``project.settings["auto_rounds"]``).

    ``enabled``; ``every_runs``: new task runs since the last training that trigger the next
    one; ``strategy`` / ``top``: how the refreshed queue is ranked; ``preset`` / ``epochs``:
    how the two models train; ``promote``: make the new runs active when they finish.
    """

    enabled: bool = False
    every_runs: int = DEFAULT_AUTO_EVERY
    strategy: str = DEFAULT_STRATEGY
    top: int | None = None
    preset: str = registry.DEFAULT_PRESET
    epochs: int | None = None
    promote: bool = True

    @classmethod
    def from_project(cls, project: Project) -> AutoSettings:
        """The project's stored settings (defaults for missing keys; unknown keys ignored)."""
        stored = (project.settings or {}).get(AUTO_KEY) or {}
        names = {f.name for f in fields(cls)}
        settings = cls()
        for key, value in dict(stored).items():  # one by one: a value an older version stored that is
            if key not in names:                  # no longer allowed (strategy 'bald') falls back to the
                continue                          # default alone, and the page and the worker go on
            try:
                settings = cls.validated(settings, **{key: value})
            except AutoSettingsError as exc:
                log.warning("project %r: stored automatic-mode %s ignored: %s", project.name, key, exc)
        return settings

    @classmethod
    def validated(cls, base: AutoSettings, **changes: Any) -> AutoSettings:
        """``base`` with ``changes``, checked; :class:`AutoSettingsError` says what is allowed."""
        from cellspot.active.strategies import UnknownStrategyError, get_strategy

        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise AutoSettingsError(f"unknown automatic-mode settings {unknown}; allowed: {', '.join(sorted(names))}")
        new = replace(base, **changes)
        if not isinstance(new.enabled, bool):
            raise AutoSettingsError(f"enabled must be true or false, got {new.enabled!r}")
        runs, thousand = int_in(1, 1_000_000, AutoSettingsError), int_in(1, 1000, AutoSettingsError)
        every = runs("every_runs", new.every_runs)
        top = None if new.top is None else runs("top", new.top)
        epochs = None if new.epochs is None else thousand("epochs", new.epochs)
        try:
            chosen = get_strategy(str(new.strategy))
        except UnknownStrategyError as exc:
            raise AutoSettingsError(str(exc)) from None
        if chosen.extra_input:
            raise AutoSettingsError(f"strategy {chosen.name!r} needs {chosen.extra_input}, which automatic rounds "
                                    "do not compute; choose another (e.g. 'combined')")
        if new.preset not in AUTO_PRESETS:
            raise AutoSettingsError(f"preset must be one of {', '.join(AUTO_PRESETS)}, got {new.preset!r}")
        return replace(new, every_runs=every, top=top, epochs=epochs, strategy=str(new.strategy),
                       promote=bool(new.promote))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_auto_settings(session: Session, project: Project | str, **changes: Any) -> AutoSettings:
    """Validate ``changes`` (fields of :class:`AutoSettings`) and store them; flushes, no commit.
    Nothing changes when a value is invalid."""
    project = as_project(session, project)
    new = AutoSettings.validated(AutoSettings.from_project(project), **changes)
    project.settings = {**(project.settings or {}), AUTO_KEY: new.as_dict()}  # a new dict: marked dirty
    session.flush()
    log.info("project %r: automatic mode %s (every %d runs, %s)", project.name,
             "on" if new.enabled else "off", new.every_runs, new.strategy)
    return new


# --------------------------------------------------------------------------- automatic mode: trigger


@dataclass(frozen=True)
class AutoStatus:
    """Where a project's automatic mode stands.

    ``baseline_runs``: task runs at the last training (the last automatic trigger, or the
    creation of the newest queued/running/done model run, whichever is later); ``new_runs`` =
    ``task_runs - baseline_runs``; ``pending_since``: an automatic round is queued or running
    (``None`` also when it is older than :data:`AUTO_STALE_AFTER`); ``last``: what the last
    automatic round reported (:meth:`AutoReport.as_dict`, empty before the first);
    ``counted_from``: what ``baseline_runs`` marks, ``"training"`` (the newest model run),
    ``"automatic round"`` (the last automatic trigger, later than any model run) or ``None``
    (no model run and no automatic round yet: ``new_runs`` counts every task run so far).
    """

    settings: AutoSettings
    task_runs: int
    baseline_runs: int
    pending_since: datetime | None
    last: dict[str, Any] = field(default_factory=dict)
    counted_from: str | None = None

    @property
    def new_runs(self) -> int:
        return max(0, self.task_runs - self.baseline_runs)

    @property
    def due(self) -> bool:
        return self.settings.enabled and self.pending_since is None and self.new_runs >= self.settings.every_runs

    @property
    def runs_to_go(self) -> int:
        return max(0, self.settings.every_runs - self.new_runs)


@dataclass(frozen=True)
class AutoDecision:
    """What :func:`maybe_auto_retrain` decided: ``queued`` and why (``reason``)."""

    queued: bool
    reason: str
    status: AutoStatus


def _task_runs(session: Session, project: Project, until: datetime | None = None) -> int:
    stmt = (select(func.count()).select_from(TaskRun).join(Image, Image.id == TaskRun.image_id)
            .where(Image.project_id == project.id))
    if until is not None:
        stmt = stmt.where(TaskRun.submitted_at < until)
    return int(session.scalar(stmt) or 0)


def _state(project: Project) -> dict[str, Any]:
    return dict((project.settings or {}).get(AUTO_STATE_KEY) or {})


def _write_state(session: Session, project: Project, **changes: Any) -> None:
    state = {**_state(project), **registry.jsonable(changes)}
    project.settings = {**(project.settings or {}), AUTO_STATE_KEY: state}
    session.flush()


def auto_status(session: Session, project: Project | str, now: datetime | None = None) -> AutoStatus:
    """The automatic-mode :class:`AutoStatus` of ``project`` (reads only)."""
    project = as_project(session, project)
    state = _state(project)
    newest = session.scalar(select(func.max(ModelRun.created_at)).where(
        ModelRun.project_id == project.id, ModelRun.status.in_(TRAINING_STATUSES)))
    trained = _task_runs(session, project, until=al.utc(newest)) if newest is not None else 0
    triggered = int(state.get("baseline_runs") or 0)
    baseline = max(triggered, trained)
    counted_from = ("training" if newest is not None and trained >= triggered else
                    "automatic round" if triggered > 0 else None)
    pending = parse_utc(state.get("pending_since"))
    if pending is not None and (al.utc(now) or utcnow()) - pending > AUTO_STALE_AFTER:
        log.warning("project %r: the automatic round pending since %s is taken as lost", project.name, pending)
        pending = None
    return AutoStatus(AutoSettings.from_project(project), _task_runs(session, project), baseline, pending,
                      dict(state.get("last") or {}), counted_from)


def maybe_auto_retrain(
    session: Session, settings: Settings, project: Project | str, *, force: bool = False,
    now: datetime | None = None,
) -> AutoDecision:
    """Queue an automatic round of ``project`` when its automatic mode is due (see
    :class:`AutoStatus`; ``force``: now, whatever the mode and counter, unless one is pending).

    When queued, the project is marked pending (flushed, the caller commits) and
    :func:`run_auto_round` goes on the job queue (``settings``' queue) right after the
    session's next commit; a rollback queues nothing. A queue that cannot be reached is
    logged, not raised (the mark then expires after :data:`AUTO_STALE_AFTER`).
    """
    project = as_project(session, project)
    session.refresh(project, with_for_update=True)  # PostgreSQL: one trigger at a time (SQLite locks on write)
    status = auto_status(session, project, now=now)
    if status.pending_since is not None:
        return AutoDecision(False, f"an automatic round is already pending since {status.pending_since:%H:%M}", status)
    if not force:
        if not status.settings.enabled:
            return AutoDecision(False, "automatic mode is off", status)
        if not status.due:
            return AutoDecision(False, f"{status.new_runs} of {status.settings.every_runs} new task runs", status)
    when = al.utc(now) or utcnow()
    _write_state(session, project, pending_since=when.isoformat(), baseline_runs=status.task_runs,
                 baseline_before=status.baseline_runs, trigger="manual" if force else "auto")
    _enqueue_after_commit(session, settings, project.name, when.isoformat())
    log.info("project %r: automatic round queued (%d new task runs%s)", project.name, status.new_runs,
             ", forced" if force else "")
    return AutoDecision(True, f"queued after {status.new_runs} new task runs", auto_status(session, project, now))


def forget_pending(session: Session, project: Project | str) -> datetime | None:
    """Clear the pending mark of ``project``'s automatic round (when its worker was stopped, or
    none was running: the mark would block the next one for :data:`AUTO_STALE_AFTER`); returns
    when it had been set. Its job, should it still be in the queue, does nothing when a worker
    picks it up (:func:`run_auto_round` checks that its round is the pending one). Flush, no commit."""
    project = as_project(session, project)
    state = _state(project)
    pending = parse_utc(state.get("pending_since"))
    if pending is None:
        raise RoundsWorkflowError(f"project {project.name!r} has no pending automatic round")
    # the counter goes back to where it was: nothing has trained
    _write_state(session, project, pending_since=None,
                 baseline_runs=state.get("baseline_before", state.get("baseline_runs", 0)))
    log.info("project %r: the automatic round pending since %s was forgotten", project.name, pending)
    return pending


def forget_dropped_round(settings: Settings, project_name: str, queued_at: str) -> bool:
    """:func:`forget_pending` for a round job that a worker dropped (another round of the project
    was running), when the pending mark is still the one the job was queued under (``queued_at``):
    nobody else would clear it, and the periodic check may queue the round again once it is due.
    Opens and commits its own transaction; returns whether the mark was cleared."""
    from cellspot.store.db import make_engine, transaction

    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            project = as_project(session, project_name)
            session.refresh(project, with_for_update=True)
            if _state(project).get("pending_since") != queued_at:
                return False
            forget_pending(session, project)
            return True
    finally:
        engine.dispose()


def _enqueue_after_commit(session: Session, settings: Settings, project_name: str, queued_at: str) -> None:
    """Put :func:`run_auto_round` on the queue after ``session``'s next commit (not after a rollback);
    ``queued_at``: the pending mark it was queued under."""
    fired = {"done": False}

    def committed(_session: Session) -> None:
        if fired["done"]:
            return
        fired["done"] = True
        from cellspot.jobs import enqueue_auto_round

        try:
            enqueue_auto_round(settings, project_name, queued_at)
        except Exception:  # noqa: BLE001 - a queue outage must not fail the caller's committed work
            log.exception("project %r: could not queue the automatic round", project_name)

    def rolled_back(_session: Session) -> None:
        fired["done"] = True

    event.listen(session, "after_commit", committed, once=True)
    event.listen(session, "after_rollback", rolled_back, once=True)


def check_auto_rounds(settings: Settings, now: datetime | None = None) -> list[str]:
    """:func:`maybe_auto_retrain` for every project with automatic mode on, in one committed
    transaction of its own (the worker's periodic task). Returns the projects queued."""
    from cellspot.store.db import make_engine, transaction

    engine = make_engine(settings=settings)
    queued: list[str] = []
    try:
        with transaction(engine) as session:
            for project in session.scalars(select(Project).order_by(Project.id)).all():
                if not ((project.settings or {}).get(AUTO_KEY) or {}).get("enabled"):
                    continue
                if maybe_auto_retrain(session, settings, project, now=now).queued:
                    queued.append(project.name)
    finally:
        engine.dispose()
    return queued


# --------------------------------------------------------------------------- automatic mode: the job


@dataclass(frozen=True)
class AutoReport:
    """What one automatic round did (also stored as ``last`` in the project's auto state)."""

    project: str
    status: str = "done"  # done | failed | skipped (no longer pending when a worker took it)
    message: str = ""
    snapshot_id: int | None = None
    runs: dict[str, str] = field(default_factory=dict)  # kind -> version
    run_status: dict[str, str] = field(default_factory=dict)  # version -> status
    promoted: list[str] = field(default_factory=list)
    predicted: str | None = None  # "detector-0002 + classifier-0003" when predictions were made
    round: int | None = None
    finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


PredictFn = Callable[[Session, "Settings", Project], Any]


def _predict(session: Session, settings: Settings, project: Project) -> Any:
    from cellspot.ml.project_predictions import predict_project

    return predict_project(session, settings, project)


def run_auto_round(settings: Settings, project_name: str, *, predict: PredictFn | None = None,
                   now: datetime | None = None, queued_at: str | None = None,
                   still_ours: Callable[[], None] | None = None) -> AutoReport:
    """The automatic round of ``project_name`` (steps 1-5 of the module doc), each step in its
    own committed transaction so the dashboard follows along. Never raises for a failed step:
    the failure ends the report (``status="failed"``, ``message``) and is stored in the
    project's auto state, which is always cleared of its pending mark. A failed training
    also marks the report failed, but the queue is still refreshed (new consensus, the
    models that are active). ``predict``: the
    prediction step (default :func:`cellspot.ml.project_predictions.predict_project`; tests swap it).
    ``queued_at``: the pending mark the job was queued under (see :func:`maybe_auto_retrain`); when
    the project's mark is another one (the round was forgotten, or taken as lost and queued
    again), nothing is done and the report says ``skipped``. ``still_ours``: called before the
    training, the promotion and the round's opening; it raises when this job's lock was taken
    over by another worker (:func:`cellspot.jobs.round_lock`), which ends the round failed
    before that step, so two workers never both promote and open a round.
    """
    from cellspot.store.db import make_engine, transaction

    report = AutoReport(project_name)
    engine = make_engine(settings=settings)
    if queued_at is not None and (stale := _no_longer_pending(engine, project_name, queued_at)):
        engine.dispose()
        log.info("project %r: %s", project_name, stale)
        return replace(report, status="skipped", message=stale)
    try:
        check = still_ours or (lambda: None)
        with transaction(engine) as session:
            report, run_ids = _prepare_auto(session, settings, project_name, report)
        check()
        report = _train(settings, run_ids, report)
        check()
        with transaction(engine) as session:
            report = _promote_and_predict(session, settings, project_name, report, predict or _predict)
        check()
        with transaction(engine) as session:
            cfg = AutoSettings.from_project(as_project(session, project_name))
            info = open_new_round(session, project_name, strategy=cfg.strategy, top=cfg.top, now=now)
            report = replace(report, round=info.number,
                             message=_join(report.message, f"{info.describe()} opened"))
    except Exception as exc:  # noqa: BLE001 - any failure ends the round with its message (like run_training)
        log.exception("automatic round of %r failed", project_name)
        report = replace(report, status="failed", message=_join(report.message, f"{type(exc).__name__}: {exc}"))
    finally:
        report = replace(report, finished_at=(al.utc(now) or utcnow()).isoformat())
        try:
            with transaction(engine) as session:
                project = as_project(session, project_name)
                done: dict[str, Any] = {"last": report.as_dict()}
                # the mark is this round's, unless it was forgotten while this ran and another
                # round has been queued since: that one's mark stays, or its job would skip itself
                if queued_at is None or _state(project).get("pending_since") in (None, queued_at):
                    done["pending_since"] = None
                _write_state(session, project, **done)
        finally:
            engine.dispose()
    log.info("automatic round of %r %s: %s", project_name, report.status, report.message)
    return report


def _no_longer_pending(engine: Engine, project_name: str, queued_at: str) -> str | None:
    """Why the round queued under the pending mark ``queued_at`` must not run, or None."""
    from cellspot.store.db import transaction

    with transaction(engine) as session:
        current = _state(as_project(session, project_name)).get("pending_since")
    if current == queued_at:
        return None
    why = "it was forgotten" if current is None else f"another was queued at {current}"
    return f"the automatic round queued at {queued_at} is no longer pending ({why}); nothing done"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _prepare_auto(session: Session, settings: Settings, project_name: str, report: AutoReport
                  ) -> tuple[AutoReport, dict[str, int]]:
    """Steps 1-2a: aggregate (which applies the adaptive retirement), create the two queued
    training runs."""
    from cellspot.workflows.aggregate import aggregate
    from cellspot.workflows.models import start_training

    project = as_project(session, project_name)
    cfg = AutoSettings.from_project(project)
    agg = aggregate(session, project)
    runs = {kind: start_training(session, settings, project, kind, preset=cfg.preset, epochs=cfg.epochs)
            for kind in MODEL_ORDER}
    return (replace(report, snapshot_id=agg.snapshot_id, runs={k: r.version for k, r in runs.items()}),
            {k: r.id for k, r in runs.items()})


def _train(settings: Settings, run_ids: Mapping[str, int], report: AutoReport) -> AutoReport:
    """Step 2b: train each run in this process (the one training path)."""
    from cellspot.workflows.models import run_training

    statuses = {}
    for kind in MODEL_ORDER:
        run = run_training(settings, run_ids[kind])
        statuses[run.version] = run.status
    if all(s == "done" for s in statuses.values()):
        return replace(report, run_status=statuses)
    message = f"training {', '.join(f'{v} {s}' for v, s in statuses.items())} (see the Models page)"
    return replace(report, status="failed", run_status=statuses, message=_join(report.message, message))


def _promote_and_predict(session: Session, settings: Settings, project_name: str, report: AutoReport,
                         predict: PredictFn) -> AutoReport:
    """Steps 3-4: promote the finished runs, predict with the active pair unless it has predictions."""
    from cellspot.active.signals import prediction_pair
    from cellspot.ml.predict import NoActiveModelError

    project = as_project(session, project_name)
    cfg = AutoSettings.from_project(project)
    promoted = []
    for version, status in report.run_status.items():
        run = registry.get_run(session, version)
        if cfg.promote and status == "done" and not run.is_active:
            registry.promote(session, run)
            promoted.append(version)
        elif status == "done" and run.is_active:
            promoted.append(version)  # the first run of its kind became active on its own
    active = [registry.active_run(session, project, kind) for kind in MODEL_ORDER]
    report = replace(report, promoted=promoted)
    if any(run is None for run in active):
        missing = [k for k, r in zip(MODEL_ORDER, active) if r is None]
        return replace(report, message=_join(report.message, f"no active {' and '.join(missing)}: crowd signals only"))
    pair = (active[0].id, active[1].id)
    label = f"{active[0].version} + {active[1].version}"
    if prediction_pair(session, project) == pair:
        return replace(report, message=_join(report.message, f"predictions of {label} reused"))
    try:
        predict(session, settings, project)
    except NoActiveModelError as exc:
        return replace(report, message=_join(report.message, str(exc)))
    return replace(report, predicted=label)


__all__ = [
    "AUTO_KEY", "AUTO_STATE_KEY", "DEFAULT_AUTO_EVERY", "AutoDecision", "AutoReport", "AutoSettings",
    "AutoSettingsError", "AutoStatus", "auto_status", "check_auto_rounds", "maybe_auto_retrain", "run_auto_round",
    "set_auto_settings",
]

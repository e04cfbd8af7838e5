"""Background jobs on a huey task queue: training runs and project predictions.

The queue is embedded by default (a SQLite file ``CELLSPOT_HOME/queue.db``, no server) and
moves to Redis by setting ``CELLSPOT_QUEUE_URL=redis://host:6379/0``, so workers on other
machines (with GPUs) can share it. ``cellspot worker`` runs the consumer.

A :class:`JobQueue` binds a huey instance to the settings that the tasks run with: the
worker trains with the store, home and thread count it was started with, and the producer
only sends run ids. :func:`get_queue` caches one queue per (queue URL, database URL, home).

Automatic rounds (:mod:`cellspot.workflows.auto_rounds`): the periodic task ``cellspot.auto_check``
runs once a minute in every worker and queues ``cellspot.auto_round`` for the projects whose
automatic mode is due (retrain both models, predict, open the next round).

Order for callers: create the run and **commit**, then enqueue (a worker may pick the task
up at once and must see the row); :func:`cellspot.workflows.models.queue_training` does both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huey import Huey, RedisExpireHuey, SqliteHuey, crontab
from huey.api import Result, TaskWrapper
from huey.consumer import Consumer
from huey.exceptions import TaskLockedException

from cellspot.marks import (
    MarkHeldError,
    describe_holder,
    hold_mark,
    holder_alive,
    pid_alive,
    swap_mark,
    take_mark,
)

if TYPE_CHECKING:
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

QUEUE_NAME = "cellspot"
#: seconds a task's result is kept in Redis (nothing in cellspot reads them; a test or a
#: person with ``redis-cli`` may, for a while); they used to stay forever
RESULT_TTL_S = 24 * 3600
SQLITE_PREFIX = "sqlite:///"
REDIS_PREFIXES = ("redis://", "rediss://", "unix://")

_QUEUES: dict[tuple[str, str, str, int | None, str | None], JobQueue] = {}
_QUEUES_LOCK = threading.Lock()


class JobQueueError(ValueError):
    """The job queue cannot be used: a queue URL cellspot does not know, or a queue that does
    not answer (Redis down, the SQLite queue file not writable)."""


@dataclass(frozen=True)
class JobQueue:
    """A huey instance with cellspot's tasks registered on it.

    ``train(run_id, resume=None, device=None)``, ``predict(project, detector=None,
    classifier=None)`` and ``auto_round(project)`` enqueue
    (or, with ``huey.immediate = True``, run at once) and return a huey :class:`Result`.
    """

    huey: Huey
    train: TaskWrapper
    predict: TaskWrapper
    settings: Settings
    auto_round: TaskWrapper


def make_huey(url: str, *, name: str | None = None) -> Huey:
    """A bare huey instance for ``url``: ``sqlite:///path/queue.db`` or ``redis://host:port/db``.

    ``name`` (default :data:`QUEUE_NAME`) separates queues that share one Redis database
    (:func:`queue_name`). On Redis, task results expire after :data:`RESULT_TTL_S`.
    """
    name = name or QUEUE_NAME
    if url.startswith(SQLITE_PREFIX):
        path = Path(url[len(SQLITE_PREFIX):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path))
    if url.startswith(REDIS_PREFIXES):
        return RedisExpireHuey(name, url=url, expire_time=RESULT_TTL_S)
    raise JobQueueError(
        f"unsupported queue URL {url!r}; use sqlite:///path/to/queue.db or redis://host:6379/0 "
        "(CELLSPOT_QUEUE_URL; unset = SQLite file in CELLSPOT_HOME)"
    )


#: host names of this machine in a database URL (no host: PostgreSQL's local socket)
LOOPBACK_HOSTS = ("", "localhost", "127.0.0.1", "::1", "[::1]")


def queue_name(settings: Settings) -> str:
    """The queue's name for ``settings``: ``CELLSPOT_QUEUE_NAME``, else :data:`QUEUE_NAME`, a
    dash and a short hash of the store, so that two stores whose workers share one Redis
    database do not take each other's jobs. The store is what picks the data, and only that:
    a SQLite file by its absolute path; else the backend, user, host (any case), port (its
    default when not given; ``localhost``, ``127.0.0.1``, ``::1`` and no host are one) and
    database, and for PostgreSQL the ``options`` parameter when it
    sets a ``search_path`` (a schema: ``?options=-csearch_path%3Dlab``). The driver, the
    password and the other query parameters (``connect_timeout``, ``sslmode``, ...) may
    differ between the app and its workers."""
    if settings.queue_name:
        return settings.queue_name
    from sqlalchemy.engine import make_url

    from cellspot.store.db import sqlite_file

    url = settings.resolved_database_url
    file = sqlite_file(url)
    if file is not None:
        store = f"sqlite:{file.resolve()}"
    else:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        port = parsed.port or {"postgresql": 5432, "mysql": 3306}.get(backend, "")
        options = parsed.query.get("options")
        # a search_path in PostgreSQL's options picks the schema: another store on that database
        query = f"options={options}" if backend == "postgresql" and "search_path" in str(options) else ""
        host = (parsed.host or "").lower()
        host = "localhost" if host in LOOPBACK_HOSTS else host  # this machine, however it is written
        store = f"{backend}://{parsed.username or ''}@{host}:{port}/{parsed.database or ''}?{query}"
    return f"{QUEUE_NAME}-{hashlib.sha256(store.encode()).hexdigest()[:10]}"


def _register_tasks(huey: Huey, settings: Settings) -> tuple[TaskWrapper, TaskWrapper, TaskWrapper]:
    @huey.task(name="cellspot.train")
    def train_task(run_id: int, resume: bool | None = None, device: str | None = None) -> dict[str, Any]:
        """Train model run ``run_id`` (see :func:`cellspot.workflows.models.run_training`)."""
        from cellspot.ml.registry import RunNotFoundError
        from cellspot.workflows.models import run_training

        try:
            run = run_training(settings, run_id, resume=resume, device=device)
        except RunNotFoundError as exc:
            return _not_in_this_store(settings, f"training run {run_id}", exc)
        return {"run_id": run.id, "version": run.version, "status": run.status, "error": run.error}

    @huey.task(name="cellspot.predict")
    def predict_task(project: str, detector: str | None = None, classifier: str | None = None) -> dict[str, Any]:
        """Predict every image of ``project`` and store the cells; ``detector`` / ``classifier``
        are run versions or ids (default: the project's active runs)."""
        from cellspot.ml.project_predictions import predict_project
        from cellspot.ml.registry import RunNotFoundError, get_run
        from cellspot.store.db import make_engine, transaction
        from cellspot.store.queries import ProjectNotFoundError, get_project

        engine = make_engine(settings=settings)
        key = _prediction_key(project, detector, classifier)
        try:
            with busy(settings, "predict", project), _running_prediction(huey, key), \
                    transaction(engine) as session:
                report = predict_project(
                    session, settings, get_project(session, project),
                    detector_run=get_run(session, detector) if detector else None,
                    classifier_run=get_run(session, classifier) if classifier else None,
                )
        except (RunNotFoundError, ProjectNotFoundError) as exc:
            return _not_in_this_store(settings, f"the prediction of project {project!r}", exc)
        finally:
            engine.dispose()
        summary = {name: getattr(report, name, None) for name in
                   ("project", "detector_version", "classifier_version", "images", "cells", "alive", "dead",
                    "seconds")}
        errors = list(getattr(report, "errors", None) or [])
        summary["not_predicted"] = [{"image": e.image, "error": e.error} for e in errors]
        log.info("predictions stored: %s", {k: v for k, v in summary.items() if k != "not_predicted"})
        for error in errors:  # nothing reads the task's result: the worker's log names them
            log.warning("project %r: image %s was not predicted: %s", project, error.image, error.error)
        return summary

    @huey.task(name="cellspot.auto_round")
    def auto_round_task(project: str, queued_at: str | None = None) -> dict[str, Any]:
        """Retrain, predict and open the next round of ``project`` (one at a time per project;
        see :func:`cellspot.workflows.auto_rounds.run_auto_round`; a round forgotten since
        ``queued_at`` does nothing)."""
        from cellspot.store.queries import ProjectNotFoundError
        from cellspot.workflows.auto_rounds import forget_dropped_round, run_auto_round

        try:
            with round_lock(huey, project) as still_ours, busy(settings, "auto_round", project):
                return run_auto_round(settings, project, queued_at=queued_at, still_ours=still_ours).as_dict()
        except TaskLockedException as exc:
            # its pending mark goes (when it is this job's): the running round does not clear
            # another round's mark, which would block the project for AUTO_STALE_AFTER
            try:
                forgot = queued_at is not None and forget_dropped_round(settings, project, queued_at)
            except Exception:  # noqa: BLE001 - the mark then expires after AUTO_STALE_AFTER
                log.exception("automatic round of %r: cannot clear the pending mark of a dropped round", project)
                forgot = False
            log.warning("automatic round of %r dropped: %s%s", project, exc,
                        "; its pending mark is cleared" if forgot else "")
            return {"project": project, "status": "skipped", "message": f"already running ({exc})"}
        except ProjectNotFoundError as exc:
            return _not_in_this_store(settings, f"the automatic round of project {project!r}", exc)

    @huey.periodic_task(crontab(minute="*"), name="cellspot.auto_check")
    def auto_check_task() -> list[str]:
        """Queue the automatic rounds that are due (:func:`cellspot.workflows.auto_rounds.check_auto_rounds`)."""
        from cellspot.workflows.auto_rounds import check_auto_rounds

        return check_auto_rounds(settings)

    return train_task, predict_task, auto_round_task


def _not_in_this_store(settings: Settings, what: str, exc: LookupError) -> dict[str, Any]:
    """One clear error line (no traceback) for a job naming a run or project this worker's
    database does not have: a worker on the queue of another store."""
    from sqlalchemy.engine import make_url

    store = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    log.error("%s is not in this worker's database %s (%s); the job is dropped. Start the worker with the "
              "app's CELLSPOT_DATABASE_URL", what, store, exc)
    return {"status": "not found", "error": f"{what} is not in the worker's database {store}"}


# --------------------------------------------------------------------------- automatic-round lock


@contextmanager
def round_lock(huey: Huey, project: str) -> Iterator[Callable[[], None]]:
    """Hold the lock of ``project``'s automatic round (one at a time per project, across the
    workers of the queue) while the block runs; :class:`TaskLockedException` when a live worker
    holds it. The lock is a mark (:func:`cellspot.marks.hold_mark`): a key in the queue's
    storage naming its holder, renewed every :data:`cellspot.marks.MARK_BEAT_S`; the lock of a
    killed worker (``kill -9``: no ``finally`` ran) is taken over at once when that worker was
    a process of this host, else once not renewed for :data:`cellspot.marks.MARK_STALE_S`; of
    two workers taking over one lock, one gets it. (huey's own ``lock_task`` has no holder and
    no expiry: a killed worker blocked the project's rounds for good.) The block gets a check
    that raises :class:`cellspot.marks.MarkLostError` once the lock was taken over (this worker
    was paused for longer than the stale time): the round stops before its next step."""
    with ExitStack() as stack:
        try:
            mark = stack.enter_context(hold_mark(huey, json.dumps(["cellspot.auto_round.lock", project])))
        except MarkHeldError as exc:
            holder = exc.holder if isinstance(exc.holder, dict) else {}
            raise TaskLockedException(f"a worker on {holder.get('host')} (pid {holder.get('pid')}) runs it") from None
        yield mark.check


# --------------------------------------------------------------------------- what workers do


@dataclass(frozen=True)
class Busy:
    """A job a worker is running that has no model run of its own to show it: a prediction of
    a project or an automatic round (``task``), since ``since`` (UTC)."""

    task: str
    project: str
    since: datetime
    host: str
    pid: int

    def describe(self) -> str:
        what = {"predict": "a prediction", "auto_round": "an automatic round"}.get(self.task, self.task)
        return f"{what} of project {self.project!r}"


def _busy_dir(settings: Settings) -> Path:
    return Path(settings.home) / "workers"


@contextmanager
def busy(settings: Settings, task: str, project: str) -> Iterator[None]:
    """Mark this worker busy with ``task`` on ``project`` while the block runs (a small file
    under ``CELLSPOT_HOME/workers``, which the workers share with the app as they share the
    models), so the dashboard can tell a busy worker from a missing one."""
    folder = _busy_dir(settings)
    path = folder / f"{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": task, "project": project, "since": datetime.now(timezone.utc).isoformat(),
                                    "host": socket.gethostname(), "pid": os.getpid()}))
    except OSError as exc:  # only a display aid: the job runs anyway
        log.warning("cannot mark the worker busy in %s: %s", folder, exc)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def busy_jobs(settings: Settings, project: str | None = None) -> list[Busy]:
    """What the workers are running now (of ``project``, or all), oldest first. A marker left
    by a worker that was killed is ignored when it was written on this host by a process that
    no longer runs."""
    out = []
    for path in sorted(_busy_dir(settings).glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            job = Busy(str(raw["task"]), str(raw["project"]), datetime.fromisoformat(raw["since"]),
                       str(raw["host"]), int(raw["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written or removed
        if job.host == socket.gethostname() and not pid_alive(job.pid):
            continue
        if project is None or job.project == project:
            out.append(job)
    return sorted(out, key=lambda j: j.since)


def get_queue(settings: Settings) -> JobQueue:
    """The job queue for ``settings`` (one per queue URL, database URL and home)."""
    key = (
        settings.resolved_queue_url, settings.resolved_database_url,
        str(settings.home.resolve()), settings.torch_threads, settings.queue_name,
    )
    with _QUEUES_LOCK:
        queue = _QUEUES.get(key)
        if queue is None:
            huey = make_huey(key[0], name=queue_name(settings))
            train, predict, auto_round = _register_tasks(huey, settings)
            queue = _QUEUES[key] = JobQueue(huey=huey, train=train, predict=predict, settings=settings,
                                            auto_round=auto_round)
            log.debug("job queue %s ready", _safe(key[0]))
    return queue


def get_huey(settings: Settings) -> Huey:
    """The huey instance of :func:`get_queue` (for a consumer or ``huey.immediate``)."""
    return get_queue(settings).huey


def _put(settings: Settings, task: str, *args: Any, **kwargs: Any) -> Result | None:
    """Call ``task`` of the queue; a queue that cannot take it raises :class:`JobQueueError`
    (with ``huey.immediate`` the task runs here, and its own errors pass unchanged)."""
    with _queue_errors(settings) as queue:
        return getattr(queue, task)(*args, **kwargs)


@contextmanager
def _queue_errors(settings: Settings) -> Iterator[JobQueue]:
    """The queue of ``settings``; an error of the queue's storage in the block becomes
    :class:`JobQueueError` (except with ``huey.immediate``, where tasks run in the block)."""
    from redis.exceptions import RedisError

    queue = None
    try:
        queue = get_queue(settings)
        yield queue
    except (OSError, sqlite3.Error, RedisError) as exc:
        if queue is not None and queue.huey.immediate:
            raise
        raise JobQueueError(f"the job queue {_safe(settings.resolved_queue_url)} cannot take the job: "
                            f"{exc}") from exc


def enqueue_training(
    settings: Settings, run_id: int, *, resume: bool | None = None, device: str | None = None
) -> Result | None:
    """Put training run ``run_id`` (already committed) on the queue."""
    result = _put(settings, "train", run_id, resume=resume, device=device)
    log.info("training run %d queued on %s", run_id, _safe(settings.resolved_queue_url))
    return result


def enqueue_prediction(
    settings: Settings, project: str, *, detector: str | None = None, classifier: str | None = None
) -> Result | None:
    """Put a prediction over ``project`` on the queue (model runs by version; default active),
    once: while a prediction of the same project and model pair is queued or running, a second
    one is refused with :class:`PredictionPendingError` (a double click on "Predict project"
    queued two). The mark is a key in the queue's own storage, set atomically before the job is
    queued, marked running by the worker that takes the job and removed when the job ends; a
    mark whose job is neither waiting in the queue nor running in a live worker (a worker
    killed mid-job, on this host or another) does not count (:func:`_prediction_alive`) and is
    taken over (:func:`cellspot.marks.take_mark`: of two callers at once, one queues the job)."""
    key = _prediction_key(project, detector, classifier)
    with _queue_errors(settings) as queue:
        task = queue.predict.s(project, detector=detector, classifier=classifier)
        mark = {"state": "queued", "task_id": task.id, "since": datetime.now(timezone.utc).isoformat()}
        found = take_mark(queue.huey, key, mark, alive=lambda pending: _prediction_alive(queue.huey, pending))
        if found is not None:
            raise PredictionPendingError(project, detector, classifier, found if isinstance(found, dict) else {})
        try:
            return queue.huey.enqueue(task)
        except BaseException:
            if not queue.huey.immediate:  # not queued: forget the mark (immediate: the task did)
                _forget_prediction(queue.huey, key, mark)
            raise


#: a prediction mark this young counts even before its job shows in the queue (see :func:`_prediction_alive`)
QUEUEING_S = 60.0


class PredictionPendingError(RuntimeError):
    """A prediction of the project with the same model pair is already queued or running
    (:func:`enqueue_prediction`); ``state`` is "queued" or "running", ``since`` when (UTC)."""

    def __init__(self, project: str, detector: str | None, classifier: str | None, mark: dict[str, Any]) -> None:
        self.project, self.detector, self.classifier = project, detector, classifier
        self.state = str(mark.get("state") or "queued")
        from cellspot.store.models import parse_utc

        self.since = parse_utc(mark.get("since"))
        pair = (f"{detector or 'the active detector'} and {classifier or 'the active classifier'}")
        super().__init__(f"a prediction of project {project!r} with {pair} is already {self.state}; it was not "
                         "queued again")


def _prediction_key(project: str, detector: str | None, classifier: str | None) -> str:
    """The queue-storage key that marks a prediction of ``project`` with this model pair as pending."""
    return json.dumps(["cellspot.predict.pending", project, detector, classifier])


def _prediction_alive(huey: Huey, mark: Any) -> bool:
    """Whether the job of a prediction ``mark`` still waits in the queue or runs in a worker. A
    "running" mark counts while its holder lives (:func:`cellspot.marks.holder_alive`: not once it was a process
    of this host that no longer runs, nor once not renewed for :data:`cellspot.marks.MARK_STALE_S`, whichever
    host wrote it). A "queued" one counts while its job waits in the queue, and whatever the
    queue holds while younger than :data:`QUEUEING_S` (its caller may not have put the job on
    the queue yet)."""
    if not isinstance(mark, dict):
        return False
    if mark.get("state") == "running":
        return holder_alive(mark)
    from cellspot.store.models import parse_utc

    since = parse_utc(mark.get("since"))
    if since is not None and (datetime.now(timezone.utc) - since).total_seconds() < QUEUEING_S:
        return True
    return any(getattr(task, "id", None) == mark.get("task_id") for task in huey.pending())


def _running_mark_alive(mark: Any) -> bool:
    """For the worker that starts a prediction: a "queued" mark is its job's (or a job's that
    waits behind it), a "running" one counts while its holder lives."""
    return isinstance(mark, dict) and mark.get("state") == "running" and holder_alive(mark)


@contextmanager
def _running_prediction(huey: Huey, key: str) -> Iterator[None]:
    """Mark the prediction at ``key`` running in this worker while the block runs, in place of
    its "queued" mark: a mark with a holder and a heartbeat (:func:`cellspot.marks.hold_mark`), removed at the
    end. A mark and de-duplication aid only: the job runs without it when another live worker
    runs the same prediction or the queue's storage fails."""
    with ExitStack() as stack:
        try:
            stack.enter_context(hold_mark(huey, key, {"state": "running",
                                                      "since": datetime.now(timezone.utc).isoformat()},
                                          alive=_running_mark_alive))
        except MarkHeldError as exc:
            log.info("the same prediction is run by %s; this one runs too, unmarked", describe_holder(exc.holder))
        except Exception as exc:  # noqa: BLE001 - the job runs anyway
            log.warning("cannot mark the prediction running: %s", exc)
        yield


def _forget_prediction(huey: Huey, key: str, mark: dict[str, Any]) -> None:
    """Remove the prediction ``mark`` at ``key`` if it is still there."""
    try:
        swap_mark(huey, key, mark, None)
    except Exception as exc:  # noqa: BLE001 - the caller's own error matters more
        log.warning("cannot clear the prediction mark: %s", exc)


def enqueue_auto_round(settings: Settings, project: str, queued_at: str | None = None) -> Result | None:
    """Put an automatic round of ``project`` on the queue (:mod:`cellspot.workflows.auto_rounds`);
    ``queued_at``: the project's pending mark for it (the job does nothing once that is cleared)."""
    result = _put(settings, "auto_round", project, queued_at)
    log.info("automatic round of %r queued on %s", project, _safe(settings.resolved_queue_url))
    return result


#: set when the worker of this process is asked to stop: its trainings save ``resume.pt`` and
#: stop at their next step (:func:`cellspot.workflows.models.run_training`), as on a cancel
STOPPING = threading.Event()


class GracefulConsumer(Consumer):
    """huey's consumer, with SIGTERM (a service manager's stop, ``kill``) as gentle as SIGINT:
    the running trainings checkpoint and end as cancelled, then the process exits. (huey stops
    at once on SIGTERM; killed mid-step, torch aborted and the run was lost.) A second signal
    still stops at once."""

    def _handle_signal(self, signum: int, frame: Any) -> None:
        STOPPING.set()
        if signum == signal.SIGTERM and self._signal_actions.get(signum) == (False, False):
            signum = signal.SIGINT  # the graceful action
        super()._handle_signal(signum, frame)


def run_worker(settings: Settings, *, workers: int = 1, **consumer_options: Any) -> None:
    """Run the huey consumer for ``settings`` in this process until SIGINT / SIGTERM (either
    one lets running trainings save a checkpoint and stop; a second one stops at once)."""
    if workers < 1:
        raise JobQueueError(f"workers must be >= 1, got {workers}")
    huey = _answering_huey(settings)
    _warn_of_jobs_under_the_old_name(settings, huey)
    throttle_queue_errors()
    options = {"periodic": True, **consumer_options}  # cellspot.auto_check, once a minute
    STOPPING.clear()
    consumer = GracefulConsumer(huey, workers=workers, worker_type="thread", **options)
    log.info("worker on %s (queue %s) with %d thread(s)", _safe(settings.resolved_queue_url), huey.name, workers)
    consumer.run()


def _warn_of_jobs_under_the_old_name(settings: Settings, huey: Huey) -> None:
    """Say so when jobs wait under :data:`QUEUE_NAME` alone, where versions before
    :func:`queue_name` queued them: this worker does not take them."""
    if huey.name == QUEUE_NAME:
        return
    try:
        waiting = make_huey(settings.resolved_queue_url, name=QUEUE_NAME).pending_count()
    except Exception as exc:  # noqa: BLE001 - only a hint
        log.debug("cannot count the jobs under the old queue name: %s", exc)
        return
    if waiting:
        log.warning("%d job(s) wait on queue %r, where cellspot queued them before queue names followed the "
                    "database; this worker (queue %r) does not take them: run one worker with "
                    "CELLSPOT_QUEUE_NAME=%s until they are done, or queue them again", waiting, QUEUE_NAME,
                    huey.name, QUEUE_NAME)


#: the loggers of the huey consumer's worker and scheduler loops (huey 3.5: ``huey.consumer.<process_name>``)
CONSUMER_LOGGERS = ("huey.consumer.Worker", "huey.consumer.Scheduler")
#: the messages with which those loops log an error of the queue's storage (and go on looping):
#: only these are throttled, never a task's own failure ("Unhandled exception in task ...")
CONSUMER_LOOP_ERRORS = ("Error reading from queue", "Error reading schedule.", "Error enqueueing ")
#: of those errors, one traceback passes per this many seconds
QUEUE_ERROR_EVERY_S = 60.0


class QueueErrorThrottle(logging.Filter):
    """Lets one record of the consumer's loops failing on the queue's storage (one of
    :data:`CONSUMER_LOOP_ERRORS` carrying a connection error of Redis, an error of a SQLite queue
    file gone) through per ``every`` seconds, and says on the next one how many were held back;
    other records pass, a task's errors included (huey logs those on other messages). Redis
    going away made the consumer's worker and scheduler log a traceback each loop: thousands of
    lines a minute."""

    def __init__(self, every: float = QUEUE_ERROR_EVERY_S, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.every, self.clock = every, clock
        self._last: float | None = None
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        from redis.exceptions import RedisError

        if record.name not in CONSUMER_LOGGERS or not str(record.msg).startswith(CONSUMER_LOOP_ERRORS):
            return True
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, (OSError, sqlite3.Error, RedisError)):
            return True
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.every:
                self._held += 1
                return False
            self._last, held, self._held = now, self._held, 0
        if held:
            record.msg = f"{record.msg} ({held} more like it since the last one not logged)"
        return True


def throttle_queue_errors() -> QueueErrorThrottle:
    """Put one :class:`QueueErrorThrottle` on the huey consumer's loggers (once per process)."""
    for name in CONSUMER_LOGGERS:
        for existing in logging.getLogger(name).filters:
            if isinstance(existing, QueueErrorThrottle):
                return existing
    throttle = QueueErrorThrottle()
    for name in CONSUMER_LOGGERS:
        logging.getLogger(name).addFilter(throttle)
    return throttle


def _answering_huey(settings: Settings) -> Huey:
    """The queue of ``settings``, asked once that it answers; :class:`JobQueueError` when it does
    not (Redis down, a SQLite queue file that cannot be opened or is no database): the consumer
    would otherwise log the error with a traceback many times a second and never stop."""
    from redis.exceptions import RedisError

    try:
        huey = get_huey(settings)
        huey.pending_count()
    except (OSError, sqlite3.Error, RedisError) as exc:
        raise JobQueueError(f"the job queue {_safe(settings.resolved_queue_url)} does not answer: {exc}") from exc
    return huey


def _safe(url: str) -> str:
    """``url`` without a password (redis://:secret@host -> redis://:***@host)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"

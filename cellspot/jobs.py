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

import json
import logging
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huey import Huey, RedisHuey, SqliteHuey, crontab
from huey.api import Result, TaskWrapper
from huey.consumer import Consumer
from huey.exceptions import TaskLockedException

if TYPE_CHECKING:
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

QUEUE_NAME = "cellspot"
SQLITE_PREFIX = "sqlite:///"
REDIS_PREFIXES = ("redis://", "rediss://", "unix://")

_QUEUES: dict[tuple[str, str, str, int | None], JobQueue] = {}
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

    ``name`` (default :data:`QUEUE_NAME`) separates queues that share one Redis database.
    """
    name = name or QUEUE_NAME
    if url.startswith(SQLITE_PREFIX):
        path = Path(url[len(SQLITE_PREFIX):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path))
    if url.startswith(REDIS_PREFIXES):
        return RedisHuey(name, url=url)
    raise JobQueueError(
        f"unsupported queue URL {url!r}; use sqlite:///path/to/queue.db or redis://host:6379/0 "
        "(CELLSPOT_QUEUE_URL; unset = SQLite file in CELLSPOT_HOME)"
    )


def _register_tasks(huey: Huey, settings: Settings) -> tuple[TaskWrapper, TaskWrapper, TaskWrapper]:
    @huey.task(name="cellspot.train")
    def train_task(run_id: int, resume: bool | None = None, device: str | None = None) -> dict[str, Any]:
        """Train model run ``run_id`` (see :func:`cellspot.workflows.models.run_training`)."""
        from cellspot.workflows.models import run_training

        run = run_training(settings, run_id, resume=resume, device=device)
        return {"run_id": run.id, "version": run.version, "status": run.status, "error": run.error}

    @huey.task(name="cellspot.predict")
    def predict_task(project: str, detector: str | None = None, classifier: str | None = None) -> dict[str, Any]:
        """Predict every image of ``project`` and store the cells; ``detector`` / ``classifier``
        are run versions or ids (default: the project's active runs)."""
        from cellspot.ml.project_predictions import predict_project
        from cellspot.ml.registry import get_run
        from cellspot.store.db import make_engine, transaction
        from cellspot.store.queries import get_project

        engine = make_engine(settings=settings)
        try:
            with busy(settings, "predict", project), transaction(engine) as session:
                report = predict_project(
                    session, settings, get_project(session, project),
                    detector_run=get_run(session, detector) if detector else None,
                    classifier_run=get_run(session, classifier) if classifier else None,
                )
        finally:
            engine.dispose()
        summary = {key: getattr(report, key, None) for key in
                   ("project", "detector_version", "classifier_version", "images", "cells", "alive", "dead",
                    "seconds")}
        log.info("predictions stored: %s", summary)
        return summary

    @huey.task(name="cellspot.auto_round")
    def auto_round_task(project: str, queued_at: str | None = None) -> dict[str, Any]:
        """Retrain, predict and open the next round of ``project`` (one at a time per project;
        see :func:`cellspot.workflows.auto_rounds.run_auto_round`; a round forgotten since
        ``queued_at`` does nothing)."""
        from cellspot.workflows.auto_rounds import run_auto_round

        try:
            with huey.lock_task(f"auto-round-{project}"), busy(settings, "auto_round", project):
                return run_auto_round(settings, project, queued_at=queued_at).as_dict()
        except TaskLockedException:
            log.warning("automatic round of %r already running; this one is dropped", project)
            return {"project": project, "status": "skipped", "message": "already running"}

    @huey.periodic_task(crontab(minute="*"), name="cellspot.auto_check")
    def auto_check_task() -> list[str]:
        """Queue the automatic rounds that are due (:func:`cellspot.workflows.auto_rounds.check_auto_rounds`)."""
        from cellspot.workflows.auto_rounds import check_auto_rounds

        return check_auto_rounds(settings)

    return train_task, predict_task, auto_round_task


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
        if job.host == socket.gethostname() and not _alive(job.pid):
            continue
        if project is None or job.project == project:
            out.append(job)
    return sorted(out, key=lambda j: j.since)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def get_queue(settings: Settings) -> JobQueue:
    """The job queue for ``settings`` (one per queue URL, database URL and home)."""
    key = (
        settings.resolved_queue_url, settings.resolved_database_url,
        str(settings.home.resolve()), settings.torch_threads,
    )
    with _QUEUES_LOCK:
        queue = _QUEUES.get(key)
        if queue is None:
            huey = make_huey(key[0])
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
    from redis.exceptions import RedisError

    queue = None
    try:
        queue = get_queue(settings)
        return getattr(queue, task)(*args, **kwargs)
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
    """Put a prediction over ``project`` on the queue (model runs by version; default active)."""
    return _put(settings, "predict", project, detector=detector, classifier=classifier)


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
    options = {"periodic": True, **consumer_options}  # cellspot.auto_check, once a minute
    STOPPING.clear()
    consumer = GracefulConsumer(huey, workers=workers, worker_type="thread", **options)
    log.info("worker on %s with %d thread(s)", _safe(settings.resolved_queue_url), workers)
    consumer.run()


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

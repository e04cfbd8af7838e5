"""The huey job queue: queue URLs, immediate mode with progress and cancel, a real SQLite queue
round trip with a consumer thread, and the same on Redis (skipped when no server answers)."""

from __future__ import annotations

import signal
import socket
import uuid

import pytest
from huey import RedisHuey, SqliteHuey

from cellspot import jobs
from cellspot.settings import Settings
from cellspot.store.db import make_engine, transaction
from cellspot.store.queries import get_project
from cellspot.workflows import models as wf
from fake_trainer import FakeFit, install, load_run, request_cancel, seed_project

def _queued_run(settings, **kwargs) -> int:
    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            return wf.start_training(session, settings, get_project(session, "demo"), "classifier", **kwargs).id
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [("sqlite:///{home}/q/queue.db", SqliteHuey), ("redis://127.0.0.1:6379/15", RedisHuey),
     ("amqp://localhost", "unsupported queue URL 'amqp://localhost'; use sqlite:///")],
)
def test_make_huey_by_url(tmp_path, url, expected) -> None:
    url = url.format(home=tmp_path)
    if isinstance(expected, str):
        with pytest.raises(jobs.JobQueueError, match=expected):
            jobs.make_huey(url)
        return
    huey = jobs.make_huey(url)
    assert isinstance(huey, expected) and huey.name == jobs.QUEUE_NAME
    if expected is SqliteHuey:
        assert (tmp_path / "q").is_dir()


def test_queue_is_cached_per_store_and_defaults_to_sqlite_in_home(settings, tmp_path) -> None:
    queue = jobs.get_queue(settings)
    assert jobs.get_queue(Settings(home=settings.home, database_url=settings.database_url)) is queue
    assert isinstance(queue.huey, SqliteHuey)
    assert settings.resolved_queue_url == f"sqlite:///{(settings.home / 'queue.db').resolve()}"
    other = Settings(home=tmp_path / "other", database_url=settings.database_url)
    assert jobs.get_queue(other) is not queue
    assert jobs._safe("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"


@pytest.fixture
def immediate(settings):
    huey = jobs.get_huey(settings)
    huey.immediate = True
    yield jobs.get_queue(settings)
    huey.immediate = False


def test_job_reports_progress_and_can_be_cancelled_then_resumed(settings, immediate, monkeypatch) -> None:
    seed_project(settings)
    run_id = _queued_run(settings, epochs=3)
    progress_seen: list[int] = []

    def dashboard(epoch: int, step: int) -> None:
        progress_seen.append(load_run(settings, run_id).progress.get("step", 0))
        if (epoch, step) == (2, 1):
            request_cancel(settings, run_id)

    fit = install(monkeypatch, FakeFit(hook=dashboard))
    result = immediate.train(run_id)
    assert result.get() == {"run_id": run_id, "version": "classifier-0001", "status": "cancelled",
                            "error": "cancelled on request; resume to go on"}
    assert progress_seen[:4] == [0, 1, 2, 3]  # each step's progress was in the store before the next
    run = load_run(settings, run_id)
    assert run.status == "cancelled" and [r["epoch"] for r in run.curves] == [1]

    fit.hook = None
    assert wf.queue_resume(settings, "classifier-0001").status == "queued"  # commits, then enqueues
    run = load_run(settings, run_id)
    assert run.status == "done" and run.is_active and [r["epoch"] for r in run.curves] == [1, 2, 3]
    assert [c["start_epoch"] for c in fit.calls] == [1, 2]


def test_a_stopping_worker_lets_its_training_checkpoint_and_end_cancelled(settings, immediate, monkeypatch) -> None:
    """SIGTERM / SIGINT to `cellspot worker` (a service stop, `kill`) sets jobs.STOPPING; the
    training saves resume.pt at its next step instead of dying mid-step with nothing saved."""
    from cellspot.ml.common import RESUME_FILE
    from cellspot.ml.registry import model_dir

    seed_project(settings)
    run_id = _queued_run(settings, epochs=3)
    fit = install(monkeypatch, FakeFit(hook=lambda e, s: jobs.STOPPING.set() if (e, s) == (2, 1) else None))
    try:
        assert immediate.train(run_id).get()["error"] == "its worker was stopped; resume to go on"
    finally:
        jobs.STOPPING.clear()
    run = load_run(settings, run_id)
    assert run.status == "cancelled" and (model_dir(settings, run) / RESUME_FILE).is_file()
    fit.hook = None
    wf.queue_resume(settings, run.version)
    assert load_run(settings, run_id).status == "done"


def test_the_worker_treats_sigterm_like_sigint(settings) -> None:
    consumer = jobs.GracefulConsumer(jobs.get_huey(settings), workers=1, worker_type="thread")
    try:
        consumer._handle_signal(signal.SIGTERM, None)
        assert jobs.STOPPING.is_set() and consumer._graceful and not consumer._restart
    finally:
        jobs.STOPPING.clear()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_queue_training_creates_and_runs_the_job(settings, immediate, monkeypatch) -> None:
    seed_project(settings)
    fit = install(monkeypatch)
    run = wf.queue_training(settings, "demo", "detector", preset="quality", epochs=1, device="cpu")
    assert run.version == "detector-0001"
    assert load_run(settings, run.id).status == "done" and fit.calls[0]["device"] == "cpu"


def test_a_queue_that_does_not_answer_is_a_queue_error_and_leaves_no_queued_run(settings) -> None:
    seed_project(settings)
    down = settings.model_copy(update={"queue_url": "redis://127.0.0.1:1/0"})  # nothing listens on port 1
    with pytest.raises(jobs.JobQueueError, match=r"the job queue redis://127\.0\.0\.1:1/0 cannot take the job"):
        wf.queue_training(down, "demo", "classifier")
    run = load_run(settings, "classifier-0001")
    assert run.status == "failed" and run.error.startswith("could not be queued: ") and run.finished_at
    with pytest.raises(jobs.JobQueueError, match="cannot take the job"):
        jobs.enqueue_prediction(down, "demo")


def _round_trip(settings, monkeypatch) -> None:
    """Enqueue on a real queue, run a consumer thread until the job is done, stop it."""
    seed_project(settings)
    install(monkeypatch)
    queue = jobs.get_queue(settings)
    queue.huey.flush()
    run_id = _queued_run(settings, epochs=2)
    result = queue.train(run_id)
    assert queue.huey.pending_count() == 1 and load_run(settings, run_id).status == "queued"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    consumer = queue.huey.create_consumer(workers=1, periodic=False, initial_delay=0.05, max_delay=0.2,
                                          check_worker_health=False)
    consumer.start()
    try:
        out = result.get(blocking=True, timeout=30)
    finally:
        consumer.stop(graceful=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert out["status"] == "done"
    run = load_run(settings, run_id)
    assert run.status == "done" and [r["epoch"] for r in run.curves] == [1, 2]
    assert queue.huey.pending_count() == 0


def test_sqlite_queue_round_trip_with_consumer_thread(settings, monkeypatch) -> None:
    _round_trip(settings, monkeypatch)
    assert (settings.home / "queue.db").is_file()


def test_redis_queue_round_trip_with_consumer_thread(settings, monkeypatch, redis_url) -> None:
    # a unique queue name keeps parallel runs on the tests' Redis database apart
    monkeypatch.setattr(jobs, "QUEUE_NAME", f"cellspot-test-{uuid.uuid4().hex[:8]}")
    redis_settings = settings.model_copy(update={"queue_url": redis_url})
    try:
        _round_trip(redis_settings, monkeypatch)
    finally:
        jobs.get_huey(redis_settings).flush()


def test_predict_task_resolves_runs_by_version_and_commits(settings, immediate, monkeypatch, caplog) -> None:
    import logging
    from types import SimpleNamespace

    from cellspot.ml.predict import ImageError

    import cellspot.ml.project_predictions
    from cellspot.ml import registry
    from cellspot.store.models import Project

    seed_project(settings)
    run_id = _queued_run(settings)
    calls = []

    def fake_predict(session, settings_, project, *, detector_run=None, classifier_run=None, progress=None):
        calls.append((project.name, detector_run, classifier_run.version))
        project.description = "predicted"  # a write the task must commit
        missing = ImageError("gone.png", "/nowhere/gone.png", "the file is missing")
        return SimpleNamespace(project=project.name, detector_version="d", classifier_version=classifier_run.version,
                               images=2, cells=5, alive=4, dead=1, seconds=0.1, errors=[missing])

    monkeypatch.setattr(cellspot.ml.project_predictions, "predict_project", fake_predict)
    with caplog.at_level(logging.WARNING, logger="cellspot.jobs"):
        out = jobs.enqueue_prediction(settings, "demo", classifier="classifier-0001").get()
    assert calls == [("demo", None, "classifier-0001")]
    assert out == {"project": "demo", "detector_version": "d", "classifier_version": "classifier-0001",
                   "images": 2, "cells": 5, "alive": 4, "dead": 1, "seconds": 0.1,
                   "not_predicted": [{"image": "gone.png", "error": "the file is missing"}]}
    assert "image gone.png was not predicted: the file is missing" in caplog.text  # nothing reads the result
    engine = make_engine(settings=settings)
    with transaction(engine) as session:
        assert session.get(Project, 1).description == "predicted"
        assert registry.get_run(session, run_id).status == "queued"
    engine.dispose()


def test_busy_marks_what_a_worker_runs_and_ignores_markers_of_dead_workers(settings) -> None:
    import json
    import subprocess
    import sys

    assert jobs.busy_jobs(settings) == []
    with jobs.busy(settings, "predict", "demo"):
        [job] = jobs.busy_jobs(settings)
        assert (job.task, job.project, job.describe()) == ("predict", "demo", "a prediction of project 'demo'")
        assert jobs.busy_jobs(settings, "other") == []
        # a worker killed mid-job leaves its marker behind: its process is gone, so it does not count
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        (settings.home / "workers" / "stale.json").write_text(json.dumps(
            {"task": "auto_round", "project": "demo", "since": job.since.isoformat(), "host": socket.gethostname(),
             "pid": int(dead)}))
        assert [j.task for j in jobs.busy_jobs(settings)] == ["predict"]
    assert jobs.busy_jobs(settings) == []  # the marker goes with the job

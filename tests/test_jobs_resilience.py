"""The job queue when things go wrong: a worker killed mid-round, a job from another store, Redis
going away, results piling up. Redis tests use database 13 (only keys of their own queue names are
removed) and skip when no server answers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from cellspot import jobs
from cellspot.settings import Settings
from cellspot.store.db import make_engine, transaction
from cellspot.workflows import auto_rounds as ar
from fake_trainer import seed_project

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


def _redis_skip_reason() -> str | None:
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return f"{REDIS_HOST}:{REDIS_PORT} answers, but not like Redis"
    except OSError as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} does not answer: {exc}"
    return None


@pytest.fixture(params=["sqlite", "redis"])
def queue_settings(request, settings, monkeypatch):
    """``settings`` on the SQLite queue in its home, or on Redis database 13 (a queue name of its own)."""
    if request.param == "sqlite":
        yield settings
        return
    reason = _redis_skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"cellspot-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CELLSPOT_QUEUE_URL", REDIS_URL)
    monkeypatch.setenv("CELLSPOT_QUEUE_NAME", name)
    redis_settings = settings.model_copy(update={"queue_url": REDIS_URL, "queue_name": name})
    try:
        yield redis_settings
    finally:
        jobs.get_huey(redis_settings).flush()


# --------------------------------------------------------------------------- 1: a worker killed mid-round

#: a worker's automatic round that runs until the process is killed
KILLED_WORKER = """
import sys, time
import cellspot.workflows.auto_rounds as ar
from cellspot import jobs
from cellspot.settings import get_settings

def forever(*args, **kwargs):
    print("started", flush=True)
    time.sleep(600)

ar.run_auto_round = forever
jobs.get_queue(get_settings()).auto_round.call_local("demo")
"""


def test_a_worker_killed_mid_round_does_not_block_the_next_round(queue_settings, monkeypatch) -> None:
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER], stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout.readline().strip() == "started"
    finally:
        os.kill(worker.pid, signal.SIGKILL)  # kill -9: no finally, no lock release
        worker.wait(timeout=30)
    ran = []
    monkeypatch.setattr(ar, "run_auto_round", lambda settings, project, **kw: ran.append(project) or
                        ar.AutoReport(project))
    out = jobs.get_queue(queue_settings).auto_round.call_local("demo")
    assert ran == ["demo"] and out["status"] == "done"


def _holder(**changes) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "beat": time.time(), **changes}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.parametrize(
    ("case", "holder", "alive"),
    [
        ("another host, renewed now", lambda: _holder(host="gpu-box-7"), True),
        ("another host, not renewed for long", lambda: _holder(host="gpu-box-7", beat=time.time() - 3600), False),
        ("this host, a process that no longer runs", lambda: _holder(pid=_dead_pid()), False),
        ("this process (pid reused after a restart), not holding it", lambda: _holder(token="gone"), False),
        ("garbage", lambda: "1", False),
    ],
)
def test_who_holds_a_round_lock(case, holder, alive) -> None:
    assert jobs._lock_holder_alive(holder()) is alive, case


def test_a_live_round_is_respected_and_the_dropped_job_clears_its_pending_mark(settings, monkeypatch) -> None:
    seed_project(settings)
    monkeypatch.setattr("cellspot.jobs.enqueue_auto_round", lambda *a, **k: None)
    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            assert ar.maybe_auto_retrain(session, settings, "demo", force=True).queued
            queued_at = ar._state(session.merge(ar.as_project(session, "demo")))["pending_since"]
        queue = jobs.get_queue(settings)
        with jobs.round_lock(queue.huey, "demo"):  # a round of this project runs in this worker
            out = queue.auto_round.call_local("demo", queued_at)
            assert out["status"] == "skipped" and "already running" in out["message"]
            with pytest.raises(jobs.TaskLockedException):
                with jobs.round_lock(queue.huey, "demo"):
                    pass
        with transaction(engine) as session:
            assert ar.auto_status(session, "demo").pending_since is None  # a later check may queue it
        with jobs.round_lock(queue.huey, "demo"):  # released
            pass
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- 2: a job of another store


def test_a_job_naming_a_run_or_project_not_in_this_store_is_one_error_line(settings, caplog) -> None:
    seed_project(settings)
    huey = jobs.get_huey(settings)
    huey.immediate = True
    try:
        queue = jobs.get_queue(settings)
        with caplog.at_level(logging.INFO, logger="cellspot.jobs"):
            train = queue.train(9999).get()
            predict = queue.predict("elsewhere").get()
    finally:
        huey.immediate = False
    assert train["status"] == predict["status"] == "not found"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info for r in errors] == [None, None]
    assert errors[0].getMessage().startswith(f"training run 9999 is not in this worker's database sqlite:///")
    assert "the prediction of project 'elsewhere' is not in this worker's database" in errors[1].getMessage()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("postgresql+psycopg://ann:s3cret@DB.lab:5432/cells", "postgresql://ann@db.lab/cells", True),
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://ann@db.lab/other", False),
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://ann@db2.lab/cells", False),
        ("sqlite:///{tmp}/a.db", "sqlite:///{tmp}/./a.db", True),
        ("sqlite:///{tmp}/a.db", "sqlite:///{tmp}/b.db", False),
    ],
)
def test_the_queue_name_follows_the_store(tmp_path, a, b, same) -> None:
    names = [jobs.queue_name(Settings(home=tmp_path, database_url=url.format(tmp=tmp_path))) for url in (a, b)]
    assert (names[0] == names[1]) is same and all(n.startswith("cellspot-") and len(n) == 19 for n in names)
    assert jobs.queue_name(Settings(home=tmp_path, database_url=a, queue_name="cellspot")) == "cellspot"


def test_two_stores_on_one_redis_database_keep_their_jobs_apart(settings, tmp_path) -> None:
    reason = _redis_skip_reason()
    if reason:
        pytest.skip(reason)
    first = settings.model_copy(update={"queue_url": REDIS_URL})
    second = Settings(home=tmp_path / "second", database_url=f"sqlite:///{tmp_path / 'second.db'}",
                      queue_url=REDIS_URL)
    try:
        jobs.get_queue(first).train(1)
        assert jobs.get_huey(first).pending_count() == 1
        assert jobs.get_huey(second).pending_count() == 0
    finally:
        jobs.get_huey(first).flush()
        jobs.get_huey(second).flush()


# --------------------------------------------------------------------------- 4: Redis going away


@pytest.fixture
def throttle():
    throttle = jobs.throttle_queue_errors()
    yield throttle
    for name in jobs.CONSUMER_LOGGERS:
        logging.getLogger(name).removeFilter(throttle)


def test_queue_errors_of_the_consumer_are_logged_once_a_minute_with_a_count(throttle, caplog) -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    now = [1000.0]
    throttle.clock = lambda: now[0]
    scheduler, worker = logging.getLogger("huey.consumer.Scheduler"), logging.getLogger("huey.consumer.Worker")
    assert jobs.throttle_queue_errors() is throttle  # once per process
    with caplog.at_level(logging.INFO, logger="huey"):
        for second in range(120):
            now[0] = 1000.0 + second / 2  # a minute, two errors a second from each loop
            for logger, what in ((scheduler, "Error reading schedule."), (worker, "Error reading from queue")):
                try:
                    raise RedisConnectionError("Connection refused")
                except RedisConnectionError:
                    logger.exception(what)
        now[0] = 1061.0
        try:
            raise RedisConnectionError("Connection refused")
        except RedisConnectionError:
            scheduler.exception("Error reading schedule.")
        worker.info("Executing task")  # not an error of the queue: passes
        try:
            raise ValueError("a task's own bug")
        except ValueError:
            worker.exception("Unhandled error during execution of task")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Error reading schedule.", "Error reading schedule. (239 more like it since the last one "
                        "not logged)", "Executing task", "Unhandled error during execution of task"]


# --------------------------------------------------------------------------- 5: results expire


def test_task_results_in_redis_expire(monkeypatch) -> None:
    reason = _redis_skip_reason()
    if reason:
        pytest.skip(reason)
    huey = jobs.make_huey(REDIS_URL, name=f"cellspot-test-{uuid.uuid4().hex[:8]}")
    try:
        huey.put_result("some-task-id", {"status": "done"})
        ttl = huey.storage.conn.ttl(huey.storage.result_prefix + b"some-task-id")
        assert 0 < ttl <= jobs.RESULT_TTL_S  # used to be a field of a hash that never expired
    finally:
        huey.flush()

"""The job queue when things go wrong: a worker killed mid-round, a job from another store, Redis
going away, results piling up. Redis tests use database 13 (only keys of their own queue names are
removed) and skip when no server answers."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from cellspot import jobs, marks
from cellspot.settings import Settings
from cellspot.store.db import make_engine, transaction
from cellspot.workflows import auto_rounds as ar
from fake_trainer import seed_project

@pytest.fixture(params=["sqlite", "redis"])
def queue_settings(request, settings, monkeypatch):
    """``settings`` on the SQLite queue in its home, or on the tests' Redis database (a queue name
    of its own)."""
    if request.param == "sqlite":
        yield settings
        return
    redis_url = request.getfixturevalue("redis_url")
    name = f"cellspot-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CELLSPOT_QUEUE_URL", redis_url)
    monkeypatch.setenv("CELLSPOT_QUEUE_NAME", name)
    redis_settings = settings.model_copy(update={"queue_url": redis_url, "queue_name": name})
    try:
        yield redis_settings
    finally:
        jobs.get_huey(redis_settings).flush()


# --------------------------------------------------------------------------- 1: a worker killed mid-round

#: a worker's automatic round that runs until the process is killed
KILLED_WORKER = """
import sys, time
import cellspot.workflows.auto_rounds as ar
from cellspot import jobs, marks
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
        ("a mark with no holder", lambda: {"state": "running", "since": "2020-01-01T00:00:00+00:00"}, False),
        ("garbage", lambda: "1", False),
    ],
)
def test_who_holds_a_mark(case, holder, alive) -> None:
    assert marks.holder_alive(holder()) is alive, case


ROUND_LOCK = json.dumps(["cellspot.auto_round.lock", "demo"])


def _claim_key(key: str, value) -> str:
    """Where :func:`marks.swap_mark` claims ``value`` at ``key`` while it replaces it."""
    return f"{key}.takeover.{marks._fingerprint(value)}"


@pytest.mark.parametrize("slow", ["get", "put_if_empty", "put", "delete"])
def test_two_workers_taking_over_a_stale_round_lock_one_holds_it(queue_settings, monkeypatch, slow) -> None:
    """Both read the lock of a worker gone for an hour, then both take it over, worker B slowed at
    one storage call: one runs the round. (It was get, check, delete, put: B deleted the lock A
    had just put and both ran it.)"""
    huey = jobs.get_huey(queue_settings)
    stale = _holder(host="gpu-box-7", token="dead", beat=time.time() - 3600)
    huey.put(ROUND_LOCK, stale)
    both_read, both_tried = threading.Barrier(2), threading.Barrier(2)
    real = {op: getattr(huey, op) for op in ("get", "put_if_empty", "put", "delete")}
    first_read: set[str] = set()

    def wrapped(op):
        def call(key, *args, **kwargs):
            me = threading.current_thread().name
            if op == slow and me == "B":
                time.sleep(0.05)
            value = real[op](key, *args, **kwargs)
            if op == "get" and key == ROUND_LOCK and me not in first_read:
                first_read.add(me)
                both_read.wait(timeout=10)  # both saw the stale lock before either took it
            return value
        return call

    for op in real:
        monkeypatch.setattr(huey, op, wrapped(op))
    outcomes: dict[str, str] = {}

    def worker() -> None:
        me = threading.current_thread().name
        try:
            with jobs.round_lock(huey, "demo"):
                outcomes[me] = "held"
                both_tried.wait(timeout=10)  # hold it until the other one is in or out
        except jobs.TaskLockedException:
            outcomes[me] = "refused"
            both_tried.wait(timeout=10)

    threads = [threading.Thread(target=worker, name=name) for name in "AB"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(outcomes.values()) == ["held", "refused"], outcomes
    monkeypatch.undo()
    assert huey.get(ROUND_LOCK, peek=True) is None  # released
    assert huey.get(_claim_key(ROUND_LOCK, stale), peek=True) is None  # no takeover claim left behind


def test_a_taker_killed_mid_takeover_does_not_block_the_lock(queue_settings) -> None:
    """Its claim on the stale lock stays behind; a dead claim is taken over in turn."""
    huey = jobs.get_huey(queue_settings)
    stale = _holder(host="gpu-box-7", token="dead", beat=time.time() - 3600)
    dead_claim = _holder(pid=_dead_pid(), token="killed mid-takeover")
    huey.put(ROUND_LOCK, stale)
    huey.put(_claim_key(ROUND_LOCK, stale), dead_claim)
    with jobs.round_lock(huey, "demo"):
        assert huey.get(ROUND_LOCK, peek=True)["pid"] == os.getpid()
    for key in (ROUND_LOCK, _claim_key(ROUND_LOCK, stale), _claim_key(_claim_key(ROUND_LOCK, stale), dead_claim)):
        assert huey.get(key, peek=True) is None, key


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_held_mark_is_renewed_until_someone_takes_it_over(queue_settings, monkeypatch) -> None:
    monkeypatch.setattr(marks, "MARK_BEAT_S", 0.02)
    huey = jobs.get_huey(queue_settings)
    key = "test.mark"
    with marks.hold_mark(huey, key, {"state": "running"}) as mark:
        first = huey.get(key, peek=True)
        assert first["state"] == "running" and first["pid"] == os.getpid()
        _wait_for(lambda: huey.get(key, peek=True)["beat"] > first["beat"])
        assert huey.get(key, peek=True)["token"] == first["token"]  # renewed, same holder
        mark.check()  # still this process's: no error
        # a worker elsewhere took this one for dead (paused past MARK_STALE_S) and took the mark over
        taker = {**marks.new_holder(), "host": "gpu-box-7"}
        _wait_for(lambda: marks.swap_mark(huey, key, huey.get(key, peek=True), taker))
        with pytest.raises(marks.MarkLostError, match="taken over by a worker on gpu-box-7"):
            mark.check()  # the job learns it before its next step (a paused worker ran its whole round)
        time.sleep(0.2)  # beats come and go
        assert huey.get(key, peek=True) == taker  # not renewed back
    assert huey.get(key, peek=True) == taker  # and not removed by the holder it no longer is


def test_a_takeover_while_the_holder_renews_is_not_undone(queue_settings, monkeypatch) -> None:
    """The takeover lands between the renewal's read of the mark and its write: one of the two
    wins, and the mark is the winner's. (A renewal was get, compare the token, put: it put back
    the mark just taken over.)"""
    monkeypatch.setattr(marks, "MARK_BEAT_S", 0.02)
    huey = jobs.get_huey(queue_settings)
    key = "test.mark"
    real_get, taken = huey.get, {}
    taker = {**marks.new_holder(), "host": "gpu-box-7"}

    def get(k, peek=False):
        value = real_get(k, peek=peek)
        if k == key and threading.current_thread().name.startswith("mark-beat") and not taken:
            taken["won"] = marks.swap_mark(huey, key, value, taker)
        return value

    monkeypatch.setattr(huey, "get", get)
    with marks.hold_mark(huey, key):
        mine = real_get(key, peek=True)
        _wait_for(lambda: taken and real_get(key, peek=True) != mine)
    monkeypatch.undo()
    final = huey.get(key, peek=True)
    if taken["won"]:
        assert final == taker
    else:  # the renewal won: the holder kept the mark to the end, then removed it
        assert final is None


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
        # what does not pick the store: driver, password, connection options
        ("postgresql+psycopg://ann:one@db.lab/cells", "postgresql+psycopg2://ann:two@db.lab/cells", True),
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://ann@db.lab/cells?connect_timeout=5", True),
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://ann@db.lab/cells?sslmode=require", True),
        ("postgresql+psycopg://ann@db.lab/cells?application_name=app&sslmode=require",
         "postgresql+psycopg://ann@db.lab:5432/cells?connect_timeout=5", True),
        ("postgresql+psycopg://ann@db.lab/cells",
         "postgresql+psycopg://ann@db.lab/cells?options=-cstatement_timeout%3D0", True),
        # what does: the user, the port, a schema named by search_path
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://bob@db.lab/cells", False),
        ("postgresql+psycopg://ann@db.lab/cells", "postgresql+psycopg://ann@db.lab:5433/cells", False),
        ("postgresql+psycopg://ann@db.lab/cells?options=-csearch_path%3Dlab1",
         "postgresql+psycopg://ann@db.lab/cells?options=-csearch_path%3Dlab2", False),
        ("mysql+pymysql://ann:x@db.lab/cells?charset=utf8mb4", "mysql://ann@db.lab:3306/cells", True),
        # this machine, however it is written (localhost in the app, 127.0.0.1 in a worker)
        ("postgresql+psycopg://ann@localhost:5432/cells", "postgresql+psycopg://ann@127.0.0.1/cells", True),
        ("postgresql+psycopg://ann@[::1]/cells", "postgresql+psycopg://ann@LOCALHOST/cells", True),
        ("postgresql+psycopg://ann@/cells", "postgresql+psycopg://ann@127.0.0.1/cells", True),
        ("sqlite:///{tmp}/a.db", "sqlite:///{tmp}/./a.db", True),
        ("sqlite:///{tmp}/a.db", "sqlite:///{tmp}/b.db", False),
    ],
)
def test_the_queue_name_follows_the_store(tmp_path, a, b, same) -> None:
    names = [jobs.queue_name(Settings(home=tmp_path, database_url=url.format(tmp=tmp_path))) for url in (a, b)]
    assert (names[0] == names[1]) is same and all(n.startswith("cellspot-") and len(n) == 19 for n in names)
    assert jobs.queue_name(Settings(home=tmp_path, database_url=a, queue_name="cellspot")) == "cellspot"


def test_two_stores_on_one_redis_database_keep_their_jobs_apart(settings, tmp_path, redis_url) -> None:
    first = settings.model_copy(update={"queue_url": redis_url})
    second = Settings(home=tmp_path / "second", database_url=f"sqlite:///{tmp_path / 'second.db'}",
                      queue_url=redis_url)
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


def test_a_tasks_own_os_error_is_logged_every_time(settings, throttle, caplog) -> None:
    """A job failing with a missing file is the job's error, not the queue's: each one is logged
    (the throttle sat on the "huey" logger and let one a minute through). The consumer's loop
    failing on the queue file is throttled."""
    huey = jobs.get_huey(settings)
    throttle.clock = lambda: 1000.0

    @huey.task(name="test.missing_file")
    def read_missing() -> bytes:
        return (settings.home / "images" / "gone.png").read_bytes()

    worker = logging.getLogger("huey.consumer.Worker")
    with caplog.at_level(logging.INFO, logger="huey"):
        for _ in range(3):
            huey.execute(read_missing.s())  # as the consumer's worker runs a job
            try:
                raise sqlite3.OperationalError("unable to open database file")
            except sqlite3.OperationalError:
                worker.exception("Error reading from queue")
            try:
                raise OSError("No space left on device")
            except OSError:
                worker.exception("Unhandled error during execution of task %s.", "t-1")
    errors = [(r.name, r.getMessage().split(" ", 3)[:3], type(r.exc_info[1]).__name__) for r in caplog.records
              if r.levelno >= logging.ERROR]
    task_failure = ("huey", ["Unhandled", "exception", "in"], "FileNotFoundError")
    loop_error = ("huey.consumer.Worker", ["Error", "reading", "from"], "OperationalError")
    worker_error = ("huey.consumer.Worker", ["Unhandled", "error", "during"], "OSError")
    assert errors == [task_failure, loop_error, worker_error] + [task_failure, worker_error] * 2


# --------------------------------------------------------------------------- 5: results expire


def test_task_results_in_redis_expire(redis_url) -> None:
    huey = jobs.make_huey(redis_url, name=f"cellspot-test-{uuid.uuid4().hex[:8]}")
    try:
        huey.put_result("some-task-id", {"status": "done"})
        ttl = huey.storage.conn.ttl(huey.storage.result_prefix + b"some-task-id")
        assert 0 < ttl <= jobs.RESULT_TTL_S  # used to be a field of a hash that never expired
    finally:
        huey.flush()

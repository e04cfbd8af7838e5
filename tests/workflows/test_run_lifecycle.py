"""The life of a training run beyond the happy path (fake trainer, no real model): versions and
folders of deleted runs, one owner per run (a paused worker does not come back to it), database
outages mid-training, concurrent creations and finishes, training time across resumes."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from sqlalchemy import delete, event, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cellspot.ml import registry
from cellspot.ml.common import RESUME_FILE, write_json
from cellspot.settings import Settings
from cellspot.store.db import make_engine, session_factory, transaction
from cellspot.store.models import ConsensusSnapshot, ModelRun, Project, parse_utc
from cellspot.store.queries import get_project
from cellspot.workflows import models as wf
from concurrency import at_once
from fake_trainer import FakeFit, install, load_run, new_run, request_cancel, seed_project


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request, settings, monkeypatch) -> Settings:
    """Settings on SQLite, and on PostgreSQL (own schema; skipped when the server is down)."""
    if request.param == "sqlite":
        return settings
    url = request.getfixturevalue("postgres_schema_url")
    monkeypatch.setenv("CELLSPOT_DATABASE_URL", url)
    return Settings(home=settings.home, database_url=url)


@pytest.fixture
def store(backend):
    seed_project(backend)
    engine = make_engine(settings=backend)
    yield engine
    engine.dispose()


def _set(engine, run_id: int, **values) -> None:
    with transaction(engine) as session:
        run = session.get(ModelRun, run_id)
        for key, value in values.items():
            setattr(run, key, value)


# ---------------------------------------------------------------------------------------------
# 1. a new run never takes a deleted run's version, folder or checkpoint
# ---------------------------------------------------------------------------------------------

def test_a_rebuilt_projects_new_run_starts_from_scratch_in_a_new_folder(backend, store, monkeypatch, caplog) -> None:
    """`cellspot demo` deletes the project's runs (cascade) but not their folders; the next run
    took version 0001 again and "resumed" the deleted run's resume.pt."""
    run_id = new_run(store, backend, epochs=3)
    fit = install(monkeypatch, FakeFit(hook=lambda e, s: request_cancel(backend, run_id) if (e, s) == (2, 2) else None))
    assert wf.run_training(backend, run_id).status == "cancelled"
    old_folder = registry.model_dir(backend, load_run(backend, run_id))
    assert (old_folder / RESUME_FILE).is_file()
    with transaction(store) as session:  # the rebuild: runs and snapshots go with the project
        session.execute(delete(ModelRun))
        session.execute(delete(ConsensusSnapshot))
        session.execute(delete(Project))
    seed_project(backend)

    fit.hook = None
    with caplog.at_level(logging.WARNING, logger="cellspot.ml.registry"):
        new_id = new_run(store, backend, epochs=3)
    run = wf.run_training(backend, new_id)
    assert run.status == "done" and run.version == "classifier-0002"
    assert "classifier-0001 skipped: its folder" in caplog.text
    assert fit.calls[-1]["resume"] is False and fit.calls[-1]["start_epoch"] == 1
    assert registry.model_dir(backend, run) != old_folder and (old_folder / RESUME_FILE).is_file()


@pytest.mark.parametrize(
    ("resume", "expected_status", "resumed", "error"),
    [(None, "done", False, None),  # a brand-new run ignores (moves aside) another run's checkpoint
     (False, "done", False, None),
     (True, "failed", None, "is not its own checkpoint")],
)
def test_a_run_only_resumes_a_checkpoint_it_wrote(backend, store, monkeypatch, resume, expected_status, resumed,
                                                   error) -> None:
    fit = install(monkeypatch)
    run_id = new_run(store, backend, epochs=3)
    folder = registry.model_dir(backend, load_run(backend, run_id))
    folder.mkdir(parents=True)  # a deleted run's folder, with its record and checkpoint
    write_json(folder / wf.RUN_FILE, {"version": "classifier-0001", "run_id": 99, "created_at": "2020-01-01T00:00:00+00:00"})
    write_json(folder / RESUME_FILE, {"epoch": 2, "curves": [{"epoch": 1}, {"epoch": 2}]})
    run = wf.run_training(backend, run_id, resume=resume)
    assert run.status == expected_status
    if error:
        assert error in run.error and not fit.calls
        return
    assert fit.calls[0]["resume"] is resumed and fit.calls[0]["start_epoch"] == 1
    assert json.loads((folder / wf.RUN_FILE).read_text())["run_id"] == run_id  # the folder is this run's now
    assert (folder / f"stale-{RESUME_FILE}").is_file()  # moved aside, not deleted nor taken later


def test_resume_refuses_a_checkpoint_older_than_the_run(backend, store) -> None:
    """A run cancelled before it started, in a folder whose resume.pt (no record of its run) a
    deleted run left: Resume would have gone on from that run's model."""
    run_id = new_run(store, backend)
    run = load_run(backend, run_id)
    folder = registry.model_dir(backend, run)
    folder.mkdir(parents=True)
    (folder / RESUME_FILE).write_text("{}")
    old = parse_utc(run.created_at).timestamp() - 3600  # SQLite returns naive UTC
    os.utime(folder / RESUME_FILE, (old, old))
    _set(store, run_id, status="cancelled")
    assert not wf.can_resume(backend, load_run(backend, run_id))
    with transaction(store) as session, pytest.raises(wf.WorkflowError, match="before run classifier-0001 was created"):
        wf.resume_run(session, backend, run_id)


# ---------------------------------------------------------------------------------------------
# 2. one owner per run
# ---------------------------------------------------------------------------------------------

def _mark_lost(engine, run_id: int) -> None:
    """What Cancel / Resume / a starting worker do to a run silent for 10 minutes."""
    with transaction(engine) as session:
        wf._mark_lost(session.get(ModelRun, run_id))


def test_a_run_marked_lost_stays_failed_when_its_paused_worker_wakes(backend, store, monkeypatch) -> None:
    run_id = new_run(store, backend, epochs=3)
    steps: list[tuple[int, int]] = []

    def hook(epoch: int, step: int) -> None:
        steps.append((epoch, step))
        if (epoch, step) == (2, 1):  # the worker was paused here for over 10 minutes
            _mark_lost(store, run_id)

    install(monkeypatch, FakeFit(hook=hook))
    run = wf.run_training(backend, run_id)
    stored = load_run(backend, run_id)
    assert run.status == stored.status == "failed" and "stopped reporting" in stored.error
    assert steps[-1] == (2, 1)  # it stopped at its next check
    assert [r["epoch"] for r in stored.curves] == [1]


def test_a_resumed_run_is_trained_by_one_worker_only(backend, store, monkeypatch) -> None:
    """Worker A pauses, the run is marked lost and resumed, worker B trains it to the end; A
    wakes and must stop without writing (it went on and finished it a second time)."""
    run_id = new_run(store, backend, epochs=3)
    steps: list[tuple[str, int, int]] = []
    who = ["A"]

    def hook(epoch: int, step: int) -> None:
        steps.append((who[-1], epoch, step))
        if (epoch, step) == (2, 1) and who == ["A"]:
            _mark_lost(store, run_id)
            with transaction(store) as session:
                wf.resume_run(session, backend, run_id)
            who.append("B")
            assert wf.run_training(backend, run_id, resume=True).status == "done"  # worker B
            who.pop()

    fit = install(monkeypatch, FakeFit(hook=hook))
    run = wf.run_training(backend, run_id)
    stored = load_run(backend, run_id)
    assert run.status == stored.status == "done" and stored.error is None and stored.is_active
    assert [c["start_epoch"] for c in fit.calls] == [1, 2]
    assert [s for s in steps if s[0] == "A"][-1] == ("A", 2, 1)  # A stopped at once
    assert [r["epoch"] for r in stored.curves] == [1, 2, 3]


# ---------------------------------------------------------------------------------------------
# 3. database outages while training
# ---------------------------------------------------------------------------------------------

class _Outage:
    """Makes the next ``failures`` statements (and commits) of the sessions it is attached to
    raise OperationalError, as a restarting PostgreSQL does."""

    def __init__(self) -> None:
        self.failures = 0
        self.raised = 0

    def check(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.raised += 1
            raise OperationalError("UPDATE model_runs ...", {}, Exception("server closed the connection unexpectedly"))

    def factory(self, engine) -> sessionmaker[Session]:
        outage = self

        class FlakySession(Session):
            def execute(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                outage.check()
                return super().execute(*args, **kwargs)

        event.listen(FlakySession, "before_commit", lambda session: outage.check())
        return sessionmaker(engine, class_=FlakySession, expire_on_commit=False)


@pytest.fixture
def outage(monkeypatch) -> _Outage:
    import cellspot.store.db as db

    out = _Outage()
    monkeypatch.setattr(db, "session_factory", out.factory)
    monkeypatch.setattr(wf, "FINISH_RETRY_S", (0.0, 0.01, 0.01, 0.01))
    return out


def test_a_short_database_outage_is_waited_out(backend, store, monkeypatch, outage, caplog) -> None:
    hook = lambda e, s: setattr(outage, "failures", 4) if (e, s) == (1, 2) else None  # noqa: E731
    install(monkeypatch, FakeFit(hook=hook))
    with caplog.at_level(logging.WARNING, logger="cellspot.workflows.models"):
        run = wf.run_training(backend, new_run(store, backend, epochs=3))
    assert outage.raised == 4
    assert run.status == "done" and run.error is None and run.is_active
    assert [r["epoch"] for r in load_run(backend, run.id).curves] == [1, 2, 3]
    assert "the database did not answer" in caplog.text


def test_a_long_outage_checkpoints_and_fails_resumably_and_the_end_is_retried(backend, store, monkeypatch,
                                                                               outage) -> None:
    monkeypatch.setattr(wf, "DB_OUTAGE_S", 0.0)  # the first failed check is already too long
    hook = lambda e, s: setattr(outage, "failures", 4) if (e, s) == (2, 1) else None  # noqa: E731
    fit = install(monkeypatch, FakeFit(hook=hook))
    run_id = new_run(store, backend, epochs=3)
    run = wf.run_training(backend, run_id)  # the poll, the last flush and two tries of the end fail
    assert outage.raised == 4
    assert run.status == "failed" and "the database did not answer" in run.error and "resume" in run.error
    assert wf.can_resume(backend, load_run(backend, run_id))
    with transaction(store) as session:
        wf.resume_run(session, backend, run_id)
    fit.hook = None
    assert wf.run_training(backend, run_id, resume=True).status == "done"
    assert [c["start_epoch"] for c in fit.calls] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 4. and 5. concurrent creations and finishes
# ---------------------------------------------------------------------------------------------

def test_concurrent_creations_get_distinct_versions(backend, store, monkeypatch) -> None:
    install(monkeypatch)
    monkeypatch.setattr(wf, "enqueue", lambda *args, **kwargs: None)
    real = registry.next_version

    def slow(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - every thread picks before any inserts
        version = real(*args, **kwargs)
        time.sleep(0.3)
        return version

    monkeypatch.setattr(registry, "next_version", slow)
    runs = at_once(4, lambda i: wf.queue_training(backend, "demo", "classifier"))
    assert sorted(r.version for r in runs) == [f"classifier-{n:04d}" for n in range(1, 5)]


def test_an_other_integrity_error_is_not_retried(backend, store) -> None:
    with transaction(store) as session, pytest.raises(IntegrityError):
        registry.create_run(session, "classifier", project=Project(id=12345, name="ghost"))


def test_two_runs_finishing_at_once_leave_one_active(backend, store, monkeypatch) -> None:
    install(monkeypatch)
    real = registry.promote

    def slow(session, run):  # noqa: ANN001, ANN202 - the other run checks before this one commits
        promoted = real(session, run)
        time.sleep(0.5)
        return promoted

    monkeypatch.setattr(registry, "promote", slow)
    ids = [new_run(store, backend), new_run(store, backend)]
    runs = at_once(2, lambda i: wf.run_training(backend, ids[i]))
    assert {r.status for r in runs} == {"done"}
    with session_factory(store)() as session:
        active = session.scalars(select(ModelRun.version).where(ModelRun.is_active.is_(True))).all()
    assert len(active) == 1


# ---------------------------------------------------------------------------------------------
# 7. training time across resumes
# ---------------------------------------------------------------------------------------------

def test_seconds_add_up_over_cancel_and_resume(backend, store, monkeypatch) -> None:
    run_id = new_run(store, backend, epochs=3)
    stops = {(2, 1), (3, 1)}

    def hook(epoch: int, step: int) -> None:
        time.sleep(0.05)
        if (epoch, step) in stops:
            stops.discard((epoch, step))
            request_cancel(backend, run_id)

    install(monkeypatch, FakeFit(hook=hook))
    parts = []
    for resume in (None, True):
        if resume:
            with transaction(store) as session:
                wf.resume_run(session, backend, run_id)
        run = wf.run_training(backend, run_id, resume=resume)
        assert run.status == "cancelled"
        parts.append((run.finished_at - run.started_at).total_seconds())
    with session_factory(store)() as session:
        frame = registry.runs_frame(session, get_project(session, "demo"))
    assert parts[0] > 0.05 and parts[1] > 0.05
    assert frame.loc[0, "seconds"] == pytest.approx(sum(parts), abs=0.01)

"""The one training path (run_training) with a fake trainer: progress in the store while it
runs, throttling, cancel mid-way, resume from the saved epoch, failures, auto-activation."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from cellspot.ml import registry
from cellspot.ml.common import RESUME_FILE
from cellspot.store.db import make_engine, session_factory, transaction
from cellspot.store.models import ModelRun
from cellspot.store.queries import get_project
from cellspot.workflows import models as wf
from fake_trainer import FakeFit, install, load_run, new_run, request_cancel, seed_project


@pytest.fixture
def store(settings):
    seed_project(settings)
    engine = make_engine(settings=settings)
    yield engine
    engine.dispose()


def test_progress_is_visible_while_training_and_run_is_recorded(settings, store, monkeypatch) -> None:
    seen: list[dict] = []

    def peek(epoch: int, step: int) -> None:  # a dashboard reading in its own session mid-run
        with session_factory(store)() as session:
            run = session.scalars(select(ModelRun)).one()
            seen.append({"status": run.status, "progress": dict(run.progress), "curves": len(run.curves)})

    install(monkeypatch, FakeFit(hook=peek))
    events = []
    run_id = new_run(store, settings, epochs=2)
    run = wf.run_training(settings, run_id, progress=events.append)

    assert run.status == "done" and run.error is None and run.is_active
    assert len(events) == 2 * 3 + 2  # every step and epoch end reaches the caller
    assert all(s["status"] == "running" for s in seen)
    # nothing yet before the first step but the claim: this training's token and earlier training time
    assert set(seen[0]["progress"]) == {"attempt", "trained_before_s"}
    mid = seen[4]  # epoch 2, step 2: the previous step is stored
    assert (mid["progress"]["epoch"], mid["progress"]["step"], mid["curves"]) == (2, 1, 1)
    stored = load_run(settings, run_id)
    assert [r["epoch"] for r in stored.curves] == [1, 2]
    assert stored.progress["phase"] == "done" and stored.progress["fraction"] == 1.0
    assert stored.metrics["accuracy"] == pytest.approx(0.7) and stored.metrics["nan_metric"] is None
    assert stored.config == {"preset": "cpu-fast", "epochs": 2, "steps": 3, "lr": 0.1, "threads": None}
    assert stored.data_snapshot_id == "consensus:1" and stored.snapshot_id == 1
    assert stored.started_at is not None and stored.finished_at >= stored.started_at
    folder = registry.model_dir(settings, stored)
    assert folder == settings.home / "models" / "classifier" / "classifier-0001"
    assert json.loads((folder / wf.RUN_FILE).read_text())["data_snapshot_id"] == "consensus:1"


def test_progress_writes_are_throttled_but_epoch_ends_always_written(settings, store, monkeypatch) -> None:
    seen: list[dict] = []

    def peek(epoch: int, step: int) -> None:
        with session_factory(store)() as session:
            seen.append(dict(session.scalars(select(ModelRun)).one().progress))

    install(monkeypatch, FakeFit(hook=peek))
    monkeypatch.setattr(wf, "PROGRESS_INTERVAL_S", 3600.0)
    wf.run_training(settings, new_run(store, settings, epochs=2))
    # the first step is written (no write yet), later steps of the hour are not, epoch 1's end is
    assert (seen[1]["epoch"], seen[1]["step"], seen[1]["phase"]) == (1, 1, "train")
    assert seen[2] == seen[1]
    assert (seen[3]["epoch"], seen[3]["phase"]) == (1, "epoch_end")


def test_cancel_mid_way_then_resume_goes_on_from_saved_epoch(settings, store, monkeypatch) -> None:
    run_id = new_run(store, settings, epochs=3)
    hook = lambda e, s: request_cancel(settings, run_id) if (e, s) == (2, 2) else None  # noqa: E731
    fit = install(monkeypatch, FakeFit(hook=hook))
    run = wf.run_training(settings, run_id)

    assert run.status == "cancelled" and not run.is_active and "resume" in run.error
    stored = load_run(settings, run_id)
    assert stored.progress["epoch"] == 2 and not stored.cancel_requested
    assert [r["epoch"] for r in stored.curves] == [1]
    folder = registry.model_dir(settings, stored)
    assert (folder / RESUME_FILE).is_file()

    with transaction(store) as session:
        wf.resume_run(session, settings, "classifier-0001")
    fit.hook = None
    run = wf.run_training(settings, run_id)
    assert run.status == "done" and run.is_active
    assert [c["start_epoch"] for c in fit.calls] == [1, 2] and [c["resume"] for c in fit.calls] == [False, True]
    assert [r["epoch"] for r in load_run(settings, run_id).curves] == [1, 2, 3]


def test_failure_is_recorded_and_not_raised(settings, store, monkeypatch) -> None:
    install(monkeypatch, FakeFit(fail_at=2))
    run = wf.run_training(settings, new_run(store, settings))
    assert run.status == "failed" and run.error == "ValueError: fake failure in epoch 2"
    assert not run.is_active and run.finished_at is not None
    assert [r["epoch"] for r in load_run(settings, run.id).curves] == [1]


def test_bad_config_override_is_refused_before_a_run_is_stored(settings, store, monkeypatch) -> None:
    install(monkeypatch)
    with pytest.raises(wf.WorkflowError, match=r"unknown config fields \['bogus'\]; allowed: .*epochs"):
        new_run(store, settings, overrides={"bogus": 1})
    with pytest.raises(wf.WorkflowError, match="bad classifier config: .*"):
        new_run(store, settings, overrides={"epochs": "many"}, preset="turbo")
    with session_factory(store)() as session:
        assert session.scalars(select(ModelRun)).all() == []


def test_an_unknown_detector_encoder_is_refused_before_a_run_is_queued() -> None:
    """It was queued and failed in the worker with a list of every encoder (the classifier's
    was refused at once)."""
    with pytest.raises(wf.WorkflowError, match="bad detector config: unknown encoder 'nonexistent_net'; use a "):
        wf.check_config("detector", "cpu-fast", {"encoder": "nonexistent_net"})
    assert wf.check_config("detector", "cpu-fast", {"encoder": "resnet18"}) == {"encoder": "resnet18"}


def test_stored_config_that_no_longer_fits_fails_the_run_with_allowed_fields(settings, store, monkeypatch) -> None:
    install(monkeypatch)
    run_id = new_run(store, settings)
    with transaction(store) as session:  # e.g. written by another version of cellspot
        session.get(ModelRun, run_id).config = {"bogus": 1}
    run = wf.run_training(settings, run_id)
    assert run.status == "failed" and "bogus" in run.error and "epochs" in run.error


def test_only_first_done_run_becomes_active(settings, store, monkeypatch) -> None:
    install(monkeypatch)
    first = wf.run_training(settings, new_run(store, settings))
    second = wf.run_training(settings, new_run(store, settings))
    detector = wf.run_training(settings, new_run(store, settings, kind="detector"))
    assert (first.is_active, second.is_active, detector.is_active) == (True, False, True)
    assert (first.version, second.version, detector.version) == ("classifier-0001", "classifier-0002", "detector-0001")


def test_a_run_that_is_not_queued_is_left_alone(settings, store, monkeypatch) -> None:
    fit = install(monkeypatch)
    run_id = new_run(store, settings)
    wf.run_training(settings, run_id)
    again = wf.run_training(settings, run_id)  # e.g. a duplicate task on the queue
    assert again.status == "done" and len(fit.calls) == 1


@pytest.mark.parametrize(
    ("status", "expected_status", "cancel_requested", "error"),
    [
        ("queued", "cancelled", False, None),
        ("running", "running", True, None),
        ("done", "done", False, "already done"),
        ("cancelled", "cancelled", False, "already cancelled"),
    ],
)
def test_cancel_run(settings, store, status, expected_status, cancel_requested, error) -> None:
    run_id = new_run(store, settings)
    with transaction(store) as session:
        session.get(ModelRun, run_id).status = status
    with transaction(store) as session:
        if error:
            with pytest.raises(wf.WorkflowError, match=error):
                wf.cancel_run(session, run_id)
        else:
            wf.cancel_run(session, "classifier-0001")
    run = load_run(settings, run_id)
    assert (run.status, run.cancel_requested) == (expected_status, cancel_requested)


def test_a_run_whose_worker_is_gone_is_marked_failed_by_cancel_resume_or_a_new_worker(
        settings, store, monkeypatch) -> None:
    """A worker killed mid-run leaves it "running" with nobody to read the cancel flag."""
    from datetime import timedelta

    from cellspot.ml.common import RESUME_FILE
    from cellspot.store.models import utcnow

    def running(minutes_silent: float) -> int:
        run_id = new_run(store, settings)
        with transaction(store) as session:
            run = session.get(ModelRun, run_id)
            run.status, run.started_at = "running", utcnow() - timedelta(hours=1)
            run.progress = {"epoch": 2, "reported_at": (utcnow() - timedelta(minutes=minutes_silent)).isoformat()}
        return run_id

    alive, lost = running(1), running(11)
    from clikit import run_cli

    out = run_cli("models", "cancel", load_run(settings, lost).version).output
    assert "failed (its worker stopped reporting 11 min ago" in " ".join(out.split())
    with transaction(store) as session:  # as it was, for the workflow calls below
        run = session.get(ModelRun, lost)
        run.status, run.error, run.finished_at = "running", None, None
    with transaction(store) as session:
        wf.cancel_run(session, alive)
        wf.cancel_run(session, lost)
    assert (load_run(settings, alive).status, load_run(settings, alive).cancel_requested) == ("running", True)
    gone = load_run(settings, lost)
    assert gone.status == "failed" and gone.error.startswith("its worker stopped reporting 11 min ago")
    # it ended at its last report: its time is the 49 min it trained, not the 11 it lay dead
    assert (gone.finished_at - gone.started_at).total_seconds() == pytest.approx(49 * 60, abs=5)
    # resume of a lost run with a checkpoint goes on at once
    lost_again = running(30)
    folder = registry.model_dir(settings, load_run(settings, lost_again))
    folder.mkdir(parents=True)
    (folder / RESUME_FILE).write_bytes(b"state")
    with transaction(store) as session:
        assert wf.resume_run(session, settings, lost_again).status == "queued"
    # a lost run without one: the resume is refused, and the run stays marked failed
    no_checkpoint = running(15)
    out = " ".join(run_cli("models", "resume", load_run(settings, no_checkpoint).version).output.split())
    assert "has no" in out and "to resume from; start a new run instead" in out
    assert load_run(settings, no_checkpoint).status == "failed"
    # a worker that starts marks the lost ones failed, and leaves the live one alone
    third = running(20)
    assert wf.reap_lost_runs_in_store(settings) == [load_run(settings, third).version]
    assert load_run(settings, alive).status == "running" and load_run(settings, third).status == "failed"


def test_progress_in_the_store_carries_when_it_was_reported(settings, store, monkeypatch) -> None:
    seen: list[dict] = []

    def peek(epoch: int, step: int) -> None:
        with session_factory(store)() as session:
            seen.append(dict(session.scalars(select(ModelRun)).one().progress))

    install(monkeypatch, FakeFit(hook=peek))
    wf.run_training(settings, new_run(store, settings, epochs=1))
    reported = [p["reported_at"] for p in seen if "epoch" in p]
    assert reported and all(isinstance(r, str) and r.startswith("20") for r in reported)


@pytest.mark.parametrize(
    ("status", "with_checkpoint", "error"),
    [("done", True, "only cancelled or failed"), ("cancelled", False, "no .* to resume from"),
     ("failed", True, None)],
)
def test_resume_run_rules(settings, store, status, with_checkpoint, error) -> None:
    run_id = new_run(store, settings)
    with transaction(store) as session:
        run = session.get(ModelRun, run_id)
        run.status = status
        if with_checkpoint:
            folder = registry.model_dir(settings, run)
            folder.mkdir(parents=True)
            (folder / RESUME_FILE).write_text("{}")
    with transaction(store) as session:
        if error:
            with pytest.raises(wf.WorkflowError, match=error):
                wf.resume_run(session, settings, run_id)
        else:
            assert wf.resume_run(session, settings, run_id).status == "queued"


@pytest.mark.parametrize(
    ("kind", "kwargs", "error"),
    [
        ("segmenter", {}, "no trainer for model kind 'segmenter'; known: classifier, detector"),
        ("classifier", {"source": "crowd"}, "unknown data source 'crowd'"),
        ("classifier", {"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_start_training_rejects_bad_requests(settings, store, kind, kwargs, error) -> None:
    with transaction(store) as session, pytest.raises(wf.WorkflowError, match=error):
        wf.start_training(session, settings, get_project(session, "demo"), kind, **kwargs)


def test_consensus_training_needs_a_snapshot(settings, store) -> None:
    from cellspot.store.queries import get_or_create_project

    with transaction(store) as session, pytest.raises(wf.WorkflowError, match="cellspot aggregate"):
        wf.start_training(session, settings, get_or_create_project(session, "empty"), "classifier")
    # expert cells need no snapshot, but some expert cells (it was queued and failed in the worker)
    with transaction(store) as session, pytest.raises(wf.WorkflowError, match="has no expert cells on images with "
                                                                              "pixels; import them"):
        wf.start_training(session, settings, get_or_create_project(session, "empty"), "detector", source="expert")
    with transaction(store) as session:
        from cellspot.store.models import GoldCell, Image

        project = get_or_create_project(session, "empty")
        image = Image(project_id=project.id, name="a.png", width=10, height=10, has_pixels=True, path="x.png")
        session.add(image)
        session.flush()
        session.add(GoldCell(image_id=image.id, x=1.0, y=1.0, label="alive"))
        session.flush()
        run = wf.start_training(session, settings, project, "detector", source="expert")
        assert run.data_source == {"kind": "expert", "project": "empty"} and run.snapshot_id is None


def test_torch_threads_setting_reaches_the_config(settings, store, monkeypatch) -> None:
    install(monkeypatch)
    threaded = settings.model_copy(update={"torch_threads": 1})
    run = wf.run_training(threaded, new_run(store, settings))
    assert run.status == "done" and run.config["threads"] == 1


@pytest.mark.parametrize(("kind", "overrides", "error"), [
    ("classifier", {"lr": "abc"}, r"lr must be a number \(the preset has 0.001\), got 'abc'"),
    ("classifier", {"tta": "maybe"}, "tta must be true or false, got 'maybe'"),
    ("detector", {"polarity": 1}, "polarity must be text"),
    ("classifier", {"seed": 1.5}, "seed must be a whole number, got 1.5"),
    ("detector", {"epochs": 2.5}, "epochs must be a whole number, got 2.5"),
    ("classifier", {"threads": -1}, r"threads must be a whole number >= 1 \(or left out: every CPU\), got -1"),
    ("detector", {"weights_path": "/nowhere/enc.pt"}, "weights_path '/nowhere/enc.pt' is not a file"),
    ("classifier", {"preset": "quality"}, "the preset is not a field; choose it with --preset"),
])
def test_an_override_of_the_wrong_type_names_the_field(kind, overrides, error) -> None:
    with pytest.raises(wf.WorkflowError, match=f"bad {kind} config: {error}"):
        wf.check_config(kind, "cpu-fast", overrides)
    assert wf.check_config(kind, "cpu-fast", {"epochs": 2}) == {"epochs": 2}


def test_a_config_error_says_bad_config_once() -> None:
    with pytest.raises(wf.WorkflowError) as err:
        wf.check_config("detector", "cpu-fast", {"polarity": "sideways"})
    assert str(err.value).startswith("bad detector config: polarity must be one of")
    assert str(err.value).count("bad detector config") == 1


def test_a_bad_training_folder_is_refused_before_a_run_is_stored(settings, store, tmp_path) -> None:
    from PIL import Image

    from cellspot.ml.data import DataError

    (tmp_path / "images").mkdir()
    Image.new("L", (16, 16)).save(tmp_path / "images" / "a.png")
    csv = tmp_path / "ann.csv"
    csv.write_text("image,x,y,label\na.png,3,4,alive\nb.png,3,4,dead\n")
    with transaction(store) as session, pytest.raises(DataError, match=r"ann.csv, line 3, column 'image'.*b.png"):
        wf.start_folder_training(session, settings, "classifier", tmp_path / "images", csv)
    csv.write_text("image,x,y,label\na.png,3,4,zombie\n")
    with transaction(store) as session, pytest.raises(DataError, match="line 2, column 'label'"):
        wf.start_folder_training(session, settings, "classifier", tmp_path / "images", csv)
    with session_factory(store)() as session:
        assert session.scalars(select(ModelRun)).all() == []


def test_bad_input_fails_the_run_without_a_traceback_in_the_log(settings, store, monkeypatch, caplog) -> None:
    from cellspot.ml.data import DataError

    class BadData(FakeFit):
        def __call__(self, *args, **kwargs):
            raise DataError("x.csv, line 3, column 'x': bad")

    install(monkeypatch, BadData())
    with caplog.at_level("ERROR", logger="cellspot.workflows.models"):
        run = wf.run_training(settings, new_run(store, settings))
    assert run.status == "failed" and run.error == "x.csv, line 3, column 'x': bad"  # no Python class name
    record = next(r for r in caplog.records if "failed" in r.getMessage())
    assert record.exc_info is None and "x.csv, line 3" in record.getMessage()

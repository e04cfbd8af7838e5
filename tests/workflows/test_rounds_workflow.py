"""The Rounds workflows: open (crowd-only before any model), roll back, history, queue,
learning curve from model metrics, automatic-mode settings, trigger and job, and ``cellspot round``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.active.strategies import MissingSignalError, UnknownStrategyError
from cellspot.cli import main
from cellspot.ml import registry
from cellspot.store.db import transaction
from cellspot.store.migrate import prepare_store
from cellspot.store.models import Image, ModelRun, Project
from cellspot.store.queries import get_or_create_annotator, get_project, submit_task_run
from cellspot.workflows import auto_rounds as ar
from cellspot.workflows import rounds as wr
from cellspot.workflows.demo import build_demo
from fake_trainer import FakeFit, install

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


@pytest.fixture
def engine(settings):
    """A store with the demo project: 4 images, 2 simulated students, consensus computed."""
    eng = prepare_store(settings)
    with transaction(eng) as session:
        build_demo(session, settings, n_images=4, n_students=2, seed=3)
    yield eng
    eng.dispose()


@pytest.fixture
def db(engine):
    with transaction(engine) as session:
        yield session


def _scores(session, order: list[int]) -> pd.DataFrame:
    """Injected scores, best first, for the demo images at positions ``order`` (by id)."""
    names = session.scalars(select(Image.name).order_by(Image.id)).all()
    return pd.DataFrame({"image": [names[i] for i in order], "score": [1.0 - 0.1 * k for k in range(len(order))],
                         "reason": [f"why {i}" for i in order], "crowd": [0.5] * len(order)})


def _submit(session, n: int, start: int = 0, when: datetime | None = None) -> None:
    """``n`` more task runs by new students (one image each), submitted at ``when``."""
    project = get_project(session, "demo")
    image = session.scalars(select(Image).where(Image.project_id == project.id).order_by(Image.id)).first()
    for i in range(start, start + n):
        annotator = get_or_create_annotator(session, project, f"extra{i}", "DEMO")
        run, _ = submit_task_run(session, image, annotator, [(10.0, 10.0, "alive")], f"key-{i}")
        if when is not None:
            run.submitted_at = when
    session.flush()


def _done_run(session, kind: str, metrics: dict, finished: datetime, promote: bool = True) -> ModelRun:
    run = registry.create_run(session, kind, project=get_project(session, "demo"))
    run.status, run.metrics, run.finished_at = "done", metrics, finished
    return registry.promote(session, run) if promote else run


# --------------------------------------------------------------------------- rounds


def test_open_round_before_any_model_uses_crowd_signals(db) -> None:
    sources = wr.scoring_sources(db, "demo")
    assert sources.crowd_only and not sources.stale
    info = wr.open_new_round(db, "demo", top=3, now=T0)
    assert (info.number, info.status, info.strategy, info.images, info.top) == (1, "open", "combined", 3, 3)
    assert info.crowd_only and "crowd and coverage signals only" in info.describe()
    assert info.task_runs_at_open == 8 and info.snapshot_id is not None
    queue = wr.queue_table(db, "demo")
    assert list(queue["rank"]) == [1, 2, 3] and queue["score"].is_monotonic_decreasing
    assert queue["reason"].str.contains("crowd disagreement").all()
    assert {"crowd_rank", "coverage"} <= set(queue.columns)
    assert wr.current_round_info(db, "demo") == info


@pytest.mark.parametrize(("strategy", "error", "match"), [
    ("nope", UnknownStrategyError, "unknown acquisition strategy 'nope'; valid: bald, classifier"),
    ("bald", wr.RoundsWorkflowError, "strategy 'bald' needs mc_samples, which rounds do not compute"),
])
def test_open_round_errors_name_the_problem(db, strategy, error, match) -> None:
    with pytest.raises(error, match=match):
        wr.open_new_round(db, "demo", strategy=strategy)
    assert wr.current_round_info(db, "demo") is None


def test_rollback_walks_back_and_history_is_newest_first(db) -> None:
    first = wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0, 1]), now=T0)
    second = wr.open_new_round(db, "demo", strategy="coverage", scores=_scores(db, [2, 3, 1]),
                               now=T0 + timedelta(hours=1))
    assert list(wr.queue_table(db, "demo")["reason"]) == ["why 2", "why 3", "why 1"]
    assert list(wr.queue_table(db, "demo", number=1)["reason"]) == ["why 0", "why 1"]
    undone, restored = wr.rollback_current(db, "demo")
    assert (undone.number, undone.status, restored.number, restored.status) == (2, "rolled_back", 1, "open")
    table = wr.history(db, "demo")
    assert list(zip(table["round"], table["status"], table["images"])) == [(2, "rolled_back", 3), (1, "open", 2)]
    undone, restored = wr.rollback_current(db, "demo")
    assert (undone.number, restored) == (first.number, None) and second.number == 2
    with pytest.raises(wr.RoundsWorkflowError, match="has no open round to roll back"):
        wr.rollback_current(db, "demo")
    assert wr.queue_table(db, "demo").empty


def test_rollback_of_a_round_that_is_no_longer_open_does_nothing(db) -> None:
    """A page still showing round 1 after a second tab opened round 2 must not roll back round 2."""
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0]), now=T0)
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [1]), now=T0 + timedelta(hours=1))
    with pytest.raises(wr.RoundsWorkflowError, match="round 1 was open when you pressed, but round 2 is open now"):
        wr.rollback_current(db, "demo", number=1)
    assert wr.current_round_info(db, "demo").number == 2
    undone, restored = wr.rollback_current(db, "demo", number=2)
    assert (undone.number, restored.number) == (2, 1)


def test_the_open_rounds_queue_counts_runs_of_the_round_and_leases(db) -> None:
    from cellspot.active.scheduler import next_queued_image
    from cellspot.store.models import utcnow

    t0 = utcnow() + timedelta(hours=1)  # after the demo's runs
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0, 1]), target_runs=2, now=t0)
    _submit(db, 2, when=t0 - timedelta(minutes=1))  # before the round: not this round's runs
    _submit(db, 1, start=2, when=t0 + timedelta(minutes=1))  # image 0 (see _submit)
    project = get_project(db, "demo")
    student = get_or_create_annotator(db, project, "lea", "DEMO")
    leased = next_queued_image(db, project, student, now=t0 + timedelta(minutes=2))
    queue = wr.queue_table(db, "demo")
    assert list(queue.columns[-2:]) == wr.PROGRESS_SHOWN
    counts = dict(zip(queue["image_id"], zip(queue["runs_round"], queue["leased"])))
    first, second = queue["image_id"]
    assert counts[first][0] == 1 and sum(n for _, n in counts.values()) == 1
    assert counts[leased.id][1] == 1
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [2]), now=t0 + timedelta(hours=1))
    closed = wr.queue_table(db, "demo", number=1)
    assert closed[wr.PROGRESS_SHOWN].isna().all().all()  # only an open round's progress is counted


def test_the_queue_shows_an_image_at_the_maximum_of_runs_as_served_no_more(db) -> None:
    """It read "active" until the next consensus retired it, though no student got it any more."""
    from cellspot.store.models import utcnow

    t0 = utcnow() + timedelta(hours=1)
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0, 1]), target_runs=5, now=t0)
    project = get_project(db, "demo")
    runs = dict(zip(*zip(*wr.queue_table(db, "demo")[["image_id", "n_runs"]].values.tolist())))
    first = db.scalars(select(Image.id).where(Image.project_id == project.id).order_by(Image.id)).first()
    project.settings = {**(project.settings or {}), "retire_min_runs": 1, "retire_max_runs": runs[first] + 1}
    db.flush()
    assert set(wr.queue_table(db, "demo")["status"]) == {"active"}
    _submit(db, 1, when=t0 + timedelta(minutes=1))  # image ``first`` reaches the maximum
    queue = wr.queue_table(db, "demo").set_index("image_id")
    assert queue.loc[first, "status"] == wr.AT_MAX_RUNS
    assert (queue.drop(index=first)["status"] == "active").all()


def test_a_model_strategy_round_without_predictions_says_every_image_tied(db) -> None:
    info = wr.open_new_round(db, "demo", strategy="classifier", now=T0)
    assert info.crowd_only and info.describe().endswith("4 images, no model predictions: every image tied)")
    assert info.scoring == "no model predictions, so every image tied (random order)"


def _retire_all_and_predict(session) -> tuple[str, str]:
    """Every demo image retired; an active detector + classifier pair with a stored prediction
    (so a new round would score that pair); their versions."""
    from cellspot.store.models import PredictionCell

    project = get_project(session, "demo")
    images = session.scalars(select(Image).where(Image.project_id == project.id)).all()
    det = _done_run(session, "detector", {"f1": 0.5}, T0)
    cls = _done_run(session, "classifier", {"balanced_accuracy": 0.7}, T0)
    session.add(PredictionCell(image_id=images[0].id, detector_run_id=det.id, classifier_run_id=cls.id,
                               x=5.0, y=5.0, label="alive", p_alive=0.9, uncertainty=0.1, score=0.9))
    for image in images:
        image.status = "retired"
    session.flush()
    return det.version, cls.version


def test_an_empty_round_says_nothing_was_left_to_score(db) -> None:
    """With every image retired, the round queues nothing: it must not claim it was scored with
    crowd and coverage signals while the active pair has predictions."""
    versions = _retire_all_and_predict(db)
    assert wr.scoring_sources(db, "demo").scored_detector == versions[0]
    info = wr.open_new_round(db, "demo", now=T0)
    assert info.images == 0 and info.empty
    assert info.describe() == "round 1 (combined, 0 images: nothing left to score)"
    assert info.scoring == "nothing was left to score (no open image)"
    assert "crowd and coverage" not in info.describe() + info.scoring


def test_round_cli_open_on_an_all_retired_project(engine) -> None:
    with Session(engine) as session, session.begin():
        _retire_all_and_predict(session)
    out = CliRunner().invoke(main, ["round", "open"])
    assert out.exit_code == 0, out.output
    assert "round 1 (combined, 0 images: nothing left to score) opened" in out.stdout
    assert "crowd and coverage" not in out.output
    assert "no open image was left to rank" in " ".join(out.stderr.split())


def test_learning_curve_pairs_task_runs_with_model_metrics(db) -> None:
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0]), now=T0)  # before any model
    _done_run(db, "classifier", {"balanced_accuracy": 0.7, "accuracy": 0.8}, T0 + timedelta(minutes=5))
    _done_run(db, "detector", {"f1": 0.5, "precision": float("nan")}, T0 + timedelta(minutes=5))
    _submit(db, 3)
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [1]), now=T0 + timedelta(hours=1))
    cls = _done_run(db, "classifier", {"balanced_accuracy": 0.9, "accuracy": 0.95}, T0 + timedelta(hours=2))
    _submit(db, 2, start=3)
    wr.open_new_round(db, "demo", strategy="crowd", now=T0 + timedelta(hours=3),
                      scores=_scores(db, [2]).assign(classifier_run_id=cls.id))
    _submit(db, 1, start=5)
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [3]), now=T0 + timedelta(hours=4))
    wr.rollback_current(db, "demo")  # round 4 leaves the curve

    curve = wr.learning_curve(db, "demo")
    assert curve["split"].isna().all()  # these runs did not say which split they were scored on
    got = {(r.round, r.task_runs, r.series): (r.version, r.value) for r in curve.itertuples()}
    assert got == {
        (2, 11, "detector f1"): ("detector-0001", 0.5),
        (2, 11, "classifier balanced_accuracy"): ("classifier-0001", 0.7),
        (2, 11, "classifier accuracy"): ("classifier-0001", 0.8),
        (3, 13, "detector f1"): ("detector-0001", 0.5),
        (3, 13, "classifier balanced_accuracy"): ("classifier-0002", 0.9),
        (3, 13, "classifier accuracy"): ("classifier-0002", 0.95),
    }
    assert set(wr.learning_curve(db, "demo", include_rolled_back=True)["round"]) == {2, 3, 4}


def test_learning_curve_plots_the_metrics_of_the_split_each_run_was_scored_on(db) -> None:
    """A run's top-level metrics are its test-split metrics (``split``); its validation metrics
    sit under ``val``. The curve holds the top-level ones and says they are test metrics."""
    _done_run(db, "classifier", {"balanced_accuracy": 0.182, "ece": 0.3, "split": "test",
                                 "val": {"balanced_accuracy": 0.6}}, T0)
    _done_run(db, "detector", {"f1": 0.5, "split": "val"}, T0)
    wr.open_new_round(db, "demo", strategy="crowd", scores=_scores(db, [0]), now=T0 + timedelta(hours=1))
    table = wr.learning_curve(db, "demo")
    assert list(table.columns) == wr.CURVE_COLUMNS
    curve = table.set_index("series")
    assert curve.loc["classifier balanced_accuracy", ["value", "split"]].tolist() == [0.182, "test"]
    assert curve.loc["detector f1", "split"] == "val" and curve.loc["classifier ece", "value"] == 0.3


# --------------------------------------------------------------------------- automatic mode


@pytest.mark.parametrize(("changes", "error"), [
    ({"every_runs": 0}, "every_runs must be a whole number from 1 to 1000000, got 0"),
    ({"every_runs": 2.5}, "every_runs must be a whole number"),
    ({"strategy": "nope"}, "unknown acquisition strategy 'nope'"),
    ({"preset": "huge"}, "preset must be one of cpu-fast, quality, got 'huge'"),
    ({"enabled": "yes"}, "enabled must be true or false"),
    ({"top": 0}, "top must be a whole number from 1"),
    ({"speed": 3}, r"unknown automatic-mode settings \['speed'\]"),
])
def test_auto_settings_are_validated_and_nothing_changes(db, changes, error) -> None:
    with pytest.raises(ar.AutoSettingsError, match=error):
        ar.set_auto_settings(db, "demo", **changes)
    assert ar.AUTO_KEY not in get_project(db, "demo").settings


def test_auto_settings_round_trip_keep_other_project_settings(db) -> None:
    stored = ar.set_auto_settings(db, "demo", enabled=True, every_runs="20", top=5)
    assert stored == ar.AutoSettings(enabled=True, every_runs=20, top=5)
    project = get_project(db, "demo")
    assert ar.AutoSettings.from_project(project) == stored and project.settings["class_codes"] == ["DEMO"]


@pytest.fixture
def enqueued(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr("cellspot.jobs.enqueue_auto_round",
                        lambda settings, project, queued_at=None: calls.append(project))
    return calls


def test_trigger_counts_new_runs_and_queues_only_after_commit(engine, settings, enqueued) -> None:
    with transaction(engine) as session:
        decision = ar.maybe_auto_retrain(session, settings, "demo", now=T0)
        assert (decision.queued, decision.reason) == (False, "automatic mode is off")
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=10)
        decision = ar.maybe_auto_retrain(session, settings, "demo", now=T0)
        assert (decision.queued, decision.reason) == (False, "8 of 10 new task runs")
        assert decision.status.runs_to_go == 2
        _submit(session, 2)
    with pytest.raises(RuntimeError, match="caller failed"), transaction(engine) as session:
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0).queued
        raise RuntimeError("caller failed")  # rolled back: nothing queued, nothing marked
    assert enqueued == []
    with transaction(engine) as session:
        decision = ar.maybe_auto_retrain(session, settings, "demo", now=T0)
        assert decision.queued and enqueued == []  # not before the commit
    assert enqueued == ["demo"]
    with transaction(engine) as session:
        status = ar.auto_status(session, "demo", now=T0)
        assert (status.pending_since, status.baseline_runs, status.new_runs) == (T0, 10, 0)
        _submit(session, 10, start=2)
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0).reason.startswith("an automatic round is "
                                                                                         "already pending")
        later = T0 + ar.AUTO_STALE_AFTER + timedelta(minutes=1)
        assert ar.maybe_auto_retrain(session, settings, "demo", now=later).queued  # the lost one is retried
    assert enqueued == ["demo", "demo"]


def test_a_pending_automatic_round_can_be_forgotten(engine, settings, enqueued) -> None:
    with transaction(engine) as session:
        with pytest.raises(wr.RoundsWorkflowError, match="has no pending automatic round"):
            ar.forget_pending(session, "demo")
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0, force=True).queued
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=T0).new_runs == 0
        assert ar.forget_pending(session, "demo") == T0
        status = ar.auto_status(session, "demo", now=T0)
        assert status.pending_since is None and status.new_runs == 8  # nothing trained: the count is back
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0, force=True).queued
    assert enqueued == ["demo", "demo"]


def _queue_an_automatic_round(engine, settings, monkeypatch) -> list[str | None]:
    """An automatic round of "demo" queued at T0; returns the list the pending marks of queued
    jobs are appended to."""
    install(monkeypatch)
    marks: list[str | None] = []
    monkeypatch.setattr("cellspot.jobs.enqueue_auto_round",
                        lambda settings_, project, queued_at=None: marks.append(queued_at))
    with transaction(engine) as session:
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0, force=True).queued
    return marks


def test_a_forgotten_round_does_nothing_when_a_worker_takes_its_job(engine, settings, monkeypatch) -> None:
    marks = _queue_an_automatic_round(engine, settings, monkeypatch)
    with transaction(engine) as session:
        ar.forget_pending(session, "demo")
    assert marks == [T0.isoformat()]
    report = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=T0, queued_at=marks[0])
    assert (report.status, report.runs, report.round) == ("skipped", {}, None)
    assert "no longer pending (it was forgotten); nothing done" in report.message
    later = T0 + timedelta(minutes=5)
    with transaction(engine) as session:
        assert registry.list_runs(session, get_project(session, "demo")) == []  # nothing trained
        assert ar.auto_status(session, "demo", now=later).new_runs == 8  # the counter is untouched
        assert ar.maybe_auto_retrain(session, settings, "demo", now=later, force=True).queued  # queued again
    stale = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=later, queued_at=marks[0])
    assert stale.status == "skipped" and f"another was queued at {later.isoformat()}" in stale.message
    fresh = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=later, queued_at=marks[1])
    assert fresh.status != "skipped" and fresh.runs  # the round that is pending runs
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=later).pending_since is None


def test_a_round_forgotten_while_it_runs_keeps_the_next_rounds_mark(engine, settings, monkeypatch) -> None:
    marks = _queue_an_automatic_round(engine, settings, monkeypatch)
    later = T0 + timedelta(minutes=5)

    def forget_and_queue_another(*_args) -> None:  # while the first round runs, the researcher acts
        with transaction(engine) as session:
            ar.forget_pending(session, "demo")
            assert ar.maybe_auto_retrain(session, settings, "demo", now=later, force=True).queued

    first = ar.run_auto_round(settings, "demo", predict=forget_and_queue_another, now=T0, queued_at=marks[0])
    assert first.status != "skipped" and marks == [T0.isoformat(), later.isoformat()]
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=later).pending_since == later  # the second round's mark stays
    second = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=later, queued_at=marks[1])
    assert second.status != "skipped" and second.runs
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=later).pending_since is None


def test_a_manual_training_resets_the_counter(db, settings) -> None:
    ar.set_auto_settings(db, "demo", enabled=True, every_runs=3)
    assert ar.auto_status(db, "demo").due
    assert ar.auto_status(db, "demo").counted_from is None  # nothing trained: every run so far counts
    registry.create_run(db, "classifier", project=get_project(db, "demo"))  # queued from the Models page
    _submit(db, 2)
    status = ar.auto_status(db, "demo")
    assert (status.baseline_runs, status.new_runs, status.due) == (8, 2, False)
    assert status.counted_from == "training"


def test_the_counter_says_what_it_counts_from(engine, settings, enqueued) -> None:
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=T0).counted_from is None
        assert ar.maybe_auto_retrain(session, settings, "demo", now=T0, force=True).queued
    with transaction(engine) as session:
        assert ar.auto_status(session, "demo", now=T0).counted_from == "automatic round"
        ar.forget_pending(session, "demo")  # the counter goes back: nothing was trained
        assert ar.auto_status(session, "demo", now=T0).counted_from is None


def _predict_recorder(calls: list[tuple[str, ...]]):
    def predict(session, settings, project):
        det, cls = (registry.active_run(session, project, k).version for k in ("detector", "classifier"))
        calls.append((project.name, det, cls))
    return predict


def test_auto_round_retrains_predicts_and_opens_the_next_round(engine, settings, monkeypatch) -> None:
    install(monkeypatch)
    with transaction(engine) as session:
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=5, strategy="crowd", top=2, epochs=1)
        wr.open_new_round(session, "demo", now=T0)
    predicted: list[tuple[str, ...]] = []
    report = ar.run_auto_round(settings, "demo", predict=_predict_recorder(predicted), now=T0)
    assert report.status == "done", report.message
    assert report.runs == {"detector": "detector-0001", "classifier": "classifier-0001"}
    assert report.run_status == {"detector-0001": "done", "classifier-0001": "done"}
    assert report.promoted == ["detector-0001", "classifier-0001"] and report.round == 2
    assert predicted == [("demo", "detector-0001", "classifier-0001")]
    assert report.predicted == "detector-0001 + classifier-0001"
    with transaction(engine) as session:
        info = wr.current_round_info(session, "demo")
        assert (info.number, info.strategy, info.images) == (2, "crowd", 2)
        state = get_project(session, "demo").settings[ar.AUTO_STATE_KEY]
        assert state["pending_since"] is None and state["last"]["round"] == 2
        assert ar.auto_status(session, "demo").last["status"] == "done"

    report = ar.run_auto_round(settings, "demo", predict=_predict_recorder(predicted), now=T0)
    assert report.promoted == ["detector-0002", "classifier-0002"]  # later runs promoted by the mode
    assert len(predicted) == 2 and report.round == 3


def test_auto_round_failure_is_recorded_and_clears_pending(engine, settings, monkeypatch, enqueued) -> None:
    install(monkeypatch)
    with transaction(engine) as session:
        ar.set_auto_settings(session, "demo", enabled=True)
        assert ar.maybe_auto_retrain(session, settings, "demo", force=True, now=T0).queued  # forced: off, 8 < 50
    assert enqueued == ["demo"]


    def no_signal(*args, **kwargs):
        raise MissingSignalError("strategy 'x' needs signal column(s) ['y']")

    monkeypatch.setattr(ar, "open_new_round", no_signal)
    report = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=T0)
    assert report.status == "failed" and "MissingSignalError" in report.message
    with transaction(engine) as session:
        status = ar.auto_status(session, "demo", now=T0)
        assert status.pending_since is None and status.last["status"] == "failed"


def test_automatic_mode_refuses_a_strategy_that_needs_more_than_the_signals(engine) -> None:
    """'bald' was accepted; the mode then trained both models and only failed at the queue."""
    with transaction(engine) as session:
        with pytest.raises(ar.AutoSettingsError, match="strategy 'bald' needs mc_samples, which automatic rounds "
                                                       "do not compute"):
            ar.set_auto_settings(session, "demo", enabled=True, strategy="bald")
        assert not ar.auto_status(session, "demo").settings.enabled


def test_automatic_settings_stored_before_a_value_was_refused_fall_back_to_the_default(engine) -> None:
    """A project that saved 'bald' before it was refused made the Rounds page and every
    worker's periodic check raise."""
    with transaction(engine) as session:
        project = get_project(session, "demo")
        project.settings = {**project.settings, ar.AUTO_KEY: {"enabled": True, "strategy": "bald", "every_runs": 7}}
    with transaction(engine) as session:
        settings = ar.auto_status(session, "demo").settings
        assert (settings.enabled, settings.every_runs, settings.strategy) == (True, 7, ar.AutoSettings().strategy)


def test_a_failed_training_is_reported_and_the_queue_still_refreshed(engine, settings, monkeypatch) -> None:
    install(monkeypatch, FakeFit(fail_at=1))
    with transaction(engine) as session:
        ar.set_auto_settings(session, "demo", enabled=True, strategy="coverage")
    report = ar.run_auto_round(settings, "demo", predict=lambda *a: None, now=T0)
    assert report.status == "failed" and report.round == 1 and report.promoted == []
    assert report.run_status == {"detector-0001": "failed", "classifier-0001": "failed"}
    assert report.message.startswith("training detector-0001 failed, classifier-0001 failed (see the Models page)")
    assert "no active detector and classifier: crowd signals only" in report.message


def test_worker_periodic_check_runs_the_round_through_the_queue(engine, settings, monkeypatch) -> None:
    from cellspot import jobs

    install(monkeypatch)
    monkeypatch.setattr(ar, "_predict", lambda session, settings_, project: None)
    huey = jobs.get_huey(settings)
    huey.immediate = True
    try:
        with transaction(engine) as session:
            ar.set_auto_settings(session, "demo", enabled=True, every_runs=8, strategy="coverage", epochs=1)
        assert ar.check_auto_rounds(settings, now=T0) == ["demo"]  # immediate mode: the round ran on commit
        assert ar.check_auto_rounds(settings, now=T0) == []  # counter reset
    finally:
        huey.immediate = False
    with transaction(engine) as session:
        assert wr.current_round_info(session, "demo").strategy == "coverage"
        assert {r.status for r in session.scalars(select(ModelRun))} == {"done"}
        assert session.scalar(select(Project)).settings[ar.AUTO_STATE_KEY]["trigger"] == "auto"


# --------------------------------------------------------------------------- CLI


def test_round_cli_open_list_rollback(engine) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["round", "open", "--strategy", "crowd", "--top", "2"])
    assert out.exit_code == 0, out.output
    assert "round 1 (crowd, 2 images, crowd and coverage signals only) opened" in out.output
    out = runner.invoke(main, ["round", "list", "--queue", "--project", "demo"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:4] == ["round", "status", "strategy", "images"]
    assert lines[1].split()[:4] == ["1", "open", "crowd", "2"]
    assert lines[1].split()[4:6] == ["-", "-"]  # no model yet
    assert sum("crowd unsure" in line for line in lines) == 2
    out = runner.invoke(main, ["round", "rollback"])
    assert (out.exit_code, out.output.strip()) == (0, "round 1 rolled back; no round is open now")


@pytest.mark.parametrize("strategy, warned", [("classifier", True), ("margin_max", True), ("detector", True),
                                               ("crowd", False), ("combined", False)])
def test_round_cli_warns_when_a_model_strategy_has_no_model(engine, strategy: str, warned: bool) -> None:
    out = CliRunner().invoke(main, ["round", "open", "--strategy", strategy])
    assert out.exit_code == 0, out.output
    assert ("every image ties; train and promote a model" in " ".join(out.stderr.split())) is warned


def test_round_cli_says_when_the_active_models_have_not_predicted_the_project(engine) -> None:
    with Session(engine) as session, session.begin():
        version = _done_run(session, "classifier", {"balanced_accuracy": 0.9}, T0).version
    out = CliRunner().invoke(main, ["round", "open"])
    assert out.exit_code == 0, out.output
    assert f"the active models ({version}) have not predicted this project yet" in " ".join(out.stderr.split())


@pytest.mark.parametrize(("args", "code", "message"), [
    (["round", "open", "--strategy", "nope"], 2, "unknown acquisition strategy 'nope'"),
    (["round", "open", "--strategy", ""], 2, "needs a strategy name; got an empty value"),
    (["round", "rollback"], 1, "has no open round to roll back"),
    (["round", "list", "--project", "missing"], 1, "missing"),
])
def test_round_cli_errors(engine, args, code, message) -> None:
    out = CliRunner().invoke(main, args)
    assert out.exit_code == code and message in out.output, out.output

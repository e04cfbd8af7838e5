"""Models page defects found by an audit: a double click on "Predict project", the config
fields' example, the predictions shown after a promotion, the dead-class F1's names, the
comparison charts' legends and the ETA of the first steps."""

from __future__ import annotations

import pandas as pd
import pytest
import streamlit as st
from app_testkit import REPO  # noqa: F401 - puts app/ on sys.path
from appkit import charts, model_runs
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_models_page import CURVES, add_run, button, no_exception, open_models, table, texts

from cellspot.ml.common import EtaClock, parse_overrides, split_overrides
from cellspot.store.models import Image, ModelRun, PredictionCell
from cellspot.workflows.models import check_config

# --------------------------------------------------------------------------- 1. double click on Predict project


def test_a_second_click_that_interrupts_the_first_after_queueing_does_not_queue_again(app, app_engine, monkeypatch):
    """A second click is a new run that interrupts the first at its next ``st`` call; writing
    ``st.session_state`` right after the job was queued is one, so the "done" mark was never
    written and the second click queued the prediction again."""
    asked = []

    def enqueue(settings, project, **kw):
        asked.append((project, kw))
        if len(asked) == 1:
            st.rerun()  # the second click's rerun, taken at the first st call after the job was queued

    monkeypatch.setattr("cellspot.jobs.enqueue_prediction", enqueue)
    add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    open_models(app)
    app.button(key="models_predict").click().run()
    app.button(key="models_predict").click().run()  # the second click
    no_exception(app)
    assert len(asked) == 1
    assert "queued a moment ago (a double click?)" in texts(app.info)


def test_a_click_that_failed_unexpectedly_is_not_taken_for_a_double_click(app, app_engine, monkeypatch):
    """An exception the page does not expect (a bug) is shown, and the next click queues: the
    mark written before the action must not say "queued a moment ago" for work never queued."""
    asked = []

    def enqueue(settings, project, **kw):
        asked.append((project, kw))
        if len(asked) == 1:
            raise RuntimeError("a bug")

    monkeypatch.setattr("cellspot.jobs.enqueue_prediction", enqueue)
    add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    open_models(app)
    app.button(key="models_predict").click().run()
    assert app.exception and "a bug" in app.exception[0].message
    app.button(key="models_predict").click().run()
    no_exception(app)
    assert len(asked) == 2
    assert "queued a moment ago" not in texts(app.info)


def test_a_prediction_already_queued_is_not_queued_again_and_the_page_says_so(app, app_engine, monkeypatch):
    from appkit import researcher

    from cellspot import jobs

    detector, classifier = add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    open_models(app)
    queue = jobs.get_huey(model_runs.resources.settings())
    queue.flush()
    try:
        app.button(key="models_predict").click().run()
        assert f"Prediction queued with {detector} and {classifier}" in texts(app.success)
        monkeypatch.setattr(researcher, "REPEAT_WINDOW_S", 0.0)  # past the page's own guard: the queue's
        app.button(key="models_predict").click().run()
        no_exception(app)
        assert "is already queued, so it was not queued again" in texts(app.info)
        assert not app.error
        assert [t.kwargs for t in queue.pending() if t.name == "cellspot.predict"] == [
            {"detector": detector, "classifier": classifier}]
    finally:
        queue.flush()


# --------------------------------------------------------------------------- 2. config fields' example


@pytest.mark.parametrize("kind", ["classifier", "detector"])
def test_the_config_example_of_each_kind_is_valid_for_it(kind):
    """"e.g. polarity=auto tta=true" was shown for a classifier, which has no polarity field."""
    overrides = parse_overrides(split_overrides(model_runs.CONFIG_EXAMPLES[kind]))
    assert check_config(kind, "cpu-fast", overrides) == overrides


def test_the_config_fields_example_follows_the_chosen_kind(app):
    open_models(app)
    assert app.text_input(key="train_set").placeholder == f"e.g. {model_runs.CONFIG_EXAMPLES['classifier']}"
    assert "polarity" not in app.text_input(key="train_set").placeholder
    app.radio(key="train_kind").set_value("detector").run()
    assert app.text_input(key="train_set").placeholder == "e.g. polarity=auto tta=true"


# --------------------------------------------------------------------------- 3. predictions after a promotion


def test_an_active_pair_without_predictions_says_which_pair_is_shown(app, app_engine):
    detector, old = add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    with Session(app_engine) as session, session.begin():
        runs = {r.version: r.id for r in session.scalars(select(ModelRun))}
        image = session.scalars(select(Image).order_by(Image.name)).first()
        session.add(PredictionCell(image_id=image.id, detector_run_id=runs[detector], classifier_run_id=runs[old],
                                   x=20.0, y=30.0, label="alive", p_alive=0.9, uncertainty=0.4, score=0.9))
    open_models(app)
    assert "have no predictions yet" not in texts(app.info)
    new = add_run(app_engine, "classifier", promote=True)
    model_runs.refresh()
    app.run()
    no_exception(app)
    assert app.selectbox(key="models_pair").value == (detector, old)
    note = texts(app.info)
    assert f"The active models ({detector} + {new}) have no predictions yet" in note
    assert f"Shown: the predictions of detector {detector} + classifier {old}." in note


# --------------------------------------------------------------------------- 5. dead F1, one name


def test_the_dead_class_f1_is_called_dead_f1_in_the_caption_and_the_comparison(app, app_engine):
    old = add_run(app_engine, "classifier", metrics={"balanced_accuracy": 0.8, "f1": 0.7}, curves=CURVES)
    new = add_run(app_engine, "classifier", metrics={"balanced_accuracy": 0.9, "f1": 0.85}, curves=CURVES)
    open_models(app)
    assert "dead F1 0.850" in texts(app.caption) and "· f1 " not in texts(app.caption)
    compared = table(app, "metric")
    assert "dead F1" in compared.index and "f1" not in compared.index
    assert compared.loc["dead F1", "difference"] == "0.1500"
    assert "dead_f1" in table(app, "version").columns  # the history's column (and CSV) keeps its key
    assert {old, new} <= set(table(app, "version")["version"])


def test_short_metrics_names_metrics_as_told():
    metrics = {"balanced_accuracy": 0.75, "f1": 0.5}
    assert charts.short_metrics(metrics, labels={"f1": "dead F1"}) == "balanced_accuracy 0.750 · dead F1 0.500"


# --------------------------------------------------------------------------- 6. comparison legends


def test_the_run_legend_of_two_overlaid_runs_shows_each_dash_in_full():
    """At 1280 px the run names were cut ("classifier-0") and both runs' symbols were the same
    black dot, so solid and dashed could not be told apart."""
    long = pd.concat([charts.curves_long(CURVES, run=v) for v in ("classifier-0001", "classifier-0002")])
    for chart in charts.curves_charts(long):
        encoding = chart.to_dict()["encoding"]
        runs, series = encoding["strokeDash"]["legend"], encoding["color"]["legend"]
        assert runs["symbolType"] == "stroke" and runs["labelLimit"] == 0
        assert runs["orient"] != series["orient"]  # a row of its own, not squeezed beside the series


# --------------------------------------------------------------------------- 7. ETA


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize(("steps", "expected"), [
    # (seconds after start, fraction done) per progress event; the first step took 5 s of start-up
    ([(5.0, 0.01)], None),
    ([(5.0, 0.01), (5.5, 0.02)], None),
    ([(5.0, 0.01), (5.5, 0.02), (6.0, 0.03)], None),
    ([(5.0, 0.01), (5.5, 0.02), (6.0, 0.03), (6.5, 0.04)], 1.5 * 0.96 / 0.03),  # 0.5 s a step from then on
    ([(5.0, 0.01), (5.5, 0.02), (5.6, 0.02), (5.7, 0.02), (6.0, 0.03)], None),  # validation: no new step
    ([(5.0, 0.01), (5.5, 0.02), (6.0, 0.03), (6.5, 0.04), (7.0, 1.0)], 0.0),
    # long steps (a classifier's 3-step epochs): one step after the first, 5 s on, is enough
    ([(5.0, 1 / 6), (11.0, 2 / 6)], 6.0 * 4),
    ([(5.0, 1 / 6), (9.0, 1 / 6), (10.0, 1 / 6)], None),  # 5 s on, but no step yet
])
def test_eta_waits_for_steps_after_the_first(steps, expected):
    """At the detector's step 1 the ETA said "8 min 55 s" for an 80 s run: the first step carries
    the start-up."""
    now = FakeTime()
    clock = EtaClock(now=now)
    eta = None
    for t, fraction in steps:
        now.t = t
        eta = clock.eta(fraction)
    assert eta == (pytest.approx(expected) if expected is not None else None)


def test_eta_stays_within_a_time_budget():
    now = FakeTime()
    clock = EtaClock(min_steps=1, now=now)
    clock.eta(0.01)
    now.t = 1.0
    assert clock.eta(0.02, budget_left_s=30.0) == 30.0
    assert clock.eta(0.02, budget_left_s=-3.0) == 0.0


def test_the_bar_says_estimating_until_there_is_an_eta():
    progress = {"epoch": 1, "epochs": 48, "step": 1, "steps": 50, "fraction": 0.0004, "eta_s": None}
    assert "ETA estimating…" in charts.progress_text(progress, "running")
    assert "ETA" not in charts.progress_text(progress, "cancelled")


def test_train_button_still_queues_after_the_kind_moved_out_of_the_form(app, app_engine, monkeypatch):
    queued = []
    monkeypatch.setattr("cellspot.workflows.models.enqueue", lambda settings, run_id, **kw: queued.append(run_id))
    open_models(app)
    app.radio(key="train_kind").set_value("detector")
    button(app, "Train").click().run()
    no_exception(app)
    with Session(app_engine) as session:
        assert [r.kind for r in session.scalars(select(ModelRun))] == ["detector"]
    assert len(queued) == 1

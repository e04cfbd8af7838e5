"""The Models page (``streamlit.testing.v1.AppTest`` on the seeded demo store, see conftest.py)
and its chart helpers (pure).

No worker runs here: the queue calls (``enqueue`` / ``enqueue_prediction``) are replaced by
recorders, and finished runs and predictions are put in the store through the registry API.
"""

from __future__ import annotations

from datetime import timedelta

import app_testkit  # noqa: F401 - puts app/ on sys.path
import pandas as pd
import pytest
from app_testkit import REPO
from appkit import charts, model_runs
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.ml import registry
from cellspot.settings import Settings
from cellspot.store.models import Image, ModelRun, PredictionCell, Project, utcnow

CURVES = [{"epoch": 1, "train_loss": 0.9, "val_loss": 1.0, "balanced_accuracy": 0.6, "elapsed_s": 3.0},
          {"epoch": 2, "train_loss": 0.5, "val_loss": 0.7, "balanced_accuracy": 0.8, "elapsed_s": 6.0}]


# --------------------------------------------------------------------------- helpers


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def open_models(at):
    """The Models page of a logged-in researcher (the state the login page leaves; the login
    itself is tested in test_pages.py)."""
    at.session_state["role"] = "researcher"
    at.session_state["researcher_ok"] = True
    at.switch_page("views/models.py").run()
    no_exception(at)
    return at


def button(at, label: str):
    return next(b for b in at.button if b.label == label)


def add_run(engine, kind: str, status: str = "done", *, metrics: dict | None = None, curves=(),
            promote: bool = False, progress: dict | None = None, age_s: float = 0.0) -> str:
    """A run of the demo project put in the store through the registry; its version."""
    with Session(engine) as session, session.begin():
        project = session.scalar(select(Project))
        run = registry.create_run(session, kind, project=project, preset="cpu-fast", config={"epochs": 2})
        run.status, run.metrics, run.curves = status, metrics or {}, list(curves)
        run.progress = progress or ({"fraction": 1.0, "phase": "done"} if status == "done" else {})
        run.created_at = utcnow() - timedelta(seconds=age_s)
        if status == "done":
            run.started_at, run.finished_at = run.created_at, run.created_at + timedelta(seconds=42)
            folder = registry.model_dir(Settings(), run)  # the test's CELLSPOT_HOME (the settings fixture)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "weights.pt").write_bytes(b"weights")  # promote checks they are there
        if promote:
            registry.promote(session, run)
        return run.version


def runs_in_store(engine) -> dict[str, tuple[str, str, bool]]:
    with Session(engine) as session:
        return {r.version: (r.kind, r.status, r.is_active) for r in session.scalars(select(ModelRun))}


def table(at, column: str) -> pd.DataFrame:
    """The first table shown with ``column`` (or with it as its index name)."""
    for frame in at.dataframe:
        value = frame.value
        if column in value.columns or value.index.name == column:
            return value
    raise LookupError(f"no table with a {column!r} column")


def charts_shown(at) -> int:
    return len(at.get("vega_lite_chart"))


# --------------------------------------------------------------------------- page


def test_only_researchers_see_the_models_page(app):
    from streamlit.testing.v1 import AppTest

    app.run()
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        app.switch_page("views/models.py")
    at = AppTest.from_file(str(REPO / "app" / "views" / "models.py"), default_timeout=30).run()
    assert "This page is for researchers" in texts(at.error)
    assert not at.dataframe


def test_empty_state_says_train_one(app):
    open_models(app)
    assert "Models" in [t.value for t in app.title]
    assert "No model yet: train one" in texts(app.info)
    assert button(app, "Train").proto.is_form_submitter
    assert not app.dataframe


@pytest.mark.parametrize(("fields", "message"), [
    ("polarity=flip", "polarity must be one of"),
    ("colour=red", "unknown config fields ['colour']"),
    ("tta", "config fields: expected FIELD=VALUE, got 'tta'"),
])
def test_bad_config_fields_are_refused_and_nothing_is_queued(app, app_engine, monkeypatch, fields, message):
    monkeypatch.setattr("cellspot.workflows.models.enqueue", lambda *a, **kw: pytest.fail("must not queue"))
    open_models(app)
    app.radio(key="train_kind").set_value("detector")
    app.text_input(key="train_set").set_value(fields)
    button(app, "Train").click().run()
    no_exception(app)
    assert message in texts(app.error)
    assert runs_in_store(app_engine) == {}


@pytest.mark.parametrize("fields", ["decoder_channels=[64, 32, 16, 16] tta=true",
                                    "decoder_channels=64,32,16,16  tta=true"])
def test_config_fields_take_lists_with_spaces_or_commas(app, app_engine, monkeypatch, fields):
    """``decoder_channels=[64, 32, 16, 16]`` was split at its spaces ("expected FIELD=VALUE, got
    '32,'") and ``64,32`` failed with "invalid literal for int()"."""
    monkeypatch.setattr("cellspot.workflows.models.enqueue", lambda *a, **kw: None)
    open_models(app)
    app.radio(key="train_kind").set_value("detector")
    app.text_input(key="train_set").set_value(fields)
    button(app, "Train").click().run()
    no_exception(app)
    assert not app.error, texts(app.error)
    with Session(app_engine) as session:
        config = session.scalar(select(ModelRun)).config
    assert config["decoder_channels"] == [64, 32, 16, 16] and config["tta"] is True


def test_train_queues_a_run_and_shows_it_live(app, app_engine, monkeypatch):
    queued = []
    monkeypatch.setattr("cellspot.workflows.models.enqueue",
                        lambda settings, run_id, **kw: queued.append((run_id, kw)))
    open_models(app)
    app.radio(key="train_kind").set_value("detector")
    app.number_input(key="train_epochs").set_value(3)
    app.text_input(key="train_set").set_value("polarity=auto  tta=true")
    button(app, "Train").click().run()
    no_exception(app)
    stored = runs_in_store(app_engine)
    assert list(stored.values()) == [("detector", "queued", False)]
    version = next(iter(stored))
    with Session(app_engine) as session:
        run = session.scalar(select(ModelRun))
        assert run.config == {"polarity": "auto", "tta": True, "epochs": 3}
        assert run.data_source["kind"] == "consensus"
        assert [q[0] for q in queued] == [run.id]
    assert f"{version} queued." in texts(app.success)
    assert "Training now" in [s.value for s in app.subheader]
    assert "waiting for a worker" in texts(app.caption)
    history = table(app, "version")
    assert history[["version", "kind", "status"]].values.tolist() == [[version, "detector", "queued"]]


def test_a_run_left_in_the_queue_says_to_start_a_worker_and_can_be_cancelled(app, app_engine):
    version = add_run(app_engine, "classifier", "queued", age_s=120)
    open_models(app)
    warning = texts(app.warning)
    assert "No worker seems to be running" in warning and "cellspot worker" in warning and version in warning
    app.button(key=f"cancel-{version}").click().run()
    no_exception(app)
    assert runs_in_store(app_engine)[version][1] == "cancelled"
    assert "Training now" not in [s.value for s in app.subheader]


@pytest.mark.parametrize(("kinds", "absent"), [(("classifier",), "no active detector yet. Train one"),
                                               (("detector",), "no active classifier yet. Train one")])
def test_predict_project_says_which_active_model_is_missing(app, app_engine, kinds, absent):
    """The caption gave CLI advice (`cellspot train detector --project demo`, --detector
    MODEL_DIR) and named only the detector when both were missing."""
    for kind in kinds:
        add_run(app_engine, kind, promote=True)
    open_models(app)
    assert app.button(key="models_predict").disabled
    caption = texts(app.caption)
    assert absent in caption and "--detector" not in caption and "cellspot train" not in caption


def test_a_run_queued_behind_a_prediction_says_so_not_that_no_worker_runs(app, app_engine):
    """A worker predicting a project looked absent: the queued run said "No worker seems to be
    running... start one" while the page's own notice said it was predicting."""
    from appkit import resources

    from cellspot.jobs import busy

    version = add_run(app_engine, "classifier", "queued", age_s=120)
    with busy(resources.settings(), "predict", "demo"):
        open_models(app)
        no_exception(app)
        assert "No worker seems to be running" not in texts(app.warning)
        assert "Queued behind a prediction of project 'demo' (running for" in texts(app.caption)
        # a reload (a new session) still shows the prediction running
        assert "Predicting every image with the active models" in texts(app.info)
    open_models(app)
    assert version in texts(app.warning) and "No worker seems to be running" in texts(app.warning)


def test_cancel_of_a_run_whose_worker_is_gone_warns_once(app, app_engine):
    """Cancel of a lost run said "... failed: <reason>" in a green box, and the reason again
    in red under the run."""
    lost_at = (utcnow() - timedelta(minutes=30)).isoformat()
    version = add_run(app_engine, "detector", "running", progress={"epoch": 1, "reported_at": lost_at}, age_s=3600)
    open_models(app)
    app.button(key=f"cancel-{version}").click().run()
    no_exception(app)
    assert runs_in_store(app_engine)[version][1] == "failed"
    assert f"{version} was not running any more" in texts(app.warning)
    assert version not in texts(app.success)
    assert texts(app.error).count("its worker stopped reporting") == 1


def test_a_run_queued_behind_another_projects_training_says_so(app, app_engine):
    """The worker trains one run at a time: a run queued while it trained another project's
    said "No worker seems to be running"."""
    from cellspot.store.queries import get_or_create_project

    with Session(app_engine) as session, session.begin():
        other = get_or_create_project(session, "other")
        busy = registry.create_run(session, "detector", project=other, preset="cpu-fast", config={})
        busy.status = "running"
        busy_version = busy.version
    version = add_run(app_engine, "classifier", "queued", age_s=120)
    open_models(app)
    assert "No worker seems to be running" not in texts(app.warning)
    assert f"Queued behind {busy_version} (another project)" in texts(app.caption), version


def test_a_running_run_shows_its_progress_and_curves(app, app_engine):
    progress = {"epoch": 2, "epochs": 5, "step": 3, "steps": 10, "phase": "train", "train_loss": 0.4,
                "fraction": 0.26, "eta_s": 65.0}
    version = add_run(app_engine, "classifier", "running", curves=CURVES[:1], progress=progress)
    open_models(app)
    bar = app.get("progress")[0]
    assert bar.value == 26
    assert "epoch 2/5" in bar.text and "step 3/10" in bar.text and "ETA 1 min 05 s" in bar.text
    assert charts_shown(app) >= 1
    assert version in texts(app.markdown)
    history = table(app, "version").set_index("version")
    assert pd.isna(history.loc[version, "progress"])  # the live bar shows it; the table would lag


def test_history_details_and_comparison_of_finished_runs(app, app_engine):
    old = add_run(app_engine, "classifier", metrics={"balanced_accuracy": 0.8, "f1": 0.7}, curves=CURVES,
                  promote=True)
    new = add_run(app_engine, "classifier", metrics={"balanced_accuracy": 0.9, "f1": 0.85}, curves=CURVES)
    open_models(app)
    history = table(app, "version").set_index("version")
    assert history.loc[old, "active"] and not history.loc[new, "active"]
    assert history.loc[new, "balanced_accuracy"] == pytest.approx(0.9)
    assert charts_shown(app) == 4  # the chosen run's losses and metrics, and both for the two runs overlaid
    compared = table(app, "metric")
    assert list(compared.columns) == [old, new, "difference"]
    assert compared.loc["balanced_accuracy", "difference"] == "0.1000"
    assert compared.loc["epochs", old] == str(len(CURVES))  # a count, without decimals
    assert f"Active classifier:  \n**{old}**" in [m.value for m in app.markdown]


def test_promote_and_roll_back_change_the_active_model(app, app_engine):
    old = add_run(app_engine, "classifier", metrics={"f1": 0.7}, promote=True)
    new = add_run(app_engine, "classifier", metrics={"f1": 0.8})
    open_models(app)
    app.selectbox(key="models_run").set_value(new).run()
    app.button(key="models_promote").click().run()
    no_exception(app)
    assert f"{new} is now the active classifier." in texts(app.success)
    assert runs_in_store(app_engine)[new][2] and not runs_in_store(app_engine)[old][2]
    assert f"Active classifier:  \n**{new}**" in [m.value for m in app.markdown]
    app.button(key="rollback-classifier").click().run()
    no_exception(app)
    assert runs_in_store(app_engine)[old][2] and not runs_in_store(app_engine)[new][2]
    assert f"{old} is the active classifier again" in texts(app.success)


def test_a_run_whose_weights_are_not_here_is_not_promoted(app, app_engine, settings):
    """Trained by a worker with another CELLSPOT_HOME: promoting it would break prediction."""
    old = add_run(app_engine, "classifier", metrics={"f1": 0.7}, promote=True)
    new = add_run(app_engine, "classifier", metrics={"f1": 0.8})
    weights = settings.home / "models" / "classifier" / new / "weights.pt"
    weights.unlink()
    open_models(app)
    app.selectbox(key="models_run").set_value(new).run()
    app.button(key="models_promote").click().run()
    no_exception(app)
    errors = texts(app.error)
    assert f"cannot promote {new}: {weights} is missing" in errors, errors
    assert runs_in_store(app_engine)[old][2] and not runs_in_store(app_engine)[new][2]


def test_a_failed_run_can_be_resumed_not_promoted(app, app_engine, settings):
    version = add_run(app_engine, "detector", "failed")
    open_models(app)
    assert app.button(key="models_promote").disabled
    assert app.button(key="models_resume").disabled  # it failed before saving a checkpoint
    assert app.button(key="models_cancel").disabled
    folder = settings.home / "models" / "detector" / version
    folder.mkdir(parents=True)
    (folder / "resume.pt").write_bytes(b"state")
    model_runs.run_view.clear()
    app.run()
    assert not app.button(key="models_resume").disabled


def test_a_queued_run_behind_a_running_one_is_not_blamed_on_a_missing_worker(app, app_engine):
    busy = add_run(app_engine, "detector", "running", progress={"fraction": 0.5, "phase": "train",
                                                                "reported_at": utcnow().isoformat()})
    waiting = add_run(app_engine, "classifier", "queued", age_s=120)
    open_models(app)
    assert f"Queued behind {busy}: the worker takes it when that one ends." in texts(app.caption)
    assert "No worker seems to be running" not in texts(app.warning) and waiting in texts(app.markdown)


def test_a_running_run_that_stopped_reporting_is_flagged(app, app_engine):
    version = add_run(app_engine, "detector", "running", progress={
        "fraction": 0.75, "phase": "train", "reported_at": (utcnow() - timedelta(minutes=5)).isoformat()})
    open_models(app)
    warning = texts(app.warning)
    assert f"No progress from {version} for 5 min" in warning and "Cancel marks it failed" in warning


def test_predict_queues_a_job_and_the_viewer_shows_stored_predictions(app, app_engine, monkeypatch):
    asked = []
    monkeypatch.setattr("cellspot.jobs.enqueue_prediction", lambda settings, project, **kw: asked.append(project))
    detector = add_run(app_engine, "detector", promote=True)
    classifier = add_run(app_engine, "classifier", promote=True)
    with Session(app_engine) as session, session.begin():
        runs = {r.version: r.id for r in session.scalars(select(ModelRun))}
        image = session.scalars(select(Image).order_by(Image.name)).first()
        image_id, image_name = image.id, image.name
        for x, label, p in [(20.0, "alive", 0.9), (60.0, "alive", 0.8), (100.0, "dead", 0.1)]:
            session.add(PredictionCell(image_id=image_id, detector_run_id=runs[detector],
                                       classifier_run_id=runs[classifier], x=x, y=30.0, label=label,
                                       p_alive=p, uncertainty=0.5, score=0.9))
    open_models(app)
    app.button(key="models_predict").click().run()
    no_exception(app)
    assert asked == ["demo"] and "Prediction queued" in texts(app.success)
    summary = table(app, "viability_pct").set_index("image")
    assert len(summary) == 4  # every image of the project, zeros where nothing was predicted
    assert summary.loc[image_name, ["alive", "dead"]].tolist() == [2, 1]
    assert summary.loc[image_name, "viability_pct"] == pytest.approx(66.67)
    app.selectbox(key="models_image").set_value(image_id).run()
    assert any("3 predicted cells" in c for img in app.image for c in img.captions)


def test_after_predict_the_page_waits_for_the_new_predictions_then_shows_them(app, app_engine, monkeypatch):
    monkeypatch.setattr("cellspot.jobs.enqueue_prediction", lambda settings, project, **kw: None)
    detector, classifier = add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    open_models(app)
    app.button(key="models_predict").click().run()
    no_exception(app)
    assert "Predicting every image with the active models" in texts(app.info)
    assert "No predictions yet: they show here when the prediction is done." in texts(app.info)
    with Session(app_engine) as session, session.begin():  # what the worker stores
        runs = {r.version: r.id for r in session.scalars(select(ModelRun))}
        image = session.scalars(select(Image).order_by(Image.name)).first()
        session.add(PredictionCell(image_id=image.id, detector_run_id=runs[detector],
                                   classifier_run_id=runs[classifier], x=20.0, y=30.0, label="dead",
                                   p_alive=0.2, uncertainty=0.4, score=0.9))
    model_runs.refresh()  # the page polls every 2 s; its reads are cached for 1.5 s
    app.run()
    no_exception(app)
    assert "Predicting every image" not in texts(app.info) and "No predictions yet" not in texts(app.info)
    assert table(app, "viability_pct")["dead"].sum() == 1


def test_the_predictions_shown_follow_the_active_pair_when_new_ones_are_stored(app, app_engine, monkeypatch):
    detector, old = add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)

    def store(classifier: str, label: str) -> None:  # what the worker stores
        with Session(app_engine) as session, session.begin():
            runs = {r.version: r.id for r in session.scalars(select(ModelRun))}
            image = session.scalars(select(Image).order_by(Image.name)).first()
            session.add(PredictionCell(image_id=image.id, detector_run_id=runs[detector],
                                       classifier_run_id=runs[classifier], x=20.0, y=30.0, label=label,
                                       p_alive=0.9 if label == "alive" else 0.1, uncertainty=0.4, score=0.9))

    store(old, "alive")
    open_models(app)
    assert app.selectbox(key="models_pair").value == (detector, old)
    new = add_run(app_engine, "classifier", promote=True)  # a newer classifier is promoted ...
    store(new, "dead")  # ... and predicts the project
    model_runs.refresh()
    app.run()
    no_exception(app)
    assert app.selectbox(key="models_pair").value == (detector, new)  # not the pair shown before
    assert table(app, "viability_pct")["dead"].sum() == 1
    app.selectbox(key="models_pair").set_value((detector, old)).run()  # a researcher's own pick stays
    app.run()
    assert app.selectbox(key="models_pair").value == (detector, old)


def test_a_double_click_on_train_queues_one_run_and_a_later_click_another(app, app_engine, monkeypatch):
    from appkit import researcher

    queued = []
    monkeypatch.setattr("cellspot.workflows.models.enqueue", lambda settings, run_id, **kw: queued.append(run_id))
    open_models(app)
    button(app, "Train").click().run()
    button(app, "Train").click().run()  # the second click of a double click
    no_exception(app)
    assert len(queued) == 1 and len(runs_in_store(app_engine)) == 1
    assert "queued a moment ago (a double click?)" in texts(app.info)
    app.number_input(key="train_epochs").set_value(2)  # another request: queued at once
    button(app, "Train").click().run()
    assert len(queued) == 2
    monkeypatch.setattr(researcher, "REPEAT_WINDOW_S", 0.0)  # the same request, later
    button(app, "Train").click().run()
    assert len(queued) == 3 and len(runs_in_store(app_engine)) == 3


def test_a_prediction_that_could_not_be_queued_is_not_awaited(app, app_engine, monkeypatch):
    from cellspot.jobs import JobQueueError

    def down(settings, project, **kw):
        raise JobQueueError("the job queue redis://127.0.0.1:1/0 cannot take the job: refused")

    monkeypatch.setattr("cellspot.jobs.enqueue_prediction", down)
    add_run(app_engine, "detector", promote=True), add_run(app_engine, "classifier", promote=True)
    open_models(app)
    app.button(key="models_predict").click().run()
    no_exception(app)
    assert "cannot take the job: refused" in texts(app.error)
    assert "Predicting every image" not in texts(app.info)
    with Session(app_engine) as session:
        project_id = session.scalar(select(Project.id))
    assert f"models_predict_since_{project_id}" not in app.session_state


def test_comparison_offers_runs_of_the_same_kind_and_rollback_needs_an_earlier_promotion(app, app_engine):
    classifier = add_run(app_engine, "classifier", curves=CURVES, promote=True)
    add_run(app_engine, "detector", curves=[{"epoch": 1, "val_f1": 0.5, "val_tp": 12, "val_fn": 3}])
    open_models(app)
    assert f"No other classifier run to compare {classifier} with" in texts(app.info)
    assert app.button(key="rollback-classifier").disabled  # one promotion: nothing to go back to
    newer = add_run(app_engine, "classifier", curves=CURVES, promote=True)
    model_runs.refresh()
    open_models(app)
    assert app.selectbox(key="compare_a").value == classifier
    assert app.selectbox(key="compare_b").options == [newer]
    assert not app.button(key="rollback-classifier").disabled


def test_comparison_opens_on_a_pair_it_can_compare(app, app_engine):
    """Classifier, detector, classifier: Run A opened on the detector (the second-newest run)
    and said there was nothing to compare it with, beside two classifiers."""
    older = add_run(app_engine, "classifier", curves=CURVES)
    add_run(app_engine, "detector", curves=[{"epoch": 1, "val_f1": 0.5, "val_tp": 12, "val_fn": 3}])
    newer = add_run(app_engine, "classifier", curves=CURVES)
    open_models(app)
    assert app.selectbox(key="compare_a").value == older
    assert app.selectbox(key="compare_b").value == newer
    assert not any("No other" in t for t in [i.value for i in app.info])


def test_predict_is_disabled_without_active_models(app, app_engine):
    add_run(app_engine, "classifier", promote=True)
    open_models(app)
    assert app.button(key="models_predict").disabled
    assert "no active detector yet" in texts(app.caption)
    assert "No predictions yet" in texts(app.info)


# --------------------------------------------------------------------------- chart helpers (pure)


@pytest.mark.parametrize(("progress", "parts"), [
    (None, ["queued"]),
    ({"epoch": 1, "epochs": 4, "step": 5, "steps": 10, "fraction": 0.125}, ["epoch 1/4", "step 5/10", "12 %"]),
    ({"epoch": 3, "epochs": 4, "step": 0, "steps": 0, "phase": "epoch_end", "val_loss": 0.25},
     ["epoch 3/4", "val loss 0.250", "50 %"]),
    ({"fraction": 1.0, "phase": "done", "eta_s": 0}, ["done", "100 %", "ETA 0 s"]),
    ({"epoch": 4, "epochs": 4, "fraction": 1.0, "phase": "calibrate", "eta_s": 0}, ["calibrating", "100 %"]),
])
def test_progress_text(progress, parts):
    text = charts.progress_text(progress)
    assert all(p in text for p in parts), text
    assert "epoch_end" not in text  # an internal token


def test_a_run_at_100_percent_that_still_works_says_it_is_finishing():
    """The bar sat at "100 % · ETA 0 s" for 10 s while the model calibrated or tuned its post-processing."""
    text = charts.progress_text({"epoch": 4, "epochs": 4, "fraction": 1.0, "phase": "epoch_end", "eta_s": 0},
                                "running")
    assert "ETA" not in text and "finishing: best epoch, calibration, post-processing" in text


def test_progress_text_before_the_first_step_follows_the_status():
    assert charts.progress_text({}, "running") == "loading the data and building the model"
    assert charts.progress_text({"queued_at": "2026-01-01T00:00:00"}, "queued") == "queued"


def test_a_resumed_run_counts_its_queue_time_from_the_resume():
    from datetime import datetime, timezone

    from appkit.model_runs import RunView

    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    old = datetime(2026, 1, 1, 8, 0, 0)  # naive = UTC, as SQLite returns it

    def view(status, progress):
        return RunView(1, "classifier-0001", "classifier", status, "cpu-fast", False, progress, {},
                       pd.DataFrame(), None, old)

    assert view("queued", {}).queued_for_s(now) == 4 * 3600
    assert view("queued", {"epoch": 6, "queued_at": "2026-01-01T11:59:30"}).queued_for_s(now) == 30
    assert view("running", {"queued_at": "2026-01-01T11:59:30"}).queued_for_s(now) == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (float("nan"), "-"), (-1, "-"), (0, "0 s"), (59.6, "1 min 00 s"), (75, "1 min 15 s"),
    (3 * 3600 + 120, "3 h 02 min"),
])
def test_format_seconds(seconds, text):
    assert charts.format_seconds(seconds) == text


@pytest.mark.parametrize("curves", [CURVES, pd.DataFrame(CURVES),
                                    [{"train_loss": 0.9, "metrics": {"balanced_accuracy": 0.6}},
                                     {"train_loss": 0.5, "metrics": {"balanced_accuracy": 0.8}}]])
def test_curves_long_keeps_losses_and_metrics_per_epoch(curves):
    long = charts.curves_long(curves, run="r1")
    assert set(long["series"]) >= {"train_loss", "balanced_accuracy"} and "elapsed_s" not in set(long["series"])
    assert long.loc[long["series"] == "train_loss", ["epoch", "value"]].values.tolist() == [[1, 0.9], [2, 0.5]]
    assert set(long.loc[long["series"] == "balanced_accuracy", "kind"]) == {"metric"}
    assert set(long["run"]) == {"r1"}
    loss, metrics = (c.to_dict() for c in charts.curves_charts(long))  # shown side by side
    assert loss["title"] == "loss" and metrics["title"] == "metrics"
    assert loss["autosize"] == {"type": "fit-x", "contains": "padding"}  # a lone chart keeps its height


def test_curves_long_leaves_match_counts_out():
    long = charts.curves_long([{"epoch": 1, "val_f1": 0.5, "val_tp": 12, "val_fp": 2, "fn": 3, "n": 40,
                                "n_true": 15, "train_loss": 0.4}])
    assert set(long["series"]) == {"val_f1", "train_loss"}


def test_curves_long_of_nothing_is_empty():
    assert charts.curves_long(None).empty and charts.curves_long([]).empty


def test_short_metrics_prefers_the_key_numbers_and_skips_nested_ones():
    metrics = {"confusion": [[1, 2], [3, 4]], "f1": 0.5, "balanced_accuracy": 0.75, "n": True}
    assert charts.short_metrics(metrics) == "balanced_accuracy 0.750 · f1 0.500"

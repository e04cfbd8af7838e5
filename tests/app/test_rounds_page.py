"""The Rounds page (``streamlit.testing.v1.AppTest`` on the seeded demo store, see conftest.py)
and its helpers: open a round (crowd-only default, injected scores), queue with thumbnails,
roll back, history, learning curve from fake model metrics, automatic mode.

No worker runs here: the automatic round's enqueue is replaced by a recorder, and model runs
are put in the store through the registry API.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta

import app_testkit  # noqa: F401 - puts app/ on sys.path
from app_testkit import CLASS_CODE
import numpy as np
import pandas as pd
import pytest
from appkit import rounds_view
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.active.rounds import target_runs_for
from cellspot.ml import registry
from cellspot.store.models import Image, Project, utcnow
from cellspot.workflows import auto_rounds as ar
from cellspot.workflows import rounds as wr

# --------------------------------------------------------------------------- helpers


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def open_rounds(at):
    """The Rounds page of a logged-in researcher (the login itself is tested in test_pages.py)."""
    at.session_state["role"] = "researcher"
    at.session_state["researcher_ok"] = True
    at.switch_page("views/rounds.py").run()
    no_exception(at)
    return at


TABLE_COLUMNS = {"rounds_queue": "thumbnail", "rounds_history": "target_runs"}


def table(at, key: str) -> pd.DataFrame:
    """The queue or history table (told apart by a column only it has)."""
    found = [frame.value for frame in at.dataframe if TABLE_COLUMNS[key] in frame.value.columns]
    assert found, f"no table {key!r}"
    return found[0]


def image_names(engine) -> list[str]:
    with Session(engine) as session:
        return session.scalars(select(Image.name).order_by(Image.id)).all()


def scores_for(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"image": names, "score": [0.9 - 0.1 * i for i in range(len(names))],
                         "reason": [f"because {n[:7]}" for n in names], "crowd": [0.25] * len(names)})


def open_in_store(engine, order: list[int], strategy: str = "crowd", *, minutes: int = 0) -> None:
    names = image_names(engine)
    with Session(engine) as session, session.begin():
        wr.open_new_round(session, "demo", strategy=strategy, scores=scores_for([names[i] for i in order]),
                          now=utcnow() + timedelta(minutes=minutes))


def demo_project(engine) -> tuple[int, int]:
    """``(id, target_runs_for)`` of the demo project, read from the store."""
    with Session(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "demo"))
        return project.id, target_runs_for(project)


def runs_input(at, project_id: int):
    """The "Runs per image this round" input (keyed by project)."""
    return at.number_input(key=f"round_target_runs_{project_id}")


def done_run(engine, kind: str, metrics: dict, *, minutes: int = 0) -> str:
    with Session(engine) as session, session.begin():
        run = registry.create_run(session, kind, project=session.scalar(select(Project)))
        run.status, run.metrics, run.finished_at = "done", metrics, utcnow() + timedelta(minutes=minutes)
        registry.promote(session, run)
        return run.version


# --------------------------------------------------------------------------- page


def test_empty_state_explains_each_part(app, app_engine):
    open_rounds(app)
    assert "Rounds" in [t.value for t in app.title]
    info = texts(app.info)
    assert "No round is open" in info and "No round yet." in info and "The curve starts" in info
    assert "crowd and coverage signals only" in texts(app.caption)
    assert "8 task runs so far (no model trained yet)." in texts(app.caption)  # no model was ever trained
    assert "since the last training" not in texts(app.caption)
    assert app.selectbox(key="round_strategy").value == "combined"
    assert not app.toggle(key=f"auto_enabled_{demo_project(app_engine)[0]}").value
    assert not app.dataframe and not app.get("vega_lite_chart")


def test_open_a_crowd_only_round_shows_its_queue_with_thumbnails(app, app_engine):
    open_rounds(app)
    app.number_input(key="round_top").set_value(3)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "Opened round 1 (combined, 3 images, crowd and coverage signals only)" in texts(app.success)
    assert "Round 1" in texts(app.markdown)
    queue = table(app, "rounds_queue")
    assert list(queue["rank"]) == [1, 2, 3] and queue["score"].is_monotonic_decreasing
    assert queue["reason"].str.contains("crowd disagreement").all()
    assert queue["thumbnail"].str.startswith("data:image/png;base64,").all()
    assert {"crowd_rank", "coverage"} <= set(queue.columns)
    history = table(app, "rounds_history")
    assert history[["round", "status", "strategy", "images"]].values.tolist() == [[1, "open", "combined", 3]]
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo").images == 3


def test_runs_per_image_defaults_to_the_projects_target_runs(app, app_engine):
    project_id, expected = demo_project(app_engine)
    open_rounds(app)
    shown = runs_input(app, project_id)
    assert shown.label == "Runs per image this round"
    assert shown.value == expected and (shown.min, shown.max) == (1, rounds_view.TARGET_RUNS_MAX)
    assert "served to this many students" in shown.help


def test_runs_per_image_default_follows_the_project_setting(app, app_engine):
    with Session(app_engine) as session, session.begin():
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**(project.settings or {}), "target_runs_per_image": 7}
    project_id, expected = demo_project(app_engine)
    assert expected == 7
    open_rounds(app)
    assert runs_input(app, project_id).value == 7
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "7 runs per image" in texts(app.success)
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo").target_runs == 7


def test_open_a_round_with_one_run_per_image(app, app_engine):
    project_id, default = demo_project(app_engine)
    assert default != 1  # the input changes what the round stores
    open_rounds(app)
    runs_input(app, project_id).set_value(1)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "students get its images first, 1 run per image." in texts(app.success)
    history = table(app, "rounds_history")
    assert history[["round", "status", "target_runs"]].values.tolist() == [[1, "open", 1]]
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo").target_runs == 1
        stored = wr.history(session, "demo")
    assert stored["target_runs"].tolist() == [1]
    assert runs_input(app, project_id).value == 1  # the form keeps what was typed


def test_injected_scores_and_their_reasons_are_shown(app, app_engine, monkeypatch):
    names = image_names(app_engine)
    chosen = [names[2], names[0]]
    monkeypatch.setattr("cellspot.active.rounds.default_scorer",
                        lambda session, project, strategy, top: scores_for(chosen))
    open_rounds(app)
    app.selectbox(key="round_strategy").set_value("crowd")
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    queue = table(app, "rounds_queue")
    assert queue[["image", "reason"]].values.tolist() == [[names[2], f"because {names[2][:7]}"],
                                                          [names[0], f"because {names[0][:7]}"]]
    assert queue["crowd"].tolist() == [0.25, 0.25]


@pytest.mark.parametrize(("strategy", "shown", "text"), [
    ("classifier", "warning", "No image got a classifier score (it needs model predictions)"),
])
def test_strategies_that_need_models_say_so(app, strategy, shown, text):
    open_rounds(app)
    # bald needs MC-dropout samples, which rounds do not compute: it is not offered
    boxes = [app.selectbox(key="round_strategy"), *(b for b in app.selectbox if b.key.startswith("auto_strategy_"))]
    assert len(boxes) == 2 and all(any(o.startswith("combined") for o in b.options) for b in boxes)
    assert not [o for b in boxes for o in b.options if o.startswith("bald")]
    app.selectbox(key="round_strategy").set_value(strategy)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert text in texts(getattr(app, shown))


def test_roll_back_reopens_the_previous_round(app, app_engine):
    open_in_store(app_engine, [0, 1])
    open_in_store(app_engine, [3], strategy="coverage", minutes=1)
    open_rounds(app)
    assert len(table(app, "rounds_queue")) == 1
    app.button(key="rounds_rollback").click().run()
    no_exception(app)
    assert "Round 2 rolled back; round 1 is open again." in texts(app.success)
    assert len(table(app, "rounds_queue")) == 2
    history = table(app, "rounds_history")
    assert history[["round", "status"]].values.tolist() == [[2, "rolled back"], [1, "open"]]
    app.button(key="rounds_rollback").click().run()
    assert "no round is open now" in texts(app.success) and "No round is open" in texts(app.info)


def test_roll_back_of_a_round_closed_meanwhile_says_so(app, app_engine):
    """The rollback confirmation of round 2 is open; the round is closed elsewhere (the CLI):
    the page says round 2 was closed meanwhile, not only "no open round"."""
    open_in_store(app_engine, [0, 1])
    open_in_store(app_engine, [3], strategy="coverage", minutes=1)
    open_rounds(app)
    with Session(app_engine) as session, session.begin():
        wr.close_current(session, "demo", number=2)  # `cellspot round close`
    rounds_view.refresh()
    app.button(key="rounds_rollback").click().run()
    no_exception(app)
    assert "round 2 was open when you pressed, but no round is open now" in texts(app.error)
    assert "nothing was rolled back" in texts(app.error)
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo") is None


def test_roll_back_from_a_stale_page_rolls_back_nothing(app, app_engine):
    """Two researcher tabs both show round 2; the first rolls it back, the second's button must
    not roll back round 1 as well."""
    open_in_store(app_engine, [0, 1])
    open_in_store(app_engine, [3], strategy="coverage", minutes=1)
    open_rounds(app)
    assert "Yes, roll back round 2" in [b.label for b in app.button]
    with Session(app_engine) as session, session.begin():
        wr.rollback_current(session, "demo", number=2)  # the other tab
    rounds_view.refresh()  # as the other tab's rollback does: this tab's rerun now reads round 1 as open
    app.button(key="rounds_rollback").click().run()
    no_exception(app)
    assert ("round 2 was open when you pressed, but round 1 is open now (changed a moment ago: a double "
            "click, another tab or another researcher); nothing was rolled back") in texts(app.error)
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo").number == 1


def test_the_queue_shows_the_rounds_progress_and_when_it_is_complete(app, app_engine):
    from cellspot.workflows.classroom import join_class, submit_run

    open_in_store(app_engine, [0, 1])
    with Session(app_engine) as session, session.begin():
        wr.open_new_round(session, "demo", strategy="crowd", scores=scores_for(image_names(app_engine)[:1]),
                          target_runs=1)
    open_rounds(app)
    queue = table(app, "rounds_queue")
    assert queue[["runs_round", "leased"]].values.tolist() == [[0, 0]]
    assert "0 of 1 queued image(s) have their 1 run(s) of this round" in texts(app.caption)
    assert not app.success
    with Session(app_engine) as session, session.begin():
        student = join_class(session, CLASS_CODE, "zoe")
        image_id = session.scalar(select(Image.id).where(Image.name == image_names(app_engine)[0]))
        submit_run(session, student, image_id, [(5.0, 5.0, "alive")], "k-zoe")
    rounds_view.refresh()
    app.run()
    assert table(app, "rounds_queue")[["runs_round", "leased"]].values.tolist() == [[1, 0]]
    assert "1 of 1 queued image(s) have their 1 run(s)" in texts(app.caption)
    assert "Every queued image has its runs" in texts(app.success)


def test_learning_curve_plots_task_runs_against_model_metrics(app, app_engine):
    done_run(app_engine, "classifier", {"balanced_accuracy": 0.7, "accuracy": 0.75})
    done_run(app_engine, "detector", {"f1": 0.6})
    open_in_store(app_engine, [0], minutes=1)
    done_run(app_engine, "classifier", {"balanced_accuracy": 0.85, "accuracy": 0.9}, minutes=2)
    open_in_store(app_engine, [1], minutes=3)
    open_rounds(app)
    charts = app.get("vega_lite_chart")
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    assert spec["encoding"]["x"]["field"] == "task_runs" and spec["encoding"]["y"]["field"] == "value"
    with Session(app_engine) as session:
        curve = wr.learning_curve(session, "demo")
    balanced = curve[curve["series"] == "classifier balanced_accuracy"]
    assert balanced[["round", "version", "value"]].values.tolist() == [[1, "classifier-0001", 0.7],
                                                                       [2, "classifier-0002", 0.85]]
    assert "One point per round" in texts(app.caption)


def test_learning_curve_says_it_plots_test_metrics_and_leaves_ece_out(app, app_engine):
    """The stored top-level metrics are the test split's (0.182 here; 0.6 on validation): the
    caption must say test, not validation; ECE (lower is better) stays out of the chart."""
    done_run(app_engine, "classifier", {"balanced_accuracy": 0.182, "accuracy": 0.3, "ece": 0.25, "split": "test",
                                        "val": {"balanced_accuracy": 0.6}})
    open_in_store(app_engine, [0], minutes=1)
    open_rounds(app)
    caption = texts(app.caption)
    assert "each model's metrics on its own test images" in caption and "validation" not in caption
    assert "Left out of the chart: ECE (calibration error, lower is better)" in caption
    spec = json.loads(app.get("vega_lite_chart")[0].proto.spec)
    assert spec["encoding"]["color"]["legend"]["labelLimit"] == 0
    with Session(app_engine) as session:
        points = wr.learning_curve(session, "demo")
    shown = rounds_view.curve_chart(points).to_dict()
    rows = next(iter(shown["datasets"].values()))
    assert {r["line"]: r["value"] for r in rows} == {"classifier balanced acc.": 0.182, "classifier accuracy": 0.3}


def test_all_queued_images_retired_is_not_called_complete(app, app_engine):
    open_in_store(app_engine, [0, 1, 2])
    with Session(app_engine) as session, session.begin():
        for image in session.scalars(select(Image)).all():
            image.status = "retired"
    open_rounds(app)
    caption, success = texts(app.caption), texts(app.success)
    assert "All 3 queued image(s) retired since the round opened (their consensus settled" in caption
    assert "0 of 0" not in caption and "Every queued image has its runs" not in success
    assert "The queued images retired before getting their" in success
    assert "students now get the open images outside the queue" in success


def test_an_empty_round_says_nothing_was_left_to_score(app, app_engine):
    """Every image retired: the round queues nothing, and must not say it was scored with crowd
    and coverage signals."""
    with Session(app_engine) as session, session.begin():
        for image in session.scalars(select(Image)).all():
            image.status = "retired"
    open_rounds(app)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "Opened round 1 (combined, 0 images: nothing left to score)" in texts(app.success)
    assert "students get its images first" not in texts(app.success)
    header = texts(app.markdown)
    assert "nothing was left to score (no open image)" in header and "crowd and coverage" not in header
    assert "no open image was left to score when it opened" in texts(app.info)


def test_history_and_queue_read_well(app, app_engine):
    open_in_store(app_engine, [0, 1])
    open_rounds(app)
    history = table(app, "rounds_history")
    assert history[["top", "detector_version", "classifier_version"]].values.tolist() == [
        ["all", "none", "none"]]
    assert "None" not in history.astype(str).values
    queue = table(app, "rounds_queue")
    columns = list(queue.columns)
    assert columns.index("runs_round") < columns.index("reason") and columns.index("leased") < columns.index("reason")
    toggle = app.toggle(key=f"auto_enabled_{demo_project(app_engine)[0]}")
    assert len(toggle.label) <= 10 and "Automatic mode" in toggle.help


def test_the_rounds_header_does_not_say_scored_with_no_model_predictions(app, app_engine):
    open_rounds(app)
    app.selectbox(key="round_strategy").set_value("classifier")
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    header = texts(app.markdown)
    assert "no model predictions, so every image tied (random order)" in header
    assert "scored with no model" not in header


def test_automatic_mode_is_saved_and_can_be_run_now(app, app_engine, monkeypatch):
    queued = []
    monkeypatch.setattr("cellspot.jobs.enqueue_auto_round", lambda settings, project, queued_at=None: queued.append(project))
    project_id = demo_project(app_engine)[0]
    open_rounds(app)
    app.toggle(key=f"auto_enabled_{project_id}").set_value(True)
    app.number_input(key=f"auto_every_{project_id}").set_value(5)
    app.selectbox(key=f"auto_strategy_{project_id}").set_value("crowd")
    app.button(key="FormSubmitter:rounds_auto-Save").click().run()
    no_exception(app)
    assert "after every 5 new task runs" in texts(app.success)
    with Session(app_engine) as session:
        stored = ar.AutoSettings.from_project(session.scalar(select(Project)))
    assert (stored.enabled, stored.every_runs, stored.strategy, stored.top) == (True, 5, "crowd", None)
    counter = texts(app.caption)
    assert "8 task runs so far (no model trained yet): the next automatic round is due and starts at the " \
           "worker's next check" in counter
    assert "0 more start" not in counter
    app.button(key="rounds_auto_now").click().run()
    no_exception(app)
    assert queued == ["demo"] and "Automatic round queued" in texts(app.success)
    assert "An automatic round is queued or running" in texts(app.info)
    assert app.button(key="rounds_auto_now").disabled
    app.button(key="rounds_auto_forget").click().run()  # e.g. no worker was running
    no_exception(app)
    assert "is forgotten: a new one can start" in texts(app.success)
    assert not app.button(key="rounds_auto_now").disabled


def test_a_double_click_on_open_round_opens_one_round(app, app_engine):
    open_rounds(app)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "opened a moment ago (a double click?)" in texts(app.info)
    with Session(app_engine) as session:
        assert len(wr.history(session, "demo")) == 1


def test_a_second_press_that_began_before_the_first_had_drawn_its_round_opens_nothing(app, app_engine):
    """The browser's second click can interrupt the first press's run after it opened the round
    but before it was remembered or drawn; the page then still showed no round, and a second
    round was opened."""
    open_rounds(app)
    with Session(app_engine) as session, session.begin():  # the first press's round, not yet drawn
        wr.open_new_round(session, "demo", strategy="random")
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert "no round was open when you pressed, but round 1 is open now" in texts(app.error)
    with Session(app_engine) as session:
        assert len(wr.history(session, "demo")) == 1
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()  # pressed again, seeing round 1
    assert "Opened round 2" in texts(app.success)


def test_automatic_mode_form_shows_the_picked_projects_settings(app, app_engine):
    from cellspot.store.queries import get_or_create_project

    with Session(app_engine) as session, session.begin():
        other = get_or_create_project(session, "other")
        session.flush()
        ar.set_auto_settings(session, other, enabled=True, every_runs=9)
        other_id = other.id
    demo_id = demo_project(app_engine)[0]
    open_rounds(app)
    app.number_input(key=f"auto_every_{demo_id}").set_value(5)  # typed, not saved
    app.selectbox(key="r_project_pick").set_value(other_id).run()
    no_exception(app)
    assert app.toggle(key=f"auto_enabled_{other_id}").value
    assert app.number_input(key=f"auto_every_{other_id}").value == 9
    app.button(key="FormSubmitter:rounds_auto-Save").click().run()
    no_exception(app)
    with Session(app_engine) as session:
        stored = ar.AutoSettings.from_project(session.get(Project, other_id))
        demo = ar.AutoSettings.from_project(session.get(Project, demo_id))
    assert (stored.enabled, stored.every_runs) == (True, 9) and not demo.enabled


# --------------------------------------------------------------------------- helpers (pure)


@pytest.mark.parametrize(("shape", "size", "expected"), [
    ((40, 100, 3), 64, (64, 26)), ((10, 10, 3), 64, (10, 10)), ((300, 150, 3), 32, (16, 32)),
])
def test_data_uri_is_a_small_png(shape, size, expected):
    uri = rounds_view.data_uri(np.full(shape, 128, np.uint8), size)
    assert uri.startswith("data:image/png;base64,")
    picture = PILImage.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert picture.size == expected


@pytest.mark.parametrize(("sources", "parts"), [
    (wr.ScoringSources(None, None, None, None), ["crowd and coverage signals only."]),
    (wr.ScoringSources("d-1", "c-1", None, None), ["crowd and coverage signals only", "predict the project"]),
    (wr.ScoringSources("d-1", "c-1", "d-1", "c-1"), ["Scores the predictions of d-1 + c-1."]),
    (wr.ScoringSources("d-2", "c-1", "d-1", "c-1"), ["predictions of d-1 + c-1", "active models (d-2 + c-1)"]),
])
def test_models_caption(sources, parts):
    text = rounds_view.models_caption(sources)
    assert all(p in text for p in parts), text


def test_learning_curve_counts_task_runs_in_whole_numbers():
    points = pd.DataFrame({"round": [1, 2], "task_runs": [69, 120], "series": ["classifier f1"] * 2,
                           "version": ["classifier-0001", "classifier-0002"], "value": [0.8, 0.85]})
    axis = rounds_view.curve_chart(points).to_dict()["encoding"]["x"]["axis"]
    assert axis["format"] == "d" and axis["tickMinStep"] == 1


@pytest.mark.parametrize(("statuses", "runs", "line", "message"), [
    (["active", "active"], [0, 1], "1 of 2 queued image(s) have their 1 run(s) of this round", None),
    (["active", "retired"], [1, 0], "1 of 1 queued image(s) have their 1 run(s) of this round · 0 being "
                                    "labelled now · 1 retired since the round opened",
     "Every queued image has its runs or retired: students now get"),
    (["active"], [1], "1 of 1 queued image(s)", "Every queued image has its runs: students now get"),
    (["retired"] * 3, [0, 0, 0], "All 3 queued image(s) retired since the round opened", "retired before getting"),
    (["active", "at_max_runs"], [0, 0], "0 of 1 queued image(s) have their 1 run(s) of this round · 0 being "
                                        "labelled now · 1 at the most runs an image gets", None),
    (["active", "at_max_runs", "retired"], [1, 0, 0], "1 retired since the round opened · 1 at the most runs",
     "Every queued image has its runs or retired"),
])
def test_queue_status(statuses, runs, line, message):
    queue = pd.DataFrame({"status": statuses, "runs_round": runs, "leased": [0] * len(runs)})
    got_line, got_message = rounds_view.queue_status(queue, 1)
    assert line in got_line and "0 of 0" not in got_line
    assert (got_message is None) if message is None else (message in got_message)


def test_the_queue_table_shows_statuses_as_words(monkeypatch):
    monkeypatch.setattr(rounds_view, "thumbnails", lambda ids: {})
    queue = pd.DataFrame({"rank": [1, 2], "image_id": [7, 8], "image": ["a.png", "b.png"], "score": [0.9, 0.8],
                          "status": ["active", "at_max_runs"], "runs_round": [0, 0], "leased": [0, 0],
                          "n_runs": [1, 5], "reason": ["x", "y"], "crowd": [0.5, 0.4]})
    shown = rounds_view.queue_with_thumbnails(queue)
    assert shown["status"].tolist() == ["active", "at max runs"] and "crowd" in shown.columns


def _status(*, enabled=True, task_runs=80, baseline=0, counted_from=None, every=50):
    return ar.AutoStatus(ar.AutoSettings(enabled=enabled, every_runs=every), task_runs, baseline, None,
                         counted_from=counted_from)


@pytest.mark.parametrize(("status", "text"), [
    (_status(enabled=False, task_runs=68), "68 task runs so far (no model trained yet)."),
    (_status(task_runs=20), "20 task runs so far (no model trained yet); 30 more start the next automatic round."),
    (_status(task_runs=100, baseline=20, counted_from="training"),
     "80 new task runs since the last training: the next automatic round is due and starts at the worker's next "
     "check (once a minute)."),
    (_status(task_runs=30, baseline=20, counted_from="automatic round"),
     "10 new task runs since the last automatic round; 40 more start the next automatic round."),
])
def test_auto_counter(status, text):
    assert rounds_view.auto_counter(status) == text


def test_curve_legend_labels_are_short_and_ece_left_out():
    points = pd.DataFrame({"round": [1] * 3, "task_runs": [10] * 3, "version": ["c-1"] * 3, "split": ["test"] * 3,
                           "metric": ["balanced_accuracy", "roc_auc", "ece"], "value": [0.7, 0.8, 0.1],
                           "series": ["classifier balanced_accuracy", "classifier roc_auc", "classifier ece"]})
    chart = rounds_view.curve_chart(points).to_dict()
    rows = next(iter(chart["datasets"].values()))
    assert sorted(r["line"] for r in rows) == ["classifier ROC AUC", "classifier balanced acc."]
    assert chart["encoding"]["y"]["title"] == "model metric (higher is better)"
    assert chart["autosize"] == {"type": "fit-x", "contains": "padding"}  # it was squeezed to a few pixels
    assert "test images" in rounds_view.curve_caption(points) and "ECE" in rounds_view.curve_caption(points)
    # the two kinds' F1 measure different things
    assert rounds_view.curve_label("classifier f1") == "classifier dead-class F1"
    assert rounds_view.curve_label("detector f1") == "detector F1"
    mixed = rounds_view.curve_caption(points.assign(split=["test", "val", "val"]))
    assert "its validation images where it had no test images" in mixed and "split column" in mixed

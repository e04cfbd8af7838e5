"""The Rounds page: close the open round (confirmation, stale pages, double clicks), the queue's
notes on tied scores and on rank against score, and runs per image above the project's maximum."""

from __future__ import annotations

import app_testkit  # noqa: F401 - puts app/ on sys.path
import pandas as pd
import pytest
from appkit import rounds_view
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_rounds_page import (demo_project, image_names, no_exception, open_in_store, open_rounds, runs_input, table,
                              texts)

from cellspot.store.models import Project
from cellspot.workflows import auto_rounds as ar
from cellspot.workflows import rounds as wr


def _set(engine, **settings) -> None:
    with Session(engine) as session, session.begin():
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**(project.settings or {}), **settings}


def _open_with_scores(engine, scores: list[float], strategy: str = "conflict", **kw) -> None:
    names = image_names(engine)[:len(scores)]
    frame = pd.DataFrame({"image": names, "score": scores, "reason": ["no conflict"] * len(names),
                          "rank": range(1, len(names) + 1)})
    with Session(engine) as session, session.begin():
        wr.open_new_round(session, "demo", strategy=strategy, scores=frame, **kw)


# --------------------------------------------------------------------------- close


def test_close_this_round_leaves_no_round_open(app, app_engine):
    open_in_store(app_engine, [0, 1])
    open_rounds(app)
    assert "Yes, close round 1" in [b.label for b in app.button]
    app.button(key="rounds_close").click().run()
    no_exception(app)
    assert ("Round 1 closed; no round is open now: students get the images with the fewest runs until you open "
            "the next round.") in texts(app.success)
    assert "No round is open: students get the images with the fewest runs" in texts(app.info)
    assert "automatic mode" not in texts(app.success).lower()
    history = table(app, "rounds_history")
    assert history[["round", "status"]].values.tolist() == [[1, "closed"]]
    assert history["closed_at"].iloc[0] != "still open"
    assert not [b for b in app.button if b.key in ("rounds_close", "rounds_rollback")]
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo") is None


def test_close_from_a_stale_page_closes_nothing(app, app_engine):
    """Two tabs show round 2; the other closes it and opens round 3: this tab's button must not close round 3."""
    open_in_store(app_engine, [0, 1])
    open_in_store(app_engine, [2], minutes=1)
    open_rounds(app)
    with Session(app_engine) as session, session.begin():  # the other tab
        wr.close_current(session, "demo", number=2)
        wr.open_new_round(session, "demo", strategy="crowd", scores=pd.DataFrame({"image": image_names(app_engine)[:1],
                                                                                  "score": [1.0]}))
    app.button(key="rounds_close").click().run()
    no_exception(app)
    assert "round 2 was open when you pressed, but round 3 is open now" in texts(app.error)
    with Session(app_engine) as session:
        assert wr.current_round_info(session, "demo").number == 3


def test_a_double_click_on_close_closes_once_and_says_so(app, app_engine):
    open_in_store(app_engine, [0, 1])
    open_rounds(app)
    app.button(key="rounds_close").click().run()
    assert "Round 1 closed" in texts(app.success)
    # the second click of a double click: its callback stored the round its button showed
    app.session_state["rounds_close_number"] = 1
    app.run()
    no_exception(app)
    assert "Round 1 was closed a moment ago (a double click?)" in texts(app.info) and not app.error
    with Session(app_engine) as session:
        assert wr.history(session, "demo")["status"].tolist() == ["closed"]


def test_closing_says_when_the_automatic_mode_will_open_the_next_round(app, app_engine):
    with Session(app_engine) as session, session.begin():
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=30)
    open_in_store(app_engine, [0])
    open_rounds(app)
    app.button(key="rounds_close").click().run()
    no_exception(app)
    assert "Automatic mode is on: it opens a new round after 30 new task runs" in texts(app.success)


# --------------------------------------------------------------------------- queue notes


def test_a_queue_whose_scores_all_tie_says_its_order_is_random(app, app_engine):
    _open_with_scores(app_engine, [0.0, 0.0, 0.0])
    open_rounds(app)
    warning = texts(app.warning)
    assert "Every queued image has the same conflict score (0.000)" in warning
    assert "only a random (seeded) tie-break" in warning
    assert "Rank is the order" not in texts(app.caption)


def test_a_queue_ranked_out_of_score_order_says_rank_is_the_selection_order(app, app_engine):
    _open_with_scores(app_engine, [0.9, 0.5, 0.7, 0.1], strategy="combined")
    open_rounds(app)
    assert "Rank is the order in which the images were selected, not the order of their scores" in texts(app.caption)
    assert "same combined score" not in texts(app.warning)


@pytest.mark.parametrize(("scores", "parts"), [
    ([None, None], ["No image got a conflict score (it needs model predictions)"]),
    ([0.0, 0.0, 0.0], ["Every queued image has the same conflict score (0.000)", "A combined round blends"]),
    ([0.5, 0.5, None], ["Every scored image (2 of 3; the others have no score and come last) has the same "
                        "conflict score (0.500)"]),
    ([0.5], None),  # one image: nothing to tell apart
    ([0.9, 0.5, 0.5], None),
    ([0.9, None], None),
])
def test_score_warning(scores, parts):
    queue = pd.DataFrame({"rank": range(1, len(scores) + 1), "score": pd.array(scores, dtype="Float64")})
    text = rounds_view.score_warning(queue, "conflict")
    if parts is None:
        assert text is None
    else:
        assert all(p in text for p in parts), text


@pytest.mark.parametrize(("scores", "shown"), [
    ([0.9, 0.5, 0.7], True), ([0.9, 0.5, 0.5, 0.1], False), ([0.9, None, 0.95], True), ([0.2, None], False),
    ([0.3, 0.3], False),
])
def test_rank_caption(scores, shown):
    queue = pd.DataFrame({"rank": range(1, len(scores) + 1), "score": pd.array(scores, dtype="Float64")})
    assert (rounds_view.rank_caption(queue) is not None) is shown


# --------------------------------------------------------------------------- runs above the maximum


def test_runs_per_image_default_is_capped_at_the_maximum_and_more_is_warned(app, app_engine):
    _set(app_engine, target_runs_per_image=20, retire_max_runs=4)
    project_id, _ = demo_project(app_engine)
    open_rounds(app)
    assert runs_input(app, project_id).value == 4
    assert "An image gets at most 4 runs in all" in runs_input(app, project_id).help
    assert not app.warning
    runs_input(app, project_id).set_value(20)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    warnings = [w.value for w in app.warning]
    assert len(warnings) == 1, warnings  # the round's warning, not the form's as well
    assert warnings[0].startswith("Round 1 asks for 20 runs per image, more than the 4 runs an image gets at most")
    app.button(key="rounds_close").click().run()  # no round open: the form's value is warned about
    no_exception(app)
    assert [w.value for w in app.warning][0].startswith("20 runs per image is more than the 4 runs")
    # the next round within the maximum: no warning any more
    runs_input(app, project_id).set_value(3)
    app.button(key="FormSubmitter:rounds_open-Open round").click().run()
    no_exception(app)
    assert not app.warning


def test_an_old_round_above_the_maximum_is_warned_about(app, app_engine):
    _set(app_engine, retire_max_runs=4)
    with Session(app_engine) as session, session.begin():
        wr.open_new_round(session, "demo", strategy="crowd", target_runs=9)
    open_rounds(app)
    assert "Round 1 asks for 9 runs per image, more than the 4 runs" in texts(app.warning)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"target_runs_per_image": 20, "retire_max_runs": 4}, 4),
    ({"target_runs_per_image": 3, "retire_max_runs": 4}, 3),
    ({"target_runs_per_image": 20, "retire_max_runs": None}, 20),  # no maximum
    ({"target_runs_per_image": 20, "retire_max_runs": 0}, 20),  # 0 = no maximum (an older store)
    ({"target_runs_per_image": 12}, 10),  # the retirement default maximum
])
def test_default_target_runs(settings, expected):
    assert rounds_view.default_target_runs(Project(name="x", settings=settings)) == expected


@pytest.mark.parametrize(("target", "cap", "number", "start"), [
    (20, 4, None, "20 runs per image is more than the 4 runs an image gets at most"),
    (20, 4, 3, "Round 3 asks for 20 runs per image, more than the 4 runs"),
    (4, 4, None, None), (20, None, None, None), (None, 4, 1, None),
])
def test_runs_over_max(target, cap, number, start):
    text = rounds_view.runs_over_max(target, cap, number)
    assert (text is None) if start is None else text.startswith(start), text

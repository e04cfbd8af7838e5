"""Rounds: open with a ranked queue and its model versions, close the previous, roll back, history."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.active import rounds
from cellspot.ml import registry
from cellspot.store import queries as q
from cellspot.store.models import ALQueueItem, ALRound, Image, Project
from cellspot.workflows import classroom as c

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture
def db(sqlite_engine) -> Session:
    with Session(sqlite_engine, expire_on_commit=False) as sess:
        yield sess
        sess.rollback()


def _project(session: Session, **settings) -> tuple[Project, dict[str, Image]]:
    project = q.get_or_create_project(session, "p", class_codes=["7B"], **settings)
    images = {n: Image(project=project, name=n, width=100, height=80, has_pixels=True) for n in NAMES}
    session.add_all(images.values())
    session.flush()
    return project, images


def _scores(order: str, **extra) -> pd.DataFrame:
    """Scores best first for the image names in ``order`` (e.g. "cab")."""
    n = len(order)
    return pd.DataFrame({"image": list(order), "score": [1.0 - i / n for i in range(n)],
                         "reason": [f"why {x}" for x in order], **extra})


def _queue(session: Session, round_: ALRound) -> list[str]:
    return list(rounds.round_queue(session, round_)["image"])


def _active(session: Session, project: Project, kind: str):
    run = registry.create_run(session, kind, project=project)
    run.status = "done"
    return registry.promote(session, run)


def test_open_round_stores_the_ranked_queue_with_its_models(session) -> None:
    project, images = _project(session, target_runs=2)
    det, cls = _active(session, project, "detector"), _active(session, project, "classifier")
    q.submit_task_run(session, images["a"], q.get_or_create_annotator(session, project, "x", "7B"), [], "k0")
    scores = _scores("ceab", crowd=[0.5, 0.25, float("nan"), 1.0], note=["x", "y", "z", "w"],
                     retired=[False] * 4)
    round_ = rounds.open_round(session, project, strategy="crowd", scores=scores, now=T0)
    assert (round_.number, round_.status, round_.strategy) == (1, "open", "crowd")
    assert (round_.detector_run_id, round_.classifier_run_id) == (det.id, cls.id)
    assert round_.params == {"top": None, "target_runs": 2, "snapshot_id": None, "task_runs_at_open": 1,
                             "n_scored": 4}
    rows = session.execute(sa.select(ALQueueItem.rank, Image.name, ALQueueItem.score, ALQueueItem.reason,
                                     ALQueueItem.components)
                           .join(Image, Image.id == ALQueueItem.image_id).order_by(ALQueueItem.rank)).all()
    assert [(r, n, why) for r, n, _, why, _ in rows] == [(1, "c", "why c"), (2, "e", "why e"),
                                                       (3, "a", "why a"), (4, "b", "why b")]
    assert rows[0].score == 1.0 and rows[0].components == {"crowd": 0.5}  # text and flag columns are not components
    assert rows[2].components == {"crowd": None}  # NaN stored as null
    assert rounds.current_round(session, project).id == round_.id


@pytest.mark.parametrize(
    ("scores", "top", "expected"),
    [
        (_scores("edcba"), None, list("edcba")),
        (_scores("edcba"), 2, ["e", "d"]),
        (_scores("abc").assign(rank=[3, 1, 2]), None, ["b", "c", "a"]),  # an explicit rank wins
        (_scores("").astype({"score": float}), None, []),  # nothing scored: an empty queue
    ],
)
def test_queue_order_and_top(db, scores, top, expected) -> None:
    project, _ = _project(db)
    assert _queue(db, rounds.open_round(db, project, scores=scores, top=top)) == expected


def test_scores_by_image_id_and_unlabelled_images_are_queued(db) -> None:
    project, images = _project(db)
    frame = pd.DataFrame({"image_id": [images["d"].id, images["a"].id], "score": [2.0, 1.0]})
    round_ = rounds.open_round(db, project, scores=frame)
    assert _queue(db, round_) == ["d", "a"]  # images nobody has labelled yet
    assert list(rounds.round_queue(db, round_)["n_runs"]) == [0, 0]


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (pd.DataFrame({"image": ["a", "zz"], "score": [1.0, 0.5]}), rounds.ScoresError, "not in project"),
        (pd.DataFrame({"image": ["a", "a"], "score": [1.0, 0.5]}), rounds.ScoresError, "more than once"),
        (pd.DataFrame({"image": ["a"]}), rounds.ScoresError, "'score' column"),
        (pd.DataFrame({"name": ["a"], "score": [1.0]}), rounds.ScoresError, "'image' or 'image_id'"),
        (pd.DataFrame({"image_id": [10**6], "score": [1.0]}), rounds.ScoresError, "not in project"),
    ],
)
def test_bad_scores_are_refused(db, scores, error, match) -> None:
    project, _ = _project(db)
    with pytest.raises(error, match=match):
        rounds.open_round(db, project, scores=scores)
    assert db.scalar(sa.select(sa.func.count()).select_from(ALRound)) == 0


def test_scores_name_the_models_that_produced_them(db) -> None:
    project, _ = _project(db)
    _active(db, project, "detector")
    older = registry.create_run(db, "classifier", project=project)
    no_model = _scores("ab", detector_run_id=[None, None], classifier_run_id=[None, None])
    round_ = rounds.open_round(db, project, scores=no_model)
    assert (round_.detector_run_id, round_.classifier_run_id) == (None, None)  # crowd-only scores
    named = _scores("ab", detector_run_id=[None, None], classifier_run_id=[older.id, older.id])
    assert rounds.open_round(db, project, scores=named).classifier_run_id == older.id


def test_scorer_is_called_when_no_scores_are_given(db) -> None:
    project, _ = _project(db)
    calls = []

    def scorer(session, proj, strategy, top):
        calls.append((proj.name, strategy, top))
        return _scores("ba")

    round_ = rounds.open_round(db, project, strategy="coverage", top=5, scorer=scorer)
    assert calls == [("p", "coverage", 5)] and _queue(db, round_) == ["b", "a"]


def test_default_scorer_works_before_any_model(db) -> None:
    """The real scoring code (crowd + coverage signals only): every servable image is queued."""
    project, images = _project(db)
    images["e"].status = "retired"
    images["d"].has_pixels = False
    db.flush()
    round_ = rounds.open_round(db, project)
    assert sorted(_queue(db, round_)) == ["a", "b", "c"]
    assert (round_.detector_run_id, round_.classifier_run_id) == (None, None)


def test_open_closes_the_previous_and_rollback_restores_it(session) -> None:
    project, _ = _project(session)
    first = rounds.open_round(session, project, scores=_scores("abc"), now=T0)
    second = rounds.open_round(session, project, scores=_scores("cba"), now=T0 + timedelta(hours=1))
    assert (first.status, second.status, second.number) == ("closed", "open", 2)
    assert first.closed_at is not None
    restored = rounds.rollback_round(session, second)
    assert restored.id == first.id and (first.status, first.closed_at) == ("open", None)
    assert second.status == "rolled_back" and _queue(session, second) == ["c", "b", "a"]  # kept for history
    with pytest.raises(rounds.RoundError, match="round 2 is rolled_back; only the open round"):
        rounds.rollback_round(session, second)
    third = rounds.open_round(session, project, scores=_scores("b"))
    assert third.number == 3 and first.status == "closed"
    assert rounds.rollback_round(session, third).id == first.id  # skips the rolled-back round 2
    assert rounds.rollback_round(session, first) is None
    assert rounds.current_round(session, project) is None
    assert list(rounds.round_history(session, project)["status"]) == ["rolled_back", "rolled_back", "rolled_back"]


def test_rounds_opened_at_the_same_moment_leave_one_open(engine) -> None:
    """Two researchers pressing "Open round" in the same second left several rounds open
    (each closed the round it had read, then opened its own)."""
    from concurrency import at_once

    from cellspot.store.db import session_factory
    from cellspot.workflows import rounds as wr

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"))
    outcomes: list[str] = []

    def work(i: int) -> None:
        try:
            with make() as s, s.begin():
                wr.open_new_round(s, "p", strategy="random", scores=_scores("cd"))
            outcomes.append("opened")
        except wr.RoundsWorkflowError as exc:
            outcomes.append(str(exc))

    at_once(4, work)
    with make() as s:
        statuses = s.execute(sa.select(ALRound.number, ALRound.status).order_by(ALRound.number)).all()
    assert [status for _, status in statuses].count("open") == 1, statuses
    assert len(statuses) == 1 + outcomes.count("opened"), (statuses, outcomes)
    assert all(o == "opened" or "opened at the same moment" in o for o in outcomes), outcomes


def test_a_round_opened_by_another_process_after_the_check_is_not_replaced(engine) -> None:
    """Two browsers showing round 1 pressed Open round a few ms apart: both checks read round 1
    before either wrote, and rounds 2 and 3 were opened (4 of 5 tries). Here the other press
    commits round 2 while this one is scoring, after its check."""
    from cellspot.store.db import session_factory
    from cellspot.workflows import rounds as wr

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"))

    def scorer(session, project, strategy, top):  # the other researcher's press lands meanwhile
        with make() as other, other.begin():
            wr.open_new_round(other, "p", strategy="random", scores=_scores("cd"), replacing=1)
        return _scores("ab")

    with pytest.raises(wr.RoundsWorkflowError, match="round 1 was open when you pressed, but round 2 is open now"):
        with make() as s, s.begin():
            wr.open_new_round(s, "p", strategy="random", scorer=scorer, replacing=1)
    with make() as s:
        statuses = s.execute(sa.select(ALRound.number, ALRound.status).order_by(ALRound.number)).all()
    assert [tuple(r) for r in statuses] == [(1, "closed"), (2, "open")]


def test_a_round_is_opened_only_over_the_round_the_caller_saw(session) -> None:
    """The first press of a double click opened round 2; the second (seen: round 1) opens nothing."""
    from cellspot.workflows import rounds as wr

    _project(session)
    with pytest.raises(wr.RoundsWorkflowError, match="round 1 was open when you pressed, but no round is open now"):
        wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"), replacing=1)
    assert wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"), replacing=None).number == 1
    assert wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"), replacing=1).number == 2
    with pytest.raises(wr.RoundsWorkflowError, match=r"round 1 was open when you pressed, but round 2 is open now "
                                                     r"\(changed a moment ago: a double click, another tab or "
                                                     r"another researcher\); nothing was opened"):
        wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"), replacing=1)
    assert [r.number for r in session.scalars(sa.select(ALRound))] == [1, 2]


def test_round_history(db) -> None:
    project, images = _project(db, target_runs=4)
    who = q.get_or_create_annotator(db, project, "x", "7B")
    rounds.open_round(db, project, strategy="random", scores=_scores("ab"), top=1, now=T0)
    run, _ = q.submit_task_run(db, images["a"], who, [], "k1")
    run.submitted_at = T0 + timedelta(minutes=5)
    rounds.open_round(db, project, strategy="crowd", scores=_scores("cde"), now=T0 + timedelta(hours=1))
    history = rounds.round_history(db, project, now=T0 + timedelta(hours=2))
    assert list(history.columns) == rounds.HISTORY_COLUMNS
    assert history[["round", "status", "strategy", "images", "target_runs", "task_runs_at_open",
                    "task_runs"]].values.tolist() == [
        [1, "closed", "random", 1, 4, 0, 1],
        [2, "open", "crowd", 3, 4, 1, 0],
    ]
    assert history["top"].iloc[0] == 1 and pd.isna(history["top"].iloc[1])
    assert history["closed_at"].iloc[0] == T0 + timedelta(hours=1) and pd.isna(history["closed_at"].iloc[1])


def test_round_queue_spreads_the_components(db) -> None:
    project, _ = _project(db)
    round_ = rounds.open_round(db, project, scores=_scores("ab", crowd=[0.9, 0.1], coverage=[1.0, 0.5]))
    queue = rounds.round_queue(db, round_)
    assert list(queue.columns) == [*rounds.QUEUE_COLUMNS, "crowd", "coverage"]
    assert queue[["image", "crowd", "coverage"]].values.tolist() == [["a", 0.9, 1.0], ["b", 0.1, 0.5]]
    assert math.isclose(queue["score"].iloc[1], 0.5)


@pytest.mark.parametrize(("kw", "match"), [({"top": 0}, "top must be"), ({"target_runs": 0}, "target_runs")])
def test_bad_round_arguments(db, kw, match) -> None:
    project, _ = _project(db)
    with pytest.raises(ValueError, match=match):
        rounds.open_round(db, project, scores=_scores("a"), **kw)


def test_next_image_without_a_round_behaves_as_before(db) -> None:
    """After the only round is rolled back, images outside its queue are served again."""
    project, images = _project(db)
    round_ = rounds.open_round(db, project, scores=_scores("a"), now=T0)
    ann = c.join_class(db, "7B", "ann")
    assert c.next_image(db, ann, random.Random(0), now=T0).name == "a"
    rounds.rollback_round(db, round_)
    picks = {c.next_image(db, ann, random.Random(s)).name for s in range(20)}
    assert picks == set(NAMES)  # all images with the fewest runs, at random


@pytest.mark.parametrize(("values", "expected"), [
    ({}, rounds.DEFAULT_TARGET_RUNS), ({"target_runs": 4}, 4), ({"target_runs_per_image": 2}, 2),
    ({"target_runs_per_image": 1, "target_runs": 4}, 1),
])
def test_target_runs_come_from_the_setup_pages_setting(session: Session, values, expected) -> None:
    project, _ = _project(session, **values)
    assert rounds.target_runs_for(project) == expected

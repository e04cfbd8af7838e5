"""Closing the open round without opening another (library, workflow, ``cellspot round close``),
the automatic mode after a close, and what the strategy list offers the Rounds page and CLI."""

from __future__ import annotations

import random
import threading
import time
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

from cellspot.active import rounds
from cellspot.active.strategies import list_strategies
from cellspot.cli import main
from cellspot.ml import registry
from cellspot.store import queries as q
from cellspot.store.models import ALRound, Image, Project
from cellspot.workflows import auto_rounds as ar
from cellspot.workflows import classroom as c
from cellspot.workflows import rounds as wr

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
NAMES = ["a", "b", "c", "d", "e"]


def _project(session: Session, **settings) -> tuple[Project, dict[str, Image]]:
    project = q.get_or_create_project(session, "p", class_codes=["7B"], **settings)
    images = {n: Image(project=project, name=n, width=100, height=80, has_pixels=True) for n in NAMES}
    session.add_all(images.values())
    session.flush()
    return project, images


def _scores(order: str) -> pd.DataFrame:
    n = len(order)
    return pd.DataFrame({"image": list(order), "score": [1.0 - i / n for i in range(n)],
                         "reason": [f"why {x}" for x in order]})


def _statuses(session: Session) -> list[tuple[int, str]]:
    return [tuple(r) for r in session.execute(sa.select(ALRound.number, ALRound.status).order_by(ALRound.number))]


# --------------------------------------------------------------------------- library


def test_close_leaves_no_round_open_and_the_history_shows_it_closed(session) -> None:
    project, _ = _project(session)
    first = rounds.open_round(session, project, scores=_scores("abc"), now=T0)
    closed = rounds.close_round(session, first, now=T0 + timedelta(hours=1))
    assert closed is first and (first.status, rounds.utc(first.closed_at)) == ("closed", T0 + timedelta(hours=1))
    assert rounds.current_round(session, project) is None
    history = rounds.round_history(session, project)
    assert history[["round", "status", "images"]].values.tolist() == [[1, "closed", 3]]
    assert history["closed_at"].iloc[0] == T0 + timedelta(hours=1)
    assert list(rounds.round_queue(session, first)["image"]) == ["a", "b", "c"]  # kept for the history
    second = rounds.open_round(session, project, scores=_scores("de"), replacing=None)  # none open: no clash
    assert second.number == 2 and _statuses(session) == [(1, "closed"), (2, "open")]


@pytest.mark.parametrize(("steps", "match"), [
    (["close"], "round 1 is closed; only the open round can be closed"),
    (["open"], "round 1 is closed; only the open round can be closed"),  # the next round closed it
    (["rollback"], "round 1 is rolled_back; only the open round can be closed"),
])
def test_only_the_open_round_can_be_closed(session, steps, match) -> None:
    project, _ = _project(session)
    first = rounds.open_round(session, project, scores=_scores("ab"), now=T0)
    for step in steps:
        if step == "close":
            rounds.close_round(session, first)
        elif step == "open":
            rounds.open_round(session, project, scores=_scores("c"))
        else:
            rounds.rollback_round(session, first)
    before = _statuses(session)
    with pytest.raises(rounds.RoundError, match=match):
        rounds.close_round(session, first)
    assert _statuses(session) == before


def test_a_round_closed_by_another_process_is_not_closed_again(engine) -> None:
    """The in-memory round still reads "open": the conditional UPDATE finds it closed."""
    from cellspot.store.db import session_factory

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"), now=T0)
    with make() as s, s.begin():
        stale = rounds.current_round(s, q.get_project(s, "p"))
        with make() as other, other.begin():
            wr.close_current(other, "p", now=T0 + timedelta(hours=1))
        assert stale.status == "open"
        with pytest.raises(rounds.RoundError, match="round 1 is no longer the open round"):
            rounds.close_round(s, stale, now=T0 + timedelta(hours=2))
    with make() as s:
        closed = s.scalar(sa.select(ALRound))
        assert (closed.status, rounds.utc(closed.closed_at)) == ("closed", T0 + timedelta(hours=1))


def test_closing_waits_for_an_opening_that_holds_the_projects_lock(engine) -> None:
    """PostgreSQL: a close that began while an opening held the project's row lock waits for it,
    then sees the new round and closes nothing (it must not close the round the opening is
    replacing under its feet)."""
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks: SQLite serializes writers on its own")
    from cellspot.store.db import session_factory

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"), now=T0)
    outcome: list[str] = []

    def close() -> None:
        try:
            with make() as s, s.begin():
                wr.close_current(s, "p", number=1)
            outcome.append("closed")
        except wr.RoundsWorkflowError as exc:
            outcome.append(str(exc))

    with make() as opener, opener.begin():
        project = q.get_project(opener, "p")
        rounds._lock_rounds(opener, project.id)  # an opening under way: it holds the project's lock
        closer = threading.Thread(target=close)
        closer.start()
        time.sleep(0.5)
        assert closer.is_alive() and not outcome  # waiting for the lock
        rounds.open_round(opener, project, scores=_scores("cd"), replacing=1, now=T0 + timedelta(hours=1))
    closer.join(timeout=30)
    assert len(outcome) == 1 and "round 1 was open when you pressed, but round 2 is open now" in outcome[0]
    with make() as s:
        assert _statuses(s) == [(1, "closed"), (2, "open")]


def test_a_close_and_an_open_at_once_leave_a_consistent_store(engine) -> None:
    """Both pressed on a page showing round 1: exactly one of them does anything."""
    from concurrency import at_once

    from cellspot.store.db import session_factory

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"))
    outcomes: list[str] = []

    def work(i: int) -> None:
        try:
            with make() as s, s.begin():
                if i == 0:
                    wr.close_current(s, "p", number=1)
                else:
                    wr.open_new_round(s, "p", strategy="random", scores=_scores("cd"), replacing=1)
            outcomes.append(["closed", "opened"][i])
        except wr.RoundsWorkflowError as exc:
            outcomes.append(str(exc))

    at_once(2, work)
    with make() as s:
        statuses = _statuses(s)
    done = [o for o in outcomes if o in ("closed", "opened")]
    assert len(done) == 1, outcomes
    assert statuses == ([(1, "closed")] if done == ["closed"] else [(1, "closed"), (2, "open")]), (statuses, outcomes)


def test_after_a_close_students_get_the_images_with_the_fewest_runs(session) -> None:
    project, images = _project(session)
    first = rounds.open_round(session, project, scores=_scores("a"), now=T0)
    ann = c.join_class(session, "7B", "ann")
    assert c.next_image(session, ann, random.Random(0), now=T0).name == "a"  # the round's queue
    rounds.close_round(session, first, now=T0 + timedelta(minutes=1))
    picks = {c.next_image(session, ann, random.Random(s), now=T0 + timedelta(minutes=2)).name for s in range(20)}
    assert picks == set(NAMES)  # every image with the fewest runs, at random: no queue any more
    bob = c.join_class(session, "7B", "bob")
    q.submit_task_run(session, images["b"], bob, [], "k-b")
    for name in ("c", "d", "e"):
        q.submit_task_run(session, images[name], c.join_class(session, "7B", f"x{name}"), [], f"k-{name}")
    # once ann's hold has lapsed, a, with no run, comes before the images with one, whatever the order
    later = T0 + timedelta(hours=1)
    assert {c.next_image(session, bob, random.Random(s), now=later).name for s in range(5)} == {"a"}


# --------------------------------------------------------------------------- workflow


@pytest.mark.parametrize(("setup", "number", "match"), [
    ([], None, "project 'p' has no open round to close"),
    ([], 1, "round 1 was open when you pressed, but no round is open now"),
    (["open"], 2, "round 2 was open when you pressed, but round 1 is open now"),
    (["open", "close"], 1, r"round 1 was open when you pressed, but no round is open now \(changed a moment ago: "
                           r"a double click, another tab or another researcher\); nothing was closed"),
    (["open", "close"], None, "project 'p' has no open round to close"),
])
def test_close_current_refuses_when_the_round_is_not_open(session, setup, number, match) -> None:
    _project(session)
    for step in setup:
        if step == "open":
            wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"))
        else:
            wr.close_current(session, "p")
    before = _statuses(session)
    with pytest.raises(wr.RoundsWorkflowError, match=match):
        wr.close_current(session, "p", number=number)
    assert _statuses(session) == before


def test_close_current_returns_the_closed_round_and_rollback_still_works(session) -> None:
    _project(session)
    wr.open_new_round(session, "p", strategy="crowd", scores=_scores("ab"), now=T0)
    wr.open_new_round(session, "p", strategy="random", scores=_scores("cde"), now=T0 + timedelta(hours=1))
    info = wr.close_current(session, "p", number=2, now=T0 + timedelta(hours=2))
    assert (info.number, info.status, info.strategy, info.images) == (2, "closed", "random", 3)
    assert wr.current_round_info(session, "p") is None and wr.queue_table(session, "p").empty
    assert wr.history(session, "p")[["round", "status"]].values.tolist() == [[2, "closed"], [1, "closed"]]
    third = wr.open_new_round(session, "p", strategy="crowd", scores=_scores("a"), replacing=None)
    undone, restored = wr.rollback_current(session, "p", number=third.number)
    assert (undone.number, restored.number) == (3, 2)  # the newest closed round opens again


# --------------------------------------------------------------------------- CLI and automatic mode


@pytest.fixture
def demo(settings):
    """A store with the demo project (4 images, 2 simulated students, consensus computed)."""
    from cellspot.store.db import transaction
    from cellspot.store.migrate import prepare_store
    from cellspot.workflows.demo import build_demo

    eng = prepare_store(settings)
    with transaction(eng) as session:
        build_demo(session, settings, n_images=4, n_students=2, seed=3)
    yield eng
    eng.dispose()


def test_round_cli_close(demo) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["round", "close"])
    assert out.exit_code == 1 and "project 'demo' has no open round to close" in out.output, out.output
    assert runner.invoke(main, ["round", "open", "--strategy", "crowd"]).exit_code == 0
    out = runner.invoke(main, ["round", "close", "--project", "demo"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == ("round 1 closed; no round is open now: students get the images with the "
                                  "fewest runs")
    out = runner.invoke(main, ["round", "list", "--queue"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[-1] == "closed_at" and lines[1].split()[:3] == ["1", "closed", "crowd"]
    assert lines[1].split()[-2:] != ["-", "-"] and lines[-1] == "no open round"  # it has a closing time
    out = runner.invoke(main, ["round", "close"])
    assert out.exit_code == 1 and "has no open round to close" in out.output
    assert "--project" in runner.invoke(main, ["round", "close", "--help"]).output


def test_round_cli_close_says_when_the_automatic_mode_opens_the_next(demo) -> None:
    from cellspot.store.db import transaction

    with transaction(demo) as session:
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=12)
        wr.open_new_round(session, "demo", strategy="crowd")
    out = CliRunner().invoke(main, ["round", "close"])
    assert out.exit_code == 0, out.output
    assert "automatic mode is on: it opens a new round after 12 new task runs" in " ".join(out.stderr.split())


def test_the_automatic_mode_opens_a_round_after_a_close(demo, settings, monkeypatch) -> None:
    from fake_trainer import install

    from cellspot.store.db import transaction

    install(monkeypatch)
    with transaction(demo) as session:
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=5, strategy="crowd", top=2, epochs=1)
        wr.open_new_round(session, "demo", now=T0)
        wr.close_current(session, "demo", number=1, now=T0 + timedelta(minutes=1))
        assert ar.auto_status(session, "demo", now=T0).new_runs == 8  # the counter does not need a round
    predicted: list[str] = []
    report = ar.run_auto_round(settings, "demo", predict=lambda session, settings, project: predicted.append(
        registry.active_run(session, project, "classifier").version), now=T0 + timedelta(minutes=2))
    assert report.status == "done" and report.round == 2, report.message
    assert predicted == ["classifier-0001"]
    with transaction(demo) as session:
        assert wr.history(session, "demo")[["round", "status"]].values.tolist() == [[2, "open"], [1, "closed"]]


def test_an_automatic_round_whose_lock_was_taken_over_stops_before_promoting(demo, settings, monkeypatch) -> None:
    """A worker paused past the lock's stale time woke and ran its whole round beside the
    worker that took the lock over: both promoted their models, predicted and opened a round.
    The round now checks its lock between steps and stops before promoting."""
    from fake_trainer import install

    from cellspot.marks import MarkLostError
    from cellspot.store.db import transaction

    install(monkeypatch)
    with transaction(demo) as session:
        ar.set_auto_settings(session, "demo", enabled=True, every_runs=5, strategy="crowd", top=2, epochs=1)
    checks: list[int] = []

    def still_ours() -> None:
        checks.append(1)
        if len(checks) == 2:  # after the training: another worker holds the lock now
            raise MarkLostError("the mark was taken over by a worker on gpu-box-7")

    predicted: list[str] = []
    report = ar.run_auto_round(settings, "demo", predict=lambda *a: predicted.append("x"),
                               now=T0 + timedelta(minutes=2), still_ours=still_ours)
    assert report.status == "failed" and "taken over by a worker on gpu-box-7" in report.message
    assert predicted == [] and len(checks) == 2
    with transaction(demo) as session:
        assert wr.history(session, "demo").empty  # no round opened


# --------------------------------------------------------------------------- strategy list


def test_the_strategies_offered_name_no_python_arguments() -> None:
    """The classifier's summary offered "measure=, agg=", which neither the page nor the CLI can set."""
    offered = list_strategies(from_signals_only=True)
    assert not offered[offered["summary"].str.contains("=|measure|agg", regex=True)].values.tolist()
    classifier = dict(zip(offered["name"], offered["summary"]))["classifier"]
    assert "entropy" in classifier and "mean" in classifier  # the defaults rounds and `queue` score with


def test_a_round_closed_by_another_process_is_not_rolled_back(engine) -> None:
    """Rollback re-reads the round under the project's lock: a stale in-memory "open" round
    that another session closed is refused, and the round before it stays closed."""
    from cellspot.store.db import session_factory

    make = session_factory(engine)
    with make() as s, s.begin():
        _project(s)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ab"), now=T0)
        wr.open_new_round(s, "p", strategy="random", scores=_scores("ba"), now=T0 + timedelta(minutes=5))
    with make() as s, s.begin():
        stale = rounds.current_round(s, q.get_project(s, "p"))
        with make() as other, other.begin():
            wr.close_current(other, "p", now=T0 + timedelta(hours=1))
        assert stale.status == "open"
        with pytest.raises(rounds.RoundError, match="round 2 is no longer the open round"):
            rounds.rollback_round(s, stale, now=T0 + timedelta(hours=2))
    with make() as s:
        assert _statuses(s) == [(1, "closed"), (2, "closed")]


def test_a_sqlite_write_after_a_stale_read_is_said_in_words(session, monkeypatch) -> None:
    """SQLite cannot let a transaction that read the rounds write after another wrote them:
    "database is locked" at once. The close (and the rollback, and an opening) say what
    happened instead of showing a raw OperationalError."""
    from sqlalchemy.exc import OperationalError

    project, _ = _project(session)
    rounds.open_round(session, project, scores=_scores("ab"), now=T0)

    def locked(*args, **kwargs):
        raise OperationalError("UPDATE al_rounds ...", {}, Exception("database is locked"))

    monkeypatch.setattr(rounds, "close_round", locked)
    with pytest.raises(wr.RoundsWorkflowError, match="written at the same moment .* nothing was closed"):
        wr.close_current(session, "p", number=1)
    monkeypatch.setattr(rounds, "rollback_round", locked)
    with pytest.raises(wr.RoundsWorkflowError, match="nothing was rolled back"):
        wr.rollback_current(session, "p", number=1)
    monkeypatch.setattr(rounds, "open_round", locked)
    with pytest.raises(wr.RoundsWorkflowError, match="nothing was opened"):
        wr.open_new_round(session, "p", strategy="random", scores=_scores("ab"), replacing=1)

"""Scheduler: best rank first, leases (target runs, expiry, submit), retired images, gold, concurrency."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.active import rounds, scheduler
from cellspot.store import queries as q
from cellspot.store.db import session_factory
from cellspot.store.models import Annotator, GoldCell, Image, ImageLease, Project, TaskRun
from cellspot.workflows import classroom as c
from concurrency import at_once

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)


def _room(session: Session, n_images: int, *, target: int = 3, gold_rate: float = 0.0,
          names: list[str] | None = None) -> tuple[Project, list[Image]]:
    """Project 'p' (class 7B) with images i00.., and an open round ranking them in name order."""
    project = q.get_or_create_project(session, "p", class_codes=["7B"], gold_rate=gold_rate, target_runs=target)
    names = names or [f"i{k:02d}" for k in range(n_images)]
    images = [Image(project=project, name=n, width=100, height=80, has_pixels=True) for n in names]
    session.add_all(images)
    session.flush()
    scores = pd.DataFrame({"image": names, "score": [1.0 - k / len(names) for k in range(len(names))]})
    rounds.open_round(session, project, scores=scores, now=T0 - timedelta(hours=1))
    return project, images


def _student(session: Session, name: str) -> Annotator:
    return c.join_class(session, "7B", name)


def _next(session: Session, project: Project, who: Annotator, at: datetime = T0, **kw) -> str | None:
    image = scheduler.next_queued_image(session, project, who, now=at, lease_seconds=60, **kw)
    return None if image is None else image.name


@pytest.fixture
def db(sqlite_engine) -> Session:
    """A SQLite session (the logic tests; the race-sensitive ones also run on PostgreSQL)."""
    with Session(sqlite_engine, expire_on_commit=False) as sess:
        yield sess
        sess.rollback()


def _leases(session: Session) -> list[tuple[str, str, int]]:
    rows = session.execute(sa.select(Image.name, Annotator.nickname, ImageLease.slot)
                           .join(Image, Image.id == ImageLease.image_id)
                           .join(Annotator, Annotator.id == ImageLease.annotator_id)
                           .order_by(Image.name, ImageLease.slot)).tuples().all()
    return list(rows)


def test_best_rank_first_and_never_twice(db) -> None:
    project, images = _room(db, 4, target=1)
    ann = _student(db, "ann")
    served = []
    while (name := _next(db, project, ann)) is not None:
        served.append(name)
        c.submit_run(db, ann, next(i.id for i in images if i.name == name), [], f"k-{name}")
    assert served == ["i00", "i01", "i02", "i03"]
    assert _leases(db) == []  # every submit ended its lease


@pytest.mark.parametrize(
    ("n_images", "target", "n_students", "expected"),
    [
        (2, 2, 5, ["i00", "i01", "i00", "i01", None]),  # distinct images first, then second leases
        (3, 1, 4, ["i00", "i01", "i02", None]),
        (1, 3, 4, ["i00", "i00", "i00", None]),
        (4, 2, 3, ["i00", "i01", "i02"]),
    ],
)
def test_leases_fill_each_image_up_to_its_target(db, n_images, target, n_students, expected) -> None:
    project, _ = _room(db, n_images, target=target)
    got = [_next(db, project, _student(db, f"s{k}")) for k in range(n_students)]
    assert got == expected
    per_image = Counter(name for name, _, _ in _leases(db))
    assert max(per_image.values()) <= target


def test_asking_again_keeps_or_moves_the_one_lease(db) -> None:
    project, images = _room(db, 3)
    ann = _student(db, "ann")
    assert _next(db, project, ann) == "i00"
    assert _next(db, project, ann, T0 + timedelta(seconds=5)) == "i00"  # a reload: same image
    assert _next(db, project, ann, exclude_ids=[images[0].id]) == "i01"  # a failed save: another
    assert _leases(db) == [("i01", "ann", 0)]


def test_a_reload_keeps_the_image_when_a_better_one_frees_up(db) -> None:
    project, images = _room(db, 2, target=1)
    ann, bob = _student(db, "ann"), _student(db, "bob")
    assert _next(db, project, bob) == "i00" and _next(db, project, ann) == "i01"
    c.leave_class(db, bob.id)  # i00, ranked first, is free again
    # ann reloads: she keeps i01 (her marks were for it), with her lease renewed, and i00 waits
    assert _next(db, project, ann, T0 + timedelta(seconds=50)) == "i01"
    assert _next(db, project, ann, T0 + timedelta(seconds=100)) == "i01"  # renewed at 50 s: live until 110 s
    assert _leases(db) == [("i01", "ann", 0)]
    assert _next(db, project, _student(db, "cy"), T0 + timedelta(seconds=100)) == "i00"
    c.submit_run(db, ann, images[1].id, [], "k-ann")  # submitted: the lease no longer holds her there
    assert _next(db, project, ann, T0 + timedelta(seconds=101)) is None  # i00 is cy's, i01 done


def test_a_reload_keeps_the_queued_image_before_any_gold_draw(db) -> None:
    project, images = _room(db, 2, target=1, names=["i00", "gold"])
    db.add(GoldCell(image_id=images[1].id, x=10, y=10, label="alive"))
    db.flush()
    ann = _student(db, "ann")
    assert c.next_image(db, ann, now=T0).name == "i00"  # gold rate 0: from the queue
    project.settings = {**project.settings, "gold_rate": 1.0}  # every draw would now give gold
    db.flush()
    assert c.next_image(db, ann, now=T0 + timedelta(seconds=5)).name == "i00"  # a reload: still i00
    assert c.next_image(db, ann, now=T0 + timedelta(seconds=6), exclude_ids=[images[0].id]).name == "gold"


@pytest.mark.parametrize(
    ("later_s", "expected"),
    [(59, None), (60, "i00")],  # the lease lives 60 s
)
def test_abandoned_lease_expires_and_the_image_returns(session, later_s, expected) -> None:
    project, _ = _room(session, 1, target=1)
    assert _next(session, project, _student(session, "ann")) == "i00"
    assert _next(session, project, _student(session, "bob"), T0 + timedelta(seconds=later_s)) == expected
    if expected:  # bob took over ann's dead slot
        assert _leases(session) == [("i00", "bob", 0)]


def test_submit_ends_the_lease_and_runs_count_towards_the_target(session) -> None:
    project, images = _room(session, 2, target=2)
    ann, bob, cid, dan = (_student(session, n) for n in ("ann", "bob", "cid", "dan"))
    assert _next(session, project, ann) == "i00"
    c.submit_run(session, ann, images[0].id, [(5.0, 5.0, "alive")], "ann-0")
    assert _leases(session) == []
    assert _next(session, project, bob) == "i00"  # 1 run + 0 leases < 2
    assert _next(session, project, cid) == "i01"  # i00: 1 run + 1 lease = target
    assert _next(session, project, dan) == "i01"
    assert _next(session, project, _student(session, "eve")) is None


def test_a_run_stored_elsewhere_kills_the_lease_too(session) -> None:
    """A run imported outside the app leaves the lease row, but it no longer counts."""
    project, images = _room(session, 2, target=2)
    ann, bob, cid = (_student(session, n) for n in ("ann", "bob", "cid"))
    assert _next(session, project, ann) == "i00"
    q.submit_task_run(session, images[0], ann, [], "imported-0")  # lease row stays
    assert _next(session, project, bob) == "i00"  # ann's slot 0 is dead; bob gets slot 1
    assert _next(session, project, cid) == "i01"
    assert scheduler.expire_leases(session, T0) == 1  # housekeeping drops ann's dead row
    assert [(n, who) for n, who, _ in _leases(session)] == [("i00", "bob"), ("i01", "cid")]


def test_retired_and_pixelless_images_are_never_served(db) -> None:
    project, images = _room(db, 4, target=5)
    images[0].status = "retired"
    images[2].has_pixels = False
    db.flush()
    got = {_next(db, project, _student(db, f"s{k}")) for k in range(10)}
    assert got == {"i01", "i03"}


def test_images_outside_the_queue_are_not_served(db) -> None:
    project, images = _room(db, 3, target=1)
    db.add(Image(project=project, name="late", width=100, height=80, has_pixels=True))
    db.flush()
    got = [_next(db, project, _student(db, f"s{k}")) for k in range(4)]
    assert got == ["i00", "i01", "i02", None]


def test_runs_before_the_round_do_not_use_its_target(db) -> None:
    project, images = _room(db, 1, target=1)
    old = q.submit_task_run(db, images[0], _student(db, "old"), [], "before")[0]
    old.submitted_at = T0 - timedelta(days=1)  # before the round opened
    db.flush()
    assert _next(db, project, _student(db, "ann")) == "i00"


def test_without_an_open_round_the_scheduler_refuses(db) -> None:
    project, _ = _room(db, 1)
    rounds.rollback_round(db, rounds.current_round(db, project))
    with pytest.raises(scheduler.NoOpenRoundError, match="no open round"):
        _next(db, project, _student(db, "ann"))


@pytest.mark.parametrize(("kw", "match"), [({"target_runs": 0}, "target_runs"),
                                           ({"lease_seconds": 0}, "lease_seconds")])
def test_bad_arguments_are_refused(db, kw, match) -> None:
    project, _ = _room(db, 1)
    args = {"now": T0, "lease_seconds": 60, **kw}
    with pytest.raises(ValueError, match=match):
        scheduler.next_queued_image(db, project, _student(db, "ann"), **args)


# --------------------------------------------------------------------------- next_image in a round


@pytest.mark.parametrize(("gold_rate", "expected"), [(0.0, "i00"), (1.0, "gold")])
def test_next_image_in_a_round_keeps_the_gold_rate(db, gold_rate, expected) -> None:
    project, images = _room(db, 3, gold_rate=gold_rate, names=["i00", "i01", "gold"])
    db.add(GoldCell(image_id=images[2].id, x=10, y=10, label="alive"))
    images[2].status = "retired"  # gold images stay available as checks
    db.flush()
    ann = _student(db, "ann")
    assert {c.next_image(db, ann, random.Random(s), now=T0).name for s in range(5)} == {expected}


def test_next_image_falls_back_to_gold_when_the_queue_is_done(db) -> None:
    project, images = _room(db, 2, target=1, names=["i00", "gold"])
    db.add(GoldCell(image_id=images[1].id, x=10, y=10, label="alive"))
    db.flush()
    ann, bob = _student(db, "ann"), _student(db, "bob")
    assert c.next_image(db, ann, now=T0).name == "i00"
    assert c.next_image(db, bob, now=T0).name == "gold"  # ranked gold image is leased
    assert c.next_image(db, _student(db, "cid"), now=T0).name == "gold"  # queue full, nothing outside: gold


def test_after_the_queue_the_open_images_outside_it_follow_then_gold(db) -> None:
    """A used-up queue does not stall the class: the open images outside it come next (fewest
    runs plus holders first), then gold; a queued image past its round's target is not served again."""
    project = q.get_or_create_project(db, "p", class_codes=["7B"], gold_rate=0.0, target_runs=1)
    names = ["q0", "out1", "out2", "gold"]
    images = {n: Image(project=project, name=n, width=100, height=80, has_pixels=True) for n in names}
    db.add_all(images.values())
    db.flush()
    db.add(GoldCell(image_id=images["gold"].id, x=10, y=10, label="alive"))
    zed = _student(db, "zed")
    c.submit_run(db, zed, images["out2"].id, [], "k-zed")  # out2 has a run, out1 none
    rounds.open_round(db, project, scores=pd.DataFrame({"image": ["q0"], "score": [1.0]}),
                      now=T0 - timedelta(hours=1))
    ann, bob = _student(db, "ann"), _student(db, "bob")
    assert c.next_image(db, ann, now=T0).name == "q0"
    # q0's one run of the round is leased to ann: bob gets the least-run image outside the queue
    assert c.next_image(db, bob, now=T0).name == "out1"
    progress = c.student_progress(db, bob, now=T0)
    assert (progress.images_left, progress.images_waiting) == (4, 1)  # q0 (leased), out1, out2, gold
    c.submit_run(db, ann, images["q0"].id, [], "k-ann")
    progress = c.student_progress(db, bob, now=T0)
    assert (progress.images_left, progress.images_waiting) == (3, 0)  # q0 has its run: not left
    cid = _student(db, "cid")
    served = []
    while (image := c.next_image(db, cid, now=T0)) is not None and len(served) < 5:
        served.append(image.name)
        c.submit_run(db, cid, image.id, [], f"k-cid-{image.name}")
    # out1 (no run, bob on it) and out2 (one run) weigh the same: either first; never q0 again this round
    assert sorted(served[:2]) == ["out1", "out2"] and served[2:] == ["gold"]


def test_leave_class_gives_the_leased_image_back(db) -> None:
    project, images = _room(db, 1, target=1)
    ann, bob = _student(db, "ann"), _student(db, "bob")
    assert _next(db, project, ann) == "i00"
    assert _next(db, project, bob) is None
    assert c.leave_class(db, ann.id) == 1
    assert _next(db, project, bob) == "i00"


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(("n_images", "target"), [(50, 3), (10, 3)])
def test_forty_students_at_once_get_distinct_images_while_enough_exist(engine, n_images, target) -> None:
    make = session_factory(engine)
    with make() as s, s.begin():
        project, _ = _room(s, n_images, target=target)
        ids = [_student(s, f"t{i:02d}").id for i in range(40)]

    def ask(i: int) -> str | None:
        with make() as s, s.begin():
            who, project = s.get(Annotator, ids[i]), s.scalar(sa.select(Project))
            image = c.next_image(s, who, now=T0)
            return None if image is None else image.name

    got = at_once(40, ask)
    served = Counter(name for name in got if name is not None)
    if n_images >= 40:
        assert len(served) == 40 and set(served.values()) == {1}  # 40 distinct images
    else:
        assert set(served.values()) == {target} and len(served) == n_images  # every place used once
        assert got.count(None) == 40 - n_images * target
    with make() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(ImageLease)) == sum(served.values())


def test_concurrent_class_fills_every_image_to_its_target_and_no_one_twice(engine) -> None:
    make = session_factory(engine)
    n_images, target, n_students = 8, 3, 12
    with make() as s, s.begin():
        project, _ = _room(s, n_images, target=target)
        ids = [_student(s, f"t{i:02d}").id for i in range(n_students)]

    def label_until_done(i: int) -> list[str]:
        done = []
        while True:
            with make() as s, s.begin():
                image = c.next_image(s, s.get(Annotator, ids[i]), now=T0)
                if image is None:
                    return done
                image_id, name = image.id, image.name
            with make() as s, s.begin():
                c.submit_run(s, s.get(Annotator, ids[i]), image_id, [], f"{i}-{name}")
            done.append(name)

    got = at_once(n_students, label_until_done)
    assert all(len(names) == len(set(names)) for names in got)  # a student never gets an image twice
    with make() as s:
        runs = Counter(s.scalars(sa.select(TaskRun.image_id)).all())
        pairs = s.execute(sa.select(TaskRun.image_id, TaskRun.annotator_id)).tuples().all()
        assert len(runs) == n_images and set(runs.values()) == {target}
        assert len(pairs) == len(set(pairs))
        assert s.scalar(sa.select(sa.func.count()).select_from(ImageLease)) == 0

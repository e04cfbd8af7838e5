"""Student workflows: join, next image, submit (idempotent, concurrent), gold feedback, progress, tutorial."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.store import queries as q
from cellspot.store.db import session_factory
from cellspot.store.models import (
    Click,
    ConsensusCell,
    ConsensusSnapshot,
    GoldCell,
    Image,
    LabelDraft,
    Project,
    TaskRun,
    utcnow,
)
from cellspot.workflows import classroom as c
from concurrency import at_once

GOLD = [(20.0, 20.0, "alive"), (60.0, 30.0, "dead"), (80.0, 60.0, "alive")]


def _project(session: Session, name: str = "p", codes=("7B",), **settings) -> Project:
    project = q.get_or_create_project(session, name, class_codes=list(codes), **settings)
    session.flush()
    return project


def _images(session: Session, project: Project, names, **kw) -> dict[str, Image]:
    images = {n: Image(project=project, name=n, width=100, height=80, has_pixels=True, **kw) for n in names}
    session.add_all(images.values())
    session.flush()
    return images


@pytest.fixture
def room(session: Session):
    """Project 'p' (class 7B): work images a-d, a gold image, a retired one, one without pixels."""
    project = _project(session, gold_rate=0.0)
    images = _images(session, project, ["a", "b", "c", "d", "gold"])
    images.update(_images(session, project, ["old"], status="retired"))
    nopix = Image(project=project, name="nopix", width=100, height=80, has_pixels=False)
    session.add(nopix)
    session.add_all(GoldCell(image_id=images["gold"].id, x=x, y=y, label=lab) for x, y, lab in GOLD)
    session.flush()
    images["nopix"] = nopix
    return project, images


def _count(session: Session, model: type, *where) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


# --------------------------------------------------------------------------- join


@pytest.mark.parametrize(
    ("code", "nickname", "error", "stored_nick"),
    [
        ("7B", "ann", None, "ann"),
        (" 7b ", "  Ann   Lee ", None, "Ann Lee"),
        ("7 b", "x" * 40, None, "x" * 40),
        ("8C", "ann", c.ClassNotFoundError, None),
        ("", "ann", c.ClassNotFoundError, None),
        ("7B", "   ", c.InvalidNicknameError, None),
        ("7B", "x" * 41, c.InvalidNicknameError, None),
        ("7B", "an\x07n", c.InvalidNicknameError, None),
    ],
)
def test_join_class(session, room, code, nickname, error, stored_nick) -> None:
    if error:
        with pytest.raises(error):
            c.join_class(session, code, nickname)
        return
    student = c.join_class(session, code, nickname)
    assert (student.nickname, student.class_code, student.role) == (stored_nick, "7B", "student")
    assert c.join_class(session, code.upper(), stored_nick).id == student.id  # rejoin = same student


def test_a_nickname_is_one_student_whatever_its_letter_case(session, room) -> None:
    carol = c.join_class(session, "7B", "Carol")
    assert c.join_class(session, "7b", "carol").id == carol.id
    assert c.join_class(session, "7B", "CAROL").nickname == "Carol"  # the first spelling is kept
    assert c.join_class(session, "7B", "ÅSA").id == c.join_class(session, "7B", "åsa").id  # not only ASCII
    assert c.join_class(session, "7B", "Carl").id != carol.id


def test_join_messages_say_what_is_wrong(session, room) -> None:
    with pytest.raises(c.ClassNotFoundError, match="no class has the code '9Z'"):
        c.join_class(session, "9z", "ann")
    with pytest.raises(c.InvalidNicknameError, match="too long: at most 40 characters; got 41"):
        c.join_class(session, "7B", "y" * 41)
    # an emoji is one character (a browser counts some as two)
    assert c.join_class(session, "7B", "\U0001f52c" * 40).nickname == "\U0001f52c" * 40


def test_nickname_use_says_whether_someone_is_labelling_under_it_now(session, room) -> None:
    """Two students typing "Max" and "max" became one annotator without knowing it: the join
    page asks first when the nickname joined or changed a draft within the lease time."""
    project, images = room
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    assert c.nickname_use(session, "7b", "max", now=t0) == c.NicknameUse("max", "7B", False, 0, False)
    max_ = c.join_class(session, "7B", "Max")
    max_.created_at = t0 - timedelta(days=1)  # joined in an earlier lesson
    c.submit_run(session, max_, images["b"].id, [], "old")
    session.flush()
    assert c.nickname_use(session, "7B", "MAX", now=t0) == c.NicknameUse("Max", "7B", True, 1, False)
    c.next_image(session, max_, now=t0)  # labelling now: the image served is his draft
    use = c.nickname_use(session, "7B", "max", now=t0 + timedelta(minutes=5))
    assert (use.nickname, use.runs, use.active) == ("Max", 1, True)
    lapsed = t0 + timedelta(seconds=c._lease_seconds(project) + 1)
    assert not c.nickname_use(session, "7B", "max", now=lapsed).active  # the tab was left long ago
    c.join_class(session, "7B", "newbie")  # new, just joined (still in the tutorial): active too
    assert c.nickname_use(session, "7B", "Newbie").active
    assert not c.nickname_use(session, "7B", "Newbie", now=utcnow() + timedelta(hours=1)).active
    with pytest.raises(c.ClassNotFoundError):
        c.nickname_use(session, "9Z", "max")
    with pytest.raises(c.InvalidNicknameError):
        c.nickname_use(session, "7B", "m" * 41)


def test_code_used_by_two_projects_is_refused(session, room) -> None:
    _project(session, "other", codes=("7b",))
    with pytest.raises(c.ClassCodeSharedError, match="several projects"):
        c.join_class(session, "7B", "ann")


# --------------------------------------------------------------------------- next image


def test_next_image_skips_seen_retired_pixelless_and_gold(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    served = []
    for i in range(4):
        image = c.next_image(session, student, random.Random(i))
        served.append(image.name)
        c.submit_run(session, student, image.id, [], f"k{i}")
    assert sorted(served) == ["a", "b", "c", "d"]  # gold_rate 0: work images first
    assert c.next_image(session, student, random.Random(0)).name == "gold"  # then the rest
    c.submit_run(session, student, images["gold"].id, [], "kg")
    assert c.next_image(session, student) is None


@pytest.mark.parametrize(("rate", "expect_gold"), [(0.0, False), (1.0, True)])
def test_gold_rate(session, room, rate, expect_gold) -> None:
    project, images = room
    project.settings = {**project.settings, "gold_rate": rate}
    student = c.join_class(session, "7B", "ann")
    names = {c.next_image(session, student, random.Random(seed)).name for seed in range(20)}
    assert (names == {"gold"}) is expect_gold
    assert ("gold" in names) is expect_gold


def test_next_image_prefers_fewest_runs_and_spreads_students(session, room) -> None:
    project, images = room
    others = [q.get_or_create_annotator(session, project, f"o{i}", "7B") for i in range(2)]
    for i, who in enumerate(others):  # a, b, c get runs; d has none
        for name in ("a", "b", "c"):
            q.submit_task_run(session, images[name], who, [], f"o{i}{name}")
    student = c.join_class(session, "7B", "ann")
    assert {c.next_image(session, student, random.Random(s)).name for s in range(10)} == {"d"}
    # with equal coverage the choice is random: a room of students gets different images
    q.submit_task_run(session, images["d"], others[0], [], "o0d")
    q.submit_task_run(session, images["d"], others[1], [], "o1d")
    picks = {c.next_image(session, c.join_class(session, "7B", f"s{i}"), random.Random(i)).name for i in range(12)}
    assert len(picks) >= 3


@pytest.mark.parametrize("in_round", [False, True])
def test_an_image_at_the_maximum_of_runs_is_not_served_before_the_consensus_retires_it(
        session, room, in_round: bool) -> None:
    """With "retire after at most 2 runs", images were served up to 12 runs until the next
    recompute; the gold image (a check, not work) stays available."""
    from cellspot.workflows import rounds as wr

    project, images = room
    project.settings = {**project.settings, "retire_min_runs": 1, "retire_max_runs": 2}
    others = [q.get_or_create_annotator(session, project, f"o{i}", "7B") for i in range(2)]
    for i, who in enumerate(others):  # a, b and c reach the maximum; d has one run
        for name in ("a", "b", "c"):
            q.submit_task_run(session, images[name], who, [], f"o{i}{name}")
    q.submit_task_run(session, images["d"], others[0], [], "o0d")
    if in_round:
        wr.open_new_round(session, project, strategy="random", scores=pd.DataFrame(
            {"image": ["a", "b", "c", "d"], "score": [0.9, 0.8, 0.7, 0.1]}), target_runs=5)
    assert images["a"].status == "active"  # no consensus yet
    served = set()
    for k in range(3):
        student = c.join_class(session, "7B", f"s{k}")
        image = c.next_image(session, student, random.Random(k))
        served.add(image.name)
        c.submit_run(session, student, image.id, [], f"s{k}")
    assert served == {"d", "gold"}, served  # d reaches 2 runs with the first student, then only gold


def test_students_one_after_another_get_the_images_nobody_holds(session, room) -> None:
    """The audit: one image had the fewest runs and 7 of 8 students got it. Students holding an
    image (their draft on it) count with its runs: each next student gets another image."""
    project, images = room
    other = q.get_or_create_annotator(session, project, "o", "7B")
    for name in ("b", "c", "d"):  # one run each, a none
        q.submit_task_run(session, images[name], other, [], f"o-{name}")
    served = [c.next_image(session, c.join_class(session, "7B", f"s{k}"), random.Random(0)).name
              for k in range(4)]
    assert served[0] == "a" and sorted(served) == ["a", "b", "c", "d"], served


@pytest.mark.parametrize("max_runs", [2, 3])
def test_an_image_whose_runs_and_holders_reach_the_maximum_is_not_served(session, room, max_runs) -> None:
    project, images = room
    project.settings = {**project.settings, "retire_min_runs": 1, "retire_max_runs": max_runs}
    others = [q.get_or_create_annotator(session, project, f"o{i}", "7B") for i in range(max_runs)]
    for name in ("b", "c", "d"):  # at the maximum: not open
        for i, who in enumerate(others):
            q.submit_task_run(session, images[name], who, [], f"o{i}{name}")
    q.submit_task_run(session, images["a"], others[0], [], "o0a")  # a: one run, max_runs - 1 places
    served = [c.next_image(session, c.join_class(session, "7B", f"s{k}"), random.Random(k)).name
              for k in range(max_runs + 1)]
    assert served == ["a"] * (max_runs - 1) + ["gold", "gold"], served
    ann = c.join_class(session, "7B", "s0")
    assert c.student_progress(session, ann).images_waiting == 0  # ann holds a herself
    late = c.join_class(session, "7B", "late")
    project.settings = {**project.settings, "gold_rate": 0.0}
    progress = c.student_progress(session, late)
    assert (progress.images_left, progress.images_waiting) == (2, 1)  # a (held up to the maximum), gold


def test_a_hold_lapses_after_the_lease_time(session, room) -> None:
    project, images = room
    project.settings = {**project.settings, "lease_seconds": 60}
    session.execute(sa.update(Image).where(Image.name.in_(["c", "d", "gold"])).values(status="retired"))
    session.execute(sa.delete(GoldCell))
    q.submit_task_run(session, images["b"], q.get_or_create_annotator(session, project, "o", "7B"), [], "ob")
    t0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
    first = c.next_image(session, c.join_class(session, "7B", "s1"), now=t0)
    assert first.name == "a"  # no run
    # a: no run + s1 on it; b: one run, nobody on it -> as much load, b is nobody's: b
    assert c.next_image(session, c.join_class(session, "7B", "s2"), now=t0 + timedelta(seconds=30)).name == "b"
    # s1's hold (a draft that has not changed for 70 s) lapsed; s2's on b still counts
    assert c.next_image(session, c.join_class(session, "7B", "s3"), now=t0 + timedelta(seconds=70)).name == "a"


def test_next_image_keeps_the_image_as_the_students_draft(session, room) -> None:
    """The image served is held by the student's draft (empty): a reload finds it, the next
    request replaces it, a submit ends it."""
    project, images = room
    ann = c.join_class(session, "7B", "ann")
    image = c.next_image(session, ann, random.Random(1))
    held = c.draft_of(session, ann)
    assert held.image.id == image.id and held.marks == [] and not held.closed
    other = c.next_image(session, ann, random.Random(1), exclude_ids=[image.id])
    assert c.draft_of(session, ann).image.id == other.id and _count(session, LabelDraft) == 1
    c.submit_run(session, ann, other.id, [], "k")
    assert c.draft_of(session, ann) is None


def test_a_reload_renews_the_students_hold(session, room) -> None:
    """A student back on their image (a reload, another device) counted as nobody once their
    draft had not changed for the lease time, so a classmate got the same image."""
    project, images = room
    ann = c.join_class(session, "7B", "ann")
    image = c.next_image(session, ann, random.Random(1))
    old = utcnow() - timedelta(minutes=30)
    session.execute(sa.update(LabelDraft).where(LabelDraft.annotator_id == ann.id).values(updated_at=old))
    assert c.draft_of(session, ann).image.id == image.id
    assert c._holders(session, project, utcnow()).get(image.id) == 1


def test_a_nickname_is_free_again_after_leave(session, room) -> None:
    """After Leave, rejoining with the nickname was asked "someone is labelling as Lou"."""
    lou = c.join_class(session, "7B", "Lou")
    assert c.nickname_use(session, "7B", "lou").active  # just joined: someone in the tutorial
    c.leave_class(session, lou.id)
    assert not c.nickname_use(session, "7B", "lou").active
    c.join_class(session, "7B", "Lou")
    assert c.nickname_use(session, "7B", "lou").active  # labelling under it again


def test_next_image_exclude_ids(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    keep = images["c"].id
    exclude = [img.id for name, img in images.items() if name not in ("c",)]
    assert c.next_image(session, student, exclude_ids=exclude).id == keep


# --------------------------------------------------------------------------- submit


def test_submit_stores_once(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    clicks = [(10, 12, "alive"), (50.5, 40.25, "dead"), (99.9, 79.9, "not_sure")]
    first = c.submit_run(session, student, images["a"].id, clicks, "key-1")
    again = c.submit_run(session, student, images["a"].id, clicks[:1], "key-1")
    assert first.created and not again.created
    assert first.task_run_id == again.task_run_id and again.n_clicks == 3
    assert first.gold_feedback is None
    stored = session.execute(sa.select(Click.x, Click.y, Click.label).order_by(Click.click_index)).tuples().all()
    assert stored == [(10.0, 12.0, "alive"), (50.5, 40.25, "dead"), (99.9, 79.9, "not_sure")]
    assert _count(session, TaskRun) == 1


def test_second_tab_with_another_key_does_not_store_a_second_run(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    other = c.join_class(session, "7B", "bob")
    first = c.submit_run(session, student, images["a"].id, [(10, 12, "alive")], "tab-1")
    second = c.submit_run(session, student, images["a"].id, [(20, 22, "dead"), (30, 32, "dead")], "tab-2")
    assert first.created and not second.created
    assert second.task_run_id == first.task_run_id and second.n_clicks == 1
    assert c.submit_run(session, other, images["a"].id, [(20, 22, "dead")], "tab-3").created  # others may
    assert _count(session, TaskRun) == 2 and _count(session, Click) == 2
    # the page tells the second tab its clicks were dropped; a repeat of the same key is no such case
    assert second.other_submit and not first.other_submit
    assert not c.submit_run(session, student, images["a"].id, [(10, 12, "alive")], "tab-1").other_submit


def test_a_draft_is_kept_per_student_until_submitted(session, room) -> None:
    """One draft per student, replaced by a draft on another image; it comes back while its
    image is open to the student and goes with the submit or Leave."""
    project, images = room
    ann, bob = c.join_class(session, "7B", "ann"), c.join_class(session, "7B", "bob")
    assert c.draft_of(session, ann) is None
    c.save_draft(session, ann, images["a"].id, [(10, 12, "alive"), (20.5, 30, "dead")])
    c.save_draft(session, bob, images["a"].id, [])
    image, marks, closed = c.draft_of(session, ann)
    assert image.id == images["a"].id and marks == [(10.0, 12.0, "alive"), (20.5, 30.0, "dead")] and not closed
    assert c.draft_of(session, ann, exclude_ids=[images["a"].id]) is None  # e.g. its pixels cannot be shown
    c.save_draft(session, ann, images["b"].id, [(1, 2, "not_sure")])  # moved on: one draft per student
    assert c.draft_of(session, ann)[0].id == images["b"].id and _count(session, LabelDraft) == 2
    c.submit_run(session, ann, images["b"].id, [(1, 2, "not_sure")], "k1")
    assert c.draft_of(session, ann) is None and c.draft_of(session, bob)[1] == []
    c.leave_class(session, bob.id)
    assert _count(session, LabelDraft) == 0


def test_a_draft_on_an_image_no_longer_open_is_dropped(session, room) -> None:
    project, images = room
    ann = c.join_class(session, "7B", "ann")
    c.save_draft(session, ann, images["c"].id, [(5, 5, "alive")])
    c.submit_run(session, ann, images["c"].id, [(6, 6, "dead")], "other-device")  # submitted elsewhere
    c.save_draft(session, ann, images["d"].id, [(7, 7, "dead")])  # the image the student is on now
    # a late write of a stale tab on the submitted image stores nothing: the draft on d stays
    assert c.save_draft(session, ann, images["c"].id, [(5, 5, "alive")]) is False
    image, marks, _ = c.draft_of(session, ann)
    assert image.id == images["d"].id and marks == [(7.0, 7.0, "dead")]
    c.save_draft(session, ann, images["gold"].id, [])
    session.execute(sa.update(Image).where(Image.id == images["gold"].id).values(has_pixels=False))
    assert c.draft_of(session, ann) is None and _count(session, LabelDraft) == 0  # no longer open: dropped


@pytest.mark.parametrize("how", ["retired", "maximum"])
def test_marks_on_an_image_that_closed_meanwhile_are_kept_and_stored(session, room, how) -> None:
    """The audit: the image retired ("Recompute consensus") or reached the maximum of runs by a
    classmate's submit while a student was marking it; a reload dropped their marks. A draft
    with marks keeps its image (``closed``), and its submit is stored."""
    project, images = room
    project.settings = {**project.settings, "retire_min_runs": 1, "retire_max_runs": 2}
    ann = c.join_class(session, "7B", "ann")
    c.save_draft(session, ann, images["a"].id, [(5, 5, "alive"), (9, 9, "dead")])
    if how == "retired":
        images["a"].status = "retired"
        session.flush()
    else:
        for i in range(2):
            c.submit_run(session, c.join_class(session, "7B", f"o{i}"), images["a"].id, [], f"o{i}")
    draft = c.draft_of(session, ann)
    assert draft is not None and draft.closed and draft.image.id == images["a"].id
    assert draft.marks == [(5.0, 5.0, "alive"), (9.0, 9.0, "dead")]
    assert c.draft_of(session, ann).closed  # every reload, not only the first
    result = c.submit_run(session, ann, images["a"].id, draft.marks, "ann-a")
    assert result.created and result.n_clicks == 2
    assert _count(session, Click, Click.task_run_id == result.task_run_id) == 2
    assert c.draft_of(session, ann) is None


def test_an_empty_draft_on_an_image_that_closed_moves_on(session, room) -> None:
    project, images = room
    ann = c.join_class(session, "7B", "ann")
    c.save_draft(session, ann, images["a"].id, [])
    images["a"].status = "retired"
    session.flush()
    assert c.draft_of(session, ann) is None and _count(session, LabelDraft) == 0


@pytest.mark.parametrize("marks", [[(100, 5, "alive")], [(5, 5, "maybe")], [(float("inf"), 5, "dead")]])
def test_a_draft_with_a_bad_mark_is_refused_and_the_old_one_kept(session, room, marks) -> None:
    project, images = room
    ann = c.join_class(session, "7B", "ann")
    c.save_draft(session, ann, images["a"].id, [(5, 5, "alive")])
    with pytest.raises(q.InvalidClickError):
        c.save_draft(session, ann, images["a"].id, marks)
    assert c.draft_of(session, ann)[1] == [(5.0, 5.0, "alive")]


@pytest.mark.parametrize(
    ("clicks", "error"),
    [
        ([(100, 5, "alive")], q.InvalidClickError),
        ([(5, -1, "alive")], q.InvalidClickError),
        ([(5, 5, "maybe")], q.InvalidClickError),
        ([(float("nan"), 5, "dead")], q.InvalidClickError),
    ],
)
def test_submit_rejects_bad_clicks(session, room, clicks, error) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    with pytest.raises(error):
        c.submit_run(session, student, images["a"].id, clicks, "bad")
    assert _count(session, TaskRun) == 0


def test_submit_to_other_project_image_is_refused(session, room) -> None:
    project, images = room
    other = _project(session, "other", codes=("9Z",))
    foreign = _images(session, other, ["x"])["x"]
    student = c.join_class(session, "7B", "ann")
    with pytest.raises(c.ImageNotFoundError, match=f"no image with id {foreign.id}"):
        c.submit_run(session, student, foreign.id, [], "k")
    with pytest.raises(c.ImageNotFoundError):
        c.submit_run(session, student, 999_999, [], "k")


def test_key_reused_for_another_image_conflicts(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    c.submit_run(session, student, images["a"].id, [], "same")
    with pytest.raises(q.ClientKeyConflictError):
        c.submit_run(session, student, images["b"].id, [], "same")


def test_gold_submit_gives_feedback_and_flags_the_run(session, room) -> None:
    project, images = room
    student = c.join_class(session, "7B", "ann")
    clicks = [(22, 19, "alive"), (61, 33, "alive"), (5, 75, "dead")]  # found, mislabelled, extra; 1 missed
    result = c.submit_run(session, student, images["gold"].id, clicks, "g1")
    fb = result.gold_feedback
    assert fb.summary() == {"found": 1, "mislabelled": 1, "unsure": 0, "missed": 1, "extra": 1, "gold": 3}
    assert (fb.missed[0].x, fb.missed[0].y, fb.missed[0].label) == (80.0, 60.0, "alive")
    assert fb.mislabelled[0].click_label == "alive" and fb.mislabelled[0].label == "dead"
    assert session.get(TaskRun, result.task_run_id).is_gold_check
    repeat = c.submit_run(session, student, images["gold"].id, [], "g1")  # reload after submit
    assert repeat.gold_feedback == fb


@pytest.mark.parametrize(
    ("clicks", "radius", "expected"),
    [
        ([], 20.0, {"found": 0, "mislabelled": 0, "unsure": 0, "missed": 3, "extra": 0}),
        (GOLD, 20.0, {"found": 3, "mislabelled": 0, "unsure": 0, "missed": 0, "extra": 0}),
        ([(20, 20, "not_sure")], 20.0, {"found": 0, "mislabelled": 0, "unsure": 1, "missed": 2, "extra": 0}),
        ([(20, 35, "alive")], 10.0, {"found": 0, "mislabelled": 0, "unsure": 0, "missed": 3, "extra": 1}),
        ([(20, 35, "alive")], 20.0, {"found": 1, "mislabelled": 0, "unsure": 0, "missed": 2, "extra": 0}),
        # two clicks on one cell: one-to-one matching, the second is extra
        ([(20, 20, "alive"), (21, 21, "alive")], 20.0,
         {"found": 1, "mislabelled": 0, "unsure": 0, "missed": 2, "extra": 1}),
    ],
)
def test_compare_with_gold(clicks, radius, expected) -> None:
    summary = c.compare_with_gold(GOLD, clicks, radius).summary()
    assert {k: summary[k] for k in expected} == expected


# --------------------------------------------------------------------------- concurrency


def test_concurrent_double_submits_store_one_run_each(engine) -> None:
    """8 threads, own sessions: every key submitted by 2 threads at once -> one run per key."""
    make = session_factory(engine)
    with make() as s, s.begin():
        project = _project(s, codes=("7B",))
        image_id = _images(s, project, ["a"])["a"].id
        ids = [c.join_class(s, "7B", f"t{i}").id for i in range(4)]
    created: list[bool] = []

    def work(i: int) -> None:
        with make() as s, s.begin():
            student = c.join_class(s, "7B", f"t{i % 4}")
            assert student.id == ids[i % 4]
            res = c.submit_run(s, student, image_id, [(1.0 + i % 4, 2.0, "alive"), (3.0, 4.0, "dead")],
                               f"key-{i % 4}")
        created.append(res.created)

    at_once(8, work)
    assert sorted(created) == [False] * 4 + [True] * 4
    with make() as s:
        assert _count(s, TaskRun) == 4
        assert _count(s, Click) == 8


def test_concurrent_first_drafts_of_one_student_do_not_collide(engine) -> None:
    """Two tabs of a student saving their first draft at the same moment: both succeed (one
    upsert each), one draft remains."""
    make = session_factory(engine)
    with make() as s, s.begin():
        project = _project(s, codes=("7B",))
        images = _images(s, project, ["a", "b"])
        image_ids = [images["a"].id, images["b"].id]
        student_id = c.join_class(s, "7B", "tabs").id
    def work(i: int) -> None:
        with make() as s, s.begin():
            student = s.get(c.Annotator, student_id)
            assert c.save_draft(s, student, image_ids[i % 2], [(1.0 + i, 2.0, "alive")])

    at_once(6, work)
    with make() as s:
        assert _count(s, LabelDraft) == 1
        image, marks, _ = c.draft_of(s, s.get(c.Annotator, student_id))
        assert image.id in image_ids and len(marks) == 1


def _class_of(make, n_images: int, n_students: int, runs: dict[int, int] | None = None, **settings):
    """Project 'p' (class 7B, no gold) with images i00.. (``runs``: image index -> runs by
    outsiders) and ``n_students`` students; returns their ids."""
    with make() as s, s.begin():
        project = _project(s, codes=("7B",), gold_rate=0.0, **settings)
        images = list(_images(s, project, [f"i{k:02d}" for k in range(n_images)]).values())
        for k, n in (runs or {}).items():
            for r in range(n):
                who = q.get_or_create_annotator(s, project, f"outsider{r}", "7B")
                q.submit_task_run(s, images[k], who, [], f"out-{k}-{r}")
        return [c.join_class(s, "7B", f"t{i:02d}").id for i in range(n_students)]


def _ask(make, annotator_id: int) -> str | None:
    with make() as s, s.begin():
        image = c.next_image(s, s.get(c.Annotator, annotator_id))
        return None if image is None else image.name


@pytest.mark.parametrize(
    ("n_images", "runs", "n_students", "rules", "expected"),
    [
        # the audit: 8 students at once, one image with the fewest runs -> 8 different images
        (12, {k: 1 for k in range(1, 12)}, 8, {}, {"distinct": 8}),
        (8, {}, 8, {}, {"distinct": 8}),
        # 3 images, at most 2 runs each: 6 students get one, 2 nothing (the holders would exceed it)
        (3, {}, 8, {"retire_min_runs": 1, "retire_max_runs": 2}, {"per_image": 2, "none": 2}),
    ],
)
def test_students_asking_at_once_get_distinct_images_while_enough_exist(
        engine, n_images, runs, n_students, rules, expected) -> None:
    make = session_factory(engine)
    ids = _class_of(make, n_images, n_students, runs, **rules)
    got = at_once(n_students, lambda i: _ask(make, ids[i]))
    served = Counter(name for name in got if name is not None)
    if "distinct" in expected:
        assert len(served) == expected["distinct"] and set(served.values()) == {1}, got
    else:
        assert set(served.values()) == {expected["per_image"]} and got.count(None) == expected["none"], got
    with make() as s:  # each served image is its student's draft (the hold)
        assert _count(s, LabelDraft) == sum(served.values())


def test_students_asking_at_once_in_a_round_spread_over_the_images_outside_the_queue(engine) -> None:
    """The audit: with a round open and its queue used up, 4 of 6 students got the same image
    from the pool outside the queue."""
    from cellspot.workflows import rounds as wr

    make = session_factory(engine)
    ids = _class_of(make, 8, 6, {k: 1 for k in range(2, 8)}, target_runs=1)
    with make() as s, s.begin():
        project = s.scalar(sa.select(Project))
        wr.open_new_round(s, project, strategy="random", target_runs=1,
                          scores=pd.DataFrame({"image": ["i00"], "score": [1.0]}))
    got = at_once(6, lambda i: _ask(make, ids[i]))
    assert got.count("i00") == 1 and len(set(got)) == 6, got  # the queued image once, then distinct ones


def test_a_class_labelling_at_once_never_takes_an_image_past_the_maximum(engine) -> None:
    """8 students label until nothing is left, at once: no image gets more runs than the maximum
    (the audit saw 12 runs with a maximum of 10), no student gets an image twice."""
    make = session_factory(engine)
    ids = _class_of(make, 5, 8, retire_min_runs=1, retire_max_runs=3)

    def label_until_done(i: int) -> list[str]:
        done = []
        for _ in range(10):
            with make() as s, s.begin():
                image = c.next_image(s, s.get(c.Annotator, ids[i]))
                if image is None:
                    return done
                image_id, name = image.id, image.name
            with make() as s, s.begin():
                c.submit_run(s, s.get(c.Annotator, ids[i]), image_id, [], f"{i}-{name}")
            done.append(name)
        return done

    got = at_once(8, label_until_done)
    assert all(len(names) == len(set(names)) for names in got)
    with make() as s:
        runs = Counter(s.scalars(sa.select(TaskRun.image_id)).all())
        assert len(runs) == 5 and max(runs.values()) <= 3, runs


@pytest.mark.parametrize("engine", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_request_that_keeps_losing_races_gives_up_rather_than_serve_an_unlocked_image(engine, monkeypatch) -> None:
    """After 2 s of races lost, requests served the best image without its lock: two students
    both got the last free slot of an image another request was taking (3 holders, maximum 2)."""
    import threading

    from cellspot.active.scheduler import LeaseContentionError

    monkeypatch.setattr(c, "HOLD_WAIT_SECONDS", 0.5)
    make = session_factory(engine)
    ids = _class_of(make, 2, 3, runs={0: 1, 1: 2}, retire_min_runs=1, retire_max_runs=2)  # i01 full
    slow = make()
    slow.begin()
    assert c.next_image(slow, slow.get(c.Annotator, ids[0])).name == "i00"  # not committed: a slow request
    outcome = {}

    def ask(i: int) -> None:
        try:
            outcome[i] = _ask(make, ids[i])
        except LeaseContentionError:
            outcome[i] = "busy"

    threads = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    slow.commit()
    slow.close()
    assert outcome == {1: "busy", 2: "busy"}
    with make() as s:
        assert c._holders(s, s.get(c.Project, s.get(c.Annotator, ids[0]).project_id), c._utc(None)) == {
            s.scalar(sa.select(Image.id).where(Image.name == "i00")): 1}


def test_a_lapsed_hold_is_not_renewed_past_the_maximum(session, room) -> None:
    """A student back after the lease time on an image classmates filled meanwhile made it one
    student over the maximum (3 runs with a maximum of 2)."""
    project, images = room
    project.settings = {**project.settings, "lease_seconds": 60, "retire_min_runs": 1, "retire_max_runs": 2}
    session.execute(sa.delete(GoldCell))
    ann = c.join_class(session, "7B", "ann")
    c.save_draft(session, ann, images["a"].id, [])
    old = utcnow() - timedelta(minutes=2)
    session.execute(sa.update(LabelDraft).where(LabelDraft.annotator_id == ann.id).values(updated_at=old))
    for name in ("bob", "cat"):  # the hold lapsed: two classmates take the image's two runs
        c.save_draft(session, c.join_class(session, "7B", name), images["a"].id, [])
    assert c.draft_of(session, ann) is None and _count(session, LabelDraft) == 2  # an empty draft moves on
    c.save_draft(session, ann, images["a"].id, [(5, 5, "alive")])
    session.execute(sa.update(LabelDraft).where(LabelDraft.annotator_id == ann.id).values(updated_at=old))
    kept = c.draft_of(session, ann)
    assert kept.image.id == images["a"].id and kept.marks == [(5.0, 5.0, "alive")] and kept.closed


# --------------------------------------------------------------------------- progress


def test_student_progress_counts_today_total_and_class(session, room) -> None:
    project, images = room
    ann, bob = c.join_class(session, "7B", "ann"), c.join_class(session, "7B", "bob")
    now = datetime(2025, 3, 4, 12, 0, tzinfo=timezone.utc)
    yesterday = now - timedelta(days=1)
    runs = [(ann, "a", yesterday), (ann, "b", now), (bob, "a", now), (bob, "b", now)]
    for i, (who, name, when) in enumerate(runs):
        run, _ = q.submit_task_run(session, images[name], who, [], f"r{i}")
        run.submitted_at = when
    outsider = q.get_or_create_annotator(session, project, "zed", "8A")
    run, _ = q.submit_task_run(session, images["c"], outsider, [], "rz")
    run.submitted_at = now
    session.flush()
    progress = c.student_progress(session, ann, now=now)
    assert (progress.done_today, progress.done_total, progress.class_total_today) == (1, 2, 3)
    assert progress.images_left == 3  # c, d, gold


def test_day_start_is_local_midnight() -> None:
    now = datetime(2025, 3, 4, 12, 30, tzinfo=timezone.utc)
    start = c.day_start(now)
    assert start <= now < start + timedelta(days=1)
    assert (start.hour, start.minute, start.second) == (0, 0, 0)


# --------------------------------------------------------------------------- tutorial


def test_tutorial_examples_from_gold(session, room) -> None:
    project, images = room
    session.add_all(GoldCell(image_id=images["a"].id, x=x, y=y, label=lab)
                    for x, y, lab in [(50, 40, "dead"), (45, 35, "alive"), (2, 2, "alive")])
    session.flush()
    examples = c.tutorial_examples(session, project, n=3, margin=10)
    assert [e.label for e in examples][:2] == ["alive", "dead"]
    assert all(e.source == "gold" for e in examples)
    assert all(10 <= e.x <= 89 and 10 <= e.y <= 69 for e in examples)  # (2, 2) is too close to the border
    assert {(e.x, e.y) for e in examples} == {(20, 20), (80, 60), (45, 35), (60, 30), (50, 40)}
    assert c.tutorial_examples(session, project, n=0) == []


def test_tutorial_examples_from_consensus_without_gold(session) -> None:
    project = _project(session)
    images = _images(session, project, ["a", "b"])
    snap = ConsensusSnapshot(project_id=project.id, method="test")
    session.add(snap)
    session.flush()
    cells = [("a", 30, 30, "alive", 0.6), ("a", 40, 40, "alive", 0.99), ("b", 50, 40, "dead", 0.9)]
    session.add_all(ConsensusCell(snapshot_id=snap.id, image_id=images[n].id, x=x, y=y, label=lab,
                                  p_alive=1.0 if lab == "alive" else 0.0, confidence=conf, support=1, n_runs=1)
                    for n, x, y, lab, conf in cells)
    session.flush()
    examples = c.tutorial_examples(session, project, n=1, margin=10)
    assert [(e.label, e.x, e.y, e.source) for e in examples] == [
        ("alive", 40.0, 40.0, "consensus"), ("dead", 50.0, 40.0, "consensus")]


def test_tutorial_examples_empty_project(session) -> None:
    assert c.tutorial_examples(session, _project(session)) == []

"""Student workflows: join a class, get the next image, submit a run, progress, tutorial.

The Streamlit student pages call only these functions. Every function takes a caller-owned
session and never commits (the app commits after each call that writes: :func:`join_class`,
:func:`next_image` (the student's hold on the image), :func:`save_draft`, :func:`submit_run`).

Coordinates are original image pixels (x right, y down, origin top-left), as in
:class:`cellspot.store.models.Click`.
"""

from __future__ import annotations

import logging
import random
import re
import time
import unicodedata
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import pandas as pd
from sqlalchemy import and_, delete, func, select, union
from sqlalchemy.orm import Session

from cellspot.evaluation import match_cells
from cellspot.names import has_control_character
from cellspot.store import queries
from cellspot.store.models import (
    ALQueueItem,
    Annotator,
    Click,
    ConsensusCell,
    GoldCell,
    Image,
    ImageLease,
    LabelDraft,
    Project,
    TaskRun,
    parse_utc,
    utcnow,
)

log = logging.getLogger(__name__)

NICKNAME_MAX_CHARS = 40
DEFAULT_FEEDBACK_RADIUS = 20.0  # px: a click this close to a gold cell "found" it
DEFAULT_GOLD_RATE = 0.0
TUTORIAL_MARGIN = 48  # px: example cells at least this far from the image border
HOLD_WAIT_SECONDS = 15.0  # PostgreSQL: wait this long for images other requests are taking, then give up
HOLD_RETRY_SECONDS = 0.01  # PostgreSQL: pause while the only images left are being taken by other requests


class ClassNotFoundError(LookupError):
    """No project lists this class code (``project.settings["class_codes"]``)."""


class ClassCodeSharedError(ClassNotFoundError):
    """Several projects list the same class code (a setup error)."""


class InvalidNicknameError(ValueError):
    """A nickname is empty, too long or contains control characters."""


class ImageNotFoundError(LookupError):
    """No image with that id in the annotator's project."""


@dataclass(frozen=True)
class FeedbackCell:
    """One gold cell and the student's click matched to it (``None`` fields when missed).

    For an ``extra`` click (no gold cell near it) the gold fields are ``None``.
    """

    x: float | None
    y: float | None
    label: str | None
    click_x: float | None = None
    click_y: float | None = None
    click_label: str | None = None


@dataclass(frozen=True)
class GoldFeedback:
    """How a run on a gold image compares with the expert cells.

    One-to-one matching within ``radius`` px (Hungarian, :func:`cellspot.evaluation.match_cells`):
    ``found`` (matched, same label), ``mislabelled`` (matched, the other of alive/dead),
    ``unsure`` (matched by a "not sure" click), ``missed`` (gold cells nobody clicked),
    ``extra`` (clicks far from every gold cell).
    """

    radius: float
    found: list[FeedbackCell]
    mislabelled: list[FeedbackCell]
    unsure: list[FeedbackCell]
    missed: list[FeedbackCell]
    extra: list[FeedbackCell]

    @property
    def n_gold(self) -> int:
        return len(self.found) + len(self.mislabelled) + len(self.unsure) + len(self.missed)

    def summary(self) -> dict[str, int]:
        """Counts per category (found, mislabelled, unsure, missed, extra, gold)."""
        return {"found": len(self.found), "mislabelled": len(self.mislabelled),
                "unsure": len(self.unsure), "missed": len(self.missed),
                "extra": len(self.extra), "gold": self.n_gold}


@dataclass(frozen=True)
class SubmitResult:
    """What :func:`submit_run` stored: ``created`` is False when ``client_key`` was already used
    (nothing new stored; ``task_run_id`` is the earlier run). ``gold_feedback`` is set for gold
    images, computed from the stored clicks (the same on a repeated submit); ``other_submit``
    says the stored run came from another submit than this one (its clicks were dropped)."""

    task_run_id: int
    created: bool
    n_clicks: int
    gold_feedback: GoldFeedback | None = None
    #: the earlier run was submitted with another client key (another tab or device): the
    #: clicks sent with this submit were not stored
    other_submit: bool = False


@dataclass(frozen=True)
class Progress:
    """A student's progress: runs today / in total, the class's runs today, images still open
    to this student (not seen, not retired, not one the page cannot show, and not a queued image
    that already has every run of the open round), how many of those are held by classmates
    right now up to their runs (queued images leased for every remaining run of the round, or
    images whose runs and holders reach the maximum: they come back if a classmate leaves
    them), and how many open images were left out because this device cannot show them."""

    done_today: int
    done_total: int
    class_total_today: int
    images_left: int
    images_waiting: int = 0
    images_unshowable: int = 0


@dataclass(frozen=True)
class NicknameUse:
    """What a nickname of a class already has (:func:`nickname_use`): ``nickname`` as stored
    (the first spelling; as typed when new), its submitted ``runs``, and ``active``: someone
    is labelling under it right now (its draft changed within the project's lease time, it
    holds a round's lease, or it is new: joined within the lease time, no run yet)."""

    nickname: str
    class_code: str
    exists: bool
    runs: int
    active: bool


class SavedDraft(NamedTuple):
    """A student's saved draft (:func:`draft_of`): the ``image``, the ``marks`` ``(x, y, label)``,
    and ``closed``: the image is no longer open (retired, or at the maximum of runs) but the
    draft has marks, so the student keeps it to finish and submit."""

    image: Image
    marks: list[tuple[float, float, str]]
    closed: bool = False


@dataclass(frozen=True)
class Example:
    """A tutorial example cell: its ``label`` (alive|dead), image and position (pixels);
    ``source`` is ``"gold"`` (expert cell) or ``"consensus"``."""

    label: str
    image_id: int
    x: float
    y: float
    source: str = "gold"
    image_name: str = ""


# --------------------------------------------------------------------------- join


def normalize_class_code(code: str) -> str:
    """A class code as stored: trimmed, inner whitespace removed, upper case."""
    return re.sub(r"\s+", "", str(code or "")).upper()


_EMOJI_JOINERS = frozenset({"\u200d", "\u200c"})  # ZERO WIDTH JOINER / NON-JOINER


def normalize_nickname(nickname: str) -> str:
    """``nickname`` trimmed with inner whitespace collapsed; :class:`InvalidNicknameError` when
    empty, longer than :data:`NICKNAME_MAX_CHARS` or containing control characters."""
    if not isinstance(nickname, str):
        raise InvalidNicknameError(f"a nickname must be text, got {type(nickname).__name__}")
    text = unicodedata.normalize("NFC", " ".join(nickname.split()))
    if not text:
        raise InvalidNicknameError(
            f"the nickname is empty; type 1 to {NICKNAME_MAX_CHARS} characters (no real name needed)")
    if len(text) > NICKNAME_MAX_CHARS:
        raise InvalidNicknameError(
            f"the nickname is too long: at most {NICKNAME_MAX_CHARS} characters; got {len(text)}")
    # control and format characters (bidi overrides, zero-width spaces) are refused, except the
    # zero-width joiners that glue emoji sequences together (a woman scientist emoji is one)
    if has_control_character(text, allowed=_EMOJI_JOINERS):
        raise InvalidNicknameError("the nickname contains control characters; use letters, digits or symbols")
    return text


def class_codes(project: Project) -> set[str]:
    """The class codes of ``project`` as stored and compared (:func:`normalize_class_code`)."""
    return {normalize_class_code(c) for c in (project.settings or {}).get("class_codes") or []}


def find_class(session: Session, class_code: str) -> Project:
    """The project whose ``settings["class_codes"]`` lists ``class_code`` (case-insensitive).

    Raises :class:`ClassNotFoundError` for an empty or unknown code, or when two projects list
    the same code (a setup error the message names).
    """
    code = normalize_class_code(class_code)
    if not code:
        raise ClassNotFoundError("the class code is empty; type the code your teacher gave you")
    matches = [project for project in session.scalars(select(Project).order_by(Project.id))
               if code in class_codes(project)]
    if not matches:
        raise ClassNotFoundError(f"no class has the code {code!r}; check the code with your teacher")
    if len(matches) > 1:
        names = ", ".join(repr(p.name) for p in matches)
        raise ClassCodeSharedError(f"the class code {code!r} is used by several projects ({names}); "
                                   "ask your teacher to give each class its own code")
    return matches[0]


def join_class(session: Session, class_code: str, nickname: str) -> Annotator:
    """The student ``nickname`` of the class ``class_code``, created on first join.

    Joining again with the same code and nickname (another tab, a reload, the next lesson)
    returns the same annotator; the nickname's letter case does not matter (the spelling of
    the first join is kept). Raises :class:`ClassNotFoundError`,
    :class:`InvalidNicknameError`. Flushes, never commits.
    """
    project, code, nick = _class_and_nickname(session, class_code, nickname)
    annotator = queries.get_or_create_annotator(session, project, nick, code, role="student")
    annotator.left_at = None  # labelling under this nickname again
    log.info("annotator %d joined class %s of project %r", annotator.id, annotator.class_code, project.name)
    return annotator


def _class_and_nickname(session: Session, class_code: str, nickname: str) -> tuple[Project, str, str]:
    """``(project, class code, nickname)`` as :func:`join_class` stores them: the nickname in the
    spelling of an earlier join when one differs only by letter case."""
    nick = normalize_nickname(nickname)
    project = find_class(session, class_code)
    code = normalize_class_code(class_code)
    # "Carol" and "carol" are one student, as class codes ignore case: an earlier spelling is kept
    # (compared in Python: SQLite's lower() knows ASCII letters only)
    known = session.scalars(select(Annotator.nickname).where(
        Annotator.project_id == project.id, Annotator.class_code == code).order_by(Annotator.id)).all()
    if nick not in known:
        nick = next((n for n in known if n.casefold() == nick.casefold()), nick)
    return project, code, nick


def nickname_use(session: Session, class_code: str, nickname: str, now: datetime | None = None) -> NicknameUse:
    """What joining ``class_code`` as ``nickname`` (any letter case) would continue, without
    joining: the runs of that student and whether someone is labelling under the nickname
    right now (changed a draft within the project's lease time at ``now``, holds a live round
    lease, or joined within it and has no run yet), so the join page can ask "is that you?"
    before two students become one annotator. Raises what :func:`join_class` raises. Reads only."""
    project, code, nick = _class_and_nickname(session, class_code, nickname)
    annotator = session.scalar(select(Annotator).where(
        Annotator.project_id == project.id, Annotator.class_code == code, Annotator.nickname == nick))
    if annotator is None:
        return NicknameUse(nick, code, exists=False, runs=0, active=False)
    now = _utc(now)
    runs = runs_submitted(session, annotator.id)
    # a new nickname joined moments ago is someone in the tutorial or on their first image,
    # unless that student has pressed Leave since
    joined_now = (runs == 0 and annotator.left_at is None
                  and _utc(annotator.created_at) > now - timedelta(seconds=_lease_seconds(project)))
    holding = bool(_holders(session, project, now, annotator_id=annotator.id))
    return NicknameUse(nick, code, exists=True, runs=runs, active=joined_now or holding)


# --------------------------------------------------------------------------- next image


def gold_image_ids(session: Session, project_id: int) -> set[int]:
    """Ids of the project's images that have expert (gold) cells."""
    stmt = (select(GoldCell.image_id).join(Image, GoldCell.image_id == Image.id)
            .where(Image.project_id == project_id).distinct())
    return set(session.scalars(stmt))


def _open_images(
    session: Session, annotator: Annotator, exclude_ids: Collection[int] = ()
) -> pd.DataFrame:
    """Images this annotator may still get: pixels, not seen by them; retired or at the
    project's maximum of runs (it retires at the next consensus) only if gold.

    Returns columns image_id, n_runs, status, gold (n_open x 4).
    """
    seen = select(TaskRun.image_id).where(TaskRun.annotator_id == annotator.id)
    runs = (select(TaskRun.image_id, func.count().label("n"))
            .join(Image, TaskRun.image_id == Image.id).where(Image.project_id == annotator.project_id)
            .group_by(TaskRun.image_id).subquery())  # this project's runs only (it grouped every run)
    stmt = (
        select(Image.id, func.coalesce(runs.c.n, 0), Image.status)
        .outerjoin(runs, runs.c.image_id == Image.id)
        .where(Image.project_id == annotator.project_id, Image.has_pixels.is_(True),
               Image.id.not_in(seen))
        .order_by(Image.id)
    )
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=["image_id", "n_runs", "status"])
    gold = gold_image_ids(session, annotator.project_id)
    frame["gold"] = frame["image_id"].isin(gold)
    from cellspot.active.scheduler import max_runs_of  # lazy: keeps the classroom import light

    limit = max_runs_of(session.get(Project, annotator.project_id))
    keep = ((frame["status"] == "active") & (frame["n_runs"] < (limit if limit is not None else float("inf")))) | frame["gold"]
    if exclude_ids:
        keep &= ~frame["image_id"].isin(list(exclude_ids))
    return frame[keep].reset_index(drop=True)


def next_image(
    session: Session,
    annotator: Annotator,
    rng: random.Random | None = None,
    exclude_ids: Collection[int] = (),
    *,
    now: datetime | None = None,
) -> Image | None:
    """The image to show ``annotator`` next, held for them; ``None`` when nothing is left for them.

    Candidates: images of the annotator's project with pixels that this annotator has not
    submitted yet and that are not retired (gold images stay available: they are checks, not
    work), minus ``exclude_ids``. With probability ``project.settings["gold_rate"]`` a gold
    image is chosen (an image with expert cells), otherwise a non-gold one; when the chosen
    pool has nothing to serve the other is used.

    Students in one room get different images: within a pool, the image with the fewest runs
    plus *holders* comes first (then one nobody holds, then ``rng``'s order). A holder is
    another student on the image right now: their draft on it changed within the project's
    lease time (``settings["lease_seconds"]``), or they hold a live round lease on it. A non-gold image
    whose runs plus holders reach the project's maximum of runs is not served at all (its
    holders would take it past the maximum), and one at the target runs only when no image
    below it is open. The image returned becomes the student's draft (empty; one draft per
    student, so the earlier one is dropped): that is their hold, seen by the next request.
    See "Concurrency" below.

    While the project has an open active-learning round, the non-gold image comes from the
    round's queue instead (:func:`cellspot.active.scheduler.next_queued_image`: best rank
    first, leased to this student until it is submitted or the lease expires at ``now`` +
    ``settings["lease_seconds"]``). When the queue has nothing for this student (every queued
    image done by them, given its runs for the round, or leased to classmates), the open images
    outside the queue follow, fewest runs plus holders first as without a round, so a class
    never stalls before the researcher opens the next round; then a gold image if one is open,
    else ``None``.

    Concurrency: on SQLite, dropping the student's earlier draft is the request's first write
    and takes the database's write lock, so requests run one after another and every count is
    current. On PostgreSQL the chosen image's row is locked ``FOR NO KEY UPDATE SKIP LOCKED``
    (a request never waits for a lock, so none deadlocks; submits are not blocked) and its runs
    and holders are counted afresh: an image another request is taking is skipped, one another
    request took since the ranking is ranked again (each try in a savepoint, so a missed
    image's lock is let go at once). After :data:`HOLD_WAIT_SECONDS` of races lost it raises
    :class:`cellspot.active.scheduler.LeaseContentionError` rather than serve an image without
    its lock. Flushes, never commits: the hold counts for others once the caller commits.
    """
    rng = rng or random.Random()
    now = _utc(now)
    project = session.get(Project, annotator.project_id)
    from cellspot.active.rounds import current_round  # lazy: keeps the classroom import light

    round_ = current_round(session, project)
    if round_ is not None:
        return _next_in_round(session, project, annotator, round_, rng, exclude_ids, now)
    want_gold = rng.random() < _gold_rate(project)
    pools = [lambda f: f["gold"] == want_gold, lambda f: f["gold"] != want_gold]
    return _take_open_image(session, project, annotator, pools, rng, exclude_ids, now)


def _gold_rate(project: Project) -> float:
    return float((project.settings or {}).get("gold_rate", DEFAULT_GOLD_RATE) or 0.0)


def _utc(ts: datetime | None) -> datetime:
    """``ts`` (now when ``None``) as an aware UTC datetime (SQLite returns naive UTC datetimes)."""
    return parse_utc(ts) or utcnow()


def _lease_seconds(project: Project) -> float:
    from cellspot.active.scheduler import lease_seconds_for  # lazy: keeps the classroom import light

    return lease_seconds_for(project)


def _holds(project: Project, now: datetime, *, annotator_id: int | None = None, image_id: int | None = None,
           not_annotator_id: int | None = None) -> Any:
    """``SELECT image_id, annotator_id`` (a UNION: a student once per image) of the students who
    hold an image of ``project`` at ``now``: their draft on it changed within the project's lease
    time, or a live round lease on it (not expired, image not submitted by them). Only
    ``annotator_id``'s holds, only ``image_id``'s, or everyone's but ``not_annotator_id``'s, when given."""
    since = now - timedelta(seconds=_lease_seconds(project))
    done = (select(TaskRun.id).where(TaskRun.image_id == ImageLease.image_id,
                                     TaskRun.annotator_id == ImageLease.annotator_id).exists())
    parts = []
    for model, alive in ((LabelDraft, LabelDraft.updated_at > since),
                         (ImageLease, and_(ImageLease.expires_at > now, ~done))):
        stmt = (select(model.image_id, model.annotator_id).join(Image, Image.id == model.image_id)
                .where(Image.project_id == project.id, alive))
        if annotator_id is not None:
            stmt = stmt.where(model.annotator_id == int(annotator_id))
        if not_annotator_id is not None:
            stmt = stmt.where(model.annotator_id != int(not_annotator_id))
        if image_id is not None:
            stmt = stmt.where(model.image_id == int(image_id))
        parts.append(stmt)
    return union(*parts)


def _holders(session: Session, project: Project, now: datetime, **which: int | None) -> dict[int, int]:
    """``{image_id: students}``: how many students hold each image of ``project`` at ``now``
    (:func:`_holds`, whose filters ``which`` takes)."""
    out: dict[int, int] = {}
    for image, _ in session.execute(_holds(project, now, **which)).tuples():
        out[int(image)] = out.get(int(image), 0) + 1
    return out


def _held(frame: pd.DataFrame, holders: dict[int, int]) -> pd.Series:
    """Holders (:func:`_holders`) of each image of ``frame`` (:func:`_open_images`), 0 for none."""
    return frame["image_id"].map(lambda i: holders.get(int(i), 0)).astype(int)


def _ranked(frame: pd.DataFrame, holders: dict[int, int], max_runs: int | None, rng: random.Random) -> pd.DataFrame:
    """``frame`` (:func:`_open_images`) in serving order with ``load`` = runs + holders: least
    load first, then the fewest holders (an image nobody is on before a held one with as much
    load), then ``rng``'s order; non-gold images whose load reaches ``max_runs`` left out."""
    held = _held(frame, holders)
    frame = frame.assign(load=(frame["n_runs"] + held).astype(int), holders=held,
                         tie=[rng.random() for _ in range(len(frame))])
    if max_runs is not None:
        frame = frame[~_at_max(frame, frame["load"], max_runs)]
    return frame.sort_values(["load", "holders", "tie"], kind="stable")


def _at_max(frame: pd.DataFrame, load: pd.Series, max_runs: int) -> pd.Series:
    """The images of ``frame`` served no more now: not gold, and ``load`` (runs plus holders)
    at the maximum of runs."""
    return ~frame["gold"] & (load >= int(max_runs))


Pool = Callable[[pd.DataFrame], pd.Series]


def _candidates(session: Session, project: Project, annotator: Annotator, pools: Sequence[Pool],
                rng: random.Random, exclude_ids: Collection[int], now: datetime) -> pd.DataFrame:
    """The images of ``pools`` (filters of :func:`_open_images`' frame, each pool before the next)
    that ``annotator`` may be served now, in serving order (:func:`_ranked`)."""
    from cellspot.active.scheduler import max_runs_of

    frame = _open_images(session, annotator, exclude_ids)
    holders = _holders(session, project, now, not_annotator_id=annotator.id)
    max_runs = max_runs_of(project)
    ranked = [r for r in (_ranked(frame[pool(frame)], holders, max_runs, rng) for pool in pools) if not r.empty]
    return pd.concat(ranked, ignore_index=True) if ranked else frame.iloc[:0].assign(load=0)


def _lock_image(session: Session, image_id: int) -> bool:
    """PostgreSQL: lock image ``image_id``'s row unless another open transaction holds it (True
    when locked). ``FOR NO KEY UPDATE``: inserts referencing the image (runs, drafts) still pass."""
    stmt = select(Image.id).where(Image.id == int(image_id)).with_for_update(skip_locked=True, key_share=True)
    return session.execute(stmt).first() is not None


def _image_load(session: Session, project: Project, annotator: Annotator, image_id: int, now: datetime) -> int:
    """Runs plus holders (other than ``annotator``) of one image, counted now in one statement:
    one snapshot, so a classmate's submit (a hold turned into a run) cannot be missed or counted twice."""
    runs = select(func.count()).select_from(TaskRun).where(TaskRun.image_id == int(image_id)).scalar_subquery()
    holds = _holds(project, now, image_id=image_id, not_annotator_id=annotator.id).subquery()
    held = select(func.count()).select_from(holds).scalar_subquery()
    return int(session.scalar(select(runs + held)) or 0)


def _take_open_image(session: Session, project: Project, annotator: Annotator, pools: Sequence[Pool],
                     rng: random.Random, exclude_ids: Collection[int], now: datetime) -> Image | None:
    """Hold and return the first image of :func:`_candidates` (see :func:`next_image`, "Concurrency")."""
    drop_draft(session, annotator.id)  # the student's earlier hold ends; on SQLite: the write lock
    if session.get_bind().dialect.name != "postgresql":
        ranked = _candidates(session, project, annotator, pools, rng, exclude_ids, now)
        return None if ranked.empty else _hold(session, annotator, int(ranked["image_id"].iloc[0]), now)
    deadline = time.monotonic() + HOLD_WAIT_SECONDS
    skipped: set[int] = set()
    while True:
        ranked = _candidates(session, project, annotator, pools, rng, exclude_ids, now)
        if ranked.empty:
            return None
        moved = False
        for image_id, load in ranked[["image_id", "load"]].itertuples(index=False):
            if int(image_id) in skipped:
                continue
            attempt = session.begin_nested()  # rolled back on a miss: the row lock goes with it
            if not _lock_image(session, int(image_id)):
                attempt.rollback()
                skipped.add(int(image_id))  # another request is taking it now
                continue
            if _image_load(session, project, annotator, int(image_id), now) != int(load):
                attempt.rollback()  # its lock goes too: others need not wait on an image nobody took
                moved = True  # another request took it since the ranking: rank again
                break
            attempt.commit()
            return _hold(session, annotator, int(image_id), now)
        if time.monotonic() > deadline:  # never an image without its lock: it could pass the maximum
            from cellspot.active.scheduler import LeaseContentionError

            raise LeaseContentionError(f"every open image was being taken by other requests for "
                                       f"{HOLD_WAIT_SECONDS:.0f} s; ask again")
        time.sleep(HOLD_RETRY_SECONDS)
        if not moved:
            skipped.clear()


def _hold(session: Session, annotator: Annotator, image_id: int, now: datetime) -> Image:
    """Make ``image_id`` the student's draft, keeping its marks when the draft is already on it."""
    draft = session.get(LabelDraft, annotator.id, populate_existing=True)
    if draft is not None and int(draft.image_id) == int(image_id):
        draft.updated_at = now
        session.flush()
    else:
        queries.upsert(session, LabelDraft, {"annotator_id": annotator.id, "image_id": int(image_id),
                                             "marks": [], "updated_at": now}, key=["annotator_id"])
    return session.get(Image, int(image_id))


def _next_in_round(
    session: Session, project: Project, annotator: Annotator, round_: Any, rng: random.Random,
    exclude_ids: Collection[int], now: datetime,
) -> Image | None:
    """:func:`next_image` while ``round_`` is open: gold at its rate, else the round's queue."""
    from cellspot.active import scheduler

    held = scheduler.held_image(session, project, annotator, round_=round_, now=now, exclude_ids=exclude_ids)
    if held is not None:  # a reload: the image the student is on, before any draw of a gold image
        return _hold(session, annotator, held.id, now)
    frame = _open_images(session, annotator, exclude_ids)
    if frame["gold"].any() and rng.random() < _gold_rate(project):
        scheduler.release_leases(session, annotator.id)  # the student moved on to a check image
        return _take_open_image(session, project, annotator, [lambda f: f["gold"]], rng, exclude_ids, now)
    image = scheduler.next_queued_image(session, project, annotator, now=now, exclude_ids=exclude_ids,
                                        round_=round_)
    if image is not None:
        return _hold(session, annotator, image.id, now)
    queued = set(session.scalars(select(ALQueueItem.image_id).where(ALQueueItem.round_id == round_.id)))
    rest: Pool = lambda f: ~f["gold"] & ~f["image_id"].isin(queued)  # noqa: E731
    return _take_open_image(session, project, annotator, [rest, lambda f: f["gold"]], rng, exclude_ids, now)


def leave_class(session: Session, annotator_id: int) -> int:
    """The student leaves this device: the image leased to them goes back to the round's queue
    at once (instead of after the lease expires) and their unsubmitted draft is dropped; their
    runs stay. Returns the leases released."""
    from cellspot.active import scheduler

    drop_draft(session, annotator_id)
    annotator = session.get(Annotator, annotator_id)
    if annotator is not None:
        annotator.left_at = utcnow()  # the nickname is free again (see nickname_use)
    return scheduler.release_leases(session, annotator_id)


# --------------------------------------------------------------------------- submit


def get_project_image(session: Session, annotator: Annotator, image_id: int) -> Image:
    """Image ``image_id`` if it belongs to the annotator's project; :class:`ImageNotFoundError`."""
    image = session.get(Image, int(image_id))
    if image is None or image.project_id != annotator.project_id:
        raise ImageNotFoundError(f"no image with id {image_id} in this annotator's project")
    return image


def feedback_radius(project: Project) -> float:
    """The gold-feedback matching radius: ``settings["feedback_radius"]`` or the default (px)."""
    value = (project.settings or {}).get("feedback_radius", DEFAULT_FEEDBACK_RADIUS)
    return float(value) if value and float(value) > 0 else DEFAULT_FEEDBACK_RADIUS


def compare_with_gold(
    gold: Sequence[tuple[float, float, str]],
    clicks: Sequence[tuple[float, float, str]],
    radius: float = DEFAULT_FEEDBACK_RADIUS,
) -> GoldFeedback:
    """Match ``clicks`` ``(x, y, label)`` one-to-one to ``gold`` ``(x, y, label)`` cells.

    Pure. A click matches a gold cell closer than ``radius`` px; ties resolved by the
    minimum total distance. See :class:`GoldFeedback` for the categories.
    """
    truth = pd.DataFrame(list(gold), columns=["x", "y", "label"]).assign(image=0, diameter=2.0 * radius)
    pred = pd.DataFrame(list(clicks), columns=["x", "y", "label"]).assign(image=0)
    m = match_cells(truth, pred, match_fraction=0.5)
    matched_t, matched_p = set(m.truth.tolist()), set(m.pred.tolist())
    found, wrong, unsure = [], [], []
    for ti, pi in zip(m.truth.tolist(), m.pred.tolist()):
        g, c = truth.iloc[ti], pred.iloc[pi]
        cell = FeedbackCell(float(g.x), float(g.y), str(g.label), float(c.x), float(c.y), str(c.label))
        (unsure if c.label == "not_sure" else found if c.label == g.label else wrong).append(cell)
    missed = [FeedbackCell(float(g.x), float(g.y), str(g.label))
              for i, g in enumerate(truth.itertuples(index=False)) if i not in matched_t]
    extra = [FeedbackCell(None, None, None, float(c.x), float(c.y), str(c.label))
             for i, c in enumerate(pred.itertuples(index=False)) if i not in matched_p]
    return GoldFeedback(radius, found, wrong, unsure, missed, extra)


def submit_run(
    session: Session,
    annotator: Annotator,
    image_id: int,
    clicks: Sequence[tuple[float, float, str]],
    client_key: str,
) -> SubmitResult:
    """Store the student's run on ``image_id``: ``clicks`` ``(x, y, label)`` in image pixels.

    Idempotent on ``client_key`` (one key per displayed image): a double submit, a reload
    after submit or a second tab with the same key stores nothing new and returns the first
    run (``created=False``), also under concurrent submits. A student's second run on an
    image they already submitted (another tab, another key) is not stored either: the
    earlier run is returned with ``created=False``. On a gold image the result
    carries :class:`GoldFeedback` (the run is flagged ``is_gold_check``; the student's
    reliability against gold is updated by the next :func:`cellspot.workflows.aggregate.aggregate`).
    Submitting ends the student's lease on the image (:mod:`cellspot.active.scheduler`).
    Raises :class:`ImageNotFoundError`, :class:`cellspot.store.queries.InvalidClickError`,
    :class:`cellspot.store.queries.ClientKeyConflictError`. Flushes, never commits.
    """
    image = get_project_image(session, annotator, image_id)
    clean = [tuple(c) for c in clicks]
    gold = session.execute(
        select(GoldCell.x, GoldCell.y, GoldCell.label).where(GoldCell.image_id == image.id)
        .order_by(GoldCell.id)).tuples().all()
    earlier = session.execute(
        select(TaskRun).where(TaskRun.image_id == image.id, TaskRun.annotator_id == annotator.id,
                              TaskRun.client_key != client_key).order_by(TaskRun.id).limit(1)).scalar_one_or_none()
    if earlier is not None:  # a second tab (another key) on an image this student already did
        run, created = earlier, False
    else:
        run, created = queries.submit_task_run(
            session, image, annotator, clean, client_key, source="app", is_gold_check=bool(gold))
    if created:  # exactly what was just inserted
        stored = [(float(x), float(y), str(label)) for x, y, label in clean]
    else:  # the first submit's clicks, whatever this one sent
        stored = session.execute(
            select(Click.x, Click.y, Click.label).where(Click.task_run_id == run.id)
            .order_by(Click.click_index)).tuples().all()
    feedback = None
    if gold:
        project = session.get(Project, annotator.project_id)
        feedback = compare_with_gold(gold, stored, feedback_radius(project))
    from cellspot.active.scheduler import release_leases  # lazy: keeps the classroom import light

    release_leases(session, annotator.id, image.id)  # submitting ends this student's lease on it
    drop_draft(session, annotator.id, image.id)
    if created:
        log.info("run %d stored: annotator %d, image %d, %d clicks", run.id, annotator.id, image.id, len(stored))
    else:
        log.info("repeated submit of run %d (client_key reused); nothing new stored", run.id)
    return SubmitResult(task_run_id=run.id, created=created, n_clicks=len(stored), gold_feedback=feedback,
                        other_submit=earlier is not None)


# --------------------------------------------------------------------------- drafts


def save_draft(session: Session, annotator: Annotator, image_id: int,
               marks: Sequence[tuple[float, float, str]]) -> bool:
    """Keep ``marks`` ``(x, y, label)`` as ``annotator``'s unsubmitted work on ``image_id`` (one
    draft per student: a draft on another image is replaced). The marks are checked as a submit
    checks them (:class:`cellspot.store.queries.InvalidClickError`); :class:`ImageNotFoundError`
    for an image outside the student's project. Returns False, storing nothing, when the
    student has already submitted ``image_id`` (a stale tab or device: its marks must not
    replace the draft of the image the student is on now). Flushes, never commits."""
    image = get_project_image(session, annotator, image_id)
    clean = [(float(x), float(y), str(label)) for x, y, label in marks]
    queries.validate_clicks(image, clean)
    done = session.scalar(select(TaskRun.id).where(TaskRun.annotator_id == annotator.id,
                                                   TaskRun.image_id == image.id).limit(1))
    if done is not None:
        return False
    # one upsert, so two tabs of a student saving their first draft at once cannot collide
    queries.upsert(session, LabelDraft, {"annotator_id": annotator.id, "image_id": image.id,
                                         "marks": [list(m) for m in clean], "updated_at": utcnow()},
                   key=["annotator_id"])
    return True


def draft_of(session: Session, annotator: Annotator, exclude_ids: Collection[int] = ()) -> SavedDraft | None:
    """``annotator``'s saved draft as :class:`SavedDraft` ``(image, marks, closed)``, else ``None``.

    A draft comes back while its image is open to the student (pixels, not submitted by them,
    active or gold, below the maximum of runs). A draft *with marks* whose image closed since
    (retired by a consensus, or at the maximum of runs by a classmate's submit) comes back too,
    with ``closed=True``: nothing a student clicked is thrown away, and their submit is stored.
    ``None`` for a draft on an image in ``exclude_ids`` (kept), or on an image the student
    submitted or that lost its pixels, or an empty draft on a closed image (those are deleted).
    A draft that comes back on an open image renews the student's hold on it, unless the hold
    had lapsed and classmates filled the image up to its maximum meanwhile: then an empty draft
    is dropped (``None``: the next image) and one with marks comes back ``closed``. Flushes,
    never commits."""
    draft = session.get(LabelDraft, annotator.id, populate_existing=True)  # written by Core statements
    if draft is None:
        return None
    if int(draft.image_id) in {int(i) for i in exclude_ids}:
        return None
    marks = [(float(x), float(y), str(label)) for x, y, label in (draft.marks or [])]
    image = session.get(Image, draft.image_id)
    if _open_images(session, annotator)["image_id"].eq(draft.image_id).any():
        now = utcnow()
        if _hold_lapsed_and_taken(session, annotator, draft, image, now):
            if not marks:  # nothing to keep: the next image
                drop_draft(session, annotator.id)
                return None
            return SavedDraft(image, marks, closed=True)
        draft.updated_at = now  # the student is on it again: their hold starts anew (see _holders)
        session.flush()
        return SavedDraft(image, marks)
    done = session.scalar(select(TaskRun.id).where(TaskRun.annotator_id == annotator.id,
                                                   TaskRun.image_id == draft.image_id).limit(1))
    if marks and done is None and image.has_pixels:
        log.info("annotator %d keeps %d mark(s) on image %d, closed since they started it",
                 annotator.id, len(marks), image.id)
        return SavedDraft(image, marks, closed=True)
    drop_draft(session, annotator.id)
    return None


def _hold_lapsed_and_taken(session: Session, annotator: Annotator, draft: LabelDraft, image: Image,
                           now: datetime) -> bool:
    """True when the student's hold on ``image`` lapsed (no change for the lease time) and
    classmates' runs and holds have since filled the image up to the maximum of runs: renewing
    the hold would put one more student on it than allowed. Gold images have no maximum."""
    from cellspot.active.scheduler import max_runs_of  # lazy: keeps the classroom import light

    project = session.get(Project, annotator.project_id)
    if _utc(draft.updated_at) > now - timedelta(seconds=_lease_seconds(project)):
        return False  # still held: the classmates' counts included this student
    limit = max_runs_of(project)
    if limit is None or image.id in gold_image_ids(session, project.id):
        return False
    return _image_load(session, project, annotator, image.id, now) >= int(limit)


def drop_draft(session: Session, annotator_id: int, image_id: int | None = None) -> None:
    """Delete the student's draft (only the one on ``image_id`` when given). Never commits."""
    stmt = delete(LabelDraft).where(LabelDraft.annotator_id == int(annotator_id))
    if image_id is not None:
        stmt = stmt.where(LabelDraft.image_id == int(image_id))
    session.execute(stmt)


# --------------------------------------------------------------------------- progress


def day_start(now: datetime | None = None) -> datetime:
    """Midnight (server local time) of ``now``'s day, timezone-aware."""
    local = (now or datetime.now().astimezone()).astimezone()
    return local.replace(hour=0, minute=0, second=0, microsecond=0)


def runs_submitted(session: Session, annotator_id: int, since: datetime | None = None) -> int:
    """How many task runs the annotator has submitted (since ``since``, when given)."""
    mine = select(func.count()).select_from(TaskRun).where(TaskRun.annotator_id == annotator_id)
    return int(session.scalar(mine if since is None else mine.where(TaskRun.submitted_at >= since)) or 0)


def student_progress(session: Session, annotator: Annotator, now: datetime | None = None,
                     exclude_ids: Collection[int] = ()) -> Progress:
    """Runs of ``annotator`` today and in total, runs of its class (same project and class
    code) today, and the images still open to it (see :class:`Progress`); ``exclude_ids``: the
    images the page cannot show (missing or damaged files), counted apart. "Today" starts at
    local midnight."""
    since = day_start(now)
    done_total = runs_submitted(session, annotator.id)
    done_today = runs_submitted(session, annotator.id, since)
    classmates = select(Annotator.id).where(Annotator.project_id == annotator.project_id,
                                            Annotator.class_code == annotator.class_code)
    class_today = session.scalar(
        select(func.count()).select_from(TaskRun)
        .where(TaskRun.annotator_id.in_(classmates), TaskRun.submitted_at >= since)) or 0
    left, waiting, unshowable = _images_left(session, annotator, _utc(now), exclude_ids)
    return Progress(int(done_today), int(done_total), int(class_today), left, waiting, unshowable)


def _images_left(session: Session, annotator: Annotator, now: datetime,
                 exclude_ids: Collection[int]) -> tuple[int, int, int]:
    """``(left, waiting, unshowable)`` for :func:`student_progress`: the images open to
    ``annotator`` without those in ``exclude_ids`` and the queued images that have every run of
    the open round; how many of those left are held by classmates up to their runs right now
    (a queued image whose remaining runs are all leased, or a non-gold image whose runs and
    holders reach the maximum of runs); and how many open images are in ``exclude_ids``."""
    from cellspot.active import scheduler
    from cellspot.active.rounds import current_round, target_runs_for

    frame = _open_images(session, annotator)
    skip = frame["image_id"].isin([int(i) for i in exclude_ids])
    unshowable = int(skip.sum())
    frame = frame[~skip]
    if frame.empty:
        return 0, 0, unshowable
    project = session.get(Project, annotator.project_id)
    max_runs = scheduler.max_runs_of(project)
    waiting = pd.Series(False, index=frame.index)
    if max_runs is not None:
        load = frame["n_runs"] + _held(frame, _holders(session, project, now, not_annotator_id=annotator.id))
        waiting = _at_max(frame, load, max_runs)
    round_ = current_round(session, project)
    if round_ is not None:
        queue = scheduler.queue_progress(session, round_, now)
        target = target_runs_for(project, round_)
        full = queue.loc[queue["runs_round"] >= target, "image_id"]
        busy = queue.loc[(queue["runs_round"] < target) & (queue["runs_round"] + queue["leased"] >= target),
                         "image_id"]
        keep = ~frame["image_id"].isin(full)
        frame, waiting = frame[keep], waiting[keep] | frame.loc[keep, "image_id"].isin(busy)
    return len(frame), int(waiting.sum()), unshowable


# --------------------------------------------------------------------------- tutorial


def tutorial_examples(
    session: Session, project: Project, n: int = 3, margin: int = TUTORIAL_MARGIN
) -> list[Example]:
    """Up to ``n`` example cells per label (alive, dead), alternating alive / dead.

    Taken from the project's gold cells when it has any of that label, else from the most
    confident cells of the latest consensus snapshot. Only images with pixels, and cells at
    least ``margin`` px from the border (so a crop around them is whole); spread over
    images. Deterministic.
    """
    if n < 1:
        return []
    per_label: dict[str, list[Example]] = {}
    for label in ("alive", "dead"):
        per_label[label] = (_gold_examples(session, project, label, n, margin)
                            or _consensus_examples(session, project, label, n, margin))
    out: list[Example] = []
    for i in range(n):
        out.extend(per_label[label][i] for label in ("alive", "dead") if i < len(per_label[label]))
    return out


def _inside(x: Any, y: Any, width: Any, height: Any, margin: int) -> Any:
    return (x >= margin) & (y >= margin) & (x <= width - 1 - margin) & (y <= height - 1 - margin)


def _spread(frame: pd.DataFrame, n: int, source: str, label: str) -> list[Example]:
    """``n`` rows spread over images: round-robin over images in id order."""
    if frame.empty:
        return []
    frame = frame.assign(rank=frame.groupby("image_id").cumcount()).sort_values(
        ["rank", "image_id"], kind="stable")
    return [Example(label, int(r.image_id), float(r.x), float(r.y), source, str(r.name))
            for r in frame.head(n).itertuples(index=False)]


def _gold_examples(session: Session, project: Project, label: str, n: int, margin: int) -> list[Example]:
    stmt = (select(GoldCell.image_id, GoldCell.x, GoldCell.y, Image.width, Image.height, Image.name)
            .join(Image, GoldCell.image_id == Image.id)
            .where(Image.project_id == project.id, Image.has_pixels.is_(True), GoldCell.label == label)
            .order_by(GoldCell.image_id, GoldCell.id))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(),
                         columns=["image_id", "x", "y", "width", "height", "name"])
    if frame.empty:
        return []
    frame = frame[_inside(frame.x, frame.y, frame.width, frame.height, margin)]
    return _spread(frame[["image_id", "x", "y", "name"]], n, "gold", label)


def _consensus_examples(session: Session, project: Project, label: str, n: int, margin: int) -> list[Example]:
    snapshot = queries.latest_snapshot(session, project)
    if snapshot is None:
        return []
    c = ConsensusCell
    stmt = (select(c.image_id, c.x, c.y, Image.width, Image.height, Image.name, c.confidence)
            .join(Image, c.image_id == Image.id)
            .where(c.snapshot_id == snapshot.id, c.label == label, Image.has_pixels.is_(True))
            .order_by(c.confidence.desc(), c.image_id, c.id))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(),
                         columns=["image_id", "x", "y", "width", "height", "name", "confidence"])
    if frame.empty:
        return []
    frame = frame[_inside(frame.x, frame.y, frame.width, frame.height, margin)]
    return _spread(frame[["image_id", "x", "y", "name"]], n, "consensus", label)


__all__ = [
    "ClassCodeSharedError", "ClassNotFoundError", "Example", "FeedbackCell", "GoldFeedback", "ImageNotFoundError",
    "InvalidNicknameError", "NicknameUse", "Progress", "SavedDraft", "SubmitResult", "compare_with_gold", "day_start",
    "draft_of", "drop_draft", "feedback_radius", "find_class", "get_project_image", "gold_image_ids", "join_class",
    "leave_class", "next_image", "nickname_use", "normalize_class_code", "normalize_nickname", "runs_submitted",
    "save_draft", "student_progress",
    "submit_run", "tutorial_examples",
]

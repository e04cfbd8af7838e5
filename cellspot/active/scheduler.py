"""Hand the open round's queue out to students: best rank first, one lease per student and image.

:func:`next_queued_image` gives a student the best-ranked image of the open round that

* this student has not submitted (ever),
* is not retired and has pixels,
* has room: ``runs this round + live leases < target_runs``.

Among those, images that nobody holds a live lease on come first (then by rank), so a room
of students asking at once get distinct images while enough exist, and the best-ranked
images get their runs first. Asking again releases the student's earlier, unsubmitted lease
(the same image comes back if it is still the best one for them).

A lease lives ``lease_seconds``; after that the image counts as free again (an abandoned tab
gives its image back). Submitting a run ends the student's lease on that image
(:func:`release_leases`, called by :func:`cellspot.workflows.classroom.submit_run`), and a
lease whose student has a run on the image never counts, whatever happens to the row.

Concurrency: the lease is counted and taken inside the caller's transaction, and the store
keeps it honest on both backends:

* SQLite: the first statement (releasing the student's own leases) takes the database's
  write lock, so requests run one after another and every count is current.
* PostgreSQL: the candidate's queue row is read ``FOR UPDATE SKIP LOCKED``, so one request
  at a time counts and leases a given image; the others skip it and take the next one (a
  room gets distinct images without a herd on the best one). Runs and leases are then
  counted afresh (READ COMMITTED sees all that was committed before the lock). A lock is
  never waited for, so requests cannot deadlock; when the only images left are locked by
  other requests, the request polls briefly (:data:`RETRY_SLEEP_SECONDS`).
* Each lease also holds a ``slot`` (``0 <= slot < target_runs``) of its image under a unique
  ``(image_id, slot)`` constraint and is written with ``INSERT ... ON CONFLICT DO NOTHING``
  (a dead lease's slot is first freed by a conditional ``DELETE``): a request that still
  loses a race inserts nothing and chooses again from fresh data.

A submit turns the student's lease into a run in one transaction, so ``runs + live leases``
never grows behind a lease-taker's back (only a run submitted after its lease expired can
push an image past its target). The caller owns the session and commits; nothing here commits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

import pandas as pd
from sqlalchemy import and_, delete, exists, func, insert, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cellspot.active.rounds import current_round, target_runs_for, utc
from cellspot.store.models import ALQueueItem, ALRound, Annotator, Image, ImageLease, Project, TaskRun, utcnow

log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 900  # project setting "lease_seconds"
LEASE_WAIT_SECONDS = 15.0  # give up (LeaseContentionError) after losing races this long
RETRY_SLEEP_SECONDS = 0.01  # PostgreSQL: pause while the only images left are being leased
CANDIDATE_COLUMNS = ["image_id", "rank", "runs", "leases"]
LEASE_COLUMNS = ["image_id", "annotator_id", "round_id", "slot", "leased_at", "expires_at"]
PROGRESS_COLUMNS = ["image_id", "runs_round", "leased"]


class NoOpenRoundError(LookupError):
    """The project has no open active-learning round (open one with ``open_round``)."""


class LeaseContentionError(RuntimeError):
    """No lease could be taken within :data:`LEASE_WAIT_SECONDS` of races lost in a row."""


@dataclass(frozen=True)
class LeaseRequest:
    """One request's fixed inputs: who, which round, when, for how long, how many runs."""

    annotator_id: int
    round_id: int
    round_start: datetime
    now: datetime
    expires_at: datetime
    target_runs: int


def lease_seconds_for(project: Project) -> float:
    """``project.settings["lease_seconds"]`` or :data:`DEFAULT_LEASE_SECONDS` (must be > 0)."""
    value = float((project.settings or {}).get("lease_seconds", DEFAULT_LEASE_SECONDS))
    if value <= 0:
        raise ValueError(f"lease_seconds must be > 0, got {value!r}")
    return value


# --------------------------------------------------------------------------- leases


def _done():  # noqa: ANN202 - SQL expression
    """True where the lease's student has submitted a run on the leased image."""
    return exists().where(TaskRun.image_id == ImageLease.image_id, TaskRun.annotator_id == ImageLease.annotator_id)


def _live(now: datetime):  # noqa: ANN202 - SQL expression
    """True for a lease that still counts at ``now``: not expired, not submitted."""
    return and_(ImageLease.expires_at > now, ~_done())


def release_leases(session: Session, annotator_id: int, image_id: int | None = None, *,
                   keep_lease_id: int | None = None) -> int:
    """Delete the leases of ``annotator_id`` (on ``image_id`` only, when given; all but lease
    ``keep_lease_id``, when given); returns how many."""
    stmt = delete(ImageLease).where(ImageLease.annotator_id == int(annotator_id))
    if image_id is not None:
        stmt = stmt.where(ImageLease.image_id == int(image_id))
    if keep_lease_id is not None:
        stmt = stmt.where(ImageLease.id != int(keep_lease_id))
    return int(session.execute(stmt, execution_options={"synchronize_session": False}).rowcount or 0)


def held_image(session: Session, project: Project, annotator: Annotator, *, round_: ALRound,
               now: datetime | None = None, lease_seconds: float | None = None,
               exclude_ids: Collection[int] = ()) -> Image | None:
    """The image ``annotator`` holds a live lease of ``round_`` on and has not submitted (a
    reload, a second tab), with the lease renewed for ``lease_seconds`` from ``now`` and the
    student's other leases released; None when there is none. Flushes, never commits."""
    now = utc(now or utcnow())
    kept = _own_live_lease(session, round_, annotator, now, exclude_ids)
    if kept is None:
        return None
    seconds = float(lease_seconds) if lease_seconds is not None else lease_seconds_for(project)
    kept.expires_at = now + timedelta(seconds=seconds)
    release_leases(session, annotator.id, keep_lease_id=kept.id)
    session.flush()
    log.debug("round %d: annotator %d keeps image %d", round_.number, annotator.id, kept.image_id)
    return session.get(Image, kept.image_id)


def _own_live_lease(session: Session, round_: ALRound, annotator: Annotator, now: datetime,
                    exclude_ids: Collection[int]) -> ImageLease | None:
    """The student's newest lease of ``round_`` that still counts at ``now``, on an image they have
    not submitted, that is still open and not in ``exclude_ids`` (None when there is none)."""
    stmt = (select(ImageLease).join(Image, Image.id == ImageLease.image_id)
            .where(ImageLease.annotator_id == annotator.id, ImageLease.round_id == round_.id,
                   ImageLease.expires_at > now, ~_done(), Image.status == "active", Image.has_pixels.is_(True)))
    if exclude_ids:
        stmt = stmt.where(ImageLease.image_id.not_in([int(i) for i in exclude_ids]))
    return session.scalars(stmt.order_by(ImageLease.leased_at.desc(), ImageLease.id.desc()).limit(1)).first()


def expire_leases(session: Session, now: datetime | None = None) -> int:
    """Delete every lease that no longer counts (expired or submitted); returns how many.

    Housekeeping only: dead leases never count, and their slots are reused anyway.
    """
    stmt = delete(ImageLease).where(or_(ImageLease.expires_at <= utc(now or utcnow()), _done()))
    return int(session.execute(stmt, execution_options={"synchronize_session": False}).rowcount or 0)


def live_leases(session: Session, project: Project, now: datetime | None = None) -> pd.DataFrame:
    """The project's leases that count at ``now`` (columns :data:`LEASE_COLUMNS`)."""
    lease = ImageLease
    stmt = (select(lease.image_id, lease.annotator_id, lease.round_id, lease.slot, lease.leased_at,
                   lease.expires_at)
            .join(Image, Image.id == lease.image_id)
            .where(Image.project_id == project.id, _live(utc(now or utcnow())))
            .order_by(lease.image_id, lease.slot))
    return pd.DataFrame(session.execute(stmt).tuples().all(), columns=LEASE_COLUMNS)


# --------------------------------------------------------------------------- candidates


def _round_counts(round_: ALRound, now: datetime):  # noqa: ANN202 - two subqueries
    """Subqueries ``(image_id, n)``: runs submitted since ``round_`` opened, and live leases."""
    runs = (select(TaskRun.image_id, func.count().label("n")).where(TaskRun.submitted_at >= utc(round_.created_at))
            .group_by(TaskRun.image_id).subquery())
    live = (select(ImageLease.image_id, func.count().label("n")).where(_live(now))
            .group_by(ImageLease.image_id).subquery())
    return runs, live


def queue_progress(session: Session, round_: ALRound, now: datetime | None = None) -> pd.DataFrame:
    """Every image of ``round_``'s queue with its runs this round and live leases at ``now``.

    Columns :data:`PROGRESS_COLUMNS` (``runs_round``, ``leased``), one row per queued image in
    rank order, whatever its status: what the Rounds page and the student's progress read.
    """
    runs, live = _round_counts(round_, utc(now or utcnow()))
    q = ALQueueItem
    stmt = (select(q.image_id, func.coalesce(runs.c.n, 0), func.coalesce(live.c.n, 0))
            .outerjoin(runs, runs.c.image_id == q.image_id).outerjoin(live, live.c.image_id == q.image_id)
            .where(q.round_id == round_.id).order_by(q.rank))
    return pd.DataFrame(session.execute(stmt).tuples().all(), columns=PROGRESS_COLUMNS)


def queue_candidates(
    session: Session,
    round_: ALRound,
    annotator: Annotator,
    *,
    now: datetime,
    target_runs: int,
    exclude_ids: Collection[int] = (),
    limit: int | None = None,
    skip_locked: bool = False,
    max_runs: int | None = None,
) -> pd.DataFrame:
    """The images of ``round_``'s queue that ``annotator`` may get now, in serving order.

    Columns :data:`CANDIDATE_COLUMNS`: ``runs`` = runs submitted since the round opened,
    ``leases`` = live leases; only rows with ``runs + leases < target_runs``, active status,
    pixels, fewer than ``max_runs`` runs in all (the retirement maximum: such an image retires
    at the next consensus whatever it says, so it gets no more runs meanwhile), not submitted
    by ``annotator``, not in ``exclude_ids``; ordered by
    ``(leases, rank)``. ``skip_locked`` (PostgreSQL only): lock the returned queue rows and skip
    the rows other open transactions hold (``FOR UPDATE OF al_queue SKIP LOCKED``).
    """
    runs, live = _round_counts(round_, now)
    seen = select(TaskRun.image_id).where(TaskRun.annotator_id == annotator.id)
    n_runs, n_live = func.coalesce(runs.c.n, 0), func.coalesce(live.c.n, 0)
    q = ALQueueItem
    stmt = (
        select(q.image_id, q.rank, n_runs, n_live)
        .join(Image, Image.id == q.image_id)
        .outerjoin(runs, runs.c.image_id == q.image_id)
        .outerjoin(live, live.c.image_id == q.image_id)
        .where(q.round_id == round_.id, Image.status == "active", Image.has_pixels.is_(True),
               q.image_id.not_in(seen), n_runs + n_live < int(target_runs))
        .order_by(n_live, q.rank)
    )
    if exclude_ids:
        stmt = stmt.where(q.image_id.not_in([int(i) for i in exclude_ids]))
    if max_runs is not None:
        total = (select(func.count()).select_from(TaskRun).where(TaskRun.image_id == q.image_id)
                 .correlate(q).scalar_subquery())
        stmt = stmt.where(total < int(max_runs))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    if skip_locked and session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=q, skip_locked=True)
    return pd.DataFrame(session.execute(stmt).tuples().all(), columns=CANDIDATE_COLUMNS)


# --------------------------------------------------------------------------- taking a lease


def _insert_lease(session: Session, image_id: int, slot: int, req: LeaseRequest) -> bool:
    """INSERT the lease unless a unique constraint says another one holds the place; True if inserted."""
    values = {"image_id": image_id, "annotator_id": req.annotator_id, "round_id": req.round_id,
              "slot": slot, "leased_at": req.now, "expires_at": req.expires_at}
    table = ImageLease.__table__
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        mod = sqlite if dialect == "sqlite" else postgresql
        stmt = mod.insert(table).values(**values).on_conflict_do_nothing().returning(table.c.id)
        return session.execute(stmt).scalar_one_or_none() is not None
    clash = select(table.c.id).where(table.c.image_id == image_id,
                                     or_(table.c.slot == slot, table.c.annotator_id == req.annotator_id))
    if session.execute(clash).first() is not None:
        return False
    session.execute(insert(table).values(**values))
    return True


def _try_lease(session: Session, image_id: int, expected_live: int, req: LeaseRequest) -> bool:
    """Take a free slot of ``image_id`` for the request; False when the data moved meanwhile.

    Counts afresh: ``expected_live`` is what the candidate query saw (another count means
    another request got there first: choose again, so a room gets distinct images), and
    ``runs since the round opened + live leases`` must still be below the target.
    """
    lease = ImageLease
    runs = session.scalar(select(func.count()).select_from(TaskRun).where(
        TaskRun.image_id == image_id, TaskRun.submitted_at >= req.round_start)) or 0
    rows = session.execute(
        select(lease.id, lease.slot, lease.expires_at, _done().label("done")).where(lease.image_id == image_id)
    ).tuples().all()
    alive = [(lid, slot) for lid, slot, expires, done in rows if utc(expires) > req.now and not done]
    if len(alive) != expected_live or int(runs) + len(alive) >= req.target_runs:
        return False
    taken = {slot for _, slot, _, _ in rows}
    free = [s for s in range(req.target_runs) if s not in taken]
    if free:
        return _insert_lease(session, image_id, free[0], req)
    dead = sorted((slot, lid) for lid, slot, expires, done in rows
                  if (utc(expires) <= req.now or done) and slot < req.target_runs)
    if not dead:
        return False
    slot, lid = dead[0]
    freed = session.execute(
        delete(lease).where(lease.id == lid, or_(lease.expires_at <= req.now, _done())),
        execution_options={"synchronize_session": False},
    ).rowcount
    return bool(freed) and _insert_lease(session, image_id, slot, req)


def max_runs_of(project: Project) -> int | None:
    """The project's retirement maximum of runs per image (``None``: no maximum)."""
    from cellspot.active.retirement import RetirementPolicy  # lazy: retirement imports the rounds

    return RetirementPolicy.for_project(project).max_runs


def _locked_left(session: Session, round_: ALRound, annotator: Annotator, now: datetime, target: int,
                 exclude_ids: Collection[int], max_runs: int | None) -> bool:
    """True when candidates exist that ``FOR UPDATE SKIP LOCKED`` skipped (being leased now)."""
    return not queue_candidates(session, round_, annotator, now=now, target_runs=target,
                                exclude_ids=exclude_ids, limit=1, max_runs=max_runs).empty


def next_queued_image(
    session: Session,
    project: Project,
    annotator: Annotator,
    *,
    now: datetime | None = None,
    lease_seconds: float | None = None,
    target_runs: int | None = None,
    exclude_ids: Collection[int] = (),
    round_: ALRound | None = None,
) -> Image | None:
    """Lease and return the image ``annotator`` should label next from the open round's queue.

    ``None`` when the queue holds nothing for this student now (all seen, retired, excluded or
    full). ``lease_seconds`` defaults to :func:`lease_seconds_for`, ``target_runs`` to the
    round's (:func:`cellspot.active.rounds.target_runs_for`); ``round_`` to the open round
    (:class:`NoOpenRoundError` when there is none). A lease of the student that still counts, on
    an image they have not submitted and that is still open (a reload, a second tab), is renewed
    and its image returned again, unless ``exclude_ids`` holds it; otherwise the student's earlier
    leases are released first. Raises :class:`LeaseContentionError` when no lease could be taken within
    :data:`LEASE_WAIT_SECONDS` of lost races. Flushes, never commits: the lease is taken when
    the caller commits.
    """
    round_ = round_ or current_round(session, project)
    if round_ is None:
        raise NoOpenRoundError(f"project {project.name!r} has no open round; open one with open_round()")
    now = utc(now or utcnow())
    seconds = float(lease_seconds) if lease_seconds is not None else lease_seconds_for(project)
    if seconds <= 0:
        raise ValueError(f"lease_seconds must be > 0, got {lease_seconds!r}")
    target = int(target_runs) if target_runs is not None else target_runs_for(project, round_)
    if target < 1:
        raise ValueError(f"target_runs must be >= 1, got {target_runs!r}")
    max_runs = max_runs_of(project)
    session.flush()
    held = held_image(session, project, annotator, round_=round_, now=now, lease_seconds=seconds,
                      exclude_ids=exclude_ids)
    if held is not None:  # a reload or a second tab: the same image again, not the next best one
        return held
    release_leases(session, annotator.id)  # on SQLite this also takes the write lock
    req = LeaseRequest(annotator.id, round_.id, utc(round_.created_at), now, now + timedelta(seconds=seconds),
                       target)
    postgres = session.get_bind().dialect.name == "postgresql"
    deadline = time.monotonic() + LEASE_WAIT_SECONDS
    lost = 0
    while True:
        cands = queue_candidates(session, round_, annotator, now=now, target_runs=target,
                                 exclude_ids=exclude_ids, limit=1, skip_locked=True, max_runs=max_runs)
        if not cands.empty:
            image_id, rank, _, leases = (int(v) for v in cands.iloc[0][CANDIDATE_COLUMNS])
            if _try_lease(session, image_id, leases, req):
                log.debug("round %d: image %d (rank %d) leased to annotator %d after %d lost race(s)",
                          round_.number, image_id, rank, annotator.id, lost)
                return session.get(Image, image_id)
        elif not (postgres and _locked_left(session, round_, annotator, now, target, exclude_ids, max_runs)):
            log.debug("round %d: nothing left for annotator %d", round_.number, annotator.id)
            return None
        lost += 1
        if time.monotonic() > deadline:
            raise LeaseContentionError(
                f"no lease taken for annotator {annotator.id} after {lost} lost races in "
                f"{LEASE_WAIT_SECONDS:.0f} s; other requests kept taking the same images (try again)")
        if cands.empty:
            time.sleep(RETRY_SLEEP_SECONDS)


__all__ = [
    "CANDIDATE_COLUMNS", "DEFAULT_LEASE_SECONDS", "LEASE_COLUMNS", "LeaseContentionError",
    "NoOpenRoundError", "PROGRESS_COLUMNS", "expire_leases", "held_image", "lease_seconds_for", "live_leases",
    "next_queued_image", "queue_candidates", "queue_progress", "release_leases",
]

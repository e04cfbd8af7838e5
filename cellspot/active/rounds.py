"""Active-learning rounds: open one with a ranked queue, close it, roll it back, list the history.

A round freezes one ranking of a project's images (best first) together with what produced
it: the strategy, the consensus snapshot, the detector and classifier runs whose predictions
were scored. While a round is open, the labelling page takes its images from the round's
queue (:mod:`cellspot.active.scheduler`). Opening a round closes the previous one; closing
the open round (:func:`close_round`) leaves none open, so students are served as without
rounds (fewest runs first); rolling the open round back reopens the round before it.

The caller owns the session: these functions flush, never commit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, aliased

from cellspot.store.models import ALQueueItem, ALRound, Image, ModelRun, Project, TaskRun, utcnow

log = logging.getLogger(__name__)

DEFAULT_STRATEGY = "combined"
QUEUE_DIVERSITY = 0.3  # novelty weight of the batch-aware order (the `cellspot queue` default)
DEFAULT_TARGET_RUNS = 3  # runs per queued image per round (project setting "target_runs")
SQL_CHUNK = 500
# columns of a scores frame that are not score components
_NOT_COMPONENTS = {"image", "image_id", "score", "strategy", "reason", "rank", "batch_rank", "detector_run_id",
                   "classifier_run_id", "detector_version", "classifier_version"}

HISTORY_COLUMNS = [
    "round", "round_id", "status", "strategy", "images", "top", "target_runs", "snapshot_id",
    "detector_run_id", "detector_version", "classifier_run_id", "classifier_version",
    "task_runs_at_open", "task_runs", "created_at", "closed_at",
]
QUEUE_COLUMNS = ["rank", "image_id", "image", "score", "reason", "status", "n_runs", "components"]

Scorer = Callable[[Session, Project, str, "int | None"], pd.DataFrame]


class RoundError(ValueError):
    """A round operation that the round's state does not allow (e.g. rolling back a closed round)."""


#: ``replacing`` of :func:`open_round` when the caller does not say which round it expects open
ANY_ROUND = object()


class ScoresError(ValueError):
    """A scores frame that cannot become a queue (missing columns, unknown images)."""


# --------------------------------------------------------------------------- reading


def current_round(session: Session, project: Project) -> ALRound | None:
    """The open round of ``project`` (the newest one if several), or ``None``."""
    stmt = (select(ALRound).where(ALRound.project_id == project.id, ALRound.status == "open")
            .order_by(ALRound.number.desc()).limit(1))
    return session.scalar(stmt)


def target_runs_setting(settings: Mapping[str, Any]) -> Any:
    """The runs per image a project's ``settings`` give its rounds (``target_runs_per_image``,
    or its older name ``target_runs``, else :data:`DEFAULT_TARGET_RUNS`), as stored."""
    return settings.get("target_runs_per_image", settings.get("target_runs", DEFAULT_TARGET_RUNS))


def target_runs_for(project: Project, round_: ALRound | None = None) -> int:
    """Runs each queued image should get in a round: the round's ``params["target_runs"]``,
    else the project setting ``target_runs_per_image`` (the Setup page's "Target runs per
    image"; ``target_runs`` is read as an older name of it), else :data:`DEFAULT_TARGET_RUNS`."""
    value = (round_.params or {}).get("target_runs") if round_ is not None else None
    if value is None:
        value = target_runs_setting(project.settings or {})
    target = int(value)
    if target < 1:
        raise ValueError(f"target_runs must be >= 1, got {value!r}")
    return target


# --------------------------------------------------------------------------- opening


def default_scorer(session: Session, project: Project, strategy: str, top: int | None) -> pd.DataFrame:
    """Scores of the project's servable images (active, with pixels) by ``strategy``, best first.

    Signals from :func:`cellspot.active.signals.image_signals` (latest snapshot, the active
    or newest stored prediction pair), scores from
    :func:`cellspot.active.strategies.score_images`, ordered by the batch-aware
    :func:`cellspot.active.select.select_batch` (``top`` images, or all; near-duplicates pushed
    down with weight :data:`QUEUE_DIVERSITY`, none for ``random`` / ``diversity``), as
    ``cellspot queue`` orders its CSV.
    Adds ``detector_run_id`` / ``classifier_run_id`` (the prediction pair that was scored,
    ``None`` without predictions). Imported lazily: the scoring code is optional here.
    """
    from cellspot.active.select import select_batch
    from cellspot.active.signals import image_signals
    from cellspot.active.strategies import score_images

    signals = image_signals(session, project)
    sources = dict(signals.attrs.get("sources") or {})
    servable = pd.Series(True, index=signals.index)
    if "retired" in signals.columns:
        servable &= ~signals["retired"].fillna(False).astype(bool)
    if "has_pixels" in signals.columns:
        servable &= signals["has_pixels"].fillna(False).astype(bool)
    signals = signals[servable].reset_index(drop=True)
    scores = score_images(strategy, signals)
    diversity = 0.0 if strategy in ("random", "diversity") else QUEUE_DIVERSITY
    scores = select_batch(scores, n=int(top) if top is not None else len(scores), signals=signals,
                          diversity=diversity)
    return scores.assign(detector_run_id=sources.get("detector_run_id"),
                         classifier_run_id=sources.get("classifier_run_id"))


def open_round(
    session: Session,
    project: Project,
    *,
    strategy: str = DEFAULT_STRATEGY,
    top: int | None = None,
    scores: pd.DataFrame | None = None,
    scorer: Scorer | None = None,
    target_runs: int | None = None,
    now: datetime | None = None,
    replacing: int | None | object = ANY_ROUND,
) -> ALRound:
    """Open round ``n + 1`` of ``project`` with a ranked queue; the open round (if any) closes.

    ``replacing``: the number of the round the caller expects to be open (``None``: none);
    the open round is closed by one conditional UPDATE, so when another caller replaced it
    meanwhile (even a moment ago, in another process) :class:`RoundError` is raised and
    nothing is written (with ``None``, the store's one-open-round index refuses the insert).

    ``scores``: one row per image, best first (as :func:`cellspot.active.strategies.score_images`
    and :func:`cellspot.active.select.select_batch` return them), columns ``image`` (name) or ``image_id``,
    ``score``, optional ``reason``, ``rank`` (1 = best; used to order when present) and any
    numeric component columns (stored per image in ``components``). Without ``scores`` the
    ranking comes from ``scorer(session, project, strategy, top)`` (default
    :func:`default_scorer`). ``top`` keeps the ``top`` best rows. Images that are not in the
    project raise :class:`ScoresError`; an empty ranking opens a round with an empty queue
    (students then get gold images only).

    The round stores the model runs that produced the scores (``detector_run_id`` /
    ``classifier_run_id`` columns of ``scores`` when present, else the project's active runs),
    the latest consensus snapshot id, ``target_runs`` and the number of task runs so far.
    Openings of one project's rounds run one at a time (its row is locked on PostgreSQL).
    """
    if top is not None and int(top) < 1:
        raise ValueError(f"top must be a positive number of images, got {top!r}")
    if scores is None:
        scores = (scorer or default_scorer)(session, project, strategy, top)
    queue = _queue_rows(session, project, scores, top)
    target = target_runs if target_runs is not None else target_runs_for(project)
    if int(target) < 1:
        raise ValueError(f"target_runs must be >= 1, got {target!r}")
    detector_id, classifier_id = _model_runs(session, project, scores)
    when = now or utcnow()
    _lock_rounds(session, project.id)

    if replacing is ANY_ROUND:
        previous = current_round(session, project)
        if previous is not None:
            previous.status, previous.closed_at = "closed", when
            session.flush()  # before the new open round: one open round per project (a unique index)
    else:
        previous = _close_expected(session, project.id, replacing, when)
    number = (session.scalar(select(func.max(ALRound.number)).where(ALRound.project_id == project.id)) or 0) + 1
    round_ = ALRound(
        project_id=project.id, number=number, status="open", strategy=str(strategy),
        detector_run_id=detector_id, classifier_run_id=classifier_id, created_at=when,
        params={"top": None if top is None else int(top), "target_runs": int(target),
                "snapshot_id": _latest_snapshot_id(session, project),
                "task_runs_at_open": _project_runs(session, project),
                "n_scored": int(len(scores))},
    )
    session.add(round_)
    session.flush()
    rows = [{**row, "round_id": round_.id} for row in queue]
    for start in range(0, len(rows), SQL_CHUNK):
        session.execute(insert(ALQueueItem), rows[start:start + SQL_CHUNK])
    session.flush()
    log.info("project %r: round %d opened (%s, %d images queued, models %s/%s)%s", project.name, number,
             strategy, len(rows), detector_id, classifier_id,
             f"; round {previous.number} closed" if previous is not None else "")
    return round_


def _lock_rounds(session: Session, project_id: int) -> None:
    """Lock the project's row (PostgreSQL ``FOR UPDATE``; SQLite writers queue anyway), so that
    openings and closings of one project's rounds run one at a time: four openings at once
    deadlocked on the one-open-round index, one waiting for the round another was closing
    while that one waited for the open round the first had inserted."""
    from cellspot.store.queries import lock_project

    lock_project(session, project_id)


def _close_expected(session: Session, project_id: int, number: int | None, when: datetime,
                    status: str = "closed") -> ALRound | None:
    """Close round ``number`` of project ``project_id`` (as ``status``: ``closed``, or
    ``rolled_back``) if it is still the open one, in one conditional UPDATE (it waits for, then
    sees, a concurrent writer's commit; SQLite ignores ``FOR UPDATE``, not this); the closed
    round, or ``None`` for ``None``. :class:`RoundError` when it is not open any more."""
    from sqlalchemy import update

    if number is None:
        return None
    done = session.execute(
        update(ALRound).where(ALRound.project_id == int(project_id), ALRound.status == "open",
                              ALRound.number == int(number))
        .values(status=status, closed_at=when).execution_options(synchronize_session=False))
    if done.rowcount != 1:
        raise RoundError(f"round {number} is no longer the open round")
    closed = session.scalar(select(ALRound).where(ALRound.project_id == int(project_id),
                                                  ALRound.number == int(number)))
    session.refresh(closed)
    return closed


# --------------------------------------------------------------------------- closing


def close_round(session: Session, round_: ALRound, now: datetime | None = None) -> ALRound:
    """Close ``round_`` (its project's open round) without opening another: it becomes
    ``closed`` at ``now`` (as the open round does when the next one opens) and the project has
    no open round, so the labelling page serves images as without rounds (fewest runs first).
    The queue stays for the history. Returns ``round_``, refreshed.

    Takes the project's lock that openings take (:func:`open_round`), then closes by one
    conditional UPDATE: a close and an opening never interleave, and when the round is not
    open any more (closed, rolled back or replaced meanwhile, even in another process)
    :class:`RoundError` is raised and nothing is written. Leases of the round are left as
    opening and rolling back leave them: they end when their student submits, leaves the class
    or lets them expire, and count meanwhile as that student's hold on the image.
    """
    if round_.status != "open":
        raise RoundError(f"round {round_.number} is {round_.status}; only the open round can be closed")
    _lock_rounds(session, round_.project_id)
    closed = _close_expected(session, round_.project_id, round_.number, now or utcnow())
    log.info("round %d closed; no round is open", closed.number)
    return closed


def _queue_rows(session: Session, project: Project, scores: pd.DataFrame, top: int | None) -> list[dict[str, Any]]:
    """Queue rows ``{image_id, rank, score, components, reason}`` from a scores frame, best first."""
    if not isinstance(scores, pd.DataFrame):
        raise ScoresError(f"scores must be a pandas DataFrame, got {type(scores).__name__}")
    if "image_id" not in scores.columns and "image" not in scores.columns:
        raise ScoresError(f"scores need an 'image' or 'image_id' column; got {list(scores.columns)}")
    if "score" not in scores.columns:
        raise ScoresError(f"scores need a 'score' column; got {list(scores.columns)}")
    frame = scores.reset_index(drop=True)
    if "rank" in frame.columns:
        frame = frame.sort_values("rank", kind="stable")
    if top is not None:
        frame = frame.head(int(top))
    ids = _image_ids(session, project, frame)
    if ids.duplicated().any():
        dup = sorted(set(ids[ids.duplicated()].tolist()))[:5]
        raise ScoresError(f"scores list image ids {dup} more than once; one row per image")
    components = [c for c in frame.columns if c not in _NOT_COMPONENTS
                  and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    reasons = frame["reason"].fillna("").astype(str) if "reason" in frame.columns else pd.Series("", index=frame.index)
    return [
        {"image_id": int(image_id), "rank": rank, "score": _number(score),
         "components": {c: _number(frame.at[i, c]) for c in components}, "reason": reason}
        for rank, (i, image_id, score, reason) in enumerate(
            zip(frame.index, ids, frame["score"], reasons), start=1)
    ]


def _image_ids(session: Session, project: Project, frame: pd.DataFrame) -> pd.Series:
    """The project image id of every row (by ``image_id`` when present, else by name)."""
    rows = session.execute(select(Image.id, Image.name).where(Image.project_id == project.id)).tuples().all()
    if "image_id" in frame.columns:
        known = {i for i, _ in rows}
        ids = pd.to_numeric(frame["image_id"], errors="coerce")
        bad = frame.loc[ids.isna() | ~ids.isin(known), "image_id"]
    else:
        by_name = {name: i for i, name in rows}
        ids = frame["image"].astype(str).map(by_name)
        bad = frame.loc[ids.isna(), "image"]
    if len(bad):
        raise ScoresError(f"{len(bad)} scored image(s) are not in project {project.name!r}, "
                          f"e.g. {bad.astype(str).head(3).tolist()}")
    return ids.astype("int64")


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` (NaN, inf, missing, not a number)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _model_runs(session: Session, project: Project, scores: pd.DataFrame) -> tuple[int | None, int | None]:
    """The (detector, classifier) run ids named by the ``*_run_id`` columns of ``scores`` (``None``
    when such a column is empty: no model was scored), else the project's active runs."""
    from cellspot.ml import registry

    out: list[int | None] = []
    for kind in ("detector", "classifier"):
        column = f"{kind}_run_id"
        if column in scores.columns:
            named = pd.to_numeric(scores[column], errors="coerce").dropna()
            if named.nunique() > 1:
                log.warning("scores name %d %s runs; the round records the most frequent", named.nunique(), kind)
            out.append(int(named.mode().iloc[0]) if len(named) else None)
        else:
            run = registry.active_run(session, project, kind)
            out.append(run.id if run is not None else None)
    return out[0], out[1]


def _latest_snapshot_id(session: Session, project: Project) -> int | None:
    from cellspot.store.queries import latest_snapshot

    snapshot = latest_snapshot(session, project)
    return snapshot.id if snapshot is not None else None


def _project_runs(session: Session, project: Project, since: datetime | None = None,
                  until: datetime | None = None) -> int:
    stmt = (select(func.count()).select_from(TaskRun).join(Image, Image.id == TaskRun.image_id)
            .where(Image.project_id == project.id))
    if since is not None:
        stmt = stmt.where(TaskRun.submitted_at >= since)
    if until is not None:
        stmt = stmt.where(TaskRun.submitted_at < until)
    return int(session.scalar(stmt) or 0)


# --------------------------------------------------------------------------- rollback


def rollback_round(session: Session, round_: ALRound, now: datetime | None = None) -> ALRound | None:
    """Undo ``round_`` (it must be its project's open round): it becomes ``rolled_back`` and the
    round before it (the newest ``closed`` one) opens again. Returns that restored round, or
    ``None`` when there was none (the project then has no open round and the labelling page
    serves images as without rounds). The rolled-back round keeps its queue for the history.
    Takes the project's lock that openings and closings take; :class:`RoundError`, with nothing
    written, when the round is not open any more (closed or replaced meanwhile, even in another
    process).
    """
    if round_.status != "open":
        raise RoundError(f"round {round_.number} is {round_.status}; only the open round can be rolled back")
    _lock_rounds(session, round_.project_id)  # as openings and closings: one at a time per project
    # written before another round opens (one open round per project: a unique index)
    _close_expected(session, round_.project_id, round_.number, now or utcnow(), status="rolled_back")
    previous = session.scalar(
        select(ALRound).where(ALRound.project_id == round_.project_id, ALRound.status == "closed",
                              ALRound.number < round_.number)
        .order_by(ALRound.number.desc()).limit(1))
    if previous is not None:
        previous.status, previous.closed_at = "open", None
    session.flush()
    log.info("round %d rolled back; %s", round_.number,
             f"round {previous.number} is open again" if previous is not None else "no round is open")
    return previous


# --------------------------------------------------------------------------- history


def round_history(session: Session, project: Project, now: datetime | None = None) -> pd.DataFrame:
    """One row per round of ``project``, oldest first (columns :data:`HISTORY_COLUMNS`).

    ``images``: queue length; ``task_runs_at_open``: the project's task runs when the round
    opened (the x axis of a learning curve); ``task_runs``: runs submitted while the round was
    open (until ``closed_at``, or ``now`` for the open round).
    """
    det, cls = aliased(ModelRun), aliased(ModelRun)
    queued = (select(ALQueueItem.round_id, func.count().label("n")).group_by(ALQueueItem.round_id).subquery())
    stmt = (
        select(ALRound, func.coalesce(queued.c.n, 0), det.version, cls.version)
        .outerjoin(queued, queued.c.round_id == ALRound.id)
        .outerjoin(det, det.id == ALRound.detector_run_id)
        .outerjoin(cls, cls.id == ALRound.classifier_run_id)
        .where(ALRound.project_id == project.id).order_by(ALRound.number)
    )
    rows = []
    for r, n_queued, det_version, cls_version in session.execute(stmt).tuples():
        params = r.params or {}
        rows.append({
            "round": r.number, "round_id": r.id, "status": r.status, "strategy": r.strategy,
            "images": int(n_queued), "top": params.get("top"), "target_runs": params.get("target_runs"),
            "snapshot_id": params.get("snapshot_id"),
            "detector_run_id": r.detector_run_id, "detector_version": det_version,
            "classifier_run_id": r.classifier_run_id, "classifier_version": cls_version,
            "task_runs_at_open": params.get("task_runs_at_open"),
            "task_runs": _project_runs(session, project, utc(r.created_at),
                                       utc(r.closed_at) if r.closed_at else (now or utcnow())),
            "created_at": utc(r.created_at), "closed_at": utc(r.closed_at) if r.closed_at else None,
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def round_queue(session: Session, round_: ALRound) -> pd.DataFrame:
    """The queue of ``round_`` best first (columns :data:`QUEUE_COLUMNS` plus one column per
    score component): image name and current status, its runs so far, score and reason."""
    runs = select(TaskRun.image_id, func.count().label("n")).group_by(TaskRun.image_id).subquery()
    q = ALQueueItem
    stmt = (select(q.rank, q.image_id, Image.name, q.score, q.reason, Image.status,
                   func.coalesce(runs.c.n, 0), q.components)
            .join(Image, Image.id == q.image_id).outerjoin(runs, runs.c.image_id == q.image_id)
            .where(q.round_id == round_.id).order_by(q.rank))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=QUEUE_COLUMNS)
    if frame.empty:
        return frame
    parts = pd.DataFrame([c or {} for c in frame["components"]], index=frame.index).astype(float)
    return pd.concat([frame, parts.drop(columns=[c for c in parts if c in frame], errors="ignore")], axis=1)


def utc(ts: datetime | None) -> datetime | None:
    """``ts`` as an aware UTC datetime (SQLite returns naive UTC datetimes)."""
    if ts is None:
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


__all__ = [
    "DEFAULT_STRATEGY", "DEFAULT_TARGET_RUNS", "HISTORY_COLUMNS", "QUEUE_COLUMNS", "RoundError",
    "ScoresError", "close_round", "current_round", "default_scorer", "open_round", "rollback_round",
    "round_history", "round_queue", "target_runs_for", "utc",
]

"""Active-learning rounds as the researcher sees them: open, close, roll back, history, queue
and the learning curve.

Thin workflows over :mod:`cellspot.active.rounds` (the round store), used by the Rounds page
(``app/views/rounds.py``) and ``cellspot round``. Functions that take a session never commit
(the caller owns it). The optional automatic mode (retrain and refresh the queue after N new
task runs) is :mod:`cellspot.workflows.auto_rounds`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.active import rounds as al
from cellspot.active import scheduler
from cellspot.ml import registry
from cellspot.store.models import ALRound, ModelRun, Project
from cellspot.store.queries import as_project

log = logging.getLogger(__name__)

DEFAULT_STRATEGY = al.DEFAULT_STRATEGY
MODEL_ORDER = ("detector", "classifier")
CURVE_COLUMNS = ["round", "task_runs", "status", "kind", "version", "metric", "value", "split", "series"]
PROGRESS_SHOWN = scheduler.PROGRESS_COLUMNS[1:]
#: the queue's status of an active image that has the project's maximum of runs (served no more)
AT_MAX_RUNS = "at_max_runs"
"""Columns :func:`queue_table` adds to the queue (:func:`cellspot.active.scheduler.queue_progress`)."""


class RoundsWorkflowError(ValueError):
    """A round or automatic-mode request that cannot be carried out (the message says why)."""


#: ``replacing`` of :func:`open_new_round` when the caller does not say which round it saw
ANY_ROUND = al.ANY_ROUND


def _check_still_open(session: Session, project: Project, seen: int | None, action: str) -> None:
    """Raise :class:`RoundsWorkflowError` unless round ``seen`` (``None``: no round) is still
    the open round of ``project``."""
    current = al.current_round(session, project)
    now_open = None if current is None else current.number
    if now_open == (None if seen is None else int(seen)):
        return
    what = "no round was open" if seen is None else f"round {seen} was open"
    raise RoundsWorkflowError(
        f"{what} when you pressed, but {'no round is' if now_open is None else f'round {now_open} is'} open now "
        f"(changed a moment ago: a double click, another tab or another researcher); nothing was {action}")


# --------------------------------------------------------------------------- rounds


@dataclass(frozen=True)
class RoundInfo:
    """One round as plain values (safe to cache): its queue length and the models it scored."""

    round_id: int
    number: int
    status: str
    strategy: str
    images: int
    top: int | None
    target_runs: int | None
    snapshot_id: int | None
    detector_version: str | None
    classifier_version: str | None
    task_runs_at_open: int | None
    task_runs: int
    created_at: datetime | None

    @property
    def crowd_only(self) -> bool:
        """True when no model prediction was scored (crowd and coverage signals only)."""
        return self.detector_version is None and self.classifier_version is None

    @property
    def empty(self) -> bool:
        """True when the round queued no image (no open image was left to score)."""
        return self.images == 0

    @property
    def tied(self) -> bool:
        """True when the strategy reads model predictions alone and none were scored: every
        image tied (a seeded random order)."""
        from cellspot.active.strategies import STRATEGIES

        known = STRATEGIES.get(self.strategy)
        return self.crowd_only and known is not None and known.needs_model

    @property
    def models(self) -> str:
        """``"detector-0002 + classifier-0003"``; without predictions ``"crowd and coverage
        signals only"``, or, for a strategy that reads model predictions alone, that every image
        tied; ``"nothing left to score"`` for an empty round."""
        if self.empty:
            return "nothing left to score"
        if self.tied:
            return "no model predictions: every image tied"
        if self.crowd_only:
            return "crowd and coverage signals only"
        return f"{self.detector_version or 'no detector'} + {self.classifier_version or 'no classifier'}"

    @property
    def scoring(self) -> str:
        """How the queue was ranked, as a phrase for a sentence: ``"scored with detector-0002 +
        classifier-0003"``, ``"scored with crowd and coverage signals only"``, ``"no model
        predictions, so every image tied (random order)"`` or, for an empty round, ``"nothing was
        left to score (no open image)"``."""
        if self.empty:
            return "nothing was left to score (no open image)"
        if self.tied:
            return "no model predictions, so every image tied (random order)"
        return f"scored with {self.models}"

    def describe(self) -> str:
        """``"round 3 (combined, 12 images, detector-0002 + classifier-0003)"``; an empty round
        ``"round 4 (combined, 0 images: nothing left to score)"``."""
        if self.empty:
            return f"round {self.number} ({self.strategy}, 0 images: {self.models})"
        return f"round {self.number} ({self.strategy}, {_count(self.images, 'image')}, {self.models})"


@dataclass(frozen=True)
class ScoringSources:
    """What a round opened now would score: the active models and the stored prediction pair
    that :func:`cellspot.active.signals.image_signals` would use (``None``: crowd only)."""

    active_detector: str | None
    active_classifier: str | None
    scored_detector: str | None
    scored_classifier: str | None

    @property
    def crowd_only(self) -> bool:
        return self.scored_detector is None and self.scored_classifier is None

    @property
    def stale(self) -> bool:
        """Active models exist but their predictions are not the ones that would be scored."""
        active = (self.active_detector, self.active_classifier)
        return any(active) and active != (self.scored_detector, self.scored_classifier)


def round_info(session: Session, project: Project, round_: ALRound) -> RoundInfo:
    """:class:`RoundInfo` of ``round_`` (a round of ``project``)."""
    rows = al.round_history(session, project)
    row = rows[rows["round_id"] == round_.id]
    if row.empty:
        raise RoundsWorkflowError(f"round id {round_.id} is not a round of project {project.name!r}")
    return _info(row.iloc[0])


def _info(row: pd.Series) -> RoundInfo:
    return RoundInfo(
        round_id=int(row["round_id"]), number=int(row["round"]), status=str(row["status"]),
        strategy=str(row["strategy"]), images=int(row["images"]), top=_int_or_none(row["top"]),
        target_runs=_int_or_none(row["target_runs"]), snapshot_id=_int_or_none(row["snapshot_id"]),
        detector_version=_str_or_none(row["detector_version"]),
        classifier_version=_str_or_none(row["classifier_version"]),
        task_runs_at_open=_int_or_none(row["task_runs_at_open"]), task_runs=int(row["task_runs"]),
        created_at=row["created_at"],
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _int_or_none(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _str_or_none(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def scoring_sources(session: Session, project: Project | str) -> ScoringSources:
    """The active detector / classifier versions and the prediction pair a new round would score."""
    from cellspot.active.signals import prediction_pair

    project = as_project(session, project)
    active = [registry.active_run(session, project, kind) for kind in MODEL_ORDER]
    pair = prediction_pair(session, project) or (None, None)
    scored = [session.get(ModelRun, i).version if i is not None else None for i in pair]
    return ScoringSources(*(r.version if r is not None else None for r in active), *scored)


def open_new_round(
    session: Session,
    project: Project | str,
    *,
    strategy: str = DEFAULT_STRATEGY,
    top: int | None = None,
    target_runs: int | None = None,
    scores: pd.DataFrame | None = None,
    scorer: al.Scorer | None = None,
    now: datetime | None = None,
    replacing: int | None | object = ANY_ROUND,
) -> RoundInfo:
    """Open the next round of ``project``: its queue is recomputed with ``strategy`` over the
    latest consensus and the active models' stored predictions (crowd and coverage signals
    only before any model exists); the open round closes. ``scores`` / ``scorer`` replace the
    computed ranking (tests, benchmarks); ``top`` keeps the ``top`` best images. Flushes.

    ``replacing``: the number of the open round the caller saw (``None``: none was open); when
    another round is open by now (a double click's first press, another tab or researcher),
    nothing is opened. Two rounds opened at the same moment: the second fails on the store's
    one-open-round index. Both raise :class:`RoundsWorkflowError`; roll the session back then.

    Raises :class:`cellspot.active.strategies.UnknownStrategyError` (listing the valid names),
    :class:`cellspot.active.strategies.MissingSignalError` (e.g. a model strategy before any
    prediction), :class:`cellspot.active.rounds.ScoresError`, ``ValueError`` for ``top < 1``.
    """
    from cellspot.active.strategies import get_strategy

    from sqlalchemy.exc import IntegrityError, OperationalError

    project = as_project(session, project)
    if scores is None and scorer is None:
        chosen = get_strategy(strategy)  # an unknown name fails before any work
        if chosen.extra_input:
            raise RoundsWorkflowError(f"strategy {chosen.name!r} needs {chosen.extra_input}, which rounds do not "
                                      "compute; open the round with another strategy (e.g. 'combined')")
    if replacing is not ANY_ROUND:
        _check_still_open(session, project, replacing, "opened")
    try:
        round_ = al.open_round(session, project, strategy=strategy, top=top, scores=scores, scorer=scorer,
                               target_runs=target_runs, now=now, replacing=replacing)
    except al.RoundError as exc:  # replaced a moment ago by another process: say by which round
        if replacing is ANY_ROUND:
            raise
        _check_still_open(session, project, replacing, "opened")
        raise RoundsWorkflowError(f"{exc}; nothing was opened") from exc
    except IntegrityError as exc:
        if "one_open" not in str(exc) and "al_rounds" not in str(exc):
            raise
        raise RoundsWorkflowError("another round of this project was opened at the same moment (by another "
                                  "researcher or tab); nothing was opened: look at the current round, then "
                                  "open again if you still want to") from exc
    except OperationalError as exc:
        _written_meanwhile(exc, "opened")
        raise
    info = round_info(session, project, round_)
    log.info("project %r: %s opened", project.name, info.describe())
    return info


def _on_open_round(session: Session, project: Project, number: int | None, verb: str,
                   action: Callable[[Session, Any], Any]) -> tuple[Any, Any]:
    """``(the open round, action(session, it))``: the rollback or close of ``project``'s open
    round (``verb``: "roll back" or "close"), refused with :class:`RoundsWorkflowError` when no
    round is open, when it is not round ``number`` (the one a page showed), or when another
    process closed or replaced it between this read and the action's conditional update."""
    done = {"roll back": "rolled back", "close": "closed"}[verb]
    if number is not None:
        _check_still_open(session, project, number, done)
    current = al.current_round(session, project)
    if current is None:
        raise RoundsWorkflowError(f"project {project.name!r} has no open round to {verb}")
    from sqlalchemy.exc import OperationalError

    try:
        return current, action(session, current)
    except al.RoundError as exc:  # closed or replaced a moment ago by another process: say what is open
        _check_still_open(session, project, current.number, done)
        raise RoundsWorkflowError(f"{exc}; nothing was {done}") from exc
    except OperationalError as exc:
        _written_meanwhile(exc, done)
        raise


def _written_meanwhile(exc: Exception, done: str) -> None:
    """Raise SQLite's "database is locked", when a transaction that has read the rounds tries to
    write after another one wrote them (it cannot wait: its snapshot is stale), as a
    :class:`RoundsWorkflowError`; return for any other error (the caller re-raises it)."""
    if "database is locked" not in str(exc):
        return
    raise RoundsWorkflowError("another change to this project's rounds was written at the same moment (another "
                               f"researcher, tab or the automatic mode); nothing was {done}: look at the current "
                               "round, then try again if you still want to") from exc


def rollback_current(
    session: Session, project: Project | str, *, number: int | None = None
) -> tuple[RoundInfo, RoundInfo | None]:
    """Roll back the open round of ``project``; ``(rolled back, reopened or None)``. Flushes.

    ``number``: the round the caller means (the one a page shows); when another round is open
    by now (a second tab rolled it back or opened a new one), nothing is rolled back.
    :class:`RoundsWorkflowError` when no round is open or it is not round ``number``.
    """
    project = as_project(session, project)
    current, restored = _on_open_round(session, project, number, "roll back", al.rollback_round)
    return (round_info(session, project, current),
            round_info(session, project, restored) if restored is not None else None)


def close_current(
    session: Session, project: Project | str, *, number: int | None = None, now: datetime | None = None
) -> RoundInfo:
    """Close the open round of ``project`` without opening another; the closed round. Flushes.

    No round is open afterwards: students get the images with the fewest runs, as without
    rounds (:func:`cellspot.workflows.classroom.next_image`), until a round opens. ``number``:
    the round the caller means (the one a page shows); when another round is open by now, or
    none (a double click's first press, another tab or researcher), nothing is closed.
    :class:`RoundsWorkflowError` when no round is open or it is not round ``number``.
    """
    project = as_project(session, project)
    _, closed = _on_open_round(session, project, number, "close",
                               lambda s, current: al.close_round(s, current, now=now))
    info = round_info(session, project, closed)
    log.info("project %r: %s closed", project.name, info.describe())
    return info


def current_round_info(session: Session, project: Project | str) -> RoundInfo | None:
    """The open round of ``project`` as :class:`RoundInfo`, or ``None``."""
    project = as_project(session, project)
    current = al.current_round(session, project)
    return round_info(session, project, current) if current is not None else None


def history(session: Session, project: Project | str, now: datetime | None = None) -> pd.DataFrame:
    """One row per round, newest first (columns :data:`cellspot.active.rounds.HISTORY_COLUMNS`)."""
    table = al.round_history(session, as_project(session, project), now=now)
    return table.iloc[::-1].reset_index(drop=True)


def queue_table(session: Session, project: Project | str, number: int | None = None) -> pd.DataFrame:
    """The queue of round ``number`` (default: the open round) best first, with each image's
    score, reason and score components (:func:`cellspot.active.rounds.round_queue`) and, while
    the round is open, its runs this round and live leases (``runs_round``, ``leased``; empty for
    a closed round); an empty frame with those columns when there is no such round. While the
    round is open, an active image with the project's maximum of runs has the status
    :data:`AT_MAX_RUNS`: no student gets it any more, and the next consensus retires it."""
    project = as_project(session, project)
    if number is None:
        round_ = al.current_round(session, project)
    else:
        round_ = session.scalar(select(ALRound).where(ALRound.project_id == project.id, ALRound.number == number))
    if round_ is None:
        return pd.DataFrame(columns=[*al.QUEUE_COLUMNS, *PROGRESS_SHOWN])
    table = al.round_queue(session, round_)
    if round_.status != "open" or table.empty:
        return table.assign(**{c: pd.NA for c in PROGRESS_SHOWN})
    max_runs = scheduler.max_runs_of(project)
    if max_runs is not None:  # served no more; the next consensus retires it (it still read "active")
        table.loc[(table["status"] == "active") & (table["n_runs"] >= max_runs), "status"] = AT_MAX_RUNS
    progress = scheduler.queue_progress(session, round_)
    return table.merge(progress, on="image_id", how="left")


# --------------------------------------------------------------------------- learning curve


def learning_curve(session: Session, project: Project | str, *, include_rolled_back: bool = False) -> pd.DataFrame:
    """Task runs collected vs the models' metrics, one row per round, model kind and metric.

    Columns :data:`CURVE_COLUMNS`: ``task_runs`` = the project's task runs when the round
    opened; ``version`` = the model whose predictions the round scored, else the newest
    ``done`` run of that kind that finished before the round opened (none: no row);
    ``value`` = that run's stored top-level metric (:data:`cellspot.ml.registry.KEY_METRICS` of
    its kind), measured on the split named in ``split``: the run's own test images, else its
    validation images (``"val"``), else its training data (``"train"``; ``None`` when the run
    did not say); ``series`` = ``"<kind> <metric>"``. Oldest round first. Each run drew its
    own split, so the values compare trends, not exact numbers.
    """
    project = as_project(session, project)
    rounds = al.round_history(session, project)
    if not include_rolled_back:
        rounds = rounds[rounds["status"] != "rolled_back"]
    runs = session.scalars(select(ModelRun).where(ModelRun.project_id == project.id, ModelRun.status == "done")
                           .order_by(ModelRun.finished_at, ModelRun.id)).all()
    by_id = {r.id: r for r in runs}
    rows = []
    for r in rounds.itertuples(index=False):
        for kind in MODEL_ORDER:
            run = by_id.get(_int_or_none(getattr(r, f"{kind}_run_id")) or -1)
            if run is None:
                run = _latest_done(runs, kind, r.created_at)
            if run is None:
                continue
            flat = registry.flatten_metrics(run.metrics or {})
            for metric in registry.KEY_METRICS[kind]:
                value = flat.get(metric)
                if value is None or not math.isfinite(value):
                    continue
                rows.append({"round": int(r.round), "task_runs": _int_or_none(r.task_runs_at_open) or 0,
                             "status": r.status, "kind": kind, "version": run.version, "metric": metric,
                             "value": float(value), "split": _str_or_none((run.metrics or {}).get("split")),
                             "series": f"{kind} {metric}"})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _latest_done(runs: list[ModelRun], kind: str, before: datetime | None) -> ModelRun | None:
    """The newest run of ``kind`` in ``runs`` (done, oldest first) that finished before ``before``."""
    chosen = None
    for run in runs:
        finished = al.utc(run.finished_at)
        if run.kind == kind and finished is not None and (before is None or finished <= before):
            chosen = run
    return chosen


__all__ = [
    "CURVE_COLUMNS", "DEFAULT_STRATEGY", "MODEL_ORDER", "RoundInfo", "RoundsWorkflowError", "ScoringSources",
    "close_current", "current_round_info", "history", "learning_curve", "open_new_round", "queue_table",
    "rollback_current", "round_info", "scoring_sources",
]

"""Aggregate a project's clicks into a consensus snapshot and apply adaptive retirement.

One function, :func:`aggregate`, used by ``cellspot aggregate``, the demo and the app.
Retirement is :func:`cellspot.active.retirement.apply_retirement` with the policy of
:func:`retirement_policy`: an image retires once every cell's label and existence and the
cell count have settled (after ``min_runs`` runs), or after ``max_runs`` runs whatever its
consensus. :class:`RetirementRule` / :func:`settled_images` are the earlier fixed rule (runs
and confidence only), kept for comparison. The caller owns the session: it flushes, never
commits.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from cellspot import __version__
from cellspot.active.retirement import RetirementChange, RetirementPolicy, apply_retirement
from cellspot.consensus import DEFAULT_METHOD, ConsensusResult, get_method, run_consensus
from cellspot.store.models import (
    AnnotatorReliability,
    ConsensusCell,
    ConsensusSnapshot,
    Image,
    Project,
    utcnow,
)
from cellspot.store.queries import (
    as_project,
    clicks_frame,
    expert_empty_ids,
    gold_frame,
    latest_snapshot,
    runs_frame,
)

log = logging.getLogger(__name__)

DEFAULT_RETIRE_MIN_RUNS = 3
DEFAULT_RETIRE_MIN_CONFIDENCE = 0.9
DEFAULT_GOLD_RADIUS = 35.0  # px, for counting the runs that clicked near a gold cell


@dataclass(frozen=True)
class AggregateReport:
    """What one aggregation wrote.

    ``images``: images with at least one run or gold cell; ``cells``: consensus cells stored
    (``gold_cells`` of them from experts); ``retired``: images retired after this run
    (``newly_retired`` of them by this run, ``reactivated`` went back to active);
    ``retire_reasons``: how many images got each retirement decision
    (:data:`cellspot.active.retirement.REASONS`, e.g. ``{"settled": 3, "few_runs": 1}``);
    ``reused``: no click, run or expert cell changed since the latest snapshot, so that
    snapshot was kept (retirement applied again) instead of writing an identical one.
    """

    snapshot_id: int
    method: str
    images: int
    cells: int
    gold_cells: int
    annotators: int
    task_runs: int
    clicks: int
    retired: int
    newly_retired: int
    reactivated: int
    retire_reasons: dict[str, int] = field(default_factory=dict)
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the dashboard: the snapshot written (or kept) and the retirement."""
        retired = (f"{self.retired} images retired ({self.newly_retired} new"
                   + (f", {self.reactivated} back to active" if self.reactivated else "") + ")")
        if self.reused:
            return f"No click changed since snapshot {self.snapshot_id}: kept it. {retired}."
        return f"Snapshot {self.snapshot_id}: {self.cells} cells on {self.images} images. {retired}."


@dataclass(frozen=True)
class RetirementRule:
    """The earlier fixed rule: an image retires with ``>= min_runs`` runs and every cell's
    confidence ``>= min_confidence``. :func:`aggregate` now applies the adaptive
    :class:`cellspot.active.retirement.RetirementPolicy`, which equals this rule through
    ``RetirementPolicy.from_rule``."""

    min_runs: int = DEFAULT_RETIRE_MIN_RUNS
    min_confidence: float = DEFAULT_RETIRE_MIN_CONFIDENCE

    @classmethod
    def for_project(
        cls, project: Project, min_runs: int | None = None, min_confidence: float | None = None
    ) -> RetirementRule:
        """The rule from ``project.settings`` (``retire_min_runs``, ``retire_min_confidence``),
        overridden by explicit arguments."""
        settings = project.settings or {}
        runs = min_runs if min_runs is not None else settings.get("retire_min_runs", cls.min_runs)
        conf = (min_confidence if min_confidence is not None
                else settings.get("retire_min_confidence", cls.min_confidence))
        if int(runs) < 1:
            raise ValueError(f"retirement min_runs must be >= 1, got {runs}")
        if not 0.0 <= float(conf) <= 1.0:
            raise ValueError(f"retirement min_confidence must be in [0, 1], got {conf}")
        return cls(int(runs), float(conf))


def retirement_policy(
    project: Project,
    min_runs: int | None = None,
    min_confidence: float | None = None,
    max_runs: int | None = None,
) -> RetirementPolicy:
    """The adaptive retirement policy of ``project``: its settings (``retire_min_runs``,
    ``retire_min_confidence``, ``retire_max_runs``, ``retire_min_cell_certainty``,
    ``retire_count_tolerance``; :meth:`RetirementPolicy.for_project`) overridden by the
    arguments that are not ``None``.

    When no maximum is configured (neither ``max_runs`` nor the setting) and ``min_runs``
    exceeds the default maximum (10), there is no maximum, as before adaptive retirement,
    rather than a cap below the minimum (:meth:`RetirementPolicy.from_settings`). Raises
    :class:`cellspot.active.retirement.RetirementPolicyError` (a ``ValueError``) for a bad
    threshold.
    """
    return RetirementPolicy.for_project(project, min_runs=min_runs, min_confidence=min_confidence,
                                        max_runs=max_runs)


def aggregate(
    session: Session,
    project: Project | str,
    method: str = DEFAULT_METHOD,
    cell_radius: float | None = None,
    min_runs: int | None = None,
    min_confidence: float | None = None,
    max_runs: int | None = None,
    *,
    policy: RetirementPolicy | None = None,
) -> AggregateReport:
    """Run consensus ``method`` over every click of ``project`` and store the result.

    Writes a :class:`ConsensusSnapshot` with its cells (gold cells replace the consensus
    cells of their image) and annotator reliabilities, then applies adaptive retirement
    (:func:`cellspot.active.retirement.apply_retirement` on the new snapshot): images whose
    consensus has settled, or that reached ``max_runs`` runs, retire; retired images that no
    longer qualify become active again. ``policy``: the thresholds (default
    :func:`retirement_policy` of the project, with ``min_runs`` / ``min_confidence`` /
    ``max_runs`` overriding its settings; give either ``policy`` or those). The snapshot's
    ``created_at`` is the moment the clicks were read, so retirement counts exactly the runs
    the consensus saw; its ``stats`` record the counts, the thresholds and the decisions.

    When nothing the consensus reads has changed since the project's latest snapshot (the
    same clicks, runs and expert cells, method, ``cell_radius`` and cellspot version; the
    fingerprint is ``stats["inputs"]``), that snapshot is kept and only retirement is applied
    again with ``policy``: pressing "Recompute consensus" twice writes one snapshot, and a
    model trained on it keeps pointing at the current data.
    """
    get_method(method)  # an unknown name fails before any work, listing the valid ones
    project = as_project(session, project)
    if policy is not None and (min_runs, min_confidence, max_runs) != (None, None, None):
        raise TypeError("give either policy or min_runs / min_confidence / max_runs, not both")
    policy = policy or retirement_policy(project, min_runs, min_confidence, max_runs)
    started = utcnow()
    clicks = clicks_frame(session, project)
    runs = runs_frame(session, project)
    gold = gold_frame(session, project)
    empty = expert_empty_ids(session, project)
    data = data_fingerprint(clicks, runs, gold, empty)
    inputs = input_fingerprint(clicks, runs, gold, method, cell_radius, data=data)
    latest = latest_snapshot(session, project)
    if latest is not None and (latest.stats or {}).get("inputs") == inputs:
        return _reapply(session, project, latest, policy)

    result = _consensus(clicks, runs, gold, method, cell_radius)
    image_ids = _image_ids(session, project)
    cells = _with_gold(_map_cells(result.cells, image_ids), gold, clicks, runs, _radius(result, cell_radius),
                       empty)

    snapshot = ConsensusSnapshot(project_id=project.id, method=method, params=_jsonable(result.params),
                                 created_at=started)
    session.add(snapshot)
    session.flush()
    _insert_cells(session, snapshot.id, cells)
    n_annotators = _insert_reliabilities(session, snapshot.id, result.annotators, runs)
    session.flush()
    change = apply_retirement(session, project, snapshot, policy)

    report = AggregateReport(
        snapshot_id=snapshot.id, method=method,
        images=int(pd.concat([runs["image_id"], gold["image_id"], pd.Series(empty, dtype="int64")]).nunique()),
        cells=len(cells), gold_cells=int(cells["from_gold"].sum()), annotators=n_annotators,
        task_runs=len(runs), clicks=len(clicks), **_retirement_fields(change),
    )
    snapshot.stats = {**_stats(report, policy), "inputs": inputs, "data": data}
    session.flush()
    log.info("project %r: snapshot %d (%s): %s", project.name, snapshot.id, method, snapshot.stats)
    return report


def input_fingerprint(
    clicks: pd.DataFrame, runs: pd.DataFrame, gold: pd.DataFrame, method: str, cell_radius: float | None,
    *, data: str | None = None,
) -> str:
    """A SHA-256 hex digest of everything a consensus snapshot is computed from: the clicks
    (run, position, label, order), the runs (image, annotator), the expert cells, the method,
    ``cell_radius`` and the cellspot version. Row order does not matter. ``data``: the frames'
    :func:`data_fingerprint` when the caller has it (the frames are hashed once)."""
    data = data or data_fingerprint(clicks, runs, gold)
    return hashlib.sha256(f"{method}|{cell_radius!r}|{__version__}|{data}".encode()).hexdigest()


def data_fingerprint(clicks: pd.DataFrame, runs: pd.DataFrame, gold: pd.DataFrame,
                     empty: Sequence[int] = ()) -> str:
    """A SHA-256 hex digest of the data alone (clicks, runs, expert cells, the images an expert
    found empty; row order does not matter): whether a snapshot still describes the store,
    whatever method made it. Without ``empty`` it is the digest of stores before that flag."""
    digest = hashlib.sha256()
    parts = (
        (clicks, ["task_run_id", "click_index", "x", "y", "label"]),
        (runs, ["task_run_id", "image_id", "annotator_id"]),
        (gold, ["image_id", "x", "y", "label"]),
    )
    for frame, cols in parts:
        rows = frame[cols].sort_values(cols, kind="stable").reset_index(drop=True)
        digest.update(f"{len(rows)}:".encode())
        digest.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    if len(empty):
        digest.update(f"expert_empty:{sorted(int(i) for i in empty)}".encode())
    return digest.hexdigest()


def snapshot_lag(session: Session, project: Project | str, snapshot: ConsensusSnapshot) -> str | None:
    """What the store holds that ``snapshot`` of ``project`` did not see (task runs or clicks
    added or removed, expert cells changed), as a sentence; None when it is up to date.
    Snapshots written before the data fingerprint are compared by their counts only."""
    project = as_project(session, project)
    clicks, runs, gold = clicks_frame(session, project), runs_frame(session, project), gold_frame(session, project)
    empty = expert_empty_ids(session, project)
    stats = snapshot.stats or {}
    changes = [f"{n} {what} (the snapshot saw {stats[key]})"
               for key, what, n in (("task_runs", "task runs", len(runs)), ("clicks", "clicks", len(clicks)))
               if stats.get(key) is not None and stats[key] != n]
    if "data" in stats:
        if stats["data"] == data_fingerprint(clicks, runs, gold, empty):
            return None
        if not changes:
            changes = ["changed clicks, task runs or expert cells"]
    elif not changes:
        return None
    return (f"consensus snapshot {snapshot.id} is older than the store, which now has {', '.join(changes)}; "
            "recompute consensus (`cellspot aggregate`, or 'Recompute consensus' in the app) to include them")


def _reapply(
    session: Session, project: Project, snapshot: ConsensusSnapshot, policy: RetirementPolicy
) -> AggregateReport:
    """Keep ``snapshot`` (its inputs are unchanged) and apply retirement with ``policy`` again."""
    change = apply_retirement(session, project, snapshot, policy)
    stats = dict(snapshot.stats or {})
    report = AggregateReport(snapshot_id=snapshot.id, method=snapshot.method, reused=True,
                             **{k: int(stats.get(k, 0)) for k in _COUNTS}, **_retirement_fields(change))
    snapshot.stats = {**stats, **_stats(report, policy)}
    session.flush()
    log.info("project %r: no click changed since snapshot %d; kept it and applied retirement again",
             project.name, snapshot.id)
    return report


#: the report's counts of what the consensus read and wrote (kept in the snapshot's stats)
_COUNTS = ("images", "cells", "gold_cells", "annotators", "task_runs", "clicks")


def _retirement_fields(change: RetirementChange) -> dict[str, Any]:
    """The report's retirement fields from what :func:`apply_retirement` changed."""
    return {"retired": change.n_retired, "newly_retired": len(change.retired),
            "reactivated": len(change.reactivated), "retire_reasons": change.as_dict()["reasons"]}


def _stats(report: AggregateReport, policy: RetirementPolicy) -> dict[str, Any]:
    """A snapshot's ``stats``: the report's counts and the retirement thresholds applied."""
    return {
        **{k: v for k, v in report.as_dict().items() if k not in ("snapshot_id", "method", "reused")},
        **{f"retire_{k}": v for k, v in asdict(policy).items()},
    }


def _consensus(
    clicks: pd.DataFrame, runs: pd.DataFrame, gold: pd.DataFrame, method: str, cell_radius: float | None
) -> ConsensusResult:
    return run_consensus(
        clicks[["image", "annotator", "task_run", "x", "y", "label"]],
        method,
        runs=runs[["image", "task_run", "annotator"]],
        gold=gold[["image", "x", "y", "label"]] if len(gold) else None,
        cell_radius=cell_radius,
    )


def _image_ids(session: Session, project: Project) -> dict[str, int]:
    rows = session.execute(select(Image.name, Image.id).where(Image.project_id == project.id))
    return dict(rows.tuples().all())


def _radius(result: ConsensusResult, cell_radius: float | None) -> float:
    for value in (cell_radius, result.params.get("cell_radius"), result.params.get("radius")):
        if isinstance(value, (int, float)) and np.isfinite(value) and value > 0:
            return float(value)
    return DEFAULT_GOLD_RADIUS


def _map_cells(cells: pd.DataFrame, image_ids: dict[str, int]) -> pd.DataFrame:
    """Consensus cells with ``image_id``, clipped to the store's value ranges (n_cells x 11)."""
    out = cells.copy()
    out["image_id"] = out["image"].astype(str).map(image_ids)
    unknown = out["image_id"].isna()
    if unknown.any():
        log.warning("dropping %d consensus cells of images not in the project", int(unknown.sum()))
        out = out[~unknown]
    if "p_cell" not in out.columns:
        out["p_cell"] = 1.0
    out = out.assign(
        image_id=out["image_id"].astype("int64"),
        p_alive=np.clip(out["p_alive"].astype(float), 0.0, 1.0),
        confidence=np.clip(out["confidence"].astype(float), 0.0, 1.0),
        p_cell=np.clip(out["p_cell"].astype(float).fillna(1.0), 0.0, 1.0),
        support=out["support"].astype("int64"),
        n_runs=out["n_runs"].astype("int64"),
        from_gold=False,
    )
    return out[["image", "image_id", "x", "y", "label", "p_alive", "confidence", "support",
                "n_runs", "p_cell", "from_gold"]].reset_index(drop=True)


def _with_gold(
    cells: pd.DataFrame, gold: pd.DataFrame, clicks: pd.DataFrame, runs: pd.DataFrame, radius: float,
    empty: Sequence[int] = (),
) -> pd.DataFrame:
    """Replace the consensus cells of every image that has gold cells by its gold cells, and
    drop those of the images an expert found empty (``empty``: image ids).

    Gold cells get ``p_alive`` 1 / 0, confidence 1, ``from_gold`` True, and ``support`` = the
    number of runs with a click within ``radius`` px.
    """
    cells = cells[~cells["image_id"].isin(list(empty))] if len(empty) else cells
    if gold.empty:
        return cells.reset_index(drop=True)
    n_runs = runs.groupby("image_id").size()
    rows = gold.assign(
        p_alive=(gold["label"] == "alive").astype(float), confidence=1.0, p_cell=1.0,
        n_runs=gold["image_id"].map(n_runs).fillna(0).astype("int64"), from_gold=True,
        support=_support_near(gold, clicks, radius),
    )
    kept = cells[~cells["image_id"].isin(gold["image_id"])]
    return pd.concat([kept, rows[cells.columns]], ignore_index=True)


def _support_near(gold: pd.DataFrame, clicks: pd.DataFrame, radius: float) -> np.ndarray:
    """For each gold cell, how many distinct runs clicked within ``radius`` px (n_gold,)."""
    support = np.zeros(len(gold), dtype=np.int64)
    by_image = {k: g for k, g in clicks.groupby("image_id")}
    for image_id, idx in gold.groupby("image_id").indices.items():
        near = by_image.get(image_id)
        if near is None:
            continue
        g = gold.iloc[idx][["x", "y"]].to_numpy()
        c = near[["x", "y"]].to_numpy()
        close = ((g[:, None, :] - c[None, :, :]) ** 2).sum(-1) <= radius**2  # (n_gold_i, n_clicks_i)
        run_codes = pd.factorize(near["task_run_id"])[0]
        support[idx] = [len(np.unique(run_codes[row])) for row in close]
    return support


def _insert_cells(session: Session, snapshot_id: int, cells: pd.DataFrame) -> None:
    if cells.empty:
        return
    records = cells.drop(columns=["image"]).assign(snapshot_id=snapshot_id).to_dict("records")
    session.execute(insert(ConsensusCell.__table__), _py(records))


def _insert_reliabilities(
    session: Session, snapshot_id: int, annotators: pd.DataFrame, runs: pd.DataFrame
) -> int:
    """Store reliability rows whose ``annotator`` maps to an annotator id of the project.

    Undefined metrics (NaN, e.g. the precision of an annotator who never clicked) are stored as 0.
    """
    if annotators is None or annotators.empty:
        return 0
    known = set(runs["annotator_id"].astype(int))
    ids = pd.to_numeric(annotators["annotator"], errors="coerce")
    keep = ids.notna() & ids.isin(known)
    if (~keep).any():
        log.warning("skipping %d reliability rows of unknown annotators", int((~keep).sum()))
    metrics = ["sensitivity", "precision", "accuracy_alive", "accuracy_dead", "weight"]
    rows = annotators.loc[keep, metrics + ["n_runs", "n_clicks"]].copy()
    rows[metrics] = rows[metrics].astype(float).fillna(0.0)
    rows[["n_runs", "n_clicks"]] = rows[["n_runs", "n_clicks"]].fillna(0).astype("int64")
    rows["annotator_id"] = ids[keep].astype("int64")
    rows["snapshot_id"] = snapshot_id
    if not rows.empty:
        session.execute(insert(AnnotatorReliability.__table__), _py(rows.to_dict("records")))
    return len(rows)


def settled_images(cells: pd.DataFrame, runs: pd.DataFrame, rule: RetirementRule) -> set[int]:
    """Ids of images with ``>= rule.min_runs`` runs whose cells are all confident enough
    (the earlier fixed rule; :func:`aggregate` applies the adaptive policy).

    An image with enough runs and no cells counts as settled (nothing to find).
    """
    n_runs = runs.groupby("image_id").size()
    enough = set(n_runs[n_runs >= rule.min_runs].index.astype(int))
    min_conf = cells.groupby("image_id")["confidence"].min()
    unsure = set(min_conf[min_conf < rule.min_confidence].index.astype(int))
    return enough - unsure


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: numpy scalars/arrays converted, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _py(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Numpy scalars -> Python scalars, so every DBAPI accepts them."""
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in records]

"""Adaptive retirement: an image stops being served once its consensus has settled.

An image retires when, in a consensus snapshot,

* it has at least ``min_runs`` runs, and
* every cell's label is settled: ``confidence >= min_confidence``, and
* every cell's existence is settled: ``|2 p_cell - 1| >= min_cell_certainty`` (``p_cell`` far
  from 0.5; 0.5 means ``p_cell <= 0.25`` or ``>= 0.75``), and
* the cell count is settled: the median number of clicks per run is within
  ``max(1, count_tolerance * n_cells)`` of the consensus count ``n_cells``;

or, whatever its consensus, once it has ``max_runs`` runs. An image with enough runs and no
cells counts as settled when the runs agree there is nothing to click. Thresholds come from
the project settings (``retire_min_runs``, ``retire_min_confidence``, ``retire_max_runs``,
``retire_min_cell_certainty``, ``retire_count_tolerance``; the first two are those of
:class:`cellspot.workflows.aggregate.RetirementRule`). When the settings raise
``retire_min_runs`` above the default ``max_runs`` without setting ``retire_max_runs``, there
is no maximum (as before adaptive retirement); a ``retire_max_runs`` set below
``retire_min_runs`` is refused.

:func:`decide` is pure (a table of per-image features in, decisions out);
:func:`apply_retirement` reads a snapshot, decides, and retires / reactivates images.
With :meth:`RetirementPolicy.from_rule` the decisions equal
:func:`cellspot.workflows.aggregate.settled_images` (the rule ``aggregate`` applies).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cellspot.store.models import Click, ConsensusSnapshot, Image, Project, TaskRun, utcnow

log = logging.getLogger(__name__)

FEATURE_COLUMNS = ["image_id", "n_runs", "n_cells", "min_confidence", "min_cell_certainty", "median_clicks"]
DECISION_COLUMNS = [*FEATURE_COLUMNS, "retire", "reason"]
REASONS = ("max_runs", "few_runs", "label_unsure", "cell_unsure", "count_unsettled", "settled")
SETTING_KEYS = {  # policy field -> project setting
    "min_runs": "retire_min_runs", "min_confidence": "retire_min_confidence", "max_runs": "retire_max_runs",
    "min_cell_certainty": "retire_min_cell_certainty", "count_tolerance": "retire_count_tolerance",
}
_CHUNK = 500


class RetirementPolicyError(ValueError):
    """A retirement threshold out of its allowed range."""


class MaxBelowMinRunsError(RetirementPolicyError):
    """A maximum number of runs below the minimum: ``max_runs`` and ``min_runs`` hold the two
    values, ``sources`` where each came from (``"project setting"``, ``"given"`` or ``"default"``),
    so a form can say it in its own words."""

    def __init__(self, message: str, max_runs: int, min_runs: int, sources: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.max_runs, self.min_runs = max_runs, min_runs
        self.sources = dict(sources or {})


@dataclass(frozen=True)
class RetirementPolicy:
    """Thresholds of adaptive retirement (see the module docstring for the rules).

    ``max_runs=None`` never retires by run count; ``count_tolerance=None`` skips the
    count-agreement check; ``min_cell_certainty=0`` skips the ``p_cell`` check. Built
    directly, ``max_runs`` must be ``None`` or ``>= min_runs``; from settings
    (:meth:`from_settings`) an unset ``max_runs`` gives way to a larger ``min_runs``.
    """

    min_runs: int = 3
    min_confidence: float = 0.9
    max_runs: int | None = 10
    min_cell_certainty: float = 0.5
    count_tolerance: float | None = 0.25

    def __post_init__(self) -> None:
        if int(self.min_runs) < 1:
            raise RetirementPolicyError(f"retirement min_runs must be >= 1, got {self.min_runs}")
        if self.max_runs is not None and int(self.max_runs) < int(self.min_runs):
            raise MaxBelowMinRunsError(
                f"retirement max_runs ({self.max_runs}) must be >= min_runs ({self.min_runs}), or switched off "
                "(no maximum)", int(self.max_runs), int(self.min_runs))
        for name in ("min_confidence", "min_cell_certainty"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise RetirementPolicyError(f"retirement {name} must be in [0, 1], got {value}")
        if self.count_tolerance is not None and not float(self.count_tolerance) >= 0:
            raise RetirementPolicyError(
                f"retirement count_tolerance must be >= 0, or switched off (no count check), "
                f"got {self.count_tolerance}")

    @classmethod
    def for_project(cls, project: Project, **overrides: Any) -> RetirementPolicy:
        """The policy from ``project.settings`` (keys :data:`SETTING_KEYS`), then ``overrides``
        (``None`` overrides are ignored); see :meth:`from_settings`. Raises
        :class:`RetirementPolicyError`."""
        return cls.from_settings(project.settings or {}, **overrides)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], **overrides: Any) -> RetirementPolicy:
        """The policy from project ``settings`` (keys :data:`SETTING_KEYS`), then ``overrides``
        (policy field names; ``None`` overrides are ignored).

        A ``None`` setting switches ``max_runs`` / ``count_tolerance`` off (other ``None``
        settings are ignored). When neither the settings nor ``overrides`` give ``max_runs``
        and ``min_runs`` exceeds the default ``max_runs``, there is no maximum rather than a
        cap below the minimum. A ``max_runs`` that is given and below ``min_runs`` raises
        :class:`RetirementPolicyError` naming both settings and values; so does any threshold
        out of range.
        """
        unknown = set(overrides) - set(SETTING_KEYS)
        if unknown:
            raise TypeError(f"unknown retirement thresholds {sorted(unknown)}; allowed: {sorted(SETTING_KEYS)}")
        defaults = {f.name: f.default for f in fields(cls)}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}  # field -> where its value came from, for error messages
        for name in defaults:
            key = SETTING_KEYS[name]
            if overrides.get(name) is not None:
                values[name], sources[name] = _cast(name, overrides[name]), "given"
            elif key in settings and (settings[key] is not None or name in _SWITCHABLE):
                value = settings[key]  # None: explicitly switched off in the settings
                values[name] = None if value is None else _cast(name, value)
                sources[name] = "project setting"
        min_runs = values.get("min_runs", defaults["min_runs"])
        default_max = defaults["max_runs"]
        if "max_runs" not in values and default_max is not None and min_runs > default_max:
            log.info("retire_min_runs %d exceeds the default max_runs %d and retire_max_runs is not set: "
                     "no maximum", min_runs, default_max)
            values["max_runs"] = None
        max_runs = values.get("max_runs", default_max)
        if max_runs is not None and min_runs >= 1 and max_runs < min_runs:
            def show(name: str, value: Any) -> str:
                return f"{SETTING_KEYS[name]} = {value} ({sources.get(name, 'default')})"

            raise MaxBelowMinRunsError(
                f"retirement max_runs ({max_runs}) must be >= min_runs ({min_runs}), or switched off: "
                f"{show('max_runs', max_runs)} is below {show('min_runs', min_runs)}; raise "
                f"{SETTING_KEYS['max_runs']}, lower {SETTING_KEYS['min_runs']}, or switch the maximum off "
                f"(no maximum)", max_runs, min_runs,
                {name: sources.get(name, "default") for name in ("max_runs", "min_runs")})
        return cls(**values)

    @classmethod
    def from_rule(cls, rule: Any) -> RetirementPolicy:
        """The policy equal to a :class:`cellspot.workflows.aggregate.RetirementRule`:
        ``min_runs`` and ``min_confidence`` only, the other checks off."""
        return cls(min_runs=int(rule.min_runs), min_confidence=float(rule.min_confidence),
                   max_runs=None, min_cell_certainty=0.0, count_tolerance=None)


def _cast(name: str, value: Any) -> int | float:
    return int(value) if name in ("min_runs", "max_runs") else float(value)


_SWITCHABLE = ("max_runs", "count_tolerance")  # the thresholds a None setting switches off


# --------------------------------------------------------------------------- pure part


def image_features(image_ids: Any, cells: pd.DataFrame, run_clicks: pd.DataFrame) -> pd.DataFrame:
    """Per-image features for :func:`decide` (one row per id of ``image_ids``, in that order).

    ``cells``: consensus cells with ``image_id, confidence, p_cell``; ``run_clicks``: one row
    per run with ``image_id, n_clicks``. Columns :data:`FEATURE_COLUMNS`;
    ``min_cell_certainty = min |2 p_cell - 1|``; NaN where an image has no cells (or no runs).
    """
    ids = pd.Index(pd.Series(list(image_ids), dtype="int64"), name="image_id")
    certainty = (2.0 * cells["p_cell"].astype(float) - 1.0).abs()
    per_cell = cells.assign(certainty=certainty).groupby("image_id")
    runs = run_clicks.groupby("image_id")["n_clicks"]
    out = pd.DataFrame({
        "n_runs": runs.size().reindex(ids).fillna(0).astype("int64"),
        "n_cells": per_cell.size().reindex(ids).fillna(0).astype("int64"),
        "min_confidence": per_cell["confidence"].min().reindex(ids).astype(float),
        "min_cell_certainty": per_cell["certainty"].min().reindex(ids).astype(float),
        "median_clicks": runs.median().reindex(ids).astype(float),
    }, index=ids)
    return out.reset_index()[FEATURE_COLUMNS]


def decide(features: pd.DataFrame, policy: RetirementPolicy) -> pd.DataFrame:
    """Decide every image of ``features`` (columns :data:`FEATURE_COLUMNS`).

    Adds ``retire`` (bool) and ``reason``, the first rule that applies, in this order:
    ``max_runs`` (retire), ``few_runs``, ``label_unsure``, ``cell_unsure``,
    ``count_unsettled`` (stay active), ``settled`` (retire). Missing values (no cells) pass
    the label and cell checks.
    """
    f = features
    n_cells = f["n_cells"].astype(float)
    allowed = np.maximum(1.0, float(policy.count_tolerance or 0.0) * n_cells)
    gap = (f["median_clicks"].astype(float).fillna(0.0) - n_cells).abs()
    rules = [
        ("max_runs", True, f["n_runs"] >= (policy.max_runs or 0)),
        ("few_runs", False, f["n_runs"] < policy.min_runs),
        ("label_unsure", False, f["min_confidence"] < policy.min_confidence),
        ("cell_unsure", False, f["min_cell_certainty"] < policy.min_cell_certainty),
        ("count_unsettled", False, (gap > allowed) if policy.count_tolerance is not None
         else pd.Series(False, index=f.index)),
    ]
    reason = pd.Series("settled", index=f.index, dtype=object)
    retire = pd.Series(True, index=f.index)
    decided = pd.Series(False, index=f.index)
    for name, verdict, hit in rules:
        if name == "max_runs" and policy.max_runs is None:
            continue
        now = hit.fillna(False).astype(bool) & ~decided
        reason[now], retire[now] = name, verdict
        decided |= now
    return f.assign(retire=retire.astype(bool), reason=reason)[DECISION_COLUMNS]


# --------------------------------------------------------------------------- store


@dataclass(frozen=True)
class RetirementChange:
    """What :func:`apply_retirement` changed: image ids newly ``retired`` and ``reactivated``,
    the number retired after it, and every image's decision (:data:`DECISION_COLUMNS`)."""

    snapshot_id: int
    policy: RetirementPolicy
    retired: tuple[int, ...]
    reactivated: tuple[int, ...]
    n_retired: int
    decisions: pd.DataFrame = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "newly_retired": len(self.retired),
                "reactivated": len(self.reactivated), "retired": self.n_retired,
                "reasons": {str(k): int(v) for k, v in self.decisions["reason"].value_counts().items()}}


def run_clicks_frame(session: Session, project: Project, until: datetime | None = None) -> pd.DataFrame:
    """One row per task run of ``project`` (submitted up to ``until``): ``image_id, task_run_id, n_clicks``."""
    clicks = select(Click.task_run_id, func.count().label("n")).group_by(Click.task_run_id).subquery()
    stmt = (select(TaskRun.image_id, TaskRun.id, func.coalesce(clicks.c.n, 0))
            .join(Image, Image.id == TaskRun.image_id)
            .outerjoin(clicks, clicks.c.task_run_id == TaskRun.id)
            .where(Image.project_id == project.id))
    if until is not None:
        stmt = stmt.where(TaskRun.submitted_at <= until)
    return pd.DataFrame(session.execute(stmt).tuples().all(), columns=["image_id", "task_run_id", "n_clicks"])


def apply_retirement(
    session: Session,
    project: Project,
    snapshot: ConsensusSnapshot | int | None = None,
    policy: RetirementPolicy | None = None,
) -> RetirementChange:
    """Retire the images of ``project`` whose consensus in ``snapshot`` has settled, and make
    active again the retired images that no longer qualify (as ``aggregate`` does).

    ``snapshot``: a snapshot, its id, or ``None`` for the latest (``LookupError`` when the
    project has none). Runs count when submitted up to the snapshot's creation. ``policy``
    defaults to :meth:`RetirementPolicy.for_project`. Newly retired images record the
    snapshot. Flushes, never commits.
    """
    from cellspot.active.rounds import utc
    from cellspot.store.queries import latest_snapshot, snapshot_cells_frame

    if snapshot is None:
        snapshot = latest_snapshot(session, project)
        if snapshot is None:
            raise LookupError(f"project {project.name!r} has no consensus snapshot; run `cellspot aggregate` "
                              "(or press \"Recompute consensus\" in the dashboard) first")
    elif not isinstance(snapshot, ConsensusSnapshot):
        snapshot = session.get(ConsensusSnapshot, int(snapshot))
    if snapshot is None or snapshot.project_id != project.id:
        raise LookupError(f"no such consensus snapshot in project {project.name!r}")
    policy = policy or RetirementPolicy.for_project(project)
    status = dict(session.execute(select(Image.id, Image.status).where(Image.project_id == project.id))
                  .tuples().all())
    cells = snapshot_cells_frame(session, snapshot)
    runs = run_clicks_frame(session, project, until=utc(snapshot.created_at))
    decisions = decide(image_features(sorted(status), cells, runs), policy)
    retire = set(decisions.loc[decisions["retire"], "image_id"].astype(int))
    to_retire = sorted(i for i in retire if status[i] == "active")
    to_activate = sorted(i for i, s in status.items() if s == "retired" and i not in retire)
    _update(session, to_retire, {"status": "retired", "retired_at": utcnow(), "retired_snapshot_id": snapshot.id})
    _update(session, to_activate, {"status": "active", "retired_at": None, "retired_snapshot_id": None})
    n_retired = sum(1 for s in status.values() if s == "retired") + len(to_retire) - len(to_activate)
    change = RetirementChange(snapshot.id, policy, tuple(to_retire), tuple(to_activate), n_retired, decisions)
    log.info("project %r, snapshot %d: %s", project.name, snapshot.id, change.as_dict())
    return change


def _update(session: Session, ids: list[int], values: dict[str, Any]) -> None:
    """UPDATE images ``ids`` in chunks and expire those columns of loaded ``Image`` objects."""
    for start in range(0, len(ids), _CHUNK):
        session.execute(update(Image).where(Image.id.in_(ids[start:start + _CHUNK])).values(**values),
                        execution_options={"synchronize_session": False})
    wanted = set(ids)
    for obj in list(session.identity_map.values()):
        if isinstance(obj, Image) and obj.id in wanted:
            session.expire(obj, list(values))


__all__ = [
    "DECISION_COLUMNS", "FEATURE_COLUMNS", "REASONS", "SETTING_KEYS", "MaxBelowMinRunsError", "RetirementChange",
    "RetirementPolicy", "RetirementPolicyError", "apply_retirement", "decide", "image_features",
    "run_clicks_frame",
]

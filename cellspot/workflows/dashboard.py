"""Researcher workflows: live class view, results, settings, export.

The Streamlit researcher pages call only these functions (plus the importers,
:func:`cellspot.workflows.aggregate.aggregate` and the image review / adjudication of
:mod:`cellspot.workflows.review`). Every function takes a caller-owned session and never
commits.
"""
from __future__ import annotations

import logging
import math
import re
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from cellspot.names import tidy_spaces
from cellspot.settings import Settings
from cellspot.store import queries
from cellspot.store.models import (
    Annotator,
    Click,
    ConsensusCell,
    ConsensusSnapshot,
    Image,
    Project,
    TaskRun,
    utcnow,
)
from cellspot.workflows.classroom import class_codes, normalize_class_code

log = logging.getLogger(__name__)

DEFAULT_WINDOW_MINUTES = 10
CONDITION_KEYS = ("condition", "drug", "dose_uM", "dose", "time_h", "time")
#: the annotators table of the class view, most useful first (a narrow screen shows the left columns)
STUDENT_COLUMNS = [
    "annotator_id", "nickname", "role", "runs", "weight", "clicks", "consensus_clicks", "runs_in_window",
    "last_seen", "active", "class_code", "gold_checks", "sensitivity", "precision", "accuracy_alive",
    "accuracy_dead",
]
#: the annotator roles in the order the class view lists them (class students first)
ROLE_ORDER = ("student", "imported", "expert", "researcher")
AGREEMENT_COLUMNS = ["image_id", "image", "status", "n_runs", "n_cells", "mean_confidence", "min_confidence",
                     "expert"]
TIMELINE_COLUMNS = ["minute", "runs", "clicks"]
CLASS_CODE_PATTERN = re.compile(r"^[A-Z0-9_-]{2,32}$")


class DashboardError(ValueError):
    """Base class of the researcher workflow errors."""


class InvalidProjectSettingError(DashboardError):
    """A project setting has an unknown name or a value outside its allowed range."""


class ClassCodeTakenError(InvalidProjectSettingError):
    """A class code is already used by another project."""


class ConflictingProjectSettingsError(InvalidProjectSettingError):
    """Two project settings, each in its range, that contradict each other: ``low`` (a
    ``(setting, value)`` pair) must not be below ``high``, as ``retire_max_runs`` below
    ``retire_min_runs`` or below ``target_runs_per_image``. The pairs let a form name its own fields."""

    def __init__(self, message: str, low: tuple[str, Any], high: tuple[str, Any]) -> None:
        super().__init__(message)
        self.low, self.high = low, high


class ProjectExistsError(DashboardError):
    """A project with that name exists already."""


# --------------------------------------------------------------------------- class activity


@dataclass(frozen=True)
class Activity:
    """The live class view of one project at ``now``.

    ``students_active`` / ``students_total``: class students (role ``student``) with a run (or
    who joined) in the last ``window_minutes`` / all of them. ``runs_per_minute`` /
    ``clicks_per_minute`` and ``runs_total`` / ``clicks_total`` count every annotator's runs
    (imported ones too). Images: ``unseen`` (no run, active), ``in_progress`` (runs, active),
    ``retired``. ``students``: one row per annotator of every role, class students first
    (:data:`STUDENT_COLUMNS`; its ``runs`` and ``clicks`` sum to ``runs_total`` and
    ``clicks_total``; reliability from the latest snapshot, NaN before one; per role:
    :func:`annotator_counts`). ``agreement``: per image with consensus cells, the mean / min
    cell confidence and whether they are expert cells (:data:`AGREEMENT_COLUMNS`).
    ``timeline``: runs and clicks per minute over the window (:data:`TIMELINE_COLUMNS`,
    zero-filled, oldest first, UTC).
    """

    now: datetime
    window_minutes: int
    students_active: int
    students_total: int
    runs_per_minute: float
    clicks_per_minute: float
    runs_total: int
    clicks_total: int
    images_total: int
    images_unseen: int
    images_in_progress: int
    images_retired: int
    students: pd.DataFrame
    agreement: pd.DataFrame
    timeline: pd.DataFrame
    snapshot_id: int | None
    snapshot_at: datetime | None


def _aware(value: datetime | None) -> datetime | None:
    if value is None or pd.isna(value):
        return None
    value = pd.Timestamp(value).to_pydatetime()
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def class_activity(
    session: Session,
    project: Project,
    window_minutes: int = DEFAULT_WINDOW_MINUTES,
    class_code: str | None = None,
    now: datetime | None = None,
) -> Activity:
    """Live numbers of ``project`` (optionally one ``class_code``) over the last ``window_minutes``."""
    if window_minutes < 1:
        raise DashboardError(f"window_minutes must be >= 1, got {window_minutes}")
    now = _aware(now) or utcnow()
    since = now - timedelta(minutes=window_minutes)
    runs = _runs(session, project)
    students = _students(session, project, runs, since, class_code)
    # the table lists every annotator in scope, so its runs and clicks are the totals below
    runs_in_scope = runs[runs["annotator_id"].isin(students["annotator_id"])]
    recent = runs_in_scope[runs_in_scope["submitted_at"] >= since]
    status = _image_status(session, project, runs)
    snapshot = queries.latest_snapshot(session, project)
    in_class = students[students["role"] == "student"]
    return Activity(
        now=now, window_minutes=window_minutes,
        students_active=int(in_class["active"].sum()), students_total=len(in_class),
        runs_per_minute=round(len(recent) / window_minutes, 3),
        clicks_per_minute=round(float(recent["n_clicks"].sum()) / window_minutes, 3),
        runs_total=len(runs_in_scope), clicks_total=int(runs_in_scope["n_clicks"].sum()),
        images_total=len(status), images_unseen=int((status == "unseen").sum()),
        images_in_progress=int((status == "in_progress").sum()),
        images_retired=int((status == "retired").sum()),
        students=students, agreement=_agreement(session, snapshot, runs),
        timeline=_timeline(recent, now, window_minutes),
        snapshot_id=snapshot.id if snapshot else None,
        snapshot_at=_aware(snapshot.created_at) if snapshot else None,
    )


def _runs(session: Session, project: Project) -> pd.DataFrame:
    """Every run of ``project``: task_run_id, image_id, annotator_id, submitted_at, is_gold_check, n_clicks."""
    n_clicks = (select(Click.task_run_id, func.count().label("n")).group_by(Click.task_run_id).subquery())
    stmt = (
        select(TaskRun.id, TaskRun.image_id, TaskRun.annotator_id, TaskRun.submitted_at,
               TaskRun.is_gold_check, func.coalesce(n_clicks.c.n, 0))
        .join(Image, TaskRun.image_id == Image.id)
        .outerjoin(n_clicks, n_clicks.c.task_run_id == TaskRun.id)
        .where(Image.project_id == project.id)
    )
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=[
        "task_run_id", "image_id", "annotator_id", "submitted_at", "is_gold_check", "n_clicks"])
    frame["submitted_at"] = pd.to_datetime(frame["submitted_at"], utc=True)
    return frame.astype({"n_clicks": "int64", "is_gold_check": bool})


def _students(
    session: Session, project: Project, runs: pd.DataFrame, since: datetime, class_code: str | None
) -> pd.DataFrame:
    """One row per annotator of ``project`` (of ``class_code`` when given), whatever its role:
    class students, imported annotators (``cellspot import clicks``), experts, researchers;
    columns :data:`STUDENT_COLUMNS`, ordered by :data:`ROLE_ORDER` then nickname.
    ``consensus_clicks``: the clicks the latest snapshot used (its ``n_clicks``, as in the
    export's annotators.csv; <NA> before one): fewer than ``clicks`` by the repeated clicks it
    set aside (:func:`cellspot.consensus.common.drop_repeated_clicks`) and by clicks made after it."""
    stmt = select(Annotator.id, Annotator.nickname, Annotator.role, Annotator.class_code,
                  Annotator.created_at).where(Annotator.project_id == project.id)
    if class_code is not None:
        stmt = stmt.where(Annotator.class_code == normalize_class_code(class_code))
    people = pd.DataFrame(session.execute(stmt).tuples().all(),
                          columns=["annotator_id", "nickname", "role", "class_code", "created_at"])
    people = _in_role_order(people)
    people["created_at"] = pd.to_datetime(people["created_at"], utc=True)
    since_ts = pd.Timestamp(since)
    by = runs.groupby("annotator_id")
    people["runs"] = people["annotator_id"].map(by.size()).fillna(0).astype("int64")
    people["clicks"] = people["annotator_id"].map(by["n_clicks"].sum()).fillna(0).astype("int64")
    people["gold_checks"] = people["annotator_id"].map(by["is_gold_check"].sum()).fillna(0).astype("int64")
    recent = runs[runs["submitted_at"] >= since_ts].groupby("annotator_id").size()
    people["runs_in_window"] = people["annotator_id"].map(recent).fillna(0).astype("int64")
    last_run = by["submitted_at"].max()
    people["last_seen"] = people["annotator_id"].map(last_run)
    people["last_seen"] = people["last_seen"].fillna(people["created_at"])
    people["active"] = people["last_seen"] >= since_ts
    snapshot = queries.latest_snapshot(session, project)
    metrics = {"sensitivity": "sensitivity", "precision": "precision", "accuracy_alive": "accuracy_alive",
               "accuracy_dead": "accuracy_dead", "weight": "weight", "consensus_clicks": "n_clicks"}
    rel = (queries.reliability_frame(session, snapshot).set_index("annotator_id") if snapshot is not None
           else pd.DataFrame(columns=list(metrics.values())))
    for column, source in metrics.items():
        people[column] = people["annotator_id"].map(rel[source]).astype(float)
    people["consensus_clicks"] = people["consensus_clicks"].astype("Int64")  # <NA>: not in the snapshot
    return people[STUDENT_COLUMNS].reset_index(drop=True)


def _in_role_order(people: pd.DataFrame) -> pd.DataFrame:
    """``people`` sorted by :data:`ROLE_ORDER` (unknown roles last), then by nickname with its
    numbers compared as numbers (``pybossa-run-2`` before ``pybossa-run-10``)."""
    rank = {role: i for i, role in enumerate(ROLE_ORDER)}

    def key(row: tuple) -> tuple:
        parts = re.split(r"(\d+)", row[1].casefold())
        return rank.get(row[0], len(rank)), [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p]

    order = sorted(range(len(people)), key=lambda i: key((people["role"].iat[i], people["nickname"].iat[i])))
    return people.iloc[order].reset_index(drop=True)


def annotator_counts(students: pd.DataFrame) -> pd.DataFrame:
    """Per role of the class view's annotators table (``Activity.students``): ``annotators``,
    ``active``, ``runs``, ``clicks``; one row per role present, in :data:`ROLE_ORDER`."""
    counts = students.groupby("role").agg(annotators=("annotator_id", "size"), active=("active", "sum"),
                                          runs=("runs", "sum"), clicks=("clicks", "sum"))
    roles = [r for r in ROLE_ORDER if r in counts.index] + sorted(set(counts.index) - set(ROLE_ORDER))
    return counts.reindex(roles).astype("int64").rename_axis("role").reset_index()


def _image_status(session: Session, project: Project, runs: pd.DataFrame) -> pd.Series:
    """Per image id: ``unseen``, ``in_progress`` or ``retired``."""
    rows = session.execute(select(Image.id, Image.status).where(Image.project_id == project.id)).tuples().all()
    status = pd.Series(dict(rows), dtype=object)
    seen = set(runs["image_id"].tolist())
    return pd.Series({i: ("retired" if s == "retired" else "in_progress" if i in seen else "unseen")
                      for i, s in status.items()}, dtype=object)


def _agreement(session: Session, snapshot: ConsensusSnapshot | None, runs: pd.DataFrame) -> pd.DataFrame:
    """Per image with cells in ``snapshot``: :data:`AGREEMENT_COLUMNS` (``n_runs`` over ``runs``)."""
    if snapshot is None:
        return pd.DataFrame(columns=AGREEMENT_COLUMNS)
    c = ConsensusCell
    stmt = (select(c.image_id, Image.name, Image.status, func.count(), func.avg(c.confidence),
                   func.min(c.confidence), func.max(case((c.from_gold, 1), else_=0)))
            .join(Image, c.image_id == Image.id).where(c.snapshot_id == snapshot.id)
            .group_by(c.image_id, Image.name, Image.status).order_by(c.image_id))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=[
        "image_id", "image", "status", "n_cells", "mean_confidence", "min_confidence", "expert"])
    frame["n_runs"] = frame["image_id"].map(runs.groupby("image_id").size()).fillna(0).astype("int64")
    # expert: the image's cells are its expert (gold) cells, confidence 1 by definition, not the students'
    return frame.astype({"mean_confidence": float, "min_confidence": float, "expert": bool})[AGREEMENT_COLUMNS]


def _timeline(recent: pd.DataFrame, now: datetime, window_minutes: int) -> pd.DataFrame:
    end = pd.Timestamp(now).floor("min")
    minutes = pd.date_range(end=end, periods=window_minutes, freq="min")
    if recent.empty:
        return pd.DataFrame({"minute": minutes, "runs": 0, "clicks": 0})
    bucket = recent["submitted_at"].dt.floor("min")
    grouped = recent.groupby(bucket).agg(runs=("task_run_id", "size"), clicks=("n_clicks", "sum"))
    out = grouped.reindex(minutes, fill_value=0).rename_axis("minute").reset_index()
    return out.astype({"runs": "int64", "clicks": "int64"})[TIMELINE_COLUMNS]


# --------------------------------------------------------------------------- results


class Results(NamedTuple):
    """``per_image``: image_id, image, status, n_runs, n_alive, n_dead, viability_pct,
    mean_confidence, then ``meta_*`` metadata columns (one row per image, by name).
    ``by_condition``: the ``by`` metadata keys, n_images, n_alive, n_dead, viability_pct
    (pooled over cells), viability_mean and viability_sd (over images)."""

    per_image: pd.DataFrame
    by_condition: pd.DataFrame


class ConsensusBasis(NamedTuple):
    """The consensus snapshot that :func:`results` counts: ``snapshot_id`` / ``snapshot_at``
    (None: no consensus yet) and ``behind``, what the store holds that the snapshot did not see
    as a sentence (None when it is up to date)."""

    snapshot_id: int | None
    snapshot_at: datetime | None
    behind: str | None


def consensus_basis(session: Session, project: Project) -> ConsensusBasis:
    """Which snapshot the project's results come from, and whether the store has moved on since
    (:func:`cellspot.workflows.aggregate.snapshot_lag`; reads every click of the project)."""
    from cellspot.workflows.aggregate import snapshot_lag

    snapshot = queries.latest_snapshot(session, project)
    if snapshot is None:
        return ConsensusBasis(None, None, None)
    return ConsensusBasis(snapshot.id, _aware(snapshot.created_at), snapshot_lag(session, project, snapshot))


def results(
    session: Session, project: Project, by: list[str] | None = None, min_confidence: float = 0.0
) -> Results:
    """Counts and viability per image from the latest snapshot, and viability by condition.

    ``by``: metadata keys to group by (default: those of :data:`CONDITION_KEYS` the images
    have; none -> one group ``all``). Cells below ``min_confidence`` are not counted. Images
    without a snapshot cell have zero counts and NaN viability.
    """
    from cellspot.export import flatten_metadata

    rows = session.execute(select(Image.id, Image.name, Image.status, Image.meta)
                           .where(Image.project_id == project.id).order_by(Image.name)).tuples().all()
    images = pd.DataFrame(rows, columns=["image_id", "image", "status", "meta"])
    n_runs = dict(session.execute(select(TaskRun.image_id, func.count()).join(Image, TaskRun.image_id == Image.id)
                                  .where(Image.project_id == project.id).group_by(TaskRun.image_id)).tuples().all())
    images["n_runs"] = images["image_id"].map(n_runs).fillna(0).astype("int64")
    snapshot = queries.latest_snapshot(session, project)
    cells = queries.snapshot_cells_frame(session, snapshot) if snapshot else pd.DataFrame(
        columns=queries.SNAPSHOT_CELL_COLUMNS)
    cells = cells[cells["confidence"].astype(float) >= min_confidence]
    counts = cells.groupby(["image_id", "label"]).size().unstack(fill_value=0) if len(cells) else pd.DataFrame()
    for label in ("alive", "dead"):
        series = counts[label] if label in counts else pd.Series(dtype="int64")
        images[f"n_{label}"] = images["image_id"].map(series).fillna(0).astype("int64")
    total = images["n_alive"] + images["n_dead"]
    images["viability_pct"] = (100.0 * images["n_alive"] / total.where(total > 0)).round(2)
    conf = cells.groupby("image_id")["confidence"].mean() if len(cells) else pd.Series(dtype=float)
    images["mean_confidence"] = images["image_id"].map(conf).astype(float)
    meta = flatten_metadata(images["meta"])
    per_image = pd.concat([images.drop(columns=["meta"]), meta], axis=1)
    per_image = per_image[["image_id", "image", "status", "n_runs", "n_alive", "n_dead", "viability_pct",
                           "mean_confidence", *meta.columns]]
    return Results(per_image=per_image.reset_index(drop=True), by_condition=_by_condition(per_image, by))


def _by_condition(per_image: pd.DataFrame, by: list[str] | None) -> pd.DataFrame:
    available = [c[len("meta_"):] for c in per_image.columns if c.startswith("meta_")]
    if by is None:
        by = [k for k in CONDITION_KEYS if k in available]
    unknown = [k for k in by if k not in available]
    if unknown:
        raise DashboardError(f"unknown metadata key(s) {unknown}; the images have: {', '.join(available) or 'none'}")
    frame = per_image.rename(columns={f"meta_{k}": k for k in by})
    if not by:
        frame = frame.assign(group="all")
        by = ["group"]
    grouped = frame.groupby(by, dropna=False, sort=True)
    out = grouped.agg(n_images=("image_id", "size"), n_alive=("n_alive", "sum"), n_dead=("n_dead", "sum"),
                      viability_mean=("viability_pct", "mean"), viability_sd=("viability_pct", "std"))
    out = out.reset_index()
    total = out["n_alive"] + out["n_dead"]
    out["viability_pct"] = (100.0 * out["n_alive"] / total.where(total > 0)).round(2)
    return out[[*by, "n_images", "n_alive", "n_dead", "viability_pct", "viability_mean", "viability_sd"]]


# --------------------------------------------------------------------------- settings


def int_in(lo: int, hi: int, error: type[Exception] = InvalidProjectSettingError) -> Callable[[str, Any], int]:
    """A check ``(name, value) -> int`` that a setting is a whole number in ``[lo, hi]``
    (``True`` / ``False`` are not numbers), raising ``error`` with the name and value otherwise."""
    def check(name: str, value: Any) -> int:
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number.is_integer() and lo <= number <= hi):
            raise error(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
        return int(number)
    return check


def _float_in(lo: float, hi: float, low_open: bool = False) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        ok = math.isfinite(number) and (lo < number if low_open else lo <= number) and number <= hi
        if not ok:
            bound = "(" if low_open else "["
            raise InvalidProjectSettingError(f"{name} must be a number in {bound}{lo:g}, {hi:g}], got {value!r}")
        return number
    return check


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check``, except that ``None`` (switched off) passes as ``None``."""
    def optional(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)
    return optional


def _class_codes(name: str, value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple, set)):
        raise InvalidProjectSettingError(f"{name} must be a list of codes (or a comma-separated string), got {value!r}")
    codes: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidProjectSettingError(f"class code {item!r} is not text")
        code = normalize_class_code(item)
        if not code:
            continue
        if not CLASS_CODE_PATTERN.match(code):
            raise InvalidProjectSettingError(
                f"class code {item!r} is not allowed: use 2 to 32 letters, digits, '-' or '_'")
        if code not in codes:
            codes.append(code)
    return codes


PROJECT_SETTING_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "class_codes": _class_codes,
    "target_runs_per_image": int_in(1, 1000),
    "retire_min_runs": int_in(1, 1000),
    "retire_min_confidence": _float_in(0.0, 1.0),
    "retire_max_runs": _optional(int_in(1, 1000)),
    "retire_min_cell_certainty": _float_in(0.0, 1.0),
    "retire_count_tolerance": _optional(_float_in(0.0, 10.0)),
    "gold_rate": _float_in(0.0, 1.0),
    "feedback_radius": _float_in(0.0, 500.0, low_open=True),
    "lease_seconds": int_in(30, 24 * 3600),
}


def validate_project_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Validated, normalised copies of ``changes`` (see :data:`PROJECT_SETTING_VALIDATORS`).

    Raises :class:`InvalidProjectSettingError` naming the setting and what is allowed.
    """
    out = {}
    for name, value in changes.items():
        check = PROJECT_SETTING_VALIDATORS.get(name)
        if check is None:
            raise InvalidProjectSettingError(
                f"unknown project setting {name!r}; allowed: {', '.join(PROJECT_SETTING_VALIDATORS)}")
        out[name] = check(name, value)
    return out


def _check_together(settings: dict[str, Any]) -> None:
    """The settings that must agree with each other, checked on the whole of ``settings``: the
    retirement thresholds must make a policy (the maximum runs not below the minimum), and
    the target runs per image must not exceed the maximum runs (images retire at the maximum,
    so a round could never give them the target). A maximum switched off (``None``) agrees with
    anything. Raises :class:`ConflictingProjectSettingsError` naming both settings and values,
    :class:`InvalidProjectSettingError` for another bad threshold.

    The one place of these rules: the Setup page and the Python API (create and update) both
    come here; the CLI sets no project settings.
    """
    from cellspot.active.retirement import MaxBelowMinRunsError, RetirementPolicy, RetirementPolicyError
    from cellspot.active.rounds import target_runs_setting

    try:
        policy = RetirementPolicy.from_settings(settings)
    except MaxBelowMinRunsError as exc:
        raise ConflictingProjectSettingsError(
            str(exc), ("retire_max_runs", exc.max_runs), ("retire_min_runs", exc.min_runs)) from exc
    except RetirementPolicyError as exc:
        raise InvalidProjectSettingError(str(exc)) from exc
    try:
        target = int(target_runs_setting(settings))
    except (TypeError, ValueError):  # an old "target_runs" that is no number: nothing to compare
        return
    if policy.max_runs is not None and target > policy.max_runs:
        source = "" if "retire_max_runs" in settings else " (the default)"
        raise ConflictingProjectSettingsError(
            f"target_runs_per_image = {target} is above retire_max_runs = {policy.max_runs}{source}: images "
            f"retire after {policy.max_runs} runs, so a round could never give them {target}; lower "
            "target_runs_per_image, raise retire_max_runs, or switch the maximum off (no maximum)",
            ("retire_max_runs", policy.max_runs), ("target_runs_per_image", target))


def _check_codes_free(session: Session, project_id: int | None, codes: list[str]) -> None:
    for other in session.scalars(select(Project).where(Project.id != (project_id or -1))):
        clash = sorted(class_codes(other) & set(codes))
        if clash:
            raise ClassCodeTakenError(f"class code(s) {', '.join(clash)} already belong to project "
                                      f"{other.name!r}; choose other codes")


def update_project_settings(session: Session, project: Project, **changes: Any) -> dict[str, Any]:
    """Validate ``changes`` and merge them into ``project.settings``; returns the new settings.

    Keys: ``class_codes`` (list or comma-separated; 2-32 of A-Z 0-9 - _, stored upper case,
    unique across projects), ``target_runs_per_image``, ``retire_min_runs`` (1..1000),
    ``retire_min_confidence``, ``gold_rate`` (0..1), ``feedback_radius`` (px, > 0),
    ``lease_seconds`` (how long a round's image stays reserved for a student, 30 s to a day), and the
    other retirement thresholds (:data:`cellspot.active.retirement.SETTING_KEYS`:
    ``retire_max_runs`` and ``retire_count_tolerance`` may be ``None`` = off,
    ``retire_min_cell_certainty`` 0..1), which must make a policy together; a
    ``target_runs_per_image`` above the maximum runs is refused (:func:`_check_together`).
    Nothing is changed when any value is invalid. Flushes, never commits.
    """
    clean = validate_project_settings(changes)
    if "class_codes" in clean:
        _check_codes_free(session, project.id, clean["class_codes"])
    new = {**(project.settings or {}), **clean}
    _check_together(new)
    project.settings = new  # a new dict, so the JSON column is marked dirty
    session.flush()
    log.info("project %r settings updated: %s", project.name, sorted(clean))
    return dict(new)


def create_project(session: Session, name: str, description: str = "", **settings: Any) -> Project:
    """A new project ``name`` with validated ``settings`` (see :func:`update_project_settings`).

    The name is stored tidied (:func:`cellspot.names.tidy_spaces`: no spaces at either end, each
    run of whitespace inside made one space); the returned project's ``name`` is the one stored,
    and :func:`cellspot.names.tidying_note` says what changed. Raises :class:`ProjectExistsError`
    when the name is taken, :class:`DashboardError` for an empty or over-long name. Flushes,
    never commits.
    """
    name = tidy_spaces(str(name or ""))
    try:
        queries.check_project_name(name)
    except ValueError as exc:
        raise DashboardError(str(exc)) from exc
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise ProjectExistsError(f"a project named {name!r} exists already; choose another name")
    alike = queries.project_named_alike(session, name)
    if alike is not None:
        raise ProjectExistsError(f"a project named {alike!r} exists already (the names differ only in case); "
                                 "choose a name that differs in more than case")
    clean = validate_project_settings(settings)
    if "class_codes" in clean:
        _check_codes_free(session, None, clean["class_codes"])
    _check_together(clean)
    project = Project(name=name, description=str(description or ""), settings=clean)
    session.add(project)
    session.flush()
    log.info("project %r created (id %d)", name, project.id)
    return project


# --------------------------------------------------------------------------- export


#: export zips of a project kept in ``exports_dir``: building one deletes the project's older ones
EXPORTS_KEPT = 3
#: files zipped between two progress reports: at most about a hundred reports per zip
_ZIP_REPORTS = 100


def export_zip(
    session: Session,
    project: Project,
    settings: Settings,
    *,
    keep_last: int = EXPORTS_KEPT,
    keep: tuple[Path | str, ...] = (),
    **export_options: Any,
) -> tuple[Path, Any]:
    """Export ``project`` like ``cellspot export`` and zip it under ``settings.exports_dir``.

    ``export_options`` go to :func:`cellspot.export.export_dataset` (crop_size, split, seed,
    min_confidence, snapshot, progress). The zip holds the export folder's files under one
    top folder and is written under a temporary name, then renamed, so a listed zip is always
    complete. ``progress(stage, done, total)``, when given, also follows the zipping (stage
    ``"zip"``, files done of all). Once the zip is complete, the project's export zips older
    than its ``keep_last`` newest (this one included) are deleted, except the zips named in
    ``keep`` (one that a page still offers for download); see :func:`prune_export_zips`.
    Returns the zip's path and the :class:`cellspot.export.ExportReport`. Raises
    :class:`cellspot.export.NoSnapshotError` before any consensus exists, and
    :class:`DashboardError` for a ``keep_last`` below 1.
    """
    from cellspot.export import export_dataset, safe_stem

    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise DashboardError(f"keep_last must be a whole number, 1 or more (the zip just built); got {keep_last!r}")
    progress: Callable[[str, int, int], None] | None = export_options.get("progress")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{safe_stem(project.name)}-{stamp}-{uuid.uuid4().hex[:6]}"
    out_dir = Path(settings.exports_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{stem}.zip"
    partial = out_dir / f".{stem}.zip.part"
    with tempfile.TemporaryDirectory(prefix="cellspot-export-") as tmp:
        folder = Path(tmp) / stem
        report = export_dataset(session, project, folder, settings, **export_options)
        try:
            _zip_folder(folder, partial, stem, progress)
            partial.replace(target)
        finally:
            if partial.exists():
                partial.unlink()
    log.info("export of %r zipped to %s", project.name, target)
    prune_export_zips(out_dir, project, keep_last, keep=(target, *keep))
    return target, report


def _zip_folder(folder: Path, archive_path: Path, top: str, progress: Callable[[str, int, int], None] | None) -> None:
    """Zip every file under ``folder`` into ``archive_path``, under the top folder ``top``;
    ``progress("zip", done, total)`` about a hundred times (first at 0 files)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    every = max(1, len(files) // _ZIP_REPORTS)
    if progress is not None:
        progress("zip", 0, len(files))
    with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for done, path in enumerate(files, start=1):
            archive.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
            if progress is not None and (done % every == 0 or done == len(files)):
                progress("zip", done, len(files))


def prune_export_zips(
    exports_dir: Path, project: Project, keep_last: int = EXPORTS_KEPT, keep: tuple[Path | str, ...] = ()
) -> list[Path]:
    """Delete the export zips of ``project`` in ``exports_dir`` but its ``keep_last`` newest
    (by the time in their name, then their modification time) and those named in ``keep``.

    A zip is the project's when its name is one :func:`export_zip` gives (``<project>-<UTC
    time>-<6 hex>.zip``) and its ``manifest.json`` names the project's id: other files,
    other projects' zips (also one whose name gives the same file-safe stem) and unreadable
    zips are never deleted. A zip that cannot be deleted is logged and left. Returns the
    deleted paths.
    """
    from cellspot.export import safe_stem

    pattern = re.compile(re.escape(safe_stem(project.name)) + r"-(\d{8}T\d{6}Z)-[0-9a-f]{6}\.zip")
    named = [(m.group(1), p) for p in Path(exports_dir).iterdir()
             if (m := pattern.fullmatch(p.name)) is not None and p.is_file()]
    ours = [(stamp, _mtime(p), p) for stamp, p in named if _export_zip_project_id(p) == project.id]
    ours = [(stamp, p) for stamp, mtime, p in sorted((o for o in ours if o[1] is not None), reverse=True)]
    kept = {Path(k).resolve() for k in keep}
    deleted = []
    for _, path in ours[keep_last:]:
        if path.resolve() in kept:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # another session deleted it first
        except OSError as exc:
            log.warning("cannot delete the old export %s: %s", path, exc)
            continue
        deleted.append(path)
    if deleted:
        log.info("deleted %d older export zip(s) of %r: %s", len(deleted), project.name,
                 ", ".join(p.name for p in deleted))
    return deleted


def _mtime(path: Path) -> int | None:
    """``path``'s modification time (ns), None when another session deleted it meanwhile."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _export_zip_project_id(path: Path) -> int | None:
    """The project id in the manifest of the export zip at ``path`` (None when it has none)."""
    import json

    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(f"{path.stem}/manifest.json"))
        return int(manifest["project"]["id"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
        log.debug("%s is not a readable cellspot export zip (%s); left alone", path, exc)
        return None


__all__ = [
    "Activity", "ClassCodeTakenError", "ConflictingProjectSettingsError", "ConsensusBasis", "DashboardError",
    "InvalidProjectSettingError",
    "PROJECT_SETTING_VALIDATORS", "ProjectExistsError", "Results", "class_activity", "consensus_basis",
    "create_project", "export_zip", "results", "update_project_settings", "validate_project_settings",
]

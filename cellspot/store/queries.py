"""Query helpers over the label store. The caller owns the session: nothing here commits.

Writers flush so new ids are available; readers return pandas DataFrames built from one
bulk ``SELECT`` each (they run on projects with 100k+ clicks).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Select, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from cellspot.names import has_control_character
from cellspot.store.models import (
    ANNOTATOR_ROLES,
    CLICK_LABELS,
    Annotator,
    AnnotatorReliability,
    Click,
    ConsensusCell,
    ConsensusSnapshot,
    GoldCell,
    Image,
    Project,
    TaskRun,
    utcnow,
)

log = logging.getLogger(__name__)

CLICK_FRAME_COLUMNS = [
    "image", "image_id", "annotator", "annotator_id", "task_run", "task_run_id",
    "x", "y", "label", "click_index",
]
RUN_FRAME_COLUMNS = ["image", "image_id", "task_run", "task_run_id", "annotator", "annotator_id"]
GOLD_FRAME_COLUMNS = ["image", "image_id", "x", "y", "label"]
SNAPSHOT_CELL_COLUMNS = [
    "image", "image_id", "x", "y", "label", "p_alive", "confidence", "support", "n_runs",
    "p_cell", "from_gold",
]
RELIABILITY_COLUMNS = [
    "annotator", "annotator_id", "nickname", "class_code", "role", "n_runs", "n_clicks",
    "sensitivity", "precision", "accuracy_alive", "accuracy_dead", "weight",
]
PROJECT_SUMMARY_COLUMNS = [
    "project", "project_id", "images", "retired", "annotators", "task_runs", "clicks",
    "gold_cells", "snapshots",
]


class ProjectNotFoundError(LookupError):
    """No project of that name; the message lists the existing ones."""


class InvalidClickError(ValueError):
    """A submitted click is malformed; ``index`` and ``field`` say which click and what."""

    def __init__(self, index: int, field: str, message: str) -> None:
        super().__init__(f"click {index}: {message}")
        self.index = index
        self.field = field


class ClientKeyConflictError(ValueError):
    """A ``client_key`` already names a run of another image or annotator."""


# --------------------------------------------------------------------------- writers


def _conflict_insert(session: Session, table: Any):
    """The dialect's INSERT with ``ON CONFLICT`` clauses (SQLite, PostgreSQL), else ``None``."""
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        return None
    return (sqlite if dialect == "sqlite" else postgresql).insert(table)


def _insert_ignore(session: Session, model: type, values: dict[str, Any], conflict: list[str]) -> bool:
    """INSERT ``values`` unless a row with the same ``conflict`` columns exists; True if inserted.

    Uses ``INSERT ... ON CONFLICT DO NOTHING`` (SQLite and PostgreSQL) so concurrent writers
    cannot both insert; other dialects fall back to a check-then-insert.
    """
    table = model.__table__
    insert_ = _conflict_insert(session, table)
    if insert_ is not None:
        stmt = insert_.values(**values).on_conflict_do_nothing(index_elements=conflict).returning(table.c.id)
        return session.execute(stmt).scalar_one_or_none() is not None
    where = [table.c[c] == values[c] for c in conflict]
    if session.execute(select(table.c.id).where(*where)).first() is not None:
        return False
    session.execute(insert(table).values(**values))
    return True



def upsert(session: Session, model: type, values: dict[str, Any], key: list[str]) -> None:
    """INSERT ``values``, or UPDATE the other columns of the row with the same ``key`` columns.

    One ``INSERT ... ON CONFLICT DO UPDATE`` statement on SQLite and PostgreSQL, so two writers
    of the same new key cannot collide; other dialects fall back to a get-then-write. Never
    commits (rows of ``model`` already loaded in the session are not refreshed).
    """
    insert_ = _conflict_insert(session, model.__table__)
    if insert_ is not None:
        stmt = insert_.values(**values)
        changes = {k: stmt.excluded[k] for k in values if k not in key}
        session.execute(stmt.on_conflict_do_update(index_elements=key, set_=changes))
        return
    row = session.get(model, tuple(values[k] for k in key)) or model(**{k: values[k] for k in key})
    session.add(row)
    for name, value in values.items():
        setattr(row, name, value)
    session.flush()

#: the longest project name (the ``projects.name`` column)
PROJECT_NAME_MAX = 200


def check_project_name(name: object) -> str:
    """``name`` if it can name a project: a non-empty string of at most :data:`PROJECT_NAME_MAX`
    characters without spaces at either end (a name that differs from another only by a trailing
    space would look the same in every list); else ValueError saying why."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a project name must be a non-empty string; got {name!r}")
    if len(name) > PROJECT_NAME_MAX:
        raise ValueError(f"a project name must have at most {PROJECT_NAME_MAX} characters; got {len(name)}")
    if name != name.strip():
        raise ValueError(f"a project name must not start or end with spaces; got {name!r} "
                         f"(did you mean {name.strip()!r}?)")
    if has_control_character(name):
        raise ValueError(f"a project name must not hold tabs, line breaks or other control characters; got {name!r}")
    return name


def project_named_alike(session: Session, name: str) -> str | None:
    """The name of another project that differs from ``name`` only in case (``Lab`` for
    ``lab``), or ``None``: a new project named so is most likely a typo."""
    return session.scalar(select(Project.name).where(func.lower(Project.name) == name.lower(),
                                                     Project.name != name).limit(1))


def get_or_create_project(session: Session, name: str, **settings: Any) -> Project:
    """The project called ``name``, created with ``settings`` if it does not exist yet.

    ``settings`` (e.g. ``retire_min_runs=3``) only apply on creation; an existing project
    keeps its own.
    """
    check_project_name(name)
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        alike = project_named_alike(session, name)
        if alike is not None:
            raise ValueError(f"no project named {name!r}, but there is {alike!r} (the names differ only in "
                             "case); use that name, or another one for a new project")
        _insert_ignore(
            session, Project,
            {"name": name, "description": "", "settings": dict(settings), "created_at": utcnow()},
            ["name"],
        )
        project = session.scalars(select(Project).where(Project.name == name)).one()
        log.info("project %r ready (id %d)", name, project.id)
    return project


def get_project(session: Session, name: str) -> Project:
    """The project called ``name``; :class:`ProjectNotFoundError` lists the existing names."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        names = session.scalars(select(Project.name).order_by(Project.name)).all()
        known = ", ".join(repr(n) for n in names) if names else "none yet"
        raise ProjectNotFoundError(f"no project named {name!r}; existing projects: {known}")
    return project


def lock_project(session: Session, project_id: int) -> None:
    """Lock project ``project_id``'s row ``FOR UPDATE`` until the transaction ends, so that the
    changes that must not interleave within one project (round openings and closings,
    promotions) run one at a time. PostgreSQL only: SQLite ignores ``FOR UPDATE`` (its writers
    queue on the one writer lock)."""
    session.execute(select(Project.id).where(Project.id == int(project_id)).with_for_update())


def as_project(session: Session, project: Project | str) -> Project:
    """``project`` itself, or the project called ``project`` (:func:`get_project`)."""
    return project if isinstance(project, Project) else get_project(session, project)


def get_or_create_annotator(
    session: Session, project: Project, nickname: str, class_code: str = "", role: str = "student"
) -> Annotator:
    """The annotator (``nickname``, ``class_code``) of ``project``, created with ``role`` if new."""
    if not nickname or not nickname.strip():
        raise ValueError("annotator nickname must be a non-empty string")
    if role not in ANNOTATOR_ROLES:
        raise ValueError(f"unknown annotator role {role!r}; allowed: {', '.join(ANNOTATOR_ROLES)}")
    session.flush()  # a pending project needs its id
    where = (
        Annotator.project_id == project.id,
        Annotator.class_code == class_code,
        Annotator.nickname == nickname,
    )
    annotator = session.scalar(select(Annotator).where(*where))
    if annotator is None:
        _insert_ignore(
            session, Annotator,
            {"project_id": project.id, "nickname": nickname, "class_code": class_code,
             "role": role, "created_at": utcnow()},
            ["project_id", "class_code", "nickname"],
        )
        annotator = session.scalars(select(Annotator).where(*where)).one()
    return annotator


def validate_clicks(image: Image, clicks: Sequence[tuple[float, float, str]]) -> None:
    """Check every ``(x, y, label)``: finite, ``0 <= x < width``, ``0 <= y < height``, known label.

    Raises :class:`InvalidClickError` naming the first bad click's index and field.
    """
    for i, click in enumerate(clicks):
        if len(click) != 3:
            raise InvalidClickError(i, "click", f"expected (x, y, label), got {click!r}")
        x, y, label = click
        for field, value, limit in (("x", x, image.width), ("y", y, image.height)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidClickError(i, field, f"{field}={value!r} is not a finite number")
            if not 0 <= value < limit:
                raise InvalidClickError(
                    i, field,
                    f"{field}={value} is outside image {image.name!r} (allowed 0 <= {field} < {limit})",
                )
        if label not in CLICK_LABELS:
            raise InvalidClickError(
                i, "label", f"unknown label {label!r}; allowed: {', '.join(CLICK_LABELS)}"
            )


def submit_task_run(
    session: Session,
    image: Image,
    annotator: Annotator,
    clicks: Sequence[tuple[float, float, str]],
    client_key: str,
    source: str = "app",
    is_gold_check: bool = False,
) -> tuple[TaskRun, bool]:
    """Store one submission: a task run with its ``clicks`` ``(x, y, label)`` in image pixels.

    Idempotent on ``client_key``: when a run with that key exists it is returned with
    ``created=False`` and nothing is stored (safe under concurrent double submits). Clicks are
    validated first (:class:`InvalidClickError`); a key reused for another image or annotator
    raises :class:`ClientKeyConflictError`. Returns ``(run, created)``.
    """
    if not client_key:
        raise ValueError("client_key must be a non-empty string")
    validate_clicks(image, clicks)
    session.flush()
    created = _insert_ignore(
        session, TaskRun,
        {"image_id": image.id, "annotator_id": annotator.id, "client_key": client_key,
         "source": source, "is_gold_check": is_gold_check, "submitted_at": utcnow()},
        ["client_key"],
    )
    run = session.scalars(select(TaskRun).where(TaskRun.client_key == client_key)).one()
    if (run.image_id, run.annotator_id) != (image.id, annotator.id):
        raise ClientKeyConflictError(
            f"client_key {client_key!r} already names run {run.id} of image {run.image_id} by "
            f"annotator {run.annotator_id}, not image {image.id} by annotator {annotator.id}"
        )
    if created and clicks:
        rows = [
            {"task_run_id": run.id, "click_index": i, "x": float(x), "y": float(y), "label": label}
            for i, (x, y, label) in enumerate(clicks)
        ]
        session.execute(insert(Click.__table__), rows)
    return run, created


# --------------------------------------------------------------------------- readers


def _frame(session: Session, stmt: Select, columns: list[str]) -> pd.DataFrame:
    # Core execution on the session's connection (same transaction): about 2x faster than
    # ORM row processing on 100k+ rows.
    rows = session.connection().execute(stmt).fetchall()
    return pd.DataFrame.from_records(rows, columns=columns)


def clicks_frame(session: Session, project: Project) -> pd.DataFrame:
    """Every click of ``project``, one row per click (n_clicks x 10).

    Columns :data:`CLICK_FRAME_COLUMNS`: ``image`` (name), ``annotator`` / ``task_run`` (ids
    as str, the keys consensus uses), ``x``, ``y`` (image pixels), ``label``, ``click_index``.
    """
    stmt = (
        select(Image.name, Image.id, TaskRun.annotator_id, TaskRun.id,
               Click.x, Click.y, Click.label, Click.click_index)
        .join(TaskRun, Click.task_run_id == TaskRun.id)
        .join(Image, TaskRun.image_id == Image.id)
        .where(Image.project_id == project.id)
        .order_by(TaskRun.id, Click.click_index)
    )
    cols = ["image", "image_id", "annotator_id", "task_run_id", "x", "y", "label", "click_index"]
    df = _frame(session, stmt, cols).astype(
        {"image": object, "image_id": "int64", "annotator_id": "int64", "task_run_id": "int64",
         "x": "float64", "y": "float64", "label": object, "click_index": "int64"}
    )
    df["annotator"] = df["annotator_id"].astype(str)
    df["task_run"] = df["task_run_id"].astype(str)
    return df[CLICK_FRAME_COLUMNS]


def runs_frame(session: Session, project: Project) -> pd.DataFrame:
    """Every task run of ``project`` (zero-click runs included), one row per run (n_runs x 6)."""
    stmt = (
        select(Image.name, Image.id, TaskRun.id, TaskRun.annotator_id)
        .join(Image, TaskRun.image_id == Image.id)
        .where(Image.project_id == project.id)
        .order_by(TaskRun.id)
    )
    df = _frame(session, stmt, ["image", "image_id", "task_run_id", "annotator_id"]).astype(
        {"image": object, "image_id": "int64", "task_run_id": "int64", "annotator_id": "int64"}
    )
    df["task_run"] = df["task_run_id"].astype(str)
    df["annotator"] = df["annotator_id"].astype(str)
    return df[RUN_FRAME_COLUMNS]


def gold_frame(session: Session, project: Project) -> pd.DataFrame:
    """Expert (gold) cells of ``project`` (n_gold x 5: image, image_id, x, y, label)."""
    stmt = (
        select(Image.name, Image.id, GoldCell.x, GoldCell.y, GoldCell.label)
        .join(Image, GoldCell.image_id == Image.id)
        .where(Image.project_id == project.id)
        .order_by(GoldCell.id)
    )
    return _frame(session, stmt, GOLD_FRAME_COLUMNS).astype(
        {"image": object, "image_id": "int64", "x": "float64", "y": "float64", "label": object}
    )


def expert_empty_ids(session: Session, project: Project) -> list[int]:
    """Ids of the images of ``project`` an expert marked as having no cells (``expert_empty``)
    and that have no expert cell: their empty expert set replaces their consensus."""
    stmt = (select(Image.id)
            .where(Image.project_id == project.id, Image.expert_empty.is_(True),
                   Image.id.not_in(select(GoldCell.image_id)))
            .order_by(Image.id))
    return [int(i) for i in session.scalars(stmt)]


def latest_snapshot(session: Session, project: Project) -> ConsensusSnapshot | None:
    """The newest consensus snapshot of ``project``, or ``None``."""
    stmt = (
        select(ConsensusSnapshot)
        .where(ConsensusSnapshot.project_id == project.id)
        .order_by(ConsensusSnapshot.created_at.desc(), ConsensusSnapshot.id.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def snapshot_cells_frame(session: Session, snapshot: ConsensusSnapshot) -> pd.DataFrame:
    """The cells of ``snapshot`` (n_cells x 11, :data:`SNAPSHOT_CELL_COLUMNS`)."""
    c = ConsensusCell
    stmt = (
        select(Image.name, c.image_id, c.x, c.y, c.label, c.p_alive, c.confidence, c.support,
               c.n_runs, c.p_cell, c.from_gold)
        .join(Image, c.image_id == Image.id)
        .where(c.snapshot_id == snapshot.id)
        .order_by(c.image_id, c.id)
    )
    return _frame(session, stmt, SNAPSHOT_CELL_COLUMNS).astype(
        {"image": object, "image_id": "int64", "x": "float64", "y": "float64", "label": object,
         "p_alive": "float64", "confidence": "float64", "support": "int64", "n_runs": "int64",
         "p_cell": "float64", "from_gold": bool}
    )


def reliability_frame(session: Session, snapshot: ConsensusSnapshot) -> pd.DataFrame:
    """Per-annotator reliability of ``snapshot`` (n_annotators x 12, :data:`RELIABILITY_COLUMNS`).

    ``precision`` is NaN for an annotator without clicks (undefined; the table stores 0)."""
    r = AnnotatorReliability
    stmt = (
        select(r.annotator_id, Annotator.nickname, Annotator.class_code, Annotator.role,
               r.n_runs, r.n_clicks, r.sensitivity, r.precision, r.accuracy_alive,
               r.accuracy_dead, r.weight)
        .join(Annotator, r.annotator_id == Annotator.id)
        .where(r.snapshot_id == snapshot.id)
        .order_by(r.annotator_id)
    )
    df = _frame(session, stmt, RELIABILITY_COLUMNS[1:])
    df.insert(0, "annotator", df["annotator_id"].astype("int64").astype(str))
    df["precision"] = df["precision"].astype("float64").where(df["n_clicks"] > 0)
    return df


def project_summaries(session: Session) -> pd.DataFrame:
    """One row per project with counts (:data:`PROJECT_SUMMARY_COLUMNS`), by name."""
    projects = _frame(session, select(Project.name, Project.id).order_by(Project.name),
                      ["project", "project_id"])
    counts = {
        "images": select(Image.project_id, func.count()).group_by(Image.project_id),
        "retired": select(Image.project_id, func.count())
        .where(Image.status == "retired").group_by(Image.project_id),
        "annotators": select(Annotator.project_id, func.count()).group_by(Annotator.project_id),
        "task_runs": select(Image.project_id, func.count()).join(TaskRun.image)
        .group_by(Image.project_id),
        "clicks": select(Image.project_id, func.count()).select_from(Click)
        .join(TaskRun, Click.task_run_id == TaskRun.id).join(Image, TaskRun.image_id == Image.id)
        .group_by(Image.project_id),
        "gold_cells": select(Image.project_id, func.count()).join(GoldCell.image)
        .group_by(Image.project_id),
        "snapshots": select(ConsensusSnapshot.project_id, func.count())
        .group_by(ConsensusSnapshot.project_id),
    }
    for column, stmt in counts.items():
        by_project = dict(session.execute(stmt).tuples().all())
        projects[column] = projects["project_id"].map(by_project).fillna(0).astype("int64")
    return projects[PROJECT_SUMMARY_COLUMNS]

"""Bulk store operations the importers need (thousands of rows in a few statements).

Single-row helpers live in :mod:`cellspot.store.queries`; these are their bulk
counterparts for imports. The caller owns the session: everything flushes, nothing commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import insert, select, tuple_
from sqlalchemy.orm import Session

from cellspot.store.models import Annotator, Click, Image, Project, TaskRun, utcnow

SQL_CHUNK = 500
"""Values per ``IN (...)`` list / per bulk statement (well under SQLite's variable limit)."""

SIZE_FROM_KEY = "size_from"
"""``Image.meta`` key set to :data:`SIZE_FROM_CLICKS` on a pixel-less image whose size was
inferred from its clicks (a lower bound): later clicks may enlarge it, and a larger file may
attach its pixels to it."""
SIZE_FROM_CLICKS = "clicks"


def size_is_lower_bound(image: Image) -> bool:
    """True for a pixel-less image whose size is only the smallest frame holding its clicks."""
    return not image.has_pixels and (image.meta or {}).get(SIZE_FROM_KEY) == SIZE_FROM_CLICKS


def _chunks(values: Sequence[Any], size: int = SQL_CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def project_images(session: Session, project: Project) -> dict[str, Image]:
    """Every image of ``project`` by name (ORM objects, so importers can update them)."""
    session.flush()
    return {image.name: image for image in session.scalars(select(Image).where(Image.project_id == project.id))}


def existing_client_keys(session: Session, keys: Sequence[str]) -> set[str]:
    """The subset of ``keys`` that already name a task run."""
    session.flush()
    found: set[str] = set()
    for chunk in _chunks(list(keys)):
        found.update(session.scalars(select(TaskRun.client_key).where(TaskRun.client_key.in_(chunk))))
    return found


def imported_runs(session: Session, project: Project, image_ids: Sequence[int]) -> list[tuple[int, str, int, str, str]]:
    """``(run id, client key, image id, annotator nickname, source)`` of every run imported
    from a file (client key ``import:p<project id>:...``) on ``image_ids``."""
    session.flush()
    out: list[tuple[int, str, int, str, str]] = []
    for chunk in _chunks(list(image_ids)):
        out.extend(session.execute(
            select(TaskRun.id, TaskRun.client_key, TaskRun.image_id, Annotator.nickname, TaskRun.source)
            .join(Annotator, Annotator.id == TaskRun.annotator_id)
            .where(TaskRun.image_id.in_(chunk), TaskRun.client_key.startswith(f"import:p{project.id}:"))
        ).tuples())
    return out


def run_clicks(session: Session, run_ids: Sequence[int]) -> dict[int, list[tuple[float, float, str]]]:
    """Run id -> its clicks ``(x, y, label)`` in click order (runs without clicks map to ``[]``)."""
    out: dict[int, list[tuple[float, float, str]]] = {run_id: [] for run_id in run_ids}
    for chunk in _chunks(list(run_ids)):
        rows = session.execute(
            select(Click.task_run_id, Click.x, Click.y, Click.label)
            .where(Click.task_run_id.in_(chunk)).order_by(Click.task_run_id, Click.click_index)
        ).tuples()
        for run_id, x, y, label in rows:
            out[run_id].append((x, y, label))
    return out


def delete_runs(session: Session, run_ids: Sequence[int]) -> None:
    """Delete task runs and their clicks (clicks first: SQLite enforces no cascade by default)."""
    from sqlalchemy import delete

    for chunk in _chunks(list(run_ids)):
        session.execute(delete(Click).where(Click.task_run_id.in_(chunk)))
        session.execute(delete(TaskRun).where(TaskRun.id.in_(chunk)))


def ensure_images(
    session: Session, project: Project, sizes: dict[str, tuple[int, int]], known: dict[str, Image],
    meta: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, int], int]:
    """Ids of the images named in ``sizes``; missing ones are created without pixels.

    ``known``: the project's images by name (from :func:`project_images`); ``meta``: the
    ``Image.meta`` of new images by name (default empty). Returns ``(name -> id, number created)``.
    """
    meta = meta or {}
    ids = {name: known[name].id for name in sizes if name in known}
    now = utcnow()
    rows = [
        {"project_id": project.id, "name": name, "sha256": None, "path": None, "width": w, "height": h,
         "channels": 1, "bit_depth": 8, "has_pixels": False, "meta": dict(meta.get(name, {})), "status": "active",
         "created_at": now}
        for name, (w, h) in sizes.items() if name not in known
    ]
    for chunk in _chunks(rows):
        result = session.execute(insert(Image).returning(Image.id, Image.name), list(chunk))
        ids.update({name: image_id for image_id, name in result})
    return ids, len(rows)


def ensure_annotators(
    session: Session, project: Project, identities: set[tuple[str, str]], role: str
) -> tuple[dict[tuple[str, str], int], int]:
    """Ids of the annotators ``(nickname, class_code)``; missing ones are created with ``role``.

    Returns ``((nickname, class_code) -> id, number created)``.
    """
    session.flush()
    wanted = sorted(identities)
    ids: dict[tuple[str, str], int] = {}
    for chunk in _chunks(wanted):
        stmt = select(Annotator.id, Annotator.nickname, Annotator.class_code).where(
            Annotator.project_id == project.id,
            tuple_(Annotator.nickname, Annotator.class_code).in_(list(chunk)),
        )
        ids.update({(nick, code): annotator_id for annotator_id, nick, code in session.execute(stmt)})
    now = utcnow()
    rows = [
        {"project_id": project.id, "nickname": nick, "class_code": code, "role": role, "created_at": now}
        for nick, code in wanted if (nick, code) not in ids
    ]
    for chunk in _chunks(rows):
        result = session.execute(
            insert(Annotator).returning(Annotator.id, Annotator.nickname, Annotator.class_code), list(chunk)
        )
        ids.update({(nick, code): annotator_id for annotator_id, nick, code in result})
    return ids, len(rows)


def insert_runs(session: Session, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Insert task runs (dicts of :class:`TaskRun` columns); returns client_key -> id."""
    now = utcnow()
    ids: dict[str, int] = {}
    full = [{"is_gold_check": False, **row, "submitted_at": row.get("submitted_at") or now} for row in rows]
    for chunk in _chunks(full):
        result = session.execute(insert(TaskRun).returning(TaskRun.id, TaskRun.client_key), list(chunk))
        ids.update({key: run_id for run_id, key in result})
    return ids


def insert_clicks(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert clicks (dicts with task_run_id, click_index, x, y, label) with executemany."""
    for chunk in _chunks(rows, 5000):
        session.execute(Click.__table__.insert(), list(chunk))

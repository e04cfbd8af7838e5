"""Import expert (gold) cells from a CSV ``image,x,y,label`` (label alive or dead).

Coordinates are image pixels. Every image must already be in the project (with or without
pixels): an unknown name is a problem naming its line. Validation is all-or-nothing: any
problem raises :class:`GoldImportError` and nothing is written. Re-importing is idempotent:
a cell identical to one already stored (same image, x, y to 1e-6 px, same label) is skipped;
one at the same position with the other label is a conflict, reported as a problem.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cellspot.importers.csvtools import (
    NO_ROWS,
    CsvFormatError,
    csv_records,
    joined_problem,
    line_break_problem,
    normalise_header,
    outside_reason,
    parse_label,
    parse_number,
    repeated_columns,
    separator_hint,
)
from cellspot.importers.errors import GoldImportError, ImportProblem
from cellspot.names import ImageNames

log = logging.getLogger(__name__)

GOLD_REQUIRED = ("image", "x", "y", "label")
GOLD_LABELS = {"alive": "alive", "dead": "dead"}
_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class GoldRow:
    """One valid gold cell of the file, in image pixels."""

    image: str
    x: float
    y: float
    label: str
    line: int


@dataclass
class GoldImportReport:
    """What :func:`import_gold` did: ``imported + already_present == rows`` in the file."""

    source: str
    rows: int
    imported: int
    already_present: int

    def summary(self) -> str:
        return (
            f"{self.source}: {self.rows} gold cell(s): {self.imported} imported, "
            f"{self.already_present} already present"
        )


def parse_gold_csv(path: str | Path) -> tuple[list[GoldRow], list[ImportProblem]]:
    """Parse ``image,x,y,label``; returns valid rows and problems (file, line, field, reason)."""
    path = Path(path)
    label = str(path)
    records = csv_records(path)
    rows: list[GoldRow] = []
    problems: list[ImportProblem] = []
    try:
        first = next(records, None)
        if first is None:
            return [], [ImportProblem(label, "the file is empty", 1)]
        header = normalise_header(first[1])
        missing = [c for c in GOLD_REQUIRED if c not in header]
        if missing:
            reason = f"missing column; required: {', '.join(GOLD_REQUIRED)}"
            hint = separator_hint(header)  # once, on the first
            return [], [ImportProblem(label, reason + (hint if k == 0 else ""), first[0], c)
                        for k, c in enumerate(missing)]
        repeated = repeated_columns(header)
        if repeated:
            return [], [ImportProblem(label, reason, first[0], name) for name, reason in repeated]
        for line, fields in records:
            row, problem = _gold_row(dict(zip(header, fields + [""] * (len(header) - len(fields)))), line)
            if len(fields) > len(header):
                problem = ("row", f"{len(fields)} fields but the header has {len(header)}", None)
            problem = line_break_problem(header, fields, line) or problem
            if problem is not None:
                problems.append(ImportProblem(label, problem[1], line, problem[0], problem[2]))
            else:
                rows.append(row)
        if not rows and not problems:
            problems.append(ImportProblem(label, NO_ROWS, first[0] + 1))
    except CsvFormatError as exc:
        problems.append(ImportProblem(label, exc.reason))
    return rows, problems


def _gold_row(row: dict[str, str], line: int) -> tuple[GoldRow | None, tuple[str, str, str | None] | None]:
    image = row["image"].strip()
    if not image:
        return None, ("image", "missing value", None)
    coords, problems = [], []
    for name in ("x", "y"):
        value, reason = parse_number(row[name], name)
        if reason is not None:
            problems.append((name, reason, row[name]))
        coords.append(value)
    label, reason = parse_label(row["label"], GOLD_LABELS)
    if reason is not None:
        problems.append(("label", reason, row["label"]))
    if problems:
        return None, joined_problem(problems)
    return GoldRow(image, coords[0], coords[1], label, line), None


def import_gold(session: Any, project: Any, path: str | Path, source: str | None = None) -> GoldImportReport:
    """Import gold cells into ``project`` (a Project or its name; caller-owned ``session``; flushes, never commits).

    ``source`` is stored on each cell (default ``"import:<file name>"``). Raises
    :class:`GoldImportError` listing every problem; then nothing is written.
    """
    from sqlalchemy import insert

    from cellspot.importers import _store
    from cellspot.store.models import GoldCell, utcnow

    from cellspot.store.queries import as_project

    project = as_project(session, project)  # a name, from the Python API
    path = Path(path)
    rows, problems = parse_gold_csv(path)
    images = _store.project_images(session, project)
    names = ImageNames(images)
    placed: list[tuple[int, GoldRow]] = []
    for row in rows:
        target, alike = names.match(row.image)
        if alike:
            problems.append(ImportProblem(str(path), names.reason(row.image, alike, ""), row.line, "image", row.image))
            continue
        row = replace(row, image=target) if target is not None else row  # "a" for "a.png", as metadata CSVs
        problem = _place(row, images.get(row.image), project.name, not images)
        if problem is None:
            placed.append((images[row.image].id, row))
        else:
            problems.append(ImportProblem(str(path), problem[1], row.line, problem[0], problem[2]))
    existing = _stored_cells(session, sorted({image_id for image_id, _ in placed}))
    new_cells = []
    for image_id, row in placed:
        key = (image_id, round(row.x, _DECIMALS), round(row.y, _DECIMALS))
        if key not in existing:
            existing[key] = (row.label, row.line)
            new_cells.append({"image_id": image_id, "x": row.x, "y": row.y, "label": row.label})
        elif existing[key][0] != row.label:
            label, line = existing[key]
            where = f"line {line}" if line else "the store"
            reason = f"a gold cell labelled {label!r} is at the same position in {where}"
            problems.append(ImportProblem(str(path), reason, row.line, "label", row.label))
    if problems:
        raise GoldImportError(path, sorted(problems, key=lambda p: p.line or 0))
    _enlarge_lower_bounds(images, [row for _, row in placed])
    for name in {row.image for _, row in placed}:
        images[name].expert_empty = False  # it has expert cells now, not an expert's "no cells"
    if new_cells:
        extra = {"source": (source or f"import:{path.name}")[:500], "annotator_id": None, "created_at": utcnow()}
        session.execute(insert(GoldCell), [{**cell, **extra} for cell in new_cells])
    report = GoldImportReport(str(path), len(rows), len(new_cells), len(rows) - len(new_cells))
    log.info("%s", report.summary())
    return report


def _enlarge_lower_bounds(images: dict[str, Any], rows: list[GoldRow]) -> None:
    """Grow the size of pixel-less images sized by their clicks (a lower bound) to hold the
    cells of ``rows``, as later clicks would (``floor(max x) + 1`` by ``floor(max y) + 1``)."""
    from cellspot.importers._store import size_is_lower_bound

    for row in rows:
        image = images[row.image]
        if size_is_lower_bound(image):
            image.width = max(int(image.width), math.floor(row.x) + 1)
            image.height = max(int(image.height), math.floor(row.y) + 1)


def _stored_cells(session: Any, image_ids: list[int]) -> dict[tuple[int, float, float], tuple[str, int | None]]:
    """Gold cells already stored on ``image_ids``: (image_id, x, y) rounded -> (label, None)."""
    from sqlalchemy import select

    from cellspot.importers._store import SQL_CHUNK
    from cellspot.store.models import GoldCell

    cells: dict[tuple[int, float, float], tuple[str, int | None]] = {}
    for start in range(0, len(image_ids), SQL_CHUNK):
        chunk = image_ids[start:start + SQL_CHUNK]
        stmt = select(GoldCell.image_id, GoldCell.x, GoldCell.y, GoldCell.label).where(
            GoldCell.image_id.in_(chunk)
        )
        for image_id, x, y, label in session.execute(stmt):
            cells[(image_id, round(x, _DECIMALS), round(y, _DECIMALS))] = (label, None)
    return cells


def _place(row: GoldRow, image: Any, project: str, no_images: bool) -> tuple[str, str, str | None] | None:
    from cellspot.importers._store import size_is_lower_bound

    if image is None:
        hint = " (it has no images at all: is it the right --project?)" if no_images else ""
        return ("image", f"no image named {row.image!r} in project {project!r}{hint}; import the images first",
                row.image)
    if size_is_lower_bound(image):  # a size guessed from clicks: a cell beyond it enlarges it
        return None
    for name, value, limit in (("x", row.x, image.width), ("y", row.y, image.height)):
        reason = outside_reason(name, value, limit, f"image {row.image!r} ({image.width}x{image.height})")
        if reason is not None:
            return name, reason, str(value)
    return None

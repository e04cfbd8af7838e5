"""Problems found while importing, and the exceptions that carry them."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class ImportProblem:
    """One thing that could not be imported.

    ``file``: the input file (``archive.zip::member`` for zip members); ``line``: 1-based
    physical line of a CSV (the header is line 1), ``None`` when not about a line;
    ``field``: the column or item at fault (e.g. ``"x"``, ``"alive_array[3]"``);
    ``value``: the offending raw text, when there is one.
    """

    file: str
    reason: str
    line: int | None = None
    field: str | None = None
    value: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


def format_problems(problems: Sequence[ImportProblem], limit: int = MAX_LISTED_PROBLEMS) -> str:
    """``file:line: field: reason`` lines for the first ``limit`` problems, plus a count of the rest."""
    lines = [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def write_problems_csv(problems: Sequence[ImportProblem], path: Path) -> Path:
    """Write ``problems`` to ``path`` (columns file,line,field,reason,value); returns ``path``.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "line", "field", "reason", "value"])
        for p in problems:
            writer.writerow([p.file, "" if p.line is None else p.line, p.field or "", p.reason, p.value or ""])
    tmp.replace(path)
    return path


class CellspotImportError(Exception):
    """Base class of importer errors; ``problems`` lists what was wrong, where."""

    def __init__(self, message: str, problems: Sequence[ImportProblem] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message)


def _listing(summary: str, problems: Sequence[ImportProblem]) -> str:
    return f"{summary}\n{format_problems(problems)}" if problems else summary


class ImageImportError(CellspotImportError):
    """The image import cannot start (e.g. a metadata CSV without an ``image`` column)."""


class ClickImportError(CellspotImportError):
    """A click file was rejected; nothing was written. The message lists ``file:line: field: reason``."""

    def __init__(self, source: str | Path, problems: Sequence[ImportProblem], hint: str = "") -> None:
        summary = f"{source}: {len(problems)} problem(s); nothing was imported"
        if hint:
            summary += f" ({hint})"
        super().__init__(_listing(summary, problems), problems)
        self.source = str(source)


class GoldImportError(CellspotImportError):
    """A gold-cell file was rejected; nothing was written. The message lists ``file:line: field: reason``."""

    def __init__(self, source: str | Path, problems: Sequence[ImportProblem]) -> None:
        summary = f"{source}: {len(problems)} problem(s); no gold cell was imported"
        super().__init__(_listing(summary, problems), problems)
        self.source = str(source)

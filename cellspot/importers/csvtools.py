"""Small shared helpers for the CSV importers: physical line numbers, numbers, labels."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LABEL_ALIASES: dict[str, str] = {
    "alive": "alive",
    "dead": "dead",
    "not_sure": "not_sure",
    "not_sure_alive": "not_sure",
    "not sure": "not_sure",
}
"""Accepted click labels (lower-cased, stripped) -> stored label."""


#: the problem of a file that is only a header (an empty project is not created for it)
NO_ROWS = "the file has a header but no rows: nothing to import"


class CsvFormatError(ValueError):
    """The file is not a readable CSV (bad encoding, NUL bytes, broken quoting).

    ``str(error)`` starts with the file; ``reason`` says what was wrong without it.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def csv_records(path: Path, *, skip_empty_fields: bool = True) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, fields)`` for every non-blank record of ``path``; the header comes first.

    ``line`` is the 1-based physical line where the record starts (the header is line 1),
    also for records whose quoted fields span several lines. Empty lines are skipped, and so
    are records whose fields are all blank (``,,,``) unless ``skip_empty_fields`` is false
    (pyarrow's reader keeps those). Raises :class:`CsvFormatError`.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            end_of_previous = 0
            for fields in reader:
                start = end_of_previous + 1
                end_of_previous = reader.line_num
                if fields and (not skip_empty_fields or any(f.strip() for f in fields)):
                    yield start, fields
    except UnicodeDecodeError as exc:
        raise CsvFormatError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise CsvFormatError(path, f"not a readable CSV: {exc}") from exc


def csv_content_sha256(path: Path) -> str:
    """SHA-256 of the records of a CSV as :func:`csv_records` reads them, so the same table
    saved with other line endings, a byte-order mark or other quoting has the same digest.
    Raises :class:`CsvFormatError`."""
    import hashlib
    import json

    digest = hashlib.sha256()
    for _line, fields in csv_records(path):
        digest.update(json.dumps(fields, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def normalise_header(fields: list[str]) -> list[str]:
    """Column names stripped and lower-cased."""
    return [f.strip().lower() for f in fields]


def separator_hint(header: list[str]) -> str:
    """``"; ..."`` advice when a header that lacks required columns is one column holding ``;``
    or a tab (a file saved with another separator), else ``""``."""
    if len(header) == 1:
        for mark, name in ((";", "semicolons"), ("\t", "tabs")):
            if mark in header[0]:
                return f"; the header is one column: the file seems separated by {name}; save it with commas"
    return ""


def repeated_columns(header: list[str]) -> list[tuple[str, str]]:
    """``(column, reason)`` for every non-empty column name the header has twice or more
    (``image,x,y,x``: which ``x`` holds the value?)."""
    positions: dict[str, list[int]] = {}
    for k, name in enumerate(header, start=1):
        if name:
            positions.setdefault(name, []).append(k)
    return [(name, f"the header has column {name!r} {len(where)} times (columns {', '.join(map(str, where))}); "
                   "keep one") for name, where in positions.items() if len(where) > 1]


def line_break_problem(header: list[str], fields: list[str], line: int) -> tuple[str, str, str] | None:
    """``(field, reason, value)`` when a field of a record holds a line break: in these files
    that is a quote opened and never closed, which swallows the lines after it into one field."""
    for k, value in enumerate(fields):
        if "\n" not in value and "\r" not in value:
            continue
        inner = value.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")  # a field left open at the end
        breaks = max(1, inner.count("\n"))  # holds the file's last line break too
        if breaks:
            name = header[k] if k < len(header) else f"column {k + 1}"
            return (name, f"a quoted field runs over lines {line}-{line + breaks}: a quote (\") opened on "
                          f"line {line} is not closed, so the {breaks} line(s) after it were read into this "
                          "field; close or remove the quote", value[:80])
    return None


#: the largest pixel coordinate or image side a file may give (a whole-slide scan is ~100,000
#: px wide); anything larger is a typo or a unit error, and would overflow the store's integers
MAX_PIXEL_VALUE = 1_000_000


def parse_number(text: str, field: str) -> tuple[float | None, str | None]:
    """``(value, None)`` for a finite number within +-:data:`MAX_PIXEL_VALUE` (every number these
    files hold is a pixel coordinate or an image side), else ``(None, reason)``."""
    raw = text.strip()
    if not raw:
        return None, "missing value"
    try:
        value = float(raw)
    except ValueError:
        return None, f"{field}={raw!r} is not a number"
    if math.isnan(value):
        return None, f"{field} is NaN"
    if math.isinf(value):
        return None, f"{field}={raw} is not finite"
    if abs(value) > MAX_PIXEL_VALUE:
        return None, f"{field}={value:g} is beyond {MAX_PIXEL_VALUE:,} px, more than any image has"
    return value, None


def parse_label(text: object, allowed: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """``(stored_label, None)`` for a known label, else ``(None, reason)`` listing the allowed ones."""
    aliases = LABEL_ALIASES if allowed is None else allowed
    if not isinstance(text, str):
        return None, f"label {text!r} is not text; allowed: {', '.join(aliases)}"
    if not text.strip():
        return None, "missing value"
    label = aliases.get(text.strip().lower())
    if label is None:
        return None, f"unknown label {text.strip()!r}; allowed: {', '.join(aliases)}"
    return label, None


def outside_reason(field: str, value: float, limit: int, what: str) -> str | None:
    """``None`` when ``0 <= value < limit``, else why ``value`` is outside ``what``."""
    if 0 <= value < limit:
        return None
    shown = int(value) if float(value).is_integer() else value
    return f"{field}={shown} is outside {what} (allowed 0 <= {field} < {limit})"


def data_record_line(path: Path, index: int) -> int | None:
    """The physical line where data record ``index`` (0-based, after the header) of ``path``
    starts, counting records as pyarrow's CSV reader does (empty lines skipped); ``None`` when
    the file has fewer records or cannot be read. For error messages of pyarrow-read files."""
    try:
        for position, (line, _) in enumerate(csv_records(path, skip_empty_fields=False)):
            if position == index + 1:
                return line
    except CsvFormatError:
        return None
    return None


def joined_problem(problems: list[tuple[str, str, Any]]) -> tuple[str, str, Any] | None:
    """The ``(field, reason, value)`` problems of one CSV row as one: ``None`` for none, the
    problem itself for one, else fields ``"x, label"`` and ``"field: reason"`` parts joined
    with ``"; "``, so one reject per row still shows everything wrong with it."""
    if len(problems) <= 1:
        return problems[0] if problems else None
    return (", ".join(p[0] for p in problems), "; ".join(f"{p[0]}: {p[1]}" for p in problems),
            ", ".join(str(p[2]) for p in problems))

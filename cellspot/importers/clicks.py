"""Import crowd clicks: a tidy click CSV, or the legacy Cell Spotting / PyBossa task-run export.

Parsing (:func:`parse_tidy_csv`, :func:`parse_pybossa_taskruns`) is pure: a file in,
validated runs and clicks plus rejects (file, line, field, reason) out. :func:`import_clicks`
adds the checks that need the store (image sizes), then writes everything in bulk or nothing.

Rules (documented here because they decide what is stored):

* **Runs.** PyBossa: every data row is one task run and its own anonymous annotator
  (nickname ``pybossa-run-<row index>``, 0-based, role ``imported``, class code
  ``pybossa-<first 12 hex of the file's sha256>`` so runs of different files never merge;
  an ``id`` / ``user_id`` column, when a richer export has one, names the run / annotator).
  Tidy CSV: rows with the same ``task_run`` form one run; without ``task_run`` each
  annotator x image is one run. Annotators are (nickname, class code ``""``), role
  ``imported`` when new. A tidy row whose ``x``, ``y`` and ``label`` are all empty records a
  run that saw the image and marked nothing.
* **Coordinates.** PyBossa clicks are in the 524x391 display frame. A new image gets a
  pixel-less record of 524x391, so clicks are stored unchanged; for an image already in the
  store at another size, clicks are scaled ``x * width / 524``, ``y * height / 391`` (the
  same aspect ratio; the canvas' 5 px CSS offset is not corrected, it was never verified).
  Tidy CSV clicks are in image pixels: an image in the store keeps its size; a new one gets
  the file's ``width``/``height`` columns when given, else the smallest frame holding its
  clicks, ``floor(max x) + 1`` by ``floor(max y) + 1``, marked in ``Image.meta`` as a lower
  bound (``size_from: clicks``): later click files may enlarge it (or size it exactly with
  their columns), and ``cellspot import images`` attaches a file at least that large.
* **Validation.** ``0 <= x < width``, ``0 <= y < height``, finite numbers, labels alive /
  dead / not_sure (``not_sure_alive`` and ``not sure`` mean not_sure). One reject per click
  (one per row that cannot be split into clicks), naming every bad field of its row. A
  click that repeats an earlier one of its run exactly is imported and reported. By default
  any reject fails the whole file and nothing is written; with ``skip_invalid`` the valid
  clicks are imported, the rejects go to a CSV under ``settings.rejects_dir``, and a run
  whose clicks were all rejected is dropped.
* **Idempotence.** ``client_key = "import:p<project id>:<sha256 of file>:<run id>"``:
  re-importing the same file into the same project finds every run present and writes
  nothing; importing it into another project imports it there too. A tidy file's run that
  another file imported before (same run id, image and annotator: a corrected or extended
  copy of that file) is already present when its clicks are the same; with other clicks the
  import is refused, or with ``replace_runs`` the earlier run is replaced, so a student's
  run is never stored twice.
"""

from __future__ import annotations

import ast
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from cellspot.imaging import IMAGE_SUFFIXES, sha256_file
from cellspot.importers.csvtools import (
    NO_ROWS,
    CsvFormatError,
    csv_content_sha256,
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
from cellspot.importers.errors import ClickImportError, ImportProblem, write_problems_csv
from cellspot.names import has_control_character
from cellspot.store.models import IMAGE_NAME_MAX, NICKNAME_MAX

log = logging.getLogger(__name__)

PYBOSSA_FRAME = (524, 391)
"""(width, height) of the Cell Spotting click canvas."""
TIDY_REQUIRED = ("image", "annotator", "x", "y", "label")
TIDY_OPTIONAL = ("task_run", "timestamp", "width", "height")
PYBOSSA_REQUIRED = ("alive_array", "task")
IMPORTED_ROLE = "imported"
_CLIENT_KEY_MAX = 200


@dataclass(slots=True)
class ParsedRun:
    """One task run of a click file: ``key`` is unique within the file (used in the client key)."""

    key: str
    image: str
    annotator: str
    class_code: str
    line: int
    n_source_clicks: int = 0
    started_at: datetime | None = None
    submitted_at: datetime | None = None


@dataclass(slots=True)
class ParsedClick:
    """One valid click: ``x``, ``y`` in the file's frame (see :attr:`ParsedClicks.frame`)."""

    run: str
    x: float
    y: float
    label: str
    click_index: int
    line: int


@dataclass
class ParsedClicks:
    """A parsed click file.

    ``frame``: (width, height) the coordinates are in, or ``None`` when they are image pixels.
    ``declared_sizes``: image name -> (width, height) from the tidy ``width``/``height`` columns.
    ``n_records``: clicks in the file (a row that cannot be split into clicks counts once);
    every record is either in ``clicks`` or in ``rejects``.
    """

    source: Path
    format: str
    sha256: str
    frame: tuple[int, int] | None
    runs: dict[str, ParsedRun] = field(default_factory=dict)
    clicks: list[ParsedClick] = field(default_factory=list)
    earlier_sha256: tuple[str, ...] = ()
    """other digests an earlier version of cellspot gave this file (its raw bytes' SHA-256,
    where ``sha256`` is now that of its records): runs stored under them are present"""
    rejects: list[ImportProblem] = field(default_factory=list)
    declared_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    n_records: int = 0

    def reject(self, line: int, field_name: str, reason: str, value: object = None) -> None:
        text = None if value is None else str(value)[:200]
        self.rejects.append(ImportProblem(str(self.source), reason, line, field_name, text))


@dataclass
class ClickImportReport:
    """What :func:`import_clicks` did. ``imported + rejected + already_present + skipped == records``."""

    source: str
    format: str
    sha256: str
    records: int
    imported: int
    rejected: int
    already_present: int
    runs_imported: int
    runs_already_present: int
    runs_dropped: int
    images_created: int
    annotators_created: int
    rejects_path: Path | None = None
    runs_replaced: int = 0
    """runs imported before from another file with other clicks, replaced by this file's
    (``replace_runs``); they count in ``runs_imported``"""
    runs_kept: int = 0
    """runs imported before from another file whose copy here has rejected rows: the stored run
    is kept as it is and this file's copy is not imported (a partial copy never replaces it)"""
    skipped: int = 0
    """valid clicks of those kept runs, not imported (``imported + rejected + already_present +
    skipped == records``)"""
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    """(line, line of the click it repeats) of every imported click that repeats an earlier one of
    its run exactly (same x, y and label); they are imported as they are, this only reports them."""

    def summary(self) -> str:
        text = (
            f"{self.source} ({self.format}): {self.records} clicks: {self.imported} imported, "
            f"{self.rejected} rejected, {self.already_present} already present; runs: "
            f"{self.runs_imported} imported{f' ({self.runs_replaced} replacing earlier imports)' if self.runs_replaced else ''}, "
            f"{self.runs_already_present} already present, "
            f"{self.runs_dropped} dropped"
            f"{f', {self.runs_kept} kept as stored ({self.skipped} valid click(s) of their copies here not imported: those copies have rejected rows)' if self.runs_kept else ''}"
            f"; {self.images_created} image record(s) and "
            f"{self.annotators_created} annotator(s) created"
        )
        if self.duplicates:
            line, first = self.duplicates[0]
            where = (f"line {line} (an earlier click of the same row)" if line == first  # a PyBossa row is a run
                     else f"line {line} (repeats line {first})")
            text += (f"; warning: {len(self.duplicates)} click(s) repeat an earlier click of the same run "
                     f"exactly (same x, y and label; kept), the first on {where}")
        return text


# --------------------------------------------------------------------------- parsing


def _open_table(path: Path, required: Iterable[str]) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Header (normalised) and the record iterator; file-level problems raise ClickImportError."""
    records = csv_records(path)
    try:
        first = next(records, None)
    except CsvFormatError as exc:
        raise ClickImportError(path, [ImportProblem(str(path), exc.reason)]) from exc
    if first is None:
        raise ClickImportError(path, [ImportProblem(str(path), "the file is empty", 1)])
    header = normalise_header(first[1])
    repeated = repeated_columns(header)
    if repeated:
        raise ClickImportError(path, [ImportProblem(str(path), reason, first[0], name) for name, reason in repeated])
    missing = [c for c in required if c not in header]
    if missing:
        hint = separator_hint(header)
        problems = [  # the separator hint once, on the first
            ImportProblem(str(path), f"missing column; required: {', '.join(required)}{hint if k == 0 else ''}",
                          first[0], c)
            for k, c in enumerate(missing)
        ]
        raise ClickImportError(path, problems)
    return header, _guarded(path, records)


def _guarded(path: Path, records: Iterator[tuple[int, list[str]]]) -> Iterator[tuple[int, list[str]]]:
    try:
        yield from records
    except CsvFormatError as exc:
        raise ClickImportError(path, [ImportProblem(str(path), exc.reason)]) from exc


def _row_dict(parsed: ParsedClicks, header: list[str], line: int, fields: list[str]) -> dict[str, str] | None:
    if len(fields) > len(header):
        parsed.n_records += 1
        parsed.reject(line, "row", f"{len(fields)} fields but the header has {len(header)}")
        return None
    return dict(zip(header, fields + [""] * (len(header) - len(fields)), strict=True))


def parse_tidy_csv(path: str | Path) -> ParsedClicks:
    """Parse a tidy click CSV ``image,annotator,x,y,label[,task_run,timestamp,width,height]``.

    Coordinates are image pixels. ``timestamp`` is ISO 8601 (naive means UTC). Raises
    :class:`ClickImportError` for file-level problems (unreadable, empty, missing column).
    """
    path = Path(path)
    header, records = _open_table(path, TIDY_REQUIRED)
    parsed = ParsedClicks(path, "csv", sha256_file(path), frame=None)
    size_lines: dict[str, int] = {}
    for line, fields in records:
        broken = line_break_problem(header, fields, line)
        if broken is not None:
            parsed.n_records += 1
            parsed.reject(line, *broken)
            continue
        row = _row_dict(parsed, header, line, fields)
        if row is not None:
            _tidy_row(parsed, row, line, size_lines)
    return parsed


def _tidy_row(parsed: ParsedClicks, row: dict[str, str], line: int, size_lines: dict[str, int]) -> None:
    image, annotator = row["image"].strip(), row["annotator"].strip()
    marker = not (row["x"].strip() or row["y"].strip() or row["label"].strip())
    if not marker:
        parsed.n_records += 1
    row_problems = _name_problems(image, annotator)
    size, size_problem = (None, None) if row_problems else _declared_size(parsed, row, image, line, size_lines)
    row_problems += [size_problem] if size_problem is not None else []
    timestamp = None
    if row.get("timestamp", "").strip():
        timestamp, reason = _parse_timestamp(row["timestamp"])
        if reason:
            row_problems.append(("timestamp", reason, row["timestamp"]))
    run_problem = None
    if not row_problems:
        run_key = row.get("task_run", "").strip() or f"{annotator}@{image}"
        run, run_problem = _tidy_run(parsed, run_key, image, annotator, line)
        row_problems += [run_problem] if run_problem is not None else []
    if row_problems:  # with the click's own problems: every bad field of the row in one reject
        bounds = size if run_problem is None else None  # the image bounds are checked for an accepted run only
        click_problems = [] if marker else _click_fields(row, bounds)[2]
        parsed.reject(line, *joined_problem([*row_problems, *click_problems]))
        return
    if timestamp is not None:
        run.started_at = min(run.started_at or timestamp, timestamp)
        run.submitted_at = max(run.submitted_at or timestamp, timestamp)
    if marker:
        return
    click, problem = _tidy_click(row, size)
    run.n_source_clicks += 1
    if problem is not None:
        parsed.reject(line, *problem)
        return
    x, y, label = click
    parsed.clicks.append(ParsedClick(run.key, x, y, label, run.n_source_clicks - 1, line))


def _name_problems(image: str, annotator: str) -> list[tuple[str, str, Any]]:
    """Problems of a row's image and annotator names: missing, longer than the store takes, or
    holding control characters (a NUL, which PostgreSQL refuses, a tab, a line break)."""
    problems = []
    for name, value, limit in (("image", image, IMAGE_NAME_MAX), ("annotator", annotator, NICKNAME_MAX)):
        if not value:
            problems.append((name, "missing value", None))
        elif len(value) > limit:
            problems.append((name, f"{len(value)} characters; at most {limit} are allowed", value[:60] + "..."))
        elif has_control_character(value):
            problems.append((name, "holds a control character (a NUL byte, a tab or a line break)", repr(value)))
    return problems


def _declared_size(
    parsed: ParsedClicks, row: dict[str, str], image: str, line: int, size_lines: dict[str, int]
) -> tuple[tuple[int, int] | None, tuple[str, str, Any] | None]:
    if not (row.get("width", "").strip() or row.get("height", "").strip()):
        return parsed.declared_sizes.get(image), None
    values, problems = [], []
    for name in ("width", "height"):
        value, reason = parse_number(row.get(name, ""), name)
        if reason is None and (value < 1 or not float(value).is_integer()):
            reason = f"{name}={row[name].strip()} is not a positive whole number"
        if reason is not None:
            problems.append((name, reason, row.get(name)))
        else:
            values.append(int(value))
    if problems:  # both sides' problems at once
        return None, joined_problem(problems)
    size = (values[0], values[1])
    known = parsed.declared_sizes.setdefault(image, size)
    size_lines.setdefault(image, line)
    if known != size:
        return None, (
            "width",
            f"image {image!r} is {size[0]}x{size[1]} here but {known[0]}x{known[1]} on line "
            f"{size_lines[image]}",
            f"{size[0]}x{size[1]}",
        )
    return size, None


def _tidy_click(
    row: dict[str, str], size: tuple[int, int] | None
) -> tuple[tuple[float, float, str] | None, tuple[str, str, Any] | None]:
    """The click of a row, or every bad field of it as one problem (``"x, label"``, reasons joined
    with ``"; "``), so that one pass over the rejects shows all that is wrong with a row."""
    coords, label, problems = _click_fields(row, size)
    if problems:
        return None, joined_problem(problems)
    return (coords[0], coords[1], label), None


def _click_fields(
    row: dict[str, str], size: tuple[int, int] | None
) -> tuple[list[float | None], str | None, list[tuple[str, str, Any]]]:
    """``(coords, label, problems)`` of a row's click fields (``size``: the image's, for the bounds)."""
    coords, problems = [], []
    for index, name in enumerate(("x", "y")):
        value, reason = parse_number(row[name], name)
        if reason is None and size is not None:
            reason = outside_reason(name, value, size[index], f"the image ({size[0]}x{size[1]})")
        if reason is None and value < 0:
            reason = f"{name}={value:g} is negative (allowed {name} >= 0)"
        if reason is not None:
            problems.append((name, reason, row[name]))
        coords.append(value)
    label, reason = parse_label(row["label"])
    if reason is not None:
        problems.append(("label", reason, row["label"]))
    return coords, label, problems


def _tidy_run(
    parsed: ParsedClicks, key: str, image: str, annotator: str, line: int
) -> tuple[ParsedRun | None, tuple[str, str, Any] | None]:
    run = parsed.runs.get(key)
    if run is None:
        run = parsed.runs[key] = ParsedRun(key, image, annotator, "", line)
    elif (run.image, run.annotator) != (image, annotator):
        return None, (
            "task_run",
            f"task_run {key!r} is image {run.image!r} by {run.annotator!r} on line {run.line}; "
            "one run covers one image and one annotator",
            key,
        )
    return run, None


def _parse_timestamp(text: str) -> tuple[datetime | None, str | None]:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None, f"timestamp {text.strip()!r} is not ISO 8601 (e.g. 2014-03-01T10:15:00Z)"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value, None


def parse_pybossa_taskruns(path: str | Path) -> ParsedClicks:
    """Parse a Cell Spotting / PyBossa task-run export (``alive_array``, ``task`` columns).

    ``alive_array`` holds a Python literal list of ``[label, x, y]`` in the 524x391 frame;
    the image name is the last path component of ``task`` plus ``.jpg`` (unless it already
    ends with an image suffix). Raises :class:`ClickImportError` for file-level problems.
    """
    path = Path(path)
    header, records = _open_table(path, PYBOSSA_REQUIRED)
    # Its rows are anonymous (the export has no run id), so a run is known by the file's
    # digest: that of its records, so the same export saved with other line endings or a
    # byte-order mark is the same file (it was imported twice when the digest was the bytes').
    try:
        sha = csv_content_sha256(path)
    except CsvFormatError as exc:
        raise ClickImportError(path, [ImportProblem(str(path), exc.reason)]) from exc
    raw = sha256_file(path)
    parsed = ParsedClicks(path, "pybossa", sha, frame=PYBOSSA_FRAME, earlier_sha256=(raw,) if raw != sha else ())
    class_code = f"pybossa-{sha[:12]}"
    for row_index, (line, fields) in enumerate(records):
        row = _row_dict(parsed, header, line, fields)
        if row is not None:
            _pybossa_row(parsed, row, row_index, line, class_code)
    return parsed


def _pybossa_row(parsed: ParsedClicks, row: dict[str, str], row_index: int, line: int, class_code: str) -> None:
    items, reason = _literal_list(row["alive_array"])
    if reason is not None:
        parsed.n_records += 1
        parsed.reject(line, "alive_array", reason, row["alive_array"])
        return
    parsed.n_records += len(items)
    image = _image_name_from_link(row["task"])
    run_key = row.get("id", "").strip() or str(row_index)
    if not image or run_key in parsed.runs:
        reason = "missing value" if not image else f"run id {run_key!r} repeats line {parsed.runs[run_key].line}"
        field_name = "task" if not image else "id"
        for _ in items or [None]:
            parsed.reject(line, field_name, reason, row.get(field_name))
        return
    user = row.get("user_id", "").strip()
    nickname = f"pybossa-user-{user}" if user else f"pybossa-run-{row_index}"
    run = parsed.runs[run_key] = ParsedRun(run_key, image, nickname, class_code, line, len(items))
    width, height = PYBOSSA_FRAME
    for index, item in enumerate(items):
        click, reason = _pybossa_item(item, width, height)
        if reason is not None:
            parsed.reject(line, f"alive_array[{index}]", reason, item)
        else:
            parsed.clicks.append(ParsedClick(run.key, click[1], click[2], click[0], index, line))


def _literal_list(text: str) -> tuple[list[Any], str | None]:
    raw = text.strip()
    if not raw:
        return [], "missing value"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        return [], f"malformed literal ({type(exc).__name__}: {exc}); expected [[label, x, y], ...]"
    if not isinstance(value, (list, tuple)):
        return [], f"malformed literal: a {type(value).__name__}, expected a list of [label, x, y]"
    return list(value), None


def _pybossa_item(item: Any, width: int, height: int) -> tuple[tuple[str, float, float] | None, str | None]:
    if not isinstance(item, (list, tuple)) or len(item) != 3:
        return None, f"expected [label, x, y], got {item!r}"
    label, reason = parse_label(item[0])
    if reason is not None:
        return None, reason
    coords = []
    for name, value, limit in (("x", item[1], width), ("y", item[2], height)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, f"{name}={value!r} is not a number"
        if not math.isfinite(value):
            return None, f"{name}={value} is not finite"
        reason = outside_reason(name, value, limit, f"the {width}x{height} display frame")
        if reason is not None:
            return None, reason
        coords.append(float(value))
    return (label, coords[0], coords[1]), None


def _image_name_from_link(link: str) -> str:
    name = PurePosixPath(urlsplit(link.strip()).path).name
    if not name:
        return ""
    return name if name.lower().endswith(IMAGE_SUFFIXES) else f"{name}.jpg"


# --------------------------------------------------------------------------- format registry

PARSERS = {"csv": parse_tidy_csv, "pybossa": parse_pybossa_taskruns}
"""Click file formats: name -> parser. ``auto`` picks one from the header."""


def detect_format(path: str | Path) -> str:
    """``"pybossa"`` when the header has ``alive_array``, ``"csv"`` when it has the tidy columns."""
    path = Path(path)
    header, _ = _open_table(path, ())
    if all(c in header for c in PYBOSSA_REQUIRED):
        return "pybossa"
    if all(c in header for c in TIDY_REQUIRED):
        return "csv"
    # a header that has some columns of one format: name the columns that are missing
    for required in (TIDY_REQUIRED, PYBOSSA_REQUIRED):
        if any(c in header for c in required):
            reason = f"missing column; required: {', '.join(required)}"
            raise ClickImportError(
                path, [ImportProblem(str(path), reason, 1, c) for c in required if c not in header]
            )
    raise ClickImportError(
        path,
        [ImportProblem(
            str(path),
            f"unknown click file format (columns: {', '.join(header)}); expected a tidy CSV "
            f"({','.join(TIDY_REQUIRED)}) or a PyBossa export ({', '.join(PYBOSSA_REQUIRED)})"
            f"{separator_hint(header)}",
            1,
        )],
    )


def parse_clicks(path: str | Path, format: str = "auto") -> ParsedClicks:  # noqa: A002 - CLI name
    """Parse ``path`` with the parser named ``format`` (``auto``, ``csv`` or ``pybossa``)."""
    if format == "auto":
        format = detect_format(path)  # noqa: A001
    if format not in PARSERS:
        raise ValueError(f"unknown click format {format!r}; allowed: auto, {', '.join(PARSERS)}")
    return PARSERS[format](path)


# --------------------------------------------------------------------------- import


def import_clicks(
    session: Any,
    project: Any,
    path: str | Path,
    format: str = "auto",  # noqa: A002 - matches the CLI option
    skip_invalid: bool = False,
    settings: Any = None,
    source_name: str | None = None,
    replace_runs: bool = False,
) -> ClickImportReport:
    """Import a click file into ``project`` (a Project or its name; caller-owned ``session``; flushes, never commits).

    Raises :class:`ClickImportError` (nothing written) when the file has any reject and
    ``skip_invalid`` is false, or when a run of a tidy file was imported before from another
    file with other clicks and ``replace_runs`` is false (with it, the earlier run and its
    clicks are replaced). ``source_name``: how the rejects file names the input (default
    its absolute path; the dashboard gives the uploaded file's name, as its copy is temporary).
    See the module docstring for the rules.
    """
    from cellspot.importers import _store
    from cellspot.settings import get_settings

    from cellspot.store.queries import as_project

    project = as_project(session, project)  # a name, from the Python API
    settings = settings or get_settings()
    parsed = parse_clicks(path, format)
    if not parsed.runs and not parsed.rejects:  # a typo'd --project would be left behind, empty
        raise ClickImportError(parsed.source, [ImportProblem(str(parsed.source), NO_ROWS, 2)])
    images = _store.project_images(session, project)
    sizes = _resolve_sizes(parsed, images)
    placed = _place_clicks(parsed, images, sizes.sizes)
    if parsed.rejects and not skip_invalid:
        raise ClickImportError(
            parsed.source, parsed.rejects, "skip_invalid / --skip-invalid imports the valid rows"
        )
    keys = {run.key: _client_key(project.id, parsed.sha256, run.key) for run in parsed.runs.values()}
    present = _store.existing_client_keys(session, list(keys.values()))
    for earlier_sha in parsed.earlier_sha256:
        old = {_client_key(project.id, earlier_sha, key): keys[key] for key in keys}
        present |= {old[k] for k in _store.existing_client_keys(session, list(old))}
    same, replaced, kept = _earlier_imports(session, project, parsed, placed, keys, present, images, replace_runs)
    plan = _plan(parsed, placed, keys, present | same, kept)
    if replaced:
        _store.delete_runs(session, replaced)
        log.info("replaced %d run(s) imported before from another file", len(replaced))
    created = _write(session, project, parsed, plan, keys, sizes, images)

    rejects_path = None
    if parsed.rejects:
        name = f"{parsed.source.stem}-{parsed.sha256[:12]}-rejects.csv"
        # the rejects file lives under CELLSPOT_HOME, far from the input: name the input absolutely
        source = source_name or str(parsed.source.resolve())
        rows = [replace(p, file=source) if p.file == str(parsed.source) else p for p in parsed.rejects]
        rejects_path = write_problems_csv(rows, Path(settings.rejects_dir) / name)
    report = ClickImportReport(
        source=str(parsed.source), format=parsed.format, sha256=parsed.sha256,
        records=parsed.n_records, imported=len(plan.clicks), rejected=len(parsed.rejects),
        already_present=plan.clicks_present, runs_imported=len(plan.runs),
        runs_already_present=len(present) + len(same), runs_dropped=plan.runs_dropped,
        runs_replaced=len(replaced), runs_kept=len(kept), skipped=plan.clicks_skipped,
        images_created=created[0], annotators_created=created[1], rejects_path=rejects_path,
        duplicates=duplicate_clicks(plan.clicks),
    )
    log.info("%s", report.summary())  # its duplicate warning is the caller's to show (once)
    if rejects_path is not None:
        log.info("%d rejected click(s) written with their reasons to %s", len(parsed.rejects), rejects_path)
    return report


def duplicate_clicks(clicks: Iterable[ParsedClick]) -> list[tuple[int, int]]:
    """(line, first line) of each click equal to an earlier one of its run (x, y, label): a file
    concatenated twice, or a row pasted again, shows up here."""
    first: dict[tuple[str, float, float, str], int] = {}
    out = []
    for click in clicks:
        key = (click.run, click.x, click.y, click.label)
        if key in first:
            out.append((click.line, first[key]))
        else:
            first[key] = click.line
    return out


def _earlier_imports(
    session: Any, project: Any, parsed: ParsedClicks, placed: list[ParsedClick], keys: dict[str, str],
    present: set[str], images: dict[str, Any], replace_runs: bool,
) -> tuple[set[str], list[int], set[str]]:
    """Runs of a tidy file that another file imported before (same run key, image and annotator:
    a corrected or extended copy of that file). Returns the client keys of those with the same
    clicks (already present), the ids of the stored runs to replace (``replace_runs``) and the
    client keys of those whose copy here lost rows to rejects (with ``skip_invalid``): the
    stored run is kept, as a partial copy must not replace it nor be stored beside it. Without
    ``replace_runs`` a complete run with other clicks raises :class:`ClickImportError`.

    PyBossa runs are not matched across files: they are anonymous rows of one export.
    """
    from cellspot.importers import _store

    if parsed.format != "csv":
        return set(), [], set()
    wanted = {_key_suffix(keys[run.key]): run for run in parsed.runs.values() if keys[run.key] not in present}
    ids = [images[run.image].id for run in wanted.values() if run.image in images]
    earlier = [row for row in _store.imported_runs(session, project, ids)
               if (run := wanted.get(_key_suffix(row[1]))) is not None
               and row[2] == images[run.image].id and row[3] == run.annotator]
    if not earlier:
        return set(), [], set()
    stored = _store.run_clicks(session, [row[0] for row in earlier])
    here: dict[str, list[tuple[float, float, str]]] = {}
    for click in placed:
        here.setdefault(click.run, []).append((click.x, click.y, click.label))
    same, replace_ids, kept, problems = set(), [], set(), []
    for run_id, key, _image_id, _nick, source in earlier:
        run = wanted[_key_suffix(key)]
        mine, theirs = here.get(run.key, []), stored[run_id]
        if len(mine) < run.n_source_clicks:
            kept.add(keys[run.key])
            log.info("%s line %d: run %r was imported before and some of its rows here are rejected: "
                     "the stored run is kept", parsed.source, run.line, run.key)
        elif sorted(mine) == sorted(theirs):
            same.add(keys[run.key])
        elif replace_runs:
            replace_ids.append(run_id)
        else:
            by_pair = run.key == f"{run.annotator}@{run.image}"  # no task_run column: annotator x image
            what = f"the run of {run.annotator!r} on {run.image!r}" if by_pair else f"task_run {run.key!r}"
            problems.append(ImportProblem(
                str(parsed.source), f"{what} was imported before (from {source.split(':', 2)[-1]}) with other "
                f"clicks ({len(theirs)} stored, {len(mine)} in this file)", run.line,
                "annotator" if by_pair else "task_run"))
    if problems:
        raise ClickImportError(parsed.source, problems,
                               "replace_runs / --replace-runs replaces the earlier runs with this file's")
    return same, replace_ids, kept


def _key_suffix(client_key: str) -> str:
    """The run part of an import client key (:func:`_client_key`), the same whatever the file."""
    return client_key.split(":", 3)[3]


@dataclass
class _Plan:
    runs: list[ParsedRun]
    clicks: list[ParsedClick]
    clicks_present: int
    runs_dropped: int
    clicks_skipped: int = 0


def _plan(parsed: ParsedClicks, placed: list[ParsedClick], keys: dict[str, str], present: set[str],
          kept: set[str] = frozenset()) -> _Plan:
    """Runs and clicks to write: new runs with a valid click, or that were empty in the source;
    not those already ``present`` nor those whose stored earlier import is ``kept``."""
    counts: dict[str, int] = {}
    for click in placed:
        counts[click.run] = counts.get(click.run, 0) + 1
    runs, dropped, clicks_present, skipped = [], 0, 0, 0
    for run in parsed.runs.values():
        if keys[run.key] in kept:
            skipped += counts.get(run.key, 0)
        elif keys[run.key] in present:
            clicks_present += counts.get(run.key, 0)
        elif counts.get(run.key) or not run.n_source_clicks:
            runs.append(run)
        else:
            dropped += 1
    wanted = {run.key for run in runs}
    return _Plan(runs, [c for c in placed if c.run in wanted], clicks_present, dropped, skipped)


def _write(
    session: Any, project: Any, parsed: ParsedClicks, plan: _Plan, keys: dict[str, str],
    sizes: _Sizes, images: dict[str, Any],
) -> tuple[int, int]:
    """Bulk-insert the plan's images, annotators, runs and clicks; returns (images, annotators) created."""
    from cellspot.importers import _store

    wanted = list(dict.fromkeys(r.image for r in plan.runs))
    for name in sorted(set(wanted) & set(sizes.resized)):
        image = images[name]
        image.width, image.height = sizes.resized[name]
        if name in sizes.exact:
            image.meta = {k: v for k, v in (image.meta or {}).items() if k != _store.SIZE_FROM_KEY}
    inferred_meta = {name: {_store.SIZE_FROM_KEY: _store.SIZE_FROM_CLICKS} for name in sizes.inferred}
    image_ids, images_created = _store.ensure_images(
        session, project, {name: sizes.sizes[name] for name in wanted}, images, inferred_meta
    )
    annotator_ids, annotators_created = _store.ensure_annotators(
        session, project, {(r.annotator, r.class_code) for r in plan.runs}, IMPORTED_ROLE
    )
    source = f"import:{parsed.format}:{parsed.source.name}"[:500]
    run_ids = _store.insert_runs(session, [
        {"image_id": image_ids[r.image], "annotator_id": annotator_ids[(r.annotator, r.class_code)],
         "client_key": keys[r.key], "source": source, "started_at": r.started_at,
         "submitted_at": r.submitted_at}
        for r in plan.runs
    ])
    _store.insert_clicks(session, [
        {"task_run_id": run_ids[keys[c.run]], "click_index": c.click_index, "x": c.x, "y": c.y,
         "label": c.label}
        for c in plan.clicks
    ])
    return images_created, annotators_created


@dataclass
class _Sizes:
    """Image sizes for one import: ``sizes`` of every image the file names; ``inferred``: new
    images sized by their clicks (a lower bound); ``resized``: stored lower-bound images that
    this file enlarges or sizes exactly (``exact`` names those sized by declared columns)."""

    sizes: dict[str, tuple[int, int]]
    inferred: set[str] = field(default_factory=set)
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)
    exact: set[str] = field(default_factory=set)


def _resolve_sizes(parsed: ParsedClicks, images: dict[str, Any]) -> _Sizes:
    """(width, height) of every image the file names: stored, declared, frame, or inferred.

    A stored pixel-less image whose size was inferred from earlier clicks is only a lower
    bound: a tidy file's declared size (if not smaller) replaces it, and clicks beyond it
    enlarge it.
    """
    from cellspot.importers._store import size_is_lower_bound

    extent: dict[str, tuple[float, float]] = {}
    for click in parsed.clicks:
        image = parsed.runs[click.run].image
        mx, my = extent.get(image, (0.0, 0.0))
        extent[image] = (max(mx, click.x), max(my, click.y))
    out = _Sizes({})
    for name in dict.fromkeys(run.image for run in parsed.runs.values()):
        stored = images.get(name)
        declared = parsed.declared_sizes.get(name)
        mx, my = extent.get(name, (0.0, 0.0))
        fit = (math.floor(mx) + 1, math.floor(my) + 1)
        if stored is not None and parsed.frame is None and size_is_lower_bound(stored):
            bound = (stored.width, stored.height)
            if declared is not None:
                grows = declared[0] >= bound[0] and declared[1] >= bound[1]
                size = declared if grows else bound  # smaller than the stored clicks: rejected later
                if grows:
                    out.exact.add(name)
            else:
                size = (max(bound[0], fit[0]), max(bound[1], fit[1]))
            if size != bound or name in out.exact:
                out.resized[name] = size
            out.sizes[name] = size
        elif stored is not None:
            out.sizes[name] = (stored.width, stored.height)
        elif parsed.frame is not None:
            out.sizes[name] = parsed.frame
        elif declared is not None:
            out.sizes[name] = declared
        else:
            out.sizes[name] = fit
            out.inferred.add(name)
    return out


def _place_clicks(
    parsed: ParsedClicks, images: dict[str, Any], sizes: dict[str, tuple[int, int]]
) -> list[ParsedClick]:
    """Clicks in image pixels: frame clicks scaled to the image; tidy clicks checked against it.

    Tidy clicks outside a stored image, or on an image whose declared size differs from the
    stored one, are added to ``parsed.rejects`` (kept sorted by line).
    """
    placed = []
    for click in parsed.clicks:
        image = parsed.runs[click.run].image
        width, height = sizes[image]
        if parsed.frame is not None:
            fx, fy = width / parsed.frame[0], height / parsed.frame[1]
            placed.append(ParsedClick(
                click.run, click.x * fx, click.y * fy, click.label, click.click_index, click.line))
            continue
        declared = parsed.declared_sizes.get(image)
        problem = _stored_size_problem(click, image, image in images, declared, (width, height))
        if problem is not None:
            parsed.reject(click.line, *problem)
        else:
            placed.append(click)
    parsed.rejects.sort(key=lambda p: (p.line or 0))
    return placed


def _stored_size_problem(
    click: ParsedClick, image: str, stored: bool, declared: tuple[int, int] | None, size: tuple[int, int]
) -> tuple[str, str, object] | None:
    width, height = size
    if stored and declared is not None and declared != size:
        return ("width", f"image {image!r} is {declared[0]}x{declared[1]} in the file but {width}x{height} "
                "in the store", f"{declared[0]}x{declared[1]}")
    problems = []
    for name, value, limit in (("x", click.x, width), ("y", click.y, height)):
        reason = outside_reason(name, value, limit, f"image {image!r} ({width}x{height})")
        if reason is not None:
            problems.append((name, reason, value))
    return joined_problem(problems)


def _client_key(project_id: int, sha: str, run_key: str) -> str:
    """``import:p<project id>:<file sha256>:<run id>`` (run id hashed when the key would be too long).

    The project is part of the key because client keys are unique across the whole store:
    the same file imported into two projects gives two sets of runs.
    """
    key = f"import:p{project_id}:{sha}:{run_key}"
    if len(key) <= _CLIENT_KEY_MAX:
        return key
    from cellspot.imaging import sha256_bytes

    return f"import:p{project_id}:{sha}:h{sha256_bytes(run_key.encode())[:40]}"

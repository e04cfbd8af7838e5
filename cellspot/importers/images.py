"""Import image files, folders and zip archives into a project, with optional metadata.

* Files are stored content-addressed: ``settings.images_dir / sha[:2] / f"{sha}{ext}"``
  (``ext`` from the decoded format: ``.png``, ``.jpg``, ``.tif``). Each file is written to a
  temporary name and renamed, before its row is flushed, so no half-written file is ever
  visible; the same content is stored once, even across projects.
* Within a project the same content is never added twice: it is reported as a duplicate.
  An image name is unique per project: a row with that name and **no pixels** (made by a
  click import) receives the pixels when the sizes match (nothing is rescaled; a different
  size is an error), or, when its size was only inferred from tidy clicks (a lower bound,
  ``meta["size_from"] == "clicks"``), when the file is at least that large; a row with
  pixels and other content is an error.
* Folders are walked recursively (hidden files skipped); files in folders and archives whose
  name does not end in a known image suffix are skipped, and listed in the report. A file
  named explicitly is always tried. Zip members are read in memory, one at a time, with
  their declared and actual size capped (``max_file_bytes``); nested archives are skipped.
* Metadata CSV: an ``image`` column (file name, or file name without suffix) and any other
  columns (condition, drug, dose, time, ...). Numbers become numbers, empty cells are left
  out. The values are merged into the image's ``meta``; a name that matches no image of the
  project is a problem naming its CSV line.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cellspot.imaging import (
    DEFAULT_MAX_PIXELS,
    FORMAT_SUFFIX,
    IMAGE_SUFFIXES,
    ImageReadError,
    read_image,
    sha256_bytes,
)
from cellspot.importers.csvtools import (
    CsvFormatError,
    csv_records,
    line_break_problem,
    repeated_columns,
    separator_hint,
)
from cellspot.importers.errors import ImageImportError, ImportProblem
from cellspot.names import ImageNames

log = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 1 << 30
"""Largest image file (or zip member, by declared and by actual size) read: 1 GiB."""

ProgressCallback = Callable[[int, int, str], None]
"""Called after each file as ``progress(done, total, label)``."""


@dataclass
class ImageImportReport:
    """What :func:`import_images` did.

    ``imported``: names of new image rows; ``attached``: names of pixel-less rows (from a
    click import) that received their pixels; ``duplicates``: files whose content is already
    in the project; ``errors``: files (or metadata lines) that could not be used;
    ``skipped``: files in folders / archives that are not images by name;
    ``metadata_applied``: names whose metadata was set; ``notes``: imported files with
    something the researcher should know (a multi-page TIFF of which only the first page is
    labelled).
    """

    imported: list[str] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    duplicates: list[ImportProblem] = field(default_factory=list)
    errors: list[ImportProblem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    metadata_applied: list[str] = field(default_factory=list)
    notes: list[ImportProblem] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.imported)} image(s) imported, {len(self.attached)} attached to existing "
            f"records, {len(self.duplicates)} duplicate(s), {len(self.errors)} error(s), "
            f"{len(self.skipped)} non-image file(s) skipped, metadata set on "
            f"{len(self.metadata_applied)}"
        )


@dataclass(frozen=True)
class _Source:
    label: str
    name: str
    read: Callable[[], bytes]


def read_metadata_csv(path: str | Path) -> tuple[dict[str, tuple[int, dict[str, Any]]], list[ImportProblem]]:
    """Parse a metadata CSV: ``image`` column plus any others.

    Returns ``(name -> (line, values), problems)``; values are int, float or str, empty cells
    omitted. Raises :class:`ImageImportError` when the file is unreadable or has no ``image``
    column.
    """
    path = Path(path)
    try:
        records = list(csv_records(path))
    except CsvFormatError as exc:
        raise ImageImportError(str(exc)) from exc
    if not records:
        raise ImageImportError(f"{path}: the metadata CSV is empty; expected a header line with an 'image' "
                               "column plus any of condition, drug, dose, time, ...")
    header = [h.strip() for h in records[0][1]]
    if "image" not in [h.lower() for h in header]:
        raise ImageImportError(
            f"{path}: the metadata CSV has no 'image' column (columns: {', '.join(header) or 'none'}); "
            "expected image plus any of condition, drug, dose, time, ..." + separator_hint(header)
        )
    repeated = repeated_columns([h.lower() for h in header])
    if repeated:
        raise ImageImportError("; ".join(f"{path}:{records[0][0]}: {name}: {reason}" for name, reason in repeated))
    key = [h.lower() for h in header].index("image")
    result: dict[str, tuple[int, dict[str, Any]]] = {}
    problems: list[ImportProblem] = []
    conflicting: dict[str, int] = {}  # image -> its first line: rows with other values, none applied
    for line, fields in records[1:]:
        name = fields[key].strip() if key < len(fields) else ""
        broken = line_break_problem(header, fields, line)
        if broken is not None:
            problems.append(ImportProblem(str(path), broken[1], line, broken[0]))
            continue
        if not name:
            problems.append(ImportProblem(str(path), "missing value", line, "image"))
            continue
        if len(fields) > len(header):
            reason = f"{len(fields)} fields but the header has {len(header)}"
            problems.append(ImportProblem(str(path), reason, line))
            continue
        values = {h: _meta_value(v) for i, (h, v) in enumerate(zip(header, fields)) if i != key and h and v.strip()}
        if name in conflicting or (name in result and result[name][1] != values):
            first = conflicting.setdefault(name, result.pop(name, (line, None))[0])
            reason = (f"image {name!r} has other values here than on line {first}; which is right? none of its "
                      "rows was applied")
            problems.append(ImportProblem(str(path), reason, line, "image"))
        elif name not in result:  # a repeat with the same values changes nothing
            result[name] = (line, values)
    return result, problems


def _meta_value(text: str) -> int | float | str:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5; anything else (``"007"``, ``"nan"``, ``"cisplatin"``) stays text."""
    raw = text.strip()
    try:
        as_int = int(raw)
    except ValueError:
        pass
    else:
        return as_int if str(as_int) == raw.lstrip("+") else raw
    try:
        as_float = float(raw)
    except ValueError:
        return raw
    digits = raw.lstrip("+-")
    leading_zero = digits.startswith("0") and not digits.startswith("0.")
    return as_float if math.isfinite(as_float) and not leading_zero else raw


def import_images(
    session: Any,
    project: Any,
    paths: Iterable[str | Path],
    settings: Any = None,
    metadata_csv: str | Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    progress: ProgressCallback | None = None,
) -> ImageImportReport:
    """Import image files, folders (recursive) and zip archives into ``project`` (a Project or its name).

    Caller-owned ``session``: rows are flushed, never committed. Bad files are reported in
    :attr:`ImageImportReport.errors` (the others still import); a metadata CSV without an
    ``image`` column raises :class:`ImageImportError` before anything is read.
    """
    from cellspot.importers import _store
    from cellspot.settings import get_settings

    from cellspot.store.queries import as_project

    project = as_project(session, project)  # a name, from the Python API
    settings = settings or get_settings()
    metadata, meta_problems = read_metadata_csv(metadata_csv) if metadata_csv else ({}, [])
    report = ImageImportReport()
    by_name = _store.project_images(session, project)
    by_sha = {image.sha256: image for image in by_name.values() if image.sha256}
    stored = set(by_sha)  # content in the project before this import (the rest came with it)
    with ExitStack() as stack:
        sources = list(_collect(paths, stack, report, max_file_bytes))
        for done, source in enumerate(sources, start=1):
            _import_one(session, project, source, settings, by_name, by_sha, report, max_pixels, stored)
            if progress is not None:
                progress(done, len(sources), source.label)
    session.flush()
    report.errors.extend(meta_problems)
    if metadata_csv:
        _apply_metadata(Path(metadata_csv), metadata, by_name, report)
        session.flush()
    log.info("%s", report.summary())
    return report


def _import_one(
    session: Any, project: Any, source: _Source, settings: Any,
    by_name: dict[str, Any], by_sha: dict[str, Any], report: ImageImportReport, max_pixels: int,
    stored: set[str] | None = None,
) -> None:
    from cellspot.store.models import IMAGE_NAME_MAX, Image

    if len(source.name) > IMAGE_NAME_MAX:
        report.errors.append(ImportProblem(
            source.label, f"the file name has {len(source.name)} characters; at most {IMAGE_NAME_MAX} are allowed"))
        return
    try:
        data = source.read()
        sha = sha256_bytes(data)
        if sha in by_sha:
            other = by_sha[sha].name
            where = "already in the project" if stored is None or sha in stored else "earlier in this import"
            reason = f"same content as image {other!r} {where}"
            report.duplicates.append(ImportProblem(source.label, reason))
            return
        loaded = read_image(data, source.label, max_pixels=max_pixels)
    except (ImageReadError, _SourceError) as exc:
        report.errors.append(ImportProblem(source.label, getattr(exc, "reason", str(exc))))
        return
    existing = by_name.get(source.name)
    if existing is not None and not _can_attach(existing, loaded.width, loaded.height):
        report.errors.append(ImportProblem(source.label, _conflict_reason(existing, loaded)))
        return
    rel_path = _store_file(settings, sha, FORMAT_SUFFIX.get(loaded.format, ".img"), data)
    fields = {"sha256": sha, "path": rel_path, "width": loaded.width, "height": loaded.height,
              "channels": loaded.channels, "bit_depth": loaded.bit_depth, "has_pixels": True}
    if existing is None:
        image = Image(project_id=project.id, name=source.name, meta={}, status="active", **fields)
        session.add(image)
        by_name[source.name] = image
        report.imported.append(source.name)
    else:
        for key, value in fields.items():
            setattr(existing, key, value)
        from cellspot.importers._store import SIZE_FROM_KEY

        if SIZE_FROM_KEY in (existing.meta or {}):
            existing.meta = {k: v for k, v in existing.meta.items() if k != SIZE_FROM_KEY}
        image = existing
        report.attached.append(source.name)
    by_sha[sha] = image
    if loaded.pages > 1:
        report.notes.append(ImportProblem(
            source.label, f"has {loaded.pages} pages (a stack or time series); only the first is shown "
                          "and labelled: save the others as separate images to label them"))
    log.debug("stored %s as %s", source.label, rel_path)


def _can_attach(existing: Any, width: int, height: int) -> bool:
    """Whether a file of ``width`` x ``height`` may give its pixels to the row ``existing``."""
    from cellspot.importers import _store

    if existing.has_pixels:
        return False
    if _store.size_is_lower_bound(existing):
        return width >= existing.width and height >= existing.height
    return (existing.width, existing.height) == (width, height)


def _conflict_reason(existing: Any, loaded: Any) -> str:
    from cellspot.importers import _store

    if existing.has_pixels:
        return f"an image named {existing.name!r} with other content is already in the project"
    if _store.size_is_lower_bound(existing):
        return (
            f"image {existing.name!r} exists without pixels and its clicks reach "
            f"{existing.width}x{existing.height}, but this file is only {loaded.width}x{loaded.height}; "
            "import the file the clicks were made on, or rename it"
        )
    return (
        f"image {existing.name!r} exists without pixels at {existing.width}x{existing.height} "
        f"(its clicks are in that frame) but this file is {loaded.width}x{loaded.height}; "
        "cellspot does not rescale: import a file of that size or rename it"
    )


def _store_file(settings: Any, sha: str, ext: str, data: bytes) -> str:
    """Write ``data`` to its content address (temp name + rename); returns the path for the row."""
    images_dir = Path(settings.images_dir)
    dest = images_dir / sha[:2] / f"{sha}{ext}"
    if not (dest.is_file() and dest.stat().st_size == len(data)):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    try:
        return dest.resolve().relative_to(Path(settings.home).resolve()).as_posix()
    except ValueError:
        return str(dest.resolve())


class _SourceError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _collect(
    paths: Iterable[str | Path], stack: ExitStack, report: ImageImportReport, max_bytes: int
) -> Iterator[_Source]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                relative = child.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if child.suffix.lower() == ".zip":
                    yield from _zip_sources(child, stack, report, max_bytes)
                elif child.suffix.lower() in IMAGE_SUFFIXES:
                    yield _file_source(child, max_bytes)
                else:
                    report.skipped.append(str(child))
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix == ".zip" or (suffix not in IMAGE_SUFFIXES and zipfile.is_zipfile(path)):
                yield from _zip_sources(path, stack, report, max_bytes)
            else:
                yield _file_source(path, max_bytes)
        else:
            report.errors.append(ImportProblem(str(path), "no such file or folder"))


def _file_source(path: Path, max_bytes: int) -> _Source:
    def read() -> bytes:
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise _SourceError(f"the file has {size:,} bytes, more than the limit of {max_bytes:,}")
            return path.read_bytes()
        except OSError as exc:
            raise _SourceError(f"cannot read the file: {exc.strerror or exc}") from exc

    return _Source(str(path), path.name, read)


def _zip_sources(path: Path, stack: ExitStack, report: ImageImportReport, max_bytes: int) -> Iterator[_Source]:
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        report.errors.append(ImportProblem(str(path), f"not a readable zip archive: {exc}"))
        return
    for member in members:
        inner = PurePosixPath(member.filename)
        label = f"{path}::{member.filename}"
        if member.is_dir() or any(p.startswith(".") or p == "__MACOSX" for p in inner.parts):
            continue
        if inner.suffix.lower() not in IMAGE_SUFFIXES:
            report.skipped.append(label)
            continue
        yield _Source(label, inner.name, _member_reader(archive, member, max_bytes))


def _member_reader(archive: zipfile.ZipFile, member: zipfile.ZipInfo, max_bytes: int) -> Callable[[], bytes]:
    def read() -> bytes:
        if member.file_size > max_bytes:
            raise _SourceError(
                f"the archive declares {member.file_size:,} bytes for it, more than the limit of "
                f"{max_bytes:,} (possible zip bomb)"
            )
        try:
            with archive.open(member) as handle:
                data = handle.read(max_bytes + 1)
        except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
            raise _SourceError(f"cannot extract it from the archive: {exc}") from exc
        if len(data) > max_bytes:
            raise _SourceError(f"it expands beyond the limit of {max_bytes:,} bytes (possible zip bomb)")
        return data

    return read


def _apply_metadata(
    path: Path, metadata: dict[str, tuple[int, dict[str, Any]]], by_name: dict[str, Any],
    report: ImageImportReport,
) -> None:
    names = ImageNames(by_name)
    rows_of: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # image -> its rows (a name with or without extension)
    for name, (line, values) in metadata.items():
        target, alike = names.match(name)
        if target is None:
            reason = names.reason(name, alike, "in this import or the project")
            report.errors.append(ImportProblem(str(path), reason, line, "image"))
            continue
        rows_of.setdefault(target, []).append((line, values))
    for target, rows in rows_of.items():
        first_line, values = rows[0]
        other = [line for line, v in rows[1:] if v != values]
        if other:  # "a" and "a.png" with other values: which is right?
            for line in other:
                reason = (f"image {target!r} has other values here than on line {first_line}; which is right? "
                          "none of its rows was applied")
                report.errors.append(ImportProblem(str(path), reason, line, "image"))
            continue
        image = by_name[target]
        image.meta = {**(image.meta or {}), **values}
        report.metadata_applied.append(target)

"""Image import: files, folders, zips, every mode, bad files, duplicates, pixel attach, metadata."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage
from sqlalchemy import func, select

from cellspot.imaging import sha256_bytes
from cellspot.importers import ImageImportError, import_images
from cellspot.store.models import Image
from cellspot.store.queries import get_or_create_project

H, W = 12, 16


def _png(value: int, mode: str = "L", size: tuple[int, int] = (W, H)) -> bytes:
    array = (np.arange(size[0] * size[1]).reshape(size[1], size[0]) + value) % 256
    image = PILImage.fromarray(array.astype(np.uint8))
    if mode != "L":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png16(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray((np.arange(W * H).reshape(H, W) * 100 + value).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tiff16(value: int) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (np.arange(W * H).reshape(H, W) * 300 + value).astype(np.uint16))
    return buffer.getvalue()


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((H, W, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99)) + chunk(b"IEND", b"")


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _rows(session) -> dict[str, Image]:
    session.flush()
    return {image.name: image for image in session.scalars(select(Image))}


@pytest.fixture
def project(session):
    return get_or_create_project(session, "p")


# name, bytes, (channels, bit_depth, stored suffix)
MODES = [
    ("gray.png", lambda: _png(1), (1, 8, ".png")),
    ("rgb.png", lambda: _png(2, "RGB"), (3, 8, ".png")),
    ("rgba.png", lambda: _png(3, "RGBA"), (4, 8, ".png")),
    ("palette.png", lambda: _png(4, "P"), (3, 8, ".png")),
    ("gray16.png", lambda: _png16(5), (1, 16, ".png")),
    ("gray16.tif", lambda: _tiff16(6), (1, 16, ".tif")),
    ("photo.jpeg", lambda: _jpeg(7), (3, 8, ".jpg")),
]


def test_folder_of_every_mode_imports(session, project, settings, tmp_path: Path) -> None:
    folder = _write(tmp_path / "in", {f"sub/{name}": make() for name, make, _ in MODES})
    seen: list[tuple[int, int]] = []
    report = import_images(session, project, [folder], settings, progress=lambda d, t, _label: seen.append((d, t)))
    assert report.errors == [] and sorted(report.imported) == sorted(name for name, _, _ in MODES)
    assert seen[-1] == (len(MODES), len(MODES))
    rows = _rows(session)
    for name, make, (channels, bit_depth, suffix) in MODES:
        row = rows[name]
        data = make()
        assert (row.width, row.height, row.channels, row.bit_depth, row.has_pixels) == (W, H, channels, bit_depth, True)
        assert row.sha256 == sha256_bytes(data)
        assert row.path == f"images/{row.sha256[:2]}/{row.sha256}{suffix}"
        assert (settings.home / row.path).read_bytes() == data
    assert not list(settings.images_dir.rglob("*.tmp"))


def test_bad_files_are_reported_and_the_rest_imports(session, project, settings, tmp_path: Path) -> None:
    good = _png(1)
    folder = _write(tmp_path / "in", {
        "good.png": good,
        "corrupt.png": good[: len(good) // 2],
        "notes.png": b"these are not pixels",
        "bomb.png": _png_bomb(),
        "readme.txt": b"skipped: not an image by name",
        ".hidden/x.png": b"never looked at",
    })
    report = import_images(session, project, [folder, tmp_path / "missing.png"], settings)
    assert report.imported == ["good.png"]
    reasons = {Path(p.file).name: p.reason for p in report.errors}
    assert set(reasons) == {"bomb.png", "corrupt.png", "notes.png", "missing.png"}
    assert "decompression bomb" in reasons["bomb.png"]
    assert "corrupt or truncated" in reasons["corrupt.png"]
    assert "not a PNG, JPEG or TIFF" in reasons["notes.png"]
    assert "no such file" in reasons["missing.png"]
    assert all(str(folder) in p.file for p in report.errors if p.file != str(tmp_path / "missing.png"))
    assert report.skipped == [str(folder / "readme.txt")]
    assert set(_rows(session)) == {"good.png"}


def test_explicit_non_image_file_is_an_error(session, project, settings, tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("image,x,y\n")
    report = import_images(session, project, [path], settings)
    assert [(p.file, p.reason) for p in report.errors] == [(str(path), "not a PNG, JPEG or TIFF image")]


def test_multi_page_tiff_imports_its_first_page_with_a_note(session, project, settings, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    stack = np.stack([np.full((H, W), v, np.uint16) for v in (100, 200, 300)])
    tifffile.imwrite(buffer, stack, photometric="minisblack")  # three grey pages, not one RGB
    folder = _write(tmp_path / "in", {"stack.tif": buffer.getvalue(), "flat.png": _png(1)})
    report = import_images(session, project, [folder], settings)
    assert sorted(report.imported) == ["flat.png", "stack.tif"] and report.errors == []
    assert [(Path(n.file).name, n.reason.split(" (")[0]) for n in report.notes] == [("stack.tif", "has 3 pages")]
    assert "only the first is shown and labelled" in report.notes[0].reason
    row = _rows(session)["stack.tif"]
    assert (row.width, row.height, row.channels, row.bit_depth) == (W, H, 1, 16)


def test_duplicates_are_detected_not_stored_twice(session, project, settings, tmp_path: Path) -> None:
    folder = _write(tmp_path / "in", {"a.png": _png(1), "copy_of_a.png": _png(1), "b.png": _png(2)})
    report = import_images(session, project, [folder], settings)
    assert sorted(report.imported) == ["a.png", "b.png"]
    assert [(Path(p.file).name, p.reason) for p in report.duplicates] == [
        ("copy_of_a.png", "same content as image 'a.png' earlier in this import")]
    again = import_images(session, project, [folder], settings)
    assert again.imported == [] and len(again.duplicates) == 3
    assert {Path(p.file).name: p.reason for p in again.duplicates}["copy_of_a.png"] == (
        "same content as image 'a.png' already in the project")
    assert session.scalar(select(func.count()).select_from(Image)) == 2
    assert len([p for p in settings.images_dir.rglob("*") if p.is_file()]) == 2


def test_same_content_in_another_project_shares_the_file(session, project, settings, tmp_path: Path) -> None:
    folder = _write(tmp_path / "in", {"a.png": _png(1)})
    import_images(session, project, [folder], settings)
    other = get_or_create_project(session, "other")
    report = import_images(session, other, [folder], settings)
    assert report.imported == ["a.png"]
    assert len([p for p in settings.images_dir.rglob("*") if p.is_file()]) == 1


def test_same_name_other_content_is_an_error(session, project, settings, tmp_path: Path) -> None:
    import_images(session, project, [_write(tmp_path / "one", {"a.png": _png(1)})], settings)
    report = import_images(session, project, [_write(tmp_path / "two", {"a.png": _png(9)})], settings)
    assert report.imported == [] and "other content is already in the project" in report.errors[0].reason


@pytest.mark.parametrize(("size", "attached"), [((W, H), True), ((W * 2, H * 2), False)])
def test_pixels_attach_to_a_record_made_by_clicks(session, project, settings, tmp_path: Path, size, attached) -> None:
    session.add(Image(project_id=project.id, name="feb.png", width=size[0], height=size[1], has_pixels=False))
    report = import_images(session, project, [_write(tmp_path / "in", {"feb.png": _png(1, "RGB")})], settings)
    row = _rows(session)["feb.png"]
    if attached:
        assert report.attached == ["feb.png"] and report.imported == []
        assert (row.has_pixels, row.channels, row.sha256 is not None, row.path is not None) == (True, 3, True, True)
    else:
        assert report.attached == [] and "does not rescale" in report.errors[0].reason
        assert f"{W * 2}x{H * 2}" in report.errors[0].reason and f"{W}x{H}" in report.errors[0].reason
        assert (row.has_pixels, row.path) == (False, None)


@pytest.mark.parametrize(("bound", "attached"), [((W - 5, H - 2), True), ((W, H), True), ((W + 1, H), False)])
def test_pixels_attach_to_a_size_inferred_from_clicks(
    session, project, settings, tmp_path: Path, bound: tuple[int, int], attached: bool
) -> None:
    """A record sized by its clicks is a lower bound: any file at least that large attaches."""
    session.add(Image(project_id=project.id, name="feb.png", width=bound[0], height=bound[1], has_pixels=False,
                      meta={"size_from": "clicks", "drug": "taxol"}))
    report = import_images(session, project, [_write(tmp_path / "in", {"feb.png": _png(1)})], settings)
    row = _rows(session)["feb.png"]
    if attached:
        assert report.attached == ["feb.png"]
        assert (row.width, row.height, row.has_pixels, row.meta) == (W, H, True, {"drug": "taxol"})
    else:
        assert report.attached == [] and f"its clicks reach {W + 1}x{H}" in report.errors[0].reason
        assert (row.has_pixels, row.meta["size_from"]) == (False, "clicks")


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_zip_archive(session, project, settings, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "batch.zip", {
        "plate1/w1.png": _png(1),
        "plate1/w2.tif": _tiff16(2),
        "__MACOSX/plate1/._w1.png": b"junk",
        "plate1/notes.txt": b"skipped",
        "plate1/broken.jpg": b"\xff\xd8\xff\xe0 broken",
    })
    report = import_images(session, project, [archive], settings)
    assert sorted(report.imported) == ["w1.png", "w2.tif"]
    assert report.skipped == [f"{archive}::plate1/notes.txt"]
    assert [p.file for p in report.errors] == [f"{archive}::plate1/broken.jpg"]
    assert _rows(session)["w2.tif"].bit_depth == 16


def test_a_member_name_longer_than_the_store_takes_is_an_error(session, project, settings, tmp_path: Path) -> None:
    long_name = "m" * 501 + ".png"
    archive = _zip(tmp_path / "long.zip", {long_name: _png(1), "ok.png": _png(2)})
    report = import_images(session, project, [archive], settings)
    assert report.imported == ["ok.png"]
    assert [(p.file, p.reason) for p in report.errors] == [
        (f"{archive}::{long_name}", "the file name has 505 characters; at most 500 are allowed")]


def test_zip_bomb_guarded_by_declared_size(session, project, settings, tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"huge.png": b"\0" * 3_000_000, "ok.png": _png(1)})
    report = import_images(session, project, [archive], settings, max_file_bytes=1_000_000)
    assert report.imported == ["ok.png"]
    assert "possible zip bomb" in report.errors[0].reason and report.errors[0].file.endswith("::huge.png")


def test_corrupt_zip_is_an_error(session, project, settings, tmp_path: Path) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    report = import_images(session, project, [path], settings)
    assert report.imported == [] and "not a readable zip archive" in report.errors[0].reason


def test_metadata_csv(session, project, settings, tmp_path: Path) -> None:
    folder = _write(tmp_path / "in", {"a.png": _png(1), "b.png": _png(2), "c.png": _png(3)})
    meta = tmp_path / "meta.csv"
    meta.write_text(
        "image,condition,drug,dose,time,well\n"
        "a.png,treated,cisplatin,2.5,24,007\n"
        "b,control,,0,0,A1\n"  # matched by stem; empty drug left out
        "zzz.png,x,y,1,1,B1\n"
        "a.png,again,,,,\n"
        "c.png,treated,,,,\n"
        "c.png,treated,,,,\n"  # the same values again: harmless
    )
    report = import_images(session, project, [folder], settings, metadata_csv=meta)
    rows = _rows(session)
    # a.png has other values on line 5 than on line 2: which is right? neither is applied
    assert rows["a.png"].meta == {}
    assert rows["b.png"].meta == {"condition": "control", "dose": 0, "time": 0, "well": "A1"}
    assert rows["c.png"].meta == {"condition": "treated"}
    assert [(p.line, p.field) for p in report.errors] == [(5, "image"), (4, "image")]
    assert report.errors[0].reason == ("image 'a.png' has other values here than on line 2; which is right? none "
                                       "of its rows was applied")
    assert "no image named 'zzz.png'" in report.errors[1].reason
    assert sorted(report.metadata_applied) == ["b.png", "c.png"]


def _with_metadata(session, project, settings, tmp_path: Path, files: dict[str, bytes], text: str):
    """Import ``files`` with the metadata CSV ``text``; the report."""
    folder = _write(tmp_path / "in", files)
    meta = tmp_path / "meta.csv"
    meta.write_text(text)
    return import_images(session, project, [folder], settings, metadata_csv=meta)


def test_metadata_for_one_image_under_two_names_with_other_values_is_not_applied(session, project, settings,
                                                                                   tmp_path: Path) -> None:
    report = _with_metadata(session, project, settings, tmp_path, {"w1.png": _png(1), "w2.png": _png(2)},
                            "image,condition\nw1,ctrl\nw1.png,drug\nw2,ctrl\nw2.png,ctrl\n")
    rows = _rows(session)
    assert rows["w1.png"].meta == {} and rows["w2.png"].meta == {"condition": "ctrl"}
    assert [(p.line, p.reason) for p in report.errors] == [
        (3, "image 'w1.png' has other values here than on line 2; which is right? none of its rows was applied")]
    assert report.metadata_applied == ["w2.png"]


@pytest.mark.parametrize(("text", "message"), [
    ("image,condition,condition\nw1.png,a,b\n", "the header has column 'condition' 2 times"),
    ('image,condition\nw1.png,"ctrl\nw2.png,drug\n', "a quoted field runs over lines 2-3"),
])
def test_a_broken_metadata_csv_names_the_problem(session, project, settings, tmp_path: Path, text, message) -> None:
    try:
        report = _with_metadata(session, project, settings, tmp_path, {"w1.png": _png(1), "w2.png": _png(2)}, text)
    except ImageImportError as exc:
        assert message in str(exc)
    else:
        assert any(message in p.reason for p in report.errors), report.errors
    assert all(row.meta == {} for row in _rows(session).values())


def test_a_metadata_name_without_extension_that_matches_two_images_says_so(session, project, settings,
                                                                          tmp_path: Path) -> None:
    report = _with_metadata(session, project, settings, tmp_path, {"w1.png": _png(1), "w1.tif": _tiff16(2)},
                            "image,condition\nw1,treated\n")
    assert [(p.line, p.reason) for p in report.errors] == [
        (2, "'w1' matches 2 images (w1.png, w1.tif); give the full file name")]


def test_metadata_applies_to_images_already_in_the_project(session, project, settings, tmp_path: Path) -> None:
    folder = _write(tmp_path / "in", {"a.png": _png(1)})
    import_images(session, project, [folder], settings)
    meta = tmp_path / "meta.csv"
    meta.write_text("image,drug\na.png,taxol\n")
    report = import_images(session, project, [], settings, metadata_csv=meta)
    assert report.errors == [] and _rows(session)["a.png"].meta == {"drug": "taxol"}


def test_metadata_without_image_column_fails_before_importing(session, project, settings, tmp_path: Path) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("file,drug\na.png,taxol\n")
    with pytest.raises(ImageImportError, match="no 'image' column"):
        import_images(session, project, [_write(tmp_path / "in", {"a.png": _png(1)})], settings, metadata_csv=meta)
    assert _rows(session) == {} and not settings.images_dir.exists()
    meta.write_text("")
    with pytest.raises(ImageImportError, match="the metadata CSV is empty; expected a header line"):
        import_images(session, project, [_write(tmp_path / "in2", {"a.png": _png(1)})], settings, metadata_csv=meta)
    assert _rows(session) == {}


def test_failed_write_leaves_no_partial_file(session, project, settings, tmp_path: Path, monkeypatch) -> None:
    import cellspot.importers.images as images_module

    def broken_replace(src, dst):  # noqa: ANN001
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        import_images(session, project, [_write(tmp_path / "in", {"a.png": _png(1)})], settings)
    assert [p for p in settings.images_dir.rglob("*") if p.is_file()] == []


@pytest.mark.shared_data
def test_real_ldc_folder_with_manifest(sqlite_engine, settings, shared_data: Path) -> None:
    from sqlalchemy.orm import Session

    folder = shared_data / "ldc_living_dead_cells"
    with Session(sqlite_engine) as session:
        project = get_or_create_project(session, "ldc")
        report = import_images(session, project, [folder / "images"], settings, metadata_csv=folder / "manifest.csv")
        assert (len(report.imported), report.errors, report.duplicates) == (417, [], [])
        rows = _rows(session)
        assert sum(1 for r in rows.values() if r.bit_depth == 16) == 7
        assert all(r.meta["width"] == r.width and r.meta["height"] == r.height for r in rows.values())
        session.rollback()

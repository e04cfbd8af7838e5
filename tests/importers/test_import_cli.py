"""``cellspot import images|clicks|gold`` on a SQLite store in tmp_path (settings fixture sets the env)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from cellspot.store.db import make_engine, transaction
from cellspot.store.models import Click, GoldCell, Image, Project
from clikit import run_cli


def _png(path: Path, value: int) -> Path:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full((20, 30), value, np.uint8)).save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def _count(settings, model) -> int:
    engine = make_engine(settings=settings)
    with transaction(engine) as session:
        value = session.scalar(select(func.count()).select_from(model))
    engine.dispose()
    return value


def test_import_images_creates_project_and_reports_bad_files(settings, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _png(folder / "a.png", 1)
    _png(folder / "b.png", 2)
    (folder / "broken.png").write_bytes(b"nope")
    meta = tmp_path / "meta.csv"
    meta.write_text("image,drug\na.png,taxol\n")
    result = run_cli("import", "images", str(folder), "--project", "lab", "--metadata", str(meta))
    assert result.exit_code == 1
    assert "project 'lab': 2 image(s) imported" in result.stdout
    assert f"error: {folder / 'broken.png'}: not a PNG, JPEG or TIFF image" in result.stderr
    assert "1 file(s) or metadata line(s) could not be imported (see above); the rest was imported" in result.stderr
    assert _count(settings, Image) == 2  # the good files are kept
    ok = run_cli("import", "images", str(folder / "a.png"))  # default project from the settings
    assert ok.exit_code == 0, ok.output
    assert _count(settings, Project) == 2


def test_import_images_notes_a_multi_page_tiff(settings, tmp_path: Path) -> None:
    import tifffile

    path = tmp_path / "zstack.tif"
    tifffile.imwrite(path, np.zeros((4, 20, 30), np.uint16), photometric="minisblack")
    result = run_cli("import", "images", str(path))
    assert result.exit_code == 0, result.output
    assert f"note: {path}: has 4 pages (a stack or time series); only the first is shown" in result.stderr


def test_import_images_bad_metadata_is_a_clean_error(settings, tmp_path: Path) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("name,drug\n")
    result = run_cli("import", "images", str(_png(tmp_path / "a.png", 1)), "--metadata", str(meta))
    assert result.exit_code == 1 and "no 'image' column" in result.stderr
    assert "Traceback" not in result.output


def test_import_clicks_strict_then_skip_invalid(settings, tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("image,annotator,x,y,label\na.png,s1,3,5,alive\na.png,s2,3,5,zombie\n")
    strict = run_cli("import", "clicks", str(path))
    assert strict.exit_code == 1
    assert f"{path}:3: label: unknown label 'zombie'" in strict.stderr
    assert _count(settings, Click) == 0
    lenient = run_cli("import", "clicks", str(path), "--skip-invalid", "--format", "csv")
    assert lenient.exit_code == 0, lenient.output
    assert "1 imported, 1 rejected" in lenient.stdout
    rejects = Path(lenient.stdout.split("rejects: ")[1].strip())
    assert rejects.is_file() and rejects.parent == settings.rejects_dir
    again = run_cli("import", "clicks", str(path), "--skip-invalid")
    assert "0 imported, 1 rejected, 1 already present" in again.stdout
    assert _count(settings, Click) == 1


def test_import_gold(settings, tmp_path: Path) -> None:
    assert run_cli("import", "images", str(_png(tmp_path / "a.png", 1))).exit_code == 0
    gold = tmp_path / "gold.csv"
    gold.write_text("image,x,y,label\na.png,3,4,dead\nzzz.png,1,1,alive\n")
    bad = run_cli("import", "gold", str(gold))
    assert bad.exit_code == 1 and f"{gold}:3: image: no image named 'zzz.png'" in bad.stderr
    gold.write_text("image,x,y,label\na.png,3,4,dead\n")
    good = run_cli("import", "gold", str(gold))
    assert good.exit_code == 0 and "1 imported" in good.stdout
    assert _count(settings, GoldCell) == 1


def test_missing_input_is_a_usage_error(settings, tmp_path: Path) -> None:
    result = run_cli("import", "clicks", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_an_import_that_stores_nothing_leaves_no_new_project(settings, tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"nope")
    result = run_cli("import", "images", str(tmp_path / "broken.png"), "--project", "ghost")
    assert result.exit_code == 1 and "'ghost': 0 image(s) imported" in result.stdout
    assert "nothing stored" in result.stdout and "not a PNG, JPEG or TIFF image" in result.stderr
    assert _count(settings, Project) == 0


@pytest.mark.parametrize("what", [("clicks",), ("gold",), ("images", "--metadata")])
def test_a_folder_given_for_a_csv_is_a_usage_error(settings, tmp_path: Path, what: tuple[str, ...]) -> None:
    args = [*what[:1], str(_png(tmp_path / "a.png", 1)), *what[1:]] if len(what) > 1 else [*what]
    result = run_cli("import", *args, str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("value", "reason"), [("", "must be a non-empty string"),
                                               (" lab ", "must not start or end with spaces")])
def test_a_bad_default_project_setting_is_one_clear_line(settings, tmp_path: Path, monkeypatch,
                                                         value: str, reason: str) -> None:
    monkeypatch.setenv("CELLSPOT_DEFAULT_PROJECT", value)
    result = run_cli("import", "images", str(_png(tmp_path / "a.png", 1)))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"bad setting: CELLSPOT_DEFAULT_PROJECT: a project name {reason}" in result.stderr


def test_a_project_name_longer_than_the_store_takes_is_a_usage_error(settings, tmp_path: Path) -> None:
    result = run_cli("import", "images", str(_png(tmp_path / "a.png", 1)), "--project", "a" * 201)
    assert result.exit_code == 2 and "at most 200 characters; got 201" in result.stderr
    assert not settings.home.exists()  # refused before the store was touched


def test_an_import_of_nothing_leaves_no_project_and_names_what_it_skipped(settings, tmp_path: Path) -> None:
    import zipfile

    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("a.png", b"x")
    with zipfile.ZipFile(folder / "outer.zip", "w") as archive:
        archive.writestr("inner.zip", inner.getvalue())
    result = run_cli("import", "images", str(folder), "--project", "typo")
    assert result.exit_code == 0, result.output
    assert "nothing stored" in result.stdout
    assert "outer.zip::inner.zip (an archive inside an archive is not opened" in result.stderr
    assert f"skipped: {folder / 'notes.txt'} (not a .png, .jpg" in result.stderr
    ok = run_cli("import", "images", str(_png(tmp_path / "a.png", 1)), "--project", "real")
    assert ok.exit_code == 0
    engine = make_engine(settings=settings)
    with transaction(engine) as session:
        assert session.scalars(select(Project.name)).all() == ["real"]  # no empty "typo" project
    engine.dispose()


@pytest.mark.parametrize(("command", "header"), [("clicks", "image,annotator,x,y,label"), ("gold", "image,x,y,label")])
def test_a_header_only_file_is_an_error_and_leaves_no_project(settings, tmp_path: Path, command: str,
                                                              header: str) -> None:
    path = tmp_path / f"{command}.csv"
    path.write_text(header + "\n")
    result = run_cli("import", command, str(path), "--project", "typo")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{path}:2: the file has a header but no rows: nothing to import" in result.stderr
    assert _count(settings, Project) == 0


def test_a_click_file_with_every_row_rejected_leaves_no_new_project(settings, tmp_path: Path) -> None:
    path = tmp_path / "z.csv"
    path.write_text("image,annotator,x,y,label\na.png,s1,1,1,zombie\n")
    result = run_cli("import", "clicks", str(path), "--project", "typo", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "0 imported, 1 rejected" in result.stdout and result.stdout.rstrip().splitlines()[0].endswith(
        "; nothing stored")
    assert _count(settings, Project) == 0


def test_a_unique_row_written_by_a_concurrent_import_is_a_clear_error(settings, tmp_path: Path, monkeypatch) -> None:
    """Two imports of one file at once: the second said "cannot use the database ... run
    `cellspot init`" (the store was fine; the other import had written the same rows)."""
    from sqlalchemy.exc import IntegrityError

    def clash(*args, **kwargs):
        raise IntegrityError("INSERT INTO images ...", {}, Exception("UNIQUE constraint failed: images.project_id"))

    monkeypatch.setattr("cellspot.importers.import_clicks", clash)
    path = tmp_path / "c.csv"
    path.write_text("image,annotator,x,y,label\na.png,s1,1,1,alive\n")
    result = run_cli("import", "clicks", str(path), "--project", "p")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert ("another command wrote the same rows at the same moment (UNIQUE constraint failed: images.project_id); "
            "nothing of this one was stored: run it again") in result.stderr
    assert "cellspot init" not in result.stderr


@pytest.mark.parametrize(("command", "text"), [("clicks", "image;annotator;x;y;label\na.png;s1;1;1;alive\n"),
                                               ("gold", "image;x;y;label\na.png;1;1;alive\n")])
def test_a_semicolon_separated_file_says_so(settings, tmp_path: Path, command: str, text: str) -> None:
    path = tmp_path / "semi.csv"
    path.write_text(text)
    result = run_cli("import", command, str(path), "--project", "p")
    assert result.exit_code == 1
    assert "the header is one column: the file seems separated by semicolons; save it with commas" in result.stderr


def test_a_duplicate_click_warning_is_printed_once(settings, tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("image,annotator,x,y,label\na.png,s1,1,1,alive\na.png,s1,1,1,alive\n")
    result = run_cli("import", "clicks", str(path), "--project", "p")
    assert result.exit_code == 0
    assert result.output.count("repeat an earlier click of the same run exactly") == 1, result.output

"""Gold-cell import: validation with line numbers, all-or-nothing, idempotent re-import."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from cellspot.importers import GoldImportError, import_gold, parse_gold_csv
from cellspot.store.models import GoldCell, Image
from cellspot.store.queries import get_or_create_project

HEADER = "image,x,y,label"


@pytest.fixture
def project(session):
    project = get_or_create_project(session, "p")
    session.add_all([
        Image(project_id=project.id, name="a.png", width=100, height=50, has_pixels=True),
        Image(project_id=project.id, name="b.jpg", width=524, height=391, has_pixels=False),
    ])
    session.flush()
    return project


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gold.csv"
    path.write_text(text)
    return path


def _count(session) -> int:
    session.flush()
    return session.scalar(select(func.count()).select_from(GoldCell))


# name, rows after the header, expected (line, field, reason fragment)
BAD = [
    ("unknown image", "zzz.png,1,1,alive",
     (2, "image", "no image named 'zzz.png' in project 'p'; import the images first")),
    ("not_sure is not a gold label", "a.png,1,1,not_sure", (2, "label", "unknown label 'not_sure'; allowed: alive, dead")),
    ("outside the image", "a.png,100,1,dead", (2, "x", "x=100 is outside image 'a.png' (100x50)")),
    ("negative y", "a.png,1,-0.5,dead", (2, "y", "outside")),
    ("NaN", "a.png,nan,1,dead", (2, "x", "NaN")),
    ("not a number", "a.png,1,one,dead", (2, "y", "not a number")),
    ("missing image", ",1,1,dead", (2, "image", "missing value")),
    ("every bad field of a row", "a.png,one,,zombie",
     (2, "x, y, label", "x: x='one' is not a number; y: missing value; label: unknown label 'zombie'")),
    ("too many fields", "a.png,1,1,dead,extra", (2, "row", "5 fields")),
    ("conflicting labels in the file", "a.png,5,5,dead\na.png,5,5,alive", (3, "label", "same position in line 3")),
    ("a quote left open", 'a.png,"5,5,dead\na.png,6,6,alive\na.png,7,7,dead',
     (2, "x", "a quoted field runs over lines 3-5: a quote (\") opened on line 3 is not closed")),
]


@pytest.mark.parametrize(("name", "rows", "expected"), BAD, ids=[c[0] for c in BAD])
def test_bad_rows_reject_the_file(name: str, rows: str, expected: tuple, session, project, tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\nb.jpg,10,10,alive\n{rows}\n")
    with pytest.raises(GoldImportError) as info:
        import_gold(session, project, path)
    line, field, fragment = expected
    problems = info.value.problems
    assert [(p.line - 1, p.field) for p in problems] == [(line, field)]  # +1: the good row above
    assert fragment in problems[0].reason
    assert f"{path}:{line + 1}: {field}:" in str(info.value)
    assert _count(session) == 0


def test_missing_column(session, project, tmp_path: Path) -> None:
    with pytest.raises(GoldImportError) as info:
        import_gold(session, project, _csv(tmp_path, "image,x,y\na.png,1,1\n"))
    assert [(p.line, p.field) for p in info.value.problems] == [(1, "label")]


def test_a_repeated_column_is_refused(session, project, tmp_path: Path) -> None:
    with pytest.raises(GoldImportError) as info:
        import_gold(session, project, _csv(tmp_path, "image,x,y,label,x\na.png,1,1,dead,99\n"))
    assert [(p.line, p.field, p.reason) for p in info.value.problems] == [
        (1, "x", "the header has column 'x' 2 times (columns 2, 5); keep one")]
    assert _count(session) == 0


def test_import_and_reimport(session, project, tmp_path: Path) -> None:
    path = _csv(tmp_path, f"{HEADER}\na.png,10,20,alive\na.png,30.5,40,Dead\nb.jpg,500,390,dead\na.png,10,20,alive\n")
    report = import_gold(session, project, path)
    assert (report.rows, report.imported, report.already_present) == (4, 3, 1)
    cells = session.execute(select(GoldCell.x, GoldCell.y, GoldCell.label, GoldCell.source).order_by(GoldCell.id)).all()
    assert [tuple(c) for c in cells] == [
        (10.0, 20.0, "alive", "import:gold.csv"), (30.5, 40.0, "dead", "import:gold.csv"),
        (500.0, 390.0, "dead", "import:gold.csv")]
    again = import_gold(session, project, path)
    assert (again.imported, again.already_present) == (0, 4)
    assert _count(session) == 3


def test_an_image_named_without_its_extension_is_found_as_in_metadata(session, project, tmp_path: Path) -> None:
    """Metadata CSVs accept ``a`` for ``a.png``; expert-cell CSVs refused it ("no image named 'a'")."""
    session.add(Image(project_id=project.id, name="c.png", width=10, height=10, has_pixels=True))
    session.add(Image(project_id=project.id, name="c.tif", width=10, height=10, has_pixels=True))
    report = import_gold(session, project, _csv(tmp_path, f"{HEADER}\na,10,20,alive\nb.jpg,5,5,dead\n"))
    assert (report.imported, report.already_present) == (2, 0)
    placed = session.execute(select(Image.name, GoldCell.x).join(GoldCell, GoldCell.image_id == Image.id)
                             .order_by(GoldCell.x)).all()
    assert [tuple(p) for p in placed] == [("b.jpg", 5.0), ("a.png", 10.0)]
    assert import_gold(session, project, _csv(tmp_path, f"{HEADER}\na.png,10,20,alive\n")).already_present == 1
    with pytest.raises(GoldImportError) as info:
        import_gold(session, project, _csv(tmp_path, f"{HEADER}\nc,1,1,alive\n"))
    problem = info.value.problems[0]
    assert (problem.line, problem.field) == (2, "image")
    assert "'c' matches 2 images (c.png, c.tif); give the full file name" in problem.reason
    assert _count(session) == 2


def test_conflict_with_a_stored_cell(session, project, tmp_path: Path) -> None:
    import_gold(session, project, _csv(tmp_path, f"{HEADER}\na.png,10,20,alive\n"))
    with pytest.raises(GoldImportError, match="labelled 'alive' is at the same position in the store"):
        import_gold(session, project, _csv(tmp_path, f"{HEADER}\na.png,10,20,dead\na.png,1,1,dead\n"))
    assert _count(session) == 1


def test_parse_gold_csv_is_pure(tmp_path: Path) -> None:
    rows, problems = parse_gold_csv(_csv(tmp_path, f"{HEADER}\na.png,1,2,alive\nb.png,x,2,dead\n"))
    assert [(r.image, r.x, r.y, r.label, r.line) for r in rows] == [("a.png", 1.0, 2.0, "alive", 2)]
    assert [(p.line, p.field) for p in problems] == [(3, "x")]


@pytest.mark.shared_data
def test_real_ldc_annotations(session, shared_data: Path, tmp_path: Path) -> None:
    import csv

    folder = shared_data / "ldc_living_dead_cells"
    project = get_or_create_project(session, "ldc")
    with open(folder / "manifest.csv", newline="") as handle:
        session.add_all([Image(project_id=project.id, name=r["image"], width=int(r["width"]), height=int(r["height"]))
                         for r in csv.DictReader(handle)])
    report = import_gold(session, project, folder / "annotations.csv")
    assert (report.rows, report.imported) == (1427, 1427)
    labels = dict(session.execute(select(GoldCell.label, func.count()).group_by(GoldCell.label)).tuples().all())
    assert labels == {"alive": 1174, "dead": 253}


def test_gold_for_a_project_without_images_asks_whether_it_is_the_right_one(session, tmp_path: Path) -> None:
    empty = get_or_create_project(session, "typo")
    with pytest.raises(GoldImportError, match="it has no images at all: is it the right --project"):
        import_gold(session, empty, _csv(tmp_path, f"{HEADER}\na.png,1,1,dead\n"))


def test_a_pixel_less_image_sized_by_its_clicks_grows_to_hold_gold_cells(session, tmp_path: Path) -> None:
    from cellspot.importers import import_clicks

    project = get_or_create_project(session, "clicks-only")
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("image,annotator,x,y,label\nunknown.png,s1,10,20,alive\n")
    import_clicks(session, project, clicks)
    image = session.scalar(select(Image).where(Image.name == "unknown.png"))
    assert (image.width, image.height, image.has_pixels) == (11, 21, False)  # a lower bound from the click
    report = import_gold(session, project, _csv(tmp_path, f"{HEADER}\nunknown.png,30,30,alive\n"))
    assert report.imported == 1
    assert (image.width, image.height) == (31, 31)
    assert image.meta.get("size_from") == "clicks"  # still a lower bound: a file of its real size attaches

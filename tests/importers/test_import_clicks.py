"""Click importers: tidy CSV and PyBossa parsers (every bad input), import rules, the real export."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cellspot.importers import ClickImportError, import_clicks, parse_pybossa_taskruns, parse_tidy_csv
from cellspot.importers.clicks import detect_format
from cellspot.store.models import Annotator, Click, Image, TaskRun
from cellspot.store.queries import get_or_create_project

TIDY_HEADER = "image,annotator,x,y,label"
PYBOSSA_HEADER = "alive_array,cells_alive,task"
LINK = "http://pybossa.socientize.eu/cellspotting/static/img/input/feb2013-1-1"


def _write(tmp_path: Path, text: str, name: str = "clicks.csv") -> Path:
    folder = tmp_path / "input"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _counts(session) -> dict[str, int]:
    session.flush()
    return {m.__name__: session.scalar(select(func.count()).select_from(m)) for m in (Image, Annotator, TaskRun, Click)}


# ----------------------------------------------------------------------------- tidy CSV parser

# name, CSV text (header included), expected (line, field, reason fragment)
TIDY_BAD = [
    ("x outside declared image", "image,annotator,x,y,label,width,height\na.png,s1,300,5,alive,200,100\n",
     (2, "x", "outside the image (200x100)")),
    ("y outside declared image", "image,annotator,x,y,label,width,height\na.png,s1,3,100,alive,200,100\n",
     (2, "y", "outside")),
    ("negative y", f"{TIDY_HEADER}\na.png,s1,3,-1,alive\n", (2, "y", "negative")),
    ("NaN x", f"{TIDY_HEADER}\na.png,s1,nan,5,alive\n", (2, "x", "NaN")),
    ("infinite y", f"{TIDY_HEADER}\na.png,s1,3,inf,alive\n", (2, "y", "not finite")),
    ("x not a number", f"{TIDY_HEADER}\na.png,s1,abc,5,alive\n", (2, "x", "not a number")),
    ("x missing", f"{TIDY_HEADER}\na.png,s1,,5,alive\n", (2, "x", "missing value")),
    ("unknown label", f"{TIDY_HEADER}\na.png,s1,3,5,zombie\n", (2, "label", "unknown label 'zombie'")),
    ("label missing", f"{TIDY_HEADER}\na.png,s1,3,5,\n", (2, "label", "missing value")),
    ("every bad field of a row", f"{TIDY_HEADER}\na.png,s1,abc,-2,zombie\n",
     (2, "x, y, label", "x: x='abc' is not a number; y: y=-2 is negative (allowed y >= 0); label: unknown label")),
    ("image missing", f"{TIDY_HEADER}\n,s1,3,5,alive\n", (2, "image", "missing value")),
    ("annotator missing and bad click fields", f"{TIDY_HEADER}\na.png,,abc,-4,zombie\n",
     (2, "annotator, x, y, label", "annotator: missing value; x: x='abc' is not a number; y: y=-4 is negative")),
    ("huge x (would overflow the store's integers)", f"{TIDY_HEADER}\na.png,s1,1e20,5,alive\n",
     (2, "x", "x=1e+20 is beyond 1,000,000 px")),
    ("annotator missing", f"{TIDY_HEADER}\na.png,,3,5,alive\n", (2, "annotator", "missing value")),
    ("bad timestamp", f"{TIDY_HEADER},timestamp\na.png,s1,3,5,alive,yesterday\n", (2, "timestamp", "ISO 8601")),
    ("too many fields", f"{TIDY_HEADER}\na.png,s1,3,5,alive,extra\n", (2, "row", "6 fields")),
    ("bad width", "image,annotator,x,y,label,width,height\na.png,s1,3,5,alive,-4,10\n",
     (2, "width", "positive whole number")),
    ("inconsistent size", "image,annotator,x,y,label,width,height\na.png,s1,3,5,alive,20,10\na.png,s2,3,5,dead,30,10\n",
     (3, "width", "on line 2")),
    ("run reused for another image", f"{TIDY_HEADER},task_run\na.png,s1,3,5,alive,r1\nb.png,s1,3,5,alive,r1\n",
     (3, "task_run", "one run covers one image")),
    ("bad timestamp hides no other field", f"{TIDY_HEADER},timestamp\na.png,s1,x1,5,zombie,yesterday\n",
     (2, "timestamp, x, label", "timestamp: timestamp 'yesterday' is not ISO 8601 (e.g. 2014-03-01T10:15:00Z); "
                                "x: x='x1' is not a number; label: unknown label 'zombie'")),
    ("bad width hides no other field", "image,annotator,x,y,label,width,height\na.png,s1,3,-5,alive,-4,10\n",
     (2, "width, y", "y: y=-5 is negative")),
    ("a NUL in an image name", f"{TIDY_HEADER}\nok\x00.png,s1,1,1,alive\n",
     (2, "image", "holds a control character (a NUL byte, a tab or a line break)")),
    ("missing annotator and a bad timestamp", f"{TIDY_HEADER},timestamp\nc.png,,1,1,bogus,bad\n",
     (2, "annotator, timestamp, label", "annotator: missing value; timestamp: timestamp 'bad' is not ISO 8601")),
    ("bad width and height", "image,annotator,x,y,label,width,height\na.png,s1,3,5,alive,x,y\n",
     (2, "width, height", "width: width='x' is not a number; height: height='y' is not a number")),
    ("run conflict hides no other field", f"{TIDY_HEADER},task_run\na.png,s1,3,5,alive,r1\nb.png,s1,-1,5,zombie,r1\n",
     (3, "task_run, x, label", "task_run: task_run 'r1' is image 'a.png'")),
    ("multi-line field", f'{TIDY_HEADER},timestamp\n"a\n.png",s1,3,5,alive,\na.png,s1,3,5,alive,\n',
     (2, "image", "a quoted field runs over lines 2-3")),
]


@pytest.mark.parametrize(("name", "text", "expected"), TIDY_BAD, ids=[c[0] for c in TIDY_BAD])
def test_tidy_parser_rejects(name: str, text: str, expected: tuple, tmp_path: Path) -> None:
    path = _write(tmp_path, text)
    parsed = parse_tidy_csv(path)
    assert len(parsed.rejects) == 1, parsed.rejects
    problem = parsed.rejects[0]
    line, field, fragment = expected
    assert (problem.file, problem.line, problem.field) == (str(path), line, field)
    assert fragment in problem.reason
    assert parsed.n_records == len(parsed.clicks) + len(parsed.rejects)


def test_tidy_parser_good_rows(tmp_path: Path) -> None:
    text = (
        f"{TIDY_HEADER},task_run,timestamp\n"
        "a.png,s1,3,5,alive,,2014-03-01T10:00:00Z\n"
        "a.png,s1,7.5,9,not_sure_alive,,2014-03-01T10:00:05\n"
        "a.png,s2,4,4,Dead,r9,\n"
        "b.png,s2,,,,,\n"  # a run that saw b.png and marked nothing
    )
    parsed = parse_tidy_csv(_write(tmp_path, text))
    assert parsed.rejects == []
    assert [(c.x, c.y, c.label, c.click_index) for c in parsed.clicks] == [
        (3.0, 5.0, "alive", 0), (7.5, 9.0, "not_sure", 1), (4.0, 4.0, "dead", 0)]
    assert set(parsed.runs) == {"s1@a.png", "r9", "s2@b.png"}
    run = parsed.runs["s1@a.png"]
    assert (run.started_at.isoformat(), run.submitted_at.isoformat()) == (
        "2014-03-01T10:00:00+00:00", "2014-03-01T10:00:05+00:00")
    assert parsed.runs["s2@b.png"].n_source_clicks == 0
    assert parsed.n_records == 3


@pytest.mark.parametrize(("text", "fields"), [
    ("image,annotator,x,y\na.png,s1,1,2\n", ["label"]),
    ("picture,who,x,y,label\n", ["image", "annotator"]),
])
def test_tidy_missing_column_fails_the_file(text: str, fields: list[str], tmp_path: Path) -> None:
    with pytest.raises(ClickImportError) as info:
        parse_tidy_csv(_write(tmp_path, text))
    assert [(p.line, p.field) for p in info.value.problems] == [(1, f) for f in fields]
    assert "missing column" in str(info.value)


def test_empty_and_binary_files_fail(tmp_path: Path) -> None:
    with pytest.raises(ClickImportError, match="empty"):
        parse_tidy_csv(_write(tmp_path, ""))
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ClickImportError, match="UTF-8"):
        parse_tidy_csv(path)


# ----------------------------------------------------------------------------- PyBossa parser

PYBOSSA_BAD = [
    ("malformed literal", f"{PYBOSSA_HEADER}\n\"[[u'alive', 1, 2]\",1,{LINK}\n", (2, "alive_array", "malformed literal")),
    ("not a list", f"{PYBOSSA_HEADER}\n5,1,{LINK}\n", (2, "alive_array", "malformed literal: a int")),
    ("call in literal", f"{PYBOSSA_HEADER}\n\"[[u'alive', float('nan'), 2]]\",1,{LINK}\n", (2, "alive_array", "malformed")),
    ("empty cell", f"{PYBOSSA_HEADER}\n,1,{LINK}\n", (2, "alive_array", "missing value")),
    ("item too short", f"{PYBOSSA_HEADER}\n\"[[u'alive', 1]]\",1,{LINK}\n", (2, "alive_array[0]", "expected [label, x, y]")),
    ("unknown label", f"{PYBOSSA_HEADER}\n\"[[u'alive', 1, 2], [u'zombie', 1, 2]]\",2,{LINK}\n",
     (2, "alive_array[1]", "unknown label 'zombie'")),
    ("x as text", f"{PYBOSSA_HEADER}\n\"[[u'dead', '1', 2]]\",1,{LINK}\n", (2, "alive_array[0]", "not a number")),
    ("x outside frame", f"{PYBOSSA_HEADER}\n\"[[u'dead', 524, 2]]\",1,{LINK}\n",
     (2, "alive_array[0]", "outside the 524x391 display frame")),
    ("y negative", f"{PYBOSSA_HEADER}\n\"[[u'dead', 5, -3]]\",1,{LINK}\n", (2, "alive_array[0]", "y=-3 is outside")),
    ("bool coordinate", f"{PYBOSSA_HEADER}\n\"[[u'dead', True, 3]]\",1,{LINK}\n", (2, "alive_array[0]", "not a number")),
    ("task missing", f"{PYBOSSA_HEADER}\n\"[[u'dead', 5, 3]]\",1,\n", (2, "task", "missing value")),
    ("too many fields", f"{PYBOSSA_HEADER}\n[],0,{LINK},extra\n", (2, "row", "4 fields")),
]


@pytest.mark.parametrize(("name", "text", "expected"), PYBOSSA_BAD, ids=[c[0] for c in PYBOSSA_BAD])
def test_pybossa_parser_rejects(name: str, text: str, expected: tuple, tmp_path: Path) -> None:
    good_row = f"\"[[u'alive', 10, 20]]\",1,{LINK}-2\n"
    path = _write(tmp_path, text + good_row)
    parsed = parse_pybossa_taskruns(path)
    assert len(parsed.rejects) == 1, parsed.rejects
    problem = parsed.rejects[0]
    line, field, fragment = expected
    assert (problem.line, problem.field) == (line, field)
    assert fragment in problem.reason
    assert [(c.x, c.y, c.label) for c in parsed.clicks if parsed.runs[c.run].image == "feb2013-1-1-2.jpg"] == [
        (10.0, 20.0, "alive")]
    assert parsed.n_records == len(parsed.clicks) + len(parsed.rejects)


def test_pybossa_parser_runs_and_names(tmp_path: Path) -> None:
    text = (
        f"{PYBOSSA_HEADER}\n"
        f"\"[[u'alive', 97, 17], [u'not_sure_alive', 1.5, 2.5]]\",2,{LINK}\n"
        f"[],0,{LINK}.jpg\n"
        f"\"[[u'dead', 3, 4]]\",1,http://host/img/x.png?v=2\n"
    )
    parsed = parse_pybossa_taskruns(_write(tmp_path, text))
    assert parsed.rejects == [] and parsed.frame == (524, 391)
    runs = list(parsed.runs.values())
    assert [(r.key, r.image, r.annotator, r.n_source_clicks) for r in runs] == [
        ("0", "feb2013-1-1.jpg", "pybossa-run-0", 2),
        ("1", "feb2013-1-1.jpg", "pybossa-run-1", 0),
        ("2", "x.png", "pybossa-run-2", 1),
    ]
    assert runs[0].class_code == f"pybossa-{parsed.sha256[:12]}"
    assert [(c.x, c.y, c.label) for c in parsed.clicks][:2] == [(97.0, 17.0, "alive"), (1.5, 2.5, "not_sure")]


def test_pybossa_missing_column(tmp_path: Path) -> None:
    with pytest.raises(ClickImportError) as info:
        parse_pybossa_taskruns(_write(tmp_path, "alive_array,cells_alive\n[],0\n"))
    assert [(p.line, p.field) for p in info.value.problems] == [(1, "task")]


@pytest.mark.parametrize(("header", "expected"), [
    (PYBOSSA_HEADER, "pybossa"), (TIDY_HEADER, "csv"), (f"{TIDY_HEADER},task_run", "csv"), ("a,b,c", None)])
def test_detect_format(header: str, expected: str | None, tmp_path: Path) -> None:
    path = _write(tmp_path, header + "\n")
    if expected is None:
        with pytest.raises(ClickImportError, match="unknown click file format"):
            detect_format(path)
    else:
        assert detect_format(path) == expected


@pytest.mark.parametrize(("header", "fields"), [
    ("image,annotator,x,label", ["y"]), ("image,x,y", ["annotator", "label"]), ("alive_array,cells_alive", ["task"])])
def test_detect_format_names_missing_columns(header: str, fields: list[str], tmp_path: Path) -> None:
    with pytest.raises(ClickImportError, match="missing column") as info:
        detect_format(_write(tmp_path, header + "\n"))
    assert [(p.line, p.field) for p in info.value.problems] == [(1, f) for f in fields]


# ----------------------------------------------------------------------------- import into the store


def test_strict_import_writes_nothing(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s2,3,nan,alive\nb.png,s1,1,1,maybe\n")
    before = _counts(session)
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, path, settings=settings)
    message = str(info.value)
    assert f"{path}:3: y: y is NaN" in message and f"{path}:4: label: unknown label 'maybe'" in message
    assert "2 problem(s); nothing was imported" in message
    assert _counts(session) == before
    assert not settings.rejects_dir.exists()


def test_strict_message_lists_twenty_problems_and_a_count(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    rows = "".join(f"a.png,s1,{i},5,bad\n" for i in range(25))
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, _write(tmp_path, f"{TIDY_HEADER}\n{rows}"), settings=settings)
    assert "... and 5 more" in str(info.value)
    assert len(info.value.problems) == 25


def test_skip_invalid_writes_rejects_under_home(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    text = f"{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s2,3,nan,alive\na.png,s2,4,4,dead\nb.png,s3,1,1,maybe\n"
    path = _write(tmp_path, text)
    report = import_clicks(session, project, path, skip_invalid=True, settings=settings)
    assert (report.imported, report.rejected, report.already_present, report.records) == (2, 2, 0, 4)
    assert (report.runs_imported, report.runs_dropped) == (2, 1)  # s3's only click was rejected
    assert report.rejects_path is not None and report.rejects_path.parent == settings.rejects_dir
    assert sorted(p.name for p in path.parent.iterdir()) == ["clicks.csv"]  # nothing beside the input
    with open(report.rejects_path, newline="") as handle:
        rejects = list(csv.DictReader(handle))
    assert [(r["line"], r["field"], r["value"]) for r in rejects] == [("3", "y", "nan"), ("5", "label", "maybe")]
    assert all(r["file"] == str(path) and r["reason"] for r in rejects)
    assert _counts(session) == {"Image": 1, "Annotator": 2, "TaskRun": 2, "Click": 2}


def test_reimport_changes_nothing(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{TIDY_HEADER},task_run\na.png,s1,3,5,alive,1\na.png,s1,9,9,dead,1\nb.png,s2,,,,2\n")
    first = import_clicks(session, project, path, settings=settings)
    assert (first.imported, first.runs_imported, first.images_created, first.annotators_created) == (2, 2, 2, 2)
    after_first = _counts(session)
    second = import_clicks(session, project, path, settings=settings)
    assert (second.imported, second.already_present, second.runs_already_present) == (0, 2, 2)
    assert (second.images_created, second.annotators_created) == (0, 0)
    assert _counts(session) == after_first


def test_a_corrected_file_never_stores_a_run_twice(session, settings, tmp_path: Path) -> None:
    """Import with --skip-invalid, fix the rejected row, import the fixed file: the helper's flow."""
    project = get_or_create_project(session, "p")
    v1 = _write(tmp_path, f"{TIDY_HEADER}\na.png,stu1,10,20,alive\na.png,stu1,30,40,dead\n"
                          "b.png,stu2,50,50,alive\nb.png,stu2,60,60,zombie\n", "v1.csv")
    first = import_clicks(session, project, v1, skip_invalid=True, settings=settings)
    assert (first.imported, first.rejected, first.runs_imported) == (3, 1, 2)
    v2 = _write(tmp_path, v1.read_text().replace("zombie", "dead"), "v2.csv")
    before = _counts(session)
    with pytest.raises(ClickImportError) as info:  # stu2's run has another click now: not silently doubled
        import_clicks(session, project, v2, settings=settings)
    assert [(p.line, p.field) for p in info.value.problems] == [(4, "annotator")]
    assert ("the run of 'stu2' on 'b.png' was imported before (from v1.csv) with other clicks "
            "(1 stored, 2 in this file)") in str(info.value)
    assert "replace_runs / --replace-runs" in str(info.value)
    assert _counts(session) == before
    fixed = import_clicks(session, project, v2, settings=settings, replace_runs=True)
    # stu1's run is the same in both files: already present; stu2's is replaced
    assert (fixed.runs_imported, fixed.runs_replaced, fixed.runs_already_present) == (1, 1, 1)
    assert (fixed.imported, fixed.already_present) == (2, 2)
    assert "1 imported (1 replacing earlier imports)" in fixed.summary()
    assert _counts(session) == {"Image": 2, "Annotator": 2, "TaskRun": 2, "Click": 4}
    again = _write(tmp_path, v2.read_text() + "a.png,stu1,10,20,alive\n", "v3.csv")  # stu1 with a third click
    with pytest.raises(ClickImportError, match="'stu1' on 'a.png'"):
        import_clicks(session, project, again, settings=settings)


@pytest.mark.parametrize("replace_runs", [False, True])
def test_a_copy_with_rejected_rows_never_replaces_a_stored_run(session, settings, tmp_path: Path,
                                                               replace_runs: bool) -> None:
    """With --skip-invalid (and --replace-runs), a run of a later file whose rows were all or
    partly rejected replaced the stored complete run with nothing, or with fewer clicks."""
    project = get_or_create_project(session, "p")
    v1 = _write(tmp_path, f"{TIDY_HEADER}\na.png,stu1,10,20,alive\na.png,stu1,30,40,dead\n"
                          "b.png,stu2,50,50,alive\nb.png,stu2,60,60,dead\nc.png,stu3,5,5,alive\n", "v1.csv")
    import_clicks(session, project, v1, settings=settings)
    before = _counts(session)
    stored = sorted(session.execute(select(Click.x, Click.y, Click.label)).all())
    v2 = _write(tmp_path, f"{TIDY_HEADER}\na.png,stu1,10,20,zombie\na.png,stu1,30,40,zombie\n"  # all rejected
                          "b.png,stu2,50,50,alive\nb.png,stu2,60,60,maybe\n"  # one of two rejected
                          "c.png,stu3,5,5,alive\nd.png,stu4,1,1,dead\n", "v2.csv")
    report = import_clicks(session, project, v2, skip_invalid=True, replace_runs=replace_runs, settings=settings)
    assert (report.runs_kept, report.runs_replaced, report.runs_imported, report.runs_already_present) == (2, 0, 1, 1)
    assert (report.imported, report.rejected, report.already_present, report.skipped) == (1, 3, 1, 1)
    assert report.imported + report.rejected + report.already_present + report.skipped == report.records
    assert "2 kept as stored (1 valid click(s) of their copies here not imported" in report.summary()
    assert _counts(session) == {**before, "Image": before["Image"] + 1, "Annotator": before["Annotator"] + 1,
                                "TaskRun": before["TaskRun"] + 1, "Click": before["Click"] + 1}
    assert sorted(session.execute(select(Click.x, Click.y, Click.label)).all()) == sorted([*stored, (1.0, 1.0, "dead")])


def test_names_longer_than_the_store_takes_are_rejected_with_their_line(session, settings, tmp_path: Path) -> None:
    """PostgreSQL failed the whole batch with "value too long" and no line; SQLite took them."""
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{TIDY_HEADER}\n{'i' * 501},s1,3,5,alive\nb.png,{'n' * 201},3,5,alive\n"
                            f"{'i' * 500},{'n' * 200},3,5,alive\n")
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, path, settings=settings)
    assert [(p.line, p.field, p.reason) for p in info.value.problems] == [
        (2, "image", "501 characters; at most 500 are allowed"),
        (3, "annotator", "201 characters; at most 200 are allowed")]
    report = import_clicks(session, project, path, skip_invalid=True, settings=settings)
    assert (report.imported, report.rejected) == (1, 2)


def test_a_quote_left_open_is_named_and_the_lines_it_swallowed_counted(session, settings, tmp_path: Path) -> None:
    """A stray opening quote read every later line into one field: the reject said "x is not
    a number" and --skip-invalid lost those lines without a word."""
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f'{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s2,"10,10,alive\na.png,s3,5,5,dead\n'
                            "a.png,s4,6,6,dead\n")
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, path, settings=settings)
    [problem] = info.value.problems
    assert (problem.line, problem.field) == (3, "x")
    assert problem.reason.startswith('a quoted field runs over lines 3-5: a quote (") opened on line 3 is not closed, '
                                     "so the 2 line(s) after it were read into this field")


def test_a_repeated_column_is_refused(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, _write(tmp_path, f"{TIDY_HEADER},x\na.png,s1,10,4,alive,250\n"),
                      settings=settings)
    assert [(p.line, p.field, p.reason) for p in info.value.problems] == [
        (1, "x", "the header has column 'x' 2 times (columns 3, 6); keep one")]
    assert _counts(session)["Click"] == 0


def test_a_task_run_id_in_two_files_is_one_run(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    header = f"{TIDY_HEADER},task_run"
    import_clicks(session, project, _write(tmp_path, f"{header}\na.png,s1,3,5,alive,run-1\n", "one.csv"),
                  settings=settings)
    same = import_clicks(session, project, _write(
        tmp_path, f"{header}\na.png,s1,3,5,alive,run-1\nb.png,s2,1,1,dead,run-2\n", "two.csv"), settings=settings)
    assert (same.runs_imported, same.runs_already_present, same.imported, same.already_present) == (1, 1, 1, 1)
    with pytest.raises(ClickImportError, match=r"task_run 'run-1' was imported before \(from one.csv\)"):
        import_clicks(session, project, _write(tmp_path, f"{header}\na.png,s1,4,5,alive,run-1\n", "three.csv"),
                      settings=settings)
    # another annotator's run-1 (ids reused by another export) is another run
    other = import_clicks(session, project, _write(tmp_path, f"{header}\na.png,s9,4,5,alive,run-1\n", "four.csv"),
                          settings=settings)
    assert other.runs_imported == 1
    assert _counts(session)["TaskRun"] == 3


def test_exact_duplicate_clicks_are_kept_and_reported(session, settings, tmp_path: Path, caplog) -> None:
    project = get_or_create_project(session, "p")
    # line 4 repeats line 2 (same run, x, y, label); line 5 is the same point with another label and
    # line 6 the same click by another annotator: neither is a duplicate
    path = _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s1,9,9,dead\na.png,s1,3,5,alive\n"
                            "a.png,s1,3,5,dead\na.png,s2,3,5,alive\n")
    with caplog.at_level("INFO", logger="cellspot.importers.clicks"):
        report = import_clicks(session, project, path, settings=settings)
    assert report.imported == 5 and report.duplicates == [(4, 2)]
    assert "1 click(s) repeat an earlier click of the same run exactly" in report.summary()
    assert "line 4 (repeats line 2)" in caplog.text
    # logged at INFO: the CLI prints the summary with its warning once (a WARNING record showed it twice)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    clean = import_clicks(session, get_or_create_project(session, "q"),
                          _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\n", "clean.csv"), settings=settings)
    assert clean.duplicates == [] and "warning" not in clean.summary()


def test_a_reimport_writes_no_duplicates_and_reports_none(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s1,3,5,alive\n")
    assert import_clicks(session, project, path, settings=settings).duplicates == [(3, 2)]
    again = import_clicks(session, project, path, settings=settings)
    assert again.imported == 0 and again.duplicates == []


def test_tidy_sizes_for_new_and_stored_images(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    for name in ("stored.png", "stored2.png"):
        session.add(Image(project_id=project.id, name=name, width=100, height=50, has_pixels=True))
    text = (
        "image,annotator,x,y,label,width,height\n"
        "declared.png,s1,3,5,alive,300,224\n"
        "inferred.png,s1,10.5,20,alive,,\n"
        "inferred.png,s2,99,7.2,dead,,\n"
        "stored.png,s1,99,49,alive,,\n"
        "stored.png,s2,120,60,alive,,\n"  # both outside the stored image: both named
        "stored2.png,s3,1,1,alive,200,100\n"
        "stored2.png,s4,1,1,alive,,\n"  # the file says stored2 is 200x100: all its clicks are suspect
    )
    report = import_clicks(session, project, _write(tmp_path, text), skip_invalid=True, settings=settings)
    sizes = {i.name: (i.width, i.height, i.has_pixels) for i in session.scalars(select(Image))}
    assert sizes == {"declared.png": (300, 224, False), "inferred.png": (100, 21, False),
                     "stored.png": (100, 50, True), "stored2.png": (100, 50, True)}
    assert (report.rejected, report.imported, report.runs_dropped) == (3, 4, 3)
    with open(report.rejects_path, newline="") as handle:
        rejects = [(r["line"], r["field"], r["reason"]) for r in csv.DictReader(handle)]
    assert rejects == [
        ("6", "x, y", "x: x=120 is outside image 'stored.png' (100x50) (allowed 0 <= x < 100); "
                      "y: y=60 is outside image 'stored.png' (100x50) (allowed 0 <= y < 50)"),
        ("7", "width", "image 'stored2.png' is 200x100 in the file but 100x50 in the store"),
        ("8", "width", "image 'stored2.png' is 200x100 in the file but 100x50 in the store"),
    ]


def test_pybossa_clicks_scaled_to_stored_image(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    session.add(Image(project_id=project.id, name="big.jpg", width=1048, height=782, has_pixels=True,
                      sha256="1" * 64, path="images/11/x.jpg"))
    text = (f"{PYBOSSA_HEADER}\n\"[[u'alive', 100, 50], [u'dead', 523, 390]]\",2,http://h/big\n"
            f"\"[[u'alive', 100, 50]]\",1,http://h/new\n[],0,http://h/new\n")
    report = import_clicks(session, project, _write(tmp_path, text), settings=settings)
    assert (report.imported, report.runs_imported, report.images_created) == (3, 3, 1)
    rows = session.execute(
        select(Image.name, Click.x, Click.y).join(TaskRun, Click.task_run_id == TaskRun.id)
        .join(Image, TaskRun.image_id == Image.id).order_by(Click.id)).all()
    assert [tuple(r) for r in rows] == [("big.jpg", 200.0, 100.0), ("big.jpg", 1046.0, 780.0), ("new.jpg", 100.0, 50.0)]
    new = session.scalars(select(Image).where(Image.name == "new.jpg")).one()
    assert (new.width, new.height, new.has_pixels) == (524, 391, False)
    runs = session.scalars(select(TaskRun).join(Image).where(Image.name == "new.jpg")).all()
    assert sorted(len(r.clicks) for r in runs) == [0, 1]  # the empty run is kept: it saw the image
    annotators = session.scalars(select(Annotator)).all()
    assert {a.role for a in annotators} == {"imported"} and len(annotators) == 3


def test_the_same_pybossa_export_with_other_line_endings_or_a_bom_is_already_present(
        session, settings, tmp_path: Path) -> None:
    """PyBossa rows are anonymous, so runs are known by the file's digest; it was the bytes'
    digest, and the same export saved with CRLF or a byte-order mark was imported again."""
    project = get_or_create_project(session, "p")
    rows = [f"{PYBOSSA_HEADER}", "\"[[u'alive', 100, 50]]\",1,http://h/a", "[],0,http://h/a"]
    lf = tmp_path / "lf.csv"
    lf.write_bytes(("\n".join(rows) + "\n").encode())
    first = import_clicks(session, project, lf, settings=settings)
    assert (first.runs_imported, first.imported) == (2, 1)
    before = _counts(session)
    for name, data in (("crlf.csv", ("\r\n".join(rows) + "\r\n").encode()),
                       ("bom.csv", b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())):
        (tmp_path / name).write_bytes(data)
        again = import_clicks(session, project, tmp_path / name, settings=settings)
        assert (again.runs_imported, again.runs_already_present, again.already_present) == (0, 2, 1), name
        assert _counts(session) == before, name
    other = tmp_path / "other.csv"  # another export (one more run) is another file
    other.write_bytes(("\n".join([*rows, "[],0,http://h/b"]) + "\n").encode())
    assert import_clicks(session, project, other, settings=settings).runs_imported == 3


def test_pybossa_runs_stored_under_the_bytes_digest_are_present(session, settings, tmp_path: Path) -> None:
    """A store filled before the digest became the records' one: its runs still count as present."""
    from cellspot.imaging import sha256_file
    from cellspot.importers.clicks import _client_key

    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{PYBOSSA_HEADER}\r\n\"[[u'alive', 100, 50]]\",1,http://h/a\r\n")
    import_clicks(session, project, path, settings=settings)
    run = session.scalars(select(TaskRun)).one()
    parsed = parse_pybossa_taskruns(path)
    assert parsed.earlier_sha256 == (sha256_file(path),) and parsed.sha256 != sha256_file(path)
    run.client_key = _client_key(project.id, sha256_file(path), "0")  # as the earlier version stored it
    session.flush()
    again = import_clicks(session, project, path, settings=settings)
    assert (again.runs_imported, again.runs_already_present) == (0, 1)
    assert _counts(session)["TaskRun"] == 1


def test_timestamps_and_source_on_runs(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    path = _write(tmp_path, f"{TIDY_HEADER},timestamp\na.png,s1,3,5,alive,2014-03-01T10:00:00\n")
    import_clicks(session, project, path, format="csv", settings=settings)
    run = session.scalars(select(TaskRun)).one()
    assert run.submitted_at.replace(tzinfo=None).isoformat() == "2014-03-01T10:00:00"
    assert run.source == "import:csv:clicks.csv" and run.client_key.startswith("import:")


def test_unknown_format_name(session, settings, tmp_path: Path) -> None:
    project = get_or_create_project(session, "p")
    with pytest.raises(ValueError, match="allowed: auto, csv, pybossa"):
        import_clicks(session, project, _write(tmp_path, f"{TIDY_HEADER}\n"), format="json", settings=settings)


# ----------------------------------------------------------------------------- the real export


def _real_clicks(shared_data: Path) -> tuple[Path, list[dict[str, str]]]:
    folder = shared_data / "cellspotting_clicks"
    with open(folder / "clicks.csv", newline="") as handle:
        return folder / "pybossa_taskruns_1000.csv", list(csv.DictReader(handle))


@pytest.mark.shared_data
def test_real_pybossa_file_strict_rejects_the_off_frame_click(session, settings, shared_data: Path) -> None:
    path, _ = _real_clicks(shared_data)
    project = get_or_create_project(session, "p")
    with pytest.raises(ClickImportError) as info:
        import_clicks(session, project, path, settings=settings)
    assert [(p.line, p.field) for p in info.value.problems] == [(617, "alive_array[4]")]
    assert "y=-3 is outside the 524x391 display frame" in str(info.value)
    assert _counts(session) == {"Image": 0, "Annotator": 0, "TaskRun": 0, "Click": 0}


@pytest.mark.shared_data
def test_real_pybossa_file_every_click_accounted_for(session, settings, shared_data: Path) -> None:
    path, tidy = _real_clicks(shared_data)
    project = get_or_create_project(session, "p")
    report = import_clicks(session, project, path, skip_invalid=True, settings=settings)
    assert report.records == len(tidy) == 8004
    assert (report.imported, report.rejected, report.already_present) == (8003, 1, 0)
    assert (report.runs_imported, report.images_created, report.annotators_created) == (999, 800, 999)
    assert len(report.duplicates) == 7  # the export's repeated clicks, each within its row (one run)
    assert all(line == first for line, first in report.duplicates)
    assert "(an earlier click of the same row)" in report.summary() and "repeats line" not in report.summary()

    stored = session.execute(
        select(Image.name, Annotator.nickname, Click.click_index, Click.x, Click.y, Click.label)
        .join(TaskRun, Click.task_run_id == TaskRun.id).join(Image, TaskRun.image_id == Image.id)
        .join(Annotator, TaskRun.annotator_id == Annotator.id)).all()
    with open(report.rejects_path, newline="") as handle:
        rejects = list(csv.DictReader(handle))
    assert [(r["line"], r["field"]) for r in rejects] == [("617", "alive_array[4]")]
    label = {"alive": "alive", "dead": "dead", "not_sure_alive": "not_sure"}
    expected = Counter(
        (r["image_name"], f"pybossa-run-{r['annotator_run']}", int(r["click_index"]), float(r["x"]), float(r["y"]),
         label[r["label"]]) for r in tidy)
    got = Counter(tuple(row) for row in stored)
    missing = expected - got
    assert len(missing) == 1 and next(iter(missing))[1:] == ("pybossa-run-615", 4, 452.0, -3.0, "alive")
    assert not got - expected
    assert Counter(r[5] for r in stored) + Counter({"alive": 1}) == Counter({"alive": 5153, "dead": 2817, "not_sure": 34})

    again = import_clicks(session, project, path, skip_invalid=True, settings=settings)
    assert (again.imported, again.rejected, again.already_present, again.runs_already_present) == (0, 1, 8003, 999)
    assert _counts(session)["Click"] == 8003


BOUND = {"size_from": "clicks"}
# name, later file (the first one makes inferred.png 11x21 from its clicks), expected size, meta, rejected
LOWER_BOUND_CASES = [
    ("clicks beyond enlarge it", f"{TIDY_HEADER}\ninferred.png,s2,40,5,dead\n", (41, 21), BOUND, 0),
    ("clicks inside keep it", f"{TIDY_HEADER}\ninferred.png,s2,3,3,dead\n", (11, 21), BOUND, 0),
    ("declared size sets it", "image,annotator,x,y,label,width,height\ninferred.png,s2,3,3,dead,300,200\n",
     (300, 200), {}, 0),
    ("declared too small", "image,annotator,x,y,label,width,height\ninferred.png,s2,3,3,dead,5,5\n",
     (11, 21), BOUND, 1),
]


@pytest.mark.parametrize(("name", "text", "size", "meta", "rejected"), LOWER_BOUND_CASES,
                         ids=[c[0] for c in LOWER_BOUND_CASES])
def test_inferred_size_is_a_lower_bound(session, settings, tmp_path: Path, name, text, size, meta, rejected) -> None:
    project = get_or_create_project(session, "p")
    first = _write(tmp_path, f"{TIDY_HEADER}\ninferred.png,s1,10.5,20,alive\n", "first.csv")
    import_clicks(session, project, first, settings=settings)
    later = _write(tmp_path, text, "later.csv")
    report = import_clicks(session, project, later, skip_invalid=True, settings=settings)
    session.flush()
    image = session.scalars(select(Image).where(Image.name == "inferred.png")).one()
    assert ((image.width, image.height), image.meta, report.rejected) == (size, meta, rejected)


def test_same_file_into_two_projects_imports_into_both(session, settings, tmp_path: Path) -> None:
    path = _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\na.png,s2,4,5,dead\n")
    reports = [import_clicks(session, get_or_create_project(session, name), path, settings=settings)
               for name in ("one", "two")]
    assert [(r.imported, r.runs_imported, r.already_present) for r in reports] == [(2, 2, 0), (2, 2, 0)]
    again = import_clicks(session, get_or_create_project(session, "two"), path, settings=settings)
    assert (again.imported, again.already_present) == (0, 2)
    assert _counts(session) == {"Image": 2, "Annotator": 4, "TaskRun": 4, "Click": 4}


def test_the_python_api_takes_a_project_name(session, settings, tmp_path: Path) -> None:
    """The README shows ``import_clicks(session, project, path)`` beside functions that take a name;
    a name failed with "'str' object has no attribute 'id'"."""
    from PIL import Image as PILImage

    from cellspot.importers import import_gold, import_images
    from cellspot.store.queries import ProjectNotFoundError

    get_or_create_project(session, "p")
    report = import_clicks(session, "p", _write(tmp_path, f"{TIDY_HEADER}\na.png,s1,3,5,alive\n"), settings=settings)
    assert report.imported == 1 and _counts(session)["Click"] == 1
    folder = tmp_path / "images"
    folder.mkdir()
    PILImage.new("L", (8, 8)).save(folder / "b.png")
    assert import_images(session, "p", [folder], settings).imported == ["b.png"]
    for call in (lambda: import_clicks(session, "q", tmp_path / "clicks.csv", settings=settings),
                 lambda: import_images(session, "q", [folder], settings),
                 lambda: import_gold(session, "q", tmp_path / "clicks.csv")):
        with pytest.raises(ProjectNotFoundError, match="no project named 'q'; existing projects: 'p'"):
            call()

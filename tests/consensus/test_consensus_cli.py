"""``cellspot consensus CLICKS.csv --out OUT.csv``: stateless, file in / file out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cellspot.cli import main
from cellspot.consensus import ANNOTATOR_COLUMNS, CELL_COLUMNS

HEADER = "image,annotator,x,y,label"
# three students on two images, each 10 px right of the previous one; s3 adds a stray on img1
CLICKS = "\n".join([
    HEADER,
    *(f"img1,s{s},{x + 10 * s},{y},{lab}" for s in range(3)
      for x, y, lab in ((50, 50, "alive"), (200, 60, "dead"), (350, 200, "alive"))),
    *(f"img2,s{s},{x + 10 * s},{y},{lab}" for s in range(3)
      for x, y, lab in ((60, 300, "dead"), (300, 300, "alive"))),
    "img1,s2,480,40,alive",
]) + "\n"


def invoke(tmp_path: Path, text: str, *args: str):
    src = tmp_path / "in.csv"
    src.write_text(text)
    out = tmp_path / "out" / "cells.csv"
    result = CliRunner().invoke(main, ["consensus", str(src), "--out", str(out), *args])
    return result, out


def read_out(out: Path) -> pd.DataFrame:
    return pd.read_csv(out, dtype={"image": str, "label": str})


def test_writes_the_standard_columns(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS)
    assert result.exit_code == 0, result.output
    cells = read_out(out)
    assert list(cells.columns) == CELL_COLUMNS
    assert len(cells) == 5  # the stray (one run of three) is not a cell
    assert sorted(cells.groupby("image").size().items()) == [("img1", 3), ("img2", 2)]
    assert set(cells["label"]) == {"alive", "dead"}
    assert (cells["n_runs"] == 3).all() and (cells["support"] == 3).all()
    assert cells[["p_alive", "confidence", "p_cell"]].apply(lambda c: c.between(0, 1)).all().all()
    assert "5 cells" in result.output and "cluster_em" in result.output


def test_header_line_names_the_columns(tmp_path: Path) -> None:
    _, out = invoke(tmp_path, CLICKS)
    lines = out.read_text().splitlines()
    assert lines[0] == ",".join(CELL_COLUMNS)  # quoted only where needed, as the other CSVs
    assert lines[1].startswith("img1,") and '"' not in out.read_text()


def test_a_name_with_a_comma_or_a_quote_is_quoted_and_reads_back(tmp_path: Path) -> None:
    text = CLICKS.replace("img1", '"img,1"').replace("img2", '"say ""two"""')
    result, out = invoke(tmp_path, text)
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0] == ",".join(CELL_COLUMNS)
    assert sorted(read_out(out).groupby("image").size().items()) == [("img,1", 3), ('say "two"', 2)]


@pytest.mark.parametrize("method", ["cluster_em", "seed_r35", "dbscan_vote"])
def test_empty_input_gives_header_only(tmp_path: Path, method: str) -> None:
    result, out = invoke(tmp_path, HEADER + "\n", "--method", method)
    assert result.exit_code == 0, result.output
    cells = read_out(out)
    assert list(cells.columns) == CELL_COLUMNS
    assert cells.empty


def test_task_run_column_and_extra_columns_are_accepted(tmp_path: Path) -> None:
    text = "image,annotator,task_run,x,y,label,timestamp\n" + "".join(
        f"img1,anon,run{s},{100 + s},{100 - s},dead,2020-01-01\n" for s in range(3))
    result, out = invoke(tmp_path, text)
    assert result.exit_code == 0, result.output
    cells = read_out(out)
    # one anonymous annotator, three runs: one cell clicked by all three
    assert len(cells) == 1 and cells.iloc[0]["support"] == 3 and cells.iloc[0]["label"] == "dead"


BAD_FILES = {
    # name: (file text, words the error message must contain)
    "missing-column": ("image,x,y,label\na,1,2,alive\n", ["annotator"]),
    "nan-coordinate": (HEADER + "\na,s1,1,2,alive\na,s1,3,,alive\n", ["in.csv, line 3: field y"]),
    "text-coordinate": (HEADER + "\na,s1,abc,2,alive\n", ["in.csv, line 2: field x: 'abc'"]),
    # blank lines (which the reader skips) and a quoted field over two lines still give the file's line
    "after-blank-lines": (HEADER + "\n\na,s1,1,2,alive\n\n\na,s1,3,,alive\n", ["in.csv, line 6: field y"]),
    "after-multi-line-field": (HEADER + '\n"a\nb",s1,1,2,alive\na,s1,abc,2,alive\n', ["in.csv, line 4: field x"]),
    "empty-file": ("", ["in.csv: not a readable CSV file", "No columns"]),
    "unknown-label": (HEADER + "\na,s1,1,2,alive\na,s2,3,4,zombie\n", ["zombie", "alive, dead, not_sure"]),
}


@pytest.mark.parametrize(("text", "words"), BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_input_exits_non_zero_naming_the_problem(tmp_path: Path, text: str, words: list[str]) -> None:
    result, out = invoke(tmp_path, text)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output
    assert not out.exists()


def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path) -> None:
    src = tmp_path / "latin.csv"
    src.write_bytes((HEADER + "\ncaf\xe9,s1,1,2,alive\n").encode("latin-1"))
    result = CliRunner().invoke(main, ["consensus", str(src), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{src}: not a readable CSV file (UTF-8" in result.output and not (tmp_path / "o.csv").exists()


def test_unknown_method_lists_the_valid_ones(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS, "--method", "nope")
    assert result.exit_code != 0
    for name in ("cluster_em", "seed_r35", "dbscan_vote"):
        assert name in result.output
    assert not out.exists()


def test_missing_input_file_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["consensus", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.csv")])
    assert result.exit_code != 0
    assert "nope.csv" in result.output


def test_method_seed_r35(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS, "--method", "seed_r35")
    assert result.exit_code == 0, result.output
    cells = read_out(out)
    # reference = s0 (first rows of each image): its clicks are the cells, at its positions
    assert sorted(zip(cells["image"], cells["x"], cells["y"])) == [
        ("img1", 50.0, 50.0), ("img1", 200.0, 60.0), ("img1", 350.0, 200.0),
        ("img2", 60.0, 300.0), ("img2", 300.0, 300.0)]
    assert (cells["p_cell"] == 1.0).all()
    assert "seed_r35" in result.output


@pytest.mark.parametrize(
    ("method", "cell_radius", "support"),
    [("seed_r35", "5", 1), ("seed_r35", "25", 3), ("cluster_em", "25", 3), ("dbscan_vote", "25", 3)],
)
def test_cell_radius_option(tmp_path: Path, method: str, cell_radius: str, support: int) -> None:
    """Students are 10 px apart on every cell: a 5 px radius joins nobody, 25 px joins all."""
    result, out = invoke(tmp_path, CLICKS, "--method", method, "--cell-radius", cell_radius)
    assert result.exit_code == 0, result.output
    cells = read_out(out)
    assert cells["support"].max() == support


def test_annotators_out(tmp_path: Path) -> None:
    target = tmp_path / "rel" / "annotators.csv"
    result, _ = invoke(tmp_path, CLICKS, "--annotators-out", str(target))
    assert result.exit_code == 0, result.output
    annot = pd.read_csv(target)
    assert list(annot.columns) == ANNOTATOR_COLUMNS
    assert sorted(annot["annotator"]) == ["s0", "s1", "s2"]
    assert annot.set_index("annotator").loc["s2", "n_clicks"] == 6
    assert annot[["sensitivity", "weight"]].apply(lambda c: c.between(0, 1)).all().all()


def test_annotators_out_for_a_baseline_is_header_only(tmp_path: Path) -> None:
    target = tmp_path / "annotators.csv"
    result, _ = invoke(tmp_path, CLICKS, "--method", "seed_r35", "--annotators-out", str(target))
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(target).columns) == ANNOTATOR_COLUMNS


def test_integer_image_ids_are_kept(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS.replace("img1,", "1201,").replace("img2,", "98,"))
    assert result.exit_code == 0, result.output
    assert sorted(set(read_out(out)["image"])) == ["1201", "98"]


def test_numeric_looking_image_names_stay_names(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS.replace("img1,", "007,").replace("img2,", "1e3,"))
    assert result.exit_code == 0, result.output
    assert sorted(set(read_out(out)["image"])) == ["007", "1e3"]


def test_an_annotators_file_that_cannot_be_written_leaves_no_cells_file_either(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    result, out = invoke(tmp_path, CLICKS, "--annotators-out", str(tmp_path / "a_file" / "annotators.csv"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot write the output, nothing was written" in result.output
    assert not out.exists()


def test_a_cells_file_that_cannot_be_written_leaves_no_annotators_file(tmp_path: Path, monkeypatch) -> None:
    import cellspot.consensus.io as io

    def read_only(cells, path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(io, "write_cells_csv", read_only)
    annotators = tmp_path / "annotators.csv"
    result, out = invoke(tmp_path, CLICKS, "--annotators-out", str(annotators))
    assert result.exit_code == 1 and "Read-only file system" in result.output
    assert not annotators.exists() and list(tmp_path.glob("*.tmp")) == []


def test_any_operating_system_error_is_one_line_without_traceback(tmp_path: Path, monkeypatch) -> None:
    import cellspot.consensus.io as io

    def unreadable(path):
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(io, "read_clicks_csv", unreadable)
    result, _ = invoke(tmp_path, CLICKS)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Input/output error" in result.output and "check CELLSPOT_HOME and the paths given" in result.output


@pytest.mark.parametrize("body, expected", [
    ("a,s1,1,inf,alive\na,s1,nan,2,alive\n", "line 2: field y: 'inf' is not a finite number (2 bad rows)"),
    (",s1,1,2,alive\n", "line 2: field image: empty (1 bad rows)"),
    ("a, ,1,2,alive\n", "line 2: field annotator: empty"),
    ("a,s1,-5,2,zombie\n", "line 2: field x: '-5' is negative (pixel coordinates start at 0); field label: 'zombie'"),
    ("a,s1,1e308,2,alive\n", "line 2: field x: '1e+308' is beyond 1,000,000 px, more than any image has"),
    ("a,s1,nan,2,alive\n", "line 2: field x: 'nan' is not a finite number (1 bad rows)"),
    ("a,s1,3,NA,alive\na,s1,,2,alive\n", "line 2: field y: 'NA' is not a finite number (2 bad rows)"),
    ("a,s1,,2,alive\n", "line 2: field x: (empty) is not a finite number"),
])
def test_the_first_bad_row_names_all_its_bad_fields_and_nothing_is_written(tmp_path: Path, body: str,
                                                                           expected: str) -> None:
    result, out = invoke(tmp_path, HEADER + "\n" + body)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert expected in " ".join(result.output.split()), result.output
    assert not out.exists()


@pytest.mark.parametrize("radius", ["0", "-3", "1e308"])
def test_a_cell_radius_must_be_positive(tmp_path: Path, radius: str) -> None:
    result, out = invoke(tmp_path, CLICKS, "--cell-radius", radius)
    assert result.exit_code == 2 and "--cell-radius" in result.output and not out.exists()


def test_a_row_with_too_many_fields_names_its_line(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, HEADER + "\na,s1,1,2,alive\n\na,s1,3,4,alive,extra\n")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "in.csv, line 4: 6 fields where the header has 5: 'a,s1,3,4,alive,extra'" in result.output
    assert not out.exists()


def test_an_output_below_a_file_says_a_folder_is_needed(tmp_path: Path) -> None:
    (tmp_path / "env.sh").write_text("export A=1\n")
    src = tmp_path / "in.csv"
    src.write_text(CLICKS)
    result = CliRunner().invoke(main, ["consensus", str(src), "--out", str(tmp_path / "env.sh" / "cells.csv")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{tmp_path / 'env.sh'} is a file where a folder is needed" in " ".join(result.output.split())


def test_an_output_that_is_the_input_or_the_other_output_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(CLICKS)
    same_as_input = CliRunner().invoke(main, ["consensus", str(src), "--out", str(tmp_path / "." / "in.csv")])
    assert same_as_input.exit_code == 2 and "is not a cells CSV written by cellspot consensus" in same_as_input.output
    assert src.read_text() == CLICKS
    # an input that is itself a cells CSV (which --out may replace) is still never replaced
    cells_in = tmp_path / "cells_in.csv"
    cells_in.write_text(",".join(CELL_COLUMNS) + "\n")
    cells_as_input = CliRunner().invoke(main, ["consensus", str(cells_in), "--out", str(cells_in)])
    assert cells_as_input.exit_code == 2 and "is the input file CLICKS_CSV; the clicks would be lost" in cells_as_input.output
    assert cells_in.read_text() == ",".join(CELL_COLUMNS) + "\n"
    out = tmp_path / "o.csv"
    both = CliRunner().invoke(main, ["consensus", str(src), "--out", str(out), "--annotators-out", str(out)])
    assert both.exit_code == 2 and "--out and --annotators-out are the same file" in both.output
    assert not out.exists()


@pytest.mark.parametrize("existing", [b"SQLite format 3\x00\x10\x00", b"my,own,notes\n1,2,3\n"])
def test_an_existing_file_of_another_kind_is_never_replaced(tmp_path: Path, existing: bytes) -> None:
    src = tmp_path / "in.csv"
    src.write_text(CLICKS)
    for option in ("--out", "--annotators-out"):
        target = tmp_path / "keep.db"
        target.write_bytes(existing)
        args = ["--out", str(target)] if option == "--out" else ["--out", str(tmp_path / "c.csv"), option, str(target)]
        result = CliRunner().invoke(main, ["consensus", str(src), *args])
        assert result.exit_code == 2 and f"'{option}'" in result.output and "it is left as it is" in result.output
        assert target.read_bytes() == existing and not (tmp_path / "c.csv").exists()


def test_an_earlier_output_is_replaced(tmp_path: Path) -> None:
    result, out = invoke(tmp_path, CLICKS)
    annotators = tmp_path / "out" / "annotators.csv"
    for _ in range(2):  # the second run replaces both files of the first
        result = CliRunner().invoke(main, ["consensus", str(tmp_path / "in.csv"), "--out", str(out),
                                           "--annotators-out", str(annotators)])
        assert result.exit_code == 0, result.output
    assert len(read_out(out)) == 5 and list(pd.read_csv(annotators).columns) == ANNOTATOR_COLUMNS
    out.write_text('"image","x","y","label","p_alive"\n')  # as earlier versions wrote it: a quoted header
    assert CliRunner().invoke(main, ["consensus", str(tmp_path / "in.csv"), "--out", str(out)]).exit_code == 0

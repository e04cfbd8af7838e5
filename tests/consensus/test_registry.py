"""The consensus registry, the entry point and input validation (``prepare_clicks``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cellspot.consensus import (
    ANNOTATOR_COLUMNS,
    CELL_COLUMNS,
    DEFAULT_METHOD,
    METHODS,
    UnknownMethodError,
    prepare_clicks,
    run_consensus,
)
from cellspot.consensus.types import ConsensusInputError

BUILTIN = ["cluster_em", "dbscan_vote", "seed_r35"]
COLUMNS = ["image", "annotator", "x", "y", "label"]
TINY = pd.DataFrame(
    [("a", "s1", 10.0, 10.0, "alive"), ("a", "s2", 11.0, 10.0, "alive"), ("a", "s1", 100.0, 80.0, "dead"),
     ("a", "s2", 101.0, 81.0, "dead")],
    columns=COLUMNS,
)


def test_default_method_is_cluster_em() -> None:
    assert DEFAULT_METHOD == "cluster_em"
    assert run_consensus(TINY).params["method"] == "cluster_em"


@pytest.mark.parametrize("method", BUILTIN)
def test_every_builtin_method_is_registered_and_runs(method: str) -> None:
    result = run_consensus(TINY, method)
    assert method in METHODS
    assert result.params["method"] == method
    assert list(result.cells.columns) == CELL_COLUMNS
    assert list(result.annotators.columns) == ANNOTATOR_COLUMNS
    assert set(result.cells["label"]) <= {"alive", "dead"}
    for col in ("p_alive", "confidence", "p_cell"):
        assert result.cells[col].between(0.0, 1.0).all()
    assert (result.cells["support"] <= result.cells["n_runs"]).all()


@pytest.mark.parametrize("method", BUILTIN)
@pytest.mark.parametrize("columns", [COLUMNS, [*COLUMNS, "task_run"]], ids=["no-task_run", "task_run"])
def test_empty_input_gives_empty_cells_with_standard_columns(method: str, columns: list[str]) -> None:
    result = run_consensus(pd.DataFrame(columns=columns), method)
    assert result.cells.empty
    assert list(result.cells.columns) == CELL_COLUMNS
    assert result.params["method"] == method


def test_methods_contains_the_three_builtins() -> None:
    run_consensus(TINY)  # the entry point loads the built-in methods
    assert set(BUILTIN) <= set(METHODS)


def test_methods_is_filled_right_after_import() -> None:
    code = "import cellspot.consensus as c; print(','.join(sorted(c.METHODS)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert set(BUILTIN) <= set(out.split(","))


@pytest.mark.parametrize("name", ["nope", "", "Cluster_EM", "seed_r36"])
def test_unknown_method_lists_the_valid_names(name: str) -> None:
    with pytest.raises(UnknownMethodError) as info:
        run_consensus(TINY, name)
    message = str(info.value)
    assert repr(name) in message
    for valid in BUILTIN:
        assert valid in message
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- prepare_clicks

BAD_INPUTS = {
    # name: (rows, columns, words the message must contain)
    "nan-x": ([("a", "s1", 1.0, 2.0, "alive"), ("a", "s1", np.nan, 2.0, "alive")], COLUMNS, ["row 1", "field x"]),
    "text-y": ([("a", "s1", 1.0, 2.0, "alive"), ("a", "s1", 1.0, 2.0, "dead"), ("a", "s1", 1.0, "ten", "dead")],
               COLUMNS, ["row 2", "field y", "'ten'"]),
    "infinite-x": ([("a", "s1", np.inf, 2.0, "alive")], COLUMNS, ["row 0", "field x"]),
    "unknown-label": ([("a", "s1", 1.0, 2.0, "alive"), ("a", "s1", 1.0, 2.0, "zombie")], COLUMNS,
                      ["row 1", "field label", "'zombie'", "alive", "dead", "not_sure"]),
    "missing-label": ([("a", "s1", 1.0, 2.0, None)], COLUMNS, ["row 0", "field label"]),
    "empty-label": ([("a", "s1", 1.0, 2.0, "alive"), ("a", "s1", 1.0, 2.0, "")], COLUMNS, ["row 1", "field label"]),
    "missing-annotator-column": ([("a", 1.0, 2.0, "alive")], ["image", "x", "y", "label"], ["annotator"]),
    "missing-x-and-label-columns": ([("a", "s1", 2.0)], ["image", "annotator", "y"], ["'x'", "'label'"]),
}


@pytest.mark.parametrize(("rows", "columns", "words"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_the_row_and_field(rows: list[tuple], columns: list[str], words: list[str]) -> None:
    clicks = pd.DataFrame(rows, columns=columns)
    with pytest.raises(ConsensusInputError) as info:
        prepare_clicks(clicks)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ConsensusInputError):  # the entry point validates too, for every method
        run_consensus(clicks, "seed_r35")


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        (["alive", "dead", "not_sure"], ["alive", "dead", "not_sure"]),
        (["Alive", " dead ", "NOT_SURE"], ["alive", "dead", "not_sure"]),
        (["not_sure_alive", "alive"], ["not_sure", "alive"]),
    ],
    ids=["canonical", "case-and-spaces", "legacy-not-sure"],
)
def test_labels_are_normalised(raw: list[str], normalised: list[str]) -> None:
    clicks = pd.DataFrame({"image": "a", "annotator": "s1", "x": 1.0, "y": 2.0, "label": raw})
    out = prepare_clicks(clicks)
    assert out["label"].tolist() == normalised
    assert out["x"].dtype == np.float64 and out["y"].dtype == np.float64


@pytest.mark.parametrize("raw", [["alive", "Alive"], ["not_sure", "not_sure_alive"]], ids=["case", "legacy"])
def test_two_spellings_of_one_label_are_normalised(raw: list[str]) -> None:
    clicks = pd.DataFrame({"image": "a", "annotator": ["s1", "s2"], "x": 1.0, "y": 2.0, "label": raw})
    assert len(set(prepare_clicks(clicks)["label"])) == 1


def test_prepare_clicks_keeps_ids_and_does_not_touch_its_input() -> None:
    clicks = pd.DataFrame({"image": ["a", "b"], "annotator": ["s1", "s2"], "task_run": [7, 8],
                           "x": ["1", "2.5"], "y": [3, 4], "label": ["alive", "dead"], "extra": [0, 0]})
    before = clicks.copy()
    out = prepare_clicks(clicks)
    assert list(out.columns) == ["image", "annotator", "task_run", "x", "y", "label"]
    assert out["x"].tolist() == [1.0, 2.5]
    assert out["task_run"].tolist() == [7, 8]
    pd.testing.assert_frame_equal(clicks, before)

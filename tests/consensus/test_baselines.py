"""Baseline consensus methods: ``seed_r35`` (the thesis rule) and ``dbscan_vote``.

Expected outputs are computed by hand from the rule each method documents.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.consensus import ANNOTATOR_COLUMNS, CELL_COLUMNS, run_consensus

COLUMNS = ["image", "annotator", "task_run", "x", "y", "label"]
EXPECTED = ["image", "x", "y", "p_alive", "label", "support", "n_runs"]


def frame(rows: list[tuple]) -> pd.DataFrame:
    """Click table from ``(image, run, x, y, label)``; each run is its own annotator."""
    return pd.DataFrame([(img, f"who-{run}", run, x, y, lab) for img, run, x, y, lab in rows], columns=COLUMNS)


def check(cells: pd.DataFrame, expected: list[tuple]) -> None:
    """Compare cells (any order) with ``(image, x, y, p_alive, label, support, n_runs)`` rows."""
    assert list(cells.columns) == CELL_COLUMNS
    got = cells.sort_values(["image", "x", "y"]).reset_index(drop=True)
    want = pd.DataFrame(expected, columns=EXPECTED).sort_values(["image", "x", "y"]).reset_index(drop=True)
    assert len(got) == len(want), f"got\n{got}\nwant\n{want}"
    np.testing.assert_allclose(got[["x", "y", "p_alive"]].to_numpy(float),
                               want[["x", "y", "p_alive"]].to_numpy(float), atol=1e-9)
    assert got["image"].tolist() == want["image"].tolist()
    assert got["label"].tolist() == want["label"].tolist()
    assert got["support"].tolist() == want["support"].tolist()
    assert got["n_runs"].tolist() == want["n_runs"].tolist()


# --------------------------------------------------------------------------- seed_r35

SEED_R35_CASES = {
    # name: (clicks (image, run, x, y, label) in input order, cell_radius, expected cells)
    "alive-dead-notsure-average-to-half-is-alive": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 110, 100, "dead"), ("a", "r3", 100, 120, "not_sure")],
        None, [("a", 100, 100, 0.5, "alive", 3, 3)],
    ),
    "reference-dead-outvoted": (
        [("a", "r1", 100, 100, "dead"), ("a", "r2", 105, 105, "alive"), ("a", "r3", 95, 100, "alive")],
        None, [("a", 100, 100, 2 / 3, "alive", 3, 3)],
    ),
    "not-sure-is-half-a-vote": (
        [("a", "r1", 100, 100, "dead"), ("a", "r2", 101, 100, "not_sure")],
        None, [("a", 100, 100, 0.25, "dead", 2, 2)],
    ),
    "35-px-reach": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 134.9, 100, "dead"), ("a", "r3", 100, 135.1, "dead")],
        None, [("a", 100, 100, 0.5, "alive", 2, 3)],
    ),
    "clicks-out-of-reach-are-dropped": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 300, 300, "dead"), ("a", "r2", 101, 99, "alive")],
        None, [("a", 100, 100, 1.0, "alive", 2, 2)],
    ),
    "reference-is-the-first-run-in-input-order": (
        [("a", "r2", 110, 100, "dead"), ("a", "r1", 100, 100, "alive"), ("a", "r1", 250, 250, "alive")],
        None, [("a", 110, 100, 0.5, "alive", 2, 2)],
    ),
    "every-click-of-other-runs-in-reach-votes": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 110, 100, "dead"), ("a", "r2", 90, 100, "dead")],
        None, [("a", 100, 100, 1 / 3, "dead", 2, 2)],
    ),
    "a-click-in-reach-of-two-reference-clicks-counts-for-both": (
        [("a", "r1", 100, 100, "alive"), ("a", "r1", 140, 100, "alive"), ("a", "r2", 120, 100, "dead")],
        None, [("a", 100, 100, 0.5, "alive", 2, 2), ("a", 140, 100, 0.5, "alive", 2, 2)],
    ),
    "reference-per-image": (
        [("a", "r1", 10, 10, "alive"), ("b", "r3", 50, 50, "dead"), ("b", "r4", 52, 50, "dead"),
         ("a", "r2", 12, 10, "alive"), ("b", "r4", 200, 200, "alive")],
        None, [("a", 10, 10, 1.0, "alive", 2, 2), ("b", 50, 50, 0.0, "dead", 2, 2)],
    ),
    "one-run-keeps-every-click": (
        [("a", "r1", 10, 10, "alive"), ("a", "r1", 12, 10, "dead"), ("a", "r1", 15, 10, "not_sure")],
        None, [("a", 10, 10, 1.0, "alive", 1, 1), ("a", 12, 10, 0.0, "dead", 1, 1),
               ("a", 15, 10, 0.5, "alive", 1, 1)],
    ),
    "radius-hint-replaces-35": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 115, 100, "dead"), ("a", "r3", 105, 100, "dead")],
        10.0, [("a", 100, 100, 0.5, "alive", 2, 3)],
    ),
}


@pytest.mark.parametrize(("rows", "cell_radius", "expected"), SEED_R35_CASES.values(), ids=SEED_R35_CASES.keys())
def test_seed_r35_reproduces_the_thesis_rule(rows: list[tuple], cell_radius: float | None,
                                             expected: list[tuple]) -> None:
    result = run_consensus(frame(rows), "seed_r35", cell_radius=cell_radius)
    check(result.cells, expected)
    assert result.params["radius"] == (cell_radius or 35.0)
    assert (result.cells["p_cell"] == 1.0).all()
    np.testing.assert_allclose(result.cells["confidence"],
                               np.maximum(result.cells["p_alive"], 1 - result.cells["p_alive"]))


def test_seed_r35_without_task_run_makes_one_run_per_annotator_and_image() -> None:
    clicks = pd.DataFrame(
        [("a", "ann1", 100.0, 100.0, "alive"), ("a", "ann2", 110.0, 100.0, "dead"),
         ("a", "ann2", 108.0, 104.0, "dead"), ("b", "ann2", 10.0, 10.0, "dead")],
        columns=["image", "annotator", "x", "y", "label"],
    )
    check(run_consensus(clicks, "seed_r35").cells,
          [("a", 100, 100, 1 / 3, "dead", 2, 2), ("b", 10, 10, 0.0, "dead", 1, 1)])


# --------------------------------------------------------------------------- dbscan_vote

DBSCAN_CASES = {
    # name: (clicks, cell_radius (eps), expected cells)
    "majority-of-three": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 103, 100, "alive"), ("a", "r3", 100, 106, "dead")],
        None, [("a", 101, 102, 2 / 3, "alive", 3, 3)],
    ),
    "below-half-the-runs-is-noise": (
        # min_samples = ceil(3 / 2) = 2: the lone click at (300, 300) is no cell
        [("a", "r1", 100, 100, "dead"), ("a", "r2", 102, 100, "dead"), ("a", "r3", 300, 300, "alive")],
        None, [("a", 101, 100, 0.0, "dead", 2, 3)],
    ),
    "tie-is-alive-and-not-sure-abstains": (
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 104, 100, "dead"), ("a", "r3", 102, 100, "not_sure")],
        None, [("a", 102, 100, 0.5, "alive", 3, 3)],
    ),
    "only-not-sure-votes": (
        [("a", "r1", 100, 100, "not_sure"), ("a", "r2", 104, 100, "not_sure")],
        None, [("a", 102, 100, 0.5, "alive", 2, 2)],
    ),
    "one-run-every-click-is-a-cell": (
        [("a", "r1", 10, 10, "alive"), ("a", "r1", 200, 10, "dead")],
        None, [("a", 10, 10, 1.0, "alive", 1, 1), ("a", 200, 10, 0.0, "dead", 1, 1)],
    ),
    "no-same-run-constraint": (
        # a plain baseline: one run's double click joins the other run's click in one cell
        [("a", "r1", 100, 100, "alive"), ("a", "r1", 103, 100, "alive"), ("a", "r2", 101, 100, "dead")],
        None, [("a", 304 / 3, 100, 2 / 3, "alive", 2, 2)],
    ),
    "eps-hint-keeps-far-clicks-apart": (
        # two runs: min_samples = 1, so each click 10 px > eps apart is its own cell
        [("a", "r1", 100, 100, "alive"), ("a", "r2", 110, 100, "dead")],
        5.0, [("a", 100, 100, 1.0, "alive", 1, 2), ("a", 110, 100, 0.0, "dead", 1, 2)],
    ),
    "default-eps-35-chains-neighbouring-cells": (
        # a known weakness of the baseline: two cells 30 px apart become one
        [("a", "r1", 100, 100, "alive"), ("a", "r1", 130, 100, "alive"),
         ("a", "r2", 101, 100, "alive"), ("a", "r2", 131, 100, "alive")],
        None, [("a", 115.5, 100, 1.0, "alive", 2, 2)],
    ),
    "images-are-separate": (
        [("a", "r1", 100, 100, "alive"), ("b", "r2", 101, 100, "dead")],
        None, [("a", 100, 100, 1.0, "alive", 1, 1), ("b", 101, 100, 0.0, "dead", 1, 1)],
    ),
}


@pytest.mark.parametrize(("rows", "cell_radius", "expected"), DBSCAN_CASES.values(), ids=DBSCAN_CASES.keys())
def test_dbscan_vote(rows: list[tuple], cell_radius: float | None, expected: list[tuple]) -> None:
    result = run_consensus(frame(rows), "dbscan_vote", cell_radius=cell_radius)
    check(result.cells, expected)
    assert result.params["eps"] == (cell_radius or 35.0)


# --------------------------------------------------------------------------- shared


@pytest.mark.parametrize("method", ["seed_r35", "dbscan_vote"])
def test_baselines_have_no_reliability_table(method: str) -> None:
    rows = [("a", "r1", 100, 100, "alive"), ("a", "r2", 102, 100, "alive")]
    result = run_consensus(frame(rows), method)
    assert list(result.annotators.columns) == ANNOTATOR_COLUMNS
    assert result.annotators.empty
    assert result.params["method"] == method

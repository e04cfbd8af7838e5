"""Evaluation: one-to-one matching within half a cell diameter, point metrics, calibration,
alive/dead classification metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cellspot.evaluation import (
    CONFUSION_LAYOUT,
    classification_metrics,
    expected_calibration_error,
    match_cells,
    point_metrics,
)


def truth_table(rows: list[tuple]) -> pd.DataFrame:
    """``(image, x, y, diameter)`` or ``(image, x, y, label, diameter)`` rows."""
    cols = ["image", "x", "y", "diameter"] if len(rows[0]) == 4 else ["image", "x", "y", "label", "diameter"]
    return pd.DataFrame(rows, columns=cols)


def pred_table(rows: list[tuple], columns: tuple[str, ...] = ("image", "x", "y")) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(columns))


# --------------------------------------------------------------------------- match_cells

MATCH_CASES = {
    # name: (truth (image, x, y, diameter), pred (image, x, y), match_fraction, expected (truth, pred) pairs)
    "each-to-its-own": ([("a", 0, 0, 20), ("a", 100, 0, 20)], [("a", 101, 0), ("a", 1, 1)], 0.5,
                        [(0, 1), (1, 0)]),
    "just-inside-half-diameter": ([("a", 0, 0, 20)], [("a", 9.9, 0)], 0.5, [(0, 0)]),
    "exactly-half-diameter": ([("a", 0, 0, 20)], [("a", 6, 8)], 0.5, [(0, 0)]),
    "just-outside-half-diameter": ([("a", 0, 0, 20)], [("a", 10.1, 0)], 0.5, []),
    "radius-follows-each-cells-diameter": ([("a", 0, 0, 10), ("a", 100, 0, 40)], [("a", 8, 0), ("a", 115, 0)], 0.5,
                                           [(1, 1)]),
    "two-preds-on-one-truth-the-closer-wins": ([("a", 0, 0, 20)], [("a", 5, 0), ("a", 2, 0)], 0.5, [(0, 1)]),
    "one-pred-between-two-truths": ([("a", 0, 0, 20), ("a", 12, 0, 20)], [("a", 7, 0)], 0.5, [(1, 0)]),
    "optimal-not-greedy": (
        # greedy nearest-first would pair truth 1 with pred 0 and leave truth 0 unmatched
        [("a", 0, 0, 12), ("a", 10, 0, 12)], [("a", 5.5, 0), ("a", 15, 0)], 0.5, [(0, 0), (1, 1)]),
    "images-never-mix": ([("a", 0, 0, 20), ("b", 0, 0, 20)], [("b", 1, 0), ("c", 0, 0)], 0.5, [(1, 0)]),
    "no-predictions-on-that-image": ([("a", 0, 0, 20)], [("z", 0, 0)], 0.5, []),
    "smaller-match-fraction": ([("a", 0, 0, 20), ("a", 100, 0, 20)], [("a", 4, 0), ("a", 106, 0)], 0.25,
                               [(0, 0)]),
}


@pytest.mark.parametrize(("truth", "pred", "fraction", "expected"), MATCH_CASES.values(), ids=MATCH_CASES.keys())
def test_match_cells(truth: list[tuple], pred: list[tuple], fraction: float, expected: list[tuple[int, int]]) -> None:
    t, p = truth_table(truth), pred_table(pred)
    m = match_cells(t, p, match_fraction=fraction)
    assert sorted(zip(m.truth.tolist(), m.pred.tolist())) == sorted(expected)
    # one-to-one, and every pair is within its truth cell's limit
    assert len(set(m.truth.tolist())) == len(m.truth) and len(set(m.pred.tolist())) == len(m.pred)
    d = np.hypot(t["x"].to_numpy(float)[m.truth] - p["x"].to_numpy(float)[m.pred],
                 t["y"].to_numpy(float)[m.truth] - p["y"].to_numpy(float)[m.pred])
    np.testing.assert_allclose(m.distance, d)
    assert (m.distance <= fraction * t["diameter"].to_numpy(float)[m.truth] + 1e-12).all()
    assert (t["image"].to_numpy()[m.truth] == p["image"].to_numpy()[m.pred]).all()


def test_match_cells_with_no_predictions() -> None:
    m = match_cells(truth_table([("a", 0, 0, 20)]), pred_table([]))
    assert len(m.truth) == len(m.pred) == len(m.distance) == 0


def test_match_cells_uses_row_positions_not_index_labels() -> None:
    t = truth_table([("a", 0, 0, 20), ("a", 50, 0, 20)]).set_axis([10, 20])
    p = pred_table([("a", 51, 0)]).set_axis([7])
    m = match_cells(t, p)
    assert m.truth.tolist() == [1] and m.pred.tolist() == [0]


# --------------------------------------------------------------------------- point_metrics

TRUTH = [("a", 0, 0, "alive", 10), ("a", 100, 0, "alive", 10), ("a", 0, 100, "dead", 10), ("b", 50, 50, "dead", 10)]
PRED = [("a", 1, 0, "alive", 0.9), ("a", 100, 2, "dead", 0.2), ("a", 0, 101, "dead", 0.1), ("a", 300, 300, "alive", 0.8)]
PRED_COLUMNS = ("image", "x", "y", "label", "p_alive")


def test_point_metrics_on_a_hand_made_table() -> None:
    out = point_metrics(truth_table(TRUTH), pred_table(PRED, PRED_COLUMNS))
    # 3 of 4 predictions match 3 of 4 true cells; one label wrong (truth alive, said dead)
    assert (out["n_truth"], out["n_pred"], out["n_matched"]) == (4, 4, 3)
    assert out["precision"] == pytest.approx(0.75)
    assert out["recall"] == pytest.approx(0.75)
    assert out["f1"] == pytest.approx(0.75)
    assert out["label_accuracy"] == pytest.approx(2 / 3)
    assert out["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    assert out["median_distance"] == pytest.approx(1.0)
    # p_alive on matched cells 0.9, 0.2, 0.1 for outcomes alive, alive, dead
    assert out["brier"] == pytest.approx((0.1**2 + 0.8**2 + 0.1**2) / 3)
    assert out["ece"] == pytest.approx((0.1 + 0.8 + 0.1) / 3)


@pytest.mark.parametrize(
    ("pred", "expected"),
    [
        ([("a", 0, 0, "alive"), ("a", 100, 0, "alive"), ("a", 0, 100, "dead"), ("b", 50, 50, "dead")],
         {"precision": 1.0, "recall": 1.0, "f1": 1.0, "label_accuracy": 1.0, "balanced_accuracy": 1.0}),
        ([("a", 0, 0, "alive"), ("a", 1, 1, "alive")],  # a duplicate does not count twice
         {"precision": 0.5, "recall": 0.25, "f1": 2 / 6, "label_accuracy": 1.0, "balanced_accuracy": 1.0}),
        ([("a", 0, 0, "dead"), ("a", 100, 0, "dead"), ("a", 0, 100, "dead"), ("b", 50, 50, "dead")],
         {"precision": 1.0, "recall": 1.0, "f1": 1.0, "label_accuracy": 0.5, "balanced_accuracy": 0.5}),
        ([("a", 500, 500, "dead")],
         {"precision": 0.0, "recall": 0.0, "f1": 0.0, "label_accuracy": math.nan, "balanced_accuracy": math.nan}),
        ([],
         {"precision": math.nan, "recall": 0.0, "f1": 0.0, "label_accuracy": math.nan, "balanced_accuracy": math.nan}),
    ],
    ids=["perfect", "duplicate-prediction", "all-called-dead", "all-misplaced", "no-predictions"],
)
def test_point_metrics_table(pred: list[tuple], expected: dict[str, float]) -> None:
    out = point_metrics(truth_table(TRUTH), pred_table(pred, ("image", "x", "y", "label")))
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(out[key]), key
        else:
            assert out[key] == pytest.approx(value), key
    assert math.isnan(out["ece"]) and math.isnan(out["brier"])  # no p_alive column


# --------------------------------------------------------------------------- calibration

ECE_CASES = {
    # name: (probabilities, outcomes, expected ECE with 10 equal-width bins)
    "perfect-certain": ([1.0, 1.0, 0.0, 0.0], [1, 1, 0, 0], 0.0),
    "calibrated-coin": ([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], 0.0),
    "two-calibrated-bins": ([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0], 0.0),
    "overconfident": ([0.9] * 10, [1] * 5 + [0] * 5, 0.4),
    "certain-and-wrong": ([1.0, 0.0], [0, 1], 1.0),
    "probability-one-lands-in-the-last-bin": ([1.0, 1.0], [1, 0], 0.5),
    "two-bins-each-off": ([0.2, 0.2, 0.8, 0.8], [0, 0, 1, 1], 0.2),
}


@pytest.mark.parametrize(("prob", "outcome", "expected"), ECE_CASES.values(), ids=ECE_CASES.keys())
def test_expected_calibration_error(prob: list[float], outcome: list[int], expected: float) -> None:
    ece = expected_calibration_error(np.asarray(prob, float), np.asarray(outcome, bool))
    assert ece == pytest.approx(expected, abs=1e-12)


def test_ece_of_nothing_is_nan() -> None:
    assert math.isnan(expected_calibration_error(np.empty(0), np.empty(0, bool)))


def test_ece_is_lower_for_better_calibrated_probabilities() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(5000)
    outcome = rng.random(5000) < p
    calibrated = expected_calibration_error(p, outcome)
    sharpened = expected_calibration_error(np.clip(0.5 + 1.8 * (p - 0.5), 0, 1), outcome)
    assert calibrated < 0.03 < sharpened


# (y_alive, p_alive, expected subset of the metrics)
METRIC_CASES = [
    ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1],
     {"accuracy": 1.0, "balanced_accuracy": 1.0, "f1": 1.0, "f1_macro": 1.0, "roc_auc": 1.0,
      "confusion": [[2, 0], [0, 2]], "brier": (0.01 + 0.04 + 0.04 + 0.01) / 4}),
    ([1, 1, 1, 0], [0.9, 0.9, 0.4, 0.9],  # one alive called dead, the dead cell called alive
     {"accuracy": 0.5, "balanced_accuracy": 1 / 3, "f1": 0.0, "confusion": [[2, 1], [1, 0]], "n_dead": 1}),
    ([1, 1, 1, 1, 0, 0], [0.9, 0.9, 0.9, 0.9, 0.9, 0.1],  # 4/5 of the cells in the 0.9 bin are alive
     {"accuracy": 5 / 6, "balanced_accuracy": 0.75, "f1": 2 / 3, "ece": (5 * 0.1 + 0.1) / 6,
      "confusion": [[4, 0], [1, 1]]}),
]


@pytest.mark.parametrize(("y", "p", "expected"), METRIC_CASES)
def test_classification_metrics_on_hand_made_cases(y, p, expected):
    metrics = classification_metrics(np.array(y), np.array(p))
    for key, value in expected.items():
        assert metrics[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert metrics["confusion_layout"] == CONFUSION_LAYOUT


def test_metrics_with_one_class_have_no_auc():
    metrics = classification_metrics(np.array([1, 1]), np.array([0.7, 0.2]))
    assert np.isnan(metrics["roc_auc"]) and metrics["balanced_accuracy"] == 0.5
    assert classification_metrics(np.array([]), np.array([])) == {"n": 0, "n_alive": 0, "n_dead": 0}

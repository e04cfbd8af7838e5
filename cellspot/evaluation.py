"""Evaluation: one-to-one matching of predicted cells to true cells, alive/dead classification metrics.

Pure module (numpy, scipy, pandas, scikit-learn). A predicted cell matches a true cell when they are in
the same image and closer than half the true cell's diameter (``match_fraction`` of the
diameter); matching is one-to-one and minimises the total distance (Hungarian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

_FAR = 1e12
ECE_BINS = 15
CONFUSION_LAYOUT = "[[tn, fp], [fn, tp]]: rows true alive, dead; columns predicted alive, dead"


@dataclass(frozen=True)
class Matches:
    """Index pairs into the truth and prediction tables, and the pair distances (n_matches,)."""

    truth: np.ndarray
    pred: np.ndarray
    distance: np.ndarray


def match_cells(truth: pd.DataFrame, pred: pd.DataFrame, match_fraction: float = 0.5) -> Matches:
    """Match ``pred`` (image, x, y) to ``truth`` (image, x, y, diameter) one-to-one per image."""
    t_idx, p_idx, dist = [], [], []
    pred_groups = {k: v for k, v in pred.groupby("image", sort=False).indices.items()}
    for image, rows in truth.groupby("image", sort=False).indices.items():
        prow = pred_groups.get(image)
        if prow is None or len(prow) == 0:
            continue
        tx, ty = truth["x"].to_numpy()[rows], truth["y"].to_numpy()[rows]
        px, py = pred["x"].to_numpy()[prow], pred["y"].to_numpy()[prow]
        limit = match_fraction * truth["diameter"].to_numpy()[rows]
        d = np.hypot(tx[:, None] - px[None, :], ty[:, None] - py[None, :])
        cost = np.where(d <= limit[:, None], d, _FAR)
        ri, ci = linear_sum_assignment(cost)
        ok = cost[ri, ci] < _FAR
        t_idx.append(rows[ri[ok]])
        p_idx.append(prow[ci[ok]])
        dist.append(d[ri[ok], ci[ok]])
    if not t_idx:
        empty = np.empty(0, dtype=np.int64)
        return Matches(empty, empty, np.empty(0))
    return Matches(np.concatenate(t_idx), np.concatenate(p_idx), np.concatenate(dist))


def expected_calibration_error(prob: np.ndarray, outcome: np.ndarray, n_bins: int = 10) -> float:
    """ECE of probabilities ``prob`` (n,) for binary ``outcome`` (n,), equal-width bins."""
    if len(prob) == 0:
        return float("nan")
    bins = np.clip((prob * n_bins).astype(int), 0, n_bins - 1)
    total = np.bincount(bins, minlength=n_bins)
    conf = np.bincount(bins, weights=prob, minlength=n_bins)
    hits = np.bincount(bins, weights=outcome.astype(float), minlength=n_bins)
    used = total > 0
    return float(np.sum(np.abs(conf[used] - hits[used])) / len(prob))


def point_metrics(truth: pd.DataFrame, pred: pd.DataFrame, match_fraction: float = 0.5) -> dict[str, float]:
    """Localisation and label quality of ``pred`` against ``truth``.

    ``truth``: image, x, y, label (alive|dead), diameter. ``pred``: image, x, y, label and
    optionally p_alive. Returns precision, recall, f1, label_accuracy and
    balanced_accuracy (over matched cells), ece and brier of p_alive, and counts.
    """
    m = match_cells(truth, pred, match_fraction)
    n_t, n_p, n_m = len(truth), len(pred), len(m.truth)
    precision = n_m / n_p if n_p else float("nan")
    recall = n_m / n_t if n_t else float("nan")
    f1 = 2 * n_m / (n_t + n_p) if n_t + n_p else float("nan")
    true_alive = truth["label"].to_numpy()[m.truth] == "alive"
    pred_alive = pred["label"].to_numpy()[m.pred] == "alive"
    out = {
        "n_truth": n_t, "n_pred": n_p, "n_matched": n_m,
        "precision": precision, "recall": recall, "f1": f1,
        "label_accuracy": float(np.mean(true_alive == pred_alive)) if n_m else float("nan"),
        "balanced_accuracy": _balanced_accuracy(true_alive, pred_alive),
        "median_distance": float(np.median(m.distance)) if n_m else float("nan"),
    }
    if "p_alive" in pred.columns and n_m:
        p = pred["p_alive"].to_numpy(float)[m.pred]
        out["ece"] = expected_calibration_error(p, true_alive)
        out["brier"] = float(np.mean((p - true_alive) ** 2))
    else:
        out["ece"] = out["brier"] = float("nan")
    return out


def _balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    recalls = [np.mean(pred[truth == c] == c) for c in (True, False) if np.any(truth == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_metrics(
    y_alive: np.ndarray, p_alive: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, Any]:
    """Metrics of ``p_alive`` ``(N,)`` against the true labels ``y_alive`` ``(N,)`` (1 alive, 0 dead).

    A cell is predicted dead when ``p_alive < 0.5``. Dead is the positive class: ``f1`` is the
    F1 of dead, ``f1_macro`` the mean F1 of both classes, ``roc_auc`` ranks by ``1 - p_alive``
    (NaN with one class), ``confusion`` is ``[[tn, fp], [fn, tp]]`` (:data:`CONFUSION_LAYOUT`).
    ``ece``: expected calibration error of ``p_alive`` (15 equal-width bins); ``brier``: mean
    squared error of ``p_alive``. ``weights``: optional sample weights (not used for ``ece``).
    """
    from sklearn import metrics as skm

    y = np.asarray(y_alive).astype(int)
    p = np.asarray(p_alive, float)
    if len(y) != len(p):
        raise ValueError(f"y_alive has {len(y)} values but p_alive has {len(p)}")
    out: dict[str, Any] = {"n": int(len(y)), "n_alive": int(y.sum()), "n_dead": int(len(y) - y.sum())}
    if not len(y):
        return out
    dead_true, dead_pred = 1 - y, (p < 0.5).astype(int)
    sw = None if weights is None else np.asarray(weights, float)
    cm = skm.confusion_matrix(dead_true, dead_pred, labels=[0, 1], sample_weight=sw)
    recalls = [cm[k, k] / cm[k].sum() for k in (0, 1) if cm[k].sum() > 0]
    both = len(np.unique(y)) == 2
    out.update({
        "accuracy": float(skm.accuracy_score(dead_true, dead_pred, sample_weight=sw)),
        "balanced_accuracy": float(np.mean(recalls)),
        "f1": float(skm.f1_score(dead_true, dead_pred, pos_label=1, zero_division=0, sample_weight=sw)),
        "f1_macro": float(skm.f1_score(dead_true, dead_pred, average="macro", labels=[0, 1],
                                       zero_division=0, sample_weight=sw)),
        "roc_auc": float(skm.roc_auc_score(dead_true, 1 - p, sample_weight=sw)) if both else float("nan"),
        "ece": expected_calibration_error(p, y, n_bins=ECE_BINS),
        "brier": float(np.average((p - y) ** 2, weights=sw)),
        "confusion": cm.astype(int).tolist() if sw is None else cm.tolist(),
        "confusion_layout": CONFUSION_LAYOUT,
    })
    return out

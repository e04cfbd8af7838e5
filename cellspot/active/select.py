"""Batch-aware selection: the best-scored images, without near-duplicates.

Pure module (numpy, pandas). Images are points in a feature space: model embeddings when
there are some, else :func:`default_features` (cell count and viability, from the model or
else the crowd). Distances are Euclidean over standardised columns and *missing-aware*: a
value missing in either image is skipped and the sum rescaled by ``d / d_common``; two images
with no feature in common are at the typical distance ``delta`` (the median pairwise distance),
so an image the models have not seen is never mistaken for a duplicate.

* :func:`k_center_greedy` -- the classic core-set order: each pick is the image farthest from
  everything picked (or already labelled) so far.
* :func:`select_batch` -- score-weighted greedy. With ``s`` the scores min-max scaled to [0, 1]
  and ``d_i`` the distance of image ``i`` to the nearest image already in the batch, each step
  picks ``argmax (1 - lambda) * s_i + lambda * min(1, d_i / delta)``. ``lambda = 0`` is plain
  top-``n`` by score; ``lambda = 1`` is k-center greedy started at the best image; in between a
  near-duplicate of a chosen image (``d ~ 0``) loses ``lambda`` against a distinct one.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_DIVERSITY = 0.5
_SCALE_SAMPLE = 1000  # rows used to estimate the median pairwise distance


class SelectionError(ValueError):
    """Selection cannot run: bad ``n`` or ``diversity``, embeddings that do not fit the scores."""


# --------------------------------------------------------------------------- features


def default_features(table: pd.DataFrame) -> np.ndarray:
    """``(n_images, 2)`` features from a signal (or score) table, NaN where unknown.

    Column 0: ``log1p`` of the image's cell count (``n_pred_cells``, else
    ``n_cells_consensus``); column 1: its alive fraction (``pred_alive_frac``, else
    ``crowd_alive_frac``). Columns missing from ``table`` are all NaN.
    """
    def pick(*names: str) -> np.ndarray:
        out = np.full(len(table), np.nan)
        for name in names:
            if name in table.columns:
                values = pd.to_numeric(table[name], errors="coerce").to_numpy(float, na_value=np.nan)
                out = np.where(np.isnan(out), values, out)
        return out

    count = pick("n_pred_cells", "n_cells_consensus")
    alive = pick("pred_alive_frac", "crowd_alive_frac")
    return np.column_stack([np.log1p(count), alive])


def standardise(features: np.ndarray) -> np.ndarray:
    """``(n, d)`` z-scores per column (NaN kept; a constant column becomes 0)."""
    x = np.asarray(features, float)
    if x.ndim != 2:
        raise SelectionError(f"features must be a 2-D array (n_images, n_features), got shape {x.shape}")
    if x.size == 0:
        return x.copy()
    with warnings.catch_warnings():  # all-NaN columns: "mean of empty slice"
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return (x - mean) / std


def distances_to(x: np.ndarray, row: int, delta: float = np.nan) -> np.ndarray:
    """``(n,)`` missing-aware Euclidean distances from row ``row`` of ``x`` ``(n, d)`` to every row.

    ``d = sqrt(sum_common (x_i - x_row)^2 * d / d_common)``; rows sharing no known feature get
    ``delta`` (NaN by default).
    """
    diff = x - x[row]
    known = ~np.isnan(diff)
    n_known = known.sum(axis=1)
    sq = np.where(known, diff, 0.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = np.sqrt(sq.sum(axis=1) * x.shape[1] / n_known)
    dist = np.where(n_known > 0, dist, delta)
    dist[row] = 0.0
    return dist


def typical_distance(x: np.ndarray, seed: int = 0) -> float:
    """The median pairwise missing-aware distance of ``x`` ``(n, d)`` (on at most 1000 rows);
    1.0 when it is 0 or undefined (fewer than two rows, no known features)."""
    n = len(x)
    if n < 2:
        return 1.0
    rows = np.arange(n) if n <= _SCALE_SAMPLE else np.random.default_rng(seed).choice(n, _SCALE_SAMPLE, False)
    sample = x[rows]
    pairs = [distances_to(sample, i)[i + 1:] for i in range(len(sample) - 1)]
    values = np.concatenate(pairs)
    values = values[np.isfinite(values)]
    delta = float(np.median(values)) if values.size else 0.0
    return delta if delta > 0 else 1.0


# --------------------------------------------------------------------------- k-center greedy


def k_center_greedy(
    features: np.ndarray, n: int, *, centres: Sequence[int] = (), start: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``n`` rows of ``features`` ``(N, d)`` greedily, each farthest from those before.

    ``centres``: rows already covered (e.g. labelled images); they are never picked. Without
    centres the first pick is ``start``, else the row nearest the column means (a
    representative image). Features are standardised first (:func:`standardise`). Returns
    ``(order, distance)``: ``(k,)`` row indices in pick order (``k = min(n, N - len(centres))``)
    and ``(k,)`` each pick's distance to the nearest earlier pick or centre (NaN for a first
    pick without centres). Ties go to the lower row index.
    """
    x = standardise(features)
    n_rows = len(x)
    if n < 0:
        raise SelectionError(f"n must be >= 0, got {n}")
    covered = np.zeros(n_rows, bool)
    centres = [int(c) for c in centres]
    if any(not 0 <= c < n_rows for c in centres):
        raise SelectionError(f"centres must be row indices in [0, {n_rows}), got {centres}")
    covered[centres] = True
    k = min(n, n_rows - int(covered.sum()))
    order, dist = np.empty(k, np.int64), np.full(k, np.nan)
    if k == 0:
        return order, dist
    delta = typical_distance(x)
    nearest = np.full(n_rows, np.inf)
    for c in np.flatnonzero(covered):
        nearest = np.minimum(nearest, distances_to(x, c, delta))
    for step in range(k):
        if np.isinf(nearest[~covered]).all():
            pick = _first_pick(x, covered, start)
        else:
            pick = int(np.argmax(np.where(covered, -np.inf, nearest)))
            dist[step] = nearest[pick]
        order[step] = pick
        covered[pick] = True
        nearest = np.minimum(nearest, distances_to(x, pick, delta))
    return order, dist


def _first_pick(x: np.ndarray, covered: np.ndarray, start: int | None) -> int:
    if start is not None and not covered[start]:
        return int(start)
    centre = np.zeros((1, x.shape[1]))  # standardised columns have mean 0
    d = distances_to(np.vstack([centre, x]), 0, np.inf)[1:]
    return int(np.argmin(np.where(covered, np.inf, d)))


# --------------------------------------------------------------------------- batch selection


def select_batch(
    scores: pd.DataFrame,
    embeddings: pd.DataFrame | np.ndarray | None = None,
    *,
    n: int,
    signals: pd.DataFrame | None = None,
    diversity: float = DEFAULT_DIVERSITY,
    score_column: str = "score",
) -> pd.DataFrame:
    """The ``n`` images to label next: high scores, few near-duplicates (formula in the module doc).

    ``scores``: one row per image with columns ``image`` and ``score`` (higher = more worth
    labelling; NaN rows come after every scored row, however novel), e.g. :func:`cellspot.active.strategies.score_images`.
    A repeated image keeps its best row. Features, in order of preference: ``embeddings``
    (a DataFrame indexed by image name, or an array with one row per row of ``scores``),
    :func:`default_features` of ``signals`` (matched on ``image``), or of ``scores`` itself.
    Returns the chosen rows in pick order (never an image twice) with two more columns:
    ``batch_rank`` (1..k) and ``novelty`` (``min(1, d / delta)`` when picked; 1 for the first).
    """
    if n < 0:
        raise SelectionError(f"n must be >= 0, got {n}")
    if not 0.0 <= diversity <= 1.0:
        raise SelectionError(f"diversity must be in [0, 1] (0 = by score only), got {diversity}")
    for column in ("image", score_column):
        if column not in scores.columns:
            raise SelectionError(f"scores need an {column!r} column; got {list(scores.columns)}")
    feats = features_for(scores, embeddings, signals)
    table = scores.reset_index(drop=True)
    s = pd.to_numeric(table[score_column], errors="coerce").to_numpy(float)
    keep = _best_row_per_image(table["image"], s)
    table, s, feats = table.iloc[keep].reset_index(drop=True), s[keep], feats[keep]
    order, novelty = _greedy(s, standardise(feats), min(n, len(table)), diversity)
    out = table.iloc[order].reset_index(drop=True)
    out["batch_rank"] = np.arange(1, len(out) + 1)
    out["novelty"] = novelty
    return out


def features_for(
    scores: pd.DataFrame, embeddings: pd.DataFrame | np.ndarray | None, signals: pd.DataFrame | None
) -> np.ndarray:
    """``(len(scores), d)`` features aligned with the rows of ``scores``."""
    images = scores["image"].astype(str)
    if isinstance(embeddings, pd.DataFrame):
        index = embeddings.index.astype(str)
        missing = sorted(set(images) - set(index))
        if missing:
            raise SelectionError(f"no embedding for {len(missing)} image(s), e.g. {missing[:3]}")
        return embeddings.set_axis(index).loc[images].to_numpy(float)
    if embeddings is not None:
        arr = np.asarray(embeddings, float)
        if arr.ndim != 2 or len(arr) != len(scores):
            raise SelectionError(f"embeddings must be (n_images={len(scores)}, d), got shape {arr.shape}")
        return arr
    if signals is not None:
        by_image = signals.assign(image=signals["image"].astype(str)).drop_duplicates("image").set_index("image")
        return default_features(by_image.reindex(images).reset_index())
    return default_features(scores)


def _best_row_per_image(images: pd.Series, s: np.ndarray) -> np.ndarray:
    """Row indices keeping the best-scored row of each image, best score first (stable)."""
    ranked = pd.DataFrame({"image": images.astype(str).to_numpy(), "s": np.nan_to_num(s, nan=-np.inf)})
    best = ranked.sort_values("s", ascending=False, kind="stable").drop_duplicates("image")
    if len(best) < len(ranked):
        log.warning("select_batch: %d repeated image row(s) dropped", len(ranked) - len(best))
    return best.index.to_numpy()


def _greedy(s: np.ndarray, x: np.ndarray, k: int, diversity: float) -> tuple[np.ndarray, np.ndarray]:
    """Score-weighted greedy picks: ``(k,)`` row order and ``(k,)`` novelty at pick time."""
    finite = np.isfinite(s)
    lo = s[finite].min() if finite.any() else 0.0
    span = (s[finite].max() - lo) if finite.any() else 0.0
    s01 = np.where(finite, (s - lo) / span if span > 0 else 1.0, 0.0)
    delta = typical_distance(x) if diversity > 0 else 1.0
    nearest = np.full(len(s), np.inf)
    taken = np.zeros(len(s), bool)
    order, novelty = np.empty(k, np.int64), np.ones(k)
    for step in range(k):
        near01 = np.minimum(1.0, nearest / delta)
        gain = (1.0 - diversity) * s01 + diversity * near01
        gain[~finite] -= 2.0  # unscored images come after every scored one (gains lie in [0, 1])
        gain[taken] = -np.inf
        pick = int(np.argmax(gain))  # ties: the earlier row, i.e. the better score
        order[step], novelty[step] = pick, near01[pick]
        taken[pick] = True
        if diversity > 0:
            nearest = np.minimum(nearest, distances_to(x, pick, delta))
    return order, novelty

"""Batch-aware selection: near-duplicates are pushed down, no image comes back twice,
k-center greedy spreads out, missing features never look like duplicates."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.active.select import (
    SelectionError,
    default_features,
    distances_to,
    k_center_greedy,
    select_batch,
)

# three near-identical top images (a, b, c), then two distinct ones
SCORES = pd.DataFrame({"image": list("abcde"), "score": [0.95, 0.94, 0.93, 0.80, 0.70]})
EMBEDDINGS = pd.DataFrame([[0, 0], [0.01, 0], [0, 0.01], [3, 3], [-3, 3]], index=list("abcde"), dtype=float)


@pytest.mark.parametrize(
    ("diversity", "n", "expected"),
    [
        (0.0, 3, ["a", "b", "c"]),  # by score only: the duplicates
        (0.5, 3, ["a", "d", "e"]),  # duplicates pushed down
        (0.5, 5, ["a", "d", "e", "b", "c"]),  # ... but still listed
        (1.0, 2, ["a", "d"]),  # pure k-center after the best image
    ],
)
def test_diversity_avoids_duplicates(diversity: float, n: int, expected: list[str]) -> None:
    batch = select_batch(SCORES, EMBEDDINGS, n=n, diversity=diversity)
    assert batch["image"].tolist() == expected
    assert batch["batch_rank"].tolist() == list(range(1, n + 1))
    assert batch["novelty"].iloc[0] == 1.0


def test_array_embeddings_and_duplicate_rows() -> None:
    repeated = pd.concat([SCORES, pd.DataFrame({"image": ["a"], "score": [0.1]})], ignore_index=True)
    emb = np.vstack([EMBEDDINGS.to_numpy(), [[9.0, 9.0]]])
    batch = select_batch(repeated, emb, n=10, diversity=0.5)
    assert sorted(batch["image"]) == list("abcde")  # never twice; a keeps its best row
    assert batch.set_index("image").loc["a", "score"] == 0.95


def test_features_from_signals_when_no_embeddings() -> None:
    signals = pd.DataFrame({
        "image": list("abcd"), "n_pred_cells": [10, 10, 40, np.nan], "pred_alive_frac": [0.5, 0.5, 0.9, np.nan],
        "n_cells_consensus": [np.nan, np.nan, np.nan, 10], "crowd_alive_frac": [np.nan] * 3 + [0.5],
    })
    scores = pd.DataFrame({"image": list("abcd"), "score": [0.9, 0.89, 0.5, 0.4]})
    # b is a's twin; d has the same count and viability from the crowd: a twin as well
    assert select_batch(scores, n=2, signals=signals, diversity=0.6)["image"].tolist() == ["a", "c"]
    feats = default_features(signals)
    np.testing.assert_allclose(feats[3], [np.log1p(10), 0.5])


def test_images_without_features_are_not_duplicates() -> None:
    scores = pd.DataFrame({"image": list("abc"), "score": [0.9, 0.8, 0.3]})
    signals = pd.DataFrame({"image": list("abc"), "n_pred_cells": [np.nan, np.nan, 5.0],
                            "pred_alive_frac": [np.nan, np.nan, 0.5]})
    assert select_batch(scores, n=3, signals=signals, diversity=0.5)["image"].tolist() == ["a", "b", "c"]


def test_nan_scores_rank_last() -> None:
    scores = pd.DataFrame({"image": list("abc"), "score": [np.nan, 0.2, 0.1]})
    assert select_batch(scores, n=3, diversity=0.0)["image"].tolist() == ["b", "c", "a"]


def test_nan_scores_rank_last_however_novel() -> None:
    """The lowest real score scales to 0, as "no score" did: an unscored image that looked new
    went above scored ones (the queue's top 3 held two images the model found no cell in)."""
    scores = pd.DataFrame({"image": list("abcd"), "score": [0.96, np.nan, np.nan, 0.93]})
    embeddings = pd.DataFrame([[0, 0], [5, 5], [-5, 5], [0.1, 0]], index=list("abcd"), dtype=float)
    batch = select_batch(scores, embeddings, n=4, diversity=0.3)
    assert batch["image"].tolist()[:2] == ["a", "d"]
    assert sorted(batch["image"].tolist()[2:]) == ["b", "c"]


def test_missing_aware_distance() -> None:
    x = np.array([[0.0, 0.0], [3.0, np.nan], [np.nan, np.nan]])
    d = distances_to(x, 0, delta=7.0)
    np.testing.assert_allclose(d, [0.0, 3.0 * np.sqrt(2), 7.0])  # one shared column of two: scaled


def test_k_center_greedy_order() -> None:
    points = np.array([[0.0], [1.0], [10.0], [4.0], [5.0]])
    order, dist = k_center_greedy(points, 3, centres=[0])
    assert order.tolist() == [2, 4, 1]  # 10, then 5 (5 from 0 and 10), then 1 (tie with 4: lower row)
    assert np.all(np.diff(dist) <= 0)  # each pick is no farther than the one before
    first, _ = k_center_greedy(points, 1)
    assert first.tolist() == [3]  # nearest the mean (4.0)
    assert len(k_center_greedy(points, 10, centres=[0, 1])[0]) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, "n must be >= 0"),
        ({"n": 2, "diversity": 1.5}, r"diversity must be in \[0, 1\]"),
        ({"n": 2, "embeddings": pd.DataFrame([[0.0]], index=["a"])}, "no embedding for 4 image"),
        ({"n": 2, "embeddings": np.zeros((2, 2))}, r"embeddings must be \(n_images=5, d\)"),
    ],
)
def test_selection_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(SelectionError, match=message):
        select_batch(SCORES, **kwargs)

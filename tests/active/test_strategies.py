"""Acquisition strategies on crafted images: the uncertain one outranks the confident one,
conflicts are flagged, BALD measures disagreement between samples, the registry refuses
unknown names and parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.active.signals import build_signals
from cellspot.active.strategies import (
    DEFAULT_STRATEGY,
    DEFAULT_WEIGHTS,
    SCORE_COLUMNS,
    STRATEGIES,
    MissingSignalError,
    UnknownStrategyError,
    binary_entropy,
    mutual_information,
    rare_class,
    rank01,
    score_images,
)

IMAGES = ["sure", "unsure", "conflict", "new"]
# consensus cells: image, x, y, p_alive, confidence, support, n_runs, p_cell
CROWD = [
    ("sure", 10, 10, 0.98, 0.97, 3, 3, 1.0), ("sure", 50, 50, 0.02, 0.97, 3, 3, 1.0),
    ("unsure", 10, 10, 0.50, 0.40, 1, 3, 0.6), ("unsure", 50, 50, 0.60, 0.45, 2, 3, 0.7),
    ("conflict", 10, 10, 0.95, 0.95, 3, 3, 1.0), ("conflict", 50, 50, 0.03, 0.95, 3, 3, 1.0),
]
# predicted cells: image, x, y, p_alive, detector score
MODEL = [
    ("sure", 11, 10, 0.97, 0.95), ("sure", 50, 52, 0.03, 0.95),
    ("unsure", 10, 11, 0.50, 0.55), ("unsure", 51, 50, 0.45, 0.52), ("unsure", 90, 90, 0.50, 0.51),
    ("conflict", 10, 10, 0.03, 0.95), ("conflict", 50, 50, 0.02, 0.95),
    ("new", 20, 20, 0.50, 0.30),  # a peak at the detector's threshold (0.3 by default): the least sure
]


def crowd_frame() -> pd.DataFrame:
    return pd.DataFrame(CROWD, columns=["image", "x", "y", "p_alive", "confidence", "support", "n_runs", "p_cell"])


def model_frame() -> pd.DataFrame:
    return pd.DataFrame(MODEL, columns=["image", "x", "y", "p_alive", "score"])


@pytest.fixture
def signals() -> pd.DataFrame:
    images = pd.DataFrame({"image": IMAGES, "n_runs": [3, 3, 3, 0]})
    return build_signals(images, crowd_frame(), model_frame(), radius=5.0)


@pytest.fixture
def crowd_only() -> pd.DataFrame:
    return build_signals(pd.DataFrame({"image": IMAGES, "n_runs": [3, 3, 3, 0]}), crowd_frame(), None)


def by_image(ranked: pd.DataFrame) -> pd.Series:
    return ranked.set_index("image")["score"]


# --------------------------------------------------------------------------- uncertain > confident


@pytest.mark.parametrize("strategy", ["crowd", "classifier", "entropy_mean", "entropy_max", "entropy_sum",
                                      "margin_mean", "margin_max", "margin_sum", "detector", DEFAULT_STRATEGY])
def test_uncertain_image_scores_above_confident_one(signals: pd.DataFrame, strategy: str) -> None:
    ranked = score_images(strategy, signals)
    assert list(ranked.columns[:4]) == SCORE_COLUMNS
    assert (ranked["strategy"] == strategy).all() and ranked["reason"].map(bool).all()
    score = by_image(ranked)
    assert score["unsure"] > score["sure"], ranked
    assert ranked["score"].dropna().is_monotonic_decreasing


def test_crowd_terms_follow_the_formula(signals: pd.DataFrame) -> None:
    ranked = score_images("crowd", signals).set_index("image")
    sure = ranked.loc["sure"]
    assert sure["t_confidence"] == pytest.approx(0.03)
    assert sure["t_split"] == pytest.approx(1 - 2 * 0.48)
    assert (sure["t_support"], sure["t_cell"]) == (0.0, 0.0)
    assert sure["score"] == pytest.approx((0.03 + 0.04) / 4)
    unsure = ranked.loc["unsure"]  # support 1/3 and 2/3, p_cell 0.6 and 0.7
    assert unsure["t_support"] == pytest.approx(0.5) and unsure["t_cell"] == pytest.approx(0.7)
    assert np.isnan(ranked.loc["new", "score"]) and ranked.loc["new", "reason"] == "not labelled yet"
    assert ranked.index[-1] == "new"  # NaN ranks last


def test_crowd_that_found_no_cell_scores_zero() -> None:
    signals = build_signals(pd.DataFrame({"image": ["empty"], "n_runs": [2]}), crowd_frame().iloc[:0], None)
    ranked = score_images("crowd", signals)
    assert ranked["score"].tolist() == [0.0] and "no cell" in ranked["reason"][0]


def test_classifier_aggregates(signals: pd.DataFrame) -> None:
    h = binary_entropy(np.array([0.5, 0.45, 0.5]))
    assert by_image(score_images("entropy_mean", signals))["unsure"] == pytest.approx(h.mean())
    assert by_image(score_images("entropy_max", signals))["unsure"] == pytest.approx(1.0)
    assert by_image(score_images("entropy_sum", signals))["unsure"] == pytest.approx(h.sum())
    assert by_image(score_images("classifier", signals, measure="margin", agg="max"))["sure"] == pytest.approx(0.06)


def test_detector_counts_cells_missed_by_either_side(signals: pd.DataFrame) -> None:
    ranked = score_images("detector", signals).set_index("image")
    assert ranked.loc["unsure", "mismatch"] == pytest.approx(1 / 3)  # the model's cell at (90, 90)
    assert ranked.loc["sure", "mismatch"] == 0.0
    assert ranked.loc["new", "score"] == pytest.approx(1.0)  # score at the threshold, no crowd
    assert "1 model-only" in ranked.loc["unsure", "reason"]


def test_detector_doubt_is_highest_just_above_the_detectors_threshold() -> None:
    """A cell's score is its centre-map peak, kept from the threshold t up to about 1: the
    faintest detections are the doubtful ones, whatever t the detector was tuned to."""
    model = pd.DataFrame({"image": ["faint", "middle", "clear"], "x": 5.0, "y": 5.0, "score": [0.31, 0.5, 0.98]})
    images = pd.DataFrame({"image": ["faint", "middle", "clear"], "n_runs": 0})
    for t in (0.3, 0.15):
        ranked = score_images("detector", build_signals(images, None, model, detector_threshold=t))
        assert ranked["image"].tolist() == ["faint", "middle", "clear"], t
    low = build_signals(images, None, model, detector_threshold=0.3).set_index("image")["det_near_mean"]
    assert low["faint"] == pytest.approx(1 - 0.01 / 0.7) and low["clear"] == pytest.approx(1 - 0.68 / 0.7)


def test_an_image_predicted_empty_is_not_the_surest() -> None:
    images = pd.DataFrame({"image": ["empty", "sure", "unsure"], "n_runs": 0})
    model = pd.DataFrame({"image": ["sure", "unsure"], "x": 5.0, "y": 5.0, "p_alive": [0.99, 0.5],
                          "score": [0.95, 0.35]})
    signals = build_signals(images, None, model, predicted_images=["empty", "sure", "unsure"])
    for strategy in ("classifier", "detector"):
        row = score_images(strategy, signals).set_index("image").loc["empty"]
        assert np.isnan(row["score"]) and row["reason"] == "the model found no cell", strategy
    combined = score_images(DEFAULT_STRATEGY, signals).set_index("image")
    assert combined.loc["empty", "score"] > combined.loc["sure", "score"]  # coverage alone, not a certain 0


def test_ties_are_not_broken_by_name() -> None:
    """Before any model every unlabelled image ties on coverage: names (which often carry the
    source or condition) must not decide, and the seed must."""
    names = [f"a_{i:02d}" for i in range(20)] + [f"z_{i:02d}" for i in range(20)]
    signals = build_signals(pd.DataFrame({"image": names, "n_runs": 0}))
    firsts = [score_images(DEFAULT_STRATEGY, signals, seed=s)["image"].tolist()[:20] for s in range(5)]
    assert all(sum(n.startswith("z_") for n in first) >= 3 for first in firsts)
    assert len({tuple(first) for first in firsts}) == 5
    again = score_images(DEFAULT_STRATEGY, signals.iloc[::-1], seed=2)["image"].tolist()[:20]
    assert again == firsts[2]  # the same seed, whatever the row order


def test_combined_ignores_a_component_that_is_the_same_everywhere(signals: pd.DataFrame) -> None:
    calm = signals.assign(conflict_mass=np.where(signals["conflict_mass"].notna(), 0.0, np.nan))
    ranked = score_images(DEFAULT_STRATEGY, calm).set_index("image")
    assert ranked["conflict_rank"].isna().all()  # no conflict anywhere: it tells no image apart
    without = score_images(DEFAULT_STRATEGY, calm, weights={k: w for k, w in DEFAULT_WEIGHTS.items()
                                                           if k != "conflict"}).set_index("image")
    assert ranked["score"].to_dict() == pytest.approx(without["score"].to_dict())


def _rarity_case(crowd_alive: list[float]) -> pd.DataFrame:
    """One labelled image whose consensus cells have ``crowd_alive`` p_alive; two unlabelled
    images the model calls mostly dead (``deadish``) and mostly alive (``aliveish``)."""
    crowd = pd.DataFrame({"image": "labelled", "x": np.arange(len(crowd_alive)) * 30.0, "y": 10.0,
                          "p_alive": crowd_alive, "confidence": 0.9, "support": 3, "n_runs": 3})
    model = pd.DataFrame({"image": ["deadish"] * 3 + ["aliveish"] * 3, "x": [10.0, 40, 70] * 2, "y": 10.0,
                          "p_alive": [0.1, 0.2, 0.9, 0.9, 0.8, 0.9], "score": 0.9})
    images = pd.DataFrame({"image": ["labelled", "deadish", "aliveish"], "n_runs": [3, 0, 0]})
    return build_signals(images, crowd, model)


def test_rarity_prefers_images_rich_in_the_rarer_labelled_class() -> None:
    mostly_alive = _rarity_case([0.95, 0.9, 0.97, 0.1])  # 3 alive, 1 dead labelled: dead is rare
    table = mostly_alive.set_index("image")
    assert table.loc["deadish", "pred_dead_sum"] == pytest.approx(0.9 + 0.8 + 0.1)
    assert table.loc["aliveish", "pred_alive_sum"] == pytest.approx(0.9 + 0.8 + 0.9)
    ranked = score_images("rarity", mostly_alive)
    assert ranked["image"].tolist()[:2] == ["deadish", "aliveish"]
    assert "expected dead cells (the rarer class: 1 of 4 cells)" in ranked["reason"][0]
    mostly_dead = score_images("rarity", _rarity_case([0.05, 0.1, 0.97]))  # alive is rare now
    assert mostly_dead["image"].tolist()[:2] == ["aliveish", "deadish"]
    # blended with the default weights, the two unlabelled images differ only by it (their classifier
    # entropy is equal by symmetry, so that component tells them apart no more): the rare-class image first
    combined = score_images(DEFAULT_STRATEGY, mostly_alive, weights={**DEFAULT_WEIGHTS, "rarity": 0.2}).set_index("image")
    assert combined["classifier_rank"].isna().all()
    assert combined.loc["deadish", "rarity_rank"] == 1.0 and combined.loc["aliveish", "rarity_rank"] == 0.0
    assert combined.loc["deadish", "score"] > combined.loc["aliveish", "score"]


def test_the_rare_class_counts_every_labelled_image_when_some_are_left_out() -> None:
    # "done" (retired, say) holds 4 dead cells, "open" 2 alive and 1 dead: over the project alive is
    # the rare class (2 of 7). Leaving "done" out before scoring, as queue and round open do with
    # retired images, must not flip it to dead (1 of 3 on "open" alone)
    crowd = pd.DataFrame({"image": ["done"] * 4 + ["open"] * 3, "x": [10.0, 40, 70, 100, 10, 40, 70], "y": 10.0,
                          "p_alive": [0.1] * 4 + [0.9, 0.9, 0.1], "confidence": 0.9, "support": 3, "n_runs": 3})
    model = pd.DataFrame({"image": ["open"] * 3 + ["new"] * 2, "x": [10.0, 40, 70, 10, 40], "y": 10.0,
                          "p_alive": [0.9, 0.8, 0.2, 0.9, 0.1], "score": 0.9})
    signals = build_signals(pd.DataFrame({"image": ["done", "open", "new"], "n_runs": [3, 3, 0]}), crowd, model)
    assert rare_class(signals) == ("alive", 2.0, 5.0)
    open_only = signals[signals["image"] != "done"].reset_index(drop=True)
    assert rare_class(open_only) == ("alive", 2.0, 5.0)
    assert "(the rarer class: 2 of 7 cells)" in score_images("rarity", open_only)["reason"][0]
    by_hand = open_only.copy()  # a table built without build_signals: counted over its own rows
    by_hand.attrs = {}
    assert rare_class(by_hand) == ("dead", 2.0, 1.0)


def test_rarity_needs_a_classifier() -> None:
    detections = pd.DataFrame({"image": ["a", "b"], "x": 5.0, "y": 5.0, "score": [0.9, 0.5]})  # no p_alive
    signals = build_signals(pd.DataFrame({"image": ["a", "b"], "n_runs": 0}), None, detections)
    ranked = score_images("rarity", signals)
    assert ranked["score"].isna().all() and set(ranked["reason"]) == {"no classifier prediction"}
    assert score_images(DEFAULT_STRATEGY, signals, weights={"rarity": 1.0, "coverage": 0.1})["rarity_rank"].isna().all()
    assert "rarity_rank" not in score_images(DEFAULT_STRATEGY, signals).columns  # not in the default blend


def test_conflict_flags_the_crafted_conflict(signals: pd.DataFrame) -> None:
    ranked = score_images("conflict", signals)
    assert ranked["image"][0] == "conflict"
    row = ranked.set_index("image").loc["conflict"]
    assert row["n_conflicts"] == 1 and row["score"] == pytest.approx(0.94 * 0.95)
    others = ranked.set_index("image").loc[["sure", "unsure"]]
    assert (others["n_conflicts"] == 0).all() and (others["score"] == 0).all()
    assert np.isnan(ranked.set_index("image").loc["new", "score"])  # no crowd to disagree with


def test_coverage_prefers_unseen_images(signals: pd.DataFrame) -> None:
    score = by_image(score_images("coverage", signals))
    assert score["new"] == 1.0 and score["sure"] == 0.25


# --------------------------------------------------------------------------- BALD


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ([[0.3, 0.3, 0.3]], [0.0]),  # identical samples: no disagreement
        ([[0.0, 1.0]], [1.0]),  # sure but opposite: maximal
        ([[0.9, 0.9], [0.2, 0.8]], [0.0, None]),  # None: positive
    ],
)
def test_mutual_information(samples: list, expected: list) -> None:
    mi = mutual_information(np.array(samples))
    for value, want in zip(mi, expected):
        assert value > 0.1 if want is None else value == pytest.approx(want, abs=1e-9)


def test_bald_strategy(signals: pd.DataFrame) -> None:
    samples = {"sure": np.full((2, 5), 0.9), "unsure": np.array([[0.1, 0.9, 0.2, 0.8, 0.5]])}
    ranked = score_images("bald", signals, mc_samples=samples).set_index("image")
    assert ranked.loc["sure", "score"] == 0.0 and ranked.loc["unsure", "score"] > 0.2
    assert np.isnan(ranked.loc["new", "score"]) and ranked.loc["unsure", "mc_samples"] == 5
    with pytest.raises(MissingSignalError, match="needs MC-dropout samples"):
        score_images("bald", signals)
    with pytest.raises(MissingSignalError, match=r"\(n_cells, T\)"):
        score_images("bald", signals, mc_samples={"sure": np.ones(3)})


# --------------------------------------------------------------------------- random, diversity, combined


def test_random_is_seeded_and_independent_of_row_order(signals: pd.DataFrame) -> None:
    a = score_images("random", signals, seed=3)
    b = score_images("random", signals.iloc[::-1], seed=3)
    assert a["image"].tolist() == b["image"].tolist()
    orders = {tuple(score_images("random", signals, seed=s)["image"]) for s in range(8)}
    assert len(orders) > 1


def test_diversity_spreads_away_from_labelled_images() -> None:
    images = pd.DataFrame({"image": list("abcde"), "n_runs": [2, 0, 0, 0, 0]})
    emb = pd.DataFrame([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [10, 0]], index=list("abcde"), dtype=float)
    ranked = score_images("diversity", build_signals(images), embeddings=emb)
    # labelled a is the first centre: the far corners come first, the near-duplicates of a and c last
    assert ranked["image"].tolist()[:2] == ["e", "c"] and ranked["image"].tolist()[-1] == "a"
    assert ranked.set_index("image").loc["a", "reason"] == "already labelled"


def test_combined_without_models_uses_crowd_and_coverage(crowd_only: pd.DataFrame) -> None:
    ranked = score_images(DEFAULT_STRATEGY, crowd_only).set_index("image")
    assert ranked["classifier_rank"].isna().all() and ranked["conflict_rank"].isna().all()
    assert ranked.loc["new", "score"] == 1.0  # only coverage is defined for it
    # unsure: crowd rank 1, coverage 1/4 -> (0.35 * 1 + 0.15 * 0.25) / 0.5
    assert ranked.loc["unsure", "score"] == pytest.approx((0.35 + 0.15 * 0.25) / 0.5)
    assert ranked.loc["unsure", "score"] > ranked.loc["sure", "score"]
    assert ranked.loc["sure", "reason"].endswith("; no model prediction")


@pytest.mark.parametrize("with_model", [False, True])
def test_combined_reason_shows_each_signal_not_its_rank(signals: pd.DataFrame, crowd_only: pd.DataFrame,
                                                        with_model: bool) -> None:
    """The reason names the raw signal values (crowd disagreement as the crowd strategy scores
    it), never the [0, 1] ranks the blend used: "sure" ranks 0 on crowd but disagrees a little."""
    table = signals if with_model else crowd_only
    ranked = score_images(DEFAULT_STRATEGY, table).set_index("image")
    crowd = by_image(score_images("crowd", table))
    for image in ("sure", "unsure", "conflict"):
        reason = ranked.loc[image, "reason"]
        if "crowd disagreement" in reason:
            assert f"crowd disagreement {crowd[image]:.3f}" in reason, reason
    assert ranked.loc["sure", "crowd_rank"] == 0.0 and crowd["sure"] > 0.0
    assert "crowd disagreement 0.000" not in ranked.loc["sure", "reason"]
    assert "coverage 0.250 (3 runs)" in ranked.loc["sure", "reason"]  # 1 / (1 + 3), and the runs it means
    if with_model:
        entropy = score_images("classifier", table).set_index("image")["score"]
        assert f"classifier entropy {entropy['new']:.3f}" in ranked.loc["new", "reason"]


def test_combined_weights_can_be_changed(signals: pd.DataFrame) -> None:
    only_conflict = score_images(DEFAULT_STRATEGY, signals, weights={"conflict": 1.0})
    assert only_conflict["image"][0] == "conflict"
    with pytest.raises(ValueError, match="weights must be >= 0"):
        score_images(DEFAULT_STRATEGY, signals, weights={"magic": 1.0})


@pytest.mark.parametrize(
    ("values", "expected"),
    [([3.0, 1.0, 2.0], [1.0, 0.0, 0.5]), ([0.0, 0.0, 0.0, 5.0], [0, 0, 0, 1]),
     ([np.nan, 2.0, 1.0], [np.nan, 1.0, 0.0]), ([7.0], [0.0])],
)
def test_rank01(values: list, expected: list) -> None:
    np.testing.assert_allclose(rank01(np.array(values)), expected)


# --------------------------------------------------------------------------- registry errors


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda s: score_images("nope", s), UnknownStrategyError, "unknown acquisition strategy 'nope'; valid: bald"),
        (lambda s: score_images("crowd", s, agg="max"), TypeError, r"no parameter\(s\) \['agg'\]"),
        (lambda s: score_images("classifier", s, agg="median"), ValueError, "allowed: mean, max, sum"),
        (lambda s: score_images("classifier", s, measure="gini"), ValueError, "allowed: entropy, margin"),
        (lambda s: score_images("crowd", s[["image", "n_runs"]]), MissingSignalError, "needs signal column"),
        (lambda s: score_images("crowd", pd.concat([s, s])), ValueError, "more than once"),
    ],
)
def test_errors(signals: pd.DataFrame, call, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call(signals)


def test_every_registered_strategy_runs(signals: pd.DataFrame) -> None:
    samples = {name: np.full((1, 4), 0.5) for name in IMAGES}
    for name in STRATEGIES:
        ranked = score_images(name, signals, mc_samples=samples)
        assert sorted(ranked["image"]) == sorted(IMAGES), name

"""Acquisition strategies: which images are most worth sending to students next.

Pure module (numpy, pandas). Every strategy is a plain function in a name -> function
registry, fed the per-image signal table of :mod:`cellspot.active.signals` (one row per
image; the columns a strategy reads are listed with it) and returning a score per image:
higher = label sooner. One entry point, :func:`score_images`; an unknown name raises
:class:`UnknownStrategyError` listing the valid ones. A score is NaN where the strategy has
nothing to say (a model strategy on an image no model has seen); such images rank last.

Formulas (``H(p) = -p log2 p - (1-p) log2 (1-p)``, bits; means are over an image's cells):

``random``
    ``U(0, 1)``, drawn with ``seed`` in image-name order (the same seed gives the same ranking).
``crowd``
    Crowd disagreement, the mean of four terms in [0, 1]: ``1 - min_confidence`` (the least
    certain cell: what keeps the image from retiring), ``1 - 2 * mean |p_alive - 0.5|`` (split
    votes), ``1 - mean support / n_runs`` (cells few runs clicked), ``mean (1 - |2 p_cell - 1|)``
    (unsure whether there is a cell at all). 0 for a labelled image where the crowd found no
    cell; NaN for an unlabelled image.
``classifier`` (and ``entropy_mean``, ``entropy_max``, ``entropy_sum``, ``margin_mean``, ...)
    Classifier uncertainty over the predicted cells: ``measure="entropy"``: ``H(p_alive)``;
    ``measure="margin"``: ``1 - |2 p_alive - 1|``; aggregated by ``agg`` = mean | max | sum.
``detector``
    ``(1 - w) * near + w * mismatch`` with ``near`` = mean over detections of
    ``1 - |score - t| / max(t, 1 - t)`` (``t`` the detection threshold; 1 at the threshold) and
    ``mismatch`` = (cells the model found but not the crowd + the reverse) / all distinct cells,
    matched within a radius; ``w = 0.5``. Without crowd cells, ``near`` alone.
``bald``
    BALD with MC dropout: per cell, the mutual information between label and weights,
    ``I = H(mean_t p_t) - mean_t H(p_t)`` over ``T`` samples ``p_t`` (:func:`mutual_information`),
    aggregated by ``agg``. Needs ``mc_samples``: image -> ``(n_cells, T)`` samples of p_alive.
``conflict``
    Model-crowd conflict: the sum over matched cells where the model and the crowd disagree
    on the label, the model is confident (``|2 p_model - 1| >= 0.8``) and so is the consensus
    (confidence ``>= 0.8``), of ``|2 p_model - 1| * confidence``: likely labelling errors.
``rarity``
    The expected number of cells of the rarer class on the image: ``sum (1 - p_alive)`` over its
    predicted cells when the labelled consensus holds fewer dead cells than alive ones, else
    ``sum p_alive`` (before any consensus: the rarer class in the predictions). With imbalanced
    data (LDC is 82 % alive) a classifier sees few cells of the minority class, and balanced
    accuracy and every image's viability hinge on them; images rich in them are worth a run.
``coverage``
    ``1 / (1 + n_runs)``: images few students have seen.
``diversity``
    k-center greedy order on image embeddings (or :func:`cellspot.active.select.default_features`),
    starting from the labelled images: ``score = 1 - pick / n`` for the ``n`` unlabelled images,
    0 for the labelled ones.
``combined`` (the default)
    A weighted mean of normalised signals over those defined for the image:
    ``sum_k w_k r_k / sum_k w_k`` with the weights :data:`DEFAULT_WEIGHTS` (crowd 0.35,
    coverage 0.15, classifier 0.25, detector 0.15, conflict 0.10; ``rarity`` may be added with a
    weight of its own, it is not in the default); ``r_k`` is the rank of
    strategy ``k``'s score scaled to [0, 1] (:func:`rank01`), except coverage, used as it is. A
    component with the same value on every image where it is defined (e.g. no conflict
    anywhere) tells the images apart no better than nothing and counts as undefined.
    Component columns: ``crowd_rank``, ``coverage``, ``classifier_rank``, ``detector_rank``,
    ``conflict_rank`` (and ``rarity_rank`` when weighted).
    Before any model exists only crowd and coverage are defined, so the blend is
    ``0.7 * crowd + 0.3 * coverage`` for labelled images and coverage alone (1) for unlabelled ones.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cellspot.active import select

log = logging.getLogger(__name__)

DEFAULT_STRATEGY = "combined"
DEFAULT_WEIGHTS: dict[str, float] = {
    "crowd": 0.35, "coverage": 0.15, "classifier": 0.25, "detector": 0.15, "conflict": 0.10,
}
"""Weights of :func:`combined`, by component (the strategy whose score it uses)."""
AGGREGATES = ("mean", "max", "sum")
MEASURES = ("entropy", "margin")
SCORE_COLUMNS = ["image", "score", "strategy", "reason"]
"""The first columns of :func:`score_images`; strategy-specific component columns follow."""


class UnknownStrategyError(ValueError):
    """No strategy of that name; the message lists the valid ones."""


class MissingSignalError(ValueError):
    """The signal table (or an extra input such as MC samples) lacks what a strategy needs."""


@dataclass(frozen=True)
class Context:
    """Inputs beside the signal table: the random seed, MC-dropout samples (image ->
    ``(n_cells, T)`` p_alive) and image embeddings (DataFrame indexed by image name)."""

    seed: int = 0
    mc_samples: Mapping[str, np.ndarray] | None = None
    embeddings: pd.DataFrame | None = None


StrategyFn = Callable[..., pd.DataFrame]
"""``fn(signals, ctx, **params)`` -> DataFrame aligned with ``signals`` (same index) with
``score``, ``reason`` and component columns."""


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its function, the parameters bound to this name, a summary;
    ``needs_model``: it scores model predictions only, so before any model every image ties;
    ``extra_input``: an input beyond the signal table that the caller must pass (``bald``'s
    ``mc_samples``), so rounds, the queue and automatic mode cannot use it."""

    name: str
    fn: StrategyFn
    summary: str
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_model: bool = False
    extra_input: str | None = None


STRATEGIES: dict[str, Strategy] = {}


def _register(name: str, summary: str, *, needs_model: bool = False, extra_input: str | None = None,
              **params: Any) -> Callable[[StrategyFn], StrategyFn]:
    def deco(fn: StrategyFn) -> StrategyFn:
        STRATEGIES[name] = Strategy(name, fn, summary, params, needs_model, extra_input)
        return fn

    return deco


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; :class:`UnknownStrategyError` lists the valid ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown acquisition strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}"
        ) from None


def list_strategies(*, from_signals_only: bool = False) -> pd.DataFrame:
    """Every strategy: ``name``, ``summary`` (sorted by name); ``from_signals_only``: only those
    that score from the signal table alone (no :attr:`Strategy.extra_input`), the ones a round
    can be opened with."""
    rows = [(s.name, s.summary) for s in sorted(STRATEGIES.values(), key=lambda s: s.name)
            if not (from_signals_only and s.extra_input)]
    return pd.DataFrame(rows, columns=["name", "summary"])


def score_images(
    strategy: str,
    signals: pd.DataFrame,
    *,
    seed: int = 0,
    mc_samples: Mapping[str, np.ndarray] | None = None,
    embeddings: pd.DataFrame | None = None,
    **params: Any,
) -> pd.DataFrame:
    """Score every image of ``signals`` with ``strategy``, best first.

    ``signals``: one row per image with an ``image`` column (names must be unique) and the
    columns the strategy reads (:mod:`cellspot.active.signals`). ``params`` go to the
    strategy function (e.g. ``agg="max"``; an unknown one raises :class:`TypeError` listing
    the accepted ones). Returns :data:`SCORE_COLUMNS` then the strategy's component columns,
    sorted by score (NaN last), ties in a pseudo-random order drawn from ``seed`` (:func:`tie_order`;
    not by name: names often carry the source or condition, and a tie is common, e.g. every
    unlabelled image before any model exists).
    """
    spec = get_strategy(strategy)
    _check_params(spec, params)
    if "image" not in signals.columns:
        raise MissingSignalError(f"the signal table needs an 'image' column; got {list(signals.columns)}")
    dupes = signals["image"][signals["image"].duplicated()]
    if len(dupes):
        raise ValueError(f"the signal table lists images more than once: {sorted(map(str, dupes.unique()))[:5]}")
    table = signals.reset_index(drop=True)
    ctx = Context(seed=seed, mc_samples=mc_samples, embeddings=embeddings)
    parts = spec.fn(table, ctx, **{**spec.params, **params})
    out = pd.DataFrame({"image": table["image"].to_numpy(), "score": parts["score"].astype(float).to_numpy(),
                        "strategy": strategy, "reason": parts["reason"].to_numpy()})
    extra = parts.drop(columns=["score", "reason"]).reset_index(drop=True)
    out = pd.concat([out, extra], axis=1)
    out["_tie"] = tie_order(out["image"], seed)
    out = out.sort_values(["score", "_tie"], ascending=[False, True], na_position="last",
                          kind="stable").drop(columns="_tie")
    log.info("scored %d images with %s (%d without a score)", len(out), strategy, int(out["score"].isna().sum()))
    return out.reset_index(drop=True)


def tie_order(images: pd.Series, seed: int = 0) -> np.ndarray:
    """``(n,)`` uint64 keys that order ``images`` pseudo-randomly: a hash of ``(seed, name)``, so
    the order is the same for the same seed whatever the row order, and unrelated to the names."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest(), "big")
                     for name in images.astype(str)], dtype=np.uint64)


def _check_params(spec: Strategy, params: Mapping[str, Any]) -> None:
    accepted = [p for p in inspect.signature(spec.fn).parameters if p not in ("signals", "ctx")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"strategy {spec.name!r} has no parameter(s) {unknown}; accepted: {accepted or 'none'}")


# --------------------------------------------------------------------------- pure pieces


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """``H(p)`` in bits, elementwise (any shape); 0 at 0 and 1, 1 at 0.5; NaN stays NaN."""
    p = np.clip(np.asarray(p, float), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.where(np.isnan(p), np.nan, np.nan_to_num(h, nan=0.0))


def margin_uncertainty(p: np.ndarray) -> np.ndarray:
    """``1 - |2 p - 1|`` elementwise: 0 for a sure call, 1 at ``p = 0.5``."""
    return 1.0 - np.abs(2.0 * np.asarray(p, float) - 1.0)


def mutual_information(samples: np.ndarray) -> np.ndarray:
    """BALD per cell: ``(n_cells,)`` ``H(mean_t p_t) - mean_t H(p_t)`` (bits) of ``(n_cells, T)``
    MC-dropout samples of p_alive. 0 when the samples agree, > 0 when they differ."""
    p = np.asarray(samples, float)
    if p.ndim != 2:
        raise MissingSignalError(f"MC samples must be (n_cells, T), got shape {p.shape}")
    if p.size and (np.nanmin(p) < 0.0 or np.nanmax(p) > 1.0):
        raise MissingSignalError("MC samples must be probabilities in [0, 1]")
    if p.shape[1] == 0:
        return np.zeros(len(p))
    mi = binary_entropy(p.mean(axis=1)) - binary_entropy(p).mean(axis=1)
    return np.maximum(mi, 0.0)  # rounding can leave -1e-17


def rank01(values: pd.Series | np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] over the defined values: ``(rank_min - 1) / (n - 1)``.

    Ties share the lowest rank, so a constant signal (or a single image) maps to 0 and the
    many zeros of a sparse signal stay at 0; NaN stays NaN.
    """
    s = pd.Series(np.asarray(values, float))
    defined = s.dropna()
    out = np.full(len(s), np.nan)
    if len(defined):
        ranks = defined.rank(method="min").to_numpy() - 1.0
        out[defined.index.to_numpy()] = ranks / max(len(defined) - 1, 1)
    return out


def _need(signals: pd.DataFrame, strategy: str, *columns: str) -> None:
    missing = [c for c in columns if c not in signals.columns]
    if missing:
        raise MissingSignalError(
            f"strategy {strategy!r} needs signal column(s) {missing}; build the table with "
            "cellspot.active.signals.build_signals or image_signals"
        )


def _num(signals: pd.DataFrame, column: str) -> np.ndarray:
    return pd.to_numeric(signals[column], errors="coerce").to_numpy(float, na_value=np.nan)


def _has_crowd(signals: pd.DataFrame) -> np.ndarray:
    if "has_crowd" in signals.columns:
        return signals["has_crowd"].fillna(False).to_numpy(bool)
    return np.nan_to_num(_num(signals, "n_runs")) > 0


def _fmt(value: float, spec: str = ".2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


def _frame(score: np.ndarray, reason: list[str], **components: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"score": score, "reason": reason, **components})


# --------------------------------------------------------------------------- strategies


@_register("random", "uniform random order (seeded): the baseline")
def random_scores(signals: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """``U(0, 1)`` per image, drawn in image-name order with ``ctx.seed``."""
    order = np.argsort(signals["image"].astype(str).to_numpy(), kind="stable")
    score = np.empty(len(signals))
    score[order] = np.random.default_rng(ctx.seed).random(len(signals))
    return _frame(score, [f"random draw (seed {ctx.seed})"] * len(signals))


@_register("crowd", "crowd disagreement: unsure consensus, split votes, low support, doubtful cells")
def crowd_disagreement(signals: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """The mean of the four disagreement terms of the module doc (NaN for unlabelled images)."""
    _need(signals, "crowd", "n_runs", "n_cells_consensus", "min_confidence", "mean_split",
          "support_frac", "cell_doubt")
    terms = {
        "t_confidence": 1.0 - _num(signals, "min_confidence"),
        "t_split": 1.0 - 2.0 * _num(signals, "mean_split"),
        "t_support": 1.0 - _num(signals, "support_frac"),
        "t_cell": _num(signals, "cell_doubt"),
    }
    terms = {k: np.clip(v, 0.0, 1.0) for k, v in terms.items()}
    score = np.mean(np.column_stack(list(terms.values())), axis=1)
    labelled = _has_crowd(signals)
    no_cells = labelled & (np.nan_to_num(_num(signals, "n_cells_consensus")) == 0)
    score = np.where(no_cells, 0.0, np.where(labelled, score, np.nan))
    runs = np.nan_to_num(_num(signals, "n_runs")).astype(int)
    reason = [
        "not labelled yet" if not lab else f"crowd found no cell in {r} run(s)" if empty else
        f"crowd unsure: min confidence {_fmt(1 - tc)}, split {_fmt(ts)}, low support {_fmt(tu)}, "
        f"cell doubt {_fmt(tl)}"
        for lab, empty, r, tc, ts, tu, tl in zip(labelled, no_cells, runs, *terms.values())
    ]
    return _frame(score, reason, **terms)


def _classifier(signals: pd.DataFrame, ctx: Context, measure: str = "entropy", agg: str = "mean") -> pd.DataFrame:
    """``<measure>_<agg>`` of the signal table: entropy or margin uncertainty, mean/max/sum."""
    if measure not in MEASURES:
        raise ValueError(f"unknown classifier uncertainty measure {measure!r}; allowed: {', '.join(MEASURES)}")
    if agg not in AGGREGATES:
        raise ValueError(f"unknown aggregate {agg!r}; allowed: {', '.join(AGGREGATES)}")
    column = f"{measure}_{agg}"
    _need(signals, "classifier", column, "n_pred_cells")
    score = _num(signals, column)
    n = _num(signals, "n_pred_cells")
    reason = [
        ("the model found no cell" if c == 0 else "no model prediction") if not np.isfinite(v) else
        f"classifier {measure} {agg} {v:.2f} over {int(c)} cells"
        for v, c in zip(score, n)
    ]
    return _frame(score, reason, **{column: score})


# the summary is what the Rounds page and the CLI offer: they score with the defaults (entropy,
# mean); the other measures and aggregates are strategies of their own (entropy_max, margin_mean...)
_register("classifier", "classifier uncertainty: entropy of alive/dead, mean over the image's cells "
          "(as entropy_mean; the entropy_* and margin_* strategies offer the others)",
          needs_model=True)(_classifier)
for _m in MEASURES:
    for _a in AGGREGATES:
        _register(f"{_m}_{_a}", f"classifier {_m} uncertainty, {_a} over the image's cells",
                  needs_model=True, measure=_m, agg=_a)(_classifier)


@_register("detector", "detector uncertainty: detections near the threshold, model/crowd cell mismatch",
           needs_model=True)
def detector_uncertainty(signals: pd.DataFrame, ctx: Context, mismatch_weight: float = 0.5) -> pd.DataFrame:
    """``(1 - w) * det_near_mean + w * mismatch`` (module doc); ``near`` alone without crowd cells."""
    if not 0.0 <= mismatch_weight <= 1.0:
        raise ValueError(f"mismatch_weight must be in [0, 1], got {mismatch_weight}")
    _need(signals, "detector", "det_near_mean", "n_matched", "n_model_only", "n_crowd_only")
    near = _num(signals, "det_near_mean")
    only_m, only_c = _num(signals, "n_model_only"), _num(signals, "n_crowd_only")
    union = _num(signals, "n_matched") + only_m + only_c
    with np.errstate(invalid="ignore", divide="ignore"):
        mismatch = np.where(union > 0, (only_m + only_c) / union, np.where(np.isfinite(union), 0.0, np.nan))
    both = (1 - mismatch_weight) * near + mismatch_weight * mismatch
    score = np.where(np.isfinite(both), both, np.where(np.isfinite(near), near, mismatch))
    n = _num(signals, "n_pred_cells") if "n_pred_cells" in signals.columns else np.full(len(signals), np.nan)
    reason = [
        ("the model found no cell" if k == 0 else "no model prediction") if not np.isfinite(s) else
        f"detections near threshold {_fmt(a)}" + ("" if not np.isfinite(m) else
                                                   f"; {int(b)} model-only, {int(c)} crowd-only cells")
        for s, a, m, b, c, k in zip(score, near, mismatch, np.nan_to_num(only_m), np.nan_to_num(only_c), n)
    ]
    return _frame(score, reason, det_near=near, mismatch=mismatch)


@_register("bald", "BALD: mutual information of MC-dropout samples (needs mc_samples)", needs_model=True,
           extra_input="mc_samples")
def bald(signals: pd.DataFrame, ctx: Context, agg: str = "mean") -> pd.DataFrame:
    """``agg`` of :func:`mutual_information` over the image's cells; NaN without samples."""
    if agg not in AGGREGATES:
        raise ValueError(f"unknown aggregate {agg!r}; allowed: {', '.join(AGGREGATES)}")
    if ctx.mc_samples is None:
        raise MissingSignalError(
            "strategy 'bald' needs MC-dropout samples of the classifier (mc_samples: image -> (n_cells, T) "
            "p_alive), which a project's stored predictions do not hold; use 'classifier' (or the default "
            "'combined') for the model's uncertainty, or cellspot.active.score_images('bald', ..., mc_samples=...)")
    score, n_cells, n_samples = (np.full(len(signals), np.nan) for _ in range(3))
    for i, image in enumerate(signals["image"]):
        samples = ctx.mc_samples.get(image)
        if samples is None:
            continue
        mi = mutual_information(samples)
        n_cells[i], n_samples[i] = mi.shape[0], np.shape(samples)[1]
        score[i] = 0.0 if mi.size == 0 else float(getattr(np, agg)(mi))
    reason = ["no MC samples" if not np.isfinite(s) else f"BALD {agg} {s:.3f} over {int(c)} cells"
              for s, c in zip(score, np.nan_to_num(n_cells))]
    return _frame(score, reason, bald=score, mc_cells=n_cells, mc_samples=n_samples)


@_register("conflict", "model-crowd conflict: a confident model contradicts a confident consensus",
           needs_model=True)
def conflict(signals: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """``conflict_mass`` of the signal table (module doc); NaN without model or crowd."""
    _need(signals, "conflict", "conflict_mass", "n_conflicts")
    score, n = _num(signals, "conflict_mass"), _num(signals, "n_conflicts")
    reason = ["needs model and crowd" if not np.isfinite(s) else
              "no conflict" if c == 0 else f"{int(c)} cell(s): confident model contradicts confident crowd"
              for s, c in zip(score, n)]
    return _frame(score, reason, n_conflicts=n)


#: ``DataFrame.attrs`` key of a signal table: ``{"alive": n, "dead": n}``, the consensus cells of
#: every image the table was built from (before a caller filters rows)
CONSENSUS_CLASS_COUNTS = "consensus_class_counts"


def consensus_class_counts(signals: pd.DataFrame) -> dict[str, float]:
    """``{"alive": n, "dead": n}``: ``n_cells_consensus x crowd_alive_frac`` (and its complement)
    summed over the rows (0 and 0 without those columns)."""
    if not {"n_cells_consensus", "crowd_alive_frac"} <= set(signals.columns):
        return {"alive": 0.0, "dead": 0.0}
    n, frac = _num(signals, "n_cells_consensus"), _num(signals, "crowd_alive_frac")
    known = np.isfinite(n) & np.isfinite(frac)
    return {"alive": float((n * frac)[known].sum()), "dead": float((n * (1.0 - frac))[known].sum())}


def rare_class(signals: pd.DataFrame) -> tuple[str, float, float]:
    """``(class, alive, dead)``: the class ("alive" | "dead") the labelled consensus holds fewest
    cells of, with its counts (``n_cells_consensus x crowd_alive_frac`` summed over the images,
    or, when the table was built by :func:`cellspot.active.signals.build_signals`, over every
    image it was built from, so leaving retired images out does not change it); without
    consensus cells, the rarer class in the predictions (expected counts); "dead" on a tie."""
    counts = signals.attrs.get(CONSENSUS_CLASS_COUNTS) or consensus_class_counts(signals)
    alive, dead = float(counts["alive"]), float(counts["dead"])
    if alive + dead == 0:
        alive = float(np.nansum(_num(signals, "pred_alive_sum")))
        dead = float(np.nansum(_num(signals, "pred_dead_sum")))
    return ("alive" if alive < dead else "dead"), alive, dead


@_register("rarity", "rare class: expected cells of the class the labelled consensus holds fewest of",
           needs_model=True)
def rarity(signals: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """``pred_dead_sum`` or ``pred_alive_sum``, for the :func:`rare_class` (module doc)."""
    _need(signals, "rarity", "pred_alive_sum", "pred_dead_sum", "n_pred_cells")
    rare, alive, dead = rare_class(signals)
    score = _num(signals, f"pred_{rare}_sum")
    n = _num(signals, "n_pred_cells")
    held = f"{dead if rare == 'dead' else alive:.0f} of {alive + dead:.0f} cells"
    reason = [("the model found no cell" if c == 0 else "no classifier prediction") if not np.isfinite(v) else
              f"{v:.1f} expected {rare} cells (the rarer class: {held})"
              for v, c in zip(score, n)]
    return _frame(score, reason, **{f"expected_{rare}": score})


@_register("coverage", "coverage: 1 / (1 + runs), images few students have seen")
def coverage(signals: pd.DataFrame, ctx: Context) -> pd.DataFrame:
    """``1 / (1 + n_runs)``."""
    _need(signals, "coverage", "n_runs")
    runs = np.nan_to_num(_num(signals, "n_runs"))
    return _frame(1.0 / (1.0 + runs), [f"{int(r)} run(s) so far" for r in runs], n_runs=runs)


@_register("diversity", "diversity: k-center greedy on image embeddings, away from labelled images")
def diversity(signals: pd.DataFrame, ctx: Context, from_labelled: bool = True) -> pd.DataFrame:
    """``1 - pick / n`` in k-center greedy order (module doc); labelled images 0."""
    if ctx.embeddings is not None:
        feats = select.features_for(signals, ctx.embeddings, None)
    else:
        feats = select.default_features(signals)
    labelled = _has_crowd(signals) if from_labelled else np.zeros(len(signals), bool)
    order, dist = select.k_center_greedy(feats, len(signals), centres=np.flatnonzero(labelled))
    score, pick_dist = np.zeros(len(signals)), np.full(len(signals), np.nan)
    score[order] = 1.0 - np.arange(len(order)) / max(len(order), 1)
    pick_dist[order] = dist
    reason = ["already labelled" if lab else f"k-center pick, distance {_fmt(d)}"
              for lab, d in zip(labelled, pick_dist)]
    return _frame(score, reason, pick_distance=pick_dist)


_COMPONENT_LABELS = {
    "crowd": "crowd disagreement", "coverage": "coverage", "classifier": "classifier entropy", "rarity": "rare class",
    "detector": "detector doubt", "conflict": "model-crowd conflict",
}
_COMPONENTS: dict[str, Callable[[pd.DataFrame, Context], pd.DataFrame]] = {
    "crowd": crowd_disagreement, "coverage": coverage, "classifier": _classifier, "rarity": rarity,
    "detector": detector_uncertainty, "conflict": conflict,
}


@_register(DEFAULT_STRATEGY, "ranked crowd + model signals blended (crowd + coverage before any model)")
def combined(signals: pd.DataFrame, ctx: Context, weights: Mapping[str, float] | None = None) -> pd.DataFrame:
    """``sum_k w_k r_k / sum_k w_k`` over the components defined for each image (module doc).

    Components whose columns the table lacks count as undefined for every image.
    """
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    unknown = sorted(set(weights) - set(_COMPONENTS))
    if unknown or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights must be >= 0 for components among {sorted(_COMPONENTS)}; got {weights}")
    norm, raws = {}, {}
    for name, w in weights.items():
        try:
            raw = _COMPONENTS[name](signals, ctx)["score"].to_numpy(float)
        except MissingSignalError:
            raw = np.full(len(signals), np.nan)
        raws[name] = raw  # what the reason shows: the signal itself, not its rank
        defined = raw[np.isfinite(raw)]
        if name != "coverage" and len(defined) and np.all(defined == defined[0]):
            # the same value for every image (no conflict anywhere, one image): it tells no image
            # from another, and ranked it would be 0 for all, pulling down only the images where
            # it is defined; so it counts as undefined
            raw = np.full(len(signals), np.nan)
        norm[name] = raw if name == "coverage" else rank01(raw)
    values = np.column_stack(list(norm.values())) if norm else np.zeros((len(signals), 0))
    w = np.array(list(weights.values()), float)
    defined = np.isfinite(values)
    total = (defined * w).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, (np.nan_to_num(values) * w).sum(axis=1) / total, np.nan)
    raw_values = np.column_stack(list(raws.values())) if raws else np.zeros((len(signals), 0))
    reason = [_combined_reason(row, raw_row, w, list(norm)) for row, raw_row in zip(values, raw_values)]
    return _frame(score, reason, **{k if k == "coverage" else f"{k}_rank": v for k, v in norm.items()})


def _combined_reason(row: np.ndarray, raw: np.ndarray, w: np.ndarray, names: list[str]) -> str:
    """The two components that weigh most in the image's score (weight x normalised value,
    ``row``), each with its own signal value (``raw``, not the rank the blend used), e.g.
    ``crowd disagreement 0.075, coverage 0.167 (5 runs)``."""
    contrib = np.where(np.isfinite(row), row * w, -np.inf)
    top = [i for i in np.argsort(-contrib, kind="stable")[:2] if np.isfinite(contrib[i])]
    text = ", ".join(_component_text(names[i], raw[i]) for i in top) or "no signal"
    model = [i for i, n in enumerate(names) if STRATEGIES[n].needs_model]
    if model and not np.isfinite(row[model]).any():
        text += "; no model prediction"
    return text


def _component_text(name: str, value: float) -> str:
    """One component of a combined reason with its raw signal: ``crowd disagreement 0.075``,
    ``coverage 0.250 (3 runs)``, ``rare class 4.2 expected cells``."""
    label = _COMPONENT_LABELS[name]
    if name == "rarity":
        return f"{label} {_fmt(value, '.1f')} expected cells"
    if name == "coverage" and np.isfinite(value) and value > 0:
        runs = int(round(1.0 / value - 1.0))
        return f"{label} {_fmt(value, '.3f')} ({runs} run{'' if runs == 1 else 's'})"
    return f"{label} {_fmt(value, '.3f')}"

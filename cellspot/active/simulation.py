"""Simulated active-learning rounds: the pure bookkeeping behind ``bench/active_learning.py``.

Pure module (numpy, pandas, the pure :mod:`cellspot.simulate` and :mod:`cellspot.active`
scoring; no torch, no database). The benchmark trains the models; everything that decides
*who labels what* and *how the learning curves compare* lives here so tests can check it.

* :class:`ClickBank` -- every image's task runs simulated up front, in a fixed order per
  image (run ``0, 1, 2, ...`` by distinct students of one class). Labelling an image with
  ``k`` more runs *reveals* its next ``k`` runs, so two strategies that both pick an image
  see the same clicks on it (common random numbers: the curves differ by the choice of
  images, not by the luck of the simulated clicks).
* :func:`candidates` -- the images a round may pick: not retired, room for ``k`` more runs,
  and (``unlabelled_only``, the random baseline) never labelled.
* :func:`choose_batch` -- score with a strategy of :mod:`cellspot.active.strategies` over the
  whole pool (as the queue does), keep the candidates, select a batch
  (:func:`cellspot.active.select.select_batch`).
* :func:`runs_to_target`, :func:`runs_to_stay`, :func:`mean_curves`, :func:`compare_strategies` -- task runs needed
  to reach a fraction of the reference metric (the model trained on every image labelled),
  on the seed-averaged curve, and the ratio to random sampling with its verdict.

Formulas. With ``m_s(b)`` the metric of seed ``s`` after ``b`` task runs and ``M_s`` the
reference metric of seed ``s``, the relative curve is ``r(b) = mean_s m_s(b) / M_s``; the
runs to target are the first ``b`` with ``r(b) >= q`` (``q = 0.95``), linearly interpolated
between the two budgets around the crossing. ``ratio = b_strategy / b_random``; when random
never gets there within the largest budget ``B``, only ``ratio < b_strategy / B`` is known
(``censored``). Robustness checks beside it: the runs from which ``r(b)`` stays ``>= q``
(interpolated at the last crossing from below) and ``mean_relative``, the mean of ``r(b)``
over the rounds after the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellspot.active.select import select_batch
from cellspot.active.strategies import score_images

log = logging.getLogger(__name__)

BANK_RUN_COLUMNS = ["image", "task_run", "annotator", "position"]
CURVE_KEYS = ["dataset", "strategy", "seed", "round", "task_runs", "metric"]
MEAN_CURVE_COLUMNS = ["dataset", "strategy", "round", "task_runs", "relative", "relative_std", "metric",
                      "metric_std", "n_seeds"]
COMPARE_COLUMNS = ["dataset", "strategy", "runs_to_target", "reached", "ratio_to_random", "ratio_bound",
                   "censored", "target_met", "runs_to_stay", "stay_ratio_to_random", "mean_relative",
                   "max_task_runs", "final_relative"]
DEFAULT_QUANTILE = 0.95
DEFAULT_MAX_RATIO = 0.6


class SimulationError(ValueError):
    """Bad simulation input: more runs than the bank holds, unknown images, bad curves."""


# --------------------------------------------------------------------------- the click bank


@dataclass(frozen=True)
class ClickBank:
    """Pre-simulated task runs of every image.

    ``runs``: :data:`BANK_RUN_COLUMNS` (``task_run`` str, unique; ``position`` 0.. per image,
    the order in which the runs are revealed). ``clicks``: ``image, annotator, task_run, x,
    y, label`` of those runs (``task_run`` str). ``depth``: runs per image in the bank.
    """

    runs: pd.DataFrame
    clicks: pd.DataFrame
    depth: int

    def reveal(self, counts: Mapping[str, int]) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The first ``counts[image]`` runs of each image and their clicks: ``(runs, clicks)``.

        Images not in ``counts`` (or with 0) contribute nothing. Raises
        :class:`SimulationError` for a count above :attr:`depth` or an image not in the bank.
        """
        bad = {str(k): int(v) for k, v in counts.items() if not 0 <= int(v) <= self.depth}
        if bad:
            raise SimulationError(f"an image can reveal 0..{self.depth} runs; asked for {bad}")
        wanted = pd.Series({str(k): int(v) for k, v in counts.items() if int(v) > 0}, dtype="int64")
        unknown = sorted(set(wanted.index) - set(self.runs["image"]))
        if unknown:
            raise SimulationError(f"{len(unknown)} image(s) are not in the click bank, e.g. {unknown[:3]}")
        limit = self.runs["image"].map(wanted).fillna(0).to_numpy()
        runs = self.runs[self.runs["position"].to_numpy() < limit].reset_index(drop=True)
        clicks = self.clicks[self.clicks["task_run"].isin(set(runs["task_run"]))].reset_index(drop=True)
        return runs, clicks


def build_click_bank(
    truth_cells: pd.DataFrame,
    images: pd.DataFrame,
    depth: int,
    n_students: int,
    profile: str,
    rng: np.random.Generator,
) -> ClickBank:
    """Simulate ``depth`` runs of every image of ``images`` by distinct students of one class.

    ``truth_cells``: ``image, x, y, label (alive|dead), diameter``; ``images``: ``image,
    width, height``. The class (``n_students`` persistent skills of crowd ``profile``, see
    :mod:`cellspot.simulate`) is drawn once; each image's students are a random order of the
    class. Deterministic given ``rng``.
    """
    from cellspot.simulate import draw_students, get_profile, random_runs, simulate_crowd

    if not 1 <= depth <= n_students:
        raise SimulationError(f"depth must be in [1, n_students={n_students}] (distinct students per image), "
                              f"got {depth}")
    prof = get_profile(profile)
    students = draw_students(n_students, prof, rng)
    runs = random_runs(images, depth, n_students, rng)
    sim = simulate_crowd(truth_cells, images, runs, prof, rng, students=students)
    runs = sim.runs.assign(task_run=sim.runs["task_run"].astype(str))
    runs["position"] = runs.groupby("image", sort=False).cumcount().astype("int64")
    clicks = sim.clicks.assign(task_run=sim.clicks["task_run"].astype(str))
    log.info("click bank: %d images x %d runs, %d clicks", len(images), depth, len(clicks))
    return ClickBank(runs=runs[BANK_RUN_COLUMNS].reset_index(drop=True), clicks=clicks.reset_index(drop=True),
                     depth=depth)


# --------------------------------------------------------------------------- choosing a batch


def candidates(
    n_runs: Mapping[str, int],
    *,
    k: int,
    depth: int,
    retired: Collection[str] = (),
    unlabelled_only: bool = False,
) -> list[str]:
    """Images that may get ``k`` more runs, in the order of ``n_runs``.

    An image qualifies when it is not ``retired``, ``n_runs + k <= depth`` (the bank, i.e.
    the distinct students, has room) and, with ``unlabelled_only``, it has no run yet. With
    ``unlabelled_only`` and no unlabelled image left, the labelled ones qualify again (so a
    baseline never stalls before the others).
    """
    if k < 1:
        raise SimulationError(f"k (runs per chosen image) must be >= 1, got {k}")
    gone = set(map(str, retired))
    room = [str(im) for im, n in n_runs.items() if str(im) not in gone and int(n) + k <= depth]
    if unlabelled_only:
        fresh = [im for im in room if int(n_runs[im]) == 0]
        return fresh or room
    return room


def choose_batch(
    strategy: str,
    signals: pd.DataFrame,
    allowed: Iterable[str],
    n: int,
    *,
    seed: int = 0,
    diversity: float = 0.0,
) -> pd.DataFrame:
    """The ``n`` images to label next among ``allowed``, best first.

    ``signals`` (the signal table of every pool image, :func:`cellspot.active.build_signals`)
    is restricted to ``allowed`` and scored with ``strategy`` (normalisations such as ranks
    see the candidates only, as the round queue scores only the servable images), then passed
    to :func:`cellspot.active.select.select_batch` with ``diversity``. Returns the chosen score
    rows (``image, score, strategy, reason, ..., batch_rank, novelty``).
    """
    keep = set(map(str, allowed))
    signals = signals[signals["image"].astype(str).isin(keep)].reset_index(drop=True)
    scored = score_images(strategy, signals, seed=seed)
    if scored.empty or n <= 0:
        return scored.iloc[:0].assign(batch_rank=pd.Series(dtype="int64"), novelty=pd.Series(dtype=float))
    return select_batch(scored, n=min(n, len(scored)), signals=signals, diversity=diversity)


# --------------------------------------------------------------------------- curves


def _curve(task_runs: Iterable[float], values: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """A learning curve as arrays without its NaN points; raises :class:`SimulationError` when
    the lengths differ or the budgets do not strictly increase."""
    x = np.asarray(list(task_runs), float)
    y = np.asarray(list(values), float)
    if x.shape != y.shape:
        raise SimulationError(f"task_runs and values differ in length: {x.shape} vs {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) > 1 and np.any(np.diff(x) <= 0):
        raise SimulationError("task_runs must be strictly increasing")
    return x, y


def runs_to_target(task_runs: Iterable[float], values: Iterable[float], target: float) -> float:
    """The first budget where ``values`` reach ``target``, linearly interpolated; NaN if never.

    ``task_runs`` ``(n,)`` increasing budgets, ``values`` ``(n,)`` the metric at each (NaN
    points are skipped). Reached at the first point -> that point's budget.
    """
    x, y = _curve(task_runs, values)
    hit = np.flatnonzero(y >= target)
    if not len(hit):
        return float("nan")
    i = int(hit[0])
    return float(x[0]) if i == 0 else _crossing(x, y, i - 1, target)


def runs_to_stay(task_runs: Iterable[float], values: Iterable[float], target: float) -> float:
    """The budget from which ``values`` stay at or above ``target`` up to the last point,
    linearly interpolated at the last crossing from below; NaN if the last point is below.

    A robustness check on :func:`runs_to_target` (the first crossing), which a single lucky
    round can decide on a noisy curve. Same inputs and errors as :func:`runs_to_target`.
    """
    x, y = _curve(task_runs, values)
    if not len(x) or y[-1] < target:
        return float("nan")
    below = np.flatnonzero(y < target)
    if not len(below):
        return float(x[0])
    return _crossing(x, y, int(below[-1]), target)


def _crossing(x: np.ndarray, y: np.ndarray, i: int, target: float) -> float:
    """Where the segment from point ``i`` to point ``i + 1`` of the curve meets ``target``
    (linear interpolation)."""
    return float(x[i] + (target - y[i]) / (y[i + 1] - y[i]) * (x[i + 1] - x[i]))


def mean_curves(curves: pd.DataFrame, references: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged learning curves, absolute and relative to each seed's reference.

    ``curves``: :data:`CURVE_KEYS` (one row per dataset, strategy, seed and round);
    ``references``: ``dataset, seed, metric`` (the model trained with every image labelled).
    Returns :data:`MEAN_CURVE_COLUMNS`, one row per dataset, strategy and round
    (``task_runs`` is the mean over seeds; the benchmark spends the same runs per round).
    """
    missing = [c for c in CURVE_KEYS if c not in curves.columns]
    if missing:
        raise SimulationError(f"curves lack column(s) {missing}")
    ref = references.set_index(["dataset", "seed"])["metric"]
    keys = pd.MultiIndex.from_frame(curves[["dataset", "seed"]])
    scale = ref.reindex(keys).to_numpy(float)
    if np.isnan(scale).any():
        raise SimulationError("every (dataset, seed) of the curves needs a reference metric")
    rel = curves.assign(relative=curves["metric"].to_numpy(float) / scale)
    g = rel.groupby(["dataset", "strategy", "round"], sort=True)
    out = pd.DataFrame({
        "task_runs": g["task_runs"].mean(), "relative": g["relative"].mean(), "relative_std": g["relative"].std(ddof=0),
        "metric": g["metric"].mean(), "metric_std": g["metric"].std(ddof=0), "n_seeds": g["seed"].nunique(),
    }).reset_index()
    return out[MEAN_CURVE_COLUMNS]


def compare_strategies(
    mean: pd.DataFrame,
    *,
    quantile: float = DEFAULT_QUANTILE,
    baseline: str = "random",
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> pd.DataFrame:
    """Task runs each strategy needs to reach ``quantile`` of the reference, and the ratio to ``baseline``.

    ``mean``: :func:`mean_curves`. Returns :data:`COMPARE_COLUMNS`, one row per dataset and
    strategy: ``runs_to_target`` (NaN when not reached), ``ratio_to_random`` =
    runs / baseline runs when both reached; when only the strategy reached,
    ``ratio_bound`` = runs / the largest budget of the baseline (the true ratio is below it)
    and ``censored``; ``target_met`` = ratio (or bound) ``<= max_ratio`` (None for the
    baseline itself or when the strategy did not reach). Two summaries that a single noisy
    round cannot decide: ``runs_to_stay`` (:func:`runs_to_stay`: from where the curve stays
    at or above the level) with ``stay_ratio_to_random``, and ``mean_relative``, the mean
    relative metric over the rounds after the first (the labelled seed, the same for every
    arm): the normalised area under the learning curve, comparable between the arms of a
    dataset because they spend the same runs per round.
    """
    rows = []
    for (dataset, strategy), c in mean.groupby(["dataset", "strategy"], sort=True):
        c = c.sort_values("round")
        after_seed = c["relative"].iloc[1:] if len(c) > 1 else c["relative"]
        rows.append({"dataset": dataset, "strategy": strategy,
                     "runs_to_target": runs_to_target(c["task_runs"], c["relative"], quantile),
                     "runs_to_stay": runs_to_stay(c["task_runs"], c["relative"], quantile),
                     "mean_relative": float(after_seed.mean()),
                     "max_task_runs": float(c["task_runs"].max()), "final_relative": float(c["relative"].iloc[-1])})
    table = pd.DataFrame(rows, columns=["dataset", "strategy", "runs_to_target", "runs_to_stay", "mean_relative",
                                        "max_task_runs", "final_relative"])
    out = []
    for row in table.itertuples(index=False):
        base = table[(table["dataset"] == row.dataset) & (table["strategy"] == baseline)]
        b, b_max, b_stay = (base[["runs_to_target", "max_task_runs", "runs_to_stay"]].iloc[0].astype(float)
                            if len(base) else (float("nan"),) * 3)
        stay = float(row.runs_to_stay)
        stay_ratio = (stay / b_stay if row.strategy != baseline and np.isfinite(stay) and np.isfinite(b_stay)
                      and b_stay > 0 else float("nan"))
        mine = float(row.runs_to_target)
        ratio = bound = float("nan")
        censored, met = False, None
        if row.strategy != baseline and np.isfinite(mine):
            if np.isfinite(b):
                ratio = mine / b if b > 0 else float("nan")
                met = bool(ratio <= max_ratio)
            elif np.isfinite(b_max) and b_max > 0:
                bound, censored = mine / b_max, True
                met = bool(bound <= max_ratio)
        out.append({**row._asdict(), "reached": bool(np.isfinite(mine)), "ratio_to_random": ratio,
                    "ratio_bound": bound, "censored": censored, "target_met": met,
                    "stay_ratio_to_random": stay_ratio})
    return pd.DataFrame(out, columns=COMPARE_COLUMNS)

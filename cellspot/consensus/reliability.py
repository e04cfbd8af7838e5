"""Expectation-maximisation of who is reliable: cell existence and alive/dead labels.

Two latent-class models over the clusters of :mod:`cellspot.consensus.clustering`.

**Detection** (is cluster *k* a real cell?). Every run *r* that saw the image either
clicked *k* (``o = 1``) or not. A real cell is clicked with the run's sensitivity
``s_r``, a spurious cluster (stray click, spam, debris) with the annotator's false-click
propensity ``f_a``. A cluster only exists if somebody clicked it, so both likelihoods are
zero-truncated::

    P(o | real) = prod_r s_r^o (1 - s_r)^(1 - o) / (1 - prod_r (1 - s_r))
    P(o | fake) = prod_r f_a^o (1 - f_a)^(1 - o) / (1 - prod_r (1 - f_a))
    p_cell_k    = pi P(o | real) / (pi P(o | real) + (1 - pi) P(o | fake))

With one run every cluster is equally likely real (``p_cell = pi``, learnt from images
with several runs); with ten runs a lone click is outvoted by nine misses. Sensitivity is
hierarchical: global -> annotator (Beta prior of strength ``KAPPA_ANNOTATOR``) -> run
(strength ``KAPPA_RUN``), so a lazy run or a spam run (one click where the others marked
many) is down-weighted even when its author is anonymous.

**Labels** (Dawid-Skene, two classes). Each annotator has ``P(says alive | alive)`` and
``P(says dead | dead)`` with a Beta prior towards one pooled, symmetric accuracy learnt
from clusters with two or more votes (a lone vote carries no information on accuracy,
and an asymmetric pooled model drifts to "every disagreement is a mislabelled alive
cell"); annotators' own accuracies also come from such shared clusters only (a
student who swaps the buttons shows up with accuracies below 0.5); *not sure* is an
abstention and carries no vote.
Clusters enter the M-step weighted by ``p_cell``.

Expert (gold) cells anchor both models: clusters matched to a gold cell are fixed real
with the gold label, other clusters on a gold image are fixed spurious, and gold cells
nobody clicked count as misses of every run on that image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.special import expit, logit

from cellspot.consensus.common import ClickArrays

KAPPA_GLOBAL = 2.0
KAPPA_ANNOTATOR = 4.0
KAPPA_RUN = 6.0
KAPPA_LABEL = 4.0
KAPPA_CLASS = 10.0  # P(alive) is shrunk towards 1/2 so EM cannot drift to one class
PRIOR_FALSE_CLICK = 0.05
KAPPA_FALSE_CLICK = 20.0
PRIOR_ACCURACY = 0.95  # a student labels a cell right ~97.8 % of the time in the real export
EPS = 1e-4
MAX_ITER = 25
TOL = 1e-3  # largest change of any reliability parameter between iterations


@dataclass(frozen=True)
class Clusters:
    """Per-cluster view of clustered clicks.

    ``cluster`` (n_clicks,) cluster id per click; ``image`` (n_clusters,) image code;
    ``support`` (n_clusters,) runs that clicked it; ``x``/``y`` (n_clusters,) mean position.
    """

    cluster: np.ndarray
    image: np.ndarray
    support: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @property
    def n(self) -> int:
        return len(self.image)


@dataclass(frozen=True)
class GoldAnchor:
    """Gold constraints: ``fixed`` (n_clusters,) bool, ``real`` / ``alive`` values where fixed,
    and ``missed`` (n_images,) gold cells that no cluster matched."""

    fixed_cell: np.ndarray
    real: np.ndarray
    fixed_label: np.ndarray
    alive: np.ndarray
    missed: np.ndarray


@dataclass(frozen=True)
class Reliability:
    """Fitted model: per-cluster posteriors and per-annotator parameters."""

    p_cell: np.ndarray
    p_alive: np.ndarray
    sensitivity: np.ndarray
    false_click: np.ndarray
    accuracy_alive: np.ndarray
    accuracy_dead: np.ndarray
    precision: np.ndarray
    prior_real: float
    prior_alive: float
    iterations: int


def summarise_clusters(arr: ClickArrays, cluster: np.ndarray) -> Clusters:
    n = int(cluster.max()) + 1 if len(cluster) else 0
    counts = np.bincount(cluster, minlength=n).astype(np.float64)
    image = np.zeros(n, dtype=np.int64)
    image[cluster] = arr.image
    x = np.bincount(cluster, weights=arr.x, minlength=n) / np.maximum(counts, 1)
    y = np.bincount(cluster, weights=arr.y, minlength=n) / np.maximum(counts, 1)
    return Clusters(cluster, image, counts.astype(np.int64), x, y)


def match_gold(arr: ClickArrays, cl: Clusters, gold: pd.DataFrame | None, radius: np.ndarray) -> GoldAnchor:
    """One-to-one match of gold cells to clusters within each image's radius (Hungarian)."""
    fixed_cell = np.zeros(cl.n, dtype=bool)
    real = np.zeros(cl.n)
    fixed_label = np.zeros(cl.n, dtype=bool)
    alive = np.zeros(cl.n)
    missed = np.zeros(arr.n_images)
    if gold is None or gold.empty:
        return GoldAnchor(fixed_cell, real, fixed_label, alive, missed)
    image_index = pd.Index(arr.image_names)
    g_img = image_index.get_indexer(gold["image"].astype(str))
    order = np.argsort(cl.image, kind="stable")
    bounds = np.searchsorted(cl.image[order], np.arange(arr.n_images + 1))
    for img in np.unique(g_img[g_img >= 0]):
        rows = gold[g_img == img]
        members = order[bounds[img]:bounds[img + 1]]
        fixed_cell[members] = True  # an expert marked every cell of a gold image
        if len(members):
            gx, gy = rows["x"].to_numpy(float), rows["y"].to_numpy(float)
            cost = np.hypot(gx[:, None] - cl.x[members][None, :], gy[:, None] - cl.y[members][None, :])
            gi, ci = linear_sum_assignment(cost)
            ok = cost[gi, ci] <= radius[img]
            hit = members[ci[ok]]
            real[hit] = 1.0
            fixed_label[hit] = True
            alive[hit] = (rows["label"].to_numpy()[gi[ok]] == "alive").astype(float)
            missed[img] = len(rows) - int(ok.sum())
        else:
            missed[img] = len(rows)
    return GoldAnchor(fixed_cell, real, fixed_label, alive, missed)


def fit(arr: ClickArrays, cl: Clusters, anchor: GoldAnchor, run_weight: np.ndarray | None = None) -> Reliability:
    """Fit the detection model, then the label model (see module docstring).

    ``run_weight`` (n_runs,) in (0, 1]: spam-likeness weights (:mod:`.spam`); a cluster's
    prior probability is multiplied by the weights of the runs that clicked it, and a run's
    label votes are scaled by its weight.
    """
    if run_weight is None:
        run_weight = np.ones(arr.n_runs)
    q, sens, false_click, prior_real, it1 = _fit_detection(arr, cl, anchor, np.log(run_weight))
    p_alive, acc_a, acc_d, prior_alive, it2 = _fit_labels(arr, cl, anchor, q, run_weight)
    n_clicks = np.bincount(arr.annotator, minlength=arr.n_annotators)
    on_real = np.bincount(arr.annotator, weights=q[cl.cluster], minlength=arr.n_annotators)
    precision = np.where(n_clicks > 0, on_real / np.maximum(n_clicks, 1), np.nan)
    return Reliability(q, p_alive, sens, false_click, acc_a, acc_d, precision, prior_real, prior_alive, it1 + it2)


def _beta_mean(successes: np.ndarray, trials: np.ndarray, prior_mean: np.ndarray | float, strength: float) -> np.ndarray:
    return np.clip((successes + strength * prior_mean) / (trials + strength), EPS, 1 - EPS)


def _fit_detection(arr: ClickArrays, cl: Clusters, anchor: GoldAnchor, log_run_weight: np.ndarray):
    # start from the share of the image's credible runs (not spam-like) that clicked it:
    # counting spam runs as misses lets the spurious class absorb the real cells
    credible = np.bincount(arr.run_image, weights=(log_run_weight > np.log(0.5)), minlength=arr.n_images)
    q = np.clip(cl.support / np.maximum(credible[cl.image], 1), 0.05, 0.95)
    q = np.where(anchor.fixed_cell, anchor.real, q)
    prior_shift = np.bincount(cl.cluster, weights=log_run_weight[arr.run], minlength=cl.n)
    prev = np.zeros(arr.n_runs + 1)
    for it in range(1, MAX_ITER + 1):
        s_run, f_run, f_annot, s_annot, prior_real = _detection_m_step(arr, cl, anchor, q, prior_shift == 0)
        q = _detection_e_step(arr, cl, anchor, s_run, f_run, prior_real, prior_shift)
        params = np.append(s_run, prior_real)
        if np.max(np.abs(params - prev)) < TOL:
            break
        prev = params
    return q, s_annot, f_annot, prior_real, it


def _detection_m_step(arr: ClickArrays, cl: Clusters, anchor: GoldAnchor, q: np.ndarray, unshifted: np.ndarray):
    real_per_img = np.bincount(cl.image, weights=q, minlength=arr.n_images) + anchor.missed
    fake_per_img = np.bincount(cl.image, weights=1 - q, minlength=arr.n_images)
    run_real = real_per_img[arr.run_image]  # expected real cells each run could have clicked
    run_fake = fake_per_img[arr.run_image]
    hit_real = np.bincount(arr.run, weights=q[cl.cluster], minlength=arr.n_runs)
    hit_fake = np.bincount(arr.run, weights=1 - q[cl.cluster], minlength=arr.n_runs)
    s0 = _beta_mean(hit_real.sum(), run_real.sum(), 0.5, KAPPA_GLOBAL)
    # strays rarely coincide: a weakly informed pooled false-click rate stays small
    f0 = min(_beta_mean(hit_fake.sum(), run_fake.sum(), PRIOR_FALSE_CLICK, KAPPA_FALSE_CLICK), s0 * 0.5)
    by_annot = lambda v: np.bincount(arr.run_annotator, weights=v, minlength=arr.n_annotators)  # noqa: E731
    s_annot = _beta_mean(by_annot(hit_real), by_annot(run_real), s0, KAPPA_ANNOTATOR)
    # a spurious spot draws fewer clicks than a cell: this keeps the two classes apart
    f_annot = np.minimum(_beta_mean(by_annot(hit_fake), by_annot(run_fake), f0, KAPPA_ANNOTATOR), 0.75 * s_annot)
    s_run = _beta_mean(hit_real, run_real, s_annot[arr.run_annotator], KAPPA_RUN)
    f_run = f_annot[arr.run_annotator]
    # base rate among clusters no spam-like run clicked (their prior is shifted on top)
    base = q[unshifted] if unshifted.any() else q
    prior_real = float(_beta_mean(base.sum(), len(base), 0.5, KAPPA_GLOBAL))
    return s_run, f_run, f_annot, s_annot, prior_real


def _detection_e_step(arr, cl, anchor, s_run, f_run, prior_real, prior_shift) -> np.ndarray:
    n = arr.n_images
    log_miss_s, log_miss_f = np.log1p(-s_run), np.log1p(-f_run)
    miss_s = np.bincount(arr.run_image, weights=log_miss_s, minlength=n)
    miss_f = np.bincount(arr.run_image, weights=log_miss_f, minlength=n)
    trunc_s = np.log(-np.expm1(miss_s))  # log(1 - prod(1 - s)): at least one click
    trunc_f = np.log(-np.expm1(miss_f))
    run_llr = (np.log(s_run) - log_miss_s) - (np.log(f_run) - log_miss_f)  # per run, not per click
    llr = np.bincount(cl.cluster, weights=run_llr[arr.run], minlength=cl.n)
    llr += (miss_s - trunc_s - miss_f + trunc_f)[cl.image]
    # a spam-like run's click is genuine with probability w: P(real) = prior * w, not odds * w
    prior = np.clip(prior_real * np.exp(prior_shift), EPS, 1 - EPS)
    q = expit(logit(prior) + llr)
    return np.where(anchor.fixed_cell, anchor.real, q)


def _fit_labels(arr: ClickArrays, cl: Clusters, anchor: GoldAnchor, q: np.ndarray, run_weight: np.ndarray):
    voted = arr.label >= 0
    c = cl.cluster[voted]  # only alive/dead votes enter; not sure abstains
    a = arr.annotator[voted]
    rw = run_weight[arr.run[voted]]
    said_alive = arr.label[voted] == 1
    n_alive = np.bincount(c, weights=said_alive, minlength=cl.n)
    n_votes = np.bincount(c, minlength=cl.n)
    p = (n_alive + 0.5) / (n_votes + 1.0)
    p = np.where(anchor.fixed_label, anchor.alive, p)
    w = q[c] * rw  # a vote's weight in the M-step: its cluster is a real cell, its run no spam
    w_alive, w_dead = w * said_alive, w * ~said_alive
    # accuracies are learnt from clusters with two or more votes only: a lone vote says
    # nothing about its author's accuracy, and letting it in lets EM drift to "alive"
    shared = n_votes[c] >= 2
    n_a = arr.n_annotators
    # P(alive) from the vote shares of the clusters (real ones weigh more), fixed before EM:
    # re-estimating it inside EM feeds back on itself and drifts to the majority class
    # when most cells have a single vote
    prior_alive = float(np.clip(_beta_mean((q * p).sum(), q.sum(), 0.5, KAPPA_CLASS), 0.02, 0.98))
    prev = np.zeros(2 * n_a + 1)
    for it in range(1, MAX_ITER + 1):
        pa = p[c]
        sw, swa, swd = w * shared, w_alive * shared, w_dead * shared  # informative votes only
        alive_right = np.bincount(a, weights=swa * pa, minlength=n_a)
        alive_total = np.bincount(a, weights=sw * pa, minlength=n_a)
        dead_right = np.bincount(a, weights=swd * (1 - pa), minlength=n_a)
        dead_total = np.bincount(a, weights=sw * (1 - pa), minlength=n_a)
        g = _beta_mean((alive_right + dead_right).sum(), sw.sum(), PRIOR_ACCURACY, KAPPA_GLOBAL)
        acc_a = _beta_mean(alive_right, alive_total, g, KAPPA_LABEL)
        acc_d = _beta_mean(dead_right, dead_total, g, KAPPA_LABEL)
        llr_alive_vote = np.log(acc_a) - np.log1p(-acc_d)  # per annotator
        llr_dead_vote = np.log1p(-acc_a) - np.log(acc_d)
        vote_llr = np.where(said_alive, llr_alive_vote[a], llr_dead_vote[a]) * rw
        llr = np.bincount(c, weights=vote_llr, minlength=cl.n)
        p = expit(logit(prior_alive) + llr)
        p = np.where(anchor.fixed_label, anchor.alive, p)
        params = np.concatenate([acc_a, acc_d, [g]])
        if np.max(np.abs(params - prev)) < TOL:
            break
        prev = params
    return p, acc_a, acc_d, prior_alive, it


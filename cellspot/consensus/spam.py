"""Runs that look like spam: short runs whose clicks pile up where genuine clicks don't.

The real Cell Spotting export has 23 % single-click runs, always "alive", always in the
bottom-right corner of the frame (a "submit without looking" pattern). Such a run cannot
be told apart from a genuine one-cell answer by its own clicks, but the crowd gives it
away: short runs concentrate in one spot far more than clicks in general do.

For every location bin ``b`` (a grid over the click coordinates) the enrichment

    E_b = (share of short-run clicks in b) / (share of all clicks in b)

is how much more often a short-run click lands in ``b`` than a click in general. Genuine
short runs click where everybody clicks, so their share ``g`` of the short runs is read
off the bins where short runs are not concentrated, and ``P(genuine | short, b) = g / E_b``.
A short run whose clicks fall in bins with ``E_b >= MIN_ENRICHMENT`` (and enough
short-run clicks there) gets that probability as its weight (mean over its clicks,
floored at ``MIN_WEIGHT``); every other run weighs 1. The consensus multiplies the
prior probability of a cluster by the weights of the runs that clicked it and scales
those runs' label votes by their weight.
"""

from __future__ import annotations

import numpy as np

from cellspot.consensus.common import ClickArrays

GRID = 8
SHORT_FRACTION = 0.2  # a run is short with at most 20 % of the typical run's clicks
MIN_TYPICAL_CLICKS = 4
MIN_SHORT_CLICKS_IN_BIN = 10
MIN_ENRICHMENT = 3.0
MIN_WEIGHT = 0.01
PEER_SHORT_WEIGHT = 0.2
EPS = 1e-9


def spam_weights(arr: ClickArrays) -> np.ndarray:
    """Weight in (0, 1] per run, shape (n_runs,); 1 unless the run looks like spam.

    The smaller of the location weight (module docstring) and the peer weight: a run with
    at most ``SHORT_FRACTION`` of the clicks of the busiest run on its image (which marked
    at least ``MIN_TYPICAL_CLICKS``) is genuine with probability ``PEER_SHORT_WEIGHT``.
    Without it, four spam runs agreeing on one corner click outvote the one student who
    marked every cell of an image nobody else saw.
    """
    return np.minimum(_location_weights(arr), _peer_weights(arr))


def _peer_weights(arr: ClickArrays) -> np.ndarray:
    n_clicks = np.bincount(arr.run, minlength=arr.n_runs)
    busiest = np.zeros(arr.n_images, dtype=np.int64)
    np.maximum.at(busiest, arr.run_image, n_clicks)
    peer = busiest[arr.run_image]
    short = (n_clicks > 0) & (peer >= MIN_TYPICAL_CLICKS) & (n_clicks <= SHORT_FRACTION * peer)
    return np.where(short, PEER_SHORT_WEIGHT, 1.0)


def _location_weights(arr: ClickArrays) -> np.ndarray:
    weights = np.ones(arr.n_runs)
    n_clicks = np.bincount(arr.run, minlength=arr.n_runs)
    clicked = n_clicks > 0
    if not clicked.any():
        return weights
    typical = float(np.median(n_clicks[clicked]))
    short_run = clicked & (n_clicks <= max(1.0, SHORT_FRACTION * typical))
    if typical < MIN_TYPICAL_CLICKS or short_run.sum() < MIN_SHORT_CLICKS_IN_BIN:
        return weights
    b = _bins(arr.x, arr.y)
    short_click = short_run[arr.run]
    all_hist = np.bincount(b, minlength=GRID * GRID) + 1.0
    short_hist = np.bincount(b[short_click], minlength=GRID * GRID) + 1.0
    short_share, all_share = short_hist / short_hist.sum(), all_hist / all_hist.sum()
    enrichment = short_share / all_share
    suspicious = (enrichment >= MIN_ENRICHMENT) & (short_hist - 1 >= MIN_SHORT_CLICKS_IN_BIN)
    # genuine short runs click where everybody clicks: their share of the short runs is
    # read off the bins where short runs are not concentrated
    calm = enrichment <= 1.5
    genuine = float(np.clip(short_share[calm].sum() / max(all_share[calm].sum(), EPS), 0.01, 1.0))
    click_e = np.where(suspicious[b], enrichment[b] / genuine, 1.0)
    runs = np.flatnonzero(short_run)
    mean_e = np.bincount(arr.run[short_click], weights=click_e[short_click], minlength=arr.n_runs)[runs]
    mean_e /= n_clicks[runs]
    weights[runs] = np.clip(1.0 / np.maximum(mean_e, 1.0), MIN_WEIGHT, 1.0)
    return weights


def _bins(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Grid bin of each click over the robust extent of all clicks, shape (n,)."""
    x_hi = max(float(np.percentile(x, 99.5)), 1e-9)
    y_hi = max(float(np.percentile(y, 99.5)), 1e-9)
    bx = np.clip((x / x_hi * GRID).astype(np.int64), 0, GRID - 1)
    by = np.clip((y / y_hi * GRID).astype(np.int64), 0, GRID - 1)
    return by * GRID + bx

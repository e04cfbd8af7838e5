"""``seed_r35``: the thesis method, reproduced as a baseline.

Per image, the first run (in input order) is the reference. For every reference click,
the clicks of the *other* runs within ``R`` pixels (default 35, the thesis value in the
524x391 display frame) are merged with it and their votes averaged with alive = 1,
dead = 0, not sure = 0.5; the cell is alive if the average is at least 0.5. Cells keep
the reference click's position. Clicks no reference click reaches are dropped, as in
the thesis, and a click within R of two reference clicks counts for both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from cellspot.consensus.common import encode_clicks, runs_per_image, vote_to_cells
from cellspot.consensus.registry import register
from cellspot.consensus.types import ConsensusResult, empty_cells

DEFAULT_RADIUS = 35.0


@register("seed_r35")
def seed_r35(
    clicks: pd.DataFrame, *, runs: pd.DataFrame | None = None, gold: pd.DataFrame | None = None,
    cell_radius: float | None = None,
) -> ConsensusResult:
    radius = float(cell_radius) if cell_radius else DEFAULT_RADIUS
    params = {"radius": radius}
    if clicks.empty:
        return ConsensusResult(empty_cells(), params=params)
    arr = encode_clicks(clicks, runs)
    n_runs = runs_per_image(arr)
    vote = np.where(arr.label == 1, 1.0, np.where(arr.label == 0, 0.0, 0.5))
    # reference run = the run of the image's first click in input order
    first_click = pd.Series(np.arange(len(arr.image))).groupby(arr.image).min().to_numpy()
    ref_run = np.full(arr.n_images, -1, dtype=np.int64)
    ref_run[arr.image[first_click]] = arr.run[first_click]
    is_ref = arr.run == ref_run[arr.image]

    span = max(np.abs(arr.x).max(), np.abs(arr.y).max()) * 2 + 10 * radius + 10
    pts = np.column_stack([arr.x + arr.image * span, arr.y])
    tree_other = cKDTree(pts[~is_ref])
    ref_idx = np.flatnonzero(is_ref)
    neigh = tree_other.query_ball_point(pts[ref_idx], r=radius, workers=-1)
    other_vote = vote[~is_ref]
    other_run = arr.run[~is_ref]
    sums = np.array([other_vote[n].sum() for n in neigh])
    counts = np.array([len(n) for n in neigh])
    support = np.array([len(np.unique(other_run[n])) for n in neigh]) + 1
    avg = (vote[ref_idx] + sums) / (1 + counts)
    img = arr.image[ref_idx]
    cells = vote_to_cells(
        img, arr.x[ref_idx], arr.y[ref_idx], avg, support, n_runs[img],
        confidence=np.maximum(avg, 1 - avg), p_cell=np.ones(len(ref_idx)), image_names=arr.image_names,
    )
    return ConsensusResult(cells, params=params)

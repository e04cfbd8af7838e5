"""``dbscan_vote``: plain DBSCAN per image + majority vote, a common baseline.

Clicks of all runs are clustered with DBSCAN (``eps`` = the cell radius hint, default 35
px; ``min_samples`` = half the runs that saw the image, rounded up); a cluster is a cell
and its label is the majority of its alive/dead votes (ties alive; not sure ignored).
Position = mean of the clicks. No reliability, no same-run constraint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from cellspot.consensus.common import encode_clicks, runs_per_image, vote_to_cells
from cellspot.consensus.registry import register
from cellspot.consensus.types import ConsensusResult, empty_cells

DEFAULT_EPS = 35.0


@register("dbscan_vote")
def dbscan_vote(
    clicks: pd.DataFrame, *, runs: pd.DataFrame | None = None, gold: pd.DataFrame | None = None,
    cell_radius: float | None = None,
) -> ConsensusResult:
    from sklearn.cluster import DBSCAN  # scikit-learn is only needed by this baseline

    eps = float(cell_radius) if cell_radius else DEFAULT_EPS
    params = {"eps": eps, "min_samples": "ceil(n_runs / 2)"}
    if clicks.empty:
        return ConsensusResult(empty_cells(), params=params)
    arr = encode_clicks(clicks, runs)
    n_runs = runs_per_image(arr)
    order = np.argsort(arr.image, kind="stable")
    bounds = np.searchsorted(arr.image[order], np.arange(arr.n_images + 1))
    out: list[tuple[int, float, float, float, int]] = []
    for img in range(arr.n_images):
        idx = order[bounds[img]:bounds[img + 1]]
        if len(idx) == 0:
            continue
        min_samples = max(1, int(np.ceil(n_runs[img] / 2)))
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(np.column_stack([arr.x[idx], arr.y[idx]]))
        for c in np.unique(labels[labels >= 0]):
            members = idx[labels == c]
            votes = arr.label[members]
            n_alive, n_dead = int((votes == 1).sum()), int((votes == 0).sum())
            p = n_alive / (n_alive + n_dead) if n_alive + n_dead else 0.5
            out.append((img, arr.x[members].mean(), arr.y[members].mean(), p, len(np.unique(arr.run[members]))))
    if not out:
        return ConsensusResult(empty_cells(), params=params)
    img, x, y, p, support = (np.array(v) for v in zip(*out))
    cells = vote_to_cells(img.astype(np.int64), x, y, p, support, n_runs[img.astype(np.int64)],
                          confidence=np.maximum(p, 1 - p), p_cell=np.ones(len(p)), image_names=arr.image_names)
    return ConsensusResult(cells, params=params)

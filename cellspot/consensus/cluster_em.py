"""``cluster_em`` (default): constrained clustering + reliability EM.

1. Estimate each image's merge radius from the clicks (:mod:`.clustering`).
2. Cluster clicks so no cluster holds two clicks of one run (mutual nearest neighbours).
3. Weigh down runs that look like spam (:mod:`.spam`) and fit who is reliable
   (:mod:`.reliability`): per-run sensitivity, per-annotator false-click propensity and
   alive/dead confusion, anchored by gold cells.
4. Keep clusters with ``p_cell >= keep_threshold``; position = mean click.

Output per cell: ``p_alive`` (posterior of alive), ``label`` (alive if p_alive >= 0.5),
``p_cell`` (posterior of being a real cell) and
``confidence = p_cell * max(p_alive, 1 - p_alive)`` (probability that the cell exists and
carries the right label). Deterministic: no randomness anywhere.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cellspot.consensus.clustering import MIN_RADIUS_PX, cluster_clicks, estimate_scale
from cellspot.consensus.common import drop_repeated_clicks, encode_clicks, runs_per_image, vote_to_cells
from cellspot.consensus.registry import register
from cellspot.consensus.reliability import fit, match_gold, summarise_clusters
from cellspot.consensus.spam import spam_weights
from cellspot.consensus.types import ANNOTATOR_COLUMNS, ConsensusResult, empty_cells

log = logging.getLogger(__name__)


@register("cluster_em")
def cluster_em(
    clicks: pd.DataFrame, *, runs: pd.DataFrame | None = None, gold: pd.DataFrame | None = None,
    cell_radius: float | None = None, keep_threshold: float = 0.5,
) -> ConsensusResult:
    if not 0.0 < keep_threshold < 1.0:
        raise ValueError(f"keep_threshold must be in (0, 1), got {keep_threshold}")
    params: dict[str, object] = {"cell_radius_hint": cell_radius, "keep_threshold": keep_threshold}
    if clicks.empty:
        return ConsensusResult(empty_cells(), params=params)
    arr, repeats = drop_repeated_clicks(encode_clicks(clicks, runs), MIN_RADIUS_PX)
    if repeats:
        log.info("cluster_em: %d click(s) repeat an earlier click of their run within %g px: set aside",
                 repeats, MIN_RADIUS_PX)
    scale = estimate_scale(arr, cell_radius)
    cluster = cluster_clicks(arr, scale)
    cl = summarise_clusters(arr, cluster)
    anchor = match_gold(arr, cl, gold, scale.radius)
    run_weight = spam_weights(arr)
    rel = fit(arr, cl, anchor, run_weight)
    keep = rel.p_cell >= keep_threshold
    n_runs = runs_per_image(arr)
    confidence = rel.p_cell * np.maximum(rel.p_alive, 1 - rel.p_alive)
    cells = vote_to_cells(
        cl.image[keep], cl.x[keep], cl.y[keep], rel.p_alive[keep], cl.support[keep],
        n_runs[cl.image[keep]], confidence[keep], rel.p_cell[keep], arr.image_names,
    )
    params.update(
        pooled_spacing_px=_rounded(scale.pooled_spacing),
        pooled_jitter_px=_rounded(scale.pooled_jitter),
        median_radius_px=_rounded(float(np.median(scale.radius))),
        prior_real=round(rel.prior_real, 4),
        prior_alive=round(rel.prior_alive, 4),
        iterations=rel.iterations,
        n_clusters=cl.n,
        spam_suspect_runs=int((run_weight < 1).sum()),
        repeated_clicks_set_aside=repeats,
    )
    log.info("cluster_em: %d clusters, %d kept, radius median %.1f px", cl.n, int(keep.sum()),
             float(np.median(scale.radius)))
    return ConsensusResult(cells, _annotator_table(arr, rel), params)


def _rounded(v: float) -> float | None:
    return round(float(v), 3) if np.isfinite(v) else None


def _annotator_table(arr, rel) -> pd.DataFrame:
    n_runs = np.bincount(arr.run_annotator, minlength=arr.n_annotators)
    n_clicks = np.bincount(arr.annotator, minlength=arr.n_annotators)
    balanced = np.clip(rel.accuracy_alive + rel.accuracy_dead - 1.0, 0.0, 1.0)
    table = pd.DataFrame({
        "annotator": arr.annotator_names,
        "n_runs": n_runs,
        "n_clicks": n_clicks,
        "sensitivity": rel.sensitivity,
        "precision": rel.precision,
        "accuracy_alive": rel.accuracy_alive,
        "accuracy_dead": rel.accuracy_dead,
        "weight": rel.sensitivity * balanced,
    })
    return table[ANNOTATOR_COLUMNS]

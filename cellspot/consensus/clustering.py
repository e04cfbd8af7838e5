"""Constrained clustering of clicks: one cluster per cell, never two clicks of one run.

Scale: the merge radius of an image is estimated from its clicks:

* ``spacing`` = median distance from a click to the nearest other click *of the same run*
  (a student marks distinct cells, so this is the typical distance between cells);
* ``jitter`` = median distance between matched clicks of two different runs
  (two students marking the same cell).

``radius = min(0.75 * spacing, 3 * jitter)``: three times the median click disagreement
covers 99.8 % of two students' clicks on one cell (Rayleigh tail) and keeps a far stray
click out of a cell's cluster; the spacing bound keeps neighbouring cells apart where
students disagree a lot. Neighbouring cells inside the radius stay apart anyway, because
matching is one to one and a run never joins a cluster twice.
Images with too few distances fall back to the pooled value over all images (no spacing
bound when all images together have too few). A ``cell_radius`` hint replaces the estimate.
A run's repeated click (within 1 px of an earlier one of the run: a double click) is set
aside before all this (:func:`cellspot.consensus.common.drop_repeated_clicks`).

Clustering: the clicks of every pair of runs of an image are matched one to one within
the radius, greedily by distance (rounds of mutual nearest neighbours, so a click whose
nearest partner was taken still finds its own). Connected components of the matches are
the clusters, then :mod:`.repair` restores the invariant and the cells: a student's
double click is isolated, other components that hold two clicks of one run are split by
constrained single linkage, and incomplete neighbouring clusters are joined or their
clicks reassigned (two cells closer than the click jitter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cellspot.consensus.common import ClickArrays, group_min, offset_coordinates, run_rank
from cellspot.consensus.repair import merge_fragments, reassign_clicks, split_conflicts

log = logging.getLogger(__name__)

MIN_DISTANCES_PER_IMAGE = 8
JITTER_FACTOR = 3.0
SPACING_FACTOR = 0.75
MIN_RADIUS_PX = 1.0  # clicks are whole pixels in most exports: identical clicks must merge


@dataclass(frozen=True)
class Scale:
    """Per-image merge radius and the estimates it came from, arrays of shape (n_images,).

    ``edges`` = ``(i, j, distance)`` of the click pairs matched within the search radius
    (the cell spacing); clustering keeps those shorter than ``radius``.
    """

    radius: np.ndarray
    spacing: np.ndarray
    jitter: np.ndarray
    pooled_spacing: float
    pooled_jitter: float
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]


def _group_median(values: np.ndarray, group: np.ndarray, n_groups: int, fallback: float) -> np.ndarray:
    """Median of ``values`` (>= 0) per group; groups with too few values get ``fallback``."""
    out = np.full(n_groups, fallback, dtype=np.float64)
    if len(values) == 0:
        return out
    top = float(values.max()) + 1.0
    order = np.argsort(group + values / top)  # one sort: by group, then value
    v = values[order]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ok = counts >= MIN_DISTANCES_PER_IMAGE
    lo = starts[ok] + (counts[ok] - 1) // 2
    hi = starts[ok] + counts[ok] // 2
    out[ok] = 0.5 * (v[lo] + v[hi])
    return out


@dataclass(frozen=True)
class Neighbours:
    """Neighbour facts from one k-nearest-neighbour query over all images.

    ``spacing`` (n_clicks,): distance to the nearest other click of the same run (inf if
    none among the k nearest). ``src``/``dst``/``dist`` (n_edges,): candidate pairs, the
    ``CANDIDATES_PER_RUN`` nearest clicks ``dst`` of every other run for click ``src``.
    """

    spacing: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    dist: np.ndarray
    second: np.ndarray  # (n_edges,) bool: dst is src's second nearest click of that run


CANDIDATES_PER_RUN = 2


@dataclass(frozen=True)
class _Knn:
    """The k nearest clicks of every click (all images in one query), sorted by distance."""

    dist: np.ndarray  # (n, k) float32, inf where missing
    idx: np.ndarray  # (n, k) int32 (int64 for huge n), n where missing
    slot: np.ndarray  # (n,) run slot of every click (:func:`run_rank` of its run)
    spacing: np.ndarray  # (n,) distance to the nearest other click of the same run (inf if none)
    max_runs: int


def _knn(arr: ClickArrays, k: int | None = None) -> _Knn:
    n = len(arr.x)
    if n == 0:
        return _Knn(np.empty((0, 1)), np.empty((0, 1), dtype=np.int64), np.empty(0, dtype=np.int64),
                    np.empty(0), 1)
    max_runs = int(np.bincount(arr.run_image).max())
    k = min(n, k or int(np.clip(2 * max_runs + 1, 8, 48)))
    pts, gap = offset_coordinates(arr.x, arr.y, arr.image)
    tree = cKDTree(pts, balanced_tree=False, compact_nodes=False)  # faster to build, as fast to query
    dist, idx = tree.query(pts, k=k, distance_upper_bound=gap / 2, workers=-1)
    del pts, tree
    # (n, k) tables dominate peak memory on big inputs: keep them small
    dist = dist.reshape(n, k).astype(np.float32)
    idx = idx.reshape(n, k).astype(np.int32 if n < 2**31 - 1 else np.int64)
    slot = run_rank(arr)[arr.run].astype(np.int32)
    # self removed by index, not by rank (duplicate clicks); missing neighbours point at n
    same = (np.append(slot, -1)[idx] == slot[:, None]) & (idx != np.arange(n)[:, None])
    first = np.argmax(same, axis=1)
    spacing = np.where(same[np.arange(n), first], dist[np.arange(n), first], np.inf).astype(np.float64)
    return _Knn(dist, idx, slot, spacing, max_runs)


def nearest_per_run(arr: ClickArrays, knn: _Knn, bound: np.ndarray) -> Neighbours:
    """Candidate pairs shorter than ``bound`` (n_images,) from the k-nearest table.

    The neighbours of a click come sorted by distance, so walking the k columns in order
    and counting, per (click, run slot), how many clicks of that run were already seen
    gives each run's nearest and second nearest click without sorting the table; a click
    leaves the walk at its first neighbour beyond its image's bound.
    """
    n = len(arr.x)
    seen = np.zeros((n, max(knn.max_runs, 1)), dtype=np.uint8)  # clicks of each run slot met so far
    rows = np.arange(n)
    limit = bound[arr.image]
    src, dst, dd, second = [], [], [], []
    for c in range(knn.idx.shape[1]):
        d = knn.dist[rows, c].astype(np.float64)
        near = d < limit[rows]
        rows, d = rows[near], d[near]
        if len(rows) == 0:
            break
        j = knn.idx[rows, c].astype(np.int64)
        s = knn.slot[j]
        other = (s != knn.slot[rows]) & (j != rows)
        ro, so, jo, do = rows[other], s[other], j[other], d[other]
        met = seen[ro, so]
        seen[ro, so] = met + 1  # one entry per row and column: no repeated (row, slot) here
        keep = met < CANDIDATES_PER_RUN
        src.append(ro[keep])
        dst.append(jo[keep])
        dd.append(do[keep])
        second.append(met[keep] > 0)
    if not src:
        empty = np.empty(0, dtype=np.int64)
        return Neighbours(knn.spacing, empty, empty, np.empty(0), np.empty(0, dtype=bool))
    return Neighbours(knn.spacing, np.concatenate(src), np.concatenate(dst), np.concatenate(dd),
                      np.concatenate(second))


def match_runs(arr: ClickArrays, nb: Neighbours, radius: np.ndarray,
               rounds: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of the clicks of every pair of runs within ``radius``.

    Returns pairs ``(i, j, distance)`` with ``i < j``. Round one joins mutual nearest
    clicks; later rounds join mutual nearest among the clicks still unmatched with each
    other's run, so a click whose nearest partner was taken still finds its own.
    """
    ok = nb.dist < radius[arr.image[nb.src]]
    i = np.minimum(nb.src[ok], nb.dst[ok])
    j = np.maximum(nb.src[ok], nb.dst[ok])
    d = nb.dist[ok]
    second = nb.second[ok]
    n = len(arr.x)
    if len(i) == 0:
        return i, j, d
    # a pair found from both sides appears twice; the index tie-break makes the same copy
    # win on both sides, so no deduplication is needed
    d_key = d + np.arange(len(d)) * (1e-9 * max(float(d.max()), 1.0) / len(d))
    rank = run_rank(arr)
    slots = int(rank.max()) + 1
    # flat (click, partner run slot) keys, seen from i and from j
    ui = i * slots + rank[arr.run[j]]
    uj = j * slots + rank[arr.run[i]]
    used = np.zeros(n * slots, dtype=bool)
    matched = np.zeros(len(i), dtype=bool)
    # round one: nearest candidates only (a second nearest can only win once the nearest
    # is taken); later rounds scan only the edges still alive (a matched edge has used
    # both of its keys, so it is never alive again)
    cand = np.flatnonzero(~second)
    for r in range(rounds):
        if r == 1:
            cand = np.concatenate([cand, np.flatnonzero(second)])
        live = cand[~(used[ui[cand]] | used[uj[cand]])]
        if len(live) == 0:
            break
        dk = d_key[live]
        win = live[group_min(ui[live], dk, n * slots) & group_min(uj[live], dk, n * slots)]
        if len(win) == 0 and r > 0:
            break
        matched[win] = True
        used[ui[win]] = True
        used[uj[win]] = True
        cand = live
    return i[matched], j[matched], d[matched]


def estimate_scale(arr: ClickArrays, cell_radius: float | None = None) -> Scale:
    """Estimate each image's merge radius from the clicks (see module docstring)."""
    knn = _knn(arr)
    has = np.isfinite(knn.spacing)
    # too few runs clicked two cells (sparse images): no spacing bound, the click jitter alone
    # sets the radius; a handful of distances (a double click a few pixels apart) is no estimate
    enough = int(has.sum()) >= MIN_DISTANCES_PER_IMAGE
    pooled_spacing = float(np.median(knn.spacing[has])) if enough else np.inf
    spacing = _group_median(knn.spacing[has], arr.image[has], arr.n_images, pooled_spacing)
    if cell_radius:
        r = np.full(arr.n_images, float(cell_radius))
        edges = match_runs(arr, nearest_per_run(arr, knn, r), r)
        return Scale(r, spacing, r / JITTER_FACTOR, pooled_spacing, float(cell_radius) / JITTER_FACTOR, edges)
    i, j, d = match_runs(arr, nearest_per_run(arr, knn, spacing), spacing)
    del knn
    pooled_jitter = float(np.median(d)) if len(d) else np.inf
    jitter = _group_median(d, arr.image[i], arr.n_images, pooled_jitter)
    radius = np.maximum(np.minimum(SPACING_FACTOR * spacing, JITTER_FACTOR * jitter), MIN_RADIUS_PX)
    return Scale(radius, spacing, jitter, pooled_spacing, pooled_jitter, (i, j, d))


def cluster_clicks(arr: ClickArrays, scale: Scale) -> np.ndarray:
    """Cluster id per click, shape (n_clicks,); no cluster holds two clicks of one run.

    Uses the matched pairs of ``scale`` shorter than the image's radius. Cluster ids are
    consecutive, ordered by (image, first click index).
    """
    n = len(arr.x)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    i, j, d = scale.edges
    close = d < scale.radius[arr.image[i]]
    i, j, d = i[close], j[close], d[close]
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    comp = split_conflicts(arr, comp.astype(np.int64), i, j, d)
    comp = merge_fragments(arr, comp, scale.radius)
    comp = reassign_clicks(arr, comp, scale.radius)
    # renumber by (image, first click) so results are deterministic and readable
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    used = np.flatnonzero(first < n)
    order = used[np.lexsort((first[used], arr.image[first[used]]))]
    remap = np.empty(comp.max() + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[comp]



"""Constrained clustering of clicks: one cluster per cell, never two clicks of one run.

Scale: the merge radius of an image is estimated from its clicks:

* ``spacing`` = median distance from a click to the nearest other click *of the same run*
  (a student marks distinct cells, so this is the typical distance between cells);
* ``jitter`` = median distance between mutually nearest clicks of two different runs
  (two students marking the same cell).

``radius = min(0.75 * spacing, 3 * jitter)``: three times the median click disagreement
covers 99.8 % of two students' clicks on one cell (Rayleigh tail) and keeps a far stray
click out of a cell's cluster; the spacing bound keeps neighbouring cells apart where
students disagree a lot. Neighbouring cells inside the radius stay apart anyway, because
only mutual nearest clicks of two runs are joined.
Images with too few distances fall back to the pooled value over all images. A
``cell_radius`` hint replaces the estimate.

Clustering: for every click and every other run of its image, the nearest click of that
run within the radius is a candidate; an edge is kept when the choice is mutual
(mutual nearest neighbours, i.e. a greedy one-to-one matching between every pair of
runs). Connected components of those edges are the clusters; the rare component that
holds two clicks of one run (chains A1-B1-A2) is re-clustered by constrained
single-linkage over its edges, shortest first, refusing any merge that would join two
clicks of one run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from cellspot.consensus.common import ClickArrays, offset_coordinates

log = logging.getLogger(__name__)

MIN_DISTANCES_PER_IMAGE = 8
JITTER_FACTOR = 3.0
SPACING_FACTOR = 0.75


@dataclass(frozen=True)
class Scale:
    """Per-image merge radius and the estimates it came from, arrays of shape (n_images,).

    ``edges`` = ``(i, j, distance)`` of the mutual-nearest click pairs found within the
    search radius (the cell spacing); clustering keeps those shorter than ``radius``.
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
    """For every click, its nearest click of its own run and of each other run (among the
    ``k`` nearest clicks of its image).

    ``spacing`` (n_clicks,) distance to the nearest other click of the same run (inf if
    none found); ``src``/``dst``/``dist`` (n_edges,) the nearest click ``dst`` of each
    other run for click ``src``, sorted by ``(src, run[dst])``.
    """

    spacing: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    dist: np.ndarray


def nearest_per_run(arr: ClickArrays, k: int | None = None) -> Neighbours:
    """One k-nearest-neighbour query over all images at once (see :class:`Neighbours`)."""
    n = len(arr.x)
    max_runs = int(np.bincount(arr.run_image).max()) if arr.n_runs else 1
    k = min(n, k or int(np.clip(2 * max_runs, 8, 48)))
    pts, gap = offset_coordinates(arr.x, arr.y, arr.image)
    dist, idx = cKDTree(pts).query(pts, k=k, distance_upper_bound=gap / 2, workers=-1)
    del pts
    # drop self; keep (n, k-1) tables small: they dominate peak memory on big inputs
    dist = dist[:, 1:].astype(np.float32)
    idx = idx[:, 1:].astype(np.int32 if n < 2**31 - 1 else np.int64)
    found = idx < n
    idx[~found] = 0
    run32 = arr.run.astype(np.int32)
    nb_run = run32[idx]
    nb_run[~found] = -1
    same = found & (nb_run == run32[:, None])
    first_same = np.argmax(same, axis=1)
    spacing = np.where(same.any(axis=1), dist[np.arange(n), first_same], np.inf).astype(np.float64)
    # nearest click of each other run: neighbours come sorted by distance, so after a
    # stable sort by run the first entry of every run is its nearest click
    sentinel = np.iinfo(np.int32).max
    nb_run[~found | same] = sentinel
    del same, found
    order = np.argsort(nb_run, axis=1, kind="stable").astype(np.int8 if k <= 127 else np.int32)
    r_sorted = np.take_along_axis(nb_run, order, axis=1)
    del nb_run
    first = np.ones(r_sorted.shape, dtype=bool)
    first[:, 1:] = r_sorted[:, 1:] != r_sorted[:, :-1]
    first &= r_sorted != sentinel
    del r_sorted
    rows, cols = np.nonzero(first)
    del first
    picked = order[rows, cols].astype(np.int64)
    src = rows.astype(np.int64)
    dst = idx[rows, picked].astype(np.int64)
    dd = dist[rows, picked].astype(np.float64)
    return Neighbours(spacing, src, dst, dd)


def mutual_edges(arr: ClickArrays, nb: Neighbours, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, distance)``, ``i < j``, of mutually nearest clicks of two runs within
    the image's ``radius``: ``j`` is ``i``'s nearest click of run(j) and vice versa."""
    ok = nb.dist < radius[arr.image[nb.src]]
    src, dst, dd = nb.src[ok], nb.dst[ok], nb.dist[ok]
    rank = _run_rank(arr)
    n_slots = int(rank.max()) + 1 if len(rank) else 1
    # best[c, r] = nearest click of the image's r-th run to click c (or -1)
    best = np.full((len(arr.x), n_slots), -1, dtype=np.int64)
    best[src, rank[arr.run[dst]]] = dst
    mutual = (best[dst, rank[arr.run[src]]] == src) & (src < dst)
    return src[mutual], dst[mutual], dd[mutual]


def estimate_scale(arr: ClickArrays, cell_radius: float | None = None) -> Scale:
    """Estimate each image's merge radius from the clicks (see module docstring)."""
    nb = nearest_per_run(arr)
    has = np.isfinite(nb.spacing)
    pooled_spacing = float(np.median(nb.spacing[has])) if has.any() else np.nan
    if not np.isfinite(pooled_spacing):
        # nobody clicked two cells: fall back to the spread of the clicks
        pooled_spacing = float(max(np.ptp(arr.x), np.ptp(arr.y), 1.0)) if len(arr.x) else 1.0
    spacing = _group_median(nb.spacing[has], arr.image[has], arr.n_images, pooled_spacing)
    if cell_radius:
        r = np.full(arr.n_images, float(cell_radius))
        edges = mutual_edges(arr, nb, r)
        return Scale(r, spacing, r / JITTER_FACTOR, pooled_spacing, float(cell_radius) / JITTER_FACTOR, edges)
    i, j, d = mutual_edges(arr, nb, spacing)
    pooled_jitter = float(np.median(d)) if len(d) else np.inf
    jitter = _group_median(d, arr.image[i], arr.n_images, pooled_jitter)
    radius = np.minimum(SPACING_FACTOR * spacing, JITTER_FACTOR * jitter)
    return Scale(radius, spacing, jitter, pooled_spacing, pooled_jitter, (i, j, d))


def cluster_clicks(arr: ClickArrays, scale: Scale) -> np.ndarray:
    """Cluster id per click, shape (n_clicks,); no cluster holds two clicks of one run.

    Uses the mutual-nearest pairs of ``scale`` shorter than the image's radius (the
    mutual nearest pairs within a smaller radius are exactly those). Cluster ids are
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
    comp = _split_conflicts(arr, comp.astype(np.int64), i, j, d)
    # renumber by (image, first click) so results are deterministic and readable
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    used = np.flatnonzero(first < n)
    order = used[np.lexsort((first[used], arr.image[first[used]]))]
    remap = np.empty(comp.max() + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[comp]


def _run_rank(arr: ClickArrays) -> np.ndarray:
    """Rank of every run among the runs of its image, shape (n_runs,)."""
    order = np.lexsort((np.arange(arr.n_runs), arr.run_image))
    first_of_image = np.searchsorted(arr.run_image[order], arr.run_image[order], side="left")
    rank = np.empty(arr.n_runs, dtype=np.int64)
    rank[order] = np.arange(arr.n_runs) - first_of_image
    return rank


def _local_run_bits(arr: ClickArrays) -> np.ndarray | None:
    """A one-bit mask per click for its run's rank within the image (None if > 63 runs)."""
    rank = _run_rank(arr)
    if arr.n_runs and rank.max() > 63:
        return None
    return np.left_shift(np.uint64(1), rank[arr.run].astype(np.uint64))


def _split_conflicts(arr: ClickArrays, comp: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Re-cluster components that hold two clicks of one run.

    Constrained single linkage, Boruvka style and vectorised: every round each cluster
    picks its shortest edge to a cluster with no run in common, and mutual picks merge.
    """
    key = comp * (arr.n_runs + 1) + arr.run
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    bad_click = np.zeros(comp.max() + 1, dtype=bool)
    bad_click[comp[counts[inv] > 1]] = True
    bad_click = bad_click[comp]
    if not bad_click.any():
        return comp
    bits = _local_run_bits(arr)
    if bits is None:
        raise ValueError("more than 63 runs on one image: not supported by the cluster_em method")
    log.debug("re-clustering %d clicks in components that joined two clicks of one run", int(bad_click.sum()))
    on_bad = bad_click[i]
    ei, ej, ed = i[on_bad], j[on_bad], d[on_bad]
    label = np.arange(len(comp))
    mask = bits.copy()
    for _ in range(64):
        a, b = label[ei], label[ej]
        valid = (a != b) & ((mask[a] & mask[b]) == 0)
        if not valid.any():
            break
        a, b, dd = a[valid], b[valid], ed[valid]
        src, dst, dist = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([dd, dd])
        lo, hi = np.minimum(src, dst), np.maximum(src, dst)
        order = np.lexsort((hi, lo, dist, src))
        s_sorted = src[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = s_sorted[1:] != s_sorted[:-1]
        best = np.full(len(comp), -1, dtype=np.int64)
        best[s_sorted[first]] = dst[order][first]
        c = np.flatnonzero(best >= 0)
        partner = best[c]
        pair = (best[partner] == c) & (c < partner)
        keep, gone = c[pair], partner[pair]
        mask[keep] |= mask[gone]
        relabel = np.arange(len(comp))
        relabel[gone] = keep
        label = relabel[label]
    new = comp.copy()
    new[bad_click] = comp.max() + 1 + label[bad_click]
    return new

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


CANDIDATES_PER_RUN = 2
DENSE_LIMIT = 50_000_000  # group minima through a dense table up to this many keys


def nearest_per_run(arr: ClickArrays, k: int | None = None) -> Neighbours:
    """One k-nearest-neighbour query over all images at once (see :class:`Neighbours`)."""
    n = len(arr.x)
    empty = np.empty(0, dtype=np.int64)
    if n < 2:
        return Neighbours(np.full(n, np.inf), empty, empty, np.empty(0))
    max_runs = int(np.bincount(arr.run_image).max())
    k = min(n, k or int(np.clip(2 * max_runs + 1, 8, 48)))
    pts, gap = offset_coordinates(arr.x, arr.y, arr.image)
    dist, idx = cKDTree(pts).query(pts, k=k, distance_upper_bound=gap / 2, workers=-1)
    del pts
    # (n, k) tables dominate peak memory on big inputs: keep them small
    dist = dist.astype(np.float32)
    idx = idx.astype(np.int32 if n < 2**31 - 1 else np.int64)
    found = (idx < n) & (idx != np.arange(n)[:, None])  # self removed by index, not by rank
    idx[~found] = 0
    run32 = arr.run.astype(np.int32)
    nb_run = run32[idx]
    same = found & (nb_run == run32[:, None])
    first_same = np.argmax(same, axis=1)
    spacing = np.where(same.any(axis=1), dist[np.arange(n), first_same], np.inf).astype(np.float64)
    # neighbours come sorted by distance, so after a stable sort by run the first entries
    # of every run are its nearest clicks
    sentinel = np.iinfo(np.int32).max
    nb_run[~found | same] = sentinel
    del same, found
    order = np.argsort(nb_run, axis=1, kind="stable").astype(np.int8 if k <= 127 else np.int32)
    r_sorted = np.take_along_axis(nb_run, order, axis=1)
    del nb_run
    new_run = np.ones(r_sorted.shape, dtype=bool)
    new_run[:, 1:] = r_sorted[:, 1:] != r_sorted[:, :-1]
    cols_k = np.arange(k)[None, :]
    start = np.maximum.accumulate(np.where(new_run, cols_k, 0), axis=1)
    keep = ((cols_k - start) < CANDIDATES_PER_RUN) & (r_sorted != sentinel)
    del r_sorted, new_run, start
    rows, cols = np.nonzero(keep)
    del keep
    picked = order[rows, cols].astype(np.int64)
    return Neighbours(spacing, rows.astype(np.int64), idx[rows, picked].astype(np.int64),
                      dist[rows, picked].astype(np.float64))


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
    n = len(arr.x)
    if len(i) == 0:
        return i, j, d
    # a pair found from both sides appears twice; the index tie-break makes the same copy
    # win on both sides, so no deduplication is needed
    d_key = d + np.arange(len(d)) * (1e-9 * max(float(d.max()), 1.0) / len(d))
    rank = _run_rank(arr)
    slots = int(rank.max()) + 1
    ri, rj = rank[arr.run[j]], rank[arr.run[i]]  # slot of the partner's run, seen from i / j
    used = np.zeros((n, slots), dtype=bool)
    matched = np.zeros(len(i), dtype=bool)
    for _ in range(rounds):
        live = np.flatnonzero(~matched & ~used[i, ri] & ~used[j, rj])
        if len(live) == 0:
            break
        best_i = _group_min(i[live] * slots + ri[live], d_key[live], n * slots)
        best_j = _group_min(j[live] * slots + rj[live], d_key[live], n * slots)
        win = live[best_i & best_j]
        if len(win) == 0:
            break
        matched[win] = True
        used[i[win], ri[win]] = True
        used[j[win], rj[win]] = True
    return i[matched], j[matched], d[matched]


def _group_min(key: np.ndarray, value: np.ndarray, n_keys: int) -> np.ndarray:
    """Mask of the entries holding the smallest ``value`` of their ``key`` (values unique)."""
    if n_keys <= DENSE_LIMIT:
        best = np.full(n_keys, np.inf)
        np.minimum.at(best, key, value)
        return best[key] == value
    order = np.lexsort((value, key))
    k = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    mask = np.zeros(len(order), dtype=bool)
    mask[order[first]] = True
    return mask


def estimate_scale(arr: ClickArrays, cell_radius: float | None = None) -> Scale:
    """Estimate each image's merge radius from the clicks (see module docstring)."""
    nb = nearest_per_run(arr)
    has = np.isfinite(nb.spacing)
    # nobody clicked two cells: no spacing bound, the click jitter alone sets the radius
    pooled_spacing = float(np.median(nb.spacing[has])) if has.any() else np.inf
    spacing = _group_median(nb.spacing[has], arr.image[has], arr.n_images, pooled_spacing)
    if cell_radius:
        r = np.full(arr.n_images, float(cell_radius))
        edges = match_runs(arr, nb, r)
        return Scale(r, spacing, r / JITTER_FACTOR, pooled_spacing, float(cell_radius) / JITTER_FACTOR, edges)
    i, j, d = match_runs(arr, nb, spacing)
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
    comp = _split_conflicts(arr, comp.astype(np.int64), i, j, d)
    comp = merge_fragments(arr, comp, scale.radius)
    comp = reassign_clicks(arr, comp, scale.radius)
    comp = merge_fragments(arr, comp, scale.radius)
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


def _duplicated(arr: ClickArrays, comp: np.ndarray) -> np.ndarray:
    """Per click: does its component hold another click of the same run? shape (n,)."""
    key = comp * (arr.n_runs + 1) + arr.run
    _, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inv] > 1


def _isolate_double_clicks(arr: ClickArrays, comp: np.ndarray, dup: np.ndarray) -> np.ndarray:
    """A component where exactly one run has several clicks is one cell clicked twice by
    that student: keep the click nearest the other runs' mean, the rest become singletons."""
    n_comp = int(comp.max()) + 1
    dup_runs = np.zeros(n_comp, dtype=np.int64)
    first_dup = np.unique(comp[dup] * (arr.n_runs + 1) + arr.run[dup])
    np.add.at(dup_runs, first_dup // (arr.n_runs + 1), 1)
    others = np.bincount(comp[~dup], minlength=n_comp)
    eligible = (dup_runs == 1) & (others > 0)
    if not eligible.any():
        return comp
    cx = np.bincount(comp[~dup], weights=arr.x[~dup], minlength=n_comp) / np.maximum(others, 1)
    cy = np.bincount(comp[~dup], weights=arr.y[~dup], minlength=n_comp) / np.maximum(others, 1)
    cand = np.flatnonzero(dup & eligible[comp])
    dist = np.hypot(arr.x[cand] - cx[comp[cand]], arr.y[cand] - cy[comp[cand]])
    order = cand[np.lexsort((cand, dist, comp[cand]))]
    keep_first = np.ones(len(order), dtype=bool)
    keep_first[1:] = comp[order][1:] != comp[order][:-1]
    loose = order[~keep_first]
    comp = comp.copy()
    comp[loose] = n_comp + np.arange(len(loose))
    return comp


def _split_conflicts(arr: ClickArrays, comp: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Re-cluster components that hold two clicks of one run.

    A student's double click on one cell is undone first (:func:`_isolate_double_clicks`).
    Other conflicts (chains over neighbouring cells) get constrained single linkage,
    Boruvka style and vectorised: every round each cluster picks its shortest edge to a
    cluster with no run in common, and mutual picks merge.
    """
    dup = _duplicated(arr, comp)
    if not dup.any():
        return comp
    comp = _isolate_double_clicks(arr, comp, dup)
    dup = _duplicated(arr, comp)
    bad_comp = np.zeros(comp.max() + 1, dtype=bool)
    bad_comp[comp[dup]] = True
    bad_click = bad_comp[comp]
    if not bad_click.any():
        return comp
    bits = _run_bits_or_raise(arr)
    log.debug("re-clustering %d clicks in components that joined two clicks of one run", int(bad_click.sum()))
    on_bad = bad_click[i]
    label = constrained_merge(bits, i[on_bad], j[on_bad], d[on_bad])
    new = comp.copy()
    new[bad_click] = comp.max() + 1 + label[bad_click]
    return new


def _run_bits_or_raise(arr: ClickArrays) -> np.ndarray:
    bits = _local_run_bits(arr)
    if bits is None:
        raise ValueError("an image has more than 63 runs: the cluster_em method supports at most 63")
    return bits


def constrained_merge(mask: np.ndarray, ei: np.ndarray, ej: np.ndarray, ed: np.ndarray) -> np.ndarray:
    """Single linkage over edges ``(ei, ej, ed)`` that never joins nodes sharing a run.

    ``mask`` (n_nodes,) uint64 run bits per node. Boruvka style and vectorised: every
    round each group picks its shortest edge to a group with no run in common, and
    mutual picks merge. Returns a group label per node, shape (n_nodes,).
    """
    n = len(mask)
    label = np.arange(n)
    mask = mask.copy()
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
        best = np.full(n, -1, dtype=np.int64)
        best[s_sorted[first]] = dst[order][first]
        c = np.flatnonzero(best >= 0)
        partner = best[c]
        pair = (best[partner] == c) & (c < partner)
        keep, gone = c[pair], partner[pair]
        mask[keep] |= mask[gone]
        relabel = np.arange(n)
        relabel[gone] = keep
        label = relabel[label]
    return label


def merge_fragments(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Join clusters of one image that no run clicked twice and whose centres are within
    the radius: pairwise matching is not transitive, so a cell clicked by every student
    can come out as complementary fragments (3 runs + 2 runs)."""
    _, comp = np.unique(comp, return_inverse=True)  # consecutive ids, no empty clusters
    n_comp = int(comp.max()) + 1
    size = np.bincount(comp, minlength=n_comp)
    cx = np.bincount(comp, weights=arr.x, minlength=n_comp) / size
    cy = np.bincount(comp, weights=arr.y, minlength=n_comp) / size
    image = np.zeros(n_comp, dtype=np.int64)
    image[comp] = arr.image
    runs_seen = np.bincount(arr.run_image, minlength=arr.n_images)
    partial = np.flatnonzero(size < runs_seen[image])  # only clusters someone missed
    if len(partial) < 2:
        return comp
    pts, _ = offset_coordinates(cx[partial], cy[partial], image[partial], scale=radius[image[partial]])
    pairs = cKDTree(pts).query_pairs(1.0, output_type="ndarray")
    if len(pairs) == 0:
        return comp
    bits = np.zeros(n_comp, dtype=np.uint64)
    np.bitwise_or.at(bits, comp, _run_bits_or_raise(arr))
    a, b = partial[pairs[:, 0]], partial[pairs[:, 1]]
    keep = (bits[a] & bits[b]) == 0
    if not keep.any():
        return comp
    a, b = a[keep], b[keep]
    label = constrained_merge(bits, a, b, np.hypot(cx[a] - cx[b], cy[a] - cy[b]))
    return label[comp]


def _centres(arr: ClickArrays, comp: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per cluster: size, centre x, centre y, image, run bits; ``comp`` must be consecutive."""
    n_comp = int(comp.max()) + 1
    size = np.bincount(comp, minlength=n_comp)
    cx = np.bincount(comp, weights=arr.x, minlength=n_comp) / np.maximum(size, 1)
    cy = np.bincount(comp, weights=arr.y, minlength=n_comp) / np.maximum(size, 1)
    image = np.zeros(n_comp, dtype=np.int64)
    image[comp] = arr.image
    return size, cx, cy, image


def _candidate_moves(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray, bits_click: np.ndarray):
    """Clicks of incomplete clusters x neighbouring clusters their run has not clicked.

    Returns ``(click, target, own_distance, new_distance, n_clusters)`` or None.
    """
    runs_seen = np.bincount(arr.run_image, minlength=arr.n_images)
    size, cx, cy, image = _centres(arr, comp)
    partial = np.flatnonzero((size > 0) & (size < runs_seen[image]))  # ids may have gaps
    if len(partial) < 2:
        return None
    pts, _ = offset_coordinates(cx[partial], cy[partial], image[partial], scale=radius[image[partial]])
    pairs = cKDTree(pts).query_pairs(1.0, output_type="ndarray")
    if len(pairs) == 0:
        return None
    src = np.concatenate([partial[pairs[:, 0]], partial[pairs[:, 1]]])
    dst = np.concatenate([partial[pairs[:, 1]], partial[pairs[:, 0]]])
    bits = np.zeros(len(size), dtype=np.uint64)
    np.bitwise_or.at(bits, comp, bits_click)
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(size)[:-1]])
    reps = size[src]
    click = order[np.repeat(starts[src], reps) + _ranges(reps)]
    target = np.repeat(dst, reps)
    free = (bits[target] & bits_click[click]) == 0
    click, target = click[free], target[free]
    own = np.hypot(arr.x[click] - cx[comp[click]], arr.y[click] - cy[comp[click]])
    new = np.hypot(arr.x[click] - cx[target], arr.y[click] - cy[target])
    return click, target, own, new, len(size)


def reassign_clicks(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray, rounds: int = 8) -> np.ndarray:
    """Constrained k-means sweeps over incomplete clusters, then dissolution of a cluster
    whose every click fits a neighbouring cluster its run has not clicked.

    A click moves to a neighbouring cluster (centre within the radius) that its run has not
    clicked yet when that centre is nearer than its own; of several clicks of one run bound
    for the same cluster, the one that gains most moves. When no click gains, the cheapest
    cluster of each image that can be spread entirely over its neighbours (smallest, then
    shortest mean move) is dissolved. This repairs
    cells cut across by pairwise matching when two cells are closer than the click jitter.
    """
    bits_click = _run_bits_or_raise(arr)
    n_key = arr.n_runs + 1
    _, comp = np.unique(comp, return_inverse=True)
    for _ in range(rounds):
        found = _candidate_moves(arr, comp, radius, bits_click)
        if found is None:
            break
        click, target, own, new, n_comp = found
        gain = own - new
        tie = np.arange(len(gain)) * 1e-12
        best = _group_min(click, new + tie, len(arr.x))  # each click's nearest free target
        click, target, own, new, gain = click[best], target[best], own[best], new[best], gain[best]
        moving = gain > 1e-9
        if moving.any():
            c, t, g = click[moving], target[moving], gain[moving]
            win = _group_min(t * n_key + arr.run[c], -g + np.arange(len(g)) * 1e-12, n_comp * n_key)
            comp = comp.copy()
            comp[c[win]] = t[win]
            continue
        comp, dissolved = _dissolve_one_layer(arr, comp, click, target, new, n_comp, n_key)
        if not dissolved:
            break
    return comp


def _dissolve_one_layer(arr, comp, click, target, new, n_comp, n_key):
    size = np.bincount(comp, minlength=n_comp)
    placed = np.bincount(comp[click], minlength=n_comp)
    # all clicks placeable, and no two of them bound for the same (target, run)
    key = target * n_key + arr.run[click]
    clash = np.zeros(n_comp, dtype=bool)
    _, inv, cnt = np.unique(comp[click] * (n_comp * n_key) + key, return_inverse=True, return_counts=True)
    clash[comp[click][cnt[inv] > 1]] = True
    can = (placed == size) & ~clash & (size > 0)
    if not can.any():
        return comp, False
    cost = np.bincount(comp[click], weights=new, minlength=n_comp) / np.maximum(size, 1)
    score = size * 1e6 + cost + np.arange(n_comp) * 1e-9
    # one cluster per image and round (the cheapest), so no two dissolutions collide
    image = np.zeros(n_comp, dtype=np.int64)
    image[comp] = arr.image
    cand = np.flatnonzero(can)
    go = np.zeros(n_comp, dtype=bool)
    go[cand[_group_min(image[cand], score[cand], arr.n_images)]] = True
    src = comp[click]
    move = go[src]
    if not move.any():
        return comp, False
    comp = comp.copy()
    comp[click[move]] = target[move]
    return comp, True


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(c)`` for every count, shape (counts.sum(),)."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts, counts)

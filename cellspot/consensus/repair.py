"""Repairs after pairwise matching: conflicts, double clicks and fragmented cells.

Pairwise matching of runs is not transitive. Its connected components can hold two clicks
of one run (a chain over neighbouring cells, or a student's double click), and one cell
can come out as complementary fragments when two cells are closer than the click jitter.
Every function here keeps the invariant: no cluster holds two clicks of one run.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
from scipy.spatial import cKDTree

from cellspot.consensus.common import ClickArrays, bits_overlap, group_min, offset_coordinates

log = logging.getLogger(__name__)


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


def split_conflicts(arr: ClickArrays, comp: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> np.ndarray:
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
    bits = arr.run_bits
    log.debug("re-clustering %d clicks in components that joined two clicks of one run", int(bad_click.sum()))
    on_bad = bad_click[i]
    label = constrained_merge(bits, i[on_bad], j[on_bad], d[on_bad])
    new = comp.copy()
    new[bad_click] = comp.max() + 1 + label[bad_click]
    return new


def constrained_merge(mask: np.ndarray, ei: np.ndarray, ej: np.ndarray, ed: np.ndarray) -> np.ndarray:
    """Single linkage over edges ``(ei, ej, ed)`` that never joins nodes sharing a run.

    ``mask`` (n_nodes, n_words) uint64 run bits per node. Boruvka style and vectorised: every
    round each group picks its shortest edge to a group with no run in common, and
    mutual picks merge. Returns a group label per node, shape (n_nodes,).
    """
    n = len(mask)
    label = np.arange(n)
    mask = mask.copy()
    for _ in range(64):
        a, b = label[ei], label[ej]
        valid = (a != b) & ~bits_overlap(mask[a], mask[b])
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
    found = _incomplete_neighbours(arr, comp, radius)
    if found is None:
        return comp
    _, cx, cy, bits, a, b = found
    keep = ~bits_overlap(bits[a], bits[b])
    if not keep.any():
        return comp
    a, b = a[keep], b[keep]
    label = constrained_merge(bits, a, b, np.hypot(cx[a] - cx[b], cy[a] - cy[b]))
    return label[comp]


def _incomplete_neighbours(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray):
    """Pairs of incomplete clusters (some run of the image missed them) of one image whose
    centres are within the image's radius.

    Returns ``(size, cx, cy, run_bits, a, b)`` (per-cluster arrays, then the pairs) or None.
    Cluster ids may have gaps (empty clusters are ignored).
    """
    n_comp = int(comp.max()) + 1
    size = np.bincount(comp, minlength=n_comp)
    cx = np.bincount(comp, weights=arr.x, minlength=n_comp) / np.maximum(size, 1)
    cy = np.bincount(comp, weights=arr.y, minlength=n_comp) / np.maximum(size, 1)
    image = np.zeros(n_comp, dtype=np.int64)
    image[comp] = arr.image
    runs_seen = np.bincount(arr.run_image, minlength=arr.n_images)
    partial = np.flatnonzero((size > 0) & (size < runs_seen[image]))
    if len(partial) < 2:
        return None
    pts, _ = offset_coordinates(cx[partial], cy[partial], image[partial], scale=radius[image[partial]])
    pairs = cKDTree(pts).query_pairs(1.0, output_type="ndarray")
    if len(pairs) == 0:
        return None
    click_bits = arr.run_bits
    bits = np.zeros((n_comp, click_bits.shape[1]), dtype=np.uint64)
    in_partial = np.zeros(n_comp, dtype=bool)
    in_partial[partial] = True
    mine = in_partial[comp]  # only the clusters that can take part
    np.bitwise_or.at(bits, comp[mine], click_bits[mine])
    return size, cx, cy, bits, partial[pairs[:, 0]], partial[pairs[:, 1]]


def _candidate_moves(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray, bits_click: np.ndarray):
    """Clicks of incomplete clusters x neighbouring clusters their run has not clicked.

    Returns ``(click, target, own_distance, new_distance, n_clusters)`` or None.
    """
    found = _incomplete_neighbours(arr, comp, radius)
    if found is None:
        return None
    size, cx, cy, bits, a, b = found
    src, dst = np.concatenate([a, b]), np.concatenate([b, a])
    # clicks of the source clusters only, grouped by cluster (a small subset of all clicks)
    is_src = np.zeros(len(size), dtype=bool)
    is_src[src] = True
    sub = np.flatnonzero(is_src[comp])
    order = sub[np.argsort(comp[sub], kind="stable")]
    sub_size = np.where(is_src, size, 0)
    starts = np.concatenate([[0], np.cumsum(sub_size)[:-1]])
    reps = size[src]
    click = order[np.repeat(starts[src], reps) + _ranges(reps)]
    target = np.repeat(dst, reps)
    free = ~bits_overlap(bits[target], bits_click[click])
    click, target = click[free], target[free]
    own = np.hypot(arr.x[click] - cx[comp[click]], arr.y[click] - cy[comp[click]])
    new = np.hypot(arr.x[click] - cx[target], arr.y[click] - cy[target])
    return click, target, own, new, len(size)


def reassign_clicks(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Constrained k-means sweeps over incomplete clusters, then dissolution of a cluster
    whose every click fits a neighbouring cluster its run has not clicked.

    A click moves to a neighbouring cluster (centre within the radius) that its run has not
    clicked yet when that centre is nearer than its own; of several clicks of one run bound
    for the same cluster, the one that gains most moves. When no click gains, the cheapest
    cluster of each image that can be spread entirely over its neighbours (smallest, then
    shortest mean move) is dissolved, and complementary fragments are joined again. This
    repairs cells cut across by pairwise matching when two cells are closer than the click
    jitter. Only the images with incomplete neighbouring clusters are worked on.
    """
    _, comp = np.unique(comp, return_inverse=True)
    found = _incomplete_neighbours(arr, comp, radius)
    if found is None:
        return comp
    # work on the images that have incomplete neighbours only: a small share of all clicks
    touched = np.zeros(arr.n_images, dtype=bool)
    image_of = np.zeros(int(comp.max()) + 1, dtype=np.int64)
    image_of[comp] = arr.image
    touched[image_of[found[4]]] = True
    mask = touched[arr.image]
    sub = replace(arr, x=arr.x[mask], y=arr.y[mask], label=arr.label[mask], image=arr.image[mask],
                  run=arr.run[mask], annotator=arr.annotator[mask])
    _, sub_comp = np.unique(comp[mask], return_inverse=True)
    sub_comp = merge_fragments(sub, _reassign(sub, sub_comp, radius, rounds), radius)
    out = comp.copy()
    out[mask] = comp.max() + 1 + sub_comp
    return out


def _reassign(arr: ClickArrays, comp: np.ndarray, radius: np.ndarray, rounds: int) -> np.ndarray:
    bits_click = arr.run_bits
    n_key = arr.n_runs + 1
    for _ in range(rounds):
        found = _candidate_moves(arr, comp, radius, bits_click)
        if found is None:
            break
        click, target, own, new, n_comp = found
        gain = own - new
        tie = np.arange(len(gain)) * 1e-12
        best = group_min(click, new + tie, len(arr.x))  # each click's nearest free target
        click, target, own, new, gain = click[best], target[best], own[best], new[best], gain[best]
        moving = gain > 1e-9
        if moving.any():
            c, t, g = click[moving], target[moving], gain[moving]
            win = group_min(t * n_key + arr.run[c], -g + np.arange(len(g)) * 1e-12, n_comp * n_key)
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
    go[cand[group_min(image[cand], score[cand], arr.n_images)]] = True
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

"""From detector probabilities to cells: peaks of the centre map, watershed to instance masks,
and one-to-one instance matching for evaluation.

Pure module (numpy, scipy, scikit-image; no torch). Input channels follow
:data:`cellspot.ml.targets.CHANNELS`: ``prob[0]`` foreground, ``prob[1]`` centre heatmap.
Coordinates follow :mod:`cellspot.render`: pixel ``(row j, column i)`` has centre ``(x=i, y=j)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.feature import peak_local_max
from skimage.measure import regionprops
from skimage.segmentation import watershed

log = logging.getLogger(__name__)

#: how watershed seeds are found on the centre map: local maxima, or connected cores above a level
SEED_KINDS: tuple[str, ...] = ("peaks", "cores")

#: instances smaller than this (pixels) are left out of the shape prior and never dropped by
#: shape: the solidity and eccentricity of a few pixels say little about the object
SHAPE_MIN_AREA = 10


class PostprocessError(ValueError):
    """Bad post-processing input (wrong shape or parameter out of range)."""


@dataclass(frozen=True)
class Detections:
    """Cells found in one image.

    ``xy``: ``(N, 2)`` float64 ``(x, y)`` pixel coordinates; ``scores``: ``(N,)`` float64 in
    [0, 1] (centre-map height); ``labels``: ``(H, W)`` int32 instance mask, instance ``k + 1``
    belongs to cell ``k`` (0 = background; every cell owns at least its seed pixel, even when
    the seed lies outside the foreground).
    """

    xy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.xy))


def postprocess(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_distance: int = 3,
    peak_threshold: float = 0.3,
    min_area: int = 0,
    border_margin: float = 0.0,
    seeds: str = "peaks",
    min_solidity: float = 0.0,
    max_eccentricity: float = 1.0,
    min_instance_prob: float = 0.0,
) -> Detections:
    """Cells from ``prob`` ``(C >= 2, H, W)`` float probabilities.

    ``seeds="peaks"``: centres are local maxima of the centre map
    (``skimage.feature.peak_local_max``) at least ``min_distance`` pixels apart and above
    ``peak_threshold``, refined to sub-pixel by the centre-weighted mean of their 3x3
    neighbourhood. ``seeds="cores"``: every connected region of the centre map above
    ``peak_threshold`` is one cell (its centre the centre-weighted mean of the region;
    ``min_distance`` is not used), which needs no cell size, so it suits images whose cells
    differ much in size (a normalised-distance centre map, see :mod:`cellspot.ml.targets`).
    Instances are the watershed of the
    negated centre map inside the foreground ``prob[0] > threshold``, seeded by those peaks.
    With ``min_area > 0``, instances of fewer than ``min_area`` pixels are dropped and
    foreground components that hold no peak become cells of their own (centre = centroid)
    when they have at least ``min_area`` pixels. With ``border_margin > 0``, cells whose
    centre lies closer than ``border_margin`` pixels to the image border are dropped with
    their instance (for annotation protocols that skip cells cut by the border: the peak of a
    cut cell sits on the border; tuned on val, 0 where border cells are annotated).
    ``min_solidity`` / ``max_eccentricity``: instances of at least :data:`SHAPE_MIN_AREA` pixels
    whose solidity (area / convex-hull area) is lower, or whose eccentricity (of the ellipse
    with the same second moments) is higher, are dropped with their cell: a shape prior against
    thin, curved false positives such as cell borders in brightfield images (see
    :func:`shape_prior`; 0 and 1 switch it off). ``min_instance_prob``: cells whose instance has a
    mean foreground probability below it are dropped with their instance (the network's own
    doubt: faint structures that pass a low ``threshold`` only in part; 0 switches it off).
    """
    if prob.ndim != 3 or prob.shape[0] < 2:
        raise PostprocessError(f"prob must be (C>=2, H, W) with foreground and centre maps, got {prob.shape}")
    if min_distance < 1:
        raise PostprocessError(f"min_distance must be >= 1 pixel, got {min_distance}")
    if not border_margin >= 0:
        raise PostprocessError(f"border_margin must be >= 0 pixels, got {border_margin}")
    if seeds not in SEED_KINDS:
        raise PostprocessError(f"seeds must be one of {', '.join(SEED_KINDS)}, got {seeds!r}")
    if not (0.0 <= min_solidity <= 1.0 and 0.0 < max_eccentricity <= 1.0):
        raise PostprocessError(f"min_solidity must be in [0, 1] and max_eccentricity in (0, 1], "
                               f"got {min_solidity} and {max_eccentricity}")
    if not 0.0 <= min_instance_prob <= 1.0:
        raise PostprocessError(f"min_instance_prob must be in [0, 1], got {min_instance_prob}")
    fg_prob = np.asarray(prob[0], dtype=np.float32)
    centre = np.asarray(prob[1], dtype=np.float32)
    fg = fg_prob > threshold
    if seeds == "peaks":
        peaks = peak_local_max(centre, min_distance=int(min_distance), threshold_abs=float(peak_threshold),
                               exclude_border=False)
        markers = np.zeros(centre.shape, dtype=np.int32)
        markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
        xy = _refine(centre, peaks)
        scores = centre[peaks[:, 0], peaks[:, 1]].astype(np.float64)
    else:
        markers, xy, scores = _cores(centre, float(peak_threshold))
    labels = watershed(-centre, markers, mask=fg | (markers > 0)).astype(np.int32)
    if min_area > 0:
        labels, xy, scores = _drop_small(labels, xy, scores, min_area)
        labels, xy, scores = _add_unseeded(fg & (labels == 0), labels, xy, scores, centre, fg_prob, min_area)
    if (min_solidity > 0 or max_eccentricity < 1) and len(xy):
        labels, xy, scores = _keep(labels, xy, scores, _shape_ok(labels, len(xy), min_solidity, max_eccentricity))
    if min_instance_prob > 0 and len(xy):
        sure = _instance_prob(labels, len(xy), fg_prob) >= min_instance_prob
        labels, xy, scores = _keep(labels, xy, scores, sure)
    if border_margin > 0 and len(xy):
        h, w = centre.shape
        edge = np.minimum.reduce([xy[:, 0], xy[:, 1], (w - 1) - xy[:, 0], (h - 1) - xy[:, 1]])
        labels, xy, scores = _keep(labels, xy, scores, edge >= border_margin)
    return Detections(xy=xy, scores=scores, labels=labels)


def _keep(labels, xy, scores, keep):
    """Only the cells where ``keep``; their instances renumbered 1..n, the others' pixels 0."""
    if keep.all():
        return labels, xy, scores
    lut = np.zeros(len(xy) + 1, dtype=np.int32)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels], xy[keep], scores[keep]


def _instance_prob(labels: np.ndarray, n: int, fg_prob: np.ndarray) -> np.ndarray:
    """``(n,)`` mean foreground probability over each cell's instance (every cell owns at least
    its seed pixel: the watershed's mask includes the seeds)."""
    return ndimage.mean(fg_prob, labels, np.arange(1, n + 1))  # (n,) float64, also for n = 0


def _shapes(labels: np.ndarray) -> list[tuple[int, float, float]]:
    """``(label, solidity, eccentricity)`` of every instance of ``labels`` with at least
    :data:`SHAPE_MIN_AREA` pixels."""
    return [(r.label, float(r.solidity), float(r.eccentricity))
            for r in regionprops(np.asarray(labels, dtype=np.int32)) if r.area >= SHAPE_MIN_AREA]


def _shape_ok(labels: np.ndarray, n: int, min_solidity: float, max_eccentricity: float) -> np.ndarray:
    """``(n,)`` bool: cell ``k`` (instance ``k + 1``) passes the shape prior (instances of
    fewer than :data:`SHAPE_MIN_AREA` pixels always pass)."""
    ok = np.ones(n, dtype=bool)
    for label, solidity, eccentricity in _shapes(labels):
        ok[label - 1] = solidity >= min_solidity and eccentricity <= max_eccentricity
    return ok


def shape_prior(masks: list[np.ndarray], quantile: float = 0.01) -> tuple[float, float]:
    """``(min_solidity, max_eccentricity)`` that all but a ``quantile`` fraction of the true
    instances in ``masks`` (``(H, W)`` int labels; those of fewer than :data:`SHAPE_MIN_AREA`
    pixels left out) pass on each side: the ``quantile`` of their solidity and the
    ``1 - quantile`` quantile of their eccentricity. ``(0.0, 1.0)`` (no filter) when the masks
    hold no such instance."""
    if not 0.0 <= quantile < 0.5:
        raise PostprocessError(f"quantile must be in [0, 0.5), got {quantile}")
    shapes = np.array([s[1:] for m in masks for s in _shapes(m)], dtype=np.float64).reshape(-1, 2)
    if not len(shapes):
        return 0.0, 1.0
    return float(np.quantile(shapes[:, 0], quantile)), float(np.quantile(shapes[:, 1], 1.0 - quantile))


def _drop_small(labels, xy, scores, min_area):
    """Remove seeded instances with fewer than ``min_area`` pixels; renumber the rest 1..n."""
    area = np.bincount(labels.ravel(), minlength=len(xy) + 1)[1:]
    return _keep(labels, xy, scores, area >= min_area)


def _refine(centre: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """``(N, 2)`` ``(x, y)``: centre-weighted mean position over each peak's 3x3 neighbourhood."""
    if len(peaks) == 0:
        return np.empty((0, 2))
    h, w = centre.shape
    offs = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    rows = np.clip(peaks[:, None, 0] + offs[None, :, 0], 0, h - 1)
    cols = np.clip(peaks[:, None, 1] + offs[None, :, 1], 0, w - 1)
    wts = centre[rows, cols].astype(np.float64) + 1e-9
    return np.stack([(wts * cols).sum(1) / wts.sum(1), (wts * rows).sum(1) / wts.sum(1)], axis=1)


def _cores(centre: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected regions of ``centre > level``: markers ``(H, W)`` int32 (1..n), their
    centre-weighted mean ``(x, y)`` ``(n, 2)`` and their highest value ``(n,)``."""
    markers, n = ndimage.label(centre > level)
    if n == 0:
        return markers.astype(np.int32), np.empty((0, 2)), np.empty(0)
    ids = np.arange(1, n + 1)
    com = np.asarray(ndimage.center_of_mass(centre, markers, ids), dtype=np.float64).reshape(-1, 2)
    top = np.asarray(ndimage.maximum(centre, markers, ids), dtype=np.float64)
    return markers.astype(np.int32), com[:, ::-1].copy(), top


def _add_unseeded(orphans, labels, xy, scores, centre, fg_prob, min_area):
    comp, n = ndimage.label(orphans)
    if n == 0:
        return labels, xy, scores
    ids = np.arange(1, n + 1)
    area = ndimage.sum_labels(orphans, comp, ids)
    keep = ids[area >= min_area]
    if len(keep) == 0:
        return labels, xy, scores
    com = np.asarray(ndimage.center_of_mass(orphans, comp, keep)).reshape(-1, 2)
    extra = np.asarray(ndimage.mean(fg_prob, comp, keep), dtype=np.float64) * 0.5
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(len(xy) + 1, len(xy) + 1 + len(keep), dtype=np.int32)
    labels = np.where(labels > 0, labels, lut[comp]).astype(np.int32)
    return labels, np.concatenate([xy, com[:, ::-1]]), np.concatenate([scores, extra])


def match_instances(true_labels: np.ndarray, pred_labels: np.ndarray, iou: float = 0.5) -> dict[str, float]:
    """One-to-one matching of instance masks (like stardist's ``matching``).

    ``true_labels``, ``pred_labels``: ``(H, W)`` int instance labels (0 = background). Pairs
    are matched by the Hungarian algorithm on IoU (``scipy.optimize.linear_sum_assignment``);
    a match counts when its IoU >= ``iou``. Returns ``tp, fp, fn, n_true, n_pred, precision,
    recall, f1`` and ``mean_iou`` (mean IoU of the matched pairs; 0 when none). Empty vs empty
    gives precision = recall = f1 = 1.
    """
    if true_labels.shape != pred_labels.shape:
        raise PostprocessError(f"label images differ in shape: {true_labels.shape} vs {pred_labels.shape}")
    if not 0 < iou <= 1:
        raise PostprocessError(f"iou threshold must be in (0, 1], got {iou}")
    overlap, t_ids, p_ids = iou_matrix(true_labels, pred_labels)
    tp, mean_iou = 0, 0.0
    if overlap.size:
        rows, cols = linear_sum_assignment(-overlap)
        hit = overlap[rows, cols] >= iou
        tp = int(hit.sum())
        mean_iou = float(overlap[rows, cols][hit].mean()) if tp else 0.0
    out = counts_to_scores(tp, len(p_ids) - tp, len(t_ids) - tp)
    out.update(n_true=len(t_ids), n_pred=len(p_ids), mean_iou=mean_iou)
    return out


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU ``(n_true, n_pred)`` between every pair of instances, and the instance ids of each image."""
    t = np.asarray(true_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    size = len(t_ids) * len(p_ids)
    inter = np.bincount(t_inv * len(p_ids) + p_inv, minlength=size).reshape(len(t_ids), len(p_ids))
    inter = inter.astype(np.float64)
    area_t, area_p = inter.sum(1), inter.sum(0)
    t_fg, p_fg = t_ids != 0, p_ids != 0
    inter = inter[t_fg][:, p_fg]
    union = area_t[t_fg][:, None] + area_p[p_fg][None, :] - inter
    overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return overlap, t_ids[t_fg], p_ids[p_fg]


def counts_to_scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    """``tp, fp, fn, precision, recall, f1`` from match counts (1.0 when there is nothing to find or find)."""
    precision = tp / (tp + fp) if tp + fp else 1.0 if fn == 0 else 0.0
    recall = tp / (tp + fn) if tp + fn else 1.0 if fp == 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}

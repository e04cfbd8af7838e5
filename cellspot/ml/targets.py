"""Training targets for the detector, rendered from cell points or instance masks.

Pure module (numpy, scipy, pandas; no torch). Coordinates follow :mod:`cellspot.render`:
``(x, y)`` = (column, row) with the centre of pixel ``(i, j)`` at ``(i, j)``.

Two output channels (:data:`CHANNELS`), the same for every kind so one network fits all data:

``foreground``
    where cells are. ``"disk"``: union of disks of ``radius`` around every point (hard 0/1).
    ``"gaussian"``: a soft blob per point (``exp(-d^2 / (2 (radius/2)^2))``, max over cells).
    ``"mask"``: the instance mask, with the pixels where two instances touch set to 0, so the
    foreground of touching nuclei falls apart into separate pieces.
``centre``
    ``centre="gaussian"``: a Gaussian peak (value 1) at every cell centre (points) or instance
    centroid (masks), with ``sigma = radius / 3`` (points) or a third of each instance's
    equivalent radius (masks); max over cells. ``centre="distance"``: the normalised distance
    to the cell's edge, 1 at the innermost pixel and falling to 0 at the edge (masks: the
    Euclidean distance transform of each instance divided by its maximum; points: the cone
    ``1 - d / radius``). The distance map has the same height and a width proportional to the
    cell whatever its size, so one threshold cuts a core out of every cell of an image with
    nuclei of many sizes. Peaks or cores of this map seed the watershed in
    :mod:`cellspot.ml.postprocess`, so touching cells are separated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

CHANNELS: tuple[str, str] = ("foreground", "centre")
TARGET_KINDS: tuple[str, ...] = ("disk", "gaussian", "mask")
CENTRE_KINDS: tuple[str, ...] = ("gaussian", "distance")
#: sigma of the centre Gaussian as a fraction of the cell radius
CENTRE_SIGMA = 1.0 / 3.0
MIN_RADIUS, MAX_RADIUS = 1.5, 128.0


class TargetError(ValueError):
    """A target cannot be rendered (unknown kind, bad shape, missing mask, bad radius)."""


def render_targets(
    shape: tuple[int, int],
    cells: pd.DataFrame | np.ndarray,
    radius: float,
    kind: str = "disk",
    mask: np.ndarray | None = None,
    centre: str = "gaussian",
) -> np.ndarray:
    """Render the detector targets of one image.

    ``shape``: ``(H, W)``. ``cells``: a table with columns ``x``, ``y`` or an ``(N, 2)`` array of
    ``(x, y)``; ignored for ``kind="mask"``. ``radius``: cell radius in pixels (> 0).
    ``kind``: one of :data:`TARGET_KINDS`. ``mask``: ``(H, W)`` int instance labels (0 =
    background), required for ``"mask"``. ``centre``: one of :data:`CENTRE_KINDS`, the
    centre channel (see the module docstring).

    Returns ``(2, H, W)`` float32 in [0, 1]: channels :data:`CHANNELS`.
    """
    h, w = _check_shape(shape)
    if kind not in TARGET_KINDS:
        raise TargetError(f"unknown target kind {kind!r}; valid kinds: {', '.join(TARGET_KINDS)}")
    if centre not in CENTRE_KINDS:
        raise TargetError(f"unknown centre kind {centre!r}; valid kinds: {', '.join(CENTRE_KINDS)}")
    if kind == "mask":
        if mask is None:
            raise TargetError("target kind 'mask' needs an instance mask, got None")
        if mask.shape != (h, w):
            raise TargetError(f"mask shape {mask.shape} does not match image shape {(h, w)}")
        return _mask_targets(np.asarray(mask), centre)
    if not np.isfinite(radius) or radius <= 0:
        raise TargetError(f"radius must be a positive number of pixels, got {radius!r}")
    xy = points_of(cells)
    out = np.zeros((2, h, w), dtype=np.float32)
    fg_fn = _disk if kind == "disk" else _gaussian_blob
    for x, y in xy:
        _paint_max(out[0], x, y, radius, fg_fn)
        if centre == "gaussian":
            _paint_max(out[1], x, y, radius * CENTRE_SIGMA, _gaussian)
        else:
            _paint_max(out[1], x, y, radius, _cone)
    return out


def points_of(cells: pd.DataFrame | np.ndarray) -> np.ndarray:
    """``(N, 2)`` float64 ``(x, y)`` of a cell table (columns ``x``, ``y``) or array; NaN rows dropped."""
    if isinstance(cells, pd.DataFrame):
        missing = {"x", "y"} - set(cells.columns)
        if missing:
            raise TargetError(f"cell table lacks column(s) {sorted(missing)}; it needs x and y")
        xy = cells[["x", "y"]].to_numpy(dtype=np.float64)
    else:
        xy = np.asarray(cells, dtype=np.float64).reshape(-1, 2)
    return xy[np.all(np.isfinite(xy), axis=1)]


def mask_centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids ``(N, 2)`` ``(x, y)`` and equivalent diameters ``(N,)`` of the instances of ``mask``."""
    ids = np.unique(mask)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return np.empty((0, 2)), np.empty(0)
    com = np.asarray(ndimage.center_of_mass(np.ones_like(mask, dtype=np.float64), mask, ids)).reshape(-1, 2)
    area = ndimage.sum_labels(np.ones_like(mask), mask, ids)
    return com[:, ::-1].copy(), 2.0 * np.sqrt(np.asarray(area, dtype=np.float64) / np.pi)


def estimate_radius(cell_tables: Iterable[pd.DataFrame], masks: Iterable[np.ndarray | None] = ()) -> float:
    """Typical cell radius in pixels from the data.

    Order of preference: median equivalent diameter of mask instances; median of the cells'
    ``diameter`` column; else 0.5 x the median nearest-neighbour spacing of cells within an
    image (cells in the training sets touch or nearly touch, so spacing ~ one diameter; the
    factor keeps the disk inside sparse cells). Clipped to [1.5, 128]. Raises
    :class:`TargetError` when there is nothing to estimate from.
    """
    diam = [mask_centroids(m)[1] for m in masks if m is not None]
    diam = [d for d in diam if len(d)]
    if diam:
        return _clip_radius(0.5 * float(np.median(np.concatenate(diam))))
    tables = list(cell_tables)
    col = [t["diameter"].to_numpy(float) for t in tables if "diameter" in t.columns and len(t)]
    col = np.concatenate(col) if col else np.empty(0)
    col = col[np.isfinite(col) & (col > 0)]
    if len(col):
        return _clip_radius(0.5 * float(np.median(col)))
    spacing = []
    for t in tables:
        xy = points_of(t)
        if len(xy) >= 2:
            d, _ = cKDTree(xy).query(xy, k=2)
            spacing.append(d[:, 1])
    if spacing:
        return _clip_radius(0.5 * 0.5 * float(np.median(np.concatenate(spacing))))
    raise TargetError("cannot estimate a cell radius: no masks, no diameters and no image with 2+ cells; set radius")


def _clip_radius(r: float) -> float:
    return float(np.clip(r, MIN_RADIUS, MAX_RADIUS))


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 1:
        raise TargetError(f"shape must be (H, W) with H, W >= 1, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _disk(d2: np.ndarray, r: float) -> np.ndarray:
    return (d2 <= r * r).astype(np.float32)


def _gaussian_blob(d2: np.ndarray, r: float) -> np.ndarray:
    return _gaussian(d2, 0.5 * r)


def _cone(d2: np.ndarray, r: float) -> np.ndarray:
    return np.clip(1.0 - np.sqrt(d2) / max(float(r), 0.5), 0.0, 1.0).astype(np.float32)


def _gaussian(d2: np.ndarray, sigma: float) -> np.ndarray:
    sigma = max(float(sigma), 0.5)
    return np.exp(-d2 / (2.0 * sigma * sigma)).astype(np.float32)


def _paint_max(plane: np.ndarray, x: float, y: float, scale: float, fn) -> None:
    """``plane = max(plane, fn(squared distance to (x, y), scale))`` in a local window."""
    h, w = plane.shape
    reach = int(np.ceil(3.0 * max(scale, 0.5))) + 1  # 3 sigma of a Gaussian; 3x the reach of a cone
    x0, x1 = max(0, int(np.floor(x)) - reach), min(w, int(np.ceil(x)) + reach + 1)
    y0, y1 = max(0, int(np.floor(y)) - reach), min(h, int(np.ceil(y)) + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    np.maximum(plane[y0:y1, x0:x1], fn(d2, scale), out=plane[y0:y1, x0:x1])


def _mask_targets(mask: np.ndarray, centre: str = "gaussian") -> np.ndarray:
    h, w = mask.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    inside = mask > 0
    # a pixel whose 3x3 neighbourhood holds another instance is a touching boundary; background
    # pixels take a value above every label for the minimum (a small sentinel: scipy's filters
    # do not keep int64's maximum)
    labels = mask.astype(np.int64)
    above = int(labels.max()) + 1
    hi = ndimage.maximum_filter(labels, size=3, mode="nearest")
    lo = ndimage.minimum_filter(np.where(inside, labels, above), size=3, mode="nearest")
    touching = inside & ((hi != labels) | ((lo != labels) & (lo != above)))
    out[0] = (inside & ~touching).astype(np.float32)
    if centre == "distance":
        out[1] = _normalised_distance(mask, inside & ~touching)
        return out
    centres, diameters = mask_centroids(mask)
    for (x, y), d in zip(centres, diameters):
        _paint_max(out[1], x, y, 0.5 * d * CENTRE_SIGMA, _gaussian)
    return out


def _normalised_distance(mask: np.ndarray, core: np.ndarray) -> np.ndarray:
    """``(H, W)`` float32: each instance's distance to its edge (touching boundaries count as
    edges, ``core`` is the foreground without them) divided by the instance's largest
    distance, so every instance peaks at 1 whatever its size; 0 outside."""
    dist = ndimage.distance_transform_edt(core)
    labels = np.where(core, mask, 0)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) == 0:
        return np.zeros(mask.shape, np.float32)
    peak = np.zeros(int(ids.max()) + 1, dtype=np.float64)
    peak[ids] = ndimage.maximum(dist, labels, ids)
    scale = peak[labels]
    out = np.divide(dist, scale, out=np.zeros_like(dist), where=scale > 0)
    return out.astype(np.float32)

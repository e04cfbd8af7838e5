"""Overlay pictures of predictions: the image with a mark per found cell.

Pure (numpy, scikit-image, Pillow; no torch). Marks reuse the app's conventions
(:mod:`cellspot.render`): alive = circle, dead = square with an X, in the colour-blind safe
palette :data:`cellspot.render.MARK_COLOURS` (bluish green / vermillion), drawn with a dark
edge so they show on any background. Unlike the app, a mark is as large as the cell
(its ``diameter``), and instance outlines from the detector can be painted under the marks,
in the colour of the cell they belong to.

Instance outlines are kept as an :class:`Outline`: the flat indices of the boundary pixels and
a class code per pixel, a few percent of the labels image, so a prediction run over many large
images can keep them in memory until the overlays are written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from PIL import ImageDraw

from cellspot.render import MARK_COLOURS, _marker

log = logging.getLogger(__name__)

ALIVE, DEAD, NO_CELL = 0, 1, 2
"""Class codes of :attr:`Outline.code`: the boundary belongs to an alive cell, a dead cell,
or an instance no detected centre falls in."""
OUTLINE_COLOURS = {ALIVE: MARK_COLOURS["alive"], DEAD: MARK_COLOURS["dead"], NO_CELL: (200, 200, 200)}
MIN_MARK_RADIUS = 3.0
MARK_GAP = 2.0
"""Pixels between a cell's edge and its mark, so the mark frames the cell (and its outline)."""


@dataclass(frozen=True)
class Outline:
    """Instance boundaries of one ``shape`` = ``(H, W)`` image.

    ``index``: ``(K,)`` int64 flat indices (row-major) of the boundary pixels; ``code``: ``(K,)``
    uint8 class code of each (:data:`ALIVE`, :data:`DEAD`, :data:`NO_CELL`).
    """

    shape: tuple[int, int]
    index: np.ndarray
    code: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray, xy: np.ndarray, alive: np.ndarray) -> Outline:
        """Boundaries of the instances in ``labels`` ``(H, W)`` int (0 = background).

        ``xy``: ``(N, 2)`` cell centres (x, y) in pixels; ``alive``: ``(N,)`` bool. An instance
        takes the class of the centre that falls inside it; one without a centre gets
        :data:`NO_CELL`.
        """
        from skimage.segmentation import find_boundaries

        labels = np.asarray(labels)
        index = np.flatnonzero(find_boundaries(labels, mode="inner"))
        lut = np.full(int(labels.max(initial=0)) + 1, NO_CELL, np.uint8)
        ids = instance_ids(labels, xy)
        inside = ids > 0
        lut[ids[inside]] = np.where(np.asarray(alive, bool)[inside], ALIVE, DEAD)
        return cls((int(labels.shape[0]), int(labels.shape[1])), index, lut[labels.ravel()[index]])

    def paint(self, rgb: np.ndarray) -> np.ndarray:
        """A copy of ``rgb`` ``(H, W, 3)`` uint8 with the boundary pixels in their class colour."""
        if tuple(rgb.shape[:2]) != self.shape:
            raise ValueError(f"outline of a {self.shape} image cannot be painted on one of {rgb.shape[:2]}")
        out = rgb.copy()
        palette = np.array([OUTLINE_COLOURS[k] for k in (ALIVE, DEAD, NO_CELL)], np.uint8)
        out.reshape(-1, 3)[self.index] = palette[self.code]
        return out


def instance_ids(labels: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``(N,)`` instance id of ``labels`` ``(H, W)`` under each ``xy`` ``(N, 2)`` centre (rounded,
    clipped into the image); 0 where a centre lies on background."""
    xy = np.asarray(xy, float).reshape(-1, 2)
    h, w = labels.shape[:2]
    cols = np.clip(np.rint(xy[:, 0]).astype(np.int64), 0, w - 1)
    rows = np.clip(np.rint(xy[:, 1]).astype(np.int64), 0, h - 1)
    return np.asarray(labels)[rows, cols].astype(np.int64)


def draw_overlay(
    rgb: np.ndarray,
    cells: pd.DataFrame,
    outline: Outline | None = None,
    *,
    min_radius: float = MIN_MARK_RADIUS,
) -> PILImage.Image:
    """``rgb`` ``(H, W, 3)`` uint8 with a mark per cell, at the image's own size.

    ``cells``: columns ``x``, ``y`` (pixels), ``label`` ("alive" / "dead") and ``diameter``
    (pixels); the mark frames the cell :data:`MARK_GAP` px outside its edge (radius at least
    ``min_radius``). ``outline``: instance boundaries
    painted first. Returns an RGB PIL image.
    """
    base = outline.paint(rgb) if outline is not None else np.asarray(rgb)
    img = PILImage.fromarray(np.ascontiguousarray(base, dtype=np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for x, y, label, diameter in _mark_rows(cells):
        if label not in ("alive", "dead"):
            raise ValueError(f"cell at ({x:.1f}, {y:.1f}): unknown label {label!r}; allowed: alive, dead")
        half = 0.5 * float(diameter) + MARK_GAP if np.isfinite(diameter) else 0.0
        radius = max(float(min_radius), half)
        _marker(draw, float(x), float(y), radius, label, MARK_COLOURS[label], 1 if radius < 8 else 2, letter=False)
    return img


def _mark_rows(cells: pd.DataFrame) -> Sequence[tuple[float, float, str, float]]:
    if len(cells) == 0:
        return []
    return list(cells[["x", "y", "label", "diameter"]].itertuples(index=False, name=None))

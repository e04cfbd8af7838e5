"""Drawing for the app: display scaling, click mapping, markers, consensus overlays, crops.

Pure (numpy + Pillow), no Streamlit. Conventions:

* A mark ``(x, y, label)`` is in original image pixels: pixel indices, x right, y down,
  origin at the top-left pixel (as stored in :class:`cellspot.store.models.Click`).
* An image of ``width x height`` is shown at ``display_size(width, height, scale)`` pixels;
  per axis the effective factor is ``display_width / width`` (exact, not the rounded scale).
* :func:`to_image_pixels` maps the centre of a display pixel back to image pixels and
  :func:`to_display_pixels` is its exact inverse (pixel-centre aligned:
  ``x = (dx + 0.5) / s - 0.5``), so with ``scale == 1`` display pixel 10 is image pixel 10.

Markers are distinguishable without colour: alive = circle with "A", dead = square with
an X and "D", not sure = triangle with "?".
"""

from __future__ import annotations

from functools import lru_cache

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from cellspot.imaging import read_image, to_display_rgb8

log = logging.getLogger(__name__)

MAX_SCALE = 8.0
MIN_SCALE = 0.02
MARK_LETTERS = {"alive": "A", "dead": "D", "not_sure": "?"}
MARK_COLOURS = {  # Okabe-Ito palette (colour-blind safe); shape and letter carry the label anyway
    "alive": (0, 158, 115),
    "dead": (213, 94, 0),
    "not_sure": (240, 228, 66),
}
OUTLINE = (0, 0, 0)


class ImageUnavailableError(LookupError):
    """An image has no stored pixels (imported from clicks only) or its file is missing."""


# --------------------------------------------------------------------------- geometry


def display_scale(
    width: int, height: int, max_width: int, max_height: int | None = None, zoom: float = 1.0,
    allow_upscale: bool = True,
) -> float:
    """The factor that fits a ``width x height`` image into ``max_width`` (and ``max_height``),
    times ``zoom``, within [:data:`MIN_SCALE`, :data:`MAX_SCALE`].

    ``allow_upscale=False`` never enlarges beyond 1 before zooming. Raises :class:`ValueError`
    for non-positive sizes or zoom.
    """
    if width <= 0 or height <= 0 or max_width <= 0 or (max_height is not None and max_height <= 0):
        raise ValueError(f"sizes must be positive: image {width}x{height}, box {max_width}x{max_height}")
    if not zoom > 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    fit = max_width / width
    if max_height is not None:
        fit = min(fit, max_height / height)
    if not allow_upscale:
        fit = min(fit, 1.0)
    return float(min(MAX_SCALE, max(MIN_SCALE, fit * zoom)))


def display_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(display_width, display_height)`` of an image shown at ``scale`` (at least 1 px)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def _factors(width: int, height: int, scale: float) -> tuple[float, float]:
    dw, dh = display_size(width, height, scale)
    return dw / width, dh / height


def to_image_pixels(
    display_x: float, display_y: float, scale: float, width: int, height: int
) -> tuple[float, float]:
    """Image pixel ``(x, y)`` under display pixel ``(display_x, display_y)``.

    The exact inverse of :func:`to_display_pixels`, clamped to ``0 <= x <= width - 1``,
    ``0 <= y <= height - 1`` (so the result always passes the store's click validation).
    Rounded to 2 decimals.
    """
    fx, fy = _factors(width, height, scale)
    x = (float(display_x) + 0.5) / fx - 0.5
    y = (float(display_y) + 0.5) / fy - 0.5
    return (round(min(max(x, 0.0), width - 1.0), 2), round(min(max(y, 0.0), height - 1.0), 2))


def to_display_pixels(x: float, y: float, scale: float, width: int, height: int) -> tuple[float, float]:
    """Display position of image pixel ``(x, y)`` (inverse of :func:`to_image_pixels`)."""
    fx, fy = _factors(width, height, scale)
    return (float(x) + 0.5) * fx - 0.5, (float(y) + 0.5) * fy - 0.5


def find_mark(
    marks: Sequence[tuple[float, float, str]], x: float, y: float, tolerance: float
) -> int | None:
    """Index of the mark nearest to image pixel ``(x, y)`` within ``tolerance`` px, else ``None``
    (the label page removes or relabels the mark a click lands on)."""
    best, best_d = None, float(tolerance)
    for i, (mx, my, _label) in enumerate(marks):
        d = math.hypot(float(mx) - x, float(my) - y)
        if d <= best_d:
            best, best_d = i, d
    return best


# --------------------------------------------------------------------------- images


def read_display_rgb(path: str | Path, bit_depth: int = 8) -> np.ndarray:
    """The image file at ``path`` as ``(H, W, 3)`` uint8 RGB for display.

    Cache-friendly (plain arguments): the app wraps it in ``st.cache_data``. Raises
    :class:`cellspot.imaging.ImageReadError` for unreadable files.
    """
    loaded = read_image(Path(path))
    return to_display_rgb8(loaded.array, max(bit_depth, loaded.bit_depth))


def image_file(settings: Any, image: Any) -> Path:
    """Absolute path of ``image``'s pixels under ``settings.home``; :class:`ImageUnavailableError`."""
    if not getattr(image, "has_pixels", False) or not getattr(image, "path", None):
        raise ImageUnavailableError(f"image {image.name!r} has no stored pixels (imported from clicks only)")
    path = Path(image.path)
    path = path if path.is_absolute() else Path(settings.home) / path
    if not path.is_file():
        raise ImageUnavailableError(f"the file of image {image.name!r} is missing: {path}")
    return path


def load_display_image(settings: Any, image: Any) -> np.ndarray:
    """Pixels of the store's ``image`` (:class:`cellspot.store.models.Image`) as ``(H, W, 3)`` uint8."""
    return read_display_rgb(image_file(settings, image), int(getattr(image, "bit_depth", 8) or 8))


def _as_rgb(rgb: np.ndarray) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        arr = to_display_rgb8(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def scaled_image(rgb: np.ndarray, scale: float) -> PILImage.Image:
    """``rgb`` (H, W, 3) uint8 resized to :func:`display_size`: Lanczos when shrinking, nearest
    neighbour when enlarging (pixels stay sharp)."""
    arr = _as_rgb(rgb)
    h, w = arr.shape[:2]
    size = display_size(w, h, scale)
    img = PILImage.fromarray(arr, "RGB")
    if size == (w, h):
        return img
    resample = PILImage.Resampling.NEAREST if scale > 1 else PILImage.Resampling.LANCZOS
    return img.resize(size, resample)


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.ImageFont:
    """The marker letter font, loaded once per size (it is drawn for every mark on every rerun)."""
    try:
        return ImageFont.load_default(size=max(8, size))
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _marker(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, label: str,
            colour: tuple[int, int, int], width: int, letter: bool = True, cross: bool = True) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if label == "alive":
        draw.ellipse(box, outline=OUTLINE, width=width + 2)
        draw.ellipse(box, outline=colour, width=width)
    elif label == "dead":
        draw.rectangle(box, outline=OUTLINE, width=width + 2)
        draw.rectangle(box, outline=colour, width=width)
        k = 0.45 * r
        crosses = (((cx - k, cy - k), (cx + k, cy + k)), ((cx - k, cy + k), (cx + k, cy - k)))
        for a, b in crosses if cross else ():
            draw.line([a, b], fill=OUTLINE, width=width + 2)
            draw.line([a, b], fill=colour, width=width)
    else:
        tri = [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r), (cx, cy - r)]
        draw.line(tri, fill=OUTLINE, width=width + 2, joint="curve")
        draw.line(tri, fill=colour, width=width, joint="curve")
    if letter:
        text = MARK_LETTERS.get(label, "?")
        draw.text((cx + r + 1, cy - r - 1), text, fill=colour, font=_font(int(max(12, min(28, 1.4 * r)))),
                  stroke_width=2, stroke_fill=OUTLINE, anchor="lb")


def draw_markers(
    rgb: np.ndarray,
    marks: Sequence[tuple[float, float, str]],
    scale: float = 1.0,
    radius: float = 10.0,
    highlight: int | None = None,
) -> PILImage.Image:
    """``rgb`` (H, W, 3) uint8 shown at ``scale`` with a marker per ``(x, y, label)`` mark.

    Marks are in image pixels; markers are ``radius`` display pixels wide (constant on
    screen whatever the zoom), shape + letter per label (see the module docstring).
    ``highlight``: index of a mark drawn thicker (e.g. the last one placed).
    Returns an RGB PIL image of :func:`display_size`.
    """
    img = scaled_image(rgb, scale)
    h, w = np.asarray(rgb).shape[:2]
    draw = ImageDraw.Draw(img)
    for i, (x, y, label) in enumerate(marks):
        if label not in MARK_LETTERS:
            raise ValueError(f"mark {i}: unknown label {label!r}; allowed: {', '.join(MARK_LETTERS)}")
        cx, cy = to_display_pixels(x, y, scale, w, h)
        _marker(draw, cx, cy, radius, label, MARK_COLOURS[label], 3 if i == highlight else 2)
    return img


def p_alive_colour(p_alive: float) -> tuple[int, int, int]:
    """Colour for a probability of being alive: vermillion (dead, 0) -> bluish green (alive, 1)."""
    p = float(np.clip(p_alive, 0.0, 1.0))
    lo, hi = np.array(MARK_COLOURS["dead"], float), np.array(MARK_COLOURS["alive"], float)
    mid = np.array((230, 230, 230), float)
    c = lo + (mid - lo) * (p / 0.5) if p < 0.5 else mid + (hi - mid) * ((p - 0.5) / 0.5)
    return tuple(int(round(v)) for v in c)  # type: ignore[return-value]


def draw_consensus(
    rgb: np.ndarray,
    cells: Any,
    scale: float = 1.0,
    clicks: Any = None,
    min_radius: float = 5.0,
    max_radius: float = 14.0,
    selected: int | None = None,
    click_radius: float = 2.5,
) -> PILImage.Image:
    """``rgb`` (H, W, 3) at ``scale`` with consensus ``cells`` and optionally raw ``clicks``.

    ``cells``: table with columns x, y, label, p_alive, confidence (a DataFrame or a list of
    dicts); each cell is drawn with its label's shape, coloured by ``p_alive``
    (:func:`p_alive_colour`) and sized by confidence (``min_radius`` .. ``max_radius``
    display px). ``clicks``: table with x, y, label drawn on top of the cells as dots of
    ``click_radius`` display px in the label's colour, with the label's letter beside them.
    ``selected``: row position of a cell drawn with a ring (the per-cell details row).
    """
    img = scaled_image(rgb, scale)
    h, w = np.asarray(rgb).shape[:2]
    draw = ImageDraw.Draw(img)
    for i, (x, y, label, p, conf) in enumerate(_rows(cells, ("x", "y", "label", "p_alive", "confidence"))):
        cx, cy = to_display_pixels(x, y, scale, w, h)
        r = min_radius + (max_radius - min_radius) * float(np.clip(conf, 0.0, 1.0))
        _marker(draw, cx, cy, r, label, p_alive_colour(p), 2, letter=False)
        if i == selected:
            draw.ellipse([cx - r - 5, cy - r - 5, cx + r + 5, cy + r + 5], outline=(255, 255, 255), width=2)
    # the clicks last: under the cell markers most of them were hidden
    font = _font(int(max(10, min(24, 3.0 * click_radius))))
    for x, y, label in _rows(clicks, ("x", "y", "label")):
        cx, cy = to_display_pixels(x, y, scale, w, h)
        colour = MARK_COLOURS.get(label, (255, 255, 255))
        r = click_radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=OUTLINE)
        draw.text((cx + r, cy - r), MARK_LETTERS.get(label, "?"), fill=colour, font=font,
                  stroke_width=1, stroke_fill=OUTLINE, anchor="lb")
    return img


def _rows(table: Any, columns: tuple[str, ...]) -> list[tuple]:
    if table is None:
        return []
    if hasattr(table, "itertuples"):
        if len(table) == 0:
            return []
        return list(table[list(columns)].itertuples(index=False, name=None))
    return [tuple(row[c] for c in columns) for row in table]


def example_crop(rgb: np.ndarray, x: float, y: float, label: str, size: int = 96, zoom: float = 2.0) -> PILImage.Image:
    """A ``size`` px square crop of ``rgb`` (H, W, 3) centred on ``(x, y)`` (reflect-padded at
    borders), enlarged by ``zoom``, with the label's shape drawn around the centre and its
    letter (tutorial cards). Returns an RGB PIL image of ``round(size * zoom)`` px."""
    from cellspot.crops import crop_around

    if label not in MARK_LETTERS:
        raise ValueError(f"unknown label {label!r}; allowed: {', '.join(MARK_LETTERS)}")
    crop = crop_around(_as_rgb(rgb), x, y, size)
    img = scaled_image(crop, zoom)
    cx, cy = to_display_pixels(size // 2 + (x - math.floor(x)), size // 2 + (y - math.floor(y)), zoom, size, size)
    # a ring around the cell (no cross over it), with the label's shape and letter
    _marker(ImageDraw.Draw(img), cx, cy, max(10.0, 0.3 * size * zoom), label, MARK_COLOURS[label], 2, cross=False)
    return img

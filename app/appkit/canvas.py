"""The clickable image of the label page (``streamlit-image-coordinates``).

The image (or the zoom window of it) is drawn with the marks by
:func:`cellspot.render.draw_markers` at a render scale that makes it large and sharp
(nearest-neighbour enlargement), and shown at the column's width; a picture taller than
:data:`MAX_HEIGHT_RATIO` of its width gets grey margins left and right, so that a square or
portrait image fits a laptop's screen height with the tools below it. A click arrives as
display pixels together with the displayed size; :func:`take_click` maps it back to original
image pixels with :func:`cellspot.render.to_image_pixels` and the window that was on screen
(a click on a margin is ignored). Each click is used once (the component repeats its last
value on every rerun).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import streamlit as st
from PIL import Image as PILImage
from streamlit_image_coordinates import streamlit_image_coordinates

from appkit.marks import Mark, View
from cellspot.render import draw_markers, to_image_pixels

DEFAULT_SHOWN_WIDTH = 850  # CSS px of the picture before the first click tells the real width
MAX_RENDER_WIDTH = 2000    # px: larger windows are shrunk (Lanczos) to this before sending
#: px: small windows are enlarged to at least this, a phone's 360 CSS px at 3 device px each
#: (rendered at the 360 CSS px alone, a 384 px image was stretched 3x by the phone: blurry)
MIN_RENDER_WIDTH = 1024
SCREEN_DENSITY = 3         # device px per CSS px assumed when shrinking: phones; laptops get MAX_RENDER_WIDTH
MAX_HEIGHT_RATIO = 0.75    # a picture at most 3/4 as tall as wide (4:3); taller ones get side margins
MARGIN_GREY = (128, 128, 128)
MAX_UPSCALE = 16           # whole-number enlargement limit (zoomed windows of small images)
MARK_RADIUS_ON_SCREEN = 13.0  # CSS px: marker size whatever the image size, zoom or screen
JPEG_QUALITY = 92          # with full colour resolution (4:4:4): looks like PNG, 8x faster to encode


def shown_width(slot: str = "label") -> float:
    """The width on screen (CSS px) of the pictures of ``slot`` (one per page), as the last click
    on one of them reported it."""
    return float(st.session_state.get(f"canvas.{slot}.width") or DEFAULT_SHOWN_WIDTH)


def render_scale(view: View, slot: str = "label") -> float:
    """Render px per image px for ``view``.

    Small windows are enlarged by a whole factor (nearest neighbour: square, sharp pixels) to
    at least the width on screen and :data:`MIN_RENDER_WIDTH`, so the browser only ever shrinks
    the picture (also sharp on high-density screens); large ones are shrunk to what the screen
    can show, :data:`SCREEN_DENSITY` device px per CSS px, within ``MIN_RENDER_WIDTH`` ..
    :data:`MAX_RENDER_WIDTH` (a phone got 2,000 px for its 360 CSS px).
    """
    shown = shown_width(slot)
    target = max(shown, MIN_RENDER_WIDTH)
    if view.width < target:
        return float(min(MAX_UPSCALE, math.ceil(target / view.width)))
    return min(1.0, min(MAX_RENDER_WIDTH, max(MIN_RENDER_WIDTH, SCREEN_DENSITY * shown)) / view.width)


def screen_factor(view: View, slot: str = "label") -> float:
    """Render px per CSS px on screen: multiply a size meant for the screen by it."""
    return view.width * render_scale(view, slot) / shown_width(slot)


def marker_radius(view: View, slot: str = "label") -> float:
    """Marker radius in render px that shows as :data:`MARK_RADIUS_ON_SCREEN` CSS px."""
    return MARK_RADIUS_ON_SCREEN * screen_factor(view, slot)


def click_tolerance(view: View, slot: str = "label") -> float:
    """Image px within which a click lands on an existing mark (the marker's size on screen)."""
    return max(1.0, (MARK_RADIUS_ON_SCREEN + 2.0) * view.width / shown_width(slot))


def take_click(key: str, slot: str = "label") -> tuple[float, float] | None:
    """The new click on the image ``key`` in original image pixels, or ``None``.

    Uses the window stored when the image was drawn; a click already taken returns ``None``.
    """
    value: Any = st.session_state.get(key)
    shown: View | None = st.session_state.get(f"{key}.view")
    if not isinstance(value, dict) or shown is None or "x" not in value:
        return None
    stamp = value.get("unix_time")
    if stamp is not None and stamp == st.session_state.get(f"{key}.taken"):
        return None
    st.session_state[f"{key}.taken"] = stamp
    width = float(value.get("width") or 0)
    if width <= 0:
        return None
    # the picture sat in a frame with margins (render px: left margin, picture width, frame width)
    left, inner, outer = st.session_state.get(f"{key}.frame") or (0, 1, 1)
    per_render = width / outer  # CSS px per render px
    x_css, inner_css = float(value["x"]) - left * per_render, inner * per_render
    st.session_state[f"canvas.{slot}.width"] = inner_css  # the image's own width on screen
    if not -1.0 <= x_css <= inner_css + 1.0:  # on a margin beside the image
        return None
    x, y = to_image_pixels(x_css, float(value["y"]), inner_css / shown.width, shown.width, shown.height)
    return shown.x0 + x, shown.y0 + y


def click_stamp(key: str) -> float | None:
    """The browser time (ms) of the click :func:`take_click` last took on the image ``key``."""
    stamp = st.session_state.get(f"{key}.taken")
    return float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None


def marked_picture(rgb: np.ndarray, marks: Sequence[Mark], view: View, highlight: int | None = None):
    """``view`` of ``rgb`` (H, W, 3) uint8 at :func:`render_scale` with the label page's markers
    for ``marks`` (image px); ``highlight`` is the index of a mark drawn thicker."""
    crop = rgb[view.y0:view.y0 + view.height, view.x0:view.x0 + view.width]
    scale, radius = render_scale(view), marker_radius(view)
    margin = 2 * radius / scale
    shown, shown_highlight = [], None
    for i, (x, y, label) in enumerate(marks):
        if view.contains(x, y, margin):
            if i == highlight:
                shown_highlight = len(shown)
            shown.append((x - view.x0, y - view.y0, label))
    return draw_markers(crop, shown, scale, radius=radius, highlight=shown_highlight)


class _Jpeg444:
    """``picture`` for the component, saved as JPEG without chroma subsampling.

    Every click redraws and resends the picture: a 1152x864 PNG takes ~100 ms to encode and
    ~0.35 MB, this JPEG ~12 ms and ~0.25 MB with the markers' thin coloured lines intact
    (the default 4:2:0 JPEG blurs them). The component calls ``save(buffer, format, quality)``.
    """

    def __init__(self, picture: Any) -> None:
        self.picture = picture

    def save(self, fp: Any, format: str = "JPEG", quality: int = JPEG_QUALITY, **_: Any) -> None:  # noqa: A002
        self.picture.convert("RGB").save(fp, format="JPEG", quality=quality, subsampling=0)


def framed(picture: Any) -> tuple[Any, tuple[int, int, int]]:
    """``picture`` with grey margins left and right when it is taller than
    :data:`MAX_HEIGHT_RATIO` of its width (shown at the column's width, a square image on a
    laptop ran 20 % below the screen, a portrait one 80 %), and where it sits: ``(left margin,
    picture width, frame width)`` in render px."""
    width, height = picture.size
    outer = math.ceil(height / MAX_HEIGHT_RATIO)
    if outer <= width:
        return picture, (0, width, width)
    left = (outer - width) // 2
    frame = PILImage.new("RGB", (outer, height), MARGIN_GREY)
    frame.paste(picture.convert("RGB"), (left, 0))
    return frame, (left, width, outer)


def show(picture: Any, view: View, key: str) -> None:
    """Show ``picture`` (a PIL image of ``view``) at the column's width, framed by
    :func:`framed`, as the clickable image ``key``; :func:`take_click` reads the next click on it."""
    shown, frame = framed(picture)
    st.session_state[f"{key}.view"] = view
    st.session_state[f"{key}.frame"] = frame
    streamlit_image_coordinates(_Jpeg444(shown), key=key, width="stretch", image_format="JPEG",
                                jpeg_quality=JPEG_QUALITY, cursor="crosshair")

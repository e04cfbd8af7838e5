"""Rendering: display scale, exact click mapping, colour-free markers, overlays, image loading."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cellspot import render as r


@pytest.mark.parametrize(
    ("width", "height", "max_width", "max_height", "zoom", "upscale", "expected"),
    [
        (2000, 1000, 1000, None, 1.0, True, 0.5),
        (400, 300, 800, None, 1.0, True, 2.0),
        (400, 300, 800, None, 1.0, False, 1.0),
        (400, 300, 800, 300, 1.0, True, 1.0),
        (400, 300, 800, None, 2.0, True, 4.0),
        (100, 100, 10_000, None, 1.0, True, r.MAX_SCALE),
        (100_000, 10, 10, None, 1.0, True, r.MIN_SCALE),
    ],
)
def test_display_scale(width, height, max_width, max_height, zoom, upscale, expected) -> None:
    assert r.display_scale(width, height, max_width, max_height, zoom, upscale) == pytest.approx(expected)


@pytest.mark.parametrize("args", [(0, 10, 100), (10, 10, 0), (10, 10, 100, -1)])
def test_display_scale_refuses_bad_sizes(args) -> None:
    with pytest.raises(ValueError, match="positive"):
        r.display_scale(*args)
    with pytest.raises(ValueError, match="zoom"):
        r.display_scale(10, 10, 100, zoom=0)


@pytest.mark.parametrize(
    ("width", "height", "scale"),
    [(384, 288, 1.0), (384, 288, 2.34375), (2048, 1536, 0.37), (1000, 10, 0.333), (7, 5, 3.0)],
)
def test_click_mapping_is_the_exact_inverse(width, height, scale) -> None:
    dw, dh = r.display_size(width, height, scale)
    for dx, dy in itertools.product(np.linspace(0, dw - 1, 13), np.linspace(0, dh - 1, 7)):
        x, y = r.to_image_pixels(dx, dy, scale, width, height)
        assert 0 <= x <= width - 1 and 0 <= y <= height - 1
        back = r.to_display_pixels(x, y, scale, width, height)
        fx, fy = dw / width, dh / height
        if 0 < x < width - 1:
            assert back[0] == pytest.approx(dx, abs=0.01 * fx + 1e-9)
        if 0 < y < height - 1:
            assert back[1] == pytest.approx(dy, abs=0.01 * fy + 1e-9)
    # an image pixel shown downscaled and clicked lands within one display pixel of itself
    for x in (0, 1, width // 2, width - 1):
        dx, _ = r.to_display_pixels(x, 0, scale, width, height)
        got, _ = r.to_image_pixels(round(dx), 0, scale, width, height)
        assert abs(got - x) <= max(1.0, 0.5 / (dw / width)) + 0.01


@pytest.mark.parametrize(
    ("display", "scale", "expected"),
    [((10, 20), 1.0, (10.0, 20.0)), ((0, 0), 2.0, (0.0, 0.0)), ((21, 41), 2.0, (10.25, 20.25)),
     ((10, 20), 0.5, (20.5, 40.5)), ((-5, 500), 1.0, (0.0, 79.0)), ((1e6, 3), 1.0, (99.0, 3.0))],
)
def test_to_image_pixels_values_and_clamping(display, scale, expected) -> None:
    assert r.to_image_pixels(*display, scale, 100, 80) == expected


def test_find_mark() -> None:
    marks = [(10, 10, "alive"), (14, 10, "dead"), (50, 50, "not_sure")]
    assert r.find_mark(marks, 13, 10, 5) == 1
    assert r.find_mark(marks, 10.5, 10, 5) == 0
    assert r.find_mark(marks, 30, 30, 5) is None
    assert r.find_mark([], 1, 1, 5) is None


def _grey(h: int = 60, w: int = 80) -> np.ndarray:
    return np.full((h, w, 3), 128, np.uint8)


@pytest.mark.parametrize(("scale", "size"), [(1.0, (80, 60)), (2.5, (200, 150)), (0.5, (40, 30))])
def test_draw_markers_size_and_position(scale, size) -> None:
    img = r.draw_markers(_grey(), [(40, 30, "alive")], scale, radius=6)
    assert img.size == size and img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    changed = np.argwhere(np.abs(arr - 128).sum(-1) > 0)
    cy, cx = changed[:, 0].mean(), changed[:, 1].mean()
    ex, ey = r.to_display_pixels(40, 30, scale, 80, 60)
    assert abs(cx - ex) < 8 and abs(cy - ey) < 8  # the marker (plus its letter) sits on the mark


def test_markers_are_distinguishable_without_colour() -> None:
    """Rendered in grey levels only, the three labels give three different shapes."""
    masks = {}
    for label in r.MARK_LETTERS:
        grey = np.asarray(r.draw_markers(_grey(), [(40, 30, label)], 2.0, radius=12).convert("L")).astype(int)
        masks[label] = np.abs(grey - 128) > 20
    for a, b in itertools.combinations(masks, 2):
        differ = (masks[a] ^ masks[b]).sum() / max(1, (masks[a] | masks[b]).sum())
        assert differ > 0.3, (a, b, differ)


def test_draw_markers_refuses_unknown_label() -> None:
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        r.draw_markers(_grey(), [(1, 1, "maybe")])


def test_draw_consensus_and_clicks() -> None:
    cells = pd.DataFrame({"x": [20.0, 60.0], "y": [20.0, 40.0], "label": ["alive", "dead"],
                          "p_alive": [0.95, 0.1], "confidence": [1.0, 0.2]})
    clicks = pd.DataFrame({"x": [21.0], "y": [19.0], "label": ["alive"]})
    base = np.asarray(r.draw_consensus(_grey(), cells.iloc[:0], 1.0)).astype(int)
    assert (base == 128).all()
    img = np.asarray(r.draw_consensus(_grey(), cells, 1.0, clicks, selected=0)).astype(int)
    assert (np.abs(img - 128).sum(-1) > 0).sum() > 50
    assert r.draw_consensus(_grey(), cells.to_dict("records"), 2.0).size == (160, 120)


def test_raw_clicks_are_drawn_on_top_of_the_cells_at_the_size_asked() -> None:
    """A click on a consensus cell's marker stays visible (it was drawn under it), in its
    label's colour, and the dot has the size asked for (the review page scales it to the screen)."""
    cells = pd.DataFrame({"x": [40.0], "y": [30.0], "label": ["alive"], "p_alive": [0.95], "confidence": [1.0]})
    clicks = pd.DataFrame({"x": [40.0 + 14.0], "y": [30.0], "label": ["dead"]})  # on the marker's ring
    img = np.asarray(r.draw_consensus(_grey(), cells, 1.0, clicks, max_radius=14.0, click_radius=4.0))
    assert tuple(img[30, 54]) == r.MARK_COLOURS["dead"]
    dead = (img == np.array(r.MARK_COLOURS["dead"])).all(-1)
    assert dead[26:35, 50:59].sum() >= 20  # a dot of radius 4, not the old 2.5 px one


@pytest.mark.parametrize(("p", "colour"), [(1.0, r.MARK_COLOURS["alive"]), (0.0, r.MARK_COLOURS["dead"]),
                                           (0.5, (230, 230, 230)), (7.0, r.MARK_COLOURS["alive"])])
def test_p_alive_colour(p, colour) -> None:
    assert r.p_alive_colour(p) == colour


def test_scaled_image_keeps_pixels_sharp_when_enlarging() -> None:
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = 255
    big = np.asarray(r.scaled_image(rgb, 4.0))
    assert big.shape == (8, 8, 3) and set(np.unique(big)) == {0, 255}


@pytest.mark.parametrize(
    ("array", "bit_depth"),
    [(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64), 8),
     (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 16, 16),
     (np.zeros((48, 64, 3), np.uint8), 8)],
)
def test_load_display_image(tmp_path, array, bit_depth) -> None:
    (tmp_path / "images").mkdir()
    PILImage.fromarray(array).save(tmp_path / "images" / "x.png")
    settings = SimpleNamespace(home=tmp_path)
    image = SimpleNamespace(name="x.png", path="images/x.png", has_pixels=True, bit_depth=bit_depth)
    rgb = r.load_display_image(settings, image)
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    if bit_depth == 16:
        assert rgb.min() == 0 and rgb.max() == 255  # stretched for display


@pytest.mark.parametrize(
    ("image", "message"),
    [(SimpleNamespace(name="a", path=None, has_pixels=False, bit_depth=8), "no stored pixels"),
     (SimpleNamespace(name="b", path="images/missing.png", has_pixels=True, bit_depth=8), "missing")],
)
def test_load_display_image_unavailable(tmp_path, image, message) -> None:
    with pytest.raises(r.ImageUnavailableError, match=message):
        r.load_display_image(SimpleNamespace(home=tmp_path), image)


def test_example_crop() -> None:
    rgb = _grey(200, 300)
    rgb[95:105, 145:155] = 0
    crop = r.example_crop(rgb, 150, 100, "dead", size=64, zoom=2)
    assert crop.size == (128, 128)
    arr = np.asarray(crop)
    assert (arr[60:68, 60:68] == 0).all()  # the dark cell stays visible at the centre

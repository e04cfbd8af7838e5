"""Tiled prediction: the blend of overlapping tiles reproduces the untiled output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellspot.ml.tiling import (
    TilingError, blend_window, dark_objects, normalize_image, predict_tiled, tile_length, tile_starts,
)


def _pixel_model(seed: int = 0) -> torch.nn.Module:
    """A 1x1 convolution: translation-equivariant with no reach, so tiles cannot change it."""
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, 2, kernel_size=1)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _untiled(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(normalize_image(pixels))[None]))[0].numpy()


@pytest.mark.parametrize(
    "h, w, tile, overlap",
    [(37, 53, 32, 8), (97, 61, 32, 12), (64, 64, 32, 0), (20, 13, 32, 8), (129, 33, 64, 16), (101, 101, 32, 16)],
)
def test_tiles_reproduce_the_untiled_result(h: int, w: int, tile: int, overlap: int) -> None:
    model, pixels = _pixel_model(), _image(h, w)
    out = predict_tiled(model, pixels, tile, overlap, "cpu", divisor=32, batch_size=3)
    assert out.shape == (2, h, w) and out.dtype == np.float32
    np.testing.assert_allclose(out, _untiled(model, pixels), atol=1e-5)


def test_conv3x3_matches_away_from_tile_seams() -> None:
    torch.manual_seed(1)
    model = torch.nn.Conv2d(3, 2, kernel_size=3, padding=1, padding_mode="reflect")
    pixels = _image(80, 80, 1)
    out = predict_tiled(model, pixels, 64, 24, "cpu", divisor=32)
    ref = _untiled(model, pixels)
    # tiles start at 0 and 16: every pixel except the image's own border is >= 1 px inside some tile
    np.testing.assert_allclose(out[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=2e-2)


@pytest.mark.parametrize("n, tile, overlap", [(100, 32, 8), (32, 32, 8), (33, 32, 16), (500, 256, 32)])
def test_tile_starts_cover_the_axis_with_the_overlap(n: int, tile: int, overlap: int) -> None:
    starts = tile_starts(n, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(n, tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize(
    "n, tile, overlap, divisor, expected",
    [(1024, 256, 32, 16, 240), (1024, 256, 32, 32, 256), (200, 256, 32, 32, 224), (256, 256, 32, 32, 256),
     (257, 256, 32, 32, 160), (1024, 512, 32, 16, 368)],
)
def test_tile_length_shares_the_axis_evenly(n: int, tile: int, overlap: int, divisor: int, expected: int) -> None:
    length = tile_length(n, tile, overlap, divisor)
    assert length == expected and length % divisor == 0
    starts = tile_starts(max(n, length), length, overlap)
    assert starts[-1] + length >= n and all(b - a <= length - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("h, w, overlap", [(32, 32, 8), (64, 40, 16), (16, 16, 0)])
def test_window_is_positive_symmetric_and_one_in_the_middle(h: int, w: int, overlap: int) -> None:
    win = blend_window(h, w, overlap)
    assert win.shape == (h, w) and win.min() > 0 and win.max() == pytest.approx(1.0)
    np.testing.assert_allclose(win, win[::-1, ::-1])
    assert win[h // 2, w // 2] == pytest.approx(1.0)


@pytest.mark.parametrize("tile, overlap, match", [(30, 4, "multiple of 32"), (32, 20, "overlap")])
def test_bad_tiling_raises(tile: int, overlap: int, match: str) -> None:
    with pytest.raises(TilingError, match=match):
        predict_tiled(_pixel_model(), _image(40, 40), tile, overlap, "cpu")


def test_normalize_rejects_grey_arrays() -> None:
    with pytest.raises(TilingError, match=r"\(H, W, 3\)"):
        normalize_image(np.zeros((5, 5), np.uint8))
    with pytest.raises(TilingError, match="polarity must be one of"):
        normalize_image(np.zeros((5, 5, 3), np.uint8), "flip")


def _discs(dark: bool) -> np.ndarray:
    """Three small discs on a 64 x 64 background: dark discs on light or light discs on dark."""
    yy, xx = np.mgrid[:64, :64]
    inside = np.zeros((64, 64), bool)
    for cy, cx in [(16, 16), (40, 20), (30, 48)]:
        inside |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
    grey = np.where(inside, 40, 210) if dark else np.where(inside, 210, 40)
    return np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)


def test_auto_polarity_turns_dark_objects_bright() -> None:
    dark, bright = _discs(dark=True), _discs(dark=False)
    assert dark_objects(dark) and not dark_objects(bright)
    assert not dark_objects(np.full((8, 8, 3), 128, np.uint8))  # flat: nothing to decide
    # "auto" negates the dark-object image: it matches the bright-object image exactly (same levels)
    np.testing.assert_allclose(normalize_image(dark, "auto"), normalize_image(bright), atol=1e-5)
    np.testing.assert_allclose(normalize_image(dark, "auto"), -normalize_image(dark), atol=1e-6)
    # a bright-object image is left as it is
    np.testing.assert_array_equal(normalize_image(bright, "auto"), normalize_image(bright))
    # tiled prediction applies it too: a pixelwise model sees the same input for both images
    model = _pixel_model(4)
    np.testing.assert_allclose(predict_tiled(model, dark, 32, 8, "cpu", polarity="auto"),
                               predict_tiled(model, bright, 32, 8, "cpu"), atol=1e-5)


@pytest.mark.parametrize("h, w, tile", [(37, 53, 32), (64, 96, 64)])
def test_test_time_augmentation_keeps_a_pixelwise_model_unchanged(h: int, w: int, tile: int) -> None:
    # a 1x1 convolution commutes with every flip and rotation: the 8-view mean is its own output
    model, pixels = _pixel_model(2), _image(h, w, 2)
    plain = predict_tiled(model, pixels, tile, 8, "cpu", divisor=32)
    np.testing.assert_allclose(predict_tiled(model, pixels, tile, 8, "cpu", divisor=32, tta=True), plain, atol=1e-5)


def test_test_time_augmentation_averages_an_orientation_dependent_model() -> None:
    # an antisymmetric gradient filter: each view mapped back gives sigmoid(+g) or sigmoid(-g) of a
    # horizontal or vertical gradient g, in pairs, so the 8-view mean is exactly 0.5 everywhere
    conv = torch.nn.Conv2d(3, 2, kernel_size=3, padding=1, padding_mode="reflect", bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, :, 1, 0], conv.weight[:, :, 1, 2] = -1.0, 1.0
    pixels = _image(64, 64, 3)
    plain = predict_tiled(conv, pixels, 64, 0, "cpu", divisor=32)
    averaged = predict_tiled(conv, pixels, 64, 0, "cpu", divisor=32, tta=True)
    assert np.abs(plain - 0.5).max() > 0.2
    np.testing.assert_allclose(averaged, 0.5, atol=1e-5)

"""Crop geometry (reflect padding at borders) and the stratified split by image."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.crops import (
    SPLITS,
    CropError,
    SplitError,
    crop_around,
    parse_fractions,
    reflect_indices,
    split_counts,
    stratified_image_split,
)

H, W = 7, 10


def _grey() -> np.ndarray:
    """(7, 10) uint8 image whose value encodes its position: 10 * row + col."""
    return (np.arange(H)[:, None] * 10 + np.arange(W)[None, :]).astype(np.uint8)


def _rgb() -> np.ndarray:
    """(7, 10, 3): channel c = grey + 100 * c, so channels stay distinguishable."""
    g = _grey().astype(np.int32)
    return np.stack([g, g + 100, g + 200], axis=-1).astype(np.int32)


def _expected(img: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """Reference: numpy.pad(reflect) of the whole image, then slice."""
    pad = size + max(H, W) * 4
    pw = [(pad, pad), (pad, pad)] + ([(0, 0)] if img.ndim == 3 else [])
    big = np.pad(img, pw, mode="reflect")
    r0 = int(np.floor(y)) - size // 2 + pad
    c0 = int(np.floor(x)) - size // 2 + pad
    return big[r0 : r0 + size, c0 : c0 + size]


CROP_CASES = [
    # name, x, y, size
    ("centre odd", 5.0, 3.0, 3),
    ("centre even", 5.0, 3.0, 4),
    ("fractional point", 5.7, 3.2, 5),
    ("top-left corner", 0.0, 0.0, 5),
    ("top-right corner", W - 1, 0.0, 4),
    ("bottom-left corner", 0.0, H - 1, 5),
    ("bottom-right corner", W - 1, H - 1, 6),
    ("outside left by a bit", -2.5, 3.0, 5),
    ("outside below by a bit", 4.0, H + 1.0, 4),
    ("larger than the image", 5.0, 3.0, 25),
    ("size one", 2.0, 6.0, 1),
]


@pytest.mark.parametrize("make", [_grey, _rgb], ids=["grey", "rgb"])
@pytest.mark.parametrize(("name", "x", "y", "size"), CROP_CASES, ids=[c[0] for c in CROP_CASES])
def test_crop_matches_reflect_padding(make, name, x, y, size):
    img = make()
    out = crop_around(img, x, y, size)
    assert out.shape == (size, size) + img.shape[2:]
    assert out.dtype == img.dtype
    np.testing.assert_array_equal(out, _expected(img, x, y, size))


@pytest.mark.parametrize(("x", "y", "size"), [(5, 3, 3), (5, 3, 4), (0, 0, 96), (9.9, 6.9, 95)])
def test_centre_pixel_is_the_clicked_pixel(x, y, size):
    img = _grey()
    out = crop_around(img, x, y, size)
    assert out[size // 2, size // 2] == img[int(np.floor(y)), int(np.floor(x))]


def test_crop_is_a_copy():
    img = _grey()
    out = crop_around(img, 5, 3, 3)
    out[:] = 0
    assert img[3, 5] == 35


def test_border_values_reflect_without_repeating_the_edge():
    # Column 0 is the border: the pixel left of it reflects to column 1.
    out = crop_around(_grey(), 0, 0, 3)
    np.testing.assert_array_equal(out, [[11, 10, 11], [1, 0, 1], [11, 10, 11]])


@pytest.mark.parametrize(
    ("image", "x", "y", "size", "match"),
    [
        (np.zeros((4,)), 0, 0, 3, "shape"),
        (np.zeros((2, 2, 2, 2)), 0, 0, 3, "shape"),
        (np.zeros((0, 5)), 0, 0, 3, "empty"),
        (np.zeros((5, 5)), 0, 0, 0, "positive integer"),
        (np.zeros((5, 5)), 0, 0, 2.5, "positive integer"),
        (np.zeros((5, 5)), float("nan"), 0, 3, "finite"),
        (np.zeros((5, 5)), 0, float("inf"), 3, "finite"),
    ],
)
def test_crop_rejects_bad_input(image, x, y, size, match):
    with pytest.raises(CropError, match=match):
        crop_around(image, x, y, size)


def test_single_pixel_image():
    out = crop_around(np.array([[7]], dtype=np.uint8), 0, 0, 4)
    assert out.shape == (4, 4) and (out == 7).all()


@pytest.mark.parametrize(("start", "n", "expected"), [(-3, 4, [3, 2, 1, 0, 1, 2, 3]), (2, 3, [2, 1, 0, 1, 2, 1])])
def test_reflect_indices(start, n, expected):
    np.testing.assert_array_equal(reflect_indices(start, len(expected), n), expected)


# ---------------------------------------------------------------- split


def _images(n: int, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_alive = rng.integers(0, 40, n)
    n_dead = rng.integers(0, 20, n)
    return pd.DataFrame({"image": [f"img{i:03d}" for i in range(n)], "n_alive": n_alive, "n_dead": n_dead})


@pytest.mark.parametrize("n", [1, 2, 3, 12, 50, 400])
@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (1.0, 0.0, 0.0), (0.5, 0.5, 0.0)])
def test_split_covers_every_image_once_with_the_right_sizes(n, fractions):
    images = _images(n)
    split = stratified_image_split(images, fractions, seed=3)
    assert set(split) == set(images["image"])
    assert set(split.values()) <= set(SPLITS)
    counts = split_counts(split)
    for name, f in zip(SPLITS, fractions):
        assert abs(counts[name] - f * n) < 1.0 + 1e-9, (name, counts)
        if f == 0:
            assert counts[name] == 0


def test_split_is_deterministic_and_ignores_row_order():
    images = _images(60)
    a = stratified_image_split(images, seed=5)
    b = stratified_image_split(images.sample(frac=1.0, random_state=2), seed=5)
    assert a == b
    c = stratified_image_split(images, seed=6)
    assert c != a  # another seed gives another (valid) split


def test_split_is_stratified_by_dead_fraction():
    # Half the images are nearly all alive, half are mostly dead: each split must get both kinds.
    n = 100
    dead_heavy = np.arange(n) % 2 == 1
    images = pd.DataFrame(
        {
            "image": [f"i{i}" for i in range(n)],
            "n_alive": np.where(dead_heavy, 5, 50),
            "n_dead": np.where(dead_heavy, 45, 1),
        }
    )
    split = stratified_image_split(images, (0.6, 0.2, 0.2), seed=0)
    for name in SPLITS:
        members = images[images["image"].map(split) == name]
        heavy_share = (members["n_dead"] > members["n_alive"]).mean()
        assert 0.4 <= heavy_share <= 0.6, (name, heavy_share)
        dead_frac = members["n_dead"].sum() / (members["n_dead"].sum() + members["n_alive"].sum())
        overall = images["n_dead"].sum() / (images["n_dead"].sum() + images["n_alive"].sum())
        assert abs(dead_frac - overall) < 0.05


def test_split_handles_images_without_cells():
    images = pd.DataFrame({"image": list("abcdefghij"), "n_alive": [0] * 10, "n_dead": [0] * 10})
    split = stratified_image_split(images, seed=0)
    assert split_counts(split) == {"train": 8, "val": 1, "test": 1}


def test_split_of_empty_table():
    assert stratified_image_split(pd.DataFrame(columns=["image", "n_alive", "n_dead"])) == {}


@pytest.mark.parametrize(
    ("fractions", "match"),
    [
        ((0.8, 0.1), "3 fractions"),
        ((0.5, 0.3, 0.1, 0.1), "3 fractions"),
        ((0.8, 0.3, -0.1), ">= 0"),
        ((0.8, 0.1, 0.2), "sum to 1"),
        ((0.8, float("nan"), 0.1), "finite"),
        (("a", 0.1, 0.1), "numbers"),
    ],
)
def test_split_rejects_bad_fractions(fractions, match):
    with pytest.raises(SplitError, match=match):
        stratified_image_split(_images(5), fractions)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pd.DataFrame({"image": ["a"], "n_alive": [1]}), "n_dead"),
        (pd.DataFrame({"image": ["a", "a"], "n_alive": [1, 2], "n_dead": [0, 0]}), "more than once"),
        (pd.DataFrame({"image": ["a"], "n_alive": [-1], "n_dead": [0]}), "non-negative"),
    ],
)
def test_split_rejects_bad_tables(table, match):
    with pytest.raises(SplitError, match=match):
        stratified_image_split(table)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.8,0.1,0.1", (0.8, 0.1, 0.1)), (" 0.7 , 0.2,0.1 ", (0.7, 0.2, 0.1)), ("1,0,0", (1.0, 0.0, 0.0))],
)
def test_parse_fractions(text, expected):
    assert parse_fractions(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["0.8;0.1;0.1", "0.8,0.1", "a,b,c", "0.9,0.1,0.1"])
def test_parse_fractions_rejects(text):
    with pytest.raises(SplitError):
        parse_fractions(text)


def test_pure_module_imports_neither_torch_nor_sqlalchemy():
    import subprocess
    import sys

    code = (
        "import sys, cellspot.crops; "
        "bad = [m for m in ('torch', 'sqlalchemy') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

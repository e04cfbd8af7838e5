"""Generated cell cultures: shapes, truth, determinism and what the pixels show."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.synth import CELL_COLUMNS, LAYOUT_COLUMNS, SynthImage, generate_culture, generate_layout


@pytest.mark.parametrize("width, height, n_cells", [(256, 256, None), (300, 224, 10), (64, 48, 2), (524, 391, 15)])
def test_image_and_truth_shapes(width, height, n_cells):
    out = generate_culture(np.random.default_rng(0), width, height, n_cells=n_cells)
    assert isinstance(out, SynthImage)
    assert out.image.shape == (height, width, 3) and out.image.dtype == np.uint8
    assert list(out.cells.columns) == CELL_COLUMNS
    assert len(out.cells) >= 1
    if n_cells is not None:
        assert len(out.cells) <= n_cells
    assert out.cells["x"].between(0, width).all() and out.cells["y"].between(0, height).all()
    assert set(out.cells["label"]) <= {"alive", "dead"}
    assert (out.cells["diameter"] > 0).all()


@pytest.mark.parametrize("seed_a, seed_b, same", [(3, 3, True), (3, 4, False)])
def test_determinism(seed_a, seed_b, same):
    a = generate_culture(np.random.default_rng(seed_a))
    b = generate_culture(np.random.default_rng(seed_b))
    assert np.array_equal(a.image, b.image) is same
    assert a.cells.equals(b.cells) is same


@pytest.mark.parametrize("dead_fraction, labels", [(0.0, {"alive"}), (1.0, {"dead"})])
def test_dead_fraction_extremes(dead_fraction, labels):
    out = generate_culture(np.random.default_rng(1), n_cells=8, dead_fraction=dead_fraction)
    assert set(out.cells["label"]) == labels


def test_dead_share_and_sizes_over_many_layouts():
    rng = np.random.default_rng(2)
    cells = pd.concat([generate_layout(rng, 256, 256) for _ in range(60)], ignore_index=True)
    assert list(cells.columns) == LAYOUT_COLUMNS
    assert 0.28 < (cells["label"] == "dead").mean() < 0.42
    dead, alive = cells[cells["label"] == "dead"], cells[cells["label"] == "alive"]
    assert dead["diameter"].mean() < alive["diameter"].mean()          # dead cells are small
    assert dead["aspect"].max() < 1.2 < alive["aspect"].median()      # and round; alive ones elongated
    assert 8 <= len(cells) / 60 <= 16


def test_cells_do_not_overlap():
    rng = np.random.default_rng(3)
    for _ in range(20):
        cells = generate_layout(rng, 256, 256, n_cells=20)
        xy = cells[["x", "y"]].to_numpy()
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        # centres at least the mean of the two diameters apart (alive cells may touch at the tips)
        minimum = 0.5 * (cells["diameter"].to_numpy()[:, None] + cells["diameter"].to_numpy()[None, :])
        assert (d >= 0.8 * minimum).all()


def test_crowded_request_places_what_fits():
    cells = generate_layout(np.random.default_rng(4), 64, 64, n_cells=200)
    assert 1 <= len(cells) < 200


def test_pixels_show_the_cells():
    rng = np.random.default_rng(5)
    out = generate_culture(rng, 256, 256, n_cells=12)
    img = out.image.astype(float)
    # the field is the grey-green of the real frames (77, 87, 78)
    assert np.abs(np.median(img.reshape(-1, 3), axis=0) - [77, 87, 78]).max() < 12
    cells = out.cells
    for label, channel in (("dead", 1), ("alive", 2)):
        sub = cells[cells["label"] == label]
        if len(sub) == 0:
            continue
        xs, ys = sub["x"].round().astype(int).clip(0, 255), sub["y"].round().astype(int).clip(0, 255)
        # dead cells are bright green blobs; alive cells have a blue nucleus near the centre
        window = np.stack([img[max(0, y - 3):y + 4, max(0, x - 3):x + 4, :].reshape(-1, 3).max(axis=0)
                           for x, y in zip(xs, ys)])
        assert (window[:, channel] > np.median(img[..., channel]) + 8).mean() > 0.7


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 4, "height": 100}, "at least 8x8"),
    ({"dead_fraction": 1.5}, "dead_fraction"),
    ({"n_cells": -1}, "n_cells"),
    ({"diameter_scale": 0.0}, "diameter_scale"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_culture(np.random.default_rng(0), **kwargs)


def test_zero_cells_is_an_empty_field():
    out = generate_culture(np.random.default_rng(0), 64, 64, n_cells=0)
    assert len(out.cells) == 0 and list(out.cells.columns) == CELL_COLUMNS
    assert out.image.std() < 10

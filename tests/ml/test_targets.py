"""Target rendering: disks of the right radius, Gaussian peaks at the centres, masks -> targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellspot.ml.targets import (
    CHANNELS, TargetError, estimate_radius, mask_centroids, points_of, render_targets,
)


def _cells(*xy: tuple[float, float], diameter: float = float("nan")) -> pd.DataFrame:
    return pd.DataFrame({"x": [p[0] for p in xy], "y": [p[1] for p in xy], "diameter": diameter})


@pytest.mark.parametrize("radius", [2.0, 4.5, 8.0])
def test_disk_has_the_radius(radius: float) -> None:
    out = render_targets((41, 41), _cells((20, 20)), radius, "disk")
    assert out.shape == (len(CHANNELS), 41, 41) and out.dtype == np.float32
    yy, xx = np.mgrid[:41, :41]
    inside = np.hypot(xx - 20, yy - 20) <= radius
    np.testing.assert_array_equal(out[0] > 0.5, inside)


@pytest.mark.parametrize("kind", ["disk", "gaussian"])
@pytest.mark.parametrize("x, y", [(10, 12), (30.0, 5.0), (0, 0)])
def test_centre_peak_is_one_at_the_point(kind: str, x: float, y: float) -> None:
    out = render_targets((32, 40), _cells((x, y)), 5.0, kind)
    row, col = np.unravel_index(np.argmax(out[1]), out[1].shape)
    assert (col, row) == (x, y)
    assert out[1, row, col] == pytest.approx(1.0)
    assert out[0].max() == pytest.approx(1.0) and out.min() >= 0.0


def test_gaussian_foreground_is_soft_and_two_cells_keep_their_own_peaks() -> None:
    out = render_targets((30, 60), _cells((15, 15), (45, 15)), 6.0, "gaussian")
    assert 0.0 < out[0, 15, 30] < 0.1  # halfway between, far from both
    assert out[1, 15, 15] == pytest.approx(1.0) and out[1, 15, 45] == pytest.approx(1.0)


def test_points_outside_the_image_are_clipped_and_nan_rows_dropped() -> None:
    cells = _cells((-3, 5), (np.nan, 2), (100, 100))
    assert len(points_of(cells)) == 2
    out = render_targets((20, 20), cells, 5.0, "disk")
    assert out[0, 5, 0] == 1.0 and out[0, 19, 19] == 0.0


def test_mask_targets_foreground_centroids_and_touching_boundary() -> None:
    mask = np.zeros((20, 30), np.int32)
    mask[4:12, 3:11] = 1    # 8x8 square, centroid (6.5, 7.5) in (x, y)
    mask[4:12, 11:19] = 2   # touches square 1
    mask[14:18, 24:28] = 7
    out = render_targets(mask.shape, pd.DataFrame({"x": [], "y": []}), 1.0, "mask", mask)
    assert out[0][mask == 0].max() == 0.0
    assert out[0, 8, 10] == 0.0 and out[0, 8, 11] == 0.0  # touching pixels removed
    assert out[0, 8, 6] == 1.0 and out[0, 15, 25] == 1.0
    assert out[0][mask == 7].min() == 1.0  # an instance touching no other keeps every pixel, its edge too
    assert out[0, 4, 3] == 1.0 and out[0, 11, 18] == 1.0
    xy, diam = mask_centroids(mask)
    np.testing.assert_allclose(xy, [[6.5, 7.5], [14.5, 7.5], [25.5, 15.5]])
    np.testing.assert_allclose(diam, 2 * np.sqrt(np.array([64, 64, 16]) / np.pi))
    assert out[1, 7:9, 6:8].min() > 0.85 and out[1, 0, 29] < 1e-3


@pytest.mark.parametrize(
    "shape, kind, mask, radius, match",
    [
        ((10, 10), "box", None, 3.0, "unknown target kind"),
        ((10, 10), "mask", None, 3.0, "needs an instance mask"),
        ((10, 10), "mask", np.zeros((5, 5), np.int32), 3.0, "does not match"),
        ((10, 10), "disk", None, 0.0, "radius must be a positive"),
        ((0, 10), "disk", None, 3.0, "shape must be"),
    ],
)
def test_bad_requests_raise(shape, kind, mask, radius, match) -> None:
    with pytest.raises(TargetError, match=match):
        render_targets(shape, _cells((1, 1)), radius, kind, mask)


def test_estimate_radius_prefers_masks_then_diameters_then_spacing() -> None:
    mask = np.zeros((20, 20), np.int32)
    mask[2:6, 2:6] = 1
    assert estimate_radius([_cells((0, 0))], [mask]) == pytest.approx(np.sqrt(16 / np.pi))
    assert estimate_radius([_cells((0, 0), (5, 5), diameter=14.0)]) == pytest.approx(7.0)
    grid = _cells(*[(x, y) for x in range(0, 100, 20) for y in range(0, 100, 20)])
    assert estimate_radius([grid]) == pytest.approx(5.0)
    with pytest.raises(TargetError, match="cannot estimate"):
        estimate_radius([_cells((1, 1))])


def test_distance_centre_peaks_at_one_in_every_instance_whatever_its_size() -> None:
    mask = np.zeros((40, 60), np.int32)
    yy, xx = np.mgrid[:40, :60]
    mask[np.hypot(xx - 12, yy - 12) <= 9] = 3      # big disc
    mask[np.hypot(xx - 40, yy - 10) <= 3] = 8      # small disc
    mask[20:30, 30:40] = 5                         # square touching the one below
    mask[30:38, 30:40] = 6
    out = render_targets(mask.shape, pd.DataFrame({"x": [], "y": []}), 1.0, "mask", mask, centre="distance")
    for label in (3, 8, 5, 6):
        assert out[1][mask == label].max() == pytest.approx(1.0)
    assert out[1][mask == 0].max() == 0.0 and out[1].min() >= 0.0
    assert out[1, 12, 12] == pytest.approx(1.0) and out[1, 10, 40] == pytest.approx(1.0)
    assert out[1, 29, 35] == 0.0 and out[1, 30, 35] == 0.0  # the touching boundary is an edge
    assert 0.4 < out[1, 12, 17] < 0.6  # halfway out of the big disc
    np.testing.assert_array_equal(out[0], render_targets(mask.shape, _cells(), 1.0, "mask", mask)[0])


@pytest.mark.parametrize("radius", [3.0, 6.5])
def test_distance_centre_of_points_is_a_cone(radius: float) -> None:
    out = render_targets((41, 41), _cells((20, 20)), radius, "disk", centre="distance")
    assert out[1, 20, 20] == pytest.approx(1.0)
    assert out[1, 20, 20 + int(radius) + 1] == 0.0
    assert out[1, 20, 21] == pytest.approx(1.0 - 1.0 / radius)


def test_unknown_centre_kind_raises() -> None:
    with pytest.raises(TargetError, match="unknown centre kind"):
        render_targets((10, 10), _cells((1, 1)), 3.0, "disk", centre="ring")

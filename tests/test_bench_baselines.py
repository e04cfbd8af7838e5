"""The classical baselines of bench/models.py: crop features, feature classifiers, watershed."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bl(bench_script):
    """bench/baselines.py, loaded by path."""
    return bench_script("baselines")


def disc_image(centres, radius, shape=(96, 96), fg=200, bg=30, channel_scale=(1.0, 1.0, 1.0)):
    """uint8 (H, W, 3) image with filled discs of value ``fg`` on ``bg``."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    grey = np.full(shape, float(bg))
    for x, y in centres:
        grey[np.hypot(xx - x, yy - y) <= radius] = fg
    rgb = np.stack([grey * s for s in channel_scale], axis=2)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def crop(value_in, value_out=128, size=32, radius=8, blue=0.0):
    img = disc_image([(size // 2, size // 2)], radius, (size, size), fg=value_in, bg=value_out,
                     channel_scale=(1.0 - blue, 1.0 - blue, 1.0))
    return img


# ------------------------------------------------------------------ features


def test_features_shape_names_and_finite(bl):
    crops = np.stack([crop(40), crop(220), crop(128)])
    feats = bl.crop_features(crops, radius=8)
    assert feats.shape == (3, len(bl.feature_names()))
    assert feats.dtype == np.float32 and np.isfinite(feats).all()
    grey = bl.crop_features(crops[..., 0], radius=8)  # (N, S, S) grey input is accepted
    np.testing.assert_allclose(grey, feats, atol=1e-6)


@pytest.mark.parametrize("name, low, high", [
    ("grey_in_mean", crop(40), crop(220)),       # darker centre -> lower inside mean
    ("ring_contrast", crop(40), crop(220)),      # centre minus ring
    ("blue_in", crop(150), crop(150, blue=0.5)),  # bluish disc -> higher blue-ness inside
])
def test_features_follow_the_pixels(bl, name, low, high):
    k = bl.feature_names().index(name)
    feats = bl.crop_features(np.stack([low, high]), radius=8)
    assert feats[0, k] < feats[1, k]


@pytest.mark.parametrize("shape", [(2, 32, 32, 4), (2, 5, 5, 3), (32, 32)])
def test_features_reject_bad_shapes(bl, shape):
    with pytest.raises(bl.BaselineError, match="crops must be"):
        bl.crop_features(np.zeros(shape, np.uint8))


def test_best_classifier_separates_dark_from_bright_cells(bl):
    rng = np.random.default_rng(0)
    values = np.r_[rng.integers(20, 70, 30), rng.integers(180, 240, 30)]
    crops = np.stack([crop(int(v)) for v in values])
    y = (values > 128).astype(int)
    feats = bl.crop_features(crops, radius=8)
    idx = rng.permutation(len(y))
    tr, va = idx[:40], idx[40:]
    fitted = bl.fit_best_classifier(feats[tr], y[tr], feats[va], y[va], names=["logistic_regression",
                                                                                 "random_forest"])
    assert fitted.name in ("logistic_regression", "random_forest")
    assert set(fitted.val_scores) == {"logistic_regression", "random_forest"}
    assert np.all((fitted.predict_proba(feats) >= 0.5) == y)


def test_unknown_classifier_lists_valid_names(bl):
    with pytest.raises(bl.BaselineError, match="hist_gradient_boosting"):
        bl.make_feature_classifier("svm")


# ------------------------------------------------------------------ watershed

SEPARATE = [(20, 20), (70, 22), (25, 72), (72, 70), (48, 46)]


@pytest.mark.parametrize("case, centres, fg, bg, params", [
    ("bright discs", SEPARATE, 200, 30, {}),
    ("dark discs, auto polarity", SEPARATE, 30, 200, {}),
    ("two touching discs split", [(38, 48), (58, 48)], 200, 30, {"min_distance": 0.6}),
    ("contrast map", SEPARATE, 200, 100, {"feature": "contrast", "window": 10, "open_radius": 2}),
])
def test_watershed_finds_every_disc(bl, case, centres, fg, bg, params):
    img = disc_image(centres, 8, fg=fg, bg=bg)
    res = bl.watershed_detect(img, bl.WatershedParams(**params))
    assert len(res.xy) == len(centres), case
    d = np.hypot(res.xy[:, None, 0] - np.array(centres)[None, :, 0], res.xy[:, None, 1] - np.array(centres)[None, :, 1])
    assert d.min(axis=0).max() < 2.0, case
    assert res.labels.shape == img.shape[:2] and res.labels.max() == len(centres)


def test_watershed_drops_lines_and_small_specks(bl):
    img = disc_image([(30, 30)], 8, fg=200, bg=30)
    img[:, 70:72] = 200  # a thin grid line
    img[80, 10] = 200  # a one-pixel speck
    res = bl.watershed_detect(img, bl.WatershedParams(open_radius=2, max_elongation=3.0, min_area=12))
    assert len(res.xy) == 1
    np.testing.assert_allclose(res.xy[0], [30, 30], atol=1.0)


def test_watershed_on_a_flat_image_finds_nothing(bl):
    res = bl.watershed_detect(np.full((40, 40, 3), 90, np.uint8))
    assert res.xy.shape == (0, 2) and not res.labels.any()


def test_tune_picks_the_best_setting(bl):
    img = disc_image(SEPARATE, 8)
    grid = [bl.WatershedParams(threshold_scale=s) for s in (0.5, 1.0, 30.0)]
    best, score, table = bl.tune_watershed([img], lambda res: -abs(len(res[0].xy) - len(SEPARATE)), grid)
    assert len(table) == 3 and score == 0 and best.threshold_scale != 30.0


@pytest.mark.parametrize("kwargs, match", [({"feature": "hough"}, "feature"), ({"polarity": "up"}, "polarity")])
def test_params_validate(bl, kwargs, match):
    with pytest.raises(bl.BaselineError, match=match):
        bl.WatershedParams(**kwargs)


@pytest.mark.parametrize("kind", ["fluorescence", "brightfield"])
def test_default_grids(bl, kind):
    grid = bl.default_grid(kind)
    assert len(grid) >= 10 and len(set(grid)) == len(grid)

"""Classical baselines for ``bench/models.py``: hand-made crop features + scikit-learn, and
Otsu + distance-transform watershed (scikit-image) for detection.

Crop classifier
    :func:`crop_features` turns crops ``(N, S, S, 3)`` uint8 centred on cells into a feature
    matrix ``(N, F)``: per-channel intensity statistics inside a central disc, in a ring
    around it and outside, "blue-ness", darkness, ring contrast, a radial profile, gradient
    and Laplacian texture, a uniform-LBP histogram and a small HOG descriptor.
    :data:`FEATURE_CLASSIFIERS` maps a name to a scikit-learn estimator builder;
    :func:`fit_best_classifier` fits each on the training features and keeps the one with the
    best balanced accuracy on the validation features (a fair, tuned-on-train chance).

Detector
    :func:`watershed_detect` runs one parameter set (:class:`WatershedParams`): a feature map
    (smoothed intensity with automatic polarity, local standard deviation or gradient
    magnitude, for brightfield), Otsu threshold times a factor, hole filling, small-object
    removal, distance transform, peaks at least ``min_distance`` x (typical object radius)
    apart, watershed. :func:`tune_watershed` picks the best of a grid with a caller-given score
    on training images; :func:`default_grid` gives grids for fluorescence-like and brightfield
    images.

Pure numpy / scipy / scikit-image / scikit-learn: no torch.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation, transform
from sklearn.base import ClassifierMixin
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("bench.baselines")

_CHANNELS = ("r", "g", "b", "grey")
_RADIAL_BINS = 6
_LBP_POINTS = 8
_HOG_SIZE = 32


class BaselineError(ValueError):
    """Bad input to a baseline (crop shape, unknown name, empty grid)."""


# ---------------------------------------------------------------------------------------------
# crop features


def _zones(size: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Masks ``(S, S)`` bool: inside (r <= radius), ring (radius..1.5 radius), outside; and r."""
    c = size // 2
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(xx - c, yy - c)
    inside = r <= radius
    ring = (r > radius) & (r <= 1.5 * radius)
    outside = r > 1.5 * radius
    if not outside.any():  # crop too tight: use the outermost pixels
        outside = r >= np.quantile(r, 0.75)
    return inside, ring, outside, r


def feature_names() -> list[str]:
    """Names of the columns of :func:`crop_features`, in order."""
    names = []
    for ch in _CHANNELS:
        names += [f"{ch}_in_mean", f"{ch}_in_std", f"{ch}_ring_mean", f"{ch}_out_mean", f"{ch}_out_std",
                  f"{ch}_in_rel", f"{ch}_ring_rel"]
    names += ["blue_in", "blue_out", "blue_contrast", "sat_in", "sat_out"]
    names += ["dark_p10_in", "dark_min_in", "dark_frac_in", "ring_contrast", "halo_contrast"]
    names += [f"radial_{k}" for k in range(_RADIAL_BINS)]
    names += ["grad_in", "grad_ring", "grad_out", "lap_var_in", "lap_var_out"]
    names += [f"lbp_{k}" for k in range(_LBP_POINTS + 2)]
    names += [f"hog_{k}" for k in range(_hog_length())]
    return names


def _hog_length() -> int:
    return len(_hog(np.zeros((_HOG_SIZE, _HOG_SIZE))))


def _hog(grey: np.ndarray) -> np.ndarray:
    return feature.hog(grey, orientations=8, pixels_per_cell=(8, 8), cells_per_block=(2, 2), feature_vector=True)


def crop_features(crops: np.ndarray, radius: float | None = None) -> np.ndarray:
    """Hand-made features of cell crops.

    ``crops``: ``(N, S, S, 3)`` uint8 RGB (or ``(N, S, S)`` grey), each centred on a cell.
    ``radius``: the cell radius in pixels (default ``S / 4``). Returns ``(N, F)`` float32 with
    ``F = len(feature_names())``, every value finite. Intensities are in [0, 1].
    """
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = np.repeat(crops[..., None], 3, axis=3)
    if crops.ndim != 4 or crops.shape[1] != crops.shape[2] or crops.shape[3] != 3 or crops.shape[1] < 8:
        raise BaselineError(f"crops must be (N, S, S, 3) or (N, S, S) with S >= 8; got {crops.shape}")
    n, size = crops.shape[0], crops.shape[1]
    if n == 0:
        return np.zeros((0, len(feature_names())), np.float32)
    radius = float(size) / 4 if radius is None else float(radius)
    inside, ring, outside, r = _zones(size, radius)
    rgb = crops.astype(np.float32) / 255.0
    grey = rgb.mean(axis=3)
    chans = [rgb[..., 0], rgb[..., 1], rgb[..., 2], grey]
    cols: list[np.ndarray] = []
    for ch in chans:
        flat_in, flat_out = ch[:, inside], ch[:, outside]
        in_m, ring_m, out_m = flat_in.mean(1), ch[:, ring].mean(1) if ring.any() else flat_in.mean(1), flat_out.mean(1)
        denom = out_m + 1e-3
        cols += [in_m, flat_in.std(1), ring_m, out_m, flat_out.std(1), in_m / denom, ring_m / denom]
    blue = rgb[..., 2] - 0.5 * (rgb[..., 0] + rgb[..., 1])
    sat = rgb.max(axis=3) - rgb.min(axis=3)
    b_in, b_out = blue[:, inside].mean(1), blue[:, outside].mean(1)
    cols += [b_in, b_out, b_in - b_out, sat[:, inside].mean(1), sat[:, outside].mean(1)]
    g_in, g_out = grey[:, inside], grey[:, outside]
    dark_thr = g_out.mean(1) - 2 * g_out.std(1)
    ring_m = grey[:, ring].mean(1) if ring.any() else g_in.mean(1)
    cols += [np.percentile(g_in, 10, axis=1), g_in.min(1), (g_in < dark_thr[:, None]).mean(1),
             g_in.mean(1) - ring_m, ring_m - g_out.mean(1)]
    edges = np.linspace(0, r.max() + 1e-6, _RADIAL_BINS + 1)
    for k in range(_RADIAL_BINS):
        zone = (r >= edges[k]) & (r < edges[k + 1])
        cols.append(grey[:, zone].mean(1) / (g_out.mean(1) + 1e-3) if zone.any() else np.zeros(n, np.float32))
    gx, gy = ndi.sobel(grey, axis=2), ndi.sobel(grey, axis=1)
    grad = np.hypot(gx, gy)
    lap = ndi.laplace(grey, mode="reflect")
    cols += [grad[:, inside].mean(1), grad[:, ring].mean(1) if ring.any() else grad[:, inside].mean(1),
             grad[:, outside].mean(1), lap[:, inside].var(1), lap[:, outside].var(1)]
    base = np.stack(cols, axis=1)
    per_crop = np.stack([_texture(grey[i], inside) for i in range(n)])
    out = np.concatenate([base, per_crop], axis=1).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _texture(grey: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Uniform LBP histogram inside the disc (P + 2 bins) and HOG of the crop resized to 32x32."""
    g8 = np.clip(grey * 255, 0, 255).astype(np.uint8)
    lbp = feature.local_binary_pattern(g8, _LBP_POINTS, 1, method="uniform")
    hist = np.bincount(lbp[inside].astype(np.int64), minlength=_LBP_POINTS + 2)[: _LBP_POINTS + 2]
    hist = hist / max(1, hist.sum())
    small = transform.resize(grey, (_HOG_SIZE, _HOG_SIZE), anti_aliasing=True, preserve_range=True)
    return np.concatenate([hist, _hog(small)])


# ---------------------------------------------------------------------------------------------
# feature classifiers


def _hgb(seed: int) -> ClassifierMixin:
    return HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, class_weight="balanced",
                                          l2_regularization=1.0, random_state=seed)


def _logreg(seed: int) -> ClassifierMixin:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.3, class_weight="balanced", max_iter=3000,
                                                              random_state=seed))


def _forest(seed: int) -> ClassifierMixin:
    return RandomForestClassifier(n_estimators=300, min_samples_leaf=2, class_weight="balanced_subsample",
                                  n_jobs=1, random_state=seed)


#: name -> builder(seed) of an unfitted scikit-learn classifier (with ``predict_proba``)
FEATURE_CLASSIFIERS: dict[str, Callable[[int], ClassifierMixin]] = {
    "hist_gradient_boosting": _hgb,
    "logistic_regression": _logreg,
    "random_forest": _forest,
}


def make_feature_classifier(name: str, seed: int = 0) -> ClassifierMixin:
    """An unfitted classifier from :data:`FEATURE_CLASSIFIERS`; unknown names list the valid ones."""
    try:
        return FEATURE_CLASSIFIERS[name](seed)
    except KeyError:
        raise BaselineError(f"unknown feature classifier {name!r}; valid: {sorted(FEATURE_CLASSIFIERS)}") from None


def _fit(model: ClassifierMixin, x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> ClassifierMixin:
    if w is None:
        return model.fit(x, y)
    if hasattr(model, "steps"):  # pipeline: route the weights to its last step
        return model.fit(x, y, **{f"{model.steps[-1][0]}__sample_weight": w})
    return model.fit(x, y, sample_weight=w)


@dataclass
class FittedBaseline:
    """The chosen classifier, its name, and the validation balanced accuracy of every candidate."""

    name: str
    model: ClassifierMixin
    val_scores: dict[str, float]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probability of class 1 for features ``x`` ``(N, F)``; returns ``(N,)``."""
        return self.model.predict_proba(x)[:, 1]


def fit_best_classifier(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
    weights: np.ndarray | None = None, names: Sequence[str] | None = None, seed: int = 0,
) -> FittedBaseline:
    """Fit each named classifier on the training features; keep the best on validation.

    ``x_*``: ``(N, F)``; ``y_*``: ``(N,)`` 0/1; ``weights``: optional ``(N_train,)`` sample
    weights. The score is balanced accuracy at 0.5; without validation rows the first name wins.
    The winner is refitted on train + validation (weights 1 for validation rows).
    """
    names = list(names or FEATURE_CLASSIFIERS)
    if len(np.unique(y_train)) < 2:
        raise BaselineError("the training features hold one class only; a classifier needs both")
    scores: dict[str, float] = {}
    for name in names:
        model = _fit(make_feature_classifier(name, seed), x_train, y_train, weights)
        scores[name] = (float(balanced_accuracy_score(y_val, model.predict_proba(x_val)[:, 1] >= 0.5))
                        if len(y_val) and len(np.unique(y_val)) == 2 else float("nan"))
        log.info("baseline %s: val balanced accuracy %.4f", name, scores[name])
    finite = {k: v for k, v in scores.items() if np.isfinite(v)}
    best = max(finite, key=finite.get) if finite else names[0]
    x_all = np.concatenate([x_train, x_val]) if len(x_val) else x_train
    y_all = np.concatenate([y_train, y_val]) if len(y_val) else y_train
    w_all = None if weights is None else np.concatenate([weights, np.ones(len(y_val))])
    return FittedBaseline(best, _fit(make_feature_classifier(best, seed), x_all, y_all, w_all), scores)


# ---------------------------------------------------------------------------------------------
# Otsu + distance-transform watershed

FEATURE_MAPS = ("intensity", "variance", "gradient", "contrast")


@dataclass(frozen=True)
class WatershedParams:
    """One setting of the classical detector.

    ``feature``: "intensity" (smoothed grey, polarity chosen so the foreground is the minority
    unless ``polarity`` says "bright"/"dark"), "variance" (local standard deviation over a
    ``window`` x ``window`` box: brightfield cells are textured, the background is flat) or
    "gradient" (Sobel magnitude) or "contrast" (absolute difference to the background, a
    Gaussian blur of width ``window``: bright centres and dark rims alike). ``sigma``: Gaussian smoothing (pixels). ``threshold_scale``:
    factor on the Otsu threshold. ``min_distance``: peak spacing in units of the typical
    object radius (median over components of their largest distance-transform value).
    ``min_area``: objects smaller than this (pixels) are dropped. ``open_radius``: binary
    opening of the foreground with a disc of this radius (removes thin structures such as
    counting-chamber grid lines). ``max_elongation``: connected components whose major / minor
    axis ratio exceeds this are dropped before the watershed (lines, scratches); 0 = keep all.
    """

    feature: str = "intensity"
    polarity: str = "auto"
    sigma: float = 1.0
    window: int = 7
    threshold_scale: float = 1.0
    min_distance: float = 0.8
    min_area: int = 12
    open_radius: int = 1
    max_elongation: float = 0.0

    def __post_init__(self) -> None:
        if self.feature not in FEATURE_MAPS:
            raise BaselineError(f"feature must be one of {FEATURE_MAPS}; got {self.feature!r}")
        if self.polarity not in ("auto", "bright", "dark"):
            raise BaselineError(f"polarity must be auto, bright or dark; got {self.polarity!r}")


@dataclass
class WatershedResult:
    """Centres ``xy`` ``(N, 2)`` float (x, y) and instance labels ``(H, W)`` int32 (0 = background)."""

    xy: np.ndarray
    labels: np.ndarray


def to_grey(pixels: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` image -> ``(H, W)`` float32 in [0, 1] (mean of the first 3 channels)."""
    arr = np.asarray(pixels, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=2)
    if arr.ndim != 2:
        raise BaselineError(f"image must be (H, W) or (H, W, C); got shape {np.shape(pixels)}")
    hi = 255.0 if np.asarray(pixels).dtype == np.uint8 else max(float(arr.max()), 1e-6)
    return arr / hi


def feature_map(pixels: np.ndarray, params: WatershedParams) -> np.ndarray:
    """The map ``(H, W)`` float32 to threshold, with the foreground bright."""
    grey = to_grey(pixels)
    if params.feature == "intensity":
        smooth = filters.gaussian(grey, params.sigma) if params.sigma > 0 else grey
        polarity = params.polarity
        if polarity == "auto":
            t = _otsu(smooth)
            polarity = "bright" if np.mean(smooth > t) <= 0.5 else "dark"
        return smooth if polarity == "bright" else 1.0 - smooth
    if params.feature == "variance":
        m = ndi.uniform_filter(grey, params.window)
        m2 = ndi.uniform_filter(grey * grey, params.window)
        fmap = np.sqrt(np.clip(m2 - m * m, 0, None))
    elif params.feature == "contrast":
        fmap = np.abs(grey - filters.gaussian(grey, params.window))
    else:
        src = filters.gaussian(grey, max(params.sigma, 0.5))
        fmap = np.hypot(ndi.sobel(src, 0), ndi.sobel(src, 1))
    return filters.gaussian(fmap, params.sigma) if params.sigma > 0 else fmap


def _otsu(values: np.ndarray) -> float:
    if float(values.max()) <= float(values.min()):
        return float(values.max())
    return float(filters.threshold_otsu(values))


def watershed_detect(pixels: np.ndarray, params: WatershedParams = WatershedParams()) -> WatershedResult:
    """Detect objects in ``pixels`` ``(H, W[, C])`` with Otsu + distance-transform watershed."""
    fmap = feature_map(pixels, params)
    fg = fmap > _otsu(fmap) * params.threshold_scale
    if params.open_radius > 0:
        fg = ndi.binary_opening(fg, morphology.disk(params.open_radius))
    fg = ndi.binary_fill_holes(fg)
    fg = _drop_elongated(_drop_small(measure.label(fg), params.min_area), params.max_elongation) > 0
    shape = fg.shape
    if not fg.any():
        return WatershedResult(np.zeros((0, 2)), np.zeros(shape, np.int32))
    dist = ndi.distance_transform_edt(fg)
    comps = measure.label(fg)
    peak_r = ndi.maximum(dist, comps, index=np.arange(1, comps.max() + 1))
    radius = float(np.median(peak_r)) if len(peak_r) else 1.0
    spacing = max(1, int(round(params.min_distance * radius)))
    smooth = filters.gaussian(dist, 1.0)
    peaks = feature.peak_local_max(smooth, min_distance=spacing, labels=comps, exclude_border=False)
    markers = np.zeros(shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (flat tiny blobs) still get one marker at their maximum
    missing = np.setdiff1d(np.arange(1, comps.max() + 1), np.unique(comps[markers > 0]))
    if len(missing):
        where = np.array(ndi.maximum_position(dist, comps, index=missing), dtype=np.int64).reshape(-1, 2)
        markers[where[:, 0], where[:, 1]] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(missing))
    labels = segmentation.watershed(-smooth, markers, mask=fg).astype(np.int32)
    labels, _, _ = segmentation.relabel_sequential(_drop_small(labels, params.min_area))
    props = measure.regionprops(labels)
    xy = np.array([[p.centroid[1], p.centroid[0]] for p in props], dtype=float).reshape(-1, 2)
    return WatershedResult(xy, labels.astype(np.int32))


def _drop_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """``labels`` ``(H, W)`` int with the objects of fewer than ``min_area`` pixels set to 0."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def _drop_elongated(labels: np.ndarray, max_elongation: float) -> np.ndarray:
    """``labels`` with the components of major / minor axis ratio above ``max_elongation`` set to 0."""
    if max_elongation <= 0 or not labels.any():
        return labels
    drop = [p.label for p in measure.regionprops(labels)
            if p.axis_major_length > max_elongation * max(p.axis_minor_length, 1.0)]
    return np.where(np.isin(labels, drop), 0, labels) if drop else labels


def default_grid(kind: str) -> list[WatershedParams]:
    """A parameter grid: ``kind`` "fluorescence" (intensity maps) or "brightfield" (all maps)."""
    if kind == "fluorescence":
        return [WatershedParams("intensity", "auto", s, 7, t, d, 12)
                for s, t, d in itertools.product((0.5, 1.0, 2.0), (0.8, 1.0, 1.2), (0.6, 1.0))]
    if kind == "brightfield":  # counting chambers: open away grid lines, drop elongated components
        grid = [WatershedParams("contrast", "bright", 1.0, w, t, 1.2, a, 2, 3.0)
                for w, t, a in itertools.product((6, 10), (1.6, 2.0, 2.4), (20, 30))]
        grid += [WatershedParams("variance", "bright", 2.0, 9, t, 1.2, 20, o, 3.0)
                 for t, o in itertools.product((1.3, 1.6), (3, 4))]
        grid += [WatershedParams("gradient", "bright", 1.0, 7, t, 1.2, 20, 3, 3.0) for t in (1.6, 2.0)]
        return grid
    raise BaselineError(f"grid kind must be 'fluorescence' or 'brightfield'; got {kind!r}")


def tune_watershed(
    images: Sequence[np.ndarray],
    score: Callable[[list[WatershedResult]], float],
    grid: Sequence[WatershedParams],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[WatershedParams, float, list[tuple[WatershedParams, float]]]:
    """Run every setting of ``grid`` on ``images`` and keep the best by ``score``.

    ``score`` gets the list of results (one per image, same order) and returns a number to
    maximise (e.g. F1 on training images). Returns (best params, its score, all (params, score)).
    """
    if not grid:
        raise BaselineError("the watershed grid is empty")
    table = []
    for k, params in enumerate(grid):
        table.append((params, float(score([watershed_detect(im, params) for im in images]))))
        if progress:
            progress(k + 1, len(grid))
    best = max(table, key=lambda row: -np.inf if not np.isfinite(row[1]) else row[1])
    log.info("watershed tuned: %s score %.4f", best[0], best[1])
    return best[0], best[1], table

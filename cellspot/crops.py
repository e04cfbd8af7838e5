"""Crop geometry and dataset splitting: pure numpy/pandas (no torch, no database).

Conventions
-----------
Pixel coordinates are ``(x, y)`` with x to the right and y down, origin at the image's
top-left corner; pixel ``(i, j)`` (column i, row j) covers ``[i, i+1) x [j, j+1)``.
A crop of side ``size`` around ``(x, y)`` always puts the pixel that contains the point
at index ``size // 2`` (row and column), for odd and even sizes alike. Pixels that fall
outside the image are filled by reflection (``numpy.pad(mode="reflect")`` semantics,
the border pixel is not repeated), so cells at or slightly past the border still give
a full-size crop instead of being dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


class CropError(ValueError):
    """Raised for an invalid crop request (bad image shape, size or centre)."""


class SplitError(ValueError):
    """Raised for invalid split fractions or a malformed image table."""


def reflect_indices(start: int, size: int, n: int) -> np.ndarray:
    """Indices ``start .. start+size-1`` folded into ``[0, n)`` by mirror reflection.

    Same rule as ``numpy.pad(mode="reflect")`` (edge not repeated), applied as often as
    needed, so any start works. ``n == 1`` maps everything to 0. Returns int64 ``(size,)``.
    """
    idx = np.arange(start, start + size, dtype=np.int64)
    if n == 1:
        return np.zeros(size, dtype=np.int64)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def crop_around(image: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """Square crop of side ``size`` centred on the point ``(x, y)``, reflect-padded.

    ``image``: ``(H, W)`` or ``(H, W, C)`` array of any dtype.
    Returns a new array ``(size, size)`` or ``(size, size, C)`` of the same dtype, where
    ``out[size // 2, size // 2]`` is the pixel ``image[floor(y), floor(x)]`` whenever the
    point lies inside the image. Points outside the image (e.g. a click a few pixels past
    the border) are allowed; the missing pixels come from reflection.

    Raises :class:`CropError` for a non-positive size, a non-finite centre, or an image
    that is not 2-D / 3-D or is empty.
    """
    if image.ndim not in (2, 3):
        raise CropError(f"image must be (H, W) or (H, W, C); got shape {image.shape}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise CropError(f"image is empty (shape {image.shape})")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise CropError(f"crop size must be a positive integer; got {size!r}")
    if not (math.isfinite(x) and math.isfinite(y)):
        raise CropError(f"crop centre must be finite; got ({x!r}, {y!r})")
    half = int(size) // 2
    rows = reflect_indices(math.floor(y) - half, int(size), h)
    cols = reflect_indices(math.floor(x) - half, int(size), w)
    return image[rows[:, None], cols[None, :]]


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check that ``fractions`` are three finite non-negative numbers summing to 1.

    Returns them as a tuple of floats (train, val, test); raises :class:`SplitError`.
    """
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise SplitError(f"split fractions must be numbers; got {fractions!r}") from None
    if len(values) != len(SPLITS):
        raise SplitError(
            f"split needs {len(SPLITS)} fractions ({'/'.join(SPLITS)}); got {len(values)}: {values}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise SplitError(f"split fractions must be finite and >= 0; got {values}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise SplitError(f"split fractions must sum to 1; got {values} (sum {sum(values):g})")
    return values  # type: ignore[return-value]


def parse_fractions(text: str) -> tuple[float, float, float]:
    """Parse ``"0.8,0.1,0.1"`` into validated fractions (see :func:`validate_fractions`)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise SplitError(
            f"split must be three comma-separated numbers such as 0.8,0.1,0.1; got {text!r}"
        ) from None
    return validate_fractions(numbers)


def _strata(dead_fraction: np.ndarray, n_bins: int) -> np.ndarray:
    """Stratum per image: quantile bin of the dead fraction; images without cells get -1."""
    strata = np.full(dead_fraction.shape, -1, dtype=np.int64)
    has = np.isfinite(dead_fraction)
    if has.any():
        ranks = pd.Series(dead_fraction[has]).rank(method="average", pct=True).to_numpy()
        strata[has] = np.minimum((ranks * n_bins).astype(np.int64), n_bins - 1)
    return strata


def stratified_image_split(
    images: pd.DataFrame,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, str]:
    """Assign every image to ``train``, ``val`` or ``test``, stratified by its dead fraction.

    ``images``: one row per image, columns ``image`` (unique), ``n_alive``, ``n_dead``.
    The split is by image (an image is in exactly one split). Images are grouped into
    quantile bins of ``n_dead / (n_alive + n_dead)`` (images without cells form their own
    group), shuffled within their bin with ``seed``, and dealt out in bin order by a
    largest-deficit rule, so each split gets its fraction of every part of the dead-fraction
    range and the split sizes are within one image of ``fraction * n``. Deterministic for a
    given table (row order does not matter) and seed.

    Returns ``{image: split}``. Raises :class:`SplitError` for bad fractions, missing
    columns, duplicate image names or negative counts.
    """
    fr = np.asarray(validate_fractions(fractions))
    missing = [c for c in ("image", "n_alive", "n_dead") if c not in images.columns]
    if missing:
        raise SplitError(f"image table lacks column(s) {missing}; has {list(images.columns)}")
    if images.empty:
        return {}
    if images["image"].duplicated().any():
        dup = images.loc[images["image"].duplicated(), "image"].iloc[0]
        raise SplitError(f"image table lists {dup!r} more than once; one row per image")
    table = images.sort_values("image", kind="mergesort").reset_index(drop=True)
    alive = pd.to_numeric(table["n_alive"], errors="coerce").to_numpy(dtype=float)
    dead = pd.to_numeric(table["n_dead"], errors="coerce").to_numpy(dtype=float)
    if not (np.isfinite(alive).all() and np.isfinite(dead).all()) or (alive < 0).any() or (dead < 0).any():
        raise SplitError("n_alive and n_dead must be non-negative numbers for every image")
    total = alive + dead
    with np.errstate(invalid="ignore", divide="ignore"):
        dead_fraction = np.where(total > 0, dead / np.where(total > 0, total, 1), np.nan)
    n_bins = int(np.clip(len(table) // 5, 1, 10))
    strata = _strata(dead_fraction, n_bins)

    rng = np.random.default_rng(seed)
    shuffle_key = rng.permutation(len(table))
    order = np.lexsort((shuffle_key, strata))
    credit = rng.random(len(SPLITS)) * fr  # random phase, < one image per split
    assignment: dict[str, str] = {}
    for i in order:
        credit += fr
        k = int(np.argmax(credit))
        credit[k] -= 1.0
        assignment[table["image"].iloc[i]] = SPLITS[k]
    counts = {s: sum(1 for v in assignment.values() if v == s) for s in SPLITS}
    log.info("split %d images by image: %s", len(assignment), counts)
    return assignment


def split_counts(assignment: Mapping[str, str]) -> dict[str, int]:
    """Number of images per split, every split named (zero included)."""
    counts = {s: 0 for s in SPLITS}
    for split in assignment.values():
        counts[split] += 1
    return counts

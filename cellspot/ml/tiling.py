"""Tiled inference on images of any size: overlapping tiles blended with a smooth window.

The image is normalised once as a whole (:func:`normalize_image`, so every tile sees the
same intensity scale as in training), reflect-padded up to the network's divisibility, cut
into overlapping tiles, and the per-tile sigmoid outputs are summed with a weight window
that falls smoothly towards the tile edges (a raised cosine over the overlap) and divided by
the summed weights. The window is never zero, so pixels at the image border, covered by one
tile only, get exactly that tile's output.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from cellspot.crops import reflect_indices

log = logging.getLogger(__name__)


class TilingError(ValueError):
    """Bad tiling request (tile not a multiple of the divisibility, overlap too large, bad image)."""


#: how :func:`normalize_image` treats the image's polarity: "keep" it, or "auto": negate the
#: standardised image when its grey levels are skewed towards dark (a light background with
#: dark objects: brightfield, stained tissue), so every image reaches the network as bright
#: objects on a dark background, like fluorescence
POLARITIES = ("keep", "auto")


def normalize_image(pixels: np.ndarray, polarity: str = "keep") -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32, standardised by the image's own mean / std.

    One mean and one std over all channels (colour relations are kept), so brightfield,
    fluorescence and stained images reach the network on a comparable scale. ``polarity``
    (:data:`POLARITIES`): "auto" negates the result when the skewness of the grey levels
    (the mean of the three channels) is negative, i.e. most pixels are brighter than the mean.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise TilingError(f"pixels must be (H, W, 3) uint8 RGB, got shape {pixels.shape}")
    if polarity not in POLARITIES:
        raise TilingError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    x = pixels.astype(np.float32) / 255.0
    mean, std = float(x.mean()), float(x.std())
    out = (x - mean) / max(std, 1e-3)
    if polarity == "auto" and dark_objects(pixels):
        out = -out
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def dark_objects(pixels: np.ndarray) -> bool:
    """True when the grey levels of ``pixels`` ``(H, W, 3)`` are skewed towards dark (negative
    skewness): a light background with dark objects."""
    from scipy.stats import skew  # heavy module: loaded on first use only

    grey = pixels.astype(np.float64).mean(axis=2)
    if float(grey.std()) < 1e-6:  # flat: nothing to decide (and no skewness to compute)
        return False
    return float(skew(grey, axis=None)) < 0.0


def blend_window(height: int, width: int, overlap: int) -> np.ndarray:
    """``(height, width)`` float32 weights: 1 in the middle, a raised-cosine ramp over ``overlap``
    pixels at each edge, strictly positive everywhere (the outermost pixel gets ~1/overlap^2)."""
    return np.outer(_ramp(height, overlap), _ramp(width, overlap)).astype(np.float32)


def _ramp(n: int, overlap: int) -> np.ndarray:
    r = np.ones(n, dtype=np.float64)
    k = min(int(overlap), n // 2)
    if k > 0:
        up = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
        r[:k] = up
        r[n - k:] = np.minimum(r[n - k:], up[::-1])
    return r


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering ``[0, n)`` with at least ``overlap`` shared
    pixels; the last tile ends at ``n`` (``n >= tile``)."""
    if n <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((n - tile) / stride) + 1
    return sorted({round(i * (n - tile) / (count - 1)) for i in range(count)})


def tile_length(n: int, tile: int, overlap: int, divisor: int) -> int:
    """Tile side used along an axis of ``n`` pixels: the fewest tiles of at most ``tile`` that
    cover it with ``overlap``, shrunk to share the axis evenly (rounded up to ``divisor``), so
    a 1024-pixel axis with tile 256 takes 5 tiles of 240 rather than 5 of 256."""
    if n <= tile:
        return _round_up(n, divisor)
    count = math.ceil((n - overlap) / (tile - overlap))
    return min(tile, _round_up(math.ceil((n + (count - 1) * overlap) / count), divisor))


def _round_up(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


@torch.inference_mode()
def predict_tiled(
    model: torch.nn.Module,
    pixels: np.ndarray,
    tile: int = 256,
    overlap: int = 32,
    device: torch.device | str = "cpu",
    *,
    divisor: int = 32,
    batch_size: int = 4,
    tta: bool = False,
    polarity: str = "keep",
) -> np.ndarray:
    """Sigmoid probabilities of ``model`` over a whole image.

    ``model``: maps ``(B, 3, h, w)`` float to ``(B, C, h, w)`` logits; set to eval mode here.
    ``pixels``: ``(H, W, 3)`` uint8 of any size. ``tile``: largest tile side (a multiple
    of ``divisor``, the network's divisibility, 2**encoder_depth); tiles shrink to share each
    axis evenly (:func:`tile_length`), and images smaller than a tile are processed as one
    reflect-padded piece rounded up to ``divisor``. ``overlap``: pixels
    shared by neighbouring tiles (< tile / 2). ``tta``: every tile's output is the mean over
    its 8 flips / 90-degree rotations (each mapped back), 8x the compute. ``polarity``: see
    :func:`normalize_image`.

    Returns ``(C, H, W)`` float32 in [0, 1].
    """
    if tile <= 0 or tile % divisor:
        raise TilingError(f"tile must be a positive multiple of {divisor}, got {tile}")
    if not 0 <= overlap < tile // 2 + 1:
        raise TilingError(f"overlap must be in [0, tile/2] = [0, {tile // 2}], got {overlap}")
    image = normalize_image(pixels, polarity)
    _, h, w = image.shape
    th, tw = tile_length(h, tile, overlap, divisor), tile_length(w, tile, overlap, divisor)
    ph, pw = max(h, th), max(w, tw)
    if (ph, pw) != (h, w):
        image = _reflect_pad(image, ph, pw)
    window = torch.from_numpy(blend_window(th, tw, overlap)).to(device)
    boxes = [(y, x) for y in tile_starts(ph, th, overlap) for x in tile_starts(pw, tw, overlap)]
    model.eval()
    src = torch.from_numpy(image).to(device)
    acc: torch.Tensor | None = None
    weight = torch.zeros((ph, pw), device=device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([src[:, y:y + th, x:x + tw] for y, x in chunk]).contiguous(memory_format=torch.channels_last)
        prob = _dihedral_mean(model, batch) if tta else torch.sigmoid(model(batch).float())
        if acc is None:
            acc = torch.zeros((prob.shape[1], ph, pw), device=device)
        for (y, x), p in zip(chunk, prob):
            acc[:, y:y + th, x:x + tw] += p * window
            weight[y:y + th, x:x + tw] += window
    out = (acc / weight)[:, :h, :w]
    return out.cpu().numpy().astype(np.float32, copy=False)


def _dihedral_mean(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid output ``(B, C, h, w)`` over the 8 flips / rotations of ``batch``, each mapped back."""
    total = None
    for k in range(4):
        for flip in (False, True):
            view = torch.rot90(batch, k, dims=(2, 3))
            view = torch.flip(view, dims=(3,)) if flip else view
            out = torch.sigmoid(model(view.contiguous()).float())
            out = torch.flip(out, dims=(3,)) if flip else out
            out = torch.rot90(out, -k, dims=(2, 3))
            total = out if total is None else total + out
    return total / 8.0


def _reflect_pad(image: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Pad ``(C, H, W)`` at the bottom / right to ``(C, ph, pw)`` by reflection (any amount)."""
    _, h, w = image.shape
    rows = reflect_indices(0, ph, h)
    cols = reflect_indices(0, pw, w)
    return np.ascontiguousarray(image[:, rows][:, :, cols])

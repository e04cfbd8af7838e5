"""Generated cell-culture images with known truth, in the style of Cell Spotting.

Pure module (numpy, scipy, pandas; no torch, no database).

The real Cell Spotting frames are fluorescence over phase contrast: blue nuclei and green
mitochondria over a grey-green phase-contrast field. Alive HeLa cells are spread,
elongated and irregular (spindles and polygons with thin protrusions, a dim oval nucleus,
speckled mitochondria around it); dead or dying cells are small, round and bright (a
condensed bright nucleus, blotchy green, a dark phase ring with a bright halo, blebs).

* :func:`generate_layout` draws where the cells are and what they look like (no pixels);
  it is also the source of the ``generated`` truth in :mod:`cellspot.truth`.
* :func:`render_culture` paints a layout; :func:`generate_culture` does both.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed gives the
same image on every run. A 256x256 image takes about 20-30 ms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

logger = logging.getLogger(__name__)

LAYOUT_COLUMNS = ["x", "y", "label", "diameter", "angle", "aspect", "n_spikes"]
CELL_COLUMNS = ["x", "y", "label", "diameter"]

_BACKGROUND = np.array([0.302, 0.341, 0.306])   # grey-green phase field, (77, 87, 78) / 255
_GREEN = np.array([0.06, 0.45, 0.06])
_BLUE_ALIVE = np.array([0.22, 0.28, 0.75])
_BLUE_DEAD = np.array([0.25, 0.40, 0.95])


@dataclass(frozen=True)
class SynthImage:
    """A generated image and its truth.

    ``image``: uint8 array of shape (H, W, 3). ``cells``: one row per cell with columns
    ``x``, ``y`` (float, pixel centre, x = column), ``label`` (``alive`` | ``dead``) and
    ``diameter`` (float, equivalent diameter of the cell body in pixels).
    """

    image: np.ndarray
    cells: pd.DataFrame


def _place(rng: np.random.Generator, width: int, height: int, radii: np.ndarray,
           tries: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Dart-throwing Poisson-disc placement of discs with ``radii`` (N,).

    Returns centres (K, 2) with ``|ci - cj| >= ri + rj`` and the indices (K,) of the
    placed discs, in placement order.

    Cells that find no free spot after ``tries`` candidates are dropped (K <= len(radii)).
    Centres may sit close to the border (down to 0.15 r from it), like real cut-off cells.
    """
    placed = np.empty((0, 2))
    placed_r = np.empty(0)
    keep = []
    for i, r in enumerate(radii):
        m = 0.15 * r
        cand = np.column_stack([rng.uniform(m, width - m, tries), rng.uniform(m, height - m, tries)])
        if len(placed):
            d = np.hypot(cand[:, None, 0] - placed[None, :, 0], cand[:, None, 1] - placed[None, :, 1])
            ok = np.all(d >= placed_r[None, :] + r, axis=1)
            if not ok.any():
                continue
            cand = cand[np.argmax(ok)][None]
        placed = np.vstack([placed, cand[:1]])
        placed_r = np.append(placed_r, r)
        keep.append(i)
    if len(keep) < len(radii):
        logger.debug("placed %d of %d cells (no room for the rest)", len(keep), len(radii))
    return placed, np.asarray(keep, dtype=np.int64)


def generate_layout(rng: np.random.Generator, width: int = 256, height: int = 256,
                    n_cells: int | None = None, dead_fraction: float = 0.35,
                    diameter_scale: float = 30.0) -> pd.DataFrame:
    """Draw a non-overlapping cell layout (no pixels).

    ``diameter_scale`` is the typical equivalent diameter of an alive cell in pixels; dead
    cells are 0.6-0.8 of it. ``n_cells=None`` draws a count that fits the area (about
    12 cells at 256x256 with the default scale). Returns one row per cell with columns
    :data:`LAYOUT_COLUMNS`: ``x``, ``y``, ``label``, ``diameter`` (equivalent diameter,
    px), ``angle`` (rad), ``aspect`` (long / short axis) and ``n_spikes`` (protrusions).
    Fewer than ``n_cells`` rows come back when they do not fit.
    """
    if width < 8 or height < 8:
        raise ValueError(f"image must be at least 8x8 pixels, got {width}x{height}")
    if not 0.0 <= dead_fraction <= 1.0:
        raise ValueError(f"dead_fraction must be in [0, 1], got {dead_fraction}")
    if diameter_scale <= 0:
        raise ValueError(f"diameter_scale must be positive, got {diameter_scale}")
    if n_cells is None:
        expected = width * height / (2.5 * diameter_scale) ** 2
        n_cells = int(rng.integers(max(1, round(0.5 * expected)), max(2, round(1.3 * expected)) + 1))
    if n_cells < 0:
        raise ValueError(f"n_cells must be >= 0, got {n_cells}")
    dead = rng.random(n_cells) < dead_fraction
    diameter = np.where(dead, diameter_scale * rng.uniform(0.6, 0.8, n_cells),
                        diameter_scale * rng.lognormal(0.0, 0.15, n_cells))
    aspect = np.where(dead, rng.uniform(1.0, 1.15, n_cells), np.clip(rng.lognormal(0.85, 0.3, n_cells), 1.3, 4.5))
    # Spacing radius: half the long axis for dead cells, a bit less for alive ones so
    # that their tips may touch a neighbour, as in real cultures.
    reach = 0.5 * diameter * np.sqrt(aspect) * np.where(dead, 1.25, 0.8)
    order = np.argsort(-reach, kind="stable")          # big cells first pack better
    centres, kept = _place(rng, width, height, reach[order])
    idx = np.sort(order[kept])
    pos = np.empty((n_cells, 2))
    pos[order[kept]] = centres
    return pd.DataFrame({
        "x": pos[idx, 0],
        "y": pos[idx, 1],
        "label": np.where(dead[idx], "dead", "alive").astype(object),
        "diameter": diameter[idx],
        "angle": rng.uniform(0.0, np.pi, n_cells)[idx],
        "aspect": aspect[idx],
        "n_spikes": np.where(dead, 0, rng.integers(0, 4, n_cells))[idx],
    }, columns=LAYOUT_COLUMNS)


def _box(cx: float, cy: float, reach: float, width: int, height: int):
    """Pixel window around a centre, clipped to the image: (slice_y, slice_x, yy, xx)."""
    x0, x1 = max(0, int(cx - reach)), min(width, int(cx + reach) + 2)
    y0, y1 = max(0, int(cy - reach)), min(height, int(cy + reach) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return slice(y0, y1), slice(x0, x1), yy - cy, xx - cx


_N_ANGLES = 256


def _angle_index(theta: np.ndarray) -> np.ndarray:
    """Index into a table of :data:`_N_ANGLES` angles over [-pi, pi)."""
    return ((theta + np.pi) * (_N_ANGLES / (2 * np.pi))).astype(np.intp) % _N_ANGLES


def _alive_radius_table(a: float, b: float, rng: np.random.Generator) -> np.ndarray:
    """Radius of a spread cell per angle (cell frame), shape (_N_ANGLES,): pointed ellipse with wobble."""
    theta = np.linspace(-np.pi, np.pi, _N_ANGLES, endpoint=False)
    c, s = np.cos(theta), np.sin(theta)
    r = a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
    r = r * (1.0 + 0.3 * np.abs(c) ** 16)                      # pointed tips along the long axis
    for k in (2, 3, 5):
        r = r * (1.0 + rng.uniform(0.0, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)))
    return r.astype(np.float32)


def _paint_tail(layer: np.ndarray, row, a: float, b: float, rng: np.random.Generator) -> None:
    """Draw a tapered protrusion leaving the cell near one of its tips into ``layer`` (H, W)."""
    height, width = layer.shape
    ang = rng.normal(0.0, 0.35) + rng.choice([0.0, np.pi])      # cell frame, near a tip
    phi = row.angle + ang                                        # image frame
    x0, y0 = row.x + 0.75 * a * np.cos(phi), row.y + 0.75 * a * np.sin(phi)
    length, w0 = a * rng.uniform(0.7, 1.8), b * rng.uniform(0.4, 0.75)
    x1, y1 = x0 + length * np.cos(phi), y0 + length * np.sin(phi)
    pad = w0 + 2
    xa, xb = max(0, int(min(x0, x1) - pad)), min(width, int(max(x0, x1) + pad) + 1)
    ya, yb = max(0, int(min(y0, y1) - pad)), min(height, int(max(y0, y1) + pad) + 1)
    if xa >= xb or ya >= yb:
        return
    yy, xx = np.mgrid[ya:yb, xa:xb].astype(np.float32)
    du, dv = xx - x0, yy - y0
    t = du * np.cos(phi) + dv * np.sin(phi)
    p = np.abs(dv * np.cos(phi) - du * np.sin(phi))
    half = w0 * np.clip(1.0 - t / length, 0.0, 1.0) + 0.6
    mask = np.clip(half - p, 0.0, 1.0) * ((t > -w0) & (t < length))
    np.maximum(layer[ya:yb, xa:xb], mask, out=layer[ya:yb, xa:xb])


def _disc(u: np.ndarray, v: np.ndarray, cu: float, cv: float, r: float) -> np.ndarray:
    """Soft disc of radius ``r`` centred at (cu, cv) in the cell frame."""
    return np.clip(r - np.hypot(u - cu, v - cv) + 0.5, 0.0, 1.0)


def _paint_cell(row, rng: np.random.Generator, layers: dict[str, np.ndarray]) -> None:
    """Add one cell to the body / nucleus / mitochondria layers (in place)."""
    height, width = layers["body"].shape
    dead = row.label == "dead"
    d, aspect = float(row.diameter), float(row.aspect)
    a, b = 0.5 * d * np.sqrt(aspect), 0.5 * d / np.sqrt(aspect)
    reach = a * (1.5 if dead else 1.4) + 3
    sy, sx, dy, dx = _box(row.x, row.y, reach, width, height)
    if dy.size == 0:
        return
    ca, sa = np.float32(np.cos(row.angle)), np.float32(np.sin(row.angle))
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca              # cell frame: u along long axis
    rho = np.hypot(u, v)
    if dead:
        body = _disc(u, v, 0.0, 0.0, a)
        for ang in rng.uniform(0, 2 * np.pi, int(rng.integers(1, 6))):   # blebs on the rim
            body = np.maximum(body, _disc(u, v, a * np.cos(ang), a * np.sin(ang), a * rng.uniform(0.15, 0.32)))
        off = rng.normal(0.0, 0.25 * a, 2)
        if rng.random() < 0.35:                                   # fragmented (apoptotic) nucleus
            nuc = np.zeros_like(body)
            for cu, cv in rng.normal(0.0, 0.35 * a, (int(rng.integers(2, 5)), 2)):
                nuc = np.maximum(nuc, _disc(u, v, cu, cv, a * rng.uniform(0.15, 0.3)))
        else:
            nuc = _disc(u, v, off[0], off[1], a * rng.uniform(0.4, 0.65))
        mito_w = body * (1.0 - 0.7 * nuc)
        density, bright, grain = 0.3, 0.75, 2
    else:
        table = _alive_radius_table(a, b, rng)
        body = np.clip(table[_angle_index(np.arctan2(v, u))] - rho + 0.5, 0.0, 1.0)
        nb = min(b * rng.uniform(0.7, 0.92), 0.4 * a + 2)
        na = nb * rng.uniform(1.15, 1.6)
        off = rng.uniform(-0.3, 0.3) * a
        nuc = np.clip(4.0 * (1.0 - np.sqrt(((u - off) / na) ** 2 + (v / nb) ** 2)), 0.0, 1.0)
        # mitochondria crowd on one side of the nucleus and thin out towards the tips
        side = rng.choice([-1.0, 1.0]) * na * 0.9
        perinuclear = np.exp(-(((u - off - side) / (1.8 * na)) ** 2 + (v / (1.5 * nb)) ** 2))
        mito_w = body * (0.15 + 0.85 * perinuclear) * (1.0 - 0.75 * nuc)
        density, bright, grain = rng.uniform(0.35, 0.7), rng.uniform(0.5, 1.0), 1
    speck = (rng.random(body.shape, dtype=np.float32) < density * 0.4).astype(np.float32)
    if grain > 1:                                               # blotchy: clumps, not grains
        speck = ndimage.maximum_filter(speck, size=grain)
    key_b, key_n = ("body_dead", "nuc_dead") if dead else ("body", "nuc")
    np.maximum(layers[key_b][sy, sx], body, out=layers[key_b][sy, sx])
    np.maximum(layers[key_n][sy, sx], nuc, out=layers[key_n][sy, sx])
    layers["mito"][sy, sx] += bright * speck * mito_w
    for _ in range(int(getattr(row, "n_spikes", 0))):
        _paint_tail(layers[key_b], row, a, b, rng)


def _illumination(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth uneven illumination, shape (height, width), around 1 (a few percent)."""
    gx = np.interp(np.arange(width), np.linspace(0, width, 4), rng.normal(0.0, 0.025, 4))
    gy = np.interp(np.arange(height), np.linspace(0, height, 4), rng.normal(0.0, 0.025, 4))
    return (1.0 + gy[:, None] + gx[None, :]).astype(np.float32)


def _blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(plane, sigma, truncate=3.0)


def render_culture(rng: np.random.Generator, layout: pd.DataFrame, width: int, height: int) -> np.ndarray:
    """Paint ``layout`` (from :func:`generate_layout`) as a uint8 RGB array (height, width, 3)."""
    shape = (height, width)
    layers = {k: np.zeros(shape, np.float32) for k in ("body", "body_dead", "nuc", "nuc_dead", "mito")}
    for row in layout.itertuples(index=False):
        _paint_cell(row, rng, layers)
    body, dead = layers["body"], layers["body_dead"]
    # phase contrast: spread cells a little brighter with a bright rim just outside;
    # rounded dead cells get a thick dark ring inside their edge and a bright halo outside
    edge = _blur(body, 1.0) - body
    ring = _blur(dead, 1.5) - dead
    phase = (0.07 * body + 0.12 * dead + 0.9 * np.maximum(edge, 0.0) - 0.4 * np.maximum(-edge, 0.0)
             + 1.6 * np.maximum(ring, 0.0) - 4.5 * np.maximum(-ring, 0.0))
    for _ in range(int(rng.integers(2, 6))):                     # out-of-focus dust specks
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sy, sx, dy, dx = _box(cx, cy, 5, width, height)
        phase[sy, sx] -= 0.07 * np.exp(-(dx ** 2 + dy ** 2) / 5.0)
    lum = _illumination(rng, width, height) * (1.0 + phase)
    mito = np.clip(_blur(layers["mito"], 0.6) * 1.6, 0.0, 1.2)
    nuc, nuc_dead = layers["nuc"], layers["nuc_dead"]
    keep = (1.0 - 0.3 * nuc) * (1.0 - 0.65 * nuc_dead)
    rgb = np.empty((height, width, 3), np.float32)
    for ch in range(3):
        plane = (_BACKGROUND[ch] * lum + _GREEN[ch] * mito) * keep
        plane += (0.3 * _BLUE_ALIVE[ch]) * nuc * (1.0 - 0.65 * nuc_dead) + (0.65 * _BLUE_DEAD[ch]) * nuc_dead
        rgb[..., ch] = plane
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(0.01)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def generate_culture(rng: np.random.Generator, width: int = 256, height: int = 256,
                     n_cells: int | None = None, dead_fraction: float = 0.35,
                     diameter_scale: float = 30.0) -> SynthImage:
    """Generate one cell-culture image and its truth (see :class:`SynthImage`).

    ``n_cells=None`` draws a count that fits the area; ``dead_fraction`` is the expected
    share of dead cells; ``diameter_scale`` is the typical alive-cell equivalent diameter
    in pixels. Deterministic given ``rng``.
    """
    layout = generate_layout(rng, width, height, n_cells, dead_fraction, diameter_scale)
    image = render_culture(rng, layout, width, height)
    return SynthImage(image=image, cells=layout[CELL_COLUMNS].reset_index(drop=True))

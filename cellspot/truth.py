"""Ground-truth cell sets for benchmarks and tests, read from ``../shared/data``.

Pure module (numpy, pandas, PIL, tifffile; no torch, no database).

Every loader returns a :class:`TruthSet` with two tables:

* ``cells``: one row per true cell, columns ``image`` (str), ``x``, ``y`` (float, pixel
  coordinates of the cell centre, x = column, y = row), ``label`` (``alive`` | ``dead``)
  and ``diameter`` (float, pixels);
* ``images``: one row per image (images without cells included), columns ``image``,
  ``width``, ``height`` (int, pixels) and ``path`` (str, absolute path of the pixels;
  empty for generated truth).

Only the LDC set has real alive/dead labels. BCCD, DSB2018 and stardist have real
positions but **synthetic labels**: each cell is called dead with probability 0.35, drawn
from a generator seeded by a hash of the image name (:func:`synthetic_labels`), so the
labels are deterministic across runs and machines. ``TruthSet.synthetic_labels`` says
which case applies.

The registry :data:`TRUTH_SOURCES` maps a name to a loader; :func:`load_truth` is the one
entry point. ``root`` may be the shared data folder or the dataset's own folder.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

CELL_COLUMNS = ["image", "x", "y", "label", "diameter"]
IMAGE_COLUMNS = ["image", "width", "height", "path"]
SYNTHETIC_DEAD_FRACTION = 0.35


class UnknownTruthSourceError(ValueError):
    """Raised for a truth source name that is not in :data:`TRUTH_SOURCES`."""


class TruthDataError(FileNotFoundError):
    """Raised when a dataset folder or one of its files is missing or malformed."""


@dataclass(frozen=True)
class TruthSet:
    """A set of images with their true cells (see the module docstring for the columns)."""

    name: str
    cells: pd.DataFrame
    images: pd.DataFrame
    synthetic_labels: bool = False

    def __post_init__(self) -> None:
        for table, cols in ((self.cells, CELL_COLUMNS), (self.images, IMAGE_COLUMNS)):
            missing = [c for c in cols if c not in table.columns]
            if missing:
                raise TruthDataError(f"truth set {self.name!r}: table lacks columns {missing}")


def _stable_seed(text: str, salt: str = "cellspot-truth") -> int:
    """A 64-bit seed from ``text`` that is the same on every machine and Python run."""
    digest = hashlib.sha256(f"{salt}\x1f{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def synthetic_labels(images: pd.Series | np.ndarray, dead_fraction: float = SYNTHETIC_DEAD_FRACTION
                     ) -> np.ndarray:
    """Deterministic random alive/dead labels for cells that have no label truth.

    ``images``: shape (N,), the image name of each cell. Cells of one image draw, in their
    order, from a generator seeded by a hash of that image name. Returns shape (N,) object
    array of ``"alive"`` / ``"dead"``; about ``dead_fraction`` of them are dead.
    """
    if not 0.0 <= dead_fraction <= 1.0:
        raise ValueError(f"dead_fraction must be in [0, 1], got {dead_fraction}")
    names = np.asarray(images, dtype=object)
    out = np.empty(len(names), dtype=object)
    if len(names) == 0:
        return out
    codes, uniques = pd.factorize(names)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(uniques) + 1))
    u = np.empty(len(names))
    for k, name in enumerate(uniques):
        idx = order[bounds[k]:bounds[k + 1]]
        u[idx] = np.random.default_rng(_stable_seed(str(name))).random(len(idx))
    out[:] = np.where(u < dead_fraction, "dead", "alive")
    return out


def _dataset_dir(root: str | Path, folder: str, marker: str) -> Path:
    """``root/folder`` when it exists, else ``root`` itself if it holds ``marker``."""
    root = Path(root)
    for candidate in (root / folder, root):
        if (candidate / marker).exists():
            return candidate.resolve()
    raise TruthDataError(
        f"cannot find {folder}/{marker} under {root}; pass the shared data folder "
        f"(e.g. ../shared/data) or the {folder} folder itself"
    )


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    table = pd.read_csv(path)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TruthDataError(f"{path}: missing columns {missing}; has {list(table.columns)}")
    return table


def _cells_frame(image, x, y, label, diameter) -> pd.DataFrame:
    return pd.DataFrame({
        "image": np.asarray(image, dtype=object),
        "x": np.asarray(x, dtype=np.float64),
        "y": np.asarray(y, dtype=np.float64),
        "label": np.asarray(label, dtype=object),
        "diameter": np.asarray(diameter, dtype=np.float64),
    }, columns=CELL_COLUMNS)


def _images_frame(image, width, height, path) -> pd.DataFrame:
    return pd.DataFrame({
        "image": np.asarray(image, dtype=object),
        "width": np.asarray(width, dtype=np.int64),
        "height": np.asarray(height, dtype=np.int64),
        "path": np.asarray(path, dtype=object),
    }, columns=IMAGE_COLUMNS)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:  # reads the header only
        return im.size


def load_ldc(root: str | Path) -> TruthSet:
    """LDC living/dead cells (real alive/dead labels): 417 images, 1,174 alive + 253 dead.

    Diameter = mean of the box width and height.
    """
    base = _dataset_dir(root, "ldc_living_dead_cells", "annotations.csv")
    ann = _read_csv(base / "annotations.csv", ["image", "x", "y", "label", "xmin", "ymin", "xmax", "ymax"])
    man = _read_csv(base / "manifest.csv", ["image", "width", "height"])
    bad = ~ann["label"].isin(["alive", "dead"])
    if bad.any():
        raise TruthDataError(f"{base / 'annotations.csv'}: labels must be alive|dead, "
                             f"found {sorted(ann.loc[bad, 'label'].astype(str).unique())}")
    diameter = 0.5 * ((ann["xmax"] - ann["xmin"]) + (ann["ymax"] - ann["ymin"]))
    cells = _cells_frame(ann["image"], ann["x"], ann["y"], ann["label"], diameter)
    images = _images_frame(man["image"], man["width"], man["height"],
                           [str(base / "images" / n) for n in man["image"]])
    return TruthSet("ldc", cells, images, synthetic_labels=False)


def load_bccd(root: str | Path) -> TruthSet:
    """BCCD blood cells (RBC, WBC, platelets as cells): 182 images, 2,460 boxes.

    Zero-size boxes are skipped (one in this half: 2,459 cells). Labels are synthetic
    (:func:`synthetic_labels`). Diameter = mean of the box width and height.
    """
    base = _dataset_dir(root, "bccd_blood_cells", "annotations.csv")
    ann = _read_csv(base / "annotations.csv", ["image", "x", "y", "xmin", "ymin", "xmax", "ymax"])
    w = ann["xmax"] - ann["xmin"]
    h = ann["ymax"] - ann["ymin"]
    keep = (w > 0) & (h > 0)
    if (~keep).any():
        logger.info("bccd: skipped %d zero-size box(es)", int((~keep).sum()))
    ann = ann[keep].reset_index(drop=True)
    cells = _cells_frame(ann["image"], ann["x"], ann["y"], synthetic_labels(ann["image"]),
                         0.5 * (w[keep].to_numpy() + h[keep].to_numpy()))
    paths = sorted((base / "images").glob("*.jpg"))
    if not paths:
        raise TruthDataError(f"no images/*.jpg under {base}")
    sizes = [_image_size(p) for p in paths]
    images = _images_frame([p.name for p in paths], [s[0] for s in sizes], [s[1] for s in sizes],
                           [str(p) for p in paths])
    return TruthSet("bccd", cells, images, synthetic_labels=True)


def instance_centroids(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Instances of a label image ``mask`` (H, W), 0 = background.

    Returns ``(labels, x, y, diameter)``, each of shape (K,) for the K labels present:
    the centroid (x = column, y = row; the same as ``skimage.measure.regionprops``) and
    the equivalent circular diameter ``sqrt(4 * area / pi)``. One pass of ``bincount``,
    much faster than regionprops on large masks.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"instance mask must be 2-D, got shape {m.shape}")
    rows, cols = np.nonzero(m)
    lab = m[rows, cols].astype(np.int64)
    if lab.size and lab.min() < 0:
        raise ValueError("instance mask has negative labels")
    area = np.bincount(lab)
    labels = np.flatnonzero(area)
    sx = np.bincount(lab, weights=cols)[labels]
    sy = np.bincount(lab, weights=rows)[labels]
    a = area[labels].astype(np.float64)
    return labels, sx / a, sy / a, np.sqrt(4.0 * a / np.pi)


def _instances_to_cells(mask: np.ndarray, image: str) -> pd.DataFrame:
    """Cells (labels left empty) of the instances of a label mask (H, W)."""
    _, xs, ys, diam = instance_centroids(mask)
    names = np.full(len(xs), image, dtype=object)
    return _cells_frame(names, xs, ys, np.empty(len(xs), dtype=object), diam)


def load_dsb2018(root: str | Path) -> TruthSet:
    """DSB2018 nuclei subset: 56 instance masks, 3,001 nuclei; labels are synthetic.

    Centre = instance centroid, diameter = equivalent circular diameter of its area
    (:func:`instance_centroids`). Image names are the ``images/<id>.png`` file names.
    """
    from PIL import Image

    base = _dataset_dir(root, "dsb2018_nuclei_subset", "manifest.csv")
    man = _read_csv(base / "manifest.csv", ["image", "mask", "width", "height"])
    frames = []
    for rel_img, rel_mask in zip(man["image"], man["mask"]):
        mask_path = base / rel_mask
        try:
            with Image.open(mask_path) as im:
                mask = np.array(im)
        except (OSError, ValueError) as exc:
            raise TruthDataError(f"cannot read mask {mask_path}: {exc}") from exc
        frames.append(_instances_to_cells(mask, Path(rel_img).name))
    cells = pd.concat(frames, ignore_index=True) if frames else _cells_frame([], [], [], [], [])
    cells["label"] = synthetic_labels(cells["image"])
    images = _images_frame([Path(p).name for p in man["image"]], man["width"], man["height"],
                           [str(base / p) for p in man["image"]])
    return TruthSet("dsb2018", cells, images, synthetic_labels=True)


def load_stardist(root: str | Path) -> TruthSet:
    """stardist ``img2d.tif`` with its instance mask ``mask2d.tif``: 125 nuclei, synthetic labels."""
    import tifffile

    base = _dataset_dir(root, "stardist_nuclei2d", "mask2d.tif")
    mask = tifffile.imread(base / "mask2d.tif")
    if mask.ndim != 2:
        raise TruthDataError(f"{base / 'mask2d.tif'}: expected a 2-D label image, got shape {mask.shape}")
    cells = _instances_to_cells(mask, "img2d.tif")
    cells["label"] = synthetic_labels(cells["image"])
    images = _images_frame(["img2d.tif"], [mask.shape[1]], [mask.shape[0]], [str(base / "img2d.tif")])
    return TruthSet("stardist", cells, images, synthetic_labels=True)


def load_generated(root: str | Path | None = None, n_images: int = 200, seed: int = 0,
                   width: int = 524, height: int = 391) -> TruthSet:
    """Generated truth (no pixels): layouts from :func:`cellspot.synth.generate_layout`.

    ``root`` is ignored (kept for the registry signature). Defaults give the Cell Spotting
    click frame (524x391) with cells of about 50 px (alive ~55, dead ~38); labels are the generator's own.
    """
    from cellspot.synth import generate_layout

    rng = np.random.default_rng(seed)
    names = [f"gen_{i:05d}" for i in range(n_images)]
    frames = []
    for name in names:
        layout = generate_layout(rng, width, height, diameter_scale=55.0)
        frames.append(_cells_frame(np.full(len(layout), name, dtype=object), layout["x"], layout["y"],
                                   layout["label"], layout["diameter"]))
    cells = pd.concat(frames, ignore_index=True)
    images = _images_frame(names, [width] * n_images, [height] * n_images, [""] * n_images)
    return TruthSet("generated", cells, images, synthetic_labels=False)


TRUTH_SOURCES: dict[str, Callable[[str | Path], TruthSet]] = {
    "ldc": load_ldc,
    "bccd": load_bccd,
    "dsb2018": load_dsb2018,
    "stardist": load_stardist,
    "generated": load_generated,
}


def load_truth(name: str, root: str | Path | None = None) -> TruthSet:
    """Load the truth set registered as ``name`` from ``root`` (the shared data folder)."""
    try:
        loader = TRUTH_SOURCES[name]
    except KeyError:
        raise UnknownTruthSourceError(
            f"unknown truth source {name!r}; valid names: {', '.join(sorted(TRUTH_SOURCES))}"
        ) from None
    if root is None and name != "generated":
        raise TruthDataError(f"truth source {name!r} needs root (the shared data folder)")
    truth = loader(root)
    logger.info("truth %s: %d images, %d cells", name, len(truth.images), len(truth.cells))
    return truth

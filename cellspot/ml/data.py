"""Training data for the models: annotated images with cells, from the store or a folder.

Every source ends up as a :class:`TrainingData`: images already normalised to ``uint8`` RGB
(:func:`cellspot.imaging.to_model_rgb8`, the one place that handles bit depth and
channels), their cells as a table, optional instance masks, and the image-level split
(:func:`cellspot.crops.stratified_image_split`, the same rule as the export).

Loaders:

* :func:`load_store`: a consensus snapshot (or the expert cells) of a project in the store;
* :func:`load_folder`: ``images/`` + an annotation CSV ``image,x,y,label`` (optional
  ``p_alive``, ``weight`` or ``confidence``, ``diameter``, box ``xmin,ymin,xmax,ymax``) and/or
  a folder of instance masks;
* :func:`load_crop_folder`: a folder of single-cell crops with a ``labels.csv`` (one cell at
  the centre of every crop), e.g. the NIH malaria crops.

:func:`estimate_diameter` gives the typical cell diameter of a data set.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cellspot.crops import DEFAULT_FRACTIONS, stratified_image_split, validate_fractions
from cellspot.imaging import (
    IMAGE_SUFFIXES,
    ImageReadError,
    claimed_format,
    header_size,
    read_image,
    to_model_rgb8,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from cellspot.settings import Settings
    from cellspot.store.models import ConsensusSnapshot, Project

log = logging.getLogger(__name__)

#: columns of :attr:`AnnotatedImage.cells`
CELL_COLUMNS = ["x", "y", "label", "p_alive", "weight", "diameter"]


class DataError(ValueError):
    """The training data cannot be loaded (missing file, bad column, image without pixels)."""


@dataclass
class AnnotatedImage:
    """One image and its cells.

    ``pixels``: ``(H, W, 3)`` ``uint8`` RGB. ``cells``: one row per cell with columns
    :data:`CELL_COLUMNS` (``x``, ``y`` in image pixels; ``label`` "alive" / "dead";
    ``p_alive`` in [0, 1], the soft target (0/1 for expert labels); ``weight`` >= 0, the
    sample weight (the consensus confidence; 1 for expert labels); ``diameter`` in pixels or
    NaN when unknown). ``mask``: ``(H, W)`` ``int32`` instance labels (0 = background) or
    ``None``. ``split``: "train", "val" or "test".
    """

    name: str
    pixels: np.ndarray
    cells: pd.DataFrame
    split: str
    mask: np.ndarray | None = None
    image_id: int | None = None


@dataclass
class TrainingData:
    """Annotated images plus where they came from.

    ``source``: JSON-able description, e.g. ``{"kind": "consensus", "project": "demo",
    "snapshot_id": 12}`` or ``{"kind": "folder", "images": "...", "annotations": "...",
    "annotations_sha256": "..."}``; :attr:`snapshot_id` is a short stable string for the
    model registry.
    """

    images: list[AnnotatedImage]
    source: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[AnnotatedImage]:
        """The images of one split ("train", "val", "test")."""
        return [im for im in self.images if im.split == name]

    def without_test(self) -> TrainingData:
        """The images a fit may look at (train and val), for estimates such as the cell size
        that must not see the test split; all images when every one is a test image."""
        seen = [im for im in self.images if im.split != "test"]
        return TrainingData(seen, self.source) if seen else self

    @property
    def snapshot_id(self) -> str:
        kind = self.source.get("kind", "unknown")
        if "snapshot_id" in self.source:
            return f"{kind}:{self.source['snapshot_id']}"
        if "annotations_sha256" in self.source:
            return f"{kind}:{str(self.source['annotations_sha256'])[:16]}"
        return str(kind)

    @property
    def has_masks(self) -> bool:
        return all_masked(self.images)

    def n_cells(self) -> int:
        return int(sum(len(im.cells) for im in self.images))


def all_masked(images: Sequence[AnnotatedImage]) -> bool:
    """True when there are images and every one has an instance mask."""
    return bool(images) and all(im.mask is not None for im in images)


# ---------------------------------------------------------------- constants

LABELS = ("alive", "dead")
#: label of cells found in an instance mask that has no CSV row: no alive/dead label, so
#: ``p_alive`` is NaN and ``weight`` 0 (the classifier leaves them out, the detector uses them)
UNLABELLED = "unknown"
#: diameter (pixels) that :func:`estimate_diameter` returns when the data say nothing
DEFAULT_DIAMETER = 20.0
#: optional numeric columns of an annotation CSV (besides the required ``x``, ``y``)
OPTIONAL_NUMERIC_COLUMNS = ("p_alive", "weight", "confidence", "xmin", "ymin", "xmax", "ymax", "diameter")
REQUIRED_COLUMNS = ("image", "x", "y", "label")
_BOX = ("xmin", "ymin", "xmax", "ymax")


# ---------------------------------------------------------------- small readers


def read_rgb8(path: Path, name: str | None = None) -> np.ndarray:
    """Pixels of an image file as ``(H, W, 3)`` ``uint8`` (any bit depth / channel count).

    Raises :class:`DataError` when the file cannot be read as an image.
    """
    try:
        loaded = read_image(path, name=name)
    except ImageReadError as exc:
        raise DataError(f"cannot read image {name + ' (' + str(path) + ')' if name else path}: {exc.reason}") from exc
    return to_model_rgb8(loaded.array, loaded.bit_depth)


def read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Instance mask file as ``(H, W)`` ``int32`` (0 = background); ``shape`` is the image's (H, W)."""
    try:
        array = read_image(path).array
    except ImageReadError as exc:
        raise DataError(f"cannot read mask {path}: {exc.reason}") from exc
    if array.ndim == 3:  # an RGB(A) mask written by a viewer: labels are in the first channel
        array = array[..., 0]
    if array.shape != tuple(shape):
        raise DataError(f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image is {shape[1]}x{shape[0]}")
    return array.astype(np.int32)


def cells_from_mask(mask: np.ndarray) -> pd.DataFrame:
    """One unlabelled cell per instance of ``mask`` ``(H, W)`` int: centre = centroid + 0.5
    (pixel ``i`` covers ``[i, i+1)``), diameter = equivalent-area diameter. Columns :data:`CELL_COLUMNS`."""
    from skimage.measure import regionprops_table

    props = regionprops_table(mask, properties=("centroid", "equivalent_diameter_area"))
    n = len(props["centroid-0"])
    return pd.DataFrame({
        "x": props["centroid-1"] + 0.5, "y": props["centroid-0"] + 0.5, "label": [UNLABELLED] * n,
        "p_alive": np.full(n, np.nan), "weight": np.zeros(n), "diameter": props["equivalent_diameter_area"],
    }, columns=CELL_COLUMNS)


def _diameters_from_mask(cells: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """Fill missing ``diameter`` values with the equivalent diameter of the instance under each cell."""
    todo = cells["diameter"].isna().to_numpy()
    if not todo.any() or mask.max() == 0:
        return cells
    h, w = mask.shape
    rows = np.clip(np.floor(cells["y"].to_numpy()).astype(int), 0, h - 1)
    cols = np.clip(np.floor(cells["x"].to_numpy()).astype(int), 0, w - 1)
    ids = mask[rows, cols]
    areas = np.bincount(mask.ravel())
    diam = np.where(ids > 0, np.sqrt(4.0 * areas[ids] / np.pi), np.nan)
    cells = cells.copy()
    cells.loc[todo, "diameter"] = diam[todo]
    return cells


# ---------------------------------------------------------------- annotation CSV


def _where(path: Path, line: int, column: str) -> str:
    return f"{path}, line {line}, column {column!r}"


#: how many problems of an annotation CSV one error lists (the rest are counted)
MAX_LISTED_PROBLEMS = 10


class _Problems:
    """The bad values of one annotation CSV, collected so that one error lists them all
    (file, line, column and what is wrong; the first :data:`MAX_LISTED_PROBLEMS` in line order)."""

    def __init__(self, path: Path) -> None:
        self.path, self.found = path, []

    def add(self, lines: pd.Series, bad: np.ndarray, column: str, what: Callable[[int], str]) -> None:
        """One problem per row ``i`` where ``bad[i]`` (at CSV line ``lines[i]``): ``what(i)`` says
        what is wrong."""
        for i in np.flatnonzero(np.asarray(bad, dtype=bool)):
            self.found.append((int(lines.iloc[i]), column, what(int(i))))

    def raise_any(self) -> None:
        if not self.found:
            return
        found = sorted(self.found, key=lambda p: p[0])
        (line, column, what), rest = found[0], found[1:MAX_LISTED_PROBLEMS]
        text = [f"{_where(self.path, line, column)}: {what}"]
        text += [f"line {ln}, column {col!r}: {w}" for ln, col, w in rest]
        if len(found) > MAX_LISTED_PROBLEMS:
            text.append(f"... and {len(found) - MAX_LISTED_PROBLEMS} more problem(s)")
        raise DataError("\n  ".join(text))


def _numbers(table: pd.DataFrame, column: str, problems: _Problems, *, required: bool) -> np.ndarray:
    """Column as float (empty -> NaN when not required); every bad value goes to ``problems``."""
    text = table[column].astype(str).str.strip()
    values = pd.to_numeric(text.where(text != ""), errors="coerce").to_numpy(float)
    bad = ((text != "") & np.isnan(values) | (required & (text == "")) | np.isinf(values)).to_numpy()
    problems.add(table["_line"], bad, column,
                 lambda i: "is empty" if text.iloc[i] == "" else f"{text.iloc[i]!r} is not a finite number")
    return values


def _check_range(values: np.ndarray, table: pd.DataFrame, column: str, problems: _Problems,
                 lo: float, hi: float) -> None:
    bad = np.isfinite(values) & ((values < lo) | (values > hi))
    problems.add(table["_line"], bad, column, lambda i: f"{values[i]:g} is outside [{lo:g}, {hi:g}]")


def read_annotations(path: Path | str) -> pd.DataFrame:
    """Read and check an annotation CSV: ``image,x,y,label`` plus optional columns.

    Optional: ``p_alive`` in [0, 1] (default 1 for alive, 0 for dead), ``weight`` or
    ``confidence`` >= 0 (sample weight, default 1), ``diameter`` (pixels), a box
    ``xmin,ymin,xmax,ymax`` (diameter = mean of box width and height when no ``diameter``).
    ``label`` is ``alive`` or ``dead`` (case and surrounding spaces ignored).
    Returns columns ``image`` + :data:`CELL_COLUMNS` + ``line`` (the CSV line, header = 1;
    rows are assumed not to span lines). Raises :class:`DataError` naming the file, and the
    line and column of every bad value (the first :data:`MAX_LISTED_PROBLEMS`).
    """
    table, problems = _read_annotations(Path(path))
    problems.raise_any()
    return table


def _read_annotations(path: Path) -> tuple[pd.DataFrame, _Problems]:
    """:func:`read_annotations` without raising for bad values: the table and its problems."""
    try:
        # blank lines are kept as rows so that row k is line k + 2 of the file, then dropped
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except FileNotFoundError:
        raise DataError(f"annotation file {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV file: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(
            f"{path}, line 1 (header): missing column(s) {missing}; required: {','.join(REQUIRED_COLUMNS)}; "
            f"optional: {','.join(OPTIONAL_NUMERIC_COLUMNS)}; found: {list(table.columns)}"
        )
    problems = _Problems(path)
    table["_line"] = np.arange(len(table)) + 2
    table = table[(table.drop(columns="_line") != "").any(axis=1)].reset_index(drop=True)
    names = table["image"].astype(str).str.strip()
    problems.add(table["_line"], (names == "").to_numpy(), "image", lambda i: "the image name is empty")
    labels = table["label"].astype(str).str.strip().str.lower()
    problems.add(table["_line"], (~labels.isin(LABELS)).to_numpy(), "label",
                 lambda i: f"{table['label'].iloc[i]!r} is not a label; allowed: {', '.join(LABELS)}")
    num = {c: _numbers(table, c, problems, required=c in ("x", "y")) for c in ("x", "y")}
    for c in ("x", "y"):
        problems.add(table["_line"], np.isfinite(num[c]) & (num[c] < 0), c,
                     lambda i, c=c: f"{num[c][i]:g} is negative (pixel positions start at 0)")
    for c in OPTIONAL_NUMERIC_COLUMNS:
        if c in table.columns:
            num[c] = _numbers(table, c, problems, required=False)
    default_p = np.where(labels == "alive", 1.0, 0.0)
    p_alive = np.where(np.isnan(num["p_alive"]), default_p, num["p_alive"]) if "p_alive" in num else default_p
    _check_range(p_alive, table, "p_alive", problems, 0.0, 1.0)
    weight = np.ones(len(table))
    for c in ("confidence", "weight"):  # ``weight`` wins when both are given
        if c in num:
            _check_range(num[c], table, c, problems, 0.0, math.inf)
            weight = np.where(np.isnan(num[c]), weight, num[c])
    diameter = num.get("diameter", np.full(len(table), np.nan))
    _check_range(diameter, table, "diameter", problems, 0.0, math.inf)
    if all(c in num for c in _BOX):
        for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
            _check_range(num[hi] - num[lo], table, hi, problems, 0.0, math.inf)
        box = 0.5 * ((num["xmax"] - num["xmin"]) + (num["ymax"] - num["ymin"]))
        diameter = np.where(np.isnan(diameter), box, diameter)
    out = pd.DataFrame({
        "image": names, "x": num["x"], "y": num["y"], "label": labels, "p_alive": p_alive,
        "weight": weight, "diameter": diameter, "line": table["_line"],
    })
    return out, problems


# ---------------------------------------------------------------- splits


def _label_counts(cells: pd.DataFrame) -> tuple[int, int]:
    labels = cells["label"].to_numpy()
    return int(np.sum(labels == "alive")), int(np.sum(labels == "dead"))


def assign_splits(
    images: list[AnnotatedImage],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    groups: Sequence[str] | None = None,
) -> None:
    """Set ``split`` of every image in place with :func:`cellspot.crops.stratified_image_split`.

    ``groups``: optional group name per image (e.g. the patient); a group goes to one split.
    """
    keys = [im.name for im in images] if groups is None else [str(g) for g in groups]
    counts: dict[str, list[int]] = {}
    for key, im in zip(keys, images):
        alive, dead = _label_counts(im.cells)
        total = counts.setdefault(key, [0, 0])
        total[0] += alive
        total[1] += dead
    table = pd.DataFrame([(k, a, d) for k, (a, d) in counts.items()], columns=["image", "n_alive", "n_dead"])
    assignment = stratified_image_split(table, fractions, seed=seed)
    for key, im in zip(keys, images):
        im.split = assignment[key]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- folder


def _find_mask(masks_dir: Path, image_name: str) -> Path | None:
    """The mask of ``image_name``: same relative path, else same stem with a PNG/TIFF ending."""
    same = masks_dir / image_name
    if same.is_file():
        return same
    stem = Path(image_name).with_suffix("")
    for suffix in (".png", ".tif", ".tiff"):
        candidate = masks_dir / stem.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def _image_for_mask(images_dir: Path, mask: Path, masks_dir: Path) -> str | None:
    rel = mask.relative_to(masks_dir)
    for suffix in (rel.suffix, *IMAGE_SUFFIXES):
        candidate = rel.with_suffix(suffix)
        if (images_dir / candidate).is_file():
            return candidate.as_posix()
    return None


def _mask_files(masks_dir: Path) -> list[Path]:
    """The mask files under ``masks_dir`` (PNG / TIFF, any depth), sorted."""
    return sorted(p for p in masks_dir.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff"))


def _check_mask_sizes(images_dir: Path, masks_dir: Path) -> None:
    """Every mask that has an image must have its size (from the file headers, no pixels
    decoded); :class:`DataError` listing each mask that does not, or that is no image file."""
    wrong = []
    for mask in _mask_files(masks_dir):
        name = _image_for_mask(images_dir, mask, masks_dir)
        if name is None:
            continue  # skipped with a warning by load_folder
        mask_size, image_size = header_size(mask), header_size(images_dir / name)
        if mask_size is None:
            wrong.append(f"mask {mask} is not a PNG or TIFF image")
        elif image_size is not None and mask_size != image_size:
            wrong.append(f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {name} is "
                         f"{image_size[0]}x{image_size[1]}")
    if wrong:
        raise DataError(f"{len(wrong)} mask(s) do not fit their images:\n" + "\n".join(wrong))


def check_folder(images_dir: Path | str, annotations_csv: Path | str | None,
                 masks_dir: Path | str | None = None) -> pd.DataFrame | None:
    """The checks of :func:`load_folder` that need no pixels: the folders exist, the CSV reads
    (:func:`read_annotations`), every image it names is a file and every position lies inside
    its image (sizes from the file headers), and every mask has its image's size. Returns the CSV's table
    (None without a CSV); raises :class:`DataError` naming the file, line and column."""
    images_dir = Path(images_dir)
    if annotations_csv is None and masks_dir is None:
        raise DataError("a training folder needs an annotations CSV, a masks folder, or both")
    if not images_dir.is_dir():
        raise DataError(f"images folder {images_dir} does not exist")
    if masks_dir is not None and not Path(masks_dir).is_dir():
        raise DataError(f"masks folder {masks_dir} does not exist")
    if masks_dir is not None:
        _check_mask_sizes(images_dir, Path(masks_dir))
    if annotations_csv is None:
        return None
    table, problems = _read_annotations(Path(annotations_csv))
    first = (~table["image"].duplicated() & (table["image"] != "")).to_numpy()  # each image at its first line
    missing = first.copy()
    missing[first] = [not (images_dir / name).is_file() for name in table["image"][first]]
    problems.add(table["line"], missing, "image",
                 lambda i: f"image file {images_dir / table['image'].iloc[i]} does not exist")
    present = first & ~missing
    not_image = present.copy()
    not_image[present] = [claimed_format(images_dir / name) is None for name in table["image"][present]]
    problems.add(table["line"], not_image, "image",
                 lambda i: f"{images_dir / table['image'].iloc[i]} is not a PNG, JPEG or TIFF image")
    # every position against its image's size, read from the file headers (no pixels decoded)
    sizes = {name: header_size(images_dir / name) for name in table["image"][present & ~not_image]}
    for column, axis in (("x", 0), ("y", 1)):
        limit = table["image"].map(lambda n: (sizes.get(n) or (np.inf, np.inf))[axis]).to_numpy(float)
        values = table[column].to_numpy(float)

        def outside(i: int, column: str = column, limit: np.ndarray = limit, values: np.ndarray = values) -> str:
            name = table["image"].iloc[i]
            width, height = sizes[name]
            return (f"{values[i]:g} is outside image {name} ({width} x {height} pixels; "
                    f"{column} must be within [0, {limit[i]:g}])")

        problems.add(table["line"], values > limit, column, outside)
    problems.raise_any()
    if table.empty and masks_dir is None:
        raise DataError(f"{annotations_csv} has a header but no annotation rows: nothing to train on")
    return table


def load_folder(
    images_dir: Path | str,
    annotations_csv: Path | str | None,
    masks_dir: Path | str | None = None,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> TrainingData:
    """Training data from a plain folder.

    ``annotations_csv``: see :func:`read_annotations`; ``image`` is the file name relative
    to ``images_dir``. ``masks_dir``: optional instance masks (``(H, W)`` integer images,
    0 = background) named like their image (same relative path, or same stem with
    ``.png``/``.tif``). With masks, images that have a mask but no CSV row are loaded too,
    their cells taken from the mask (label :data:`UNLABELLED`); ``annotations_csv`` may then
    be ``None``. Cells without a diameter get the diameter of the mask instance under them.
    Images listed nowhere are not loaded. The split is by image
    (:func:`assign_splits`, stratified by dead fraction, ``fractions`` train/val/test, ``seed``).

    Raises :class:`DataError` for a bad CSV (file, line, column), a missing image or mask, or
    no data at all.
    """
    images_dir = Path(images_dir)
    masks = Path(masks_dir) if masks_dir is not None else None
    fractions = validate_fractions(fractions)
    table = check_folder(images_dir, annotations_csv, masks)
    by_image = {name: rows for name, rows in table.groupby("image", sort=True)} if table is not None else {}
    mask_only: list[str] = []
    if masks is not None:
        for mask_path in _mask_files(masks):
            name = _image_for_mask(images_dir, mask_path, masks)
            if name is None:
                log.warning("mask %s has no image in %s; skipped", mask_path, images_dir)
            elif name not in by_image:
                mask_only.append(name)
    images: list[AnnotatedImage] = []
    for name in sorted([*by_image, *mask_only]):
        pixels = read_rgb8(images_dir / name, name)
        mask = None
        if masks is not None:
            found = _find_mask(masks, name)
            if found is not None:
                mask = read_mask(found, pixels.shape[:2])
            elif name in by_image:
                log.info("image %s has no mask in %s", name, masks)
        if name in by_image:  # positions were checked against the image's size by check_folder
            cells = by_image[name][CELL_COLUMNS].reset_index(drop=True)
            if mask is not None:
                cells = _diameters_from_mask(cells, mask)
        else:
            cells = cells_from_mask(mask)
        images.append(AnnotatedImage(name=name, pixels=pixels, cells=cells, split="train", mask=mask))
    if not images:
        raise DataError(f"no annotated images found (images {images_dir}, annotations {annotations_csv}, masks {masks})")
    assign_splits(images, fractions, seed)
    source: dict[str, Any] = {"kind": "folder", "images": str(images_dir), "fractions": list(fractions), "seed": seed}
    if annotations_csv is not None:
        source["annotations"] = str(annotations_csv)
        source["annotations_sha256"] = _sha256_file(Path(annotations_csv))
    if masks is not None:
        source["masks"] = str(masks)
    log.info("loaded %d images with %d cells from %s", len(images), sum(len(i.cells) for i in images), images_dir)
    return TrainingData(images=images, source=source)


def load_crop_folder(
    root: Path | str,
    labels_csv: Path | str | None = None,
    *,
    positive_label: str,
    image_column: str = "image",
    label_column: str = "label",
    group_column: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> TrainingData:
    """Training data from a folder of single-cell crops (one :class:`AnnotatedImage` per crop).

    ``labels_csv`` (default ``root/labels.csv``) has one row per crop: the crop's path
    relative to ``root`` (``image_column``) and its class (``label_column``), exactly two
    classes. Label map: ``positive_label`` (the abnormal class, e.g. ``Parasitized``) becomes
    ``dead`` (p_alive 0, the positive class of the classifier's F1), the other class becomes
    ``alive``; the map is kept in ``source["label_map"]``. Each crop holds one cell at its centre
    ``(W / 2, H / 2)`` with diameter ``min(H, W)``. ``group_column`` (e.g. ``patient``) keeps
    every group in one split; otherwise each crop is its own group.
    """
    root = Path(root)
    csv_path = Path(labels_csv) if labels_csv is not None else root / "labels.csv"
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"labels file {csv_path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path} is not a readable CSV file: {exc}") from exc
    needed = [image_column, label_column] + ([group_column] if group_column else [])
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}, line 1 (header): missing column(s) {missing}; found {list(table.columns)}")
    classes = sorted(table[label_column].unique())
    if len(classes) != 2 or positive_label not in classes:
        raise DataError(f"{csv_path}, column {label_column!r}: need exactly two classes including "
                        f"positive_label {positive_label!r}; found {classes}")
    negative = next(c for c in classes if c != positive_label)
    images = []
    for row in table.itertuples(index=False):
        name = str(getattr(row, image_column))
        pixels = read_rgb8(root / name, name)
        h, w = pixels.shape[:2]
        dead = getattr(row, label_column) == positive_label
        cells = pd.DataFrame([{"x": w / 2.0, "y": h / 2.0, "label": "dead" if dead else "alive",
                               "p_alive": 0.0 if dead else 1.0, "weight": 1.0, "diameter": float(min(h, w))}],
                             columns=CELL_COLUMNS)
        images.append(AnnotatedImage(name=name, pixels=pixels, cells=cells, split="train"))
    groups = table[group_column].astype(str).tolist() if group_column else None
    assign_splits(images, fractions, seed, groups=groups)
    source = {"kind": "crops", "images": str(root), "annotations": str(csv_path),
              "annotations_sha256": _sha256_file(csv_path), "label_map": {"dead": positive_label, "alive": negative},
              "group_column": group_column, "fractions": list(fractions), "seed": seed}
    log.info("loaded %d crops from %s (%s -> dead, %s -> alive)", len(images), root, positive_label, negative)
    return TrainingData(images=images, source=source)


# ---------------------------------------------------------------- store


def _store_cells(session: Session, project: Project, source: str, snapshot: ConsensusSnapshot | int | None,
                 min_confidence: float) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Cells (image, image_id, x, y, label, p_alive, weight, confidence) and the source description."""
    from cellspot.export import resolve_snapshot
    from cellspot.store import queries

    if source == "consensus":
        snap = resolve_snapshot(session, project, snapshot)
        cells = queries.snapshot_cells_frame(session, snap)
        cells["weight"] = cells["confidence"]
        info = {"kind": "consensus", "project": project.name, "project_id": project.id,
                "snapshot_id": snap.id, "method": snap.method, "min_confidence": float(min_confidence)}
        return cells, info
    if source == "expert":
        cells = queries.gold_frame(session, project)
        cells["p_alive"] = np.where(cells["label"] == "alive", 1.0, 0.0)
        cells["weight"] = cells["confidence"] = 1.0
        digest = hashlib.sha256(cells[["image", "x", "y", "label"]].to_csv(index=False).encode()).hexdigest()
        info = {"kind": "expert", "project": project.name, "project_id": project.id, "annotations_sha256": digest}
        return cells, info
    raise DataError(f"unknown training data source {source!r}; allowed: consensus, expert")


def load_store(
    session: Session,
    settings: Settings,
    project: Project | str,
    *,
    source: str = "consensus",
    snapshot: ConsensusSnapshot | int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    min_confidence: float = 0.5,
) -> TrainingData:
    """Training data from the store: a consensus snapshot (``source="consensus"``, default the
    latest, ``snapshot`` picks another) or the expert cells (``source="expert"``).

    Consensus ``p_alive`` is the soft target and its ``confidence`` the sample weight; cells
    below ``min_confidence`` are left out (expert cells: p_alive 0/1, weight 1). The split is
    the export's (:func:`cellspot.export.export_dataset` with the same ``fractions``, ``seed``
    and ``min_confidence`` puts every image in the same split). Images with at least one kept
    cell are loaded from ``settings.home / image.path``; images without pixels are skipped (logged).
    Reads only. Raises :class:`DataError` (no cells, unreadable pixels),
    :class:`cellspot.export.NoSnapshotError`, :class:`cellspot.store.queries.ProjectNotFoundError`.
    """
    from sqlalchemy import select

    from cellspot.store import queries
    from cellspot.store.models import Image

    if not 0.0 <= float(min_confidence) <= 1.0:
        raise DataError(f"min_confidence must be within [0, 1]; got {min_confidence!r}")
    fractions = validate_fractions(fractions)
    project = queries.as_project(session, project)
    cells, info = _store_cells(session, project, source, snapshot, float(min_confidence))
    cells = cells[cells["confidence"] >= float(min_confidence)]
    rows = session.execute(
        select(Image.id, Image.name, Image.path, Image.has_pixels).where(Image.project_id == project.id)
    ).all()
    counts = cells.groupby(["image", "label"]).size().unstack(fill_value=0)
    table = pd.DataFrame({"image": [r.name for r in rows]})
    for label in LABELS:
        table[f"n_{label}"] = table["image"].map(counts.get(label, pd.Series(dtype=int))).fillna(0).astype(int)
    assignment = stratified_image_split(table, fractions, seed=seed)
    by_image = dict(tuple(cells.groupby("image", sort=True)))
    images, no_pixels = [], []
    for row in sorted(rows, key=lambda r: r.name):
        if row.name not in by_image:
            continue
        if not row.has_pixels or not row.path:
            no_pixels.append(row.name)
            continue
        kept = by_image[row.name].assign(diameter=np.nan)[CELL_COLUMNS].reset_index(drop=True)
        file = settings.home / row.path
        if not file.is_file():  # the store names it, this process's CELLSPOT_HOME lacks it
            raise DataError(f"cannot read image {row.name}: {file} does not exist; the store keeps image files "
                            f"under CELLSPOT_HOME ({settings.home} here): a worker needs the app's "
                            "CELLSPOT_HOME, at the same path")
        pixels = read_rgb8(file, row.name)
        images.append(AnnotatedImage(name=row.name, pixels=pixels, cells=kept, split=assignment[row.name],
                                     image_id=int(row.id)))
    if no_pixels:
        log.info("skipped %d image(s) without pixels (e.g. %s)", len(no_pixels), ", ".join(no_pixels[:5]))
    if not images:
        raise DataError(f"project {project.name!r} has no {source} cells at confidence >= {min_confidence} "
                        "on images with pixels"
                        + (f" ({len(no_pixels)} image(s) with cells have no pixels)" if no_pixels else ""))
    info.update({"fractions": list(fractions), "seed": seed, "images_without_pixels": len(no_pixels)})
    log.info("loaded %d images with %d %s cells from project %r", len(images),
             sum(len(i.cells) for i in images), source, project.name)
    return TrainingData(images=images, source=info)


# ---------------------------------------------------------------- diameter


def estimate_diameter(data: TrainingData) -> float:
    """Typical cell diameter in pixels.

    In order: the median of the cells' known diameters (boxes, masks); the median
    equivalent diameter of the mask instances; the 10th percentile of nearest-neighbour
    distances between cells of one image (the closest pairs of cells touch, so they lie about
    one diameter apart; needs at least 10 distances); else :data:`DEFAULT_DIAMETER`.
    """
    from scipy.spatial import cKDTree

    known = np.concatenate([im.cells["diameter"].to_numpy(float) for im in data.images] or [np.empty(0)])
    known = known[np.isfinite(known) & (known > 0)]
    if known.size:
        return float(np.median(known))
    areas = [np.bincount(im.mask.ravel())[1:] for im in data.images if im.mask is not None and im.mask.max() > 0]
    areas = np.concatenate(areas) if areas else np.empty(0)
    if (areas > 0).any():
        return float(np.median(np.sqrt(4.0 * areas[areas > 0] / np.pi)))
    nearest = []
    for im in data.images:
        xy = im.cells[["x", "y"]].to_numpy(float)
        if len(xy) >= 2:
            dist, _ = cKDTree(xy).query(xy, k=2)
            nearest.append(dist[:, 1])
    nearest = np.concatenate(nearest) if nearest else np.empty(0)
    nearest = nearest[nearest > 0]
    if nearest.size >= 10:
        return float(np.percentile(nearest, 10))
    return DEFAULT_DIAMETER

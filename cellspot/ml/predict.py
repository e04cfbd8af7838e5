"""Prediction: find every cell in images, say whether it is alive, count viability per image.

One path for the CLI (``cellspot predict``), the dashboard and the tests:

* :func:`predict_images` runs a :class:`Detector` and a :class:`Classifier` (the loaded models
  of :mod:`cellspot.ml.detector` / :mod:`cellspot.ml.classifier`, or anything with the same
  methods) over image files of any bit depth and channel count (read with
  :func:`cellspot.imaging.read_image`, normalised by :func:`cellspot.imaging.to_model_rgb8`).
  Models are loaded once by the caller; the classifier sees all cells of an image in one call;
  the next image is read in a background thread while the models work on the current one.
* :func:`mc_samples_for_images` draws MC-dropout samples of ``p_alive`` at given cells (for the
  BALD acquisition strategy) with a classifier that has ``predict_cells_mc``.
* :func:`write_outputs` writes ``cells.csv``, ``summary.csv`` and ``overlays/<stem>.png``
  (plus ``errors.csv`` when files were skipped) atomically.

Predicting a project's images with its active models and keeping the cells in the store is
:mod:`cellspot.ml.project_predictions`.

Per cell: ``label`` is "alive" when ``p_alive >= 0.5`` (:data:`ALIVE_THRESHOLD`), else "dead";
``uncertainty`` is the binary entropy of ``p_alive`` in bits,
``H(p) = -p log2 p - (1 - p) log2 (1 - p)``: 0 for a sure call, 1 at ``p_alive = 0.5``. It is
the classifier's uncertainty about the label only; the detector's confidence that there is a
cell at all is kept separately as ``score`` (stored in the store, not in ``cells.csv``).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from cellspot.imaging import IMAGE_SUFFIXES, ImageReadError, read_image, to_model_rgb8
from cellspot.ml.overlay import Outline, instance_ids

log = logging.getLogger(__name__)

CELL_COLUMNS = ["image", "x", "y", "label", "p_alive", "uncertainty", "detector_version", "classifier_version"]
"""Columns of ``cells.csv`` and :attr:`PredictionResult.cells`, in this order."""
DETAIL_COLUMNS = CELL_COLUMNS + ["score", "diameter"]
"""Columns of :attr:`ImagePrediction.cells`: :data:`CELL_COLUMNS` plus the detector ``score``
and the cell ``diameter`` in pixels (from its instance area, else the detector's radius)."""
SUMMARY_COLUMNS = ["image", "alive", "dead", "viability_pct", "n_cells"]
"""Columns of ``summary.csv``: counts per image; ``viability_pct = 100 * alive / n_cells``
(empty when an image has no cells)."""
ERROR_COLUMNS = ["image", "path", "error"]
ALIVE_THRESHOLD = 0.5
DEFAULT_DIAMETER = 12.0
"""Cell diameter (pixels) for the overlay marks when neither instances nor the detector's
config give one."""
READ_AHEAD = 2
MAX_LISTED_ERRORS = 20
"""Unreadable files listed one by one in an :class:`UnreadableImagesError` message; the rest are counted."""

ProgressCallback = Callable[[int, int, str], None]
"""Called after each image as ``progress(done, total, image_name)``."""


class PredictionError(ValueError):
    """Prediction cannot run: unreadable image, no images, bad model output, no active model."""


class UnreadableImagesError(PredictionError):
    """Image files that cannot be read: ``errors`` gives each with its reason, ``total`` the number
    of image files given (readable ones included)."""

    def __init__(self, errors: Sequence[ImageError], total: int) -> None:
        self.errors = list(errors)
        self.total = total
        super().__init__(f"{len(self.errors)} of {total} image file(s) cannot be read:\n"
                         + format_image_errors(self.errors))

    @property
    def n_readable(self) -> int:
        return self.total - len(self.errors)


class NoActiveModelError(PredictionError, LookupError):
    """The project has no active model of a kind and none was given."""


# --------------------------------------------------------------------------- model protocols


class DetectionsLike(Protocol):
    """What a detector returns: ``xy`` ``(N, 2)`` float centres (x, y) in pixels, ``scores``
    ``(N,)`` in [0, 1], ``labels`` ``(H, W)`` int32 instances (0 = background) or ``None``."""

    @property
    def xy(self) -> np.ndarray: ...

    @property
    def scores(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray | None: ...


class Detector(Protocol):
    """A loaded cell detector (:class:`cellspot.ml.detector.LoadedDetector` fits)."""

    @property
    def version(self) -> str: ...

    def detect(self, pixels: np.ndarray) -> DetectionsLike:
        """Cells in ``pixels`` ``(H, W, 3)`` uint8."""
        ...


class Classifier(Protocol):
    """A loaded alive/dead classifier (:class:`cellspot.ml.classifier.LoadedClassifier` fits)."""

    @property
    def version(self) -> str: ...

    def predict_cells(self, pixels: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """``(N,)`` p_alive of the cells at ``xy`` ``(N, 2)`` in ``pixels`` ``(H, W, 3)`` uint8."""
        ...


def load_detector_dir(model_dir: str | Path) -> Detector:
    """The detector in checkpoint folder ``model_dir`` (lazy import keeps torch out until needed)."""
    from cellspot.ml.detector import load_detector

    return load_detector(Path(model_dir))


def load_classifier_dir(model_dir: str | Path) -> Classifier:
    """The classifier in checkpoint folder ``model_dir``."""
    from cellspot.ml.classifier import load_classifier

    return load_classifier(Path(model_dir))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ImageError:
    """An image that could not be predicted: its name, file and the reason."""

    image: str
    path: str
    error: str


@dataclass
class ImagePrediction:
    """The cells of one image. ``cells``: :data:`DETAIL_COLUMNS`; ``outline``: instance
    boundaries for the overlay (``None`` when the detector gave no instances)."""

    image: str
    source: Path
    width: int
    height: int
    cells: pd.DataFrame
    outline: Outline | None = None


@dataclass
class PredictionResult:
    """What :func:`predict_images` found: per-image predictions, the files it skipped, timing."""

    images: list[ImagePrediction]
    detector_version: str
    classifier_version: str
    errors: list[ImageError] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def details(self) -> pd.DataFrame:
        """Every cell with :data:`DETAIL_COLUMNS`."""
        frames = [p.cells for p in self.images if len(p.cells)]
        if not frames:
            return _empty(DETAIL_COLUMNS)
        return pd.concat(frames, ignore_index=True)

    @property
    def cells(self) -> pd.DataFrame:
        """Every cell with exactly :data:`CELL_COLUMNS` (the ``cells.csv`` table)."""
        return self.details[CELL_COLUMNS]

    @property
    def summary(self) -> pd.DataFrame:
        """Counts and viability per predicted image (:data:`SUMMARY_COLUMNS`)."""
        return summarize(self.details, [p.image for p in self.images])

    @property
    def errors_frame(self) -> pd.DataFrame:
        return pd.DataFrame([vars(e) for e in self.errors], columns=ERROR_COLUMNS)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=float if c not in ("image", "label") else object) for c in columns})


# --------------------------------------------------------------------------- pure pieces


def binary_entropy(p_alive: np.ndarray) -> np.ndarray:
    """``(N,)`` binary entropy in bits of ``(N,)`` probabilities: 0 at 0 and 1, 1 at 0.5."""
    p = np.clip(np.asarray(p_alive, float), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.nan_to_num(h, nan=0.0)


def summarize(cells: pd.DataFrame, images: Iterable[str] | None = None) -> pd.DataFrame:
    """Per image: alive, dead, viability % and n_cells (:data:`SUMMARY_COLUMNS`).

    ``cells``: columns ``image``, ``label``. ``images``: every image to list, in order, with
    zeros for those without cells (default: the images in ``cells``, sorted).
    ``viability_pct`` = ``100 * alive / n_cells``, rounded to 2 decimals; NaN without cells.
    """
    names = list(images) if images is not None else sorted(cells["image"].unique())
    counts = pd.crosstab(cells["image"], cells["label"]) if len(cells) else pd.DataFrame()
    table = counts.reindex(index=names, columns=["alive", "dead"], fill_value=0).fillna(0).astype(int)
    table["n_cells"] = table["alive"] + table["dead"]
    with np.errstate(divide="ignore", invalid="ignore"):
        table["viability_pct"] = (100.0 * table["alive"] / table["n_cells"].where(table["n_cells"] > 0)).round(2)
    table.index.name = "image"
    return table.reset_index()[SUMMARY_COLUMNS]


def cell_diameters(xy: np.ndarray, labels: np.ndarray | None, fallback: float) -> np.ndarray:
    """``(N,)`` diameters in pixels: of the circle with the area of the instance under each
    centre; cells on background get the median of the others, else ``fallback``."""
    n = len(xy)
    if labels is None or n == 0 or not np.any(labels):
        return np.full(n, float(fallback))
    ids = instance_ids(labels, xy)
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))
    diam = np.where(ids > 0, 2.0 * np.sqrt(areas[ids] / math.pi), np.nan)
    found = diam[np.isfinite(diam)]
    return np.where(np.isfinite(diam), diam, float(np.median(found)) if found.size else float(fallback))


def detector_diameter(detector: Any) -> float:
    """Twice the ``radius`` of the detector's config when it has one, else :data:`DEFAULT_DIAMETER`."""
    config = getattr(detector, "config", None)
    radius = config.get("radius") if isinstance(config, Mapping) else getattr(config, "radius", None)
    try:
        return 2.0 * float(radius) if radius and float(radius) > 0 else DEFAULT_DIAMETER
    except (TypeError, ValueError):
        return DEFAULT_DIAMETER


def predict_pixels(
    pixels: np.ndarray, detector: Detector, classifier: Classifier, *, name: str = "image"
) -> tuple[pd.DataFrame, Outline | None]:
    """Detect and classify the cells of one ``(H, W, 3)`` uint8 image.

    Returns the cells (:data:`DETAIL_COLUMNS` without ``image`` and the versions) and the
    instance outline. Raises :class:`PredictionError` naming ``name`` when a model returns
    arrays of the wrong shape or probabilities outside [0, 1].
    """
    found = detector.detect(pixels)
    xy = np.asarray(found.xy, float).reshape(-1, 2)
    n = len(xy)
    scores = np.asarray(found.scores, float).reshape(-1) if found.scores is not None else np.ones(n)
    labels = getattr(found, "labels", None)
    if len(scores) != n:
        raise PredictionError(f"{name}: the detector returned {n} centres but {len(scores)} scores")
    p_alive = np.asarray(classifier.predict_cells(pixels, xy), float).reshape(-1) if n else np.zeros(0)
    if len(p_alive) != n:
        raise PredictionError(f"{name}: the classifier returned {len(p_alive)} probabilities for {n} cells")
    if n and not (np.all(p_alive >= 0.0) and np.all(p_alive <= 1.0)):
        raise PredictionError(f"{name}: the classifier returned p_alive outside [0, 1] (or NaN)")
    alive = p_alive >= ALIVE_THRESHOLD
    cells = pd.DataFrame({
        "x": np.round(xy[:, 0], 2), "y": np.round(xy[:, 1], 2),
        "label": np.where(alive, "alive", "dead").astype(object),
        "p_alive": np.round(p_alive, 4), "uncertainty": np.round(binary_entropy(p_alive), 4),
        "score": np.round(scores, 4),
        "diameter": np.round(cell_diameters(xy, labels, detector_diameter(detector)), 2),
    })
    outline = Outline.from_labels(labels, xy, alive) if labels is not None and np.any(labels) else None
    return cells, outline


# --------------------------------------------------------------------------- images in, tables out


def collect_images(inputs: Mapping[str, str | Path] | Iterable[str | Path]) -> dict[str, Path]:
    """Image name -> file for files and folders.

    A folder contributes every file under it (recursive, hidden parts skipped) ending in
    :data:`cellspot.imaging.IMAGE_SUFFIXES`, named by its path relative to the folder (as in
    annotation CSVs); a file is named by its file name and always tried. A mapping is taken as
    it is. Raises :class:`PredictionError` for a missing path, two files with one name, or no
    images at all.
    """
    if isinstance(inputs, Mapping):
        found = {str(name): Path(path) for name, path in inputs.items()}
        given: list[Path] = []
    else:
        found = {}
        given = [Path(raw) for raw in inputs]
        for raw in given:
            for name, path in _expand(raw):
                if name in found and found[name] != path:
                    raise PredictionError(f"two images are named {name!r}: {found[name]} and {path}; rename one")
                found[name] = path
    if not found:
        where = f"in {_listed([str(p) for p in given], 5)}" if given else "(no files or folders given)"
        raise PredictionError(f"no images found {where}; expected files ending in {', '.join(IMAGE_SUFFIXES)} "
                              "(folders are searched with their subfolders; hidden files are skipped)")
    return found


def _listed(items: Sequence[str], limit: int) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _expand(path: Path) -> Iterator[tuple[str, Path]]:
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            relative = child.relative_to(path)
            if child.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
                yield relative.as_posix(), child
    elif path.is_file():
        yield path.name, path
    else:
        raise PredictionError(f"{path}: no such file or folder")


@dataclass(frozen=True)
class CheckedImages:
    """Image files sorted by :func:`check_images`: ``readable`` (name -> file, in input order)
    and ``errors`` (the unreadable ones, with the reason)."""

    readable: dict[str, Path]
    errors: list[ImageError]

    @property
    def total(self) -> int:
        return len(self.readable) + len(self.errors)


def check_images(paths: Mapping[str, str | Path] | Iterable[str | Path],
                 progress: ProgressCallback | None = None) -> CheckedImages:
    """Find the images of ``paths`` (see :func:`collect_images`) and check that each can be read
    (:func:`image_problem`), so a run can refuse or skip the unreadable ones before the models
    load. ``progress(done, total, name)`` is called after each file."""
    sources = collect_images(paths)
    readable: dict[str, Path] = {}
    errors: list[ImageError] = []
    for done, (name, path) in enumerate(sources.items(), start=1):
        reason = image_problem(path)
        if reason is None:
            readable[name] = path
        else:
            errors.append(ImageError(name, str(path), reason))
        if progress is not None:
            progress(done, len(sources), name)
    if errors:
        log.info("%d of %d image file(s) cannot be read", len(errors), len(sources))
    return CheckedImages(readable, errors)


def image_problem(path: str | Path) -> str | None:
    """Why :func:`read_pixels` refuses the file at ``path`` (its :class:`ImageReadError` reason),
    or ``None`` when the file reads. The file is decoded, so the answer is the decoder's own (a
    decode costs a few percent of a prediction)."""
    try:
        read_image(path)
    except ImageReadError as exc:
        return exc.reason
    return None


def format_image_errors(errors: Sequence[ImageError], limit: int = MAX_LISTED_ERRORS) -> str:
    """``  file: reason`` lines for the first ``limit`` errors, plus a count of the rest."""
    lines = [f"  {e.path}: {e.error}" for e in errors[:limit]]
    if len(errors) > limit:
        lines.append(f"  ... and {len(errors) - limit} more")
    return "\n".join(lines)


def read_pixels(path: Path) -> np.ndarray:
    """The image file at ``path`` as ``(H, W, 3)`` uint8 (:class:`ImageReadError` names the file)."""
    loaded = read_image(path)
    return to_model_rgb8(loaded.array, loaded.bit_depth)


def _read_ahead(items: list[tuple[str, Path]]) -> Iterator[tuple[str, Path, Future]]:
    """``(name, path, future of pixels)`` in order, reading up to :data:`READ_AHEAD` files ahead."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellspot-read") as pool:
        pending: deque[tuple[str, Path, Future]] = deque()
        for name, path in items:
            pending.append((name, path, pool.submit(read_pixels, path)))
            if len(pending) > READ_AHEAD:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def predict_images(
    paths: Mapping[str, str | Path] | Iterable[str | Path] | CheckedImages,
    detector: Detector,
    classifier: Classifier,
    *,
    progress: ProgressCallback | None = None,
    skip_invalid: bool = False,
) -> PredictionResult:
    """Detect and classify the cells of every image in ``paths`` (see :func:`collect_images`;
    or the result of :func:`check_images`, which is then not checked again).

    Without ``skip_invalid`` every file is checked to be readable first (:func:`check_images`),
    and any unreadable file raises :class:`UnreadableImagesError` listing all of them before an
    image is predicted. With it, unreadable files are listed in :attr:`PredictionResult.errors`
    as they are read and the others run (no check first: it would decode every file twice). A
    file that passes the check but fails to decode is handled the same way when it is read.
    """
    if isinstance(paths, CheckedImages):
        checked = paths
    else:
        checked = CheckedImages(collect_images(paths), []) if skip_invalid else check_images(paths)
    if checked.errors and not skip_invalid:
        raise UnreadableImagesError(checked.errors, checked.total)
    sources = checked.readable
    start = time.perf_counter()
    result = PredictionResult([], str(detector.version), str(classifier.version), errors=list(checked.errors))
    for error in checked.errors:
        log.warning("skipping %s: %s", error.path, error.error)
    for done, (name, path, future) in enumerate(_read_ahead(list(sources.items())), start=1):
        try:
            pixels = future.result()
        except ImageReadError as exc:
            error = ImageError(name, str(path), exc.reason)
            if not skip_invalid:
                raise UnreadableImagesError([error], checked.total) from exc
            log.warning("skipping %s: %s", path, exc.reason)
            result.errors.append(error)
        else:
            cells, outline = predict_pixels(pixels, detector, classifier, name=name)
            cells.insert(0, "image", name)
            cells["detector_version"] = result.detector_version
            cells["classifier_version"] = result.classifier_version
            h, w = pixels.shape[:2]
            result.images.append(ImagePrediction(name, path, int(w), int(h), cells[DETAIL_COLUMNS], outline))
        if progress is not None:
            progress(done, len(sources), name)
    result.seconds = time.perf_counter() - start
    log.info("predicted %d image(s) in %.1f s (%d skipped)", len(result.images), result.seconds, len(result.errors))
    return result


class MCClassifier(Classifier, Protocol):
    """A classifier that also gives MC-dropout samples (:class:`cellspot.ml.classifier.LoadedClassifier` fits)."""

    def predict_cells_mc(self, pixels: np.ndarray, xy: np.ndarray, samples: int = 20, seed: int = 0) -> np.ndarray:
        """``(N, T)`` p_alive samples of the cells at ``xy`` ``(N, 2)`` in ``pixels`` ``(H, W, 3)`` uint8."""
        ...


def mc_samples_for_images(
    paths: Mapping[str, str | Path] | Iterable[str | Path],
    cells: pd.DataFrame,
    classifier: MCClassifier,
    *,
    samples: int = 20,
    seed: int = 0,
    skip_invalid: bool = True,
) -> dict[str, np.ndarray]:
    """MC-dropout samples of ``p_alive`` at given cells, for BALD
    (:func:`cellspot.active.strategies.score_images` ``("bald", ..., mc_samples=...)``).

    ``paths``: image files as for :func:`predict_images` (name -> file, or files / folders);
    ``cells``: the cells to sample, columns ``image, x, y`` (e.g. stored predictions,
    :func:`cellspot.ml.project_predictions.predictions_frame`). Returns image name ->
    ``(n_cells, T)`` float32 samples (``T = samples``), rows in the order of that image's rows
    in ``cells``; an image of
    ``paths`` without cells gets ``(0, T)``. Cells of images not in ``paths`` are ignored. Each
    image draws its masks from ``seed`` and its name, so its samples do not depend on which
    other images are sampled. An unreadable file is skipped with a warning (or raises
    :class:`PredictionError` when ``skip_invalid`` is false).
    """
    missing = [c for c in ("image", "x", "y") if c not in cells.columns]
    if missing:
        raise PredictionError(f"cells lacks column(s) {missing}; has {list(cells.columns)}")
    sources = collect_images(paths)
    by_image = {str(k): g[["x", "y"]].to_numpy(float) for k, g in cells.groupby(cells["image"].astype(str), sort=False)}
    out: dict[str, np.ndarray] = {}
    for name, path, future in _read_ahead(list(sources.items())):
        try:
            pixels = future.result()
        except ImageReadError as exc:
            if not skip_invalid:
                raise PredictionError(f"cannot read image {name!r} ({exc.path}): {exc.reason}") from exc
            log.warning("no MC samples for %s: %s", path, exc.reason)
            continue
        image_seed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        xy = by_image.get(name, np.empty((0, 2)))
        out[name] = np.asarray(classifier.predict_cells_mc(pixels, xy, samples=samples, seed=image_seed), np.float32)
    log.info("MC-dropout samples (T=%d) for %d cells on %d image(s)", samples,
             sum(len(v) for v in out.values()), len(out))
    return out


# --------------------------------------------------------------------------- output files


@dataclass(frozen=True)
class OutputPaths:
    """Where :func:`write_outputs` put things (``overlays``/``errors`` ``None`` when not written)."""

    cells: Path
    summary: Path
    overlays: Path | None
    errors: Path | None
    n_overlays: int = 0


def overlay_names(images: Iterable[str]) -> dict[str, str]:
    """Image name -> overlay file relative to ``overlays/``: ``<stem>.png`` (folders kept),
    ``<name>.png`` when two images share a stem (``a.png`` and ``a.tif``), and ``<stem>~N.png``
    when that still clashes (``a.png`` and ``a.png.tif`` would both write ``a.png.png``).

    Names are compared without case, so no overlay replaces another on a case-insensitive file
    system (macOS, Windows) either.
    """
    from collections import Counter

    names = list(dict.fromkeys(images))
    stems = [str(Path(n).with_suffix(".png")) for n in names]
    stem_count = Counter(s.casefold() for s in stems)
    wanted = [f"{n}.png" if stem_count[s.casefold()] > 1 else s for n, s in zip(names, stems)]
    wanted_count = Counter(w.casefold() for w in wanted)
    taken = {w.casefold() for w in wanted if wanted_count[w.casefold()] == 1}
    out: dict[str, str] = {}
    for name, want in zip(names, wanted):
        if want.casefold() not in taken:  # still clashes: number it
            stem, k = want[: -len(".png")], 2
            while f"{stem}~{k}.png".casefold() in taken:
                k += 1
            want = f"{stem}~{k}.png"
            taken.add(want.casefold())
        out[name] = want
    return out


#: what :func:`write_outputs` puts in its folder; a folder holding anything else is not replaced
OUTPUT_ENTRIES: frozenset[str] = frozenset({"cells.csv", "summary.csv", "errors.csv", "overlays"})


def _check_can_create(folder: Path) -> None:
    """:class:`PredictionError` when ``folder`` (which does not exist) cannot be made: it is made
    and removed again, with the parents it needed, so a refused run leaves nothing behind."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise PredictionError(f"output folder {folder} cannot be created ({exc.strerror or exc})") from None
    for path in made:  # deepest first
        path.rmdir()


def check_output_dir(out_dir: str | Path) -> None:
    """Raise :class:`PredictionError` unless ``out_dir`` is new, empty or the folder of an earlier
    prediction (only :data:`OUTPUT_ENTRIES`): a prediction never replaces the ``cells.csv`` of an
    export or of anything else, nor starts when a new folder cannot be made."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PredictionError(f"output folder {out_dir} exists and is not a folder")
    if not out_dir.is_dir():
        _check_can_create(out_dir)
        return
    others = sorted(p.name for p in out_dir.iterdir()
                    if p.name not in OUTPUT_ENTRIES and not p.name.startswith(".cellspot-predict-"))
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise PredictionError(f"output folder {out_dir} holds files that no prediction wrote ({shown}); "
                              "choose a new or empty folder (an earlier prediction's folder is replaced)")


def write_outputs(result: PredictionResult, out_dir: str | Path, *, overlays: bool = True) -> OutputPaths:
    """Write ``cells.csv``, ``summary.csv``, ``overlays/<stem>.png`` and ``errors.csv`` (only
    when files were skipped) into ``out_dir``.

    Everything is first written to a hidden folder inside ``out_dir`` and renamed into place at
    the end, so a failed run leaves the folder as it was; a new run replaces the files and the
    whole ``overlays/`` folder of an earlier one (without ``overlays`` the earlier overlays are
    removed: they would show other predictions). A folder holding other files is refused
    (:func:`check_output_dir`). Overlays re-read the source images.
    """
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    check_output_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cellspot-predict-", dir=out_dir))
    try:
        result.cells.to_csv(staging / "cells.csv", index=False)
        result.summary.to_csv(staging / "summary.csv", index=False)
        if result.errors:
            result.errors_frame.to_csv(staging / "errors.csv", index=False)
        n_overlays = _write_overlays(result, staging / "overlays") if overlays else 0
        for name in ("cells.csv", "summary.csv", "errors.csv"):
            if (staging / name).exists():
                (staging / name).replace(out_dir / name)
            elif (out_dir / name).exists():
                (out_dir / name).unlink()  # an errors.csv left by an earlier run
        if (out_dir / "overlays").exists():
            (out_dir / "overlays").rename(staging / "old-overlays")
        if overlays:
            (staging / "overlays").rename(out_dir / "overlays")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote predictions of %d image(s) to %s", len(result.images), out_dir)
    return OutputPaths(out_dir / "cells.csv", out_dir / "summary.csv", out_dir / "overlays" if overlays else None,
                       out_dir / "errors.csv" if result.errors else None, n_overlays)


def _write_overlays(result: PredictionResult, folder: Path) -> int:
    from cellspot.ml.overlay import draw_overlay

    folder.mkdir(parents=True, exist_ok=True)
    names = overlay_names(p.image for p in result.images)
    for pred in result.images:
        try:
            pixels = read_pixels(pred.source)
        except ImageReadError as exc:
            raise PredictionError(f"cannot re-read image {pred.image!r} for its overlay ({exc.path}): "
                                  f"{exc.reason}") from exc
        target = folder / names[pred.image]
        target.parent.mkdir(parents=True, exist_ok=True)
        draw_overlay(pixels, pred.cells, pred.outline).save(target, format="PNG")
    return len(result.images)

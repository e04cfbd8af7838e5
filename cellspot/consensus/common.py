"""Array helpers shared by the consensus methods (pure numpy/pandas)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import pandas as pd

LABEL_CODE = {"alive": 1, "dead": 0, "not_sure": -1}
DENSE_LIMIT = 50_000_000  # group minima through a dense table up to this many keys


@dataclass(frozen=True)
class ClickArrays:
    """A prepared click table as integer-coded arrays, all of length ``n`` clicks.

    ``image``/``run``/``annotator`` are codes into ``image_names``/``run_names``/
    ``annotator_names``; ``label`` is 1 alive, 0 dead, -1 not sure;
    ``run_image``/``run_annotator`` map run code -> image / annotator code.
    """

    x: np.ndarray
    y: np.ndarray
    label: np.ndarray
    image: np.ndarray
    run: np.ndarray
    annotator: np.ndarray
    image_names: np.ndarray
    run_names: np.ndarray
    annotator_names: np.ndarray
    run_image: np.ndarray
    run_annotator: np.ndarray

    @cached_property
    def run_bits(self) -> np.ndarray:
        """Run-set bit mask per click (:func:`local_run_bits`), computed once."""
        return local_run_bits(self)

    @property
    def n_images(self) -> int:
        return len(self.image_names)

    @property
    def n_runs(self) -> int:
        return len(self.run_names)

    @property
    def n_annotators(self) -> int:
        return len(self.annotator_names)


def _codes(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    codes, uniques = pd.factorize(values, sort=True)
    return codes.astype(np.int64), np.asarray([str(u) for u in uniques], dtype=object)


def encode_clicks(clicks: pd.DataFrame, runs: pd.DataFrame | None = None) -> ClickArrays:
    """Code a prepared click table (see ``prepare_clicks``) and optional zero-click runs.

    Without a ``task_run`` column every annotator x image pair is one run; a run is keyed
    by (image, task_run). Runs listed in ``runs`` but without clicks still count as
    having seen their image.
    """
    n = len(clicks)
    if runs is not None and len(runs):
        if "task_run" not in clicks.columns:
            raise ValueError("clicks need a task_run column when a runs table is given")
        extra = runs[["image", "task_run", "annotator"]]
        table = pd.concat([clicks[["image", "task_run", "annotator"]], extra], ignore_index=True)
    else:
        table = clicks[[c for c in ("image", "task_run", "annotator") if c in clicks.columns]]
    image_all, image_names = _codes(table["image"].to_numpy())
    annot_all, annot_names = _codes(table["annotator"].to_numpy())
    # a run is keyed by (image, task_run): ids reused on another image are another run
    if "task_run" in table.columns:
        inner, inner_names = _codes(table["task_run"].to_numpy())
    else:
        inner, inner_names = annot_all, annot_names
    base = len(inner_names) + 1
    run_all, uniq = pd.factorize(image_all * base + inner, sort=True)
    run_all = run_all.astype(np.int64)
    run_names = np.asarray(inner_names, dtype=object)[uniq % base]
    n_runs = len(run_names)
    run_image = np.zeros(n_runs, dtype=np.int64)
    run_annot = np.zeros(n_runs, dtype=np.int64)
    run_image[run_all[::-1]] = image_all[::-1]  # first occurrence wins
    run_annot[run_all[::-1]] = annot_all[::-1]
    label = np.full(n, -1, dtype=np.int8)
    lab = clicks["label"].to_numpy()
    label[lab == "alive"] = 1
    label[lab == "dead"] = 0
    return ClickArrays(
        x=clicks["x"].to_numpy(np.float64),
        y=clicks["y"].to_numpy(np.float64),
        label=label,
        image=run_image[run_all[:n]],
        run=run_all[:n],
        annotator=run_annot[run_all[:n]],
        image_names=image_names,
        run_names=run_names,
        annotator_names=annot_names,
        run_image=run_image,
        run_annotator=run_annot,
    )


def drop_repeated_clicks(arr: ClickArrays, within: float) -> tuple[ClickArrays, int]:
    """``arr`` without the clicks that repeat an earlier click of their run within ``within``
    pixels (a student's double click marks one cell, not two); returns it and how many were
    dropped. The earlier click (and its label) is kept; runs are kept even when all their
    clicks were repeats."""
    from scipy.spatial import cKDTree

    if len(arr.x) < 2:
        return arr, 0
    pts, _ = offset_coordinates(arr.x, arr.y, arr.run)
    pairs = cKDTree(pts).query_pairs(within, output_type="ndarray")
    if len(pairs) == 0:
        return arr, 0
    drop = np.zeros(len(arr.x), dtype=bool)
    drop[pairs.max(axis=1)] = True  # the later click of every close pair of one run
    keep = ~drop
    return replace(arr, x=arr.x[keep], y=arr.y[keep], label=arr.label[keep], image=arr.image[keep],
                   run=arr.run[keep], annotator=arr.annotator[keep]), int(drop.sum())


def runs_per_image(arr: ClickArrays) -> np.ndarray:
    """Number of runs that saw each image, shape (n_images,)."""
    return np.bincount(arr.run_image, minlength=arr.n_images)


def offset_coordinates(
    x: np.ndarray, y: np.ndarray, group: np.ndarray, scale: np.ndarray | float = 1.0
) -> tuple[np.ndarray, float]:
    """Points of all groups in one plane, far apart, so one KD-tree serves every group.

    Returns ``(points, gap)``: an (n, 2) array ``[x/scale + group * gap, y/scale]`` where
    ``gap`` exceeds twice the span of any group plus 10, so neighbour searches with a
    radius below ``gap / 2`` never cross groups.
    """
    xs = x / scale
    ys = y / scale
    span = float(np.nanmax(np.abs(np.concatenate([xs, ys])))) if len(xs) else 0.0
    gap = 2.0 * span + 10.0
    return np.column_stack([xs + group.astype(np.float64) * gap, ys]), gap


def vote_to_cells(
    image: np.ndarray, x: np.ndarray, y: np.ndarray, p_alive: np.ndarray, support: np.ndarray,
    n_runs: np.ndarray, confidence: np.ndarray, p_cell: np.ndarray, image_names: np.ndarray,
) -> pd.DataFrame:
    """Assemble the standard cells table from per-cell arrays (all of length n_cells)."""
    p_alive = np.clip(p_alive, 0.0, 1.0)
    return pd.DataFrame(
        {
            "image": image_names[image] if len(image) else np.array([], dtype=object),
            "x": x.astype(np.float64),
            "y": y.astype(np.float64),
            "label": np.where(p_alive >= 0.5, "alive", "dead").astype(object),
            "p_alive": p_alive.astype(np.float64),
            "confidence": np.clip(confidence, 0.0, 1.0).astype(np.float64),
            "support": support.astype(np.int64),
            "n_runs": n_runs.astype(np.int64),
            "p_cell": np.clip(p_cell, 0.0, 1.0).astype(np.float64),
        }
    )


def group_min(key: np.ndarray, value: np.ndarray, n_keys: int) -> np.ndarray:
    """Mask of the entries holding the smallest ``value`` of their ``key`` (values unique)."""
    if n_keys <= DENSE_LIMIT:
        best = np.full(n_keys, np.inf)
        np.minimum.at(best, key, value)
        return best[key] == value
    order = np.lexsort((value, key))
    k = key[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    mask = np.zeros(len(order), dtype=bool)
    mask[order[first]] = True
    return mask


def run_rank(arr: ClickArrays) -> np.ndarray:
    """Rank of every run among the runs of its image, shape (n_runs,)."""
    order = np.lexsort((np.arange(arr.n_runs), arr.run_image))
    first_of_image = np.searchsorted(arr.run_image[order], arr.run_image[order], side="left")
    rank = np.empty(arr.n_runs, dtype=np.int64)
    rank[order] = np.arange(arr.n_runs) - first_of_image
    return rank


def local_run_bits(arr: ClickArrays) -> np.ndarray:
    """Run-set bit masks: one set bit per click for its run's rank within the image.

    Shape (n_clicks, n_words) uint64 with ``n_words = ceil(max runs per image / 64)``, so
    any number of runs works; sets of runs combine with ``|`` and intersect with ``&``.
    """
    rank = run_rank(arr)
    n_words = max(1, int(rank.max()) // 64 + 1) if arr.n_runs else 1
    click_rank = rank[arr.run]
    bits = np.zeros((len(arr.run), n_words), dtype=np.uint64)
    bits[np.arange(len(arr.run)), click_rank // 64] = np.left_shift(np.uint64(1), (click_rank % 64).astype(np.uint64))
    return bits


def bits_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise: do two run-set masks (n, n_words) share a run? shape (n,)."""
    return (a & b).any(axis=1)

"""Clean-dataset export: one consensus snapshot -> tables, COCO keypoints, crops, manifest.

Layout of an export folder (``outdir``)::

    manifest.json          snapshot, parameters, counts, sha256 of every other file
    cells.csv, cells.json  consensus cells at or above ``min_confidence`` (with their split)
    cells_left_out.csv     consensus cells below ``min_confidence`` (counted in the manifest)
    clicks.csv             every raw click with its task run, annotator and image
    annotators.csv         reliability estimated by the snapshot, with nickname/class code/role
    images.csv             per image: task runs, clicks, expert cells, cell counts, viability %,
                           size, status, metadata, split
    coco_keypoints.json    COCO-style keypoints (pixel coordinates) of the labelled images,
                           categories alive/dead
    crops/index.csv        crop_path (relative to crops/), image, split, label, x, y, ...
    crops/{train,val,test}/{alive,dead}/*.png

The split is by image and stratified by the image's dead fraction
(:func:`cellspot.crops.stratified_image_split`, over every image of the project, as
:func:`cellspot.ml.data.load_store` splits them). An image nobody labelled (no task run, no
expert cell and no cell in the snapshot) gets the split ``unlabelled`` instead: it is no
confirmed-empty image, so it stays out of the COCO file and the crops. An image whose file
cannot be read has no crops (like an image without pixels); it is named in the manifest.
Everything is written into a hidden temporary folder beside ``outdir`` and renamed into
place at the end, so a failed export never leaves a half-written dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import cellspot
from cellspot.crops import SPLITS, crop_around, split_counts, stratified_image_split, validate_fractions
from cellspot.settings import Settings
from cellspot.store import queries
from cellspot.store.db import sqlite_file
from cellspot.store.models import (
    Annotator,
    Click,
    ConsensusCell,
    ConsensusSnapshot,
    GoldCell,
    Image,
    Project,
    TaskRun,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "cellspot-dataset"
#: 2: images.csv has n_runs, n_clicks, n_expert_cells and the split ``unlabelled``; the
#: manifest names the images whose file could not be read
FORMAT_VERSION = 2
#: the split of an image nobody labelled (see :func:`labelled_images`)
UNLABELLED = "unlabelled"
#: cells below this consensus confidence are left out of an export by default (CLI, page, API)
DEFAULT_MIN_CONFIDENCE = 0.5
MAX_CROP_SIZE = 1024  # px: a crop is one cell and its surroundings, not a whole image
CELL_EXPORT_COLUMNS = [
    "image", "x", "y", "label", "p_alive", "confidence", "support", "n_runs", "p_cell", "from_gold", "split",
]
CLICK_EXPORT_COLUMNS = [
    "image", "task_run", "client_key", "annotator", "nickname", "class_code", "role",
    "click_index", "x", "y", "label", "source", "submitted_at",
]
ANNOTATOR_EXPORT_COLUMNS = [
    "annotator", "nickname", "class_code", "role", "n_runs", "n_clicks",
    "sensitivity", "precision", "accuracy_alive", "accuracy_dead", "weight",
]
CROP_INDEX_COLUMNS = ["crop_path", "image", "split", "label", "x", "y", "p_alive", "confidence"]
COCO_CATEGORIES = [
    {"id": 1, "name": "alive", "supercategory": "cell", "keypoints": ["center"], "skeleton": []},
    {"id": 2, "name": "dead", "supercategory": "cell", "keypoints": ["center"], "skeleton": []},
]

#: ``progress(stage, done, total)``: called as each stage advances (stages: "crops"; the
#: dashboard's zip adds "zip").
ProgressCallback = Callable[[str, int, int], None]


class ExportError(RuntimeError):
    """The export cannot be made (no snapshot, bad parameter). An unreadable image file is no
    error: it is skipped for crops and named in the manifest."""


class NoSnapshotError(ExportError):
    """The project has no consensus snapshot yet."""


class OutputExistsError(ExportError, FileExistsError):
    """The output folder exists and is not empty, and ``overwrite`` was not given."""


@dataclass
class ExportReport:
    """What :func:`export_dataset` wrote. Counts are also in ``manifest.json``."""

    outdir: Path
    manifest_path: Path
    snapshot_id: int
    method: str
    counts: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    #: what the store holds that the snapshot did not see (None: it is up to date); the cells
    #: and crops are the snapshot's, clicks.csv has every click of the store
    stale: str | None = None
    #: images whose file could not be read (name -> reason): their cells have no crops
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def n_crops(self) -> int:
        return int(self.counts["crops"])

    @property
    def n_cells(self) -> int:
        return int(self.counts["cells_exported"])


# ---------------------------------------------------------------- reading the store


def resolve_snapshot(
    session: Session, project: Project, snapshot: ConsensusSnapshot | int | None = None
) -> ConsensusSnapshot:
    """The snapshot to export: the given one (object or id, must belong to ``project``) or the latest."""
    if snapshot is None:
        found = queries.latest_snapshot(session, project)
        if found is None:
            raise NoSnapshotError(
                f"project {project.name!r} has no consensus snapshot yet; "
                f"run `cellspot aggregate --project {project.name}` first"
            )
        return found
    snap = session.get(ConsensusSnapshot, snapshot) if isinstance(snapshot, int) else snapshot
    if snap is None or snap.project_id != project.id:
        raise NoSnapshotError(f"consensus snapshot {snapshot!r} does not exist in project {project.name!r}")
    return snap


@dataclass(frozen=True)
class SnapshotChoice:
    """A consensus snapshot an export can be made from (see :func:`export_choices`)."""

    id: int
    method: str
    created_at: datetime
    n_cells: int


@dataclass(frozen=True)
class ExportChoices:
    """What an export of a project can be made from: its number of images and its consensus
    snapshots, newest first (the first is the one :func:`resolve_snapshot` takes by default)."""

    n_images: int
    snapshots: list[SnapshotChoice]


def export_choices(session: Session, project: Project | str) -> ExportChoices:
    """The number of images of ``project`` and its consensus snapshots (id, method, time in
    UTC, number of cells), newest first. ``project`` may be its name. Reads only."""
    project = queries.as_project(session, project)
    n_images = session.scalar(select(func.count(Image.id)).where(Image.project_id == project.id)) or 0
    rows = session.execute(
        select(ConsensusSnapshot.id, ConsensusSnapshot.method, ConsensusSnapshot.created_at,
               func.count(ConsensusCell.id))
        .outerjoin(ConsensusCell, ConsensusCell.snapshot_id == ConsensusSnapshot.id)
        .where(ConsensusSnapshot.project_id == project.id)
        .group_by(ConsensusSnapshot.id, ConsensusSnapshot.method, ConsensusSnapshot.created_at)
        .order_by(ConsensusSnapshot.created_at.desc(), ConsensusSnapshot.id.desc())
    ).all()
    snapshots = [SnapshotChoice(id=int(i), method=str(m), created_at=_utc(t), n_cells=int(n)) for i, m, t, n in rows]
    return ExportChoices(n_images=int(n_images), snapshots=snapshots)


def _images_frame(session: Session, project: Project) -> pd.DataFrame:
    rows = session.execute(
        select(
            Image.id, Image.name, Image.path, Image.sha256, Image.width, Image.height, Image.channels,
            Image.bit_depth, Image.has_pixels, Image.status, Image.expert_empty, Image.meta,
        )
        .where(Image.project_id == project.id)
        .order_by(Image.name)
    ).all()
    cols = ["image_id", "image", "path", "sha256", "width", "height", "channels", "bit_depth",
            "has_pixels", "status", "expert_empty", "meta"]
    frame = pd.DataFrame(rows, columns=cols)
    return frame.astype({"expert_empty": bool}) if len(frame) else frame


def _seen_by(session: Session, project: Project, snap: ConsensusSnapshot, names: pd.Series, runs: pd.DataFrame,
             clicks: pd.DataFrame) -> dict[str, pd.Series]:
    """``n_runs`` and ``n_expert_cells`` per image of ``names`` as ``snap`` saw them: the runs of
    ``runs`` (:func:`_runs_frame`) submitted and the expert cells made up to its ``created_at``."""
    when = pd.Timestamp(_utc(snap.created_at))
    seen = runs[pd.to_datetime(runs["submitted_at"], utc=True) <= when]
    counts = activity_counts(names, seen, clicks, _expert_cell_counts(session, project, until=snap.created_at))
    return {"n_runs": counts["n_runs"], "n_expert_cells": counts["n_expert_cells"]}


def _expert_cell_counts(session: Session, project: Project, until: datetime | None = None) -> dict[str, int]:
    """Number of expert (gold) cells per image name of ``project`` (images without any left
    out); ``until``: only the cells made up to then."""
    stmt = (select(Image.name, func.count(GoldCell.id)).join(GoldCell, GoldCell.image_id == Image.id)
            .where(Image.project_id == project.id))
    if until is not None:
        stmt = stmt.where(GoldCell.created_at <= until)
    rows = session.execute(stmt.group_by(Image.name)).all()
    return {str(name): int(n) for name, n in rows}


def _cells_frame(session: Session, snapshot: ConsensusSnapshot) -> pd.DataFrame:
    cells = queries.snapshot_cells_frame(session, snapshot)
    return cells.sort_values(["image", "y", "x"], kind="mergesort").reset_index(drop=True)


_RUN_COLUMNS = ["task_run", "image", "client_key", "annotator", "nickname", "class_code", "role",
                "source", "submitted_at"]


def _runs_frame(session: Session, project: Project) -> pd.DataFrame:
    """Every task run of ``project`` with its image and annotator (n_runs x 9), zero-click runs included."""
    rows = session.execute(
        select(
            TaskRun.id, Image.name, TaskRun.client_key, Annotator.id, Annotator.nickname,
            Annotator.class_code, Annotator.role, TaskRun.source, TaskRun.submitted_at,
        )
        .join(Image, Image.id == TaskRun.image_id)
        .join(Annotator, Annotator.id == TaskRun.annotator_id)
        .where(Image.project_id == project.id)
    ).all()
    runs = pd.DataFrame(rows, columns=_RUN_COLUMNS)
    runs["submitted_at"] = _iso_utc(runs["submitted_at"])
    return runs


def _clicks_frame(session: Session, runs: pd.DataFrame, project: Project) -> pd.DataFrame:
    """Every click of ``project`` with its run, annotator and image (n_clicks x 13), ordered by
    image, run and click index. ``runs``: from :func:`_runs_frame` (run details are joined in
    pandas: one row per run, not per click, goes through the ORM's type conversion)."""
    rows = session.execute(
        select(Click.task_run_id, Click.click_index, Click.x, Click.y, Click.label)
        .join(TaskRun, TaskRun.id == Click.task_run_id)
        .join(Image, Image.id == TaskRun.image_id)
        .where(Image.project_id == project.id)
    ).all()
    clicks = pd.DataFrame(rows, columns=["task_run", "click_index", "x", "y", "label"])
    frame = clicks.merge(runs, on="task_run", how="left", validate="many_to_one")
    frame = frame.sort_values(["image", "task_run", "click_index"], kind="mergesort").reset_index(drop=True)
    return frame[CLICK_EXPORT_COLUMNS]


def _reliability_frame(session: Session, snapshot: ConsensusSnapshot) -> pd.DataFrame:
    frame = queries.reliability_frame(session, snapshot)
    return frame[ANNOTATOR_EXPORT_COLUMNS]


# ---------------------------------------------------------------- pure table builders


def flatten_metadata(meta: pd.Series) -> pd.DataFrame:
    """One column per metadata key, named ``meta_<key>`` (nested keys joined with ``.``).

    ``meta``: Series of dicts (or None), index kept. Returns a DataFrame with the same index.
    """
    records = [m if isinstance(m, dict) else {} for m in meta]
    if not any(records):
        return pd.DataFrame(index=meta.index)
    flat = pd.json_normalize(records, sep=".")
    flat.columns = [f"meta_{c}" for c in flat.columns]
    flat.index = meta.index
    return flat[sorted(flat.columns)]


def activity_counts(
    images: pd.Series, runs: pd.DataFrame, clicks: pd.DataFrame, expert_cells: Mapping[str, int]
) -> pd.DataFrame:
    """What the store holds per image: ``n_runs`` (task runs, zero-click runs included),
    ``n_clicks`` and ``n_expert_cells`` (expert / gold cells), 0 where there are none.

    ``images``: image names (index kept); ``runs`` / ``clicks``: one row per task run / click
    with an ``image`` column; ``expert_cells``: image name -> number of expert cells.
    Returns a DataFrame with the index of ``images`` and those three int columns.
    """
    def per_image(counts: Mapping[str, int] | pd.Series) -> pd.Series:
        return images.map(counts).fillna(0).astype(int)

    return pd.DataFrame({
        "n_runs": per_image(runs["image"].value_counts()),
        "n_clicks": per_image(clicks["image"].value_counts()),
        "n_expert_cells": per_image(pd.Series(dict(expert_cells), dtype=int)),
    }, index=images.index)


def image_table(images: pd.DataFrame, cells: pd.DataFrame, left_out: pd.DataFrame) -> pd.DataFrame:
    """Per-image summary (one row per image, ordered by name).

    ``images``: from the store (image, width, height, ..., meta) with the columns of
    :func:`activity_counts` (n_runs, n_clicks, n_expert_cells); ``cells``: exported cells;
    ``left_out``: cells below the confidence threshold. Adds ``n_alive``, ``n_dead``,
    ``n_left_out``, ``viability_pct`` (100 * alive / (alive + dead), empty without cells)
    and flattened metadata columns.
    """
    counts = (
        cells.groupby(["image", "label"]).size().unstack(fill_value=0)
        if len(cells) else pd.DataFrame()
    )
    columns = ["image", "width", "height", "channels", "bit_depth", "has_pixels", "status", "sha256",
               "n_runs", "n_clicks", "n_expert_cells", "expert_empty"]
    out = images[[c for c in columns if c in images.columns]].copy()
    out["n_alive"] = out["image"].map(counts.get("alive", pd.Series(dtype=int))).fillna(0).astype(int)
    out["n_dead"] = out["image"].map(counts.get("dead", pd.Series(dtype=int))).fillna(0).astype(int)
    out["n_left_out"] = out["image"].map(left_out["image"].value_counts()).fillna(0).astype(int)
    total = out["n_alive"] + out["n_dead"]
    out["viability_pct"] = (100.0 * out["n_alive"] / total.where(total > 0)).round(2)
    meta = flatten_metadata(images["meta"])
    return pd.concat([out, meta], axis=1)


def labelled_images(table: pd.DataFrame) -> pd.Series:
    """True for every image someone labelled: it has a task run (one without clicks too: a
    student looked and found no cell), an expert cell, an expert's "no cells"
    (``expert_empty``), or a cell in the snapshot (at any confidence). False for an image
    nobody has seen yet, whose lack of cells means nothing.

    ``table``: :func:`image_table` (n_runs, n_expert_cells, n_alive, n_dead, n_left_out and,
    where present, expert_empty). Returns a bool Series with the index of ``table``.
    """
    snapshot_cells = table["n_alive"] + table["n_dead"] + table["n_left_out"]
    empty = table["expert_empty"].astype(bool) if "expert_empty" in table else False
    return (table["n_runs"] > 0) | (table["n_expert_cells"] > 0) | (snapshot_cells > 0) | empty


def image_splits(table: pd.DataFrame, fractions: Sequence[float], seed: int) -> dict[str, str]:
    """Split of every image of ``table`` (:func:`image_table`): :data:`UNLABELLED` for the
    images :func:`labelled_images` says nobody labelled, else the ``train`` / ``val`` /
    ``test`` that :func:`cellspot.crops.stratified_image_split` gives the image when it splits
    *every* image of the table.

    Splitting every image, not only the labelled ones, is deliberate: it is the rule of
    :func:`cellspot.ml.data.load_store`, so a model trained with the same fractions, seed and
    minimum confidence holds out the images this export puts in val / test. The split is
    stratified by each image's dead fraction, so it holds while the images and their counts
    hold: new images or changed cells can move an image to another split. Returns
    ``{image: split}``.
    """
    assignment = stratified_image_split(table[["image", "n_alive", "n_dead"]], fractions, seed=seed)
    for name in table.loc[~labelled_images(table), "image"]:
        assignment[name] = UNLABELLED
    return assignment


def coco_keypoints(images: pd.DataFrame, cells: pd.DataFrame, box_size: float = 96.0) -> dict[str, Any]:
    """COCO-style keypoint dataset: one keypoint ``[x, y, 2]`` (pixels) per cell.

    ``images``: image, width, height, split, in name order (an image's id is its 1-based
    row: its row in images.csv). Images whose split is :data:`UNLABELLED` are left out (a
    detector would take them for confirmed background); their ids are skipped.
    ``cells``: exported cells. ``score`` is the consensus confidence. Clicks give no
    extent, so ``bbox`` is the ``box_size`` square centred on the cell (the crop window;
    COCO tools require a box) clipped to the image (tools reject boxes that leave it), with
    ``area`` its area and ``iscrowd`` 0.
    """
    half = box_size / 2.0
    image_ids = {name: i + 1 for i, name in enumerate(images["image"])}
    images = images[images["split"] != UNLABELLED]
    size = {r.image: (float(r.width), float(r.height)) for r in images.itertuples(index=False)}

    def box(image: str, x: float, y: float) -> list[float]:
        width, height = size[image]
        x0, y0 = max(0.0, x - half), max(0.0, y - half)
        return [x0, y0, min(width, x + half) - x0, min(height, y + half) - y0]

    coco_images = [
        {"id": image_ids[r.image], "file_name": r.image, "width": int(r.width), "height": int(r.height),
         "split": r.split}
        for r in images.itertuples(index=False)
    ]
    category = {c["name"]: c["id"] for c in COCO_CATEGORIES}
    annotations = [
        {
            "id": i + 1,
            "image_id": image_ids[r.image],
            "category_id": category[r.label],
            "keypoints": [float(r.x), float(r.y), 2],
            "num_keypoints": 1,
            "bbox": (bbox := box(r.image, float(r.x), float(r.y))),
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
            "score": float(r.confidence),
            "p_alive": float(r.p_alive),
            "support": int(r.support),
            "from_gold": bool(r.from_gold),
        }
        for i, r in enumerate(cells.itertuples(index=False))
    ]
    return {
        "info": {"description": "cellspot consensus cells", "version": cellspot.__version__},
        "images": coco_images,
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }


#: the longest stem :func:`safe_stem` gives: file names hold at most 255 bytes, and a crop's
#: name adds the image id and the crop number to it
SAFE_STEM_MAX = 120


def safe_stem(name: str) -> str:
    """File-system-safe stem of an image name (``a/b c.tif`` -> ``a_b_c``), at most
    :data:`SAFE_STEM_MAX` characters (callers add the image id, which keeps names apart)."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", name)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:SAFE_STEM_MAX].strip("._") or "image"


# ---------------------------------------------------------------- writing


class _Writer:
    """Writes files under a root and remembers each file's sha256 and size."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}
        self._folders: set[Path] = set()

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        if path.parent not in self._folders:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(path.parent)
        path.write_bytes(data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_csv(self, rel: str, frame: pd.DataFrame) -> None:
        self.write_bytes(rel, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))

    def write_json(self, rel: str, obj: Any, expand: int | None = None) -> None:
        """Write ``obj`` as JSON: fully indented, or (``expand`` levels) with one item per line."""
        text = json.dumps(obj, indent=1, default=_json_default) if expand is None else _json_lines(obj, expand)
        self.write_bytes(rel, (text + "\n").encode("utf-8"))

    def write_png(self, rel: str, array: np.ndarray) -> None:
        buf = io.BytesIO()
        PILImage.fromarray(array).save(buf, format="PNG", compress_level=1)
        self.write_bytes(rel, buf.getvalue())


def _json_lines(obj: Any, expand: int, depth: int = 0) -> str:
    """JSON with the outer ``expand`` levels of lists / dicts indented and deeper values on one
    line each: readable (one cell per line) and fast (the C encoder does the rows)."""
    pad = " " * (depth + 1)
    if depth < expand and isinstance(obj, list) and obj:
        items = [pad + _json_lines(v, expand, depth + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad[:-1] + "]"
    if depth < expand and isinstance(obj, dict) and obj:
        items = [f"{pad}{json.dumps(str(k))}: {_json_lines(v, expand, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad[:-1] + "}"
    return json.dumps(obj, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (datetime, pd.Timestamp)):
        return _utc(obj).isoformat()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def _utc(value: datetime) -> datetime:
    """``value`` with its time zone; naive values (SQLite drops the zone) are UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _iso_utc(values: pd.Series) -> pd.Series:
    """Datetimes as ISO 8601 text in UTC (``2014-03-01T10:15:00+00:00``); missing stay empty."""
    text = {v: _utc(pd.Timestamp(v).to_pydatetime()).isoformat() for v in values.dropna().unique()}
    return values.map(text)  # one conversion per distinct value (a run's clicks share one)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready records: NaN -> None, numpy scalars -> Python."""
    return json.loads(frame.to_json(orient="records", date_format="iso", double_precision=15))


def _protected_paths(settings: Settings) -> list[tuple[Path, str]]:
    """Folders and files an export must never replace, with what they are: the store's home and
    its folders, a SQLite database file, and the current folder."""
    paths = [(settings.home, "the store's home (CELLSPOT_HOME)"), (settings.images_dir, "the store's images"),
             (settings.models_dir, "the store's models"), (settings.rejects_dir, "the store's rejects"),
             (settings.exports_dir, "the folder of all exports"), (Path.cwd(), "the current folder")]
    for url in (settings.resolved_database_url, settings.resolved_queue_url):
        if (file := sqlite_file(url)) is not None:
            paths.append((file, "a database of the store"))
    return [(p.resolve(), what) for p, what in paths]


def _check_outdir(outdir: Path, overwrite: bool, settings: Settings) -> None:
    """Refuse an ``outdir`` that is a file, that is or holds the store, its folders or the current
    folder, or (with ``overwrite``) a non-empty folder that is not an earlier export."""
    if outdir.exists() and not outdir.is_dir():
        raise OutputExistsError(f"export target {outdir} exists and is not a folder")
    target = outdir.resolve()
    for path, what in _protected_paths(settings):
        if path == target or path.is_relative_to(target):
            raise OutputExistsError(
                f"export folder {outdir} {'is' if path == target else 'holds'} {what} ({path}); "
                "choose a new folder, for example under the store's exports/ folder"
            )
    if outdir.is_dir() and any(outdir.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"export folder {outdir} is not empty; choose another folder, or replace an earlier export "
                "(--overwrite; overwrite=True in Python)"
            )
        if (problem := _not_an_earlier_export(outdir)) is not None:
            raise OutputExistsError(
                f"export folder {outdir} is not empty and {problem}; overwrite replaces only an earlier "
                "cellspot export as it was written: choose another folder"
            )


def _not_an_earlier_export(outdir: Path) -> str | None:
    """Why ``outdir`` may not be replaced as an earlier export (None when it may): it has no
    cellspot manifest, or it holds files the export did not write or that changed since."""
    try:
        manifest = json.loads((outdir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "is not an earlier export (it has no manifest.json)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its manifest.json is not a cellspot export manifest ({exc})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME \
            or not isinstance(manifest.get("files"), dict):
        return f"its manifest.json is not a cellspot export manifest (no \"format\": \"{FORMAT_NAME}\")"
    listed = manifest["files"]
    present = {p.relative_to(outdir).as_posix() for p in outdir.rglob("*") if p.is_file() or p.is_symlink()}
    others = sorted(present - set(listed) - {"manifest.json"})
    if others:
        return f"holds files the export did not write ({_some(others)})"
    changed = _changed_files(outdir, listed)[1]
    if changed:
        return f"holds files changed since the export ({_some(changed)})"
    return None


def _some(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _swap_into_place(tmp: Path, outdir: Path) -> None:
    """Replace ``outdir`` by ``tmp`` (rename; the old folder is removed only after the swap)."""
    old: Path | None = None
    if outdir.exists():
        old = outdir.parent / f".{outdir.name}.old-{uuid.uuid4().hex[:8]}"
        outdir.rename(old)
    try:
        tmp.rename(outdir)
    except OSError:
        if old is not None:
            old.rename(outdir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- crops


def _write_crops(
    writer: _Writer,
    cells: pd.DataFrame,
    images: pd.DataFrame,
    settings: Settings,
    crop_size: int,
    progress: ProgressCallback | None,
) -> tuple[pd.DataFrame, dict[str, int], dict[str, str]]:
    """Crop every exported cell of every image with readable pixels; returns (index, counts,
    unreadable images as name -> reason).

    An image whose file cannot be read (missing, truncated, corrupt) is skipped like an image
    without pixels: its cells stay in the tables, have no crop, and are counted
    (``cells_on_unreadable_images``). Plain numpy columns and dict lookups per image (no
    per-row pandas access): the time goes into reading images and encoding PNGs.
    """
    from cellspot.imaging import ImageReadError, read_image, to_model_rgb8

    info = {r["image"]: r for r in images[["image", "image_id", "path", "has_pixels", "split"]].to_dict("records")}
    groups = cells.groupby("image", sort=True).indices if len(cells) else {}
    x_all, y_all = cells["x"].to_numpy(float), cells["y"].to_numpy(float)
    label_all = cells["label"].to_numpy(object)
    p_all, c_all = cells["p_alive"].to_numpy(float), cells["confidence"].to_numpy(float)
    columns: dict[str, list[Any]] = {name: [] for name in CROP_INDEX_COLUMNS}
    skipped_cells = unreadable_cells = 0
    unreadable: dict[str, str] = {}
    todo = sorted(groups)
    for done, name in enumerate(todo, start=1):
        rows = groups[name]
        row = info[name]
        if not bool(row["has_pixels"]) or not row["path"]:
            skipped_cells += len(rows)
        else:
            try:
                loaded = read_image(settings.home / str(row["path"]), name)
            except ImageReadError as exc:
                log.warning("export: no crops for the %d cell(s) of image %r: cannot read %s: %s",
                            len(rows), name, settings.home / str(row["path"]), exc.reason)
                unreadable[name] = exc.reason
                unreadable_cells += len(rows)
            else:
                rgb = to_model_rgb8(loaded.array, loaded.bit_depth)
                stem = f"{safe_stem(name)}-{int(row['image_id'])}"
                split = row["split"]
                for i, k in enumerate(rows):
                    rel = f"{split}/{label_all[k]}/{stem}-{i:04d}.png"
                    writer.write_png(f"crops/{rel}", crop_around(rgb, x_all[k], y_all[k], crop_size))
                    for column, value in zip(
                        CROP_INDEX_COLUMNS, (rel, name, split, label_all[k], x_all[k], y_all[k], p_all[k], c_all[k])
                    ):
                        columns[column].append(value)
        if progress is not None:
            progress("crops", done, len(todo))
    index = pd.DataFrame(columns, columns=CROP_INDEX_COLUMNS)
    counts = {"cells_without_pixels": skipped_cells, "images_unreadable": len(unreadable),
              "cells_on_unreadable_images": unreadable_cells}
    return index, counts, unreadable


# ---------------------------------------------------------------- entry point


def export_dataset(
    session: Session,
    project: Project | str,
    outdir: Path | str,
    settings: Settings,
    crop_size: int = 96,
    split: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    snapshot: ConsensusSnapshot | int | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> ExportReport:
    """Export the clean dataset of ``project`` (see the module docstring for the layout).

    ``snapshot``: the consensus snapshot (object or id) to export; default the latest.
    ``crop_size``: side of the square crops in pixels (reflect padding at borders).
    ``split``: train/val/test fractions of *images*; ``seed`` makes the split reproducible
    (:func:`image_splits`; images nobody labelled get the split ``unlabelled``).
    ``min_confidence``: cells below it are left out of cells/COCO/crops, listed in
    ``cells_left_out.csv`` and counted in the manifest.
    ``overwrite``: replace a non-empty ``outdir`` (only once the new export is complete).
    ``progress``: optional ``progress(stage, done, total)`` callback (the CLI shows tqdm bars).
    ``project`` may be a :class:`Project` or its name.
    An image whose file cannot be read gets no crops (its cells stay in the tables); it is
    logged, counted and named in the manifest and in :attr:`ExportReport.unreadable`.
    Reads only; never commits. Raises :class:`NoSnapshotError`, :class:`OutputExistsError`,
    :class:`ExportError`, :class:`cellspot.crops.SplitError`.
    """
    fractions = validate_fractions(split)
    if isinstance(crop_size, bool) or not isinstance(crop_size, int) or not 1 <= crop_size <= MAX_CROP_SIZE:
        raise ExportError(f"crop size must be a whole number of pixels from 1 to {MAX_CROP_SIZE}; got {crop_size!r}")
    if not (0.0 <= float(min_confidence) <= 1.0):
        raise ExportError(f"min_confidence must be within [0, 1]; got {min_confidence!r}")
    outdir = Path(outdir)
    _check_outdir(outdir, overwrite, settings)
    project = queries.as_project(session, project)
    snap = resolve_snapshot(session, project, snapshot)

    images = _images_frame(session, project)
    all_cells = _cells_frame(session, snap)
    keep = all_cells["confidence"] >= float(min_confidence)
    cells, left_out = all_cells[keep].reset_index(drop=True), all_cells[~keep].reset_index(drop=True)
    runs = _runs_frame(session, project)
    clicks = _clicks_frame(session, runs, project)
    images = pd.concat(
        [images, activity_counts(images["image"], runs, clicks, _expert_cell_counts(session, project))], axis=1
    )
    annotators = _reliability_frame(session, snap)
    from cellspot.workflows.aggregate import snapshot_lag

    stale = snapshot_lag(session, project, snap)
    if stale:
        log.warning("export of %r: %s", project.name, stale)
    log.info("exporting snapshot %d of %r: %d images, %d cells (%d below %.2f), %d clicks",
             snap.id, project.name, len(images), len(cells), len(left_out), min_confidence, len(clicks))

    table = image_table(images, cells, left_out)
    # labelled or not as the snapshot saw it: an image first labelled after it has no cells in it
    # yet, and would be exported as a confirmed-empty training image
    seen = _seen_by(session, project, snap, table["image"], runs, clicks)
    assignment = image_splits(table.assign(**seen), fractions, seed)
    images["split"] = images["image"].map(assignment)
    table["split"] = table["image"].map(assignment)
    cells["split"] = cells["image"].map(assignment)
    left_out["split"] = left_out["image"].map(assignment)

    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = outdir.parent / f".{outdir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        writer = _Writer(tmp)
        writer.write_csv("cells.csv", cells[CELL_EXPORT_COLUMNS])
        writer.write_json("cells.json", _records(cells[CELL_EXPORT_COLUMNS]), expand=1)
        writer.write_csv("cells_left_out.csv", left_out[CELL_EXPORT_COLUMNS])
        writer.write_csv("clicks.csv", clicks)
        writer.write_csv("annotators.csv", annotators)
        writer.write_csv("images.csv", table)
        writer.write_json("coco_keypoints.json", coco_keypoints(images, cells, box_size=crop_size), expand=2)
        for s in SPLITS:
            for label in ("alive", "dead"):
                (tmp / "crops" / s / label).mkdir(parents=True, exist_ok=True)
        index, crop_counts, unreadable = _write_crops(writer, cells, images, settings, crop_size, progress)
        writer.write_csv("crops/index.csv", index)
        counts = _counts(images, cells, left_out, clicks, annotators, index, assignment, crop_counts, len(runs))
        manifest = _manifest(project, snap, counts, writer.files, crop_size, fractions, seed, min_confidence, stale,
                             unreadable)
        writer.write_json("manifest.json", manifest)
        _swap_into_place(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {rel: meta["sha256"] for rel, meta in writer.files.items()}
    log.info("export written to %s (%d files, %d crops)", outdir, len(files), counts["crops"])
    return ExportReport(outdir=outdir, manifest_path=outdir / "manifest.json", snapshot_id=snap.id,
                        method=snap.method, counts=counts, files=files, stale=stale, unreadable=unreadable)


def _counts(
    images: pd.DataFrame,
    cells: pd.DataFrame,
    left_out: pd.DataFrame,
    clicks: pd.DataFrame,
    annotators: pd.DataFrame,
    index: pd.DataFrame,
    assignment: dict[str, str],
    crop_counts: dict[str, int],
    n_runs: int,
) -> dict[str, Any]:
    per_split_label = {
        s: {lab: int(((index["split"] == s) & (index["label"] == lab)).sum()) for lab in ("alive", "dead")}
        for s in SPLITS
    }
    labelled = {name: split for name, split in assignment.items() if split != UNLABELLED}
    return {
        "images": len(images),
        "images_with_pixels": int(images["has_pixels"].sum()),
        "images_without_pixels": int((~images["has_pixels"].astype(bool)).sum()),
        "images_unreadable": crop_counts["images_unreadable"],
        "images_labelled": len(labelled),
        "images_unlabelled": len(assignment) - len(labelled),
        "images_per_split": split_counts(labelled),
        "cells_in_snapshot": len(cells) + len(left_out),
        "cells_exported": len(cells),
        "cells_alive": int((cells["label"] == "alive").sum()),
        "cells_dead": int((cells["label"] == "dead").sum()),
        "cells_below_min_confidence": len(left_out),
        "cells_without_pixels": crop_counts["cells_without_pixels"],
        "cells_on_unreadable_images": crop_counts["cells_on_unreadable_images"],
        "crops": len(index),
        "crops_per_split": per_split_label,
        "clicks": len(clicks),
        "task_runs": n_runs,
        "task_runs_with_clicks": int(clicks["task_run"].nunique()) if len(clicks) else 0,
        "annotators": len(annotators),
    }


def _manifest(
    project: Project,
    snap: ConsensusSnapshot,
    counts: dict[str, Any],
    files: dict[str, dict[str, Any]],
    crop_size: int,
    fractions: tuple[float, float, float],
    seed: int,
    min_confidence: float,
    stale: str | None,
    unreadable: Mapping[str, str],
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "cellspot_version": cellspot.__version__,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "project": {"id": project.id, "name": project.name},
        "snapshot": {
            "id": snap.id, "method": snap.method, "params": snap.params, "stats": snap.stats,
            "created_at": snap.created_at,
            "up_to_date": stale is None, "behind_the_store": stale,
        },
        "crop_size": crop_size,
        "crop_path_relative_to": "crops/",
        "split": dict(zip(SPLITS, fractions)),
        "split_by": "image, stratified by dead fraction; images nobody labelled (no task run, expert cell "
                    f"or snapshot cell) are {UNLABELLED!r}",
        "seed": seed,
        "min_confidence": float(min_confidence),
        "counts": counts,
        # image -> why its file could not be read (its cells have no crops)
        "unreadable_images": dict(sorted(unreadable.items())),
        "files": dict(sorted(files.items())),
    }


def verify_export(outdir: Path | str) -> list[str]:
    """Check every file listed in ``manifest.json`` against its sha256; returns the problems (empty if fine)."""
    outdir = Path(outdir)
    missing, changed = _changed_files(outdir, json.loads((outdir / "manifest.json").read_text())["files"])
    return sorted([f"{rel}: missing" for rel in missing] + [f"{rel}: checksum differs" for rel in changed])


def _changed_files(outdir: Path, listed: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The files of a manifest's ``files`` table that are missing from ``outdir``, and those whose
    sha256 differs, each sorted."""
    missing, changed = [], []
    for rel, meta in sorted(listed.items()):
        path = outdir / rel
        if not path.is_file():
            missing.append(rel)
        elif hashlib.sha256(path.read_bytes()).hexdigest() != meta.get("sha256"):
            changed.append(rel)
    return missing, changed

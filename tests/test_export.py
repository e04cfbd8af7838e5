"""Clean-dataset export on a tiny hand-made store (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from cellspot.crops import SPLITS, SplitError, stratified_image_split
from cellspot.export import (
    UNLABELLED,
    ExportError,
    NoSnapshotError,
    OutputExistsError,
    activity_counts,
    export_choices,
    export_dataset,
    flatten_metadata,
    image_splits,
    image_table,
    labelled_images,
    safe_stem,
    verify_export,
)
from cellspot.store import queries
from cellspot.store.models import AnnotatorReliability, ConsensusCell, ConsensusSnapshot, GoldCell, Image

W, H = 40, 30
CROP = 16
EXPECTED_FILES = [
    "manifest.json", "cells.csv", "cells.json", "cells_left_out.csv", "clicks.csv", "annotators.csv",
    "images.csv", "coco_keypoints.json", "crops/index.csv",
]
# (x, y, label, confidence) per image with pixels; the first four lie on or at the border.
CELLS = [
    (0.0, 0.0, "alive", 0.95),
    (W - 1, H - 1, "dead", 0.9),
    (W - 0.5, 0.2, "alive", 0.8),
    (0.3, H - 0.1, "dead", 0.99),
    (20.0, 15.0, "alive", 0.97),
    (10.0, 12.0, "alive", 0.3),  # below the threshold: left out and counted
]
N_LOW = sum(1 for c in CELLS if c[3] < 0.5)


@dataclass
class Store:
    project: object
    snapshot: ConsensusSnapshot
    n_pixel_images: int
    n_clicks: int


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path)


def _pixels(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "grey8":
        return rng.integers(0, 256, (H, W), dtype=np.uint8)
    if kind == "rgb8":
        return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return rng.integers(0, 4096, (H, W), dtype=np.uint16)  # 16-bit grey


def _build_store(session, settings, n_pixel_images: int = 10) -> Store:
    project = queries.get_or_create_project(session, "exp")
    kinds = ["grey8", "rgb8", "grey16"]
    images = []
    for i in range(n_pixel_images):
        kind = kinds[i % 3]
        rel = f"images/exp/img{i:02d}.png"
        arr = _pixels(kind, i)
        _write_png(settings.home / rel, arr)
        img = Image(project_id=project.id, name=f"img{i:02d}.png", path=rel, sha256=f"{i:064x}",
                    width=W, height=H, channels=3 if kind == "rgb8" else 1,
                    bit_depth=16 if kind == "grey16" else 8, has_pixels=True,
                    meta={"condition": "drug" if i % 2 else "control", "dose": {"value": i, "unit": "uM"}})
        session.add(img)
        images.append(img)
    nopix = Image(project_id=project.id, name="feb2013-1-1.jpg", path=None, width=W, height=H,
                  has_pixels=False, meta={})
    session.add(nopix)
    session.flush()

    students = [queries.get_or_create_annotator(session, project, f"s{k}", "DEMO") for k in range(2)]
    n_clicks = 0
    for img in [*images, nopix]:
        for k, student in enumerate(students):
            clicks = [(min(x, W - 0.01), min(y, H - 0.01), lab) for x, y, lab, _ in CELLS[: 3 + k]]
            queries.submit_task_run(session, img, student, clicks, client_key=f"{img.name}-{k}")
            n_clicks += len(clicks)

    snap = ConsensusSnapshot(project_id=project.id, method="hand", params={"radius": 7.0}, stats={})
    session.add(snap)
    session.flush()
    # Image i gets a varying share of dead cells so the stratified split has something to do.
    for i, img in enumerate([*images, nopix]):
        for j, (x, y, label, conf) in enumerate(CELLS):
            if label == "dead" and (i + j) % 3 == 0:
                label = "alive"
            session.add(ConsensusCell(
                snapshot_id=snap.id, image_id=img.id, x=x, y=y, label=label,
                p_alive=conf if label == "alive" else 1 - conf, confidence=conf,
                support=2, n_runs=2, p_cell=0.9, from_gold=(j == 0),
            ))
    for student in students:
        session.add(AnnotatorReliability(
            snapshot_id=snap.id, annotator_id=student.id, sensitivity=0.9, precision=0.8,
            accuracy_alive=0.95, accuracy_dead=0.9, weight=1.0, n_runs=len(images) + 1, n_clicks=10,
        ))
    session.flush()
    return Store(project, snap, n_pixel_images, n_clicks)


@pytest.fixture
def store(session, settings) -> Store:
    return _build_store(session, settings)


@pytest.fixture
def exported(session, settings, store, tmp_path):
    out = tmp_path / "out" / "ds"
    report = export_dataset(session, store.project, out, settings, crop_size=CROP, seed=1)
    return report, out


def _read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / name)


def test_every_file_is_written_and_checksums_verify(exported):
    report, out = exported
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, meta in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["bytes"]
    assert verify_export(out) == []
    assert report.manifest_path == out / "manifest.json"
    assert not list(out.parent.glob(".ds.*")), "temporary folder left behind"


def test_manifest_counts_match_the_files(exported, store):
    report, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    cells, left_out, index = _read(out, "cells.csv"), _read(out, "cells_left_out.csv"), _read(out, "crops/index.csv")
    n_images = store.n_pixel_images + 1
    assert counts["images"] == n_images == len(_read(out, "images.csv"))
    assert counts["images_without_pixels"] == 1
    assert counts["cells_in_snapshot"] == n_images * len(CELLS)
    assert counts["cells_below_min_confidence"] == n_images * N_LOW == len(left_out)
    assert (left_out["confidence"] < 0.5).all() and (cells["confidence"] >= 0.5).all()
    assert counts["cells_exported"] == len(cells) == n_images * (len(CELLS) - N_LOW)
    assert counts["cells_alive"] + counts["cells_dead"] == len(cells)
    assert counts["cells_without_pixels"] == len(CELLS) - N_LOW
    assert counts["crops"] == len(index) == len(cells) - counts["cells_without_pixels"]
    pngs = list((out / "crops").rglob("*.png"))
    assert len(pngs) == len(index)
    per_split = counts["crops_per_split"]
    assert sum(v for d in per_split.values() for v in d.values()) == len(index)
    assert counts["clicks"] == store.n_clicks == len(_read(out, "clicks.csv"))
    assert counts["annotators"] == 2 == len(_read(out, "annotators.csv"))
    assert sum(counts["images_per_split"].values()) == n_images
    assert manifest["snapshot"]["id"] == store.snapshot.id and manifest["snapshot"]["method"] == "hand"
    assert manifest["snapshot"]["params"] == {"radius": 7.0}
    assert manifest["crop_size"] == CROP and manifest["seed"] == 1
    assert manifest["split"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert report.n_crops == len(index) and report.n_cells == len(cells)


def test_no_image_is_in_two_splits(exported):
    _, out = exported
    images = _read(out, "images.csv")
    split_of = dict(zip(images["image"], images["split"]))
    for name in ("cells.csv", "crops/index.csv", "cells_left_out.csv"):
        table = _read(out, name)
        assert (table.groupby("image")["split"].nunique() == 1).all(), name
        assert (table["image"].map(split_of) == table["split"]).all(), name
    index = _read(out, "crops/index.csv")
    for row in index.itertuples():
        assert row.crop_path.startswith(f"{row.split}/{row.label}/")
        assert (out / "crops" / row.crop_path).is_file()
    coco = json.loads((out / "coco_keypoints.json").read_text())
    assert {i["file_name"]: i["split"] for i in coco["images"]} == split_of


def test_border_cells_are_cropped_full_size(exported):
    _, out = exported
    index = _read(out, "crops/index.csv")
    border = index[(index["x"] < 1) | (index["y"] < 1) | (index["x"] > W - 2) | (index["y"] > H - 2)]
    n_border = sum(1 for x, y, _, c in CELLS if c >= 0.5 and (x < 1 or y < 1 or x > W - 2 or y > H - 2))
    assert n_border == 4
    assert len(border) == n_border * 10  # every image with pixels keeps its border cells
    for rel in border["crop_path"]:
        arr = np.asarray(PILImage.open(out / "crops" / rel))
        assert arr.shape == (CROP, CROP, 3) and arr.dtype == np.uint8


def test_crop_pixels_come_from_the_image(exported, settings):
    _, out = exported
    index = _read(out, "crops/index.csv")
    row = index[(index["image"] == "img01.png") & (index["x"] == 20.0)].iloc[0]  # RGB image, centre cell
    crop = np.asarray(PILImage.open(out / "crops" / row["crop_path"]))
    original = np.asarray(PILImage.open(settings.home / "images/exp/img01.png"))
    np.testing.assert_array_equal(crop, original[15 - CROP // 2 : 15 + CROP // 2, 20 - CROP // 2 : 20 + CROP // 2])


def test_tables_have_the_documented_columns(exported):
    _, out = exported
    cells = _read(out, "cells.csv")
    assert list(cells.columns) == [
        "image", "x", "y", "label", "p_alive", "confidence", "support", "n_runs", "p_cell", "from_gold", "split",
    ]
    assert json.loads((out / "cells.json").read_text())[0].keys() == set(cells.columns)
    assert list(_read(out, "crops/index.csv").columns) == [
        "crop_path", "image", "split", "label", "x", "y", "p_alive", "confidence",
    ]
    annotators = _read(out, "annotators.csv")
    assert {"nickname", "class_code", "role", "weight", "accuracy_dead"} <= set(annotators.columns)
    assert set(annotators["class_code"]) == {"DEMO"}
    clicks = _read(out, "clicks.csv")
    assert {"image", "task_run", "annotator", "nickname", "x", "y", "label"} <= set(clicks.columns)
    images = _read(out, "images.csv").set_index("image")
    assert {"meta_condition", "meta_dose.value", "meta_dose.unit", "viability_pct", "status"} <= set(images.columns)
    row = images.loc["img00.png"]
    assert row["viability_pct"] == pytest.approx(100 * row["n_alive"] / (row["n_alive"] + row["n_dead"]), abs=0.01)
    assert row["n_left_out"] == N_LOW


def test_coco_keypoints(exported):
    _, out = exported
    coco = json.loads((out / "coco_keypoints.json").read_text())
    cells = _read(out, "cells.csv")
    assert [c["name"] for c in coco["categories"]] == ["alive", "dead"]
    assert len(coco["annotations"]) == len(cells)
    sizes = {i["id"]: (i["width"], i["height"]) for i in coco["images"]}
    for ann in coco["annotations"]:
        x, y, v = ann["keypoints"]
        assert v == 2 and 0 <= x <= sizes[ann["image_id"]][0] and 0 <= y <= sizes[ann["image_id"]][1]
        assert 0.5 <= ann["score"] <= 1
        bx, by, bw, bh = ann["bbox"]  # the crop window centred on the keypoint, clipped to the image
        width, height = sizes[ann["image_id"]]
        assert 0 <= bx <= x <= bx + bw <= width and 0 <= by <= y <= by + bh <= height and bw > 0 and bh > 0
        if CROP / 2 <= x <= width - CROP / 2 and CROP / 2 <= y <= height - CROP / 2:
            assert (bx + bw / 2, by + bh / 2) == pytest.approx((x, y)) and bw == bh == CROP
        assert ann["area"] == pytest.approx(bw * bh) and ann["iscrowd"] == 0
    clipped = [a for a in coco["annotations"] if a["bbox"][2] < CROP or a["bbox"][3] < CROP]
    assert clipped, "the fixture has border cells: some boxes are clipped"


def test_min_confidence_threshold_moves_cells_out(session, settings, store, tmp_path):
    calls = []
    report = export_dataset(session, "exp", tmp_path / "hi", settings, crop_size=8, min_confidence=0.96,
                            progress=lambda *args: calls.append(args))
    assert calls[-1] == ("crops", 11, 11) and len(calls) == 11
    n_kept_per_image = sum(1 for c in CELLS if c[3] >= 0.96)
    assert report.counts["cells_exported"] == 11 * n_kept_per_image
    assert report.counts["cells_below_min_confidence"] == 11 * (len(CELLS) - n_kept_per_image)


def test_refuses_a_non_empty_folder_unless_overwrite(session, settings, store, tmp_path):
    out = tmp_path / "exports" / "ds"
    out.mkdir(parents=True)
    export_dataset(session, store.project, out, settings, crop_size=8)  # empty folder is fine
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_dataset(session, store.project, out, settings, crop_size=8)
    assert (out / "mine.txt").exists()
    # an earlier export with a file of the user's in it is not replaced either: it would be lost
    with pytest.raises(OutputExistsError, match=r"holds files the export did not write \(mine.txt\)"):
        export_dataset(session, store.project, out, settings, crop_size=8, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()
    export_dataset(session, store.project, out, settings, crop_size=8, overwrite=True)
    assert verify_export(out) == []
    assert [p.name for p in out.parent.iterdir()] == ["ds"]  # no temporary or old folders left


@pytest.mark.parametrize("where, what", [
    ("home", "the store's home"), ("home/images", "the store's images"), ("home/exports", "the folder of all exports"),
    (".", "the store's home"),
])
def test_never_replaces_the_store_even_with_overwrite(session, settings, store, tmp_path, where, what):
    target = tmp_path / where
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExistsError, match=f"(is|holds) {what}"):
        export_dataset(session, store.project, target, settings, crop_size=8, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert queries.as_project(session, store.project.name).id == store.project.id  # the store still answers


def test_never_replaces_a_sqlite_database_outside_the_home(tmp_path):
    from cellspot.export import _check_outdir
    from cellspot.settings import Settings

    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "store.db").write_bytes(b"")
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'db' / 'store.db'}")
    with pytest.raises(OutputExistsError, match="holds a database of the store"):
        _check_outdir(tmp_path / "db", True, settings)
    _check_outdir(tmp_path / "new", False, settings)  # a new folder beside them is fine


def test_never_replaces_the_current_folder(session, settings, store, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    with pytest.raises(OutputExistsError, match="holds the current folder"):
        export_dataset(session, store.project, work, settings, crop_size=8, overwrite=True)
    assert (work / "sub").is_dir()


def test_overwrite_replaces_only_an_earlier_export(session, settings, store, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("months of work")
    with pytest.raises(OutputExistsError, match="not an earlier export .*no manifest.json"):
        export_dataset(session, store.project, folder, settings, crop_size=8, overwrite=True)
    assert (folder / "chapter1.txt").read_text() == "months of work"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing half-written


@pytest.mark.parametrize("manifest", ['{"name": "my-extension"}', "not json", '{"format": "cellspot-dataset"}'])
def test_overwrite_needs_a_cellspot_manifest(session, settings, store, tmp_path, manifest):
    folder = tmp_path / "webext"
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest)
    (folder / "src" / "important.py").write_text("print('work')")
    with pytest.raises(OutputExistsError, match="is not a cellspot export manifest"):
        export_dataset(session, store.project, folder, settings, crop_size=8, overwrite=True)
    assert (folder / "src" / "important.py").read_text() == "print('work')"


def test_overwrite_refuses_an_export_whose_files_were_edited(session, settings, store, tmp_path):
    out = tmp_path / "ds"
    export_dataset(session, store.project, out, settings, crop_size=8)
    with (out / "cells.csv").open("a") as f:
        f.write("my,hand,made,row\n")
    with pytest.raises(OutputExistsError, match=r"changed since the export \(cells.csv\)"):
        export_dataset(session, store.project, out, settings, crop_size=8, overwrite=True)
    assert (out / "cells.csv").read_text().endswith("my,hand,made,row\n")


def test_failed_export_leaves_nothing_behind(session, settings, store, tmp_path, monkeypatch):
    import cellspot.export as export_module

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "crop_around", boom)
    parent = tmp_path / "exports"
    with pytest.raises(RuntimeError, match="disk full"):
        export_dataset(session, store.project, parent / "ds", settings)
    assert list(parent.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_export(session, settings, store, tmp_path, monkeypatch):
    import cellspot.export as export_module

    out = tmp_path / "ds"
    export_dataset(session, store.project, out, settings, crop_size=8)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(export_module, "crop_around", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_dataset(session, store.project, out, settings, overwrite=True)
    assert (out / "manifest.json").read_bytes() == before


def _spoil(path: Path, how: str) -> None:
    """Make the image file at ``path`` unreadable: cut short, overwritten, emptied or removed."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif how == "not an image":
        path.write_text("not an image\n")
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "not an image", "empty", "missing"])
def test_an_unreadable_image_is_skipped_counted_and_named(session, settings, store, tmp_path, how):
    """One corrupt image file failed the whole export ("cannot read the pixels of image ...")
    and wrote nothing. It is skipped like an image without pixels: its cells stay in the
    tables, it has no crops, and the manifest counts and names it."""
    _spoil(settings.home / "images/exp/img03.png", how)
    report = export_dataset(session, store.project, tmp_path / "ds", settings, crop_size=CROP, seed=1)
    out = tmp_path / "ds"
    assert verify_export(out) == [] and not list(tmp_path.glob(".ds.*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["unreadable_images"]) == ["img03.png"] == list(report.unreadable)
    assert manifest["unreadable_images"]["img03.png"] == report.unreadable["img03.png"] != ""
    assert str(settings.home) not in manifest["unreadable_images"]["img03.png"]  # the reason, not the path
    counts = manifest["counts"]
    n_kept = len(CELLS) - N_LOW
    assert counts["images_unreadable"] == 1 and counts["cells_on_unreadable_images"] == n_kept
    assert counts["cells_without_pixels"] == n_kept  # the image without pixels, as before
    cells, index = _read(out, "cells.csv"), _read(out, "crops/index.csv")
    assert (cells["image"] == "img03.png").sum() == n_kept  # the cells stay in the tables
    assert "img03.png" not in set(index["image"])
    assert counts["crops"] == len(index) == len(cells) - 2 * n_kept
    assert set(index["image"]) == {f"img{i:02d}.png" for i in range(10)} - {"img03.png"}


def test_an_unreadable_image_is_logged(session, settings, store, tmp_path, caplog):
    _spoil(settings.home / "images/exp/img03.png", "truncated")
    with caplog.at_level("WARNING", logger="cellspot.export"):
        export_dataset(session, store.project, tmp_path / "ds", settings, crop_size=CROP)
    assert "no crops for the 5 cell(s) of image 'img03.png'" in caplog.text


def test_a_readable_export_names_no_unreadable_image(exported):
    report, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unreadable_images"] == {} == report.unreadable
    assert manifest["counts"]["images_unreadable"] == 0 == manifest["counts"]["cells_on_unreadable_images"]


def test_without_snapshot_says_to_run_aggregate(session, settings, tmp_path):
    project = queries.get_or_create_project(session, "empty")
    with pytest.raises(NoSnapshotError, match="cellspot aggregate"):
        export_dataset(session, project, tmp_path / "ds", settings)
    assert not (tmp_path / "ds").exists()


def test_explicit_snapshot_must_belong_to_the_project(session, settings, store, tmp_path):
    other = queries.get_or_create_project(session, "other")
    with pytest.raises(NoSnapshotError, match="does not exist"):
        export_dataset(session, other, tmp_path / "ds", settings, snapshot=store.snapshot.id)
    report = export_dataset(session, store.project, tmp_path / "ds", settings, snapshot=store.snapshot.id)
    assert report.snapshot_id == store.snapshot.id


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"crop_size": 0}, ExportError, "crop size"),
        ({"crop_size": 9.5}, ExportError, "crop size"),
        ({"crop_size": 100_000}, ExportError, "crop size must be a whole number of pixels from 1 to 1024"),
        ({"min_confidence": 1.5}, ExportError, "min_confidence"),
        ({"split": (0.8, 0.3, 0.1)}, SplitError, "sum to 1"),
        ({"split": (0.8, 0.2)}, SplitError, "3 fractions"),
    ],
)
def test_bad_parameters(session, settings, store, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        export_dataset(session, store.project, tmp_path / "ds", settings, **kwargs)


def test_same_seed_same_split(session, settings, store, tmp_path):
    a = export_dataset(session, store.project, tmp_path / "a", settings, crop_size=8, seed=4)
    b = export_dataset(session, store.project, tmp_path / "b", settings, crop_size=8, seed=4)
    same = ["cells.csv", "crops/index.csv", "images.csv", "coco_keypoints.json", "clicks.csv"]
    assert {k: a.files[k] for k in same} == {k: b.files[k] for k in same}


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.png", "a"), ("dir/b c.tif", "dir_b_c"), ("feb2013-33-23.jpg", "feb2013-33-23"), ("cells1", "cells1"),
     ("..", "image"), ("x.tar.gz", "x.tar")],
)
def test_safe_stem(name, expected):
    assert safe_stem(name) == expected


def test_an_image_named_longer_than_a_file_name_can_be_exported(session, settings, store, tmp_path):
    """A 300-character image name (a zip member, a click CSV) failed the whole export with
    "File name too long" on its crops."""
    image = session.scalar(select(Image).where(Image.name == "img00.png"))
    image.name = "m" * 300 + ".png"
    session.flush()
    report = export_dataset(session, store.project, tmp_path / "ds", settings, crop_size=CROP, seed=1)
    index = pd.read_csv(tmp_path / "ds" / "crops" / "index.csv")
    mine = index[index["image"] == image.name]
    assert len(mine) > 0 and report.n_crops == len(index)
    paths = mine["crop_path"]
    assert all(len(Path(p).name) < 200 and (tmp_path / "ds" / "crops" / p).is_file() for p in paths)


def test_flatten_metadata():
    meta = pd.Series([{"drug": "taxol", "dose": {"v": 1}}, None, {"time": 3}], index=[5, 6, 7])
    flat = flatten_metadata(meta)
    assert list(flat.columns) == ["meta_dose.v", "meta_drug", "meta_time"]
    assert list(flat.index) == [5, 6, 7]
    assert flat.loc[5, "meta_drug"] == "taxol" and pd.isna(flat.loc[6, "meta_drug"])
    assert flatten_metadata(pd.Series([{}, None])).shape == (2, 0)


def test_image_table_counts_and_viability():
    images = pd.DataFrame({
        "image": ["a", "b"], "width": [10, 10], "height": [5, 5], "channels": [1, 3], "bit_depth": [8, 8],
        "has_pixels": [True, False], "status": ["active", "retired"], "sha256": ["x", None], "meta": [{}, {}],
        "n_runs": [3, 0], "n_clicks": [4, 0], "n_expert_cells": [0, 0],
    })
    cells = pd.DataFrame({"image": ["a", "a", "a", "a"], "label": ["alive", "alive", "alive", "dead"]})
    left = pd.DataFrame({"image": ["b"], "label": ["dead"]})
    table = image_table(images, cells, left).set_index("image")
    assert table.loc["a", ["n_alive", "n_dead", "n_left_out"]].tolist() == [3, 1, 0]
    assert table.loc["a", "viability_pct"] == 75.0
    assert table.loc["b", ["n_alive", "n_dead", "n_left_out"]].tolist() == [0, 0, 1]
    assert pd.isna(table.loc["b", "viability_pct"])
    assert table.loc["a", ["n_runs", "n_clicks", "n_expert_cells"]].tolist() == [3, 4, 0]


def test_cli_export_without_snapshot_says_to_aggregate(settings, sqlite_engine, tmp_path):
    from click.testing import CliRunner

    from cellspot.cli import main
    from cellspot.store.db import transaction

    with transaction(sqlite_engine) as session:
        queries.get_or_create_project(session, "fresh")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "ds"), "--project", "fresh"])
    assert result.exit_code != 0
    assert "cellspot aggregate --project fresh" in result.output
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------- labelled / unlabelled images


def _add_image(session, settings, project, name: str) -> Image:
    """An image with pixels and nothing else: no task run, no expert cell, no consensus cell."""
    rel = f"images/exp/{name}"
    _write_png(settings.home / rel, _pixels("grey8", len(name)))
    image = Image(project_id=project.id, name=name, path=rel, sha256=hashlib.sha256(name.encode()).hexdigest(),
                  width=W, height=H, has_pixels=True, meta={})
    session.add(image)
    session.flush()
    return image


@pytest.fixture
def mixed(session, settings, store) -> Store:
    """The store plus an image nobody saw, one a student looked at and found empty (a run
    without clicks), and one with only an expert cell (added after the snapshot)."""
    _add_image(session, settings, store.project, "unseen.png")
    empty = _add_image(session, settings, store.project, "looked-empty.png")
    student = queries.get_or_create_annotator(session, store.project, "s0", "DEMO")
    queries.submit_task_run(session, empty, student, [], client_key="looked-empty-0")
    expert = _add_image(session, settings, store.project, "expert.png")
    session.add(GoldCell(image_id=expert.id, x=5.0, y=6.0, label="dead"))
    _add_image(session, settings, store.project, "expert-empty.png").expert_empty = True  # the Review's "no cells"
    session.flush()
    _snapshot_saw_everything(session, store)
    return store


def _snapshot_saw_everything(session, store) -> None:
    """The latest snapshot dated now, as if computed after the runs and expert cells above (an
    export decides "labelled" from what its snapshot saw)."""
    from cellspot.store.models import utcnow

    queries.latest_snapshot(session, store.project).created_at = utcnow()
    session.flush()


def test_images_labelled_after_the_snapshot_are_not_exported_as_empty(session, settings, store, tmp_path):
    """Two students marked cells on an image after the snapshot: it was exported with no cells
    and a train split (a detector would learn it as background)."""
    late = _add_image(session, settings, store.project, "late.png")
    for k in range(2):
        student = queries.get_or_create_annotator(session, store.project, f"late{k}", "DEMO")
        queries.submit_task_run(session, late, student, [(5.0, 6.0, "alive"), (20.0, 9.0, "dead")],
                                client_key=f"late-{k}")
    session.flush()
    export_dataset(session, store.project, tmp_path / "ds", settings, crop_size=CROP, seed=1)
    images = _read(tmp_path / "ds", "images.csv").set_index("image")
    assert images.loc["late.png", ["n_runs", "n_clicks", "n_alive", "n_dead"]].tolist() == [2, 4, 0, 0]
    assert images.loc["late.png", "split"] == UNLABELLED
    coco = json.loads((tmp_path / "ds" / "coco_keypoints.json").read_text())
    assert "late.png" not in {i["file_name"] for i in coco["images"]}


def test_images_nobody_labelled_are_not_exported_as_empty(session, settings, mixed, tmp_path):
    """An image no student ever saw got n_alive 0, n_dead 0 and a train/val/test split, like
    an image students checked and found empty, and was a COCO image without annotations (a
    detector learns it as background)."""
    report = export_dataset(session, mixed.project, tmp_path / "ds", settings, crop_size=CROP, seed=1)
    out = tmp_path / "ds"
    images = _read(out, "images.csv").set_index("image")
    assert {"n_runs", "n_clicks", "n_expert_cells"} <= set(images.columns)
    columns = ["n_runs", "n_clicks", "n_expert_cells", "n_alive", "n_dead"]
    assert images.loc["unseen.png", columns].tolist() == [0, 0, 0, 0, 0]
    assert images.loc["looked-empty.png", columns].tolist() == [1, 0, 0, 0, 0]
    assert images.loc["expert.png", columns].tolist() == [0, 0, 1, 0, 0]
    assert images.loc["expert-empty.png", columns].tolist() == [0, 0, 0, 0, 0]
    assert images["expert_empty"].tolist() == [name == "expert-empty.png" for name in images.index]
    assert images.loc["expert-empty.png", "split"] in SPLITS  # confirmed empty: labelled
    assert images.loc["img00.png", ["n_runs", "n_clicks"]].tolist() == [2, 3 + 4]
    assert images.loc["unseen.png", "split"] == UNLABELLED
    assert images.drop(index="unseen.png")["split"].isin(SPLITS).all()

    coco = json.loads((out / "coco_keypoints.json").read_text())
    names = [i["file_name"] for i in coco["images"]]
    assert "unseen.png" not in names and {"looked-empty.png", "expert.png", "expert-empty.png"} <= set(names)
    rows = {name: i + 1 for i, name in enumerate(images.index)}  # a COCO id is the row in images.csv
    assert {i["file_name"]: i["id"] for i in coco["images"]} == {n: rows[n] for n in names}
    assert {a["image_id"] for a in coco["annotations"]} <= {i["id"] for i in coco["images"]}

    counts = json.loads((out / "manifest.json").read_text())["counts"]
    n_images = mixed.n_pixel_images + 1 + 4
    assert counts["images"] == n_images == len(images)
    assert counts["images_unlabelled"] == 1 == report.counts["images_unlabelled"]
    assert counts["images_labelled"] == n_images - 1 == sum(counts["images_per_split"].values())
    assert "unseen.png" not in set(_read(out, "crops/index.csv")["image"])
    assert sorted(p.name for p in (out / "crops").iterdir() if p.is_dir()) == sorted(SPLITS)


def test_labelled_images_keep_the_split_a_model_trains_with(session, settings, mixed, tmp_path):
    """The split of the labelled images is still the one :func:`cellspot.ml.data.load_store`
    gives them (stratified over every image): leaving the unlabelled images out of the
    split would move labelled images between train, val and test."""
    from cellspot.ml.data import load_store

    export_dataset(session, mixed.project, tmp_path / "ds", settings, crop_size=CROP, seed=3)
    exported = _read(tmp_path / "ds", "images.csv").set_index("image")["split"]
    data = load_store(session, settings, mixed.project, seed=3)
    assert len(data.images) == mixed.n_pixel_images
    assert {im.name: im.split for im in data.images} == {im.name: exported[im.name] for im in data.images}


def test_every_exported_cell_is_on_a_labelled_image(session, settings, mixed, tmp_path):
    export_dataset(session, mixed.project, tmp_path / "ds", settings, crop_size=CROP, min_confidence=0.0)
    for name in ("cells.csv", "crops/index.csv"):
        assert _read(tmp_path / "ds", name)["split"].isin(SPLITS).all(), name


@pytest.mark.parametrize(
    ("n_runs", "n_expert_cells", "n_alive", "n_dead", "n_left_out", "labelled"),
    [
        (0, 0, 0, 0, 0, False),  # nobody saw it
        (1, 0, 0, 0, 0, True),   # a student looked and found no cell
        (3, 0, 2, 1, 0, True),
        (0, 2, 0, 0, 0, True),   # expert cells only (not yet in the snapshot)
        (0, 0, 1, 0, 0, True),   # cells in the snapshot, runs since removed
        (0, 0, 0, 0, 1, True),   # only cells below the minimum confidence
    ],
)
def test_labelled_images(n_runs, n_expert_cells, n_alive, n_dead, n_left_out, labelled):
    table = pd.DataFrame({"image": ["a"], "n_runs": [n_runs], "n_expert_cells": [n_expert_cells],
                          "n_alive": [n_alive], "n_dead": [n_dead], "n_left_out": [n_left_out]}, index=[7])
    result = labelled_images(table)
    assert list(result.index) == [7] and bool(result.iloc[0]) is labelled


def test_image_splits_mark_unlabelled_images_and_keep_the_others():
    rng = np.random.default_rng(0)
    n = 40
    seen = np.arange(n) % 4 != 0  # every fourth image: nobody saw it
    table = pd.DataFrame({
        "image": [f"im{i:02d}" for i in range(n)], "n_runs": 3 * seen, "n_expert_cells": 0,
        "n_alive": rng.integers(0, 5, n) * seen, "n_dead": rng.integers(0, 5, n) * seen, "n_left_out": 0,
    })
    splits = image_splits(table, (0.6, 0.2, 0.2), seed=4)
    unlabelled = ~labelled_images(table)
    assert unlabelled.any() and (~unlabelled).any()
    everyone = stratified_image_split(table[["image", "n_alive", "n_dead"]], (0.6, 0.2, 0.2), seed=4)
    for name, is_unlabelled in zip(table["image"], unlabelled):
        assert splits[name] == (UNLABELLED if is_unlabelled else everyone[name])


def test_activity_counts():
    images = pd.Series(["a", "b", "c"], index=[3, 4, 5])
    runs = pd.DataFrame({"image": ["a", "a", "b"]})
    clicks = pd.DataFrame({"image": ["a", "a", "a"]})
    counts = activity_counts(images, runs, clicks, {"c": 2, "elsewhere": 9})
    assert list(counts.index) == [3, 4, 5]
    assert counts.to_dict("list") == {"n_runs": [2, 1, 0], "n_clicks": [3, 0, 0], "n_expert_cells": [0, 0, 2]}


def test_export_choices_list_the_snapshots_newest_first(session, store):
    from datetime import timedelta

    newer = ConsensusSnapshot(project_id=store.project.id, method="later", params={}, stats={},
                              created_at=store.snapshot.created_at + timedelta(minutes=5))
    session.add(newer)
    session.flush()
    choices = export_choices(session, store.project)
    assert choices.n_images == store.n_pixel_images + 1
    assert [(c.id, c.method, c.n_cells) for c in choices.snapshots] == [
        (newer.id, "later", 0), (store.snapshot.id, "hand", (store.n_pixel_images + 1) * len(CELLS))]
    assert choices.snapshots[0].created_at.tzinfo is not None
    empty = export_choices(session, queries.get_or_create_project(session, "nothing"))
    assert (empty.n_images, empty.snapshots) == (0, [])


def test_cli_export_warns_of_unreadable_and_counts_unlabelled_images(settings, sqlite_engine, tmp_path):
    from click.testing import CliRunner

    from cellspot.cli import main
    from cellspot.store.db import transaction

    with transaction(sqlite_engine) as session:
        store = _build_store(session, settings, n_pixel_images=4)
        _add_image(session, settings, store.project, "unseen.png")
    _spoil(settings.home / "images/exp/img02.png", "truncated")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "ds"), "--project", "exp", "--crop-size", "8"])
    assert result.exit_code == 0, result.output
    assert "1 unlabelled (no task run or expert cell)" in result.output
    assert "warning: 1 image file(s) could not be read" in result.output
    assert "img02.png" in result.output
    assert verify_export(tmp_path / "ds") == []

"""Ground-truth loaders: tiny synthetic folders, then the real ``../shared/data`` (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellspot import truth
from cellspot.truth import (
    CELL_COLUMNS,
    IMAGE_COLUMNS,
    TRUTH_SOURCES,
    TruthDataError,
    UnknownTruthSourceError,
    instance_centroids,
    load_truth,
    synthetic_labels,
)


# --------------------------------------------------------------------------- pure helpers


def test_synthetic_labels_are_deterministic_and_per_image():
    names = np.repeat(["a.png", "b.png", "c.png"], 400)
    first = synthetic_labels(names)
    assert (first == synthetic_labels(names)).all()
    # an image's labels do not depend on the other images in the table
    assert (synthetic_labels(names[400:800]) == first[400:800]).all()
    assert set(first) == {"alive", "dead"}
    assert 0.30 < (first == "dead").mean() < 0.40


@pytest.mark.parametrize("fraction, expected", [(0.0, {"alive"}), (1.0, {"dead"})])
def test_synthetic_labels_extremes(fraction, expected):
    assert set(synthetic_labels(["x"] * 50, dead_fraction=fraction)) == expected


def test_synthetic_labels_rejects_bad_fraction():
    with pytest.raises(ValueError, match="dead_fraction"):
        synthetic_labels(["x"], dead_fraction=1.5)


def test_instance_centroids_match_regionprops():
    from skimage.measure import regionprops

    mask = np.zeros((20, 30), np.uint16)
    mask[2:6, 3:9] = 4          # 4x6 box
    mask[10:19, 20:23] = 9      # 9x3 box
    mask[15, 2] = 2             # single pixel
    labels, xs, ys, diam = instance_centroids(mask)
    assert labels.tolist() == [2, 4, 9]
    for lab, x, y, d, p in zip(labels, xs, ys, diam, regionprops(mask.astype(np.int32))):
        assert p.label == lab
        assert (y, x) == pytest.approx(p.centroid)
        assert d == pytest.approx(p.equivalent_diameter_area)


def test_instance_centroids_of_empty_mask():
    labels, xs, ys, diam = instance_centroids(np.zeros((5, 5), np.uint16))
    assert len(labels) == len(xs) == len(ys) == len(diam) == 0


def test_unknown_source_lists_valid_names():
    with pytest.raises(UnknownTruthSourceError) as err:
        load_truth("nope", "/tmp")
    for name in TRUTH_SOURCES:
        assert name in str(err.value)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TruthDataError, match="ldc_living_dead_cells"):
        load_truth("ldc", tmp_path)


# --------------------------------------------------------------------------- tiny synthetic folders


def _write_ldc(root: Path) -> None:
    base = root / "ldc_living_dead_cells"
    (base / "images").mkdir(parents=True)
    pd.DataFrame({
        "image": ["a.png", "a.png", "b.png"], "x": [10.0, 30.5, 5.0], "y": [12.0, 8.0, 5.0],
        "label": ["alive", "dead", "alive"], "xmin": [5, 20, 0], "ymin": [7, 0, 0],
        "xmax": [15, 41, 10], "ymax": [17, 16, 10], "original_label": ["Living Cell", "Dead Cell", "Living Cell"],
    }).to_csv(base / "annotations.csv", index=False)
    pd.DataFrame({"image": ["a.png", "b.png", "empty.png"], "width": [50, 20, 20],
                  "height": [40, 20, 20]}).to_csv(base / "manifest.csv", index=False)


def _write_bccd(root: Path) -> None:
    base = root / "bccd_blood_cells"
    (base / "images").mkdir(parents=True)
    for name in ("p.jpg", "q.jpg"):
        Image.new("RGB", (64, 48)).save(base / "images" / name)
    pd.DataFrame({
        "image": ["p.jpg", "p.jpg", "q.jpg"], "x": [10.0, 20.0, 30.0], "y": [10.0, 20.0, 30.0],
        "label": ["RBC", "WBC", "RBC"], "xmin": [5, 20, 25], "ymin": [5, 20, 25],
        "xmax": [15, 20, 35], "ymax": [15, 20, 37], "difficult": [0, 0, 0],
    }).to_csv(base / "annotations.csv", index=False)


def _write_dsb(root: Path) -> None:
    base = root / "dsb2018_nuclei_subset"
    (base / "masks").mkdir(parents=True)
    (base / "images").mkdir()
    mask = np.zeros((16, 24), np.uint16)
    mask[1:5, 1:5] = 1
    mask[8:12, 10:20] = 300
    Image.fromarray(mask).save(base / "masks" / "m1.png")
    Image.new("RGBA", (24, 16)).save(base / "images" / "m1.png")
    pd.DataFrame({"image": ["images/m1.png"], "mask": ["masks/m1.png"], "width": [24],
                  "height": [16]}).to_csv(base / "manifest.csv", index=False)


@pytest.mark.parametrize("name, writer, n_images, n_cells, synthetic", [
    ("ldc", _write_ldc, 3, 3, False),
    ("bccd", _write_bccd, 2, 2, True),       # the zero-size box is skipped
    ("dsb2018", _write_dsb, 1, 2, True),
])
def test_loaders_on_tiny_folders(tmp_path, name, writer, n_images, n_cells, synthetic):
    writer(tmp_path)
    ts = load_truth(name, tmp_path)
    assert list(ts.cells.columns) == CELL_COLUMNS
    assert list(ts.images.columns) == IMAGE_COLUMNS
    assert (len(ts.images), len(ts.cells)) == (n_images, n_cells)
    assert ts.synthetic_labels is synthetic
    assert set(ts.cells["label"]) <= {"alive", "dead"}
    assert (ts.cells["diameter"] > 0).all()
    assert ts.cells["image"].isin(ts.images["image"]).all()
    # the dataset folder itself is accepted as root too
    again = load_truth(name, next(p for p in tmp_path.iterdir() if p.is_dir()))
    pd.testing.assert_frame_equal(again.cells, ts.cells)


def test_ldc_diameter_is_mean_box_side(tmp_path):
    _write_ldc(tmp_path)
    cells = load_truth("ldc", tmp_path).cells
    assert cells["diameter"].tolist() == [10.0, 18.5, 10.0]
    assert cells["label"].tolist() == ["alive", "dead", "alive"]


def test_dsb_centroids(tmp_path):
    _write_dsb(tmp_path)
    cells = load_truth("dsb2018", tmp_path).cells.sort_values("x").reset_index(drop=True)
    assert cells[["x", "y"]].to_numpy().tolist() == [[2.5, 2.5], [14.5, 9.5]]
    assert cells["diameter"].tolist() == pytest.approx([np.sqrt(64 / np.pi), np.sqrt(160 / np.pi)])
    assert cells["image"].tolist() == ["m1.png", "m1.png"]


def test_generated_truth_is_deterministic():
    a = truth.load_generated(n_images=5, seed=3)
    b = load_truth("generated")
    pd.testing.assert_frame_equal(a.cells, truth.load_generated(n_images=5, seed=3).cells)
    assert len(a.images) == 5 and len(b.images) == 200
    assert (a.images["width"] == 524).all() and (a.images["height"] == 391).all()
    assert 35 < b.cells["diameter"].mean() < 60


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
@pytest.mark.parametrize("name, n_images, n_cells, counts, synthetic", [
    ("ldc", 417, 1427, {"alive": 1174, "dead": 253}, False),
    ("bccd", 182, 2459, None, True),          # 2,460 boxes, one of zero size
    ("dsb2018", 56, 3001, None, True),
    ("stardist", 1, 125, None, True),
])
def test_real_truth_counts(shared_data, name, n_images, n_cells, counts, synthetic):
    ts = load_truth(name, shared_data)
    assert (len(ts.images), len(ts.cells)) == (n_images, n_cells)
    assert ts.synthetic_labels is synthetic
    if counts is not None:
        assert ts.cells["label"].value_counts().to_dict() == counts
    else:
        assert 0.28 < (ts.cells["label"] == "dead").mean() < 0.42
    merged = ts.cells.merge(ts.images, on="image", how="left", validate="many_to_one")
    assert merged["width"].notna().all()
    assert ((merged["x"] >= 0) & (merged["x"] <= merged["width"])).all()
    assert ((merged["y"] >= 0) & (merged["y"] <= merged["height"])).all()
    assert (ts.cells["diameter"] > 0).all()
    assert all(Path(p).is_file() for p in ts.images["path"])


@pytest.mark.shared_data
def test_real_bccd_box_count(shared_data):
    boxes = pd.read_csv(shared_data / "bccd_blood_cells" / "annotations.csv")
    assert len(boxes) == 2460

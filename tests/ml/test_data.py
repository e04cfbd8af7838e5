"""Training-data loaders: annotated folder, crop folder, store; diameter estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage

from cellspot.ml.data import (
    DEFAULT_DIAMETER,
    UNLABELLED,
    AnnotatedImage,
    DataError,
    TrainingData,
    check_folder,
    estimate_diameter,
    load_crop_folder,
    load_folder,
    load_store,
    read_annotations,
)

HEADER = "image,x,y,label,p_alive,confidence,xmin,ymin,xmax,ymax\n"
GOOD = "a.png,10,12,alive,,0.9,5,7,15,17\n"


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(array).save(path)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ann.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("image,x,y\na.png,1,2\n", ["line 1", "'label'"]),
        (HEADER + GOOD + "a.png,abc,3,alive,,,,,,\n", ["line 3", "column 'x'", "'abc'"]),
        (HEADER + "a.png,1,,dead,,,,,,\n", ["line 2", "column 'y'", "empty"]),
        (HEADER + GOOD + GOOD + "a.png,1,2,alvie,,,,,,\n", ["line 4", "column 'label'", "alive, dead"]),
        (HEADER + "a.png,1,2,alive,1.5,,,,,\n", ["line 2", "column 'p_alive'", "[0, 1]"]),
        (HEADER + "a.png,1,2,alive,,-1,,,,\n", ["line 2", "column 'confidence'"]),
        (HEADER + "a.png,1,2,alive,,,9,7,5,17\n", ["line 2", "column 'xmax'"]),
        (HEADER + " ,1,2,alive,,,,,,\n", ["line 2", "column 'image'"]),
        (HEADER + "a.png,inf,2,alive,,,,,,\n", ["line 2", "column 'x'"]),
        # blank lines count: the bad row is the file's line 5
        (HEADER + GOOD + "\n\n" + "a.png,1,2,zzz,,,,,,\n", ["line 5", "column 'label'", "'zzz'"]),
    ],
)
def test_bad_csv_rows_name_file_line_and_column(tmp_path, text, fragments):
    path = _csv(tmp_path, text)
    with pytest.raises(DataError) as err:
        read_annotations(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_missing_image_names_the_csv_line(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((20, 20), np.uint8))
    path = _csv(tmp_path, HEADER + GOOD + "b.png,1,2,dead,,,,,,\n")
    with pytest.raises(DataError, match=r"line 3, column 'image'.*b\.png"):
        load_folder(tmp_path / "images", path)


def test_one_error_lists_every_bad_value_in_line_order(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((20, 20), np.uint8))
    bad_rows = ["a.png,1,2,zombie,,,,,,", GOOD.strip(), "b.png,1,2,dead,,,,,,", "b.png,3,4,dead,,,,,,",
                "a.png,,x,alive,,,,,,"]
    path = _csv(tmp_path, HEADER + "\n".join(bad_rows) + "\n")
    with pytest.raises(DataError) as err:
        check_folder(tmp_path / "images", path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}, line 2, column 'label': 'zombie' is not a label; allowed: alive, dead"
    assert [line.strip().split(":")[0] for line in lines[1:]] == [  # b.png once, at its first line
        "line 4, column 'image'", "line 6, column 'x'", "line 6, column 'y'"]
    many = _csv(tmp_path, HEADER + "".join(f"a.png,{i},1,zzz,,,,,,\n" for i in range(14)))
    with pytest.raises(DataError, match=r"line 11, column 'label'.*\n  \.\.\. and 4 more problem\(s\)$") as err:
        read_annotations(many)
    assert len(str(err.value).splitlines()) == 11  # ten problems and the count of the others


def test_positions_are_checked_against_the_image_before_any_pixel_is_read(tmp_path, monkeypatch):
    import cellspot.ml.data as data_module

    _png(tmp_path / "images" / "a.png", np.zeros((20, 30), np.uint8))  # 30 wide, 20 high
    path = _csv(tmp_path, "image,x,y,label\na.png,10,-3,zombie\na.png,99999,5,dead\na.png,30,20,alive\n")
    monkeypatch.setattr(data_module, "read_rgb8", lambda *a, **k: pytest.fail("pixels read before the checks"))
    with pytest.raises(DataError) as err:
        check_folder(tmp_path / "images", path)
    lines = [line.strip() for line in str(err.value).splitlines()]
    assert lines[0] == f"{path}, line 2, column 'label': 'zombie' is not a label; allowed: alive, dead"
    assert lines[1:] == ["line 2, column 'y': -3 is negative (pixel positions start at 0)",
                         "line 3, column 'x': 99999 is outside image a.png (30 x 20 pixels; x must be within [0, 30])"]


@pytest.mark.parametrize(("row", "fragment"), [("a.png,21,5,alive", "line 3, column 'x': 21 is outside image a.png"),
                                              ("a.png,5,-0.5,dead", "line 3, column 'y': -0.5 is negative"),
                                              ("a.png,5000,5,alive", "(20 x 20 pixels; x must be within [0, 20])")])
def test_cells_outside_their_image_name_the_csv_line(tmp_path, row, fragment):
    _png(tmp_path / "images" / "a.png", np.zeros((20, 20), np.uint8))
    path = _csv(tmp_path, "image,x,y,label\na.png,20,0,alive\n" + row + "\n")  # line 2: on the edge, allowed
    with pytest.raises(DataError) as err:
        load_folder(tmp_path / "images", path)
    assert fragment in str(err.value) and str(path) in str(err.value)


def test_blank_lines_are_skipped(tmp_path):
    table = read_annotations(_csv(tmp_path, HEADER + "\n" + GOOD + "\n"))
    assert len(table) == 1 and table["line"].tolist() == [3]


def test_annotations_defaults_boxes_and_weights(tmp_path):
    path = _csv(tmp_path, HEADER + GOOD + "a.png,3,4,DEAD,0.2,,,,,\n" + "a.png,3,4,dead,,,,,,\n")
    table = read_annotations(path)
    assert table["label"].tolist() == ["alive", "dead", "dead"]
    np.testing.assert_allclose(table["p_alive"], [1.0, 0.2, 0.0])
    np.testing.assert_allclose(table["weight"], [0.9, 1.0, 1.0])
    assert table["diameter"].iloc[0] == 10.0 and np.isnan(table["diameter"].iloc[1])
    assert table["line"].tolist() == [2, 3, 4]


def _folder(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            arr = rng.integers(0, 256, (24, 32), dtype=np.uint8)
        elif kind == 1:
            arr = rng.integers(0, 256, (24, 32, 4), dtype=np.uint8)
        else:
            arr = rng.integers(0, 4000, (24, 32), dtype=np.uint16)
        _png(tmp_path / "images" / f"im{i}.png", arr)
        rows.append(f"im{i}.png,5,6,alive,,,1,2,9,10")
        rows.append(f"im{i}.png,20,10,{'dead' if i % 2 else 'alive'},,0.7,,,,")
    return tmp_path / "images", _csv(tmp_path, HEADER + "\n".join(rows) + "\n")


def test_load_folder_normalises_pixels_and_splits_by_image(tmp_path):
    images_dir, csv = _folder(tmp_path)
    data = load_folder(images_dir, csv, seed=3)
    assert len(data.images) == 10 and data.n_cells() == 20
    for im in data.images:
        assert im.pixels.dtype == np.uint8 and im.pixels.shape == (24, 32, 3)
        assert list(im.cells.columns) == ["x", "y", "label", "p_alive", "weight", "diameter"]
        assert im.split in ("train", "val", "test") and im.mask is None
    assert {len(data.split(s)) for s in ("val", "test")} == {1} and len(data.split("train")) == 8
    first = data.images[0].cells
    assert first["diameter"].iloc[0] == 8.0 and first["weight"].tolist() == [1.0, 0.7]
    assert data.snapshot_id.startswith("folder:") and data.source["annotations_sha256"]
    again = load_folder(images_dir, csv, seed=3)
    assert [im.split for im in again.images] == [im.split for im in data.images]


def test_masks_give_cells_and_diameters(tmp_path):
    images_dir = tmp_path / "images"
    mask = np.zeros((30, 30), np.uint16)
    mask[2:6, 2:6] = 1  # 16 px -> diameter sqrt(64 / pi)
    mask[10:20, 10:20] = 5
    for name in ("m1", "m2"):
        _png(images_dir / f"{name}.png", np.full((30, 30), 90, np.uint8))
        _png(tmp_path / "masks" / f"{name}.png", mask)
    csv = _csv(tmp_path, "image,x,y,label\nm1.png,15,15,dead\nm1.png,25,25,alive\n")
    data = load_folder(images_dir, csv, tmp_path / "masks", fractions=(1, 0, 0))
    assert data.has_masks
    m1, m2 = data.images
    assert m1.mask.dtype == np.int32 and m1.mask.max() == 5
    np.testing.assert_allclose(m1.cells["diameter"].iloc[0], np.sqrt(400 / np.pi))
    assert np.isnan(m1.cells["diameter"].iloc[1])  # on background
    assert (m2.cells["label"] == UNLABELLED).all() and (m2.cells["weight"] == 0).all()
    np.testing.assert_allclose(m2.cells[["x", "y"]].to_numpy(), [[4.0, 4.0], [15.0, 15.0]])
    only_masks = load_folder(images_dir, None, tmp_path / "masks")
    assert [len(im.cells) for im in only_masks.images] == [2, 2]


def test_mask_of_wrong_size_is_refused(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((10, 10), np.uint8))
    _png(tmp_path / "masks" / "a.png", np.zeros((12, 10), np.uint8))
    with pytest.raises(DataError, match="mask .* is 10x12 but its image a.png is 10x10"):
        load_folder(tmp_path / "images", None, tmp_path / "masks")


def test_check_folder_lists_every_mask_that_does_not_fit_from_the_headers(tmp_path):
    """The check a run's start relies on (nothing stored before it passes) reads no pixels."""
    for name in ("a", "b", "c"):
        _png(tmp_path / "images" / f"{name}.png", np.zeros((10, 10), np.uint8))
    _png(tmp_path / "masks" / "a.png", np.zeros((12, 10), np.uint8))
    _png(tmp_path / "masks" / "b.png", np.zeros((10, 10), np.uint8))  # fits
    (tmp_path / "masks" / "c.tif").write_text("not a tiff")
    (tmp_path / "ann.csv").write_text("image,x,y,label\nb.png,5,5,alive\n")
    with pytest.raises(DataError) as err:
        check_folder(tmp_path / "images", tmp_path / "ann.csv", tmp_path / "masks")
    text = str(err.value)
    assert text.startswith("2 mask(s) do not fit their images")
    assert "a.png is 10x12 but its image a.png is 10x10" in text and "c.tif is not a PNG or TIFF image" in text


def test_crop_folder_maps_labels_and_keeps_groups_together(tmp_path):
    rows = []
    for i in range(24):
        label = "Parasitized" if i % 3 == 0 else "Uninfected"
        _png(tmp_path / label / f"c{i}.png", np.full((10, 12), i, np.uint8))
        rows.append(f"{label}/c{i}.png,{label},P{i % 8}")
    (tmp_path / "labels.csv").write_text("image,label,patient\n" + "\n".join(rows) + "\n")
    data = load_crop_folder(tmp_path, positive_label="Parasitized", group_column="patient", fractions=(0.5, 0.25, 0.25))
    assert len(data.images) == 24
    assert data.source["label_map"] == {"dead": "Parasitized", "alive": "Uninfected"}
    split_of: dict[str, set[str]] = {}
    for i, im in enumerate(data.images):
        cell = im.cells.iloc[0]
        assert (cell["x"], cell["y"]) == (6.0, 5.0)
        assert cell["label"] == ("dead" if i % 3 == 0 else "alive")
        split_of.setdefault(f"P{i % 8}", set()).add(im.split)
    assert all(len(s) == 1 for s in split_of.values())
    with pytest.raises(DataError, match="positive_label 'Sick'"):
        load_crop_folder(tmp_path, positive_label="Sick")


def _image(cells: list[tuple[float, float, float]], mask: np.ndarray | None = None) -> AnnotatedImage:
    frame = pd.DataFrame([{"x": x, "y": y, "label": "alive", "p_alive": 1.0, "weight": 1.0, "diameter": d}
                          for x, y, d in cells], columns=["x", "y", "label", "p_alive", "weight", "diameter"])
    return AnnotatedImage("i", np.zeros((100, 100, 3), np.uint8), frame, "train", mask)


_disc_mask = np.zeros((40, 40), np.int32)
_disc_mask[0:10, 0:10] = 1
_disc_mask[20:30, 20:30] = 2
_grid = [(x, y, np.nan) for x in range(0, 100, 12) for y in range(0, 100, 12)]


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ([_image([(1, 1, 10.0), (5, 5, 20.0), (9, 9, 30.0)])], 20.0),
        ([_image([(1, 1, np.nan)], mask=_disc_mask)], np.sqrt(400 / np.pi)),
        ([_image(_grid)], 12.0),
        ([_image([(1, 1, np.nan), (50, 50, np.nan)])], DEFAULT_DIAMETER),
        ([], DEFAULT_DIAMETER),
    ],
    ids=["known", "mask", "spacing", "too-few", "empty"],
)
def test_estimate_diameter(images, expected):
    assert estimate_diameter(TrainingData(images)) == pytest.approx(expected)


# ---------------------------------------------------------------- store


def _store(session, settings):
    from cellspot.store import queries
    from cellspot.store.models import ConsensusCell, ConsensusSnapshot, GoldCell, Image

    project = queries.get_or_create_project(session, "ml")
    rng = np.random.default_rng(1)
    images = []
    for i in range(8):
        rel = f"images/ml/im{i}.png"
        arr = rng.integers(0, 4096, (20, 30), dtype=np.uint16) if i % 2 else rng.integers(0, 256, (20, 30), np.uint8)
        _png(settings.home / rel, arr)
        images.append(Image(project_id=project.id, name=f"im{i}.png", path=rel, width=30, height=20,
                            bit_depth=16 if i % 2 else 8, has_pixels=True))
    images.append(Image(project_id=project.id, name="nopix.jpg", path=None, width=30, height=20, has_pixels=False))
    images.append(Image(project_id=project.id, name="empty.png", path="images/ml/im0.png", width=30, height=20,
                        has_pixels=True))
    session.add_all(images)
    session.flush()
    snap = ConsensusSnapshot(project_id=project.id, method="hand", params={}, stats={})
    session.add(snap)
    session.flush()
    for i, img in enumerate(images[:-1]):
        for j, (label, p, conf) in enumerate([("alive", 0.9, 0.8), ("dead", 0.2, 0.6), ("alive", 0.6, 0.2)]):
            if label == "dead" and i % 3 == 0:
                label, p = "alive", 0.7
            session.add(ConsensusCell(snapshot_id=snap.id, image_id=img.id, x=5.0 + 8 * j, y=10.0, label=label,
                                      p_alive=p, confidence=conf, support=2, n_runs=2, p_cell=0.9, from_gold=False))
    session.add(GoldCell(image_id=images[1].id, x=3.0, y=4.0, label="dead"))
    session.flush()
    return project, snap


def test_load_store_consensus_matches_the_export_split(session, settings, tmp_path, caplog):
    from cellspot.export import export_dataset

    project, snap = _store(session, settings)
    with caplog.at_level("INFO", logger="cellspot.ml.data"):
        data = load_store(session, settings, "ml", seed=2)
    assert "skipped 1 image(s) without pixels (e.g. nopix.jpg)" in caplog.text
    names = [im.name for im in data.images]
    assert names == [f"im{i}.png" for i in range(8)]  # no pixels / no cells: not loaded
    assert data.source["snapshot_id"] == snap.id and data.snapshot_id == f"consensus:{snap.id}"
    assert data.source["images_without_pixels"] == 1
    for im in data.images:
        assert im.pixels.shape == (20, 30, 3) and im.pixels.dtype == np.uint8 and im.image_id is not None
        assert len(im.cells) == 2  # the cell at confidence 0.2 is left out
        np.testing.assert_allclose(im.cells["weight"], [0.8, 0.6])
    assert data.images[1].cells["p_alive"].tolist() == [0.9, 0.2]
    report = export_dataset(session, project, tmp_path / "export", settings, crop_size=8, seed=2)
    exported = pd.read_csv(report.outdir / "images.csv").set_index("image")["split"]
    assert {im.name: im.split for im in data.images} == {n: exported[n] for n in names}


def test_load_store_expert_cells(session, settings):
    _store(session, settings)
    data = load_store(session, settings, "ml", source="expert")
    assert [im.name for im in data.images] == ["im1.png"]
    cells = data.images[0].cells
    assert cells[["label", "p_alive", "weight"]].values.tolist() == [["dead", 0.0, 1.0]]
    assert data.snapshot_id.startswith("expert:")
    with pytest.raises(DataError, match="allowed: consensus, expert"):
        load_store(session, settings, "ml", source="crowd")
    with pytest.raises(DataError, match="no consensus cells at confidence >= 0.95"):
        load_store(session, settings, "ml", min_confidence=0.95)


def test_load_store_names_a_missing_image_file_and_the_home_it_looked_in(session, settings):
    """A worker started with another CELLSPOT_HOME than the app's: the image the store names is
    missing there; the error says which file, and that the worker needs the app's home."""
    _store(session, settings)
    (settings.home / "images/ml/im3.png").unlink()
    with pytest.raises(DataError) as info:
        load_store(session, settings, "ml", seed=2)
    text = str(info.value)
    assert f"cannot read image im3.png: {settings.home / 'images/ml/im3.png'} does not exist" in text
    assert f"CELLSPOT_HOME ({settings.home} here)" in text and "the app's CELLSPOT_HOME" in text


# ---------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_ldc_folder_loads(shared_data):
    root = shared_data / "ldc_living_dead_cells"
    data = load_folder(root / "images", root / "annotations.csv")
    assert len(data.images) == 402 and data.n_cells() == 1427
    cells = pd.concat([im.cells for im in data.images])
    assert (cells["label"] == "dead").sum() == 253
    assert 18 <= estimate_diameter(data) <= 24
    assert all(im.pixels.dtype == np.uint8 and im.pixels.ndim == 3 for im in data.images)
    assert {s: len(data.split(s)) for s in ("train", "val", "test")} == {"train": 322, "val": 40, "test": 40}


def test_training_and_prediction_read_a_16_bit_copy_as_the_8_bit_picture(tmp_path):
    from PIL import Image as PILImage

    from cellspot.ml.data import read_rgb8
    from cellspot.ml.predict import read_pixels

    picture = np.random.default_rng(2).integers(60, 140, (20, 30)).astype(np.uint8)
    PILImage.fromarray(picture).save(tmp_path / "eight.png")
    PILImage.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    for read in (read_rgb8, read_pixels):
        assert np.array_equal(read(tmp_path / "sixteen.png"), read(tmp_path / "eight.png"))

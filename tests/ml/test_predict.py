"""Prediction: detect + classify images, CSV tables, viability arithmetic, overlays, the store.

The models are small fakes with the same methods as the real loaded models (a threshold
detector and a colour classifier), so the tests check the prediction plumbing exactly; one
integration test runs real tiny models when :mod:`cellspot.ml.detector` and
:mod:`cellspot.ml.classifier` are importable.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image as PILImage

from cellspot.imaging import ImageReadError, read_image
from cellspot.ml import predict, project_predictions
from cellspot.ml.overlay import ALIVE, DEAD, NO_CELL, Outline, draw_overlay
from cellspot.ml.predict import (
    CELL_COLUMNS,
    SUMMARY_COLUMNS,
    PredictionError,
    UnreadableImagesError,
    binary_entropy,
    cell_diameters,
    check_images,
    format_image_errors,
    image_problem,
    overlay_names,
    predict_images,
    summarize,
    write_outputs,
)
from cellspot.render import MARK_COLOURS

from .predict_fakes import (
    CELLS,
    FakeClassifier,
    FakeDetector,
    H,
    W,
    noisy_image_bytes,
    disc_pixels,
    write_images,
)

# --------------------------------------------------------------------------- pure pieces


@pytest.mark.parametrize(("p", "bits"), [(0.0, 0.0), (1.0, 0.0), (0.5, 1.0), (0.8, 0.7219), (0.2, 0.7219)])
def test_uncertainty_is_binary_entropy_in_bits(p: float, bits: float) -> None:
    assert binary_entropy(np.array([p]))[0] == pytest.approx(bits, abs=1e-4)


def test_summary_viability_arithmetic() -> None:
    cells = pd.DataFrame({"image": ["a"] * 4 + ["c"], "label": ["alive", "alive", "alive", "dead", "dead"]})
    summary = summarize(cells, ["a", "b", "c"])
    assert list(summary.columns) == SUMMARY_COLUMNS
    rows = {r.image: r for r in summary.itertuples()}
    assert (rows["a"].alive, rows["a"].dead, rows["a"].n_cells, rows["a"].viability_pct) == (3, 1, 4, 75.0)
    assert (rows["b"].alive, rows["b"].dead, rows["b"].n_cells) == (0, 0, 0) and math.isnan(rows["b"].viability_pct)
    assert (rows["c"].alive, rows["c"].viability_pct) == (0, 0.0)
    two_thirds = summarize(pd.DataFrame({"image": ["x"] * 3, "label": ["alive", "alive", "dead"]}))
    assert two_thirds.viability_pct.iloc[0] == 66.67


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a.png", "b.tif"], {"a.png": "a.png", "b.tif": "b.png"}),
        (["a.png", "a.tif"], {"a.png": "a.png.png", "a.tif": "a.tif.png"}),
        (["sub/a.jpg"], {"sub/a.jpg": "sub/a.png"}),
        # a.png.tif's stem is a.png.png, the name a.png already takes: numbered, nothing replaced
        (["a.png", "a.tif", "a.png.tif"],
         {"a.png": "a.png~2.png", "a.tif": "a.tif.png", "a.png.tif": "a.png~3.png"}),
        (["A.png", "a.tif"], {"A.png": "A.png.png", "a.tif": "a.tif.png"}),  # case-insensitive disks
    ],
)
def test_overlay_names(names: list[str], expected: dict[str, str]) -> None:
    got = overlay_names(names)
    assert got == expected
    assert len({v.casefold() for v in got.values()}) == len(names)  # one file per image


def test_cell_diameters_from_instance_area_else_fallback() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[0:4, 0:4] = 1  # area 16 -> diameter 2 * sqrt(16 / pi)
    labels[10:20, 10:20] = 2  # area 100
    xy = np.array([[1.0, 1.0], [15.0, 15.0], [7.0, 15.0]])  # the last one is on background
    d = cell_diameters(xy, labels, fallback=9.0)
    expected = [2 * math.sqrt(16 / math.pi), 2 * math.sqrt(100 / math.pi)]
    assert d[:2] == pytest.approx(expected)
    assert d[2] == pytest.approx(np.median(expected))
    assert list(cell_diameters(xy, None, fallback=9.0)) == [9.0, 9.0, 9.0]


def test_outline_takes_the_class_of_the_centre_inside() -> None:
    labels = np.zeros((12, 12), np.int32)
    labels[1:5, 1:5], labels[6:11, 6:11], labels[1:4, 8:11] = 1, 2, 3
    outline = Outline.from_labels(labels, np.array([[2.0, 2.0], [8.0, 8.0]]), np.array([True, False]))
    codes = np.full(labels.size, 255)
    codes[outline.index] = outline.code
    codes = codes.reshape(labels.shape)
    assert codes[1, 1] == ALIVE and codes[6, 6] == DEAD and codes[1, 8] == NO_CELL
    assert codes[2, 2] == 255  # inside pixels are not boundary
    painted = outline.paint(np.zeros((12, 12, 3), np.uint8))
    assert tuple(painted[1, 1]) == MARK_COLOURS["alive"] and tuple(painted[6, 6]) == MARK_COLOURS["dead"]


# --------------------------------------------------------------------------- predict_images


def test_predict_images_finds_and_labels_every_cell(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    detector, classifier = FakeDetector(), FakeClassifier()
    seen: list[tuple[int, int, str]] = []
    result = predict_images([folder], detector, classifier, progress=lambda d, t, n: seen.append((d, t, n)))

    assert list(result.cells.columns) == CELL_COLUMNS
    assert seen == [(1, 3, "well_a.png"), (2, 3, "well_b.png"), (3, 3, "well_c.png")]
    assert detector.calls == 3 and classifier.calls == [3, 1]  # batched per image; no call without cells
    for name, truth in CELLS.items():
        got = result.cells[result.cells.image == name].sort_values(["x", "y"])
        want = sorted(truth)
        assert len(got) == len(want)
        for row, (x, y, label) in zip(got.itertuples(), want):
            assert (row.x, row.y, row.label) == (pytest.approx(x), pytest.approx(y), label)
            assert row.p_alive == pytest.approx(0.8 if label == "alive" else 0.2)
            assert row.uncertainty == pytest.approx(0.7219, abs=1e-4)
    assert set(result.cells.detector_version) == {"detector-fake"}
    assert set(result.cells.classifier_version) == {"classifier-fake"}
    details = result.details
    disc_area = float((disc_pixels([(20, 20, "alive")]).max(axis=2) > 50).sum())
    assert details.diameter.to_numpy() == pytest.approx(2 * math.sqrt(disc_area / math.pi), abs=0.01)
    summary = result.summary.set_index("image")
    assert summary.loc["well_a.png", ["alive", "dead", "n_cells"]].tolist() == [2, 1, 3]
    assert summary.loc["well_a.png", "viability_pct"] == pytest.approx(66.67)
    assert summary.loc["well_c.png", "n_cells"] == 0


def test_any_bit_depth_and_channels_are_normalised(tmp_path: Path) -> None:
    rgb = disc_pixels([(12, 10, "alive"), (40, 30, "dead")])
    tifffile.imwrite(tmp_path / "deep.tif", rgb.max(axis=2).astype(np.uint16) * 300)  # 16-bit gray
    PILImage.fromarray(np.dstack([rgb, np.full((H, W), 255, np.uint8)])).save(tmp_path / "rgba.png")
    result = predict_images([tmp_path / "deep.tif", tmp_path / "rgba.png"], FakeDetector(), FakeClassifier())
    counts = result.summary.set_index("image").n_cells
    assert counts.to_dict() == {"deep.tif": 2, "rgba.png": 2}
    gray = result.cells[result.cells.image == "deep.tif"]
    assert (gray.p_alive == 0.5).all() and (gray.label == "alive").all() and (gray.uncertainty == 1.0).all()


def test_folder_images_are_named_relative_to_the_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "in" / "plate1", {"x.png": [(10, 10, "alive")]})
    write_images(tmp_path / "in" / "plate2", {"x.png": [(10, 10, "dead")]})
    result = predict_images([tmp_path / "in"], FakeDetector(), FakeClassifier())
    assert sorted(result.cells.image) == ["plate1/x.png", "plate2/x.png"]
    with pytest.raises(PredictionError, match="two images are named 'x.png'"):
        predict_images([tmp_path / "in" / "plate1" / "x.png", tmp_path / "in" / "plate2" / "x.png"],
                       FakeDetector(), FakeClassifier())


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (b"not an image at all", "not a PNG, JPEG or TIFF"), (b"\x89PNG\r\n\x1a\nbroken", "corrupt")],
)
def test_unreadable_file_is_named_in_the_error(tmp_path: Path, content: bytes, reason: str) -> None:
    folder = write_images(tmp_path / "images")
    (folder / "bad.png").write_bytes(content)
    detector = FakeDetector()
    message = rf"1 of 4 image file\(s\) cannot be read:\n  .*bad\.png: .*{reason}"
    with pytest.raises(UnreadableImagesError, match=message):
        predict_images([folder], detector, FakeClassifier())
    assert detector.calls == 0  # refused before any image was predicted
    result = predict_images([folder], FakeDetector(), FakeClassifier(), skip_invalid=True)
    assert [e.image for e in result.errors] == ["bad.png"] and reason in result.errors[0].error
    assert sorted(p.image for p in result.images) == sorted(CELLS)


def test_every_unreadable_file_is_listed_before_any_image_is_predicted(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    (folder / "a_text.png").write_text("hello")
    (folder / "z_cut.png").write_bytes(noisy_image_bytes("PNG")[:500])
    detector = FakeDetector()
    with pytest.raises(UnreadableImagesError) as caught:
        predict_images([folder], detector, FakeClassifier())
    assert detector.calls == 0
    assert [(e.image, e.path) for e in caught.value.errors] == [
        ("a_text.png", str(folder / "a_text.png")), ("z_cut.png", str(folder / "z_cut.png"))]
    assert (caught.value.total, caught.value.n_readable) == (5, 3)
    assert str(caught.value).splitlines() == [
        "2 of 5 image file(s) cannot be read:",
        f"  {folder / 'a_text.png'}: not a PNG, JPEG or TIFF image",
        f"  {folder / 'z_cut.png'}: corrupt or truncated PNG data: image file is truncated"]


@pytest.mark.parametrize(("n_errors", "last_line"),
                         [(3, "  c2.png: r"), (20, "  c19.png: r"), (23, "  ... and 3 more")])
def test_unreadable_list_is_capped(n_errors: int, last_line: str) -> None:
    errors = [predict.ImageError(f"{i}", f"c{i}.png", "r") for i in range(n_errors)]
    lines = format_image_errors(errors).splitlines()
    assert len(lines) == min(n_errors, 21) and lines[-1] == last_line


def _cut(data: bytes, cut: str) -> bytes:
    return {"whole": data, "header only": data[:500], "half": data[: len(data) // 2],
            "no end chunk": data[:-12]}[cut]


@pytest.mark.parametrize(
    ("fmt", "cut", "readable"),
    [("PNG", "whole", True), ("PNG", "header only", False), ("PNG", "half", False),
     ("PNG", "no end chunk", True),  # PIL's verify() would refuse it; the decoder reads it, and decides
     ("JPEG", "whole", True), ("JPEG", "header only", False), ("JPEG", "half", False),
     ("TIFF", "whole", True), ("TIFF", "header only", False), ("TIFF", "half", False),
     ("tifffile", "whole", True), ("tifffile", "half", False)],
)
def test_image_problem_agrees_with_the_decoder(tmp_path: Path, fmt: str, cut: str, readable: bool) -> None:
    if fmt == "tifffile":
        tifffile.imwrite(tmp_path / "whole", np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8))
        data = (tmp_path / "whole").read_bytes()
    else:
        data = noisy_image_bytes(fmt)
    path = tmp_path / "image"
    path.write_bytes(_cut(data, cut))
    problem = image_problem(path)
    assert (problem is None) == readable, problem
    try:
        read_image(path)
    except ImageReadError as exc:
        assert problem == exc.reason
    else:
        assert problem is None


def test_a_file_that_passes_the_check_but_does_not_decode_is_still_handled(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_images(tmp_path / "images")
    (folder / "bad.png").write_bytes(b"junk")
    monkeypatch.setattr(predict, "image_problem", lambda path: None)
    checked = check_images([folder])
    assert checked.errors == [] and checked.total == 4
    with pytest.raises(UnreadableImagesError, match=r"bad\.png: not a PNG"):
        predict_images(checked, FakeDetector(), FakeClassifier())
    result = predict_images(checked, FakeDetector(), FakeClassifier(), skip_invalid=True)
    assert [e.image for e in result.errors] == ["bad.png"] and len(result.images) == 3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [([], r"no images found \(no files or folders given\)"),
     (["empty"], r"no images found in \S+/empty; expected files ending in \.png"),
     (["empty", "only_text"], r"no images found in \S+/empty, \S+/only_text;"),
     (["missing.png"], "missing.png: no such file or folder")],
)
def test_no_images_or_missing_path(tmp_path: Path, inputs: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "notes.txt").write_text("no image")
    with pytest.raises(PredictionError, match=message):
        predict_images([tmp_path / p for p in inputs], FakeDetector(), FakeClassifier())


@pytest.mark.parametrize(
    ("bad", "message"),
    [(lambda p: p[:-1], "returned 2 probabilities for 3 cells"), (lambda p: p + 1, "returned p_alive outside")],
)
def test_bad_classifier_output_names_the_image(tmp_path: Path, bad, message: str) -> None:
    class Broken(FakeClassifier):
        def predict_cells(self, pixels, xy):
            return bad(super().predict_cells(pixels, xy))

    folder = write_images(tmp_path / "images", {"well_a.png": CELLS["well_a.png"]})
    with pytest.raises(PredictionError, match=f"well_a.png: the classifier {message}"):
        predict_images([folder], FakeDetector(), Broken())


# --------------------------------------------------------------------------- output files


def test_write_outputs_tables_and_overlays(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    result = predict_images([folder], FakeDetector(), FakeClassifier())
    out = write_outputs(result, tmp_path / "out")

    cells = pd.read_csv(out.cells)
    assert list(cells.columns) == CELL_COLUMNS and len(cells) == 4
    summary = pd.read_csv(out.summary)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary.set_index("image").loc["well_b.png", ["alive", "dead", "viability_pct"]].tolist() == [0, 1, 0.0]
    assert sorted(p.name for p in out.overlays.iterdir()) == ["well_a.png", "well_b.png", "well_c.png"]
    assert out.errors is None and not (tmp_path / "out" / "errors.csv").exists()
    overlay = np.asarray(PILImage.open(out.overlays / "well_a.png").convert("RGB"))
    assert overlay.shape == (H, W, 3)
    colours = {tuple(c) for c in overlay.reshape(-1, 3)}
    assert MARK_COLOURS["alive"] in colours and MARK_COLOURS["dead"] in colours
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []  # no staging left


def test_a_failed_write_leaves_the_earlier_outputs(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    first = write_outputs(predict_images([folder], FakeDetector(), FakeClassifier()), out_dir)
    before = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}

    write_images(folder, {"well_d.png": [(30, 30, "dead")]})
    second = predict_images([folder], FakeDetector(), FakeClassifier())
    (folder / "well_d.png").unlink()  # the overlay cannot re-read it
    with pytest.raises(PredictionError, match="well_d.png"):
        write_outputs(second, out_dir)
    assert {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file()} == before
    assert len(pd.read_csv(first.cells)) == 4


def test_rewrite_replaces_overlays_and_errors(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    (folder / "bad.png").write_bytes(b"junk")
    out_dir = tmp_path / "out"
    first = write_outputs(predict_images([folder], FakeDetector(), FakeClassifier(), skip_invalid=True), out_dir)
    assert list(pd.read_csv(first.errors).columns) == ["image", "path", "error"]
    (folder / "bad.png").unlink()
    (folder / "well_c.png").unlink()
    second = write_outputs(predict_images([folder], FakeDetector(), FakeClassifier()), out_dir, overlays=True)
    assert second.errors is None and not (out_dir / "errors.csv").exists()
    assert sorted(p.name for p in second.overlays.iterdir()) == ["well_a.png", "well_b.png"]


def test_a_rerun_without_overlays_removes_the_earlier_ones(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    out_dir = tmp_path / "out"
    write_outputs(predict_images([folder], FakeDetector(), FakeClassifier()), out_dir)
    assert (out_dir / "overlays").is_dir()
    again = write_outputs(predict_images([folder], FakeDetector(), FakeClassifier()), out_dir, overlays=False)
    assert again.overlays is None and not (out_dir / "overlays").exists()  # they showed other predictions
    assert sorted(p.name for p in out_dir.iterdir()) == ["cells.csv", "summary.csv"]


def test_never_writes_into_a_folder_that_holds_other_files(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "images")
    export = tmp_path / "export"
    export.mkdir()
    (export / "cells.csv").write_text("image,x,y,label\n")
    (export / "manifest.json").write_text("{}")
    result = predict_images([folder], FakeDetector(), FakeClassifier())
    with pytest.raises(PredictionError, match=r"holds files that no prediction wrote \(manifest.json\)"):
        write_outputs(result, export)
    assert (export / "cells.csv").read_text() == "image,x,y,label\n"
    assert sorted(p.name for p in export.iterdir()) == ["cells.csv", "manifest.json"]
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PredictionError, match="is not a folder"):
        write_outputs(result, tmp_path / "a_file")


def test_draw_overlay_marks_are_as_large_as_the_cells() -> None:
    rgb = np.zeros((60, 60, 3), np.uint8)
    cells = pd.DataFrame({"x": [15.0, 45.0], "y": [30.0, 30.0], "label": ["alive", "dead"], "diameter": [20.0, 8.0]})
    img = np.asarray(draw_overlay(rgb, cells))
    green = np.all(img == MARK_COLOURS["alive"], axis=2)
    cols = np.flatnonzero(green.any(axis=0))
    assert cols.min() <= 15 - 9 and cols.max() >= 15 + 9  # radius 10 ring
    assert np.all(img == MARK_COLOURS["dead"], axis=2)[:, 38:53].any()
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        draw_overlay(rgb, cells.assign(label=["maybe", "dead"]))


# --------------------------------------------------------------------------- the store


@pytest.fixture
def project_with_runs(session, settings, tmp_path: Path):
    """A project with the three images imported and an active detector and classifier run."""
    from cellspot.importers import import_images
    from cellspot.ml import registry
    from cellspot.store.queries import get_or_create_project

    project = get_or_create_project(session, "p")
    import_images(session, project, [write_images(tmp_path / "images")], settings)
    runs = []
    for kind in ("detector", "classifier"):
        run = registry.create_run(session, kind, project=project)
        run.status = "done"
        registry.promote(session, run)
        runs.append(run)
    session.flush()
    return project, runs[0], runs[1]


def test_predict_project_stores_and_replaces(session, settings, project_with_runs, fake_loaders) -> None:
    from cellspot.ml import registry

    project, det, cls = project_with_runs
    report = project_predictions.predict_project(session, settings, project)
    assert fake_loaders == [registry.model_dir(settings, det), registry.model_dir(settings, cls)]
    assert (report.images, report.cells, report.alive, report.dead) == (3, 4, 2, 2)
    assert report.viability_pct == 50.0 and report.errors == []

    frame = project_predictions.predictions_frame(session, project)
    assert len(frame) == 4
    assert set(frame.detector_version) == {det.version} and set(frame.classifier_version) == {cls.version}
    assert set(frame.detector_run_id) == {det.id}
    assert frame[["x", "y", "p_alive", "uncertainty", "score"]].notna().all().all()
    by_image = predict.summarize(frame).set_index("image")
    assert by_image.loc["well_a.png", ["alive", "dead"]].tolist() == [2, 1]

    project_predictions.predict_project(session, settings, project)  # same pair again: replaced, not doubled
    assert len(project_predictions.predictions_frame(session, project)) == 4

    other = registry.create_run(session, "classifier", project=project)
    project_predictions.predict_project(session, settings, project, classifier_run=other)  # another pair: kept apart
    assert len(project_predictions.predictions_frame(session, project)) == 8
    frame = project_predictions.predictions_frame(session, project, detector_run_id=det.id, classifier_run_id=other.id)
    assert len(frame) == 4


def test_predict_project_without_active_model(session, settings, fake_loaders) -> None:
    from cellspot.store.queries import get_or_create_project

    project = get_or_create_project(session, "empty")
    with pytest.raises(predict.NoActiveModelError, match=r"train one with `cellspot train detector --project empty`"):
        project_predictions.predict_project(session, settings, project)


def test_match_project_images_by_content(session, settings, project_with_runs, tmp_path: Path) -> None:
    project = project_with_runs[0]
    copies = write_images(tmp_path / "copies", {"renamed.png": CELLS["well_a.png"], "new.png": [(5, 5, "dead")]})
    result = predict_images([copies], FakeDetector(), FakeClassifier())
    matched = project_predictions.match_project_images(session, project, result)
    assert {name: image.name for name, image in matched.items()} == {"renamed.png": "well_a.png"}


# --------------------------------------------------------------------------- real models


def _tiny_real_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Untrained real detector and classifier checkpoints (random weights, tiny tiles)."""
    from dataclasses import asdict

    detector_mod = pytest.importorskip("cellspot.ml.detector")
    classifier_mod = pytest.importorskip("cellspot.ml.classifier")
    from cellspot.ml.common import save_checkpoint

    det_cfg = detector_mod.config_for("cpu-fast", radius=4.0, tile=64, infer_tile=64, overlap=16)
    det_dir, cls_dir = folder / "detector-0001", folder / "classifier-0001"
    post = detector_mod.default_postprocess(det_cfg, 4.0)
    save_checkpoint(det_dir, detector_mod.build_model(det_cfg).state_dict(),
                    {**asdict(det_cfg), "kind": "detector", "postprocess": post}, {}, [])
    cls_cfg = classifier_mod.config_for("cpu-fast", crop_size=16)
    save_checkpoint(cls_dir, classifier_mod.build_model(cls_cfg).state_dict(),
                    {**asdict(cls_cfg), "kind": "classifier", "temperature": 1.0}, {}, [])
    return det_dir, cls_dir


@pytest.mark.slow
def test_real_models_fit_the_protocol(tmp_path: Path) -> None:
    """The real loaded models run through predict_images and write_outputs (untrained, so only
    the plumbing is checked: shapes, ranges, versions, files)."""
    det_dir, cls_dir = _tiny_real_checkpoints(tmp_path / "models")
    import torch

    torch.set_num_threads(1)
    detector, classifier = predict.load_detector_dir(det_dir), predict.load_classifier_dir(cls_dir)
    rng = np.random.default_rng(0)
    pixels = disc_pixels([(float(x), float(y), "alive") for x, y in rng.uniform(8, 40, size=(6, 2))])
    PILImage.fromarray(pixels).save(tmp_path / "img.png")
    result = predict_images([tmp_path / "img.png"], detector, classifier)
    out = write_outputs(result, tmp_path / "out")
    cells = pd.read_csv(out.cells)
    assert list(cells.columns) == CELL_COLUMNS
    assert set(cells.detector_version) <= {"detector-0001"} and set(cells.classifier_version) <= {"classifier-0001"}
    assert cells.p_alive.between(0, 1).all() and cells.uncertainty.between(0, 1).all()
    assert (out.overlays / "img.png").is_file()
    again = predict_images([tmp_path / "img.png"], detector, classifier)
    pd.testing.assert_frame_equal(again.cells, result.cells)  # deterministic inference

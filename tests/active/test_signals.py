"""The per-image signal table read from a tiny store: snapshot cells, runs per image, one
model pair's stored predictions (written with :func:`cellspot.ml.project_predictions.store_predictions`)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellspot.active.signals import (
    SIGNAL_COLUMNS,
    NoPredictionsError,
    SnapshotNotFoundError,
    build_signals,
    cell_conflicts,
    crowd_cells_frame,
    image_signals,
    model_cells_frame,
    prediction_pair,
)
from cellspot.active.strategies import score_images

from .test_strategies import CROWD, MODEL

SIZE = 100
# name -> (has_pixels, runs, retired, gold)
IMAGES = {
    "sure.png": (True, 3, False, False), "unsure.png": (True, 3, False, False),
    "conflict.png": (True, 3, False, False), "new.png": (True, 0, False, False),
    "empty.png": (True, 0, False, False), "nopix.png": (False, 2, False, False),
    "done.png": (True, 4, True, True),
}


def add_images(session, project) -> dict:
    """The images of :data:`IMAGES` with their task runs (three students, one click each)."""
    from cellspot.store.models import GoldCell, Image
    from cellspot.store.queries import get_or_create_annotator, submit_task_run

    students = [get_or_create_annotator(session, project, f"s{i}", "c1") for i in range(5)]
    rows = {}
    for name, (pixels, runs, retired, gold) in IMAGES.items():
        image = Image(project_id=project.id, name=name, width=SIZE, height=SIZE, has_pixels=pixels,
                      status="retired" if retired else "active")
        session.add(image)
        session.flush()
        for i in range(runs):
            submit_task_run(session, image, students[i], [(10.0, 10.0, "alive")], f"{name}-{i}")
        if gold:
            session.add(GoldCell(image_id=image.id, x=5.0, y=5.0, label="dead"))
        rows[name] = image
    session.flush()
    return rows


def add_snapshot(session, project, images: dict, radius: float = 5.0):
    """A snapshot with the crafted consensus cells of test_strategies (``x.png`` for image ``x``)."""
    from cellspot.store.models import ConsensusCell, ConsensusSnapshot

    snap = ConsensusSnapshot(project_id=project.id, method="cluster_em", params={"median_radius_px": radius})
    session.add(snap)
    session.flush()
    for image, x, y, p, conf, support, runs, p_cell in CROWD:
        session.add(ConsensusCell(snapshot_id=snap.id, image_id=images[f"{image}.png"].id, x=x, y=y,
                                  label="alive" if p >= 0.5 else "dead", p_alive=p, confidence=conf,
                                  support=support, n_runs=runs, p_cell=p_cell))
    session.flush()
    return snap


def add_predictions(session, project, images: dict, model=MODEL, *, promote: bool = True):
    """A done detector + classifier pair and its predictions of every image with pixels."""
    from cellspot.ml import registry
    from cellspot.ml.predict import DETAIL_COLUMNS, ImagePrediction, PredictionResult
    from cellspot.ml.project_predictions import store_predictions
    from cellspot.store.models import utcnow

    runs = []
    for kind in ("detector", "classifier"):
        run = registry.create_run(session, kind, project=project)
        run.status = "done"
        if promote:
            registry.promote(session, run)
        runs.append(run)
    cells = pd.DataFrame(model, columns=["image", "x", "y", "p_alive", "score"])
    cells = cells.assign(image=cells["image"] + ".png", label=np.where(cells["p_alive"] >= 0.5, "alive", "dead"),
                         uncertainty=0.0, detector_version=runs[0].version, classifier_version=runs[1].version,
                         diameter=8.0)
    result = PredictionResult([], runs[0].version, runs[1].version)
    for name, image in images.items():
        if image.has_pixels:
            rows = cells[cells["image"] == name][DETAIL_COLUMNS].reset_index(drop=True)
            result.images.append(ImagePrediction(name, Path(name), SIZE, SIZE, rows))
    store_predictions(session, images, result, runs[0], runs[1])
    for image in images.values():  # every image existed before the predictions
        image.created_at = utcnow() - timedelta(hours=1)
    session.flush()
    return runs


@pytest.fixture
def project(session):
    from cellspot.store.queries import get_or_create_project

    return get_or_create_project(session, "p")


@pytest.fixture
def stocked(session, project):
    """Images, runs, a snapshot and active predictions."""
    images = add_images(session, project)
    snap = add_snapshot(session, project, images)
    det, cls = add_predictions(session, project, images)
    return images, snap, det, cls


def test_signals_from_the_store(session, project, stocked) -> None:
    images, snap, det, cls = stocked
    table = image_signals(session, "p")
    assert table["image"].tolist() == sorted(IMAGES)
    assert set(SIGNAL_COLUMNS) <= set(table.columns)
    rows = table.set_index("image")
    for name, (pixels, runs, retired, gold) in IMAGES.items():
        assert (rows.loc[name, "has_pixels"], rows.loc[name, "n_runs"]) == (pixels, runs), name
        assert (rows.loc[name, "retired"], rows.loc[name, "gold"]) == (retired, gold), name
    assert rows.loc["unsure.png", "min_confidence"] == pytest.approx(0.4)
    assert rows.loc["unsure.png", "n_model_only"] == 1 and rows.loc["conflict.png", "n_conflicts"] == 1
    assert table.attrs["sources"] == {
        "project": "p", "snapshot_id": snap.id, "detector_run_id": det.id, "classifier_run_id": cls.id,
        "detector_version": det.version, "classifier_version": cls.version, "radius": 5.0,
    }


def test_near_threshold_uses_the_detectors_own_peak_threshold(session, project, stocked, settings) -> None:
    import json

    from cellspot.active.signals import DETECTOR_THRESHOLD, detector_threshold
    from cellspot.ml.registry import model_dir

    _, _, det, _ = stocked
    assert detector_threshold(session, det.id) == DETECTOR_THRESHOLD  # no checkpoint folder
    assert detector_threshold(session, None) == DETECTOR_THRESHOLD
    folder = model_dir(settings, det)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"postprocess": {"peak_threshold": 0.2}}))
    assert detector_threshold(session, det.id) == 0.2
    rows = image_signals(session, "p").set_index("image")  # CELLSPOT_HOME is the settings' home
    scores = pd.DataFrame(MODEL, columns=["image", "x", "y", "p_alive", "score"]).groupby("image")["score"]
    expected = scores.apply(lambda s: float(np.mean(1 - np.abs(s - 0.2) / 0.8)))
    assert len(expected) == 4
    for image, value in expected.items():
        assert rows.loc[f"{image}.png", "det_near_mean"] == pytest.approx(value), image


KINDS = {
    # unlabelled, predicted: model-only signals
    "new.png": {"has_crowd": False, "has_model": True, "n_pred_cells": 1, "entropy_mean": 1.0,
                "min_confidence": np.nan, "n_conflicts": pd.NA},
    # predicted, no cell found: no cells, and no uncertainty measure (not a certain 0, which would
    # rank an image the model may have failed on as its surest)
    "empty.png": {"has_crowd": False, "has_model": True, "n_pred_cells": 0, "entropy_max": np.nan,
                  "margin_sum": np.nan, "det_near_mean": np.nan},
    # labelled, no pixels: crowd only
    "nopix.png": {"has_crowd": True, "has_model": False, "n_cells_consensus": 0, "entropy_mean": np.nan},
}


def test_each_kind_of_image(session, project, stocked) -> None:
    rows = image_signals(session, project).set_index("image")
    for image, expected in KINDS.items():
        for column, value in expected.items():
            got = rows.loc[image, column]
            if value is pd.NA or (isinstance(value, float) and np.isnan(value)):
                assert pd.isna(got), (image, column)
            else:
                assert got == pytest.approx(value), (image, column)


def test_image_added_after_the_predictions_is_not_predicted(session, project, stocked) -> None:
    from cellspot.store.models import Image, utcnow

    session.add(Image(project_id=project.id, name="late.png", width=SIZE, height=SIZE, has_pixels=True,
                      created_at=utcnow() + timedelta(hours=1)))
    session.flush()
    row = image_signals(session, project).set_index("image").loc["late.png"]
    assert not row["has_model"] and pd.isna(row["n_pred_cells"])


def test_before_any_model_only_crowd_signals(session, project) -> None:
    add_snapshot(session, project, add_images(session, project))
    table = image_signals(session, project)
    assert not table["has_model"].any() and table["entropy_mean"].isna().all()
    assert table.attrs["sources"]["detector_run_id"] is None
    ranked = score_images("combined", table)
    assert ranked["score"].notna().all() and ranked["reason"].str.contains("no model prediction").all()


def test_which_predictions_are_used(session, project, stocked) -> None:
    images, _, det, cls = stocked
    newer_det, newer_cls = add_predictions(session, project, images, MODEL[:1], promote=False)
    assert prediction_pair(session, project) == (det.id, cls.id)  # the active pair wins
    assert prediction_pair(session, project, classifier_run_id=newer_cls.id) == (newer_det.id, newer_cls.id)
    table = image_signals(session, project, detector_run_id=newer_det.id, classifier_run_id=newer_cls.id)
    assert table.set_index("image")["n_pred_cells"].sum() == 1
    with pytest.raises(NoPredictionsError, match="run `cellspot predict --project p` first"):
        image_signals(session, project, detector_run_id=det.id, classifier_run_id=newer_cls.id)


def test_per_cell_tables_give_the_conflicting_cell(session, project, stocked) -> None:
    _, snap, det, cls = stocked
    crowd = crowd_cells_frame(session, project)
    model = model_cells_frame(session, project, det.id, cls.id)
    assert len(crowd) == len(CROWD) and len(model) == len(MODEL)
    conflicts = cell_conflicts(crowd, model, radius=5.0)
    assert conflicts[["image", "crowd_x", "crowd_label", "model_label"]].values.tolist() == [
        ["conflict.png", 10.0, "alive", "dead"]]


def test_errors(session, project, stocked) -> None:
    from cellspot.store.queries import ProjectNotFoundError

    with pytest.raises(ProjectNotFoundError, match="existing projects: 'p'"):
        image_signals(session, "nope")
    with pytest.raises(SnapshotNotFoundError, match="snapshot 999"):
        image_signals(session, project, snapshot=999)


def test_build_signals_is_pure_and_infers_runs() -> None:
    crowd = pd.DataFrame(CROWD, columns=["image", "x", "y", "p_alive", "confidence", "support", "n_runs", "p_cell"])
    table = build_signals(pd.DataFrame({"image": ["sure", "other"]}), crowd, None)
    assert table["n_runs"].tolist() == [3, 0] and table["has_crowd"].tolist() == [True, False]
    with pytest.raises(ValueError, match="radius must be > 0"):
        build_signals(pd.DataFrame({"image": ["a"]}), radius=0)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['confidence'"):
        build_signals(pd.DataFrame({"image": ["a"]}), crowd.drop(columns=["confidence"]))

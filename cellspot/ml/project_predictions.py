"""Predictions of a project's images, kept in the store with the model versions that made them.

* :func:`predict_project` predicts every image of a project that has pixels with its active
  models (or given runs) through :func:`cellspot.ml.predict.predict_images` and stores the
  cells (:func:`store_predictions`: re-running the same model pair replaces its rows).
* :func:`match_project_images` finds the project's images among arbitrary predicted files
  (``cellspot predict --project``); :func:`predictions_frame` reads stored cells back for the
  dashboard and the active-learning signals; :func:`active_runs` names the active pair or says
  how to train the missing model.

Sessions are flushed, never committed: the caller's transaction makes a replacement atomic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cellspot.ml.predict import (
    ImageError,
    NoActiveModelError,
    PredictionError,
    PredictionResult,
    ProgressCallback,
    load_classifier_dir,
    load_detector_dir,
    predict_images,
)

log = logging.getLogger(__name__)

SQL_CHUNK = 500


@dataclass
class ProjectPrediction:
    """What :func:`predict_project` did: the run ids and versions, counts, and skipped images."""

    project: str
    detector_run_id: int
    classifier_run_id: int
    detector_version: str
    classifier_version: str
    images: int
    cells: int
    alive: int
    dead: int
    errors: list[ImageError]
    seconds: float
    result: PredictionResult

    @property
    def viability_pct(self) -> float:
        return round(100.0 * self.alive / self.cells, 2) if self.cells else float("nan")


def no_active_model_message(project_name: str, kind: str) -> str:
    """The error text for a project without an active ``kind`` model."""
    return (f"project {project_name!r} has no active {kind} model; train one with "
            f"`cellspot train {kind} --project {project_name}` (and promote it), or pass --{kind} MODEL_DIR")


def active_runs(session: Any, project: Any) -> tuple[Any, Any]:
    """``(detector run, classifier run)`` active in ``project``; :class:`NoActiveModelError`
    names the missing kind and how to train one."""
    from cellspot.ml import registry

    runs = []
    for kind in ("detector", "classifier"):
        run = registry.active_run(session, project, kind)
        if run is None:
            raise NoActiveModelError(no_active_model_message(project.name, kind))
        runs.append(run)
    return runs[0], runs[1]


def predict_project(
    session: Any,
    settings: Any,
    project: Any,
    *,
    detector_run: Any = None,
    classifier_run: Any = None,
    progress: ProgressCallback | None = None,
) -> ProjectPrediction:
    """Predict every image of ``project`` that has pixels and store the cells.

    ``detector_run`` / ``classifier_run``: :class:`cellspot.store.models.ModelRun` rows (default:
    the project's active ones; :class:`NoActiveModelError` when there is none). Images whose
    file is missing or unreadable are skipped and listed in the report. Earlier predictions of
    the same model pair for these images are replaced (:func:`store_predictions`); the session
    is flushed, never committed.
    """
    from sqlalchemy import select

    from cellspot.ml import registry
    from cellspot.ml.common import configure_threads
    from cellspot.render import ImageUnavailableError, image_file
    from cellspot.store.models import Image

    configure_threads(settings.torch_threads)  # CELLSPOT_TORCH_THREADS (a worker's share), as for training
    if detector_run is None or classifier_run is None:
        active_detector, active_classifier = active_runs(session, project)
        detector_run, classifier_run = detector_run or active_detector, classifier_run or active_classifier
    detector = load_detector_dir(registry.model_dir(settings, detector_run))
    classifier = load_classifier_dir(registry.model_dir(settings, classifier_run))
    rows = session.scalars(select(Image).where(Image.project_id == project.id, Image.has_pixels.is_(True))
                           .order_by(Image.name)).all()
    sources, missing = {}, []
    for image in rows:
        try:
            sources[image.name] = image_file(settings, image)
        except ImageUnavailableError as exc:
            missing.append(ImageError(image.name, str(image.path), str(exc)))
    if not sources:
        raise PredictionError(f"project {project.name!r} has no images with readable pixels; import some first")
    result = predict_images(sources, detector, classifier, progress=progress, skip_invalid=True)
    result.errors[:0] = missing
    store_predictions(session, {image.name: image for image in rows}, result, detector_run, classifier_run)
    cells = result.details
    n_alive = int((cells["label"] == "alive").sum())
    return ProjectPrediction(
        project.name, detector_run.id, classifier_run.id, result.detector_version, result.classifier_version,
        len(result.images), len(cells), n_alive, len(cells) - n_alive, result.errors, result.seconds, result,
    )


def store_predictions(
    session: Any, images: Mapping[str, Any], result: PredictionResult, detector_run: Any, classifier_run: Any
) -> int:
    """Store the cells of every predicted image found in ``images`` (name -> store ``Image``),
    and a :class:`~cellspot.store.models.PredictedImage` row per image (so an image predicted
    empty is known to have been predicted). When several predicted files are the same store
    image (copies), only the first is stored.

    Earlier rows of the same ``(detector_run, classifier_run)`` pair on those images are
    deleted first, so re-running replaces rather than duplicates; other model pairs' rows stay.
    Flushes, never commits (the caller's transaction makes the swap atomic). Returns the number
    of rows inserted.
    """
    from sqlalchemy import delete, insert

    from cellspot.store.models import PredictedImage, PredictionCell

    preds, ids = [], []
    for pred in result.images:  # one prediction per store image, the first (several files may be one image)
        image = images.get(pred.image)
        if image is None:
            continue
        if image.id in ids:
            log.warning("%s is the project image %r again (a copy): only %s is stored", pred.image, image.name,
                        preds[ids.index(image.id)].image)
            continue
        preds.append(pred)
        ids.append(image.id)
    for table in (PredictionCell, PredictedImage):
        for start in range(0, len(ids), SQL_CHUNK):
            session.execute(delete(table).where(
                table.image_id.in_(ids[start:start + SQL_CHUNK]),
                table.detector_run_id == detector_run.id,
                table.classifier_run_id == classifier_run.id,
            ))
    marks = [{"image_id": image_id, "detector_run_id": detector_run.id, "classifier_run_id": classifier_run.id,
              "n_cells": len(pred.cells)} for pred, image_id in zip(preds, ids)]
    for start in range(0, len(marks), SQL_CHUNK):
        session.execute(insert(PredictedImage), marks[start:start + SQL_CHUNK])
    rows = [
        {"image_id": image_id, "detector_run_id": detector_run.id, "classifier_run_id": classifier_run.id,
         "x": float(x), "y": float(y), "label": str(label), "p_alive": float(p), "uncertainty": float(u),
         "score": float(s)}
        for pred, image_id in zip(preds, ids)
        for x, y, label, p, u, s in pred.cells[["x", "y", "label", "p_alive", "uncertainty", "score"]]
        .itertuples(index=False, name=None)
    ]
    for start in range(0, len(rows), SQL_CHUNK):
        session.execute(insert(PredictionCell), rows[start:start + SQL_CHUNK])
    session.flush()
    log.info("stored %d predicted cells on %d image(s) (detector run %s, classifier run %s)",
             len(rows), len(ids), detector_run.id, classifier_run.id)
    return len(rows)


def match_project_images(session: Any, project: Any, result: PredictionResult) -> dict[str, Any]:
    """Result image name -> the project's ``Image`` it is: same file content (sha256), or, for a
    project image without pixels (clicks only), the same name and size."""
    from sqlalchemy import select

    from cellspot.imaging import sha256_file
    from cellspot.store.models import Image

    rows = session.scalars(select(Image).where(Image.project_id == project.id)).all()
    by_sha = {image.sha256: image for image in rows if image.sha256}
    by_name = {image.name: image for image in rows if not image.has_pixels}
    matched = {}
    for pred in result.images:
        image = by_sha.get(sha256_file(pred.source))
        if image is None:
            candidate = by_name.get(pred.image) or by_name.get(Path(pred.image).name)
            if candidate is not None and (candidate.width, candidate.height) == (pred.width, pred.height):
                image = candidate
        if image is not None:
            matched[pred.image] = image
    return matched


def predictions_frame(
    session: Any, project: Any, detector_run_id: int | None = None, classifier_run_id: int | None = None
) -> pd.DataFrame:
    """Stored predicted cells of ``project`` (optionally of one detector / classifier run).

    Columns: ``image_id, image, x, y, label, p_alive, uncertainty, score, detector_run_id,
    classifier_run_id, detector_version, classifier_version, created_at``, ordered by image.
    :func:`summarize` turns it into counts and viability per image.
    """
    from sqlalchemy import select
    from sqlalchemy.orm import aliased

    from cellspot.store.models import Image, ModelRun, PredictionCell

    det, cls = aliased(ModelRun), aliased(ModelRun)
    pc = PredictionCell
    stmt = (
        select(pc.image_id, Image.name, pc.x, pc.y, pc.label, pc.p_alive, pc.uncertainty, pc.score,
               pc.detector_run_id, pc.classifier_run_id, det.version, cls.version, pc.created_at)
        .join(Image, Image.id == pc.image_id)
        .outerjoin(det, det.id == pc.detector_run_id)
        .outerjoin(cls, cls.id == pc.classifier_run_id)
        .where(Image.project_id == project.id)
        .order_by(Image.name, pc.id)
    )
    if detector_run_id is not None:
        stmt = stmt.where(pc.detector_run_id == detector_run_id)
    if classifier_run_id is not None:
        stmt = stmt.where(pc.classifier_run_id == classifier_run_id)
    columns = ["image_id", "image", "x", "y", "label", "p_alive", "uncertainty", "score", "detector_run_id",
               "classifier_run_id", "detector_version", "classifier_version", "created_at"]
    return pd.DataFrame(session.execute(stmt).all(), columns=columns)

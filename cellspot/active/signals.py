"""The per-image signal table the acquisition strategies score.

Two layers:

* :func:`build_signals` -- pure (numpy, pandas, scipy matching): images + consensus cells +
  predicted cells -> one row per image. The benchmark calls it on simulated data.
* :func:`image_signals` -- reads a project from the store (a consensus snapshot, the task runs
  per image, one model pair's stored predictions) and calls :func:`build_signals`. SQLAlchemy
  is imported inside the store functions only, so the pure layer stays free of it.
* :func:`image_mc_samples` (optional, for the ``bald`` strategy) -- MC-dropout samples of the
  same pair's classifier at its stored cells; torch is imported only when it is called.

Columns of the table (:data:`SIGNAL_COLUMNS` after the caller's image columns):

* ``n_runs`` task runs on the image; ``has_crowd`` it has runs or consensus cells.
* crowd, over the image's consensus cells (NaN when unlabelled): ``n_cells_consensus``,
  ``mean_confidence``, ``min_confidence``, ``mean_split`` = mean ``|p_alive - 0.5|``,
  ``support_frac`` = mean ``support / n_runs``, ``cell_doubt`` = mean ``1 - |2 p_cell - 1|``,
  ``crowd_alive_frac`` = fraction with ``p_alive >= 0.5``.
* model, over the predicted cells (NaN when no model has seen the image; an image predicted
  empty has ``n_pred_cells`` 0 and NaN for the rest): ``n_pred_cells``, ``pred_alive_frac``,
  ``entropy_mean|max|sum`` of
  ``H(p_alive)`` in bits, ``margin_mean|max|sum`` of ``1 - |2 p_alive - 1|``,
  ``det_near_mean`` = mean ``1 - |score - t| / max(t, 1 - t)``; ``pred_alive_sum`` /
  ``pred_dead_sum`` = sum of ``p_alive`` / ``1 - p_alive`` (the expected cells of each class);
  ``has_model``.
* model vs crowd (NaN unless both): consensus cells with ``p_cell >= 0.5`` matched one-to-one
  to predicted cells within ``radius`` px: ``n_matched``, ``n_model_only``, ``n_crowd_only``;
  ``n_conflicts`` pairs where the labels differ, ``|2 p_model - 1| >= model_confident`` and
  ``confidence >= crowd_confident``; ``conflict_mass`` = sum of ``|2 p_model - 1| * confidence``
  over them.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from cellspot.active.strategies import (
    CONSENSUS_CLASS_COUNTS,
    binary_entropy,
    consensus_class_counts,
    margin_uncertainty,
)
from cellspot.evaluation import match_cells

log = logging.getLogger(__name__)

DEFAULT_MATCH_RADIUS = 20.0
"""px: a predicted cell and a consensus cell closer than this are the same cell (used when
the snapshot records no radius)."""
DETECTOR_THRESHOLD = 0.3
"""The detection threshold ``t`` of ``det_near_mean`` when the detector's own is unknown: the
default ``peak_threshold`` of :func:`cellspot.ml.postprocess.postprocess` (a cell's ``score`` is
the height of its centre-map peak, about 1 for a clear cell and ``t`` for the faintest one kept)."""
MODEL_CONFIDENT = 0.8
CROWD_CONFIDENT = 0.8
CROWD_COLUMNS = ["n_cells_consensus", "mean_confidence", "min_confidence", "mean_split", "support_frac",
                 "cell_doubt", "crowd_alive_frac"]
MODEL_COLUMNS = ["n_pred_cells", "pred_alive_frac", "entropy_mean", "entropy_max", "entropy_sum",
                 "margin_mean", "margin_max", "margin_sum", "det_near_mean", "pred_alive_sum", "pred_dead_sum"]
MATCH_COLUMNS = ["n_matched", "n_model_only", "n_crowd_only", "n_conflicts", "conflict_mass"]
SIGNAL_COLUMNS = ["n_runs", "has_crowd", *CROWD_COLUMNS, "has_model", *MODEL_COLUMNS, *MATCH_COLUMNS]
PAIR_COLUMNS = ["image", "crowd_x", "crowd_y", "model_x", "model_y", "crowd_label", "crowd_p_alive",
                "crowd_confidence", "model_label", "model_p_alive", "distance", "disagree", "conflict",
                "strength"]
_COUNTS = ["n_cells_consensus", "n_pred_cells", "n_matched", "n_model_only", "n_crowd_only", "n_conflicts"]


class NoPredictionsError(LookupError):
    """The requested model runs have no stored predictions in the project."""


class SnapshotNotFoundError(LookupError):
    """The requested consensus snapshot is not in the project."""


# --------------------------------------------------------------------------- pure layer


def build_signals(
    images: pd.DataFrame,
    crowd_cells: pd.DataFrame | None = None,
    model_cells: pd.DataFrame | None = None,
    *,
    predicted_images: Collection[str] | None = None,
    radius: float = DEFAULT_MATCH_RADIUS,
    detector_threshold: float = DETECTOR_THRESHOLD,
    model_confident: float = MODEL_CONFIDENT,
    crowd_confident: float = CROWD_CONFIDENT,
) -> pd.DataFrame:
    """One row per image of ``images`` with the signal columns of the module doc.

    ``images``: column ``image`` (unique names) plus any others, kept in front (``n_runs``
    when known; else the largest ``n_runs`` of the image's consensus cells, or 0).
    ``crowd_cells``: ``image, x, y, p_alive, confidence, support, n_runs`` [``p_cell``].
    ``model_cells``: ``image, x, y`` [``p_alive``, ``score``]. ``predicted_images``: the images
    the models ran on (default: those with a predicted cell), so an image predicted empty
    differs from one never predicted. Cells of images not in ``images`` are ignored.
    """
    if radius <= 0:
        raise ValueError(f"radius must be > 0 px, got {radius}")
    if "image" not in images.columns or images["image"].duplicated().any():
        raise ValueError("images needs an 'image' column with one row per image")
    out = images.reset_index(drop=True).copy()
    names = out["image"].astype(str)
    crowd = _cells(crowd_cells, names, ["x", "y", "p_alive", "confidence", "support", "n_runs"])
    model = _cells(model_cells, names, ["x", "y"])
    if "n_runs" not in out.columns:
        from_cells = crowd.groupby("image")["n_runs"].max() if len(crowd) else pd.Series(dtype=float)
        out["n_runs"] = names.map(from_cells).fillna(0)
    out["n_runs"] = pd.to_numeric(out["n_runs"], errors="coerce").fillna(0).astype("int64")
    out["has_crowd"] = (out["n_runs"] > 0) | names.isin(set(crowd["image"]))
    predicted = set(model["image"]) | set(map(str, predicted_images or ()))
    out["has_model"] = names.isin(predicted)

    crowd_stats = _crowd_stats(crowd).reindex(names).reset_index(drop=True)
    out[CROWD_COLUMNS] = crowd_stats[CROWD_COLUMNS]
    out.loc[out["has_crowd"] & out["n_cells_consensus"].isna(), "n_cells_consensus"] = 0
    model_stats = _model_stats(model, detector_threshold).reindex(names).reset_index(drop=True)
    out[MODEL_COLUMNS] = model_stats[MODEL_COLUMNS]
    empty_pred = out["has_model"] & out["n_pred_cells"].isna()
    # predicted empty: 0 cells, but no uncertainty measure -- with no cell there is nothing to be
    # sure of, and 0 would rank an image the model may have failed on as its most certain one
    out.loc[empty_pred, "n_pred_cells"] = 0.0

    pairs = match_table(crowd, model, radius, model_confident=model_confident, crowd_confident=crowd_confident)
    match = _match_stats(crowd, model, pairs).reindex(names).reset_index(drop=True)
    both = (out["has_crowd"] & out["has_model"]).to_numpy()
    match = match[MATCH_COLUMNS].astype(float)
    match.loc[both] = match.loc[both].fillna(0.0)
    match.loc[~both] = np.nan
    out[MATCH_COLUMNS] = match
    for column in _COUNTS:
        out[column] = out[column].round().astype("Int64")
    # the labelled consensus's class counts over every image of the table, kept in attrs (which
    # pandas carries through row filters), so the rare class of ``rarity`` does not change when a
    # caller leaves retired images (the best-labelled ones) out before scoring
    out.attrs[CONSENSUS_CLASS_COUNTS] = consensus_class_counts(out)
    return out


def _cells(cells: pd.DataFrame | None, names: pd.Series, required: list[str]) -> pd.DataFrame:
    """``cells`` of the listed images, index reset, ``image`` as str; an empty table if None."""
    if cells is None:
        return pd.DataFrame(columns=["image", *required])
    missing = [c for c in ["image", *required] if c not in cells.columns]
    if missing:
        raise ValueError(f"cell table lacks column(s) {missing}; has {list(cells.columns)}")
    out = cells.assign(image=cells["image"].astype(str))
    unknown = ~out["image"].isin(set(names))
    if unknown.any():
        log.info("ignoring %d cell(s) of images not in the signal table", int(unknown.sum()))
    return out[~unknown].reset_index(drop=True)


def _crowd_stats(crowd: pd.DataFrame) -> pd.DataFrame:
    """Per image (index): :data:`CROWD_COLUMNS` over its consensus cells."""
    if crowd.empty:
        return pd.DataFrame(columns=CROWD_COLUMNS, dtype=float)
    p = crowd["p_alive"].astype(float)
    p_cell = (crowd["p_cell"].astype(float).fillna(1.0) if "p_cell" in crowd.columns
              else pd.Series(1.0, index=crowd.index))
    runs = crowd["n_runs"].astype(float).clip(lower=1.0)
    per_cell = pd.DataFrame({
        "image": crowd["image"], "confidence": crowd["confidence"].astype(float),
        "split": (p - 0.5).abs(), "support": (crowd["support"].astype(float) / runs).clip(0.0, 1.0),
        "doubt": 1.0 - (2.0 * p_cell - 1.0).abs(), "alive": (p >= 0.5).astype(float),
    })
    g = per_cell.groupby("image")
    return pd.DataFrame({
        "n_cells_consensus": g.size(), "mean_confidence": g["confidence"].mean(),
        "min_confidence": g["confidence"].min(), "mean_split": g["split"].mean(),
        "support_frac": g["support"].mean(), "cell_doubt": g["doubt"].mean(),
        "crowd_alive_frac": g["alive"].mean(),
    })


def _model_stats(model: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per image (index): :data:`MODEL_COLUMNS` over its predicted cells."""
    if model.empty:
        return pd.DataFrame(columns=MODEL_COLUMNS, dtype=float)
    p = pd.to_numeric(model.get("p_alive", pd.Series(np.nan, index=model.index)), errors="coerce")
    score = pd.to_numeric(model.get("score", pd.Series(np.nan, index=model.index)), errors="coerce")
    per_cell = pd.DataFrame({
        "image": model["image"], "alive": np.where(p.isna(), np.nan, (p >= 0.5).astype(float)),
        "p_alive": p,
        "entropy": binary_entropy(p.to_numpy()), "margin": margin_uncertainty(p.to_numpy()),
        "near": 1.0 - (score - threshold).abs() / max(threshold, 1.0 - threshold),
    })
    g = per_cell.groupby("image")
    alive_sum = g["p_alive"].sum(min_count=1)
    stats = {"n_pred_cells": g.size(), "pred_alive_frac": g["alive"].mean(), "det_near_mean": g["near"].mean(),
             "pred_alive_sum": alive_sum, "pred_dead_sum": g["p_alive"].count() - alive_sum}
    for measure in ("entropy", "margin"):
        for agg in ("mean", "max", "sum"):
            stats[f"{measure}_{agg}"] = getattr(g[measure], agg)(**({"min_count": 1} if agg == "sum" else {}))
    return pd.DataFrame(stats)


def match_table(
    crowd_cells: pd.DataFrame,
    model_cells: pd.DataFrame,
    radius: float = DEFAULT_MATCH_RADIUS,
    *,
    model_confident: float = MODEL_CONFIDENT,
    crowd_confident: float = CROWD_CONFIDENT,
) -> pd.DataFrame:
    """Consensus cells (``p_cell >= 0.5``) matched one-to-one to predicted cells within ``radius``.

    One row per matched pair (:data:`PAIR_COLUMNS`): positions, labels (``p >= 0.5`` = alive),
    probabilities, ``distance``; ``disagree`` when the labels differ; ``conflict`` when they
    differ and both sides are confident (module doc); ``strength = |2 p_model - 1| * confidence``.
    Pure; matching minimises the total distance per image (:func:`cellspot.evaluation.match_cells`).
    """
    crowd = _real_cells(crowd_cells)
    model = model_cells.reset_index(drop=True)
    if crowd.empty or model.empty:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    truth = crowd.assign(image=crowd["image"].astype(str), diameter=2.0 * float(radius))
    m = match_cells(truth, model.assign(image=model["image"].astype(str)), match_fraction=0.5)
    c, p = crowd.iloc[m.truth].reset_index(drop=True), model.iloc[m.pred].reset_index(drop=True)
    p_model = pd.to_numeric(p.get("p_alive", pd.Series(np.nan, index=p.index)), errors="coerce").to_numpy(float)
    p_crowd, conf = c["p_alive"].to_numpy(float), c["confidence"].to_numpy(float)
    disagree = np.isfinite(p_model) & ((p_model >= 0.5) != (p_crowd >= 0.5))
    sure = np.abs(2.0 * p_model - 1.0)
    is_conflict = disagree & (sure >= model_confident) & (conf >= crowd_confident)
    label = np.array(["dead", "alive"], dtype=object)
    return pd.DataFrame({
        "image": c["image"].astype(str).to_numpy(),
        "crowd_x": c["x"].to_numpy(float), "crowd_y": c["y"].to_numpy(float),
        "model_x": p["x"].to_numpy(float), "model_y": p["y"].to_numpy(float),
        "crowd_label": label[(p_crowd >= 0.5).astype(int)], "crowd_p_alive": p_crowd, "crowd_confidence": conf,
        "model_label": np.where(np.isfinite(p_model), label[(np.nan_to_num(p_model) >= 0.5).astype(int)], None),
        "model_p_alive": p_model, "distance": m.distance, "disagree": disagree, "conflict": is_conflict,
        "strength": np.where(is_conflict, sure * conf, 0.0),
    })[PAIR_COLUMNS]


def cell_conflicts(
    crowd_cells: pd.DataFrame, model_cells: pd.DataFrame, radius: float = DEFAULT_MATCH_RADIUS, **thresholds: float
) -> pd.DataFrame:
    """The conflicting pairs of :func:`match_table` (likely labelling errors), strongest first."""
    pairs = match_table(crowd_cells, model_cells, radius, **thresholds)
    return pairs[pairs["conflict"]].sort_values("strength", ascending=False, kind="stable").reset_index(drop=True)


def _real_cells(crowd: pd.DataFrame) -> pd.DataFrame:
    if "p_cell" not in crowd.columns:
        return crowd.reset_index(drop=True)
    return crowd[crowd["p_cell"].astype(float).fillna(1.0) >= 0.5].reset_index(drop=True)


def _match_stats(crowd: pd.DataFrame, model: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """Per image (index): :data:`MATCH_COLUMNS` (only images with cells on some side appear)."""
    real = _real_cells(crowd).groupby("image").size() if len(crowd) else pd.Series(dtype=float)
    pred = model.groupby("image").size() if len(model) else pd.Series(dtype=float)
    g = pairs.groupby("image")
    frame = pd.DataFrame({
        "n_crowd": real, "n_pred": pred, "n_matched": g.size(),
        "n_conflicts": g["conflict"].sum(), "conflict_mass": g["strength"].sum(),
    }).astype(float).fillna(0.0)
    frame["n_model_only"] = frame["n_pred"] - frame["n_matched"]
    frame["n_crowd_only"] = frame["n_crowd"] - frame["n_matched"]
    return frame[MATCH_COLUMNS]


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class SignalSources:
    """What a signal table was built from (also in ``DataFrame.attrs`` of :func:`image_signals`)."""

    project: str
    snapshot_id: int | None
    detector_run_id: int | None
    classifier_run_id: int | None
    detector_version: str | None
    classifier_version: str | None
    radius: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_signals(
    session: Any,
    project: Any,
    *,
    snapshot: Any = None,
    detector_run_id: int | None = None,
    classifier_run_id: int | None = None,
    radius: float | None = None,
) -> pd.DataFrame:
    """The signal table of every image of ``project`` (a ``Project`` or its name), by name.

    Image columns ``image, image_id, retired, has_pixels, gold, width, height`` then the
    signals of the module doc. ``snapshot``: a ``ConsensusSnapshot`` or id (default: the
    latest; none -> crowd columns only from the run counts). Predictions: the given runs, else
    the active detector + classifier pair when it has stored predictions, else the newest
    stored pair, else none (model columns NaN). ``radius``: the matching radius (default: the
    snapshot's cell radius, else :data:`DEFAULT_MATCH_RADIUS`). ``attrs`` holds
    :class:`SignalSources` as a dict. Reads only; the caller owns the session.
    """
    from cellspot.store.queries import as_project, snapshot_cells_frame

    project = as_project(session, project)
    snap = _snapshot(session, project, snapshot)
    images = _images_frame(session, project)
    crowd = snapshot_cells_frame(session, snap) if snap is not None else None
    pair = prediction_pair(session, project, detector_run_id, classifier_run_id)
    model, predicted = None, None
    if pair is not None:
        model = model_cells_frame(session, project, pair[0], pair[1])
        predicted = _marked_images(session, images, pair)
        if predicted is None:  # a pair stored before predicted_images existed
            predicted = _predicted_images(images, model)
    r = float(radius) if radius is not None else snapshot_radius(snap)
    threshold = detector_threshold(session, pair[0] if pair else None)
    table = build_signals(images.drop(columns=["created_at"]), crowd, model, predicted_images=predicted, radius=r,
                          detector_threshold=threshold)
    versions = _versions(session, pair)
    table.attrs["sources"] = SignalSources(
        project.name, snap.id if snap is not None else None, pair[0] if pair else None, pair[1] if pair else None,
        versions[0], versions[1], r,
    ).as_dict()
    log.info("signals of %d images of %r (snapshot %s, predictions %s)", len(table), project.name,
             table.attrs["sources"]["snapshot_id"], pair)
    return table


def _snapshot(session: Any, project: Any, snapshot: Any) -> Any:
    from cellspot.store.models import ConsensusSnapshot
    from cellspot.store.queries import latest_snapshot

    if snapshot is None:
        return latest_snapshot(session, project)
    snap = session.get(ConsensusSnapshot, snapshot) if isinstance(snapshot, int) else snapshot
    if snap is None or snap.project_id != project.id:
        raise SnapshotNotFoundError(f"consensus snapshot {snapshot!r} does not exist in project {project.name!r}")
    return snap


def snapshot_radius(snapshot: Any) -> float:
    """The cell radius a snapshot recorded (``cell_radius``, ``cell_radius_hint``,
    ``median_radius_px`` or ``radius`` in its params), else :data:`DEFAULT_MATCH_RADIUS`."""
    params = (getattr(snapshot, "params", None) or {}) if snapshot is not None else {}
    for key in ("cell_radius", "cell_radius_hint", "median_radius_px", "radius"):
        value = params.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and value > 0:
            return float(value)
    return DEFAULT_MATCH_RADIUS


def _images_frame(session: Any, project: Any) -> pd.DataFrame:
    """``image, image_id, retired, has_pixels, gold, width, height, n_runs, created_at`` by name."""
    from sqlalchemy import func, select

    from cellspot.store.models import GoldCell, Image, TaskRun

    rows = session.execute(
        select(Image.name, Image.id, Image.status, Image.has_pixels, Image.width, Image.height, Image.created_at)
        .where(Image.project_id == project.id).order_by(Image.name)
    ).all()
    frame = pd.DataFrame(rows, columns=["image", "image_id", "status", "has_pixels", "width", "height", "created_at"])
    runs = dict(session.execute(
        select(TaskRun.image_id, func.count(TaskRun.id)).join(Image, Image.id == TaskRun.image_id)
        .where(Image.project_id == project.id).group_by(TaskRun.image_id)
    ).tuples().all())
    gold = set(session.scalars(
        select(GoldCell.image_id).join(Image, Image.id == GoldCell.image_id)
        .where(Image.project_id == project.id).distinct()
    ).all())
    frame["retired"] = frame["status"] == "retired"
    frame["gold"] = frame["image_id"].isin(gold)
    frame["n_runs"] = frame["image_id"].map(runs).fillna(0).astype("int64")
    frame["has_pixels"] = frame["has_pixels"].astype(bool)
    return frame[["image", "image_id", "retired", "has_pixels", "gold", "width", "height", "n_runs", "created_at"]]


def prediction_pair(
    session: Any, project: Any, detector_run_id: int | None = None, classifier_run_id: int | None = None
) -> tuple[int | None, int | None] | None:
    """``(detector_run_id, classifier_run_id)`` of the stored predictions to use, or ``None``.

    Among the pairs with predictions in ``project`` (filtered by the given ids): the active
    pair when present, else the newest. :class:`NoPredictionsError` when ids were given and
    nothing matches.
    """
    from sqlalchemy import func, select

    from cellspot.ml import registry
    from cellspot.store.models import Image, PredictionCell

    pc = PredictionCell
    stmt = (select(pc.detector_run_id, pc.classifier_run_id, func.max(pc.id))
            .join(Image, Image.id == pc.image_id).where(Image.project_id == project.id)
            .group_by(pc.detector_run_id, pc.classifier_run_id))
    pairs = [(d, c, newest) for d, c, newest in session.execute(stmt).all()
             if (detector_run_id is None or d == detector_run_id)
             and (classifier_run_id is None or c == classifier_run_id)]
    if not pairs:
        if detector_run_id is not None or classifier_run_id is not None:
            raise NoPredictionsError(
                f"project {project.name!r} has no stored predictions of detector run {detector_run_id} / "
                f"classifier run {classifier_run_id}; run `cellspot predict --project {project.name}` first")
        return None
    active = tuple(getattr(registry.active_run(session, project, kind), "id", None)
                   for kind in ("detector", "classifier"))
    for d, c, _ in pairs:
        if (d, c) == active:
            return d, c
    d, c, _ = max(pairs, key=lambda row: row[2])
    return d, c


def model_cells_frame(
    session: Any, project: Any, detector_run_id: int | None, classifier_run_id: int | None
) -> pd.DataFrame:
    """Predicted cells of one model pair: ``image, image_id, x, y, label, p_alive, uncertainty,
    score, created_at`` (NULL run ids match NULL)."""
    from sqlalchemy import select

    from cellspot.store.models import Image, PredictionCell

    pc = PredictionCell
    where = [Image.project_id == project.id]
    for column, value in ((pc.detector_run_id, detector_run_id), (pc.classifier_run_id, classifier_run_id)):
        where.append(column.is_(None) if value is None else column == value)
    rows = session.execute(
        select(Image.name, pc.image_id, pc.x, pc.y, pc.label, pc.p_alive, pc.uncertainty, pc.score, pc.created_at)
        .join(Image, Image.id == pc.image_id).where(*where).order_by(pc.image_id, pc.id)
    ).all()
    columns = ["image", "image_id", "x", "y", "label", "p_alive", "uncertainty", "score", "created_at"]
    return pd.DataFrame(rows, columns=columns)


def image_mc_samples(
    session: Any,
    settings: Any,
    project: Any,
    *,
    detector_run_id: int | None = None,
    classifier_run_id: int | None = None,
    samples: int = 20,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """MC-dropout samples for the ``bald`` strategy, at the same cells :func:`image_signals` reads.

    The model pair is chosen as in :func:`image_signals` (:func:`prediction_pair`); its
    classifier is loaded and sampled at the pair's stored cells of every image with readable
    pixels (:func:`cellspot.ml.predict.mc_samples_for_images`). Returns image name ->
    ``(n_cells, T)`` p_alive samples, to pass as
    ``score_images("bald", signals, mc_samples=...)``. Optional and slower than the signals
    (one encoder pass per cell); torch is imported only here. Raises
    :class:`NoPredictionsError` when there are no stored predictions (or none with a
    classifier). Reads only; the caller owns the session.
    """
    from sqlalchemy import select

    from cellspot.ml import registry
    from cellspot.ml.predict import load_classifier_dir, mc_samples_for_images
    from cellspot.render import ImageUnavailableError, image_file
    from cellspot.store.models import Image, ModelRun
    from cellspot.store.queries import as_project

    project = as_project(session, project)
    pair = prediction_pair(session, project, detector_run_id, classifier_run_id)
    run = session.get(ModelRun, pair[1]) if pair is not None and pair[1] is not None else None
    if run is None:
        raise NoPredictionsError(f"project {project.name!r} has no stored predictions of a classifier; run "
                                 f"`cellspot predict --project {project.name}` first")
    cells = model_cells_frame(session, project, pair[0], pair[1])
    paths = {}
    for image in session.scalars(select(Image).where(Image.project_id == project.id, Image.has_pixels.is_(True))):
        try:
            paths[image.name] = image_file(settings, image)
        except ImageUnavailableError as exc:
            log.warning("no MC samples for %s: %s", image.name, exc)
    classifier = load_classifier_dir(registry.model_dir(settings, run))
    return mc_samples_for_images(paths, cells, classifier, samples=samples, seed=seed)


def crowd_cells_frame(session: Any, project: Any, snapshot: Any = None) -> pd.DataFrame:
    """The consensus cells of ``snapshot`` (default: the latest; empty table when none)."""
    from cellspot.store.queries import SNAPSHOT_CELL_COLUMNS, snapshot_cells_frame

    snap = _snapshot(session, project, snapshot)
    return snapshot_cells_frame(session, snap) if snap is not None else pd.DataFrame(columns=SNAPSHOT_CELL_COLUMNS)


def _marked_images(session: Any, images: pd.DataFrame, pair: tuple[int | None, int | None]) -> set[str] | None:
    """Names of the images the pair ran on, from its
    :class:`~cellspot.store.models.PredictedImage` rows; None when it has none (stored before
    those rows were written)."""
    from sqlalchemy import select

    from cellspot.store.models import PredictedImage

    pi = PredictedImage
    ids = set(session.scalars(select(pi.image_id).where(
        pi.detector_run_id.is_(None) if pair[0] is None else pi.detector_run_id == pair[0],
        pi.classifier_run_id.is_(None) if pair[1] is None else pi.classifier_run_id == pair[1])))
    if not ids:
        return None
    return set(images.loc[images["image_id"].isin(ids), "image"].astype(str))


def _predicted_images(images: pd.DataFrame, model: pd.DataFrame) -> set[str]:
    """Images the pair ran on, for pairs stored without :func:`_marked_images`: those with
    predicted cells, plus images with pixels created before its newest prediction (predicted,
    no cell found)."""
    found = set(model["image"].astype(str))
    if model.empty:
        return found
    newest = pd.to_datetime(model["created_at"], utc=True).max()
    created = pd.to_datetime(images["created_at"], utc=True)
    older = images.loc[images["has_pixels"] & (created <= newest), "image"].astype(str)
    return found | set(older)


def detector_threshold(session: Any, run_id: int | None, settings: Any = None) -> float:
    """The peak threshold the detector run ``run_id`` detects with (its ``config.json``'s tuned
    ``postprocess``), else :data:`DETECTOR_THRESHOLD` (no run, or its folder is gone)."""
    import json

    from cellspot.ml import registry
    from cellspot.ml.files import CONFIG_FILE
    from cellspot.settings import get_settings
    from cellspot.store.models import ModelRun

    run = session.get(ModelRun, run_id) if run_id is not None else None
    if run is None:
        return DETECTOR_THRESHOLD
    path = registry.model_dir(settings or get_settings(), run) / CONFIG_FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("postprocess", {}).get("peak_threshold")
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("detector %s: no peak threshold in %s (%s); using %g", run.version, path, exc,
                    DETECTOR_THRESHOLD)
        return DETECTOR_THRESHOLD
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) < 1.0
    return float(value) if ok else DETECTOR_THRESHOLD


def _versions(session: Any, pair: tuple[int | None, int | None] | None) -> tuple[str | None, str | None]:
    from cellspot.store.models import ModelRun

    if pair is None:
        return None, None
    return tuple(getattr(session.get(ModelRun, i), "version", None) if i is not None else None for i in pair)

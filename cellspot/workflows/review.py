"""Image review and adjudication: what the crowd and the experts said about one image, and a
researcher's decisions on its cells.

Adjudication model: a researcher's decisions are stored as expert cells
(:class:`cellspot.store.models.GoldCell`, ``source="adjudication"``). The first decision on an
image copies its current consensus cells into the expert set (an expert set must be complete:
once an image has expert cells they replace its consensus in the next aggregate, and they
serve as gold for students' reliability and feedback); the decision is then applied to that
set. Deleting the last expert cell of an image, or accepting an image that has no cell, is a
decision too: the image is marked ``expert_empty`` and its consensus is replaced by no cells
(it came back at the next aggregate before). Only :func:`clear_expert_cells` ("Back to
consensus") gives an image back to its consensus.

Every function takes a caller-owned session and never commits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cellspot.store import queries
from cellspot.store.models import (
    CELL_LABELS,
    Annotator,
    Click,
    ConsensusCell,
    ConsensusSnapshot,
    GoldCell,
    Image,
    Project,
    TaskRun,
)
from cellspot.workflows.dashboard import DashboardError

log = logging.getLogger(__name__)

DEFAULT_PICK_TOLERANCE = 15.0  # px: an adjudication click this close to a cell targets it
SUPPORT_RADIUS = 20.0  # px: clicks this close to an expert cell count as its support
RESEARCHER_NICKNAME = "researcher"
REVIEW_CELL_COLUMNS = [
    "cell", "x", "y", "label", "p_alive", "confidence", "support", "n_runs", "p_cell", "from_gold", "source",
]
REVIEW_CLICK_COLUMNS = [
    "task_run_id", "annotator_id", "nickname", "role", "x", "y", "label", "click_index", "submitted_at",
]


class AdjudicationError(DashboardError):
    """An adjudication cannot be applied (unknown action, no cell there, bad label or position)."""


class ImageNotInStoreError(LookupError):
    """No image with that id."""


# --------------------------------------------------------------------------- review


@dataclass(frozen=True)
class Review:
    """One image for review.

    ``cells``: the image's current cells (:data:`REVIEW_CELL_COLUMNS`): its expert cells when
    it has any (``from_gold`` True, ``cell`` = the expert cell id, ``source`` e.g.
    ``"adjudication"``), none when an expert found it empty, else the latest snapshot's
    consensus cells (``cell`` = consensus cell id, ``source`` ``"consensus"``). ``clicks``:
    every raw click on the image (:data:`REVIEW_CLICK_COLUMNS`). ``expert``: True when
    ``cells`` are expert cells (or the expert's "no cells").
    ``n_runs``: the image's task runs up to now, those without a click included (as in the
    project's per-image results).
    """

    image: Image
    cells: pd.DataFrame
    clicks: pd.DataFrame
    snapshot_id: int | None
    expert: bool
    n_runs: int


def _get_image(session: Session, image_id: int) -> Image:
    image = session.get(Image, int(image_id))
    if image is None:
        raise ImageNotInStoreError(f"no image with id {image_id}")
    return image


def image_review(session: Session, image_id: int) -> Review:
    """The image ``image_id`` with its current cells and raw clicks (see :class:`Review`)."""
    image = _get_image(session, image_id)
    clicks = _image_clicks(session, image.id)
    project = session.get(Project, image.project_id)
    snapshot = queries.latest_snapshot(session, project)
    n_runs = int(session.scalar(select(func.count()).select_from(TaskRun).where(TaskRun.image_id == image.id)) or 0)
    expert = _expert_cells(session, image.id)
    if expert or image.expert_empty:
        cells = _expert_frame(expert, clicks, n_runs)
    else:
        cells = _consensus_frame(session, snapshot, image.id)
    return Review(image=image, cells=cells, clicks=clicks, snapshot_id=snapshot.id if snapshot else None,
                  expert=bool(expert) or bool(image.expert_empty), n_runs=n_runs)


def _image_clicks(session: Session, image_id: int) -> pd.DataFrame:
    stmt = (select(TaskRun.id, TaskRun.annotator_id, Annotator.nickname, Annotator.role, Click.x, Click.y,
                   Click.label, Click.click_index, TaskRun.submitted_at)
            .join(TaskRun, Click.task_run_id == TaskRun.id)
            .join(Annotator, TaskRun.annotator_id == Annotator.id)
            .where(TaskRun.image_id == image_id).order_by(TaskRun.id, Click.click_index))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=REVIEW_CLICK_COLUMNS)
    return frame.astype({"x": float, "y": float})


def _expert_cells(session: Session, image_id: int) -> list[GoldCell]:
    return list(session.scalars(select(GoldCell).where(GoldCell.image_id == image_id).order_by(GoldCell.id)))


def _expert_frame(cells: list[GoldCell], clicks: pd.DataFrame, n_runs: int) -> pd.DataFrame:
    """Expert cells as review cells; ``support`` counts the runs with a click near each, out of
    ``n_runs`` (every run of the image: one that marked nothing there did not support it)."""
    xy = np.array([[c.x, c.y] for c in cells], float).reshape(-1, 2)
    support = np.zeros(len(cells), dtype=np.int64)
    if len(clicks):
        cxy = clicks[["x", "y"]].to_numpy(float)
        close = ((xy[:, None, :] - cxy[None, :, :]) ** 2).sum(-1) <= SUPPORT_RADIUS**2  # (n_cells, n_clicks)
        runs = clicks["task_run_id"].to_numpy()
        support = np.array([len(np.unique(runs[row])) for row in close], dtype=np.int64)
    return pd.DataFrame({
        "cell": [c.id for c in cells], "x": xy[:, 0], "y": xy[:, 1], "label": [c.label for c in cells],
        "p_alive": [1.0 if c.label == "alive" else 0.0 for c in cells], "confidence": 1.0,
        "support": support, "n_runs": n_runs, "p_cell": 1.0, "from_gold": True,
        "source": [c.source for c in cells],
    })[REVIEW_CELL_COLUMNS]


def _consensus_frame(session: Session, snapshot: ConsensusSnapshot | None, image_id: int) -> pd.DataFrame:
    if snapshot is None:
        return pd.DataFrame(columns=REVIEW_CELL_COLUMNS)
    c = ConsensusCell
    stmt = (select(c.id, c.x, c.y, c.label, c.p_alive, c.confidence, c.support, c.n_runs, c.p_cell, c.from_gold)
            .where(c.snapshot_id == snapshot.id, c.image_id == image_id).order_by(c.id))
    frame = pd.DataFrame(session.execute(stmt).tuples().all(), columns=REVIEW_CELL_COLUMNS[:-1])
    frame["source"] = np.where(frame["from_gold"].astype(bool), "expert (snapshot)", "consensus")
    return frame[REVIEW_CELL_COLUMNS]


# --------------------------------------------------------------------------- adjudication


@dataclass(frozen=True)
class Adjudication:
    """What :func:`adjudicate` did: the ``action``, the cell it touched (``x``, ``y``, ``label``;
    ``gold_cell_id`` None after a delete), how many consensus cells were copied into the expert
    set first (``seeded``) and the size of the image's expert set now."""

    action: str
    image_id: int
    x: float | None
    y: float | None
    label: str | None
    gold_cell_id: int | None
    seeded: int
    n_expert_cells: int


def researcher_annotator(session: Session, project: Project, nickname: str = RESEARCHER_NICKNAME) -> Annotator:
    """The researcher annotator of ``project`` that adjudications are recorded under."""
    return queries.get_or_create_annotator(session, project, nickname, "", role="researcher")


def _nearest(cells: list[GoldCell], x: float, y: float, tolerance: float) -> GoldCell | None:
    best, best_d = None, float(tolerance)
    for cell in cells:
        d = math.hypot(cell.x - x, cell.y - y)
        if d <= best_d:
            best, best_d = cell, d
    return best


def _seed(session: Session, image: Image, researcher: Annotator | None) -> int:
    """Copy the latest consensus cells of ``image`` into its expert set; returns how many."""
    project = session.get(Project, image.project_id)
    snapshot = queries.latest_snapshot(session, project)
    if snapshot is None:
        return 0
    rows = session.execute(select(ConsensusCell.x, ConsensusCell.y, ConsensusCell.label).where(
        ConsensusCell.snapshot_id == snapshot.id, ConsensusCell.image_id == image.id)
        .order_by(ConsensusCell.id)).tuples().all()
    session.add_all(GoldCell(image_id=image.id, x=float(x), y=float(y), label=label, source="adjudication",
                             annotator_id=researcher.id if researcher else None) for x, y, label in rows)
    session.flush()
    return len(rows)


def _need_label(label: str | None) -> str:
    if label not in CELL_LABELS:
        raise AdjudicationError(f"label {label!r} is not allowed for an expert cell; allowed: {', '.join(CELL_LABELS)}")
    return label


def _target(cells: list[GoldCell], x: float | None, y: float | None, tolerance: float, action: str) -> GoldCell:
    if x is None or y is None:
        raise AdjudicationError(f"{action} needs the position (x, y) of the cell")
    cell = _nearest(cells, float(x), float(y), tolerance)
    if cell is None:
        raise AdjudicationError(f"no cell within {tolerance:g} px of ({float(x):.1f}, {float(y):.1f}) to {action}")
    return cell


def _accept(session: Session, image: Image, cells: list[GoldCell], x: float | None, y: float | None,
            label: str | None, researcher: Annotator | None, tolerance: float) -> GoldCell | None:
    if x is None and y is None:  # accept the whole image as it is
        return None
    cell = _target(cells, x, y, tolerance, "accept")
    cell.source, cell.annotator_id = "adjudication", researcher.id if researcher else cell.annotator_id
    return cell


def _relabel(session: Session, image: Image, cells: list[GoldCell], x: float | None, y: float | None,
             label: str | None, researcher: Annotator | None, tolerance: float) -> GoldCell | None:
    new = _need_label(label)
    cell = _target(cells, x, y, tolerance, "relabel")
    cell.label, cell.source = new, "adjudication"
    cell.annotator_id = researcher.id if researcher else cell.annotator_id
    return cell


def _delete(session: Session, image: Image, cells: list[GoldCell], x: float | None, y: float | None,
            label: str | None, researcher: Annotator | None, tolerance: float) -> GoldCell | None:
    cell = _target(cells, x, y, tolerance, "delete")
    session.delete(cell)
    return cell


def _add(session: Session, image: Image, cells: list[GoldCell], x: float | None, y: float | None,
         label: str | None, researcher: Annotator | None, tolerance: float) -> GoldCell | None:
    new = _need_label(label)
    if x is None or y is None:
        raise AdjudicationError("add needs the position (x, y) of the new cell")
    x, y = float(x), float(y)
    if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < image.width and 0 <= y < image.height):
        raise AdjudicationError(f"({x}, {y}) is outside image {image.name!r} "
                                f"(allowed 0 <= x < {image.width}, 0 <= y < {image.height})")
    near = _nearest(cells, x, y, tolerance)  # the radius that would pick that cell: a click on its marker
    if near is not None:
        raise AdjudicationError(f"a cell already lies at ({near.x:.1f}, {near.y:.1f}), within "
                                f"{tolerance:.1f} px; relabel or delete it instead")
    cell = GoldCell(image_id=image.id, x=x, y=y, label=new, source="adjudication",
                    annotator_id=researcher.id if researcher else None)
    session.add(cell)
    return cell


AdjudicationAction = Callable[..., "GoldCell | None"]
ADJUDICATION_ACTIONS: dict[str, AdjudicationAction] = {
    "accept": _accept, "relabel": _relabel, "delete": _delete, "add": _add,
}


def adjudicate(
    session: Session,
    image_id: int,
    action: str,
    x: float | None = None,
    y: float | None = None,
    label: str | None = None,
    researcher: Annotator | None = None,
    tolerance: float = DEFAULT_PICK_TOLERANCE,
) -> Adjudication:
    """Apply one researcher decision to image ``image_id``'s expert cells.

    ``action`` (:data:`ADJUDICATION_ACTIONS`): ``accept`` the cell nearest ``(x, y)`` (or,
    with no position, the image's consensus as a whole, "no cells" when it has none), ``relabel`` it to ``label``,
    ``delete`` it, or ``add`` a cell of ``label`` at ``(x, y)``. "Nearest" means within
    ``tolerance`` px. The first decision on an image copies its consensus cells into the
    expert set (see the module docstring). The effect reaches consensus, retirement and
    reliability at the next :func:`cellspot.workflows.aggregate.aggregate`.
    Raises :class:`AdjudicationError`, :class:`ImageNotInStoreError`. Flushes, never commits.
    """
    apply = ADJUDICATION_ACTIONS.get(action)
    if apply is None:
        raise AdjudicationError(f"unknown adjudication action {action!r}; allowed: {', '.join(ADJUDICATION_ACTIONS)}")
    image = _get_image(session, image_id)
    if researcher is not None and researcher.project_id != image.project_id:
        raise AdjudicationError(f"annotator {researcher.id} belongs to another project than image {image.id}")
    if action in ("relabel", "add"):
        _need_label(label)
    cells = _expert_cells(session, image.id)
    seeded = 0 if cells or image.expert_empty else _seed(session, image, researcher)
    if seeded:
        cells = _expert_cells(session, image.id)
    cell = apply(session, image, cells, x, y, label, researcher, float(tolerance))
    session.flush()
    n_expert = session.scalar(select(func.count()).select_from(GoldCell).where(GoldCell.image_id == image.id)) or 0
    image.expert_empty = n_expert == 0  # an expert decision: no cells (not "back to consensus")
    session.flush()
    log.info("image %d: %s (%s) by %s; %d expert cells", image.id, action, label or "-",
             researcher.nickname if researcher else "unknown", n_expert)
    return Adjudication(
        action=action, image_id=image.id,
        x=cell.x if cell is not None else None, y=cell.y if cell is not None else None,
        label=cell.label if cell is not None else None,
        gold_cell_id=None if cell is None or action == "delete" else cell.id,
        seeded=seeded, n_expert_cells=int(n_expert),
    )


def clear_expert_cells(session: Session, image_id: int) -> int:
    """Remove every expert cell of an image, and an expert's "no cells", so that the image goes
    back to its consensus; returns how many cells were removed."""
    image = _get_image(session, image_id)
    image.expert_empty = False
    session.flush()
    result = session.execute(delete(GoldCell).where(GoldCell.image_id == image.id))
    session.expire_all()
    return int(result.rowcount or 0)


__all__ = [
    "ADJUDICATION_ACTIONS", "Adjudication", "AdjudicationError", "DEFAULT_PICK_TOLERANCE", "ImageNotInStoreError",
    "REVIEW_CELL_COLUMNS", "REVIEW_CLICK_COLUMNS", "Review", "adjudicate", "clear_expert_cells", "image_review",
    "researcher_annotator",
]

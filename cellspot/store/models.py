"""SQLAlchemy 2 typed ORM models of the label store.

Portable SQL only: labels and roles are short strings guarded by CHECK constraints
(no native enums), metadata is JSON, times are timezone-aware UTC. Constraint
names follow one naming convention so Alembic migrations can refer to them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CLICK_LABELS = ("alive", "dead", "not_sure")
CELL_LABELS = ("alive", "dead")
ANNOTATOR_ROLES = ("student", "expert", "researcher", "imported")
IMAGE_STATUSES = ("active", "retired")
#: the longest image name, annotator nickname and class code the store holds (its column
#: sizes); the importers refuse longer ones with their line, as PostgreSQL would fail the batch
IMAGE_NAME_MAX = 500
NICKNAME_MAX = 200
CLASS_CODE_MAX = 100


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_utc(value: Any) -> datetime | None:
    """A stored time (a datetime, naive = UTC as SQLite returns it, or an ISO string as JSON
    settings hold it) as an aware UTC datetime; ``None`` for nothing or unparsable text."""
    if not value:
        return None
    try:
        ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return None
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Project(Base):
    """A labelling project: its images, class codes and rules."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    images: Mapped[list[Image]] = relationship(back_populates="project", cascade="all, delete-orphan")
    annotators: Mapped[list[Annotator]] = relationship(
        back_populates="project", cascade="all, delete-orphan"
    )


class Image(Base):
    """One microscopy image. ``path`` is relative to ``CELLSPOT_HOME``; ``None`` without pixels."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_images_project_name"),
        UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        CheckConstraint("width > 0 AND height > 0", name="positive_size"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(IMAGE_NAME_MAX))
    sha256: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str | None] = mapped_column(String(1000))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer, default=1)
    bit_depth: Mapped[int] = mapped_column(Integer, default=8)
    has_pixels: Mapped[bool] = mapped_column(Boolean, default=False)
    #: an expert decided the image has no cells: its (empty) expert set replaces its consensus
    #: (an image with expert cells needs no flag; see cellspot.workflows.review)
    expert_empty: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")
    retired_at: Mapped[datetime | None] = mapped_column()
    retired_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("consensus_snapshots.id", ondelete="SET NULL", use_alter=True)
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    project: Mapped[Project] = relationship(back_populates="images")
    task_runs: Mapped[list[TaskRun]] = relationship(back_populates="image", cascade="all, delete-orphan")
    gold_cells: Mapped[list[GoldCell]] = relationship(back_populates="image", cascade="all, delete-orphan")


class Annotator(Base):
    """A student (nickname + class code), an expert, or an anonymous imported run. No personal data."""

    __tablename__ = "annotators"
    __table_args__ = (
        UniqueConstraint("project_id", "class_code", "nickname", name="uq_annotators_identity"),
        CheckConstraint(_in("role", ANNOTATOR_ROLES), name="role"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    nickname: Mapped[str] = mapped_column(String(NICKNAME_MAX))
    class_code: Mapped[str] = mapped_column(String(CLASS_CODE_MAX), default="")
    role: Mapped[str] = mapped_column(String(16), default="student")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: when the student last pressed Leave (None: never, or joined again since)
    left_at: Mapped[datetime | None] = mapped_column()

    project: Mapped[Project] = relationship(back_populates="annotators")
    # deleting an annotator deletes its runs (the FK cascades too); without this the ORM would
    # try to set task_runs.annotator_id to NULL, which the NOT NULL column refuses
    task_runs: Mapped[list[TaskRun]] = relationship(
        back_populates="annotator", cascade="save-update, merge, delete", passive_deletes=True
    )


class TaskRun(Base):
    """One annotator's submission on one image. ``client_key`` makes a double submit store one run."""

    __tablename__ = "task_runs"
    __table_args__ = (Index("ix_task_runs_image_annotator", "image_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    client_key: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(String(500), default="app")
    is_gold_check: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime | None] = mapped_column()
    submitted_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="task_runs")
    annotator: Mapped[Annotator] = relationship(back_populates="task_runs")
    clicks: Mapped[list[Click]] = relationship(
        back_populates="task_run", cascade="all, delete-orphan", order_by="Click.click_index"
    )


class Click(Base):
    """One click, in original image pixels (x right, y down, origin at the top-left corner)."""

    __tablename__ = "clicks"
    __table_args__ = (
        CheckConstraint(_in("label", CLICK_LABELS), name="label"),
        UniqueConstraint("task_run_id", "click_index", name="uq_clicks_run_index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_run_id: Mapped[int] = mapped_column(ForeignKey("task_runs.id", ondelete="CASCADE"), index=True)
    click_index: Mapped[int] = mapped_column(Integer)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))

    task_run: Mapped[TaskRun] = relationship(back_populates="clicks")


class GoldCell(Base):
    """An expert cell: imported ground truth or a researcher's adjudication. Overrides consensus."""

    __tablename__ = "gold_cells"
    __table_args__ = (CheckConstraint(_in("label", CELL_LABELS), name="label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(500), default="import")
    annotator_id: Mapped[int | None] = mapped_column(ForeignKey("annotators.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="gold_cells")


class ConsensusSnapshot(Base):
    """One run of a consensus method over a project: method, parameters, time, counts."""

    __tablename__ = "consensus_snapshots"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    cells: Mapped[list[ConsensusCell]] = relationship(
        back_populates="snapshot", cascade="all, delete-orphan"
    )
    reliabilities: Mapped[list[AnnotatorReliability]] = relationship(
        back_populates="snapshot", cascade="all, delete-orphan"
    )


class ConsensusCell(Base):
    """A cell found by a consensus snapshot: position, probability of being alive, confidence."""

    __tablename__ = "consensus_cells"
    __table_args__ = (
        CheckConstraint(_in("label", CELL_LABELS), name="label"),
        CheckConstraint("p_alive >= 0 AND p_alive <= 1", name="p_alive_range"),
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence_range"),
        Index("ix_consensus_cells_snapshot_image", "snapshot_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("consensus_snapshots.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    p_alive: Mapped[float] = mapped_column(Float)
    p_cell: Mapped[float] = mapped_column(Float, default=1.0)
    confidence: Mapped[float] = mapped_column(Float)
    support: Mapped[int] = mapped_column(Integer)
    n_runs: Mapped[int] = mapped_column(Integer)
    from_gold: Mapped[bool] = mapped_column(Boolean, default=False)

    snapshot: Mapped[ConsensusSnapshot] = relationship(back_populates="cells")


class AnnotatorReliability(Base):
    """Per-annotator reliability estimated by a consensus snapshot."""

    __tablename__ = "annotator_reliability"
    __table_args__ = (
        UniqueConstraint("snapshot_id", "annotator_id", name="uq_annotator_reliability_snapshot_annotator"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("consensus_snapshots.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    sensitivity: Mapped[float] = mapped_column(Float)
    precision: Mapped[float] = mapped_column(Float)
    accuracy_alive: Mapped[float] = mapped_column(Float)
    accuracy_dead: Mapped[float] = mapped_column(Float)
    weight: Mapped[float] = mapped_column(Float)
    n_runs: Mapped[int] = mapped_column(Integer)
    n_clicks: Mapped[int] = mapped_column(Integer)

    snapshot: Mapped[ConsensusSnapshot] = relationship(back_populates="reliabilities")


MODEL_KINDS = ("classifier", "detector")
RUN_STATUSES = ("queued", "running", "done", "failed", "cancelled")


class ModelRun(Base):
    """One training run of a model: its config, data, progress, metrics and checkpoint folder.

    ``version`` ("classifier-0007") is unique and grows per kind. ``path`` is the checkpoint
    folder, relative to ``CELLSPOT_HOME`` when inside it (``models/<kind>/<version>``).
    ``progress`` is the latest :class:`cellspot.ml.common.Progress` as a dict, ``curves`` one
    row per finished epoch. At most one ``done`` run per project and kind is active
    (enforced by :func:`cellspot.ml.registry.promote`). ``project_id`` is ``NULL`` for runs
    trained on a plain annotated folder.
    """

    __tablename__ = "model_runs"
    __table_args__ = (
        CheckConstraint(_in("kind", MODEL_KINDS), name="kind"),
        CheckConstraint(_in("status", RUN_STATUSES), name="status"),
        Index("ix_model_runs_project_kind", "project_id", "kind"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    preset: Mapped[str] = mapped_column(String(64), default="cpu-fast")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_source: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_snapshot_id: Mapped[str | None] = mapped_column(String(200))
    snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("consensus_snapshots.id", ondelete="SET NULL")
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    curves: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    path: Mapped[str | None] = mapped_column(String(1000))
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    promoted_at: Mapped[datetime | None] = mapped_column()


class PredictionCell(Base):
    """A cell predicted by the models: position, label and probability, with the model runs used.

    ``label``/``p_alive``/``uncertainty`` are ``NULL`` when no classifier ran; ``score`` is the
    detector's confidence (``NULL`` when the positions did not come from a detector).
    """

    __tablename__ = "prediction_cells"
    __table_args__ = (
        CheckConstraint(_in("label", CELL_LABELS), name="label"),
        CheckConstraint("p_alive >= 0 AND p_alive <= 1", name="p_alive_range"),
        Index("ix_prediction_cells_image_detector", "image_id", "detector_run_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    detector_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_runs.id", ondelete="SET NULL")
    )
    classifier_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_runs.id", ondelete="SET NULL"), index=True
    )
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))
    p_alive: Mapped[float | None] = mapped_column(Float)
    uncertainty: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PredictedImage(Base):
    """An image a detector + classifier pair was run on, with how many cells it found.

    Told apart from the cells: an image predicted empty has this row and no
    :class:`PredictionCell`, an image never predicted by the pair has neither (a prediction of
    part of a project must not read as "no cell here" on the rest).
    """

    __tablename__ = "predicted_images"
    __table_args__ = (Index("ix_predicted_images_image_detector", "image_id", "detector_run_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    detector_run_id: Mapped[int | None] = mapped_column(ForeignKey("model_runs.id", ondelete="SET NULL"))
    classifier_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_runs.id", ondelete="SET NULL"), index=True
    )
    n_cells: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


ROUND_STATUSES = ("open", "closed", "rolled_back")


class ALRound(Base):
    """One active-learning round of a project: the ranked queue of images students get next.

    ``number`` counts a project's rounds from 1. At most one round per project is ``open``
    (:func:`cellspot.active.rounds.open_round` closes the previous one); a rolled-back round
    keeps its number and queue for the history. ``params`` holds what the ranking used
    (``top``, ``target_runs``, the consensus snapshot, the model versions, runs so far);
    ``detector_run_id`` / ``classifier_run_id`` name the models whose predictions were scored
    (``NULL`` before any model exists).
    """

    __tablename__ = "al_rounds"
    __table_args__ = (
        CheckConstraint(_in("status", ROUND_STATUSES), name="status"),
        UniqueConstraint("project_id", "number", name="uq_al_rounds_project_number"),
        # at most one open round per project, also when two researchers open one at once
        Index("uq_al_rounds_one_open", "project_id", unique=True,
              sqlite_where=text("status = 'open'"), postgresql_where=text("status = 'open'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="open")
    strategy: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    detector_run_id: Mapped[int | None] = mapped_column(ForeignKey("model_runs.id", ondelete="SET NULL"))
    classifier_run_id: Mapped[int | None] = mapped_column(ForeignKey("model_runs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column()

    queue: Mapped[list[ALQueueItem]] = relationship(
        back_populates="round", cascade="all, delete-orphan", order_by="ALQueueItem.rank"
    )


class ALQueueItem(Base):
    """One image in a round's queue: its ``rank`` (1 = asked first), score and why.

    ``components`` holds the per-signal scores that made ``score`` (JSON object of numbers);
    ``score`` is ``NULL`` when the strategy gave none (a non-finite value).
    """

    __tablename__ = "al_queue"
    __table_args__ = (
        UniqueConstraint("round_id", "image_id", name="uq_al_queue_round_image"),
        UniqueConstraint("round_id", "rank", name="uq_al_queue_round_rank"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("al_rounds.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    components: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")

    round: Mapped[ALRound] = relationship(back_populates="queue")


class ImageLease(Base):
    """An image handed to a student and not submitted yet; it stops counting at ``expires_at``.

    ``slot`` numbers the concurrent leases of one image (0, 1, ... below the round's target
    runs): the unique ``(image_id, slot)`` pair is what makes two students racing for the last
    free place of an image collide in the database, so one of them moves on
    (:mod:`cellspot.active.scheduler`). A student holds at most one lease per image.
    """

    __tablename__ = "image_leases"
    __table_args__ = (
        UniqueConstraint("image_id", "annotator_id", name="uq_image_leases_image_annotator"),
        UniqueConstraint("image_id", "slot", name="uq_image_leases_image_slot"),
        CheckConstraint("slot >= 0", name="slot_nonnegative"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("al_rounds.id", ondelete="SET NULL"), index=True)
    slot: Mapped[int] = mapped_column(Integer)
    leased_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class LabelDraft(Base):
    """A student's marks on the image on their screen, not submitted yet (one per student).

    Written on every change of the marks and deleted by the submit, so a reload, a phone
    dropping a background tab or another device brings the student back to the same image
    with the marks they had placed (:func:`cellspot.workflows.classroom.draft_of`).
    ``marks``: ``[[x, y, label], ...]`` in original image pixels.
    """

    __tablename__ = "label_drafts"

    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    marks: Mapped[list[Any]] = mapped_column(JSON, default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

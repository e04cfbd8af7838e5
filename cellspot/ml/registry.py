"""The model registry: training runs in the store, their checkpoint folders, promote / roll back.

Every training run is one :class:`~cellspot.store.models.ModelRun` row with a version such as
``classifier-0007`` (unique, growing per kind), its config, data source and snapshot,
progress, curves, metrics and checkpoint folder (``models/<kind>/<version>`` under
``CELLSPOT_HOME``). One ``done`` run per project and kind is *active*: the one the
dashboard and ``cellspot predict`` use by default. :func:`promote` makes a run active and
remembers when; :func:`rollback` undoes the latest promotion, so repeated roll-backs walk
back through the promotion history.

No torch here: the dashboard imports this module. Helpers take a caller-owned session,
flush when they write and never commit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cellspot.ml.files import WEIGHTS_FILE
from cellspot.store.models import MODEL_KINDS, ModelRun, Project, utcnow

if TYPE_CHECKING:
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PRESET = "cpu-fast"
#: metrics shown as columns of :func:`runs_frame`, per kind, in this order
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "classifier": ("balanced_accuracy", "accuracy", "f1", "roc_auc", "ece"),
    "detector": ("f1", "precision", "recall"),
}
#: a column name of :func:`runs_frame` for a metric whose name two kinds share but that
#: measures different things (the classifier's F1 of the dead class, the detector's F1 of
#: found cells); other metrics keep their name
SHARED_METRIC_COLUMNS: dict[tuple[str, str], str] = {("classifier", "f1"): "dead_f1", ("detector", "f1"): "detection_f1"}
#: how the dashboard names those metrics for people (run captions, table headings, the
#: comparison's rows); the key in ``metrics.json`` and the column of :func:`runs_frame` stay
METRIC_LABELS: dict[tuple[str, str], str] = {("classifier", "f1"): "dead F1", ("detector", "f1"): "detection F1"}


def metric_labels(kind: str) -> dict[str, str]:
    """``{metric: label}`` of :data:`METRIC_LABELS` for ``kind`` (a metric not listed keeps its name)."""
    return {metric: label for (of_kind, metric), label in METRIC_LABELS.items() if of_kind == kind}


def metric_columns(kinds: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(column, kind, metric)`` of the :data:`KEY_METRICS` of ``kinds``, as :func:`runs_frame`
    shows them, in order."""
    out: dict[str, tuple[str, str, str]] = {}
    for kind in kinds:
        for metric in KEY_METRICS[kind]:
            column = SHARED_METRIC_COLUMNS.get((kind, metric), metric)
            out.setdefault(column, (column, kind, metric))
    return list(out.values())


RUNS_FRAME_COLUMNS = [
    "version", "kind", "status", "preset", "created", "seconds", "progress", "active",
    "data_snapshot_id", "error", "scored_on",
]
#: how many versions :func:`create_run` tries when concurrent creations take the one it chose
VERSION_TRIES = 8
_VERSION_RE = re.compile(r"^(?P<kind>[a-z]+)-(?P<number>\d+)$")
_ModelRef = int | str | ModelRun


class RegistryError(ValueError):
    """A registry operation is not allowed (unknown kind, run not done, nothing to roll back to)."""


class RunNotFoundError(LookupError):
    """No model run with the given id or version."""


def check_kind(kind: str) -> str:
    """``kind`` if it is a model kind, else :class:`RegistryError` listing the valid ones."""
    if kind not in MODEL_KINDS:
        raise RegistryError(f"unknown model kind {kind!r}; valid kinds: {', '.join(MODEL_KINDS)}")
    return kind


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: mappings/lists recursively, numpy/torch scalars via
    ``.item()``, paths as strings, NaN/inf as ``None`` (portable JSON columns)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def next_version(session: Session, kind: str, *, models_dir: Path | None = None, above: int = 0) -> str:
    """The next free version of ``kind``: one above the highest stored (``classifier-0001`` first)
    and above ``above``, skipping every version whose folder ``models_dir/<kind>/<version>``
    exists: a deleted run (a rebuilt demo project's, say) leaves its folder, and a new run must
    neither reuse its version nor train into (or resume from) its files."""
    check_kind(kind)
    versions = session.scalars(select(ModelRun.version).where(ModelRun.kind == kind)).all()
    numbers = [int(m["number"]) for v in versions if (m := _VERSION_RE.match(v))]
    number = max(numbers + [above], default=0) + 1
    while models_dir is not None and (stale := Path(models_dir) / kind / f"{kind}-{number:04d}").exists():
        log.warning("version %s-%04d skipped: its folder %s exists (left by a deleted run)", kind, number, stale)
        number += 1
    return f"{kind}-{number:04d}"


def relative_path(settings: Settings, folder: Path) -> str:
    """``folder`` relative to ``CELLSPOT_HOME`` when inside it, else absolute (as stored in ``path``)."""
    home = settings.home.resolve()
    folder = Path(folder).resolve()
    try:
        return folder.relative_to(home).as_posix()
    except ValueError:
        return str(folder)


def create_run(
    session: Session,
    kind: str,
    *,
    project: Project | None = None,
    preset: str = DEFAULT_PRESET,
    config: Mapping[str, Any] | None = None,
    data_source: Mapping[str, Any] | None = None,
    snapshot_id: int | None = None,
    path: str | None = None,
    models_dir: Path | None = None,
) -> ModelRun:
    """Add a queued run with the next version of ``kind`` and flush it.

    ``config``: config overrides for the trainer's ``config_for(preset, **config)`` (the
    resolved config replaces them when training starts). ``data_source``: where the training
    data comes from (``{"kind": "consensus", ...}``, see :mod:`cellspot.workflows.models`).
    ``path``: the checkpoint folder as stored (default ``models/<kind>/<version>``).
    ``models_dir``: the settings' models folder; versions whose folder exists there are skipped
    (:func:`next_version`). Versions are global: on PostgreSQL a creation that loses the race
    for one to a concurrent transaction takes the next one (up to :data:`VERSION_TRIES` times,
    each insert in a savepoint); SQLite takes its one writer lock first, so creations queue.
    """
    check_kind(kind)
    if not preset or not preset.strip():
        raise RegistryError("preset must be a non-empty name such as 'cpu-fast' or 'quality'")
    savepoint = session.get_bind().dialect.name != "sqlite"  # pysqlite's savepoints would commit early
    if not savepoint:
        _sqlite_writer_lock(session)
    above = 0
    for attempt in range(1, VERSION_TRIES + 1):
        version = next_version(session, kind, models_dir=models_dir, above=above)
        try:
            return _insert_run(session, kind, version, project=project, preset=preset, config=config,
                               data_source=data_source, snapshot_id=snapshot_id, path=path, savepoint=savepoint)
        except IntegrityError as exc:
            if "version" not in str(exc.orig) or attempt == VERSION_TRIES:
                raise
            log.info("version %s was taken by a concurrent run; trying the next one", version)
            above = int(version.rsplit("-", 1)[1])
    raise AssertionError("unreachable")


def _insert_run(session: Session, kind: str, version: str, *, project: Project | None, preset: str,
                config: Mapping[str, Any] | None, data_source: Mapping[str, Any] | None,
                snapshot_id: int | None, path: str | None, savepoint: bool) -> ModelRun:
    """Insert the queued run ``version``, in a savepoint when ``savepoint`` (undone alone when the
    version is taken)."""
    run = ModelRun(
        project_id=project.id if project is not None else None,
        kind=kind,
        version=version,
        status="queued",
        preset=preset,
        config=jsonable(dict(config or {})),
        data_source=jsonable(dict(data_source or {})),
        snapshot_id=snapshot_id,
        metrics={},
        progress={},
        curves=[],
        path=path or f"models/{kind}/{version}",
        is_active=False,
        cancel_requested=False,
        created_at=utcnow(),
    )
    with session.begin_nested() if savepoint else contextlib.nullcontext():
        session.add(run)
        session.flush()
    log.info("model run %s created (preset %s, project id %s)", version, preset, run.project_id)
    return run


def get_run(session: Session, ref: _ModelRef) -> ModelRun:
    """The run with id ``ref`` (int or digits) or version ``ref`` (``"classifier-0003"``)."""
    if isinstance(ref, ModelRun):
        return ref
    run: ModelRun | None
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        run = session.get(ModelRun, int(ref))
    else:
        run = session.scalar(select(ModelRun).where(ModelRun.version == ref))
    if run is None:
        known = session.scalars(select(ModelRun.version).order_by(ModelRun.id.desc()).limit(5)).all()
        hint = ", ".join(known) if known else "none yet"
        raise RunNotFoundError(f"no model run {ref!r}; latest versions: {hint}")
    return run


def _same_group(project_id: int | None, kind: str):  # noqa: ANN202 - SQL expression list
    project_clause = (
        ModelRun.project_id.is_(None) if project_id is None else ModelRun.project_id == project_id
    )
    return [project_clause, ModelRun.kind == kind]


def _project_id(project: Project | None) -> int | None:
    return project.id if project is not None else None


def active_run(session: Session, project: Project | None, kind: str) -> ModelRun | None:
    """The active run of ``kind`` in ``project`` (``None`` = runs without a project), or ``None``."""
    check_kind(kind)
    stmt = (
        select(ModelRun)
        .where(*_same_group(_project_id(project), kind), ModelRun.is_active.is_(True))
        .order_by(ModelRun.promoted_at.desc(), ModelRun.id.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def model_dir(settings: Settings, run: ModelRun) -> Path:
    """The checkpoint folder of ``run`` (``path`` relative to ``CELLSPOT_HOME`` or absolute)."""
    path = Path(run.path or f"models/{run.kind}/{run.version}")
    return path if path.is_absolute() else settings.home / path


def lock_promotions(session: Session, run: ModelRun) -> None:
    """Hold, until the transaction ends, the lock that serializes promotions in ``run``'s project
    and kind: PostgreSQL locks the project's row ``FOR UPDATE`` (as round openings do; runs
    without a project take a transaction advisory lock per kind); SQLite takes its one writer
    lock with a no-op write. Two runs finishing at once then cannot both see "no active run"."""
    from cellspot.store.queries import lock_project

    if session.get_bind().dialect.name == "postgresql":
        if run.project_id is not None:
            lock_project(session, run.project_id)
        else:
            session.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"cellspot.promote.{run.kind}"))))
        return
    _sqlite_writer_lock(session)


def _sqlite_writer_lock(session: Session) -> None:
    """Take SQLite's one writer lock until the transaction ends (a write that matches no row):
    later reads of the transaction see every committed write, and other writers wait."""
    session.execute(update(ModelRun).where(ModelRun.id.is_(None)).values(kind=ModelRun.kind)
                    .execution_options(synchronize_session=False))


def promote_if_first(session: Session, run: ModelRun) -> bool:
    """Promote the ``done`` run ``run`` when its project and kind have no active run yet (the
    first finished run becomes active), under :func:`lock_promotions`; flush. Whether it did."""
    lock_promotions(session, run)
    active = session.scalar(select(ModelRun.id).where(*_same_group(run.project_id, run.kind),
                                                      ModelRun.is_active.is_(True)).limit(1))
    if active is not None:
        return False
    _activate(session, run)  # the lock is held already
    return True


def promote(session: Session, run: ModelRun, settings: Settings | None = None) -> ModelRun:
    """Make ``run`` (status ``done``) the active model of its project and kind; flush. With
    ``settings`` (the CLI and the dashboard), its ``weights.pt`` must be readable under them:
    a run trained by a worker with another ``CELLSPOT_HOME`` is refused here, not at prediction."""
    if run.status != "done":
        raise RegistryError(f"cannot promote {run.version}: its status is {run.status!r}, only 'done' runs can be")
    weights = model_dir(settings, run) / WEIGHTS_FILE if settings is not None else None
    if weights is not None and not weights.is_file():
        raise RegistryError(f"cannot promote {run.version}: {weights} is missing "
                            "(trained by a worker with another CELLSPOT_HOME, or its folder deleted?); "
                            "prediction could not load it")
    lock_promotions(session, run)
    return _activate(session, run)


def _activate(session: Session, run: ModelRun) -> ModelRun:
    """Make ``run`` the one active run of its group, under :func:`lock_promotions` (held by the caller)."""
    others = session.scalars(
        select(ModelRun).where(
            *_same_group(run.project_id, run.kind), ModelRun.is_active.is_(True), ModelRun.id != run.id
        )
    ).all()
    for other in others:
        other.is_active = False
    run.is_active = True
    run.promoted_at = utcnow()
    session.flush()
    log.info("model run %s promoted (was active: %s)", run.version, [o.version for o in others] or "none")
    return run


def previous_active(session: Session, project: Project | None, kind: str) -> ModelRun | None:
    """The run :func:`rollback` would make active again: the latest promoted ``done`` run of
    ``kind`` other than the active one (None when there is none)."""
    check_kind(kind)
    return _previous_promoted(session, project, kind, active_run(session, project, kind))


def _previous_promoted(session: Session, project: Project | None, kind: str,
                       current: ModelRun | None) -> ModelRun | None:
    """The latest promoted ``done`` run of ``kind`` other than ``current`` (the active run)."""
    stmt = (
        select(ModelRun)
        .where(*_same_group(_project_id(project), kind), ModelRun.status == "done",
               ModelRun.promoted_at.is_not(None))
        .order_by(ModelRun.promoted_at.desc(), ModelRun.id.desc())
    )
    if current is not None:
        stmt = stmt.where(ModelRun.id != current.id)
    return session.scalars(stmt.limit(1)).first()


def rollback(session: Session, project: Project | None, kind: str) -> ModelRun:
    """Undo the latest promotion of ``kind`` in ``project``: the active run loses its promotion
    and the previously promoted ``done`` run becomes active again; flush. Returns that run.

    :class:`RegistryError` when no earlier promoted run exists.
    """
    check_kind(kind)
    current = active_run(session, project, kind)
    previous = _previous_promoted(session, project, kind, current)
    where = f"project {project.name!r}" if project is not None else "runs without a project"
    if previous is None:
        active = current.version if current is not None else "none"
        raise RegistryError(f"no earlier promoted {kind} to roll back to in {where} (active: {active})")
    if current is not None:
        current.is_active = False
        current.promoted_at = None
    previous.is_active = True
    session.flush()
    log.info("%s rolled back in %s: %s -> %s", kind, where,
             current.version if current is not None else "none", previous.version)
    return previous


def run_seconds(run: ModelRun) -> float:
    """The training time: the fit's own ``seconds`` metric when it has one (it adds up the
    parts of a cancelled and resumed run), else the wall clock from the last start to the end
    plus the earlier parts of a resumed run (``progress["trained_before_s"]``, kept when a worker
    claims it again)."""
    recorded = _number((run.metrics or {}).get("seconds"))
    if recorded > 0:
        return recorded
    if run.started_at is None or run.finished_at is None:
        return math.nan
    before = _number((run.progress or {}).get("trained_before_s"))
    return (_aware(run.finished_at) - _aware(run.started_at)).total_seconds() + (before if before > 0 else 0.0)


def _aware(ts):  # noqa: ANN001, ANN202 - SQLite returns naive UTC datetimes
    from datetime import timezone

    return ts if ts.tzinfo is not None else ts.replace(tzinfo=timezone.utc)


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric for people: counts and flags (whole numbers) without decimals, other numbers
    with ``digits`` decimals, NaN / missing as ``"-"``."""
    number = _number(value)
    if math.isnan(number):
        return "-"
    if number.is_integer() and abs(number) < 1e12:
        return str(int(number))
    return f"{number:.{digits}f}"


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def list_runs(session: Session, project: Project | None, kind: str | None = None) -> list[ModelRun]:
    """Runs of ``project`` (``None`` = without a project), newest first, optionally of one kind."""
    stmt = select(ModelRun).where(
        ModelRun.project_id.is_(None) if project is None else ModelRun.project_id == project.id
    )
    if kind is not None:
        stmt = stmt.where(ModelRun.kind == check_kind(kind))
    return list(session.scalars(stmt.order_by(ModelRun.id.desc())).all())


def runs_frame(session: Session, project: Project | None, kind: str | None = None) -> pd.DataFrame:
    """One row per run of ``project``, newest first.

    Columns: :data:`RUNS_FRAME_COLUMNS` (``seconds`` = training time, NaN until finished;
    ``progress`` = completed fraction in [0, 1]; ``scored_on`` = the split its metrics were
    measured on: test, val, or train when the data had neither) followed by the :data:`KEY_METRICS` of the
    kinds shown (:func:`metric_columns`: a name two kinds share is told apart, ``dead_f1`` and
    ``detection_f1``; NaN where a run has no such metric).
    """
    runs = list_runs(session, project, kind)
    kinds = [kind] if kind is not None else list(MODEL_KINDS)
    columns = metric_columns(kinds)
    metric_cols = [column for column, _, _ in columns]
    rows = []
    for run in runs:
        metrics = run.metrics or {}
        fraction = 1.0 if run.status == "done" else _number((run.progress or {}).get("fraction", 0.0))
        row = {
            "version": run.version, "kind": run.kind, "status": run.status, "preset": run.preset,
            "created": run.created_at, "seconds": run_seconds(run), "progress": fraction,
            "active": bool(run.is_active), "data_snapshot_id": run.data_snapshot_id, "error": run.error,
            "scored_on": metrics.get("split"),
        }
        row.update({column: _number(metrics.get(metric)) if run.kind == of_kind else math.nan
                    for column, of_kind, metric in columns})
        rows.append(row)
    return pd.DataFrame(rows, columns=RUNS_FRAME_COLUMNS + metric_cols)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict as ``{"a.b": value}``; lists are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def compare_runs(session: Session, a: _ModelRef, b: _ModelRef) -> pd.DataFrame:
    """Numeric metrics of runs ``a`` and ``b`` side by side.

    Index: metric names (nested ones as ``"a.b"``) plus ``seconds`` and ``epochs``; columns:
    the two versions and ``difference`` (b - a). NaN where a run lacks a metric.
    ``attrs["scored_on"]``: each version's split (:func:`scored_on_note` says it in words);
    ``attrs["kind"]``: the runs' kind (:func:`metric_labels` names its metrics for people).
    """
    run_a, run_b = get_run(session, a), get_run(session, b)
    if run_a.id == run_b.id:
        raise RegistryError(f"compare two different runs, got {run_a.version} twice")
    if run_a.kind != run_b.kind:
        raise RegistryError(f"compare runs of one kind: {run_a.version} is a {run_a.kind}, {run_b.version} a "
                            f"{run_b.kind}, and their metrics differ")
    values = []
    for run in (run_a, run_b):
        flat = flatten_metrics(run.metrics or {})
        flat["seconds"] = run_seconds(run)
        flat["epochs"] = float(len(run.curves or []))
        values.append(flat)
    names = list(dict.fromkeys([*values[0], *values[1]]))
    frame = pd.DataFrame(
        {run_a.version: [values[0].get(n, math.nan) for n in names],
         run_b.version: [values[1].get(n, math.nan) for n in names]},
        index=pd.Index(names, name="metric"),
    )
    frame["difference"] = frame[run_b.version] - frame[run_a.version]
    frame.attrs["scored_on"] = {run.version: (run.metrics or {}).get("split") for run in (run_a, run_b)}
    frame.attrs["kind"] = run_a.kind
    return frame


def scored_on_note(frame: pd.DataFrame) -> str | None:
    """A warning for a :func:`compare_runs` table whose runs were not both measured on held-out
    images (a run without val or test images is scored on its own training data), else None."""
    splits = {v: s for v, s in (frame.attrs.get("scored_on") or {}).items() if s}  # a failed run has none
    if len(splits) < 2 or (len(set(splits.values())) == 1 and "train" not in splits.values()):
        return None
    if set(splits.values()) == {"train"}:
        return ("neither score is held out: both runs were scored on their own training data (they had no "
                "validation or test images), so the figures say how well each fits, not how well it generalises")
    said = ", ".join(f"{v} on {'its own training data' if s == 'train' else f'its {s} split'}"
                     for v, s in splits.items())
    return f"not like for like: {said}"


def run_curves(run: ModelRun) -> pd.DataFrame:
    """The per-epoch curves of ``run`` (one row per epoch, sorted; column ``epoch`` first)."""
    rows = [dict(r) for r in (run.curves or [])]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({"epoch": pd.Series([], dtype="int64")})
    if "epoch" in frame.columns:
        frame = frame.sort_values("epoch", kind="stable").reset_index(drop=True)
        frame = frame[["epoch", *[c for c in frame.columns if c != "epoch"]]]
    return frame

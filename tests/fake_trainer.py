"""A tiny fake trainer and store seeding shared by the training-job tests (no real model).

``install(monkeypatch)`` swaps the fake into :data:`cellspot.workflows.models.TRAINERS` and
:data:`~cellspot.workflows.models.DATA_SOURCES` and removes the progress / cancel throttles.
The fake follows the ``fit`` contract: Progress after every step and epoch, ``should_stop``
checked before every step (saving ``resume.pt`` first, then :class:`TrainingCancelled`),
``resume=True`` goes on after the last saved epoch, a checkpoint folder at the end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellspot.ml.common import (
    CONFIG_FILE,
    METRICS_FILE,
    RESUME_FILE,
    WEIGHTS_FILE,
    EtaClock,
    FitResult,
    Progress,
    TrainingCancelled,
    write_json,
)
from cellspot.ml.data import CELL_COLUMNS, AnnotatedImage, TrainingData


@dataclass(frozen=True)
class FakeConfig:
    preset: str = "cpu-fast"
    epochs: int = 3
    steps: int = 3
    lr: float = 0.1
    threads: int | None = None


def fake_config_for(preset: str = "cpu-fast", **overrides: Any) -> FakeConfig:
    if preset not in ("cpu-fast", "quality"):
        raise ValueError(f"unknown preset {preset!r}")
    return dataclasses.replace(FakeConfig(preset=preset, epochs=3 if preset == "cpu-fast" else 5), **overrides)


class FakeFit:
    """Callable ``fit``; ``hook(epoch, step)`` runs before each step (e.g. to request a cancel)."""

    def __init__(self, hook: Callable[[int, int], None] | None = None, fail_at: int | None = None) -> None:
        self.hook, self.fail_at = hook, fail_at
        self.calls: list[dict[str, Any]] = []

    def __call__(self, data: TrainingData, config: FakeConfig, out_dir: Path, *, progress=None,
                 should_stop=None, resume: bool = False, device=None) -> FitResult:
        out_dir = Path(out_dir)
        start, curves = 1, []
        if resume:
            state = json.loads((out_dir / RESUME_FILE).read_text())
            start, curves = state["epoch"] + 1, state["curves"]
        self.calls.append({"resume": resume, "start_epoch": start, "images": len(data.images), "device": device,
                           "config": config})
        clock = EtaClock()
        for epoch in range(start, config.epochs + 1):
            for step in range(1, config.steps + 1):
                if self.hook is not None:
                    self.hook(epoch, step)
                if self.fail_at == epoch:
                    raise ValueError(f"fake failure in epoch {epoch}")
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(f"stopped in epoch {epoch}")
                if progress is not None:
                    progress(Progress(epoch, config.epochs, step, config.steps, train_loss=1.0 / (epoch + step)))
            row = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 1.5 / epoch, "accuracy": 0.5 + 0.1 * epoch}
            curves.append(row)
            write_json(out_dir / RESUME_FILE, {"epoch": epoch, "curves": curves})
            if progress is not None:
                progress(Progress(epoch, config.epochs, config.steps, config.steps, phase="epoch_end",
                                  train_loss=row["train_loss"], val_loss=row["val_loss"],
                                  metrics={"accuracy": row["accuracy"]}))
        metrics = {"accuracy": 0.5 + 0.1 * config.epochs, "balanced_accuracy": 0.4 + 0.1 * config.epochs,
                   "f1": 0.7, "confusion_matrix": [[3, 1], [0, 4]], "per_class": {"dead": {"recall": 0.75}},
                   "nan_metric": float("nan")}
        write_json(out_dir / CONFIG_FILE, dataclasses.asdict(config))
        write_json(out_dir / METRICS_FILE, metrics)
        (out_dir / WEIGHTS_FILE).write_bytes(b"fake")
        (out_dir / RESUME_FILE).unlink()
        return FitResult(out_dir, metrics, curves, config.epochs - start + 1, config.epochs, clock.elapsed())


def fake_data(session, settings, run) -> TrainingData:  # noqa: ANN001 - loader signature
    cells = pd.DataFrame([[4.0, 4.0, "alive", 0.9, 1.0, 3.0]], columns=CELL_COLUMNS)
    image = AnnotatedImage("a.png", np.zeros((8, 8, 3), np.uint8), cells, "train")
    return TrainingData([image], source=dict(run.data_source))


def install(monkeypatch, fit: FakeFit | None = None) -> FakeFit:  # noqa: ANN001 - pytest fixture
    """Use the fake for both kinds and every data source; no throttling. Returns the fit."""
    from cellspot.workflows import models as wf

    fit = fit or FakeFit()
    for kind in ("classifier", "detector"):
        monkeypatch.setitem(wf.TRAINERS, kind, wf.Trainer(fake_config_for, fit))
    for source in ("consensus", "expert", "folder"):
        monkeypatch.setitem(wf.DATA_SOURCES, source, fake_data)
    monkeypatch.setattr(wf, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(wf, "CANCEL_POLL_S", 0.0)
    return fit


def seed_project(settings, name: str = "demo") -> int:  # noqa: ANN001 - Settings
    """A migrated store with project ``name`` and one consensus snapshot; returns the snapshot id."""
    from cellspot.store.db import transaction
    from cellspot.store.migrate import prepare_store
    from cellspot.store.models import ConsensusSnapshot
    from cellspot.store.queries import get_or_create_project

    engine = prepare_store(settings)
    try:
        with transaction(engine) as session:
            project = get_or_create_project(session, name)
            snapshot = ConsensusSnapshot(project_id=project.id, method="fake")
            session.add(snapshot)
            session.flush()
            return snapshot.id
    finally:
        engine.dispose()


def new_run(engine, settings, kind: str = "classifier", **kwargs) -> int:  # noqa: ANN001 - Engine, Settings
    """The id of a run of project ``demo`` stored by :func:`cellspot.workflows.models.start_training`."""
    from cellspot.store.db import transaction
    from cellspot.store.queries import get_project
    from cellspot.workflows.models import start_training

    with transaction(engine) as session:
        return start_training(session, settings, get_project(session, "demo"), kind, **kwargs).id


def request_cancel(settings, run_id: int) -> None:  # noqa: ANN001 - Settings
    """What the dashboard does: set ``cancel_requested`` in its own committed session."""
    from cellspot.store.db import make_engine, transaction
    from cellspot.workflows.models import cancel_run

    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            cancel_run(session, run_id)
    finally:
        engine.dispose()


def load_run(settings, ref):  # noqa: ANN001, ANN201
    """The run ``ref`` read fresh from the store (detached)."""
    from cellspot.ml.registry import get_run
    from cellspot.store.db import make_engine, session_factory

    engine = make_engine(settings=settings)
    try:
        with session_factory(engine)() as session:
            run = get_run(session, ref)
            session.expunge(run)
            return run
    finally:
        engine.dispose()

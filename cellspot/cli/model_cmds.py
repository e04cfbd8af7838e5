"""``cellspot train``, ``cellspot worker`` and ``cellspot models ...``: training runs and the registry.

Every training, foreground or background, is a model run in the store trained by
:func:`cellspot.workflows.models.run_training`. Runs on a plain folder (``--images`` /
``--annotations``) are stored in the default store with no project, so they show up in
``cellspot models list --folder`` and can be resumed like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from cellspot.cli import OUT_DIR, PROJECT, main

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session

    from cellspot.ml.common import Progress
    from cellspot.settings import Settings
    from cellspot.store.models import ModelRun, Project

KINDS = ("classifier", "detector")
PRESETS = ("cpu-fast", "quality")


class _Bars:
    """Two tqdm bars (epochs; steps of the current epoch) fed by Progress events."""

    def __init__(self) -> None:
        self.epochs: Any = None
        self.steps: Any = None
        self.epoch = 0

    def __call__(self, event: Progress) -> None:
        from tqdm import tqdm

        if self.epochs is None:
            self.epochs = tqdm(total=event.epochs, desc="epochs", unit="epoch", position=0)
            self.steps = tqdm(total=event.steps or None, desc="steps", unit="batch", position=1, leave=False)
        if event.epoch != self.epoch:
            self.epoch = event.epoch
            self.epochs.n = event.epoch - 1
            self.steps.reset(total=event.steps or None)
        post: dict[str, Any] = {}
        if event.train_loss is not None:
            post["loss"] = f"{event.train_loss:.4f}"
        if event.val_loss is not None:
            post["val_loss"] = f"{event.val_loss:.4f}"
        if event.eta_s is not None:
            post["eta"] = f"{event.eta_s:.0f}s"
        if event.phase == "epoch_end":
            self.epochs.n = event.epoch
            post.update({k: f"{v:.3f}" for k, v in list(event.metrics.items())[:3]})
            self.epochs.set_postfix(post, refresh=False)
            self.epochs.refresh()
            return
        self.steps.n = min(event.step, event.steps) if event.steps else event.step
        self.steps.set_description(event.phase)
        self.steps.set_postfix(post, refresh=False)
        self.steps.refresh()

    def close(self) -> None:
        for bar in (self.steps, self.epochs):
            if bar is not None:
                bar.close()


def _check_sources(project_name: str | None, images: Path | None, annotations: Path | None,
                   masks: Path | None, source: str | None) -> None:
    if project_name and (images or annotations):
        raise click.UsageError("use either --project or --images/--annotations, not both")
    if bool(images) != bool(annotations):
        raise click.UsageError("--images and --annotations go together (a folder and its annotation CSV)")
    if masks and not images:
        raise click.UsageError("--masks needs --images and --annotations")
    if source and images:
        raise click.UsageError("--source (consensus|expert) applies to --project data, not to a folder")


def _resumable(session: Session, settings: Settings, kind: str, project: Project | None,
               out: Path | None) -> ModelRun | None:
    """The run to resume: the one stored at ``out``, else the newest cancelled/failed one."""
    from sqlalchemy import select

    from cellspot.ml import registry
    from cellspot.store.models import ModelRun

    if out is not None:
        stored = registry.relative_path(settings, out)
        return session.scalar(select(ModelRun).where(ModelRun.path == stored, ModelRun.kind == kind)
                              .order_by(ModelRun.id.desc()).limit(1))
    from cellspot.ml.common import RESUME_FILE

    for run in registry.list_runs(session, project, kind):
        if run.status in ("cancelled", "failed") and (registry.model_dir(settings, run) / RESUME_FILE).is_file():
            return run
    return None


def _prepare_run(session: Session, settings: Settings, kind: str, *, project_name: str | None,
                 images: Path | None, annotations: Path | None, masks: Path | None, source: str,
                 out: Path | None, preset: str, epochs: int | None, resume: bool,
                 overrides: dict[str, Any] | None = None) -> tuple[ModelRun, bool]:
    """The run to train (new, or the one to resume) and whether it must resume."""
    from cellspot.ml.common import RESUME_FILE
    from cellspot.store.queries import get_project
    from cellspot.workflows import models as wf

    project = None if images else get_project(session, project_name or settings.default_project)
    if resume:
        run = _resumable(session, settings, kind, project, out)
        if run is not None:
            wf.resume_run(session, settings, run)
            return run, True
        if out is None or not (out / RESUME_FILE).is_file():
            where = out if out is not None else f"{kind} runs of {'the folder' if images else repr(project.name)}"
            raise click.ClickException(f"--resume: nothing to resume in {where} (no cancelled/failed run "
                                       f"with a {RESUME_FILE})")
    if out is not None and not (resume and (out / RESUME_FILE).is_file()):
        wf.check_new_out_dir(out)
    if images:
        run = wf.start_folder_training(session, settings, kind, images, annotations, masks, preset=preset,
                                       epochs=epochs, overrides=overrides, out_dir=out)
    else:
        run = wf.start_training(session, settings, project, kind, preset=preset, epochs=epochs, source=source,
                                overrides=overrides, out_dir=out)
    return run, resume


def _overrides(kind: str, preset: str, texts: tuple[str, ...]) -> dict[str, Any]:
    """``--set FIELD=VALUE`` options -> config overrides, checked against ``kind``'s config now."""
    from cellspot.ml.common import TrainingError, parse_overrides
    from cellspot.workflows import models as wf

    try:
        return wf.check_config(kind, preset, parse_overrides(texts))
    except (TrainingError, wf.WorkflowError) as exc:
        raise click.BadParameter(str(exc), param_hint="--set") from None


@main.command("train")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Train on this project's cells, its consensus or (--source expert) its expert cells "
                   "(default: the settings' default project).")
@click.option("--source", type=click.Choice(["consensus", "expert"]), default=None,
              help="Project cells to train on (default: consensus of the latest snapshot).")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of images (instead of a project).")
@click.option("--annotations", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CSV image,x,y,label[,...] for --images.")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Optional folder of instance masks for --images.")
@click.option("--out", type=OUT_DIR, default=None,
              help="Checkpoint folder (default: CELLSPOT_HOME/models/<kind>/<version>).")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu-fast", show_default=True,
              help="cpu-fast: small models that train in minutes on 2 CPU cores; quality: bigger models and more "
                   "epochs, for a GPU.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the preset's epochs.")
@click.option("--set", "settings_", metavar="FIELD=VALUE", multiple=True,
              help="Override one config field of the preset (repeatable), e.g. --set polarity=auto "
                   "--set tta=true for a detector on mixed stained / fluorescence images.")
@click.option("--resume", is_flag=True,
              help="Go on from resume.pt: the run at --out, else the newest cancelled/failed run of KIND.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: CUDA when present, else CPU.")
@click.option("--background", is_flag=True, help="Queue the run for `cellspot worker` and print its version.")
def train_command(kind: str, project_name: str | None, source: str | None, images: Path | None,
                  annotations: Path | None, masks: Path | None, out: Path | None, preset: str,
                  epochs: int | None, settings_: tuple[str, ...], resume: bool, device: str | None,
                  background: bool) -> None:
    """Train a KIND (classifier or detector) model on a project or an annotated folder."""
    from cellspot.jobs import JobQueueError
    from cellspot.ml.common import TrainingError, pick_device
    from cellspot.ml.data import DataError
    from cellspot.ml.registry import RegistryError, format_metric, model_dir
    from cellspot.settings import get_settings
    from cellspot.store.db import session_factory
    from cellspot.store.migrate import prepare_store
    from cellspot.store.queries import ProjectNotFoundError
    from cellspot.workflows import models as wf

    _check_sources(project_name, images, annotations, masks, source)
    typed_preset = click.get_current_context().get_parameter_source("preset") is not ParameterSource.DEFAULT
    changed = "--set" if settings_ else "--epochs" if epochs is not None else "--preset" if typed_preset else None
    if resume and changed:
        # its resume.pt holds the optimiser and learning-rate schedule of the config it started with
        raise click.UsageError(f"{changed} changes the config; a resumed run keeps the config it started "
                               "with (start a new run to train with other settings)")
    overrides = _overrides(kind, preset, settings_)
    if device is not None and not background:
        try:
            pick_device(device)
        except TrainingError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from None
    settings = get_settings()
    engine = prepare_store(settings)
    try:
        with session_factory(engine)() as session, session.begin():
            run, must_resume = _prepare_run(
                session, settings, kind, project_name=project_name, images=images, annotations=annotations,
                masks=masks, source=source or "consensus", out=out, preset=preset, epochs=epochs, resume=resume,
                overrides=overrides)
            run_id, version, folder = run.id, run.version, model_dir(settings, run)
    except (ProjectNotFoundError, wf.WorkflowError, RegistryError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()

    if background:
        try:
            wf.enqueue(settings, run_id, resume=True if must_resume else None, device=device)
        except JobQueueError as exc:
            raise click.ClickException(f"{exc}; {version} is marked failed: train without --background, or "
                                       "run this command again once the queue answers") from None
        click.echo(version)
        click.echo(f"queued {version} ({'resume' if must_resume else 'new'}); `cellspot worker` runs it", err=True)
        return
    click.echo(f"training {version} -> {folder}", err=True)
    bars = _Bars()
    try:
        final = wf.run_training(settings, run_id, progress=bars, resume=True if must_resume else None, device=device)
    finally:
        bars.close()
    if final.status == "cancelled":
        raise click.ClickException(f"{version} cancelled; go on with `cellspot train {kind} --resume"
                                   f"{' --out ' + str(out) if out else ''}`")
    if final.status != "done":
        raise click.ClickException(f"{version} {final.status}: {final.error}")
    metrics = ", ".join(f"{k} {format_metric(v)}" for k, v in final.metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
    split = final.metrics.get("split")
    scored = {"train": " (on its own training data: no val or test images)", None: ""}.get(split, f" (on {split})")
    click.echo(f"{version} done{' (active)' if final.is_active else ''}: {metrics}{scored}")
    click.echo(str(folder))


@main.command("worker")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs run at once (threads); torch threads are shared out between them.")
def worker_command(workers: int) -> None:
    """Run the background job worker (training, prediction, automatic rounds) until Ctrl-C."""
    import logging
    import os

    from cellspot.jobs import JobQueueError, run_worker
    from cellspot.settings import get_settings
    from cellspot.store.migrate import prepare_store

    for name in ("cellspot", "huey"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    settings = get_settings()
    if settings.torch_threads is None and workers > 1:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        settings = settings.model_copy(update={"torch_threads": max(1, cpus // workers)})
    prepare_store(settings).dispose()
    from cellspot.workflows.models import reap_lost_runs_in_store

    for version in reap_lost_runs_in_store(settings):
        click.echo(f"{version}: its worker stopped reporting long ago; marked failed (`cellspot models resume "
                   f"{version}` goes on from its last resume.pt, if any)", err=True)
    try:
        run_worker(settings, workers=workers)
    except JobQueueError as exc:
        raise click.ClickException(str(exc)) from None


@main.group("models")
def models_group() -> None:
    """The model registry: list, show, promote, roll back, cancel, resume, compare runs."""


def _session_scope() -> tuple[Settings, Engine]:
    """The settings and an engine on the migrated store (the caller disposes of it)."""
    from cellspot.settings import get_settings
    from cellspot.store.migrate import prepare_store

    settings = get_settings()
    return settings, prepare_store(settings)


def _registry_errors() -> tuple[type[Exception], ...]:
    from cellspot.ml.registry import RegistryError, RunNotFoundError
    from cellspot.store.queries import ProjectNotFoundError
    from cellspot.jobs import JobQueueError
    from cellspot.workflows.models import WorkflowError

    return RegistryError, RunNotFoundError, ProjectNotFoundError, WorkflowError, JobQueueError


@models_group.command("list")
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project (default: the settings' default project).")
@click.option("--folder", is_flag=True, help="List the runs trained on folders (no project) instead.")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only the runs of this kind.")
def models_list(project_name: str | None, folder: bool, kind: str | None) -> None:
    """List model runs, newest first."""
    import pandas as pd

    from cellspot.ml.registry import runs_frame
    from cellspot.store.db import session_factory
    from cellspot.store.queries import get_project

    settings, engine = _session_scope()
    try:
        with session_factory(engine)() as session:
            project = None if folder else get_project(session, project_name or settings.default_project)
            frame = runs_frame(session, project, kind)
            folder_runs = 0 if folder or not frame.empty else len(runs_frame(session, None, kind))
    except _registry_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    if frame.empty:
        where = "trained on folders" if folder else f"of project {project.name!r}"
        click.echo(f"no model runs {where} yet"
                   + (f"; {folder_runs} run(s) trained on folders: `cellspot models list --folder`"
                      if folder_runs else ""))
        return
    frame = frame.assign(
        created=pd.to_datetime(frame["created"], utc=True).dt.strftime("%Y-%m-%d %H:%M"),
        active=frame["active"].map({True: "*", False: ""}),
        error=frame["error"].map(_short_error),
    )
    frame = frame[[c for c in frame.columns if c != "error"] + ["error"]].dropna(axis="columns", how="all")
    if "error" in frame.columns:
        frame["error"] = frame["error"].fillna("")  # runs without an error: blank, not "None"
    click.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if "error" in frame.columns:
        click.echo("(`cellspot models show VERSION` prints a run's whole error)")


#: how many characters of a run's error ``cellspot models list`` shows
ERROR_WIDTH = 60


def _short_error(error: str | None) -> str | None:
    """The first line of ``error``, cut to :data:`ERROR_WIDTH` characters; None for none."""
    if not error:
        return None
    line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 3] + "..."


@models_group.command("show")
@click.argument("version")
def models_show(version: str) -> None:
    """Everything about run VERSION: status, error, times, data, config, metrics, folder."""
    import json

    from cellspot.ml import registry
    from cellspot.store.db import session_factory
    from cellspot.store.models import Project

    settings, engine = _session_scope()
    try:
        with session_factory(engine)() as session:
            run = registry.get_run(session, version)
            project = session.get(Project, run.project_id) if run.project_id is not None else None
            seconds = registry.run_seconds(run)
            lines = _show_lines(run, project, seconds, registry.model_dir(settings, run))
    except _registry_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    for name, value in lines:
        text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True, default=str)
        click.echo(f"{name}: {text}")


def _show_lines(run: ModelRun, project: Project | None, seconds: float, folder: Path) -> list[tuple[str, Any]]:
    from cellspot.ml.registry import format_metric

    def when(ts: Any) -> str:
        return ts.strftime("%Y-%m-%d %H:%M:%S") if ts is not None else "-"

    return [
        ("version", run.version), ("kind", run.kind),
        ("project", project.name if project is not None else "(trained on a folder)"),
        ("status", run.status + (" (active)" if run.is_active else "")),
        ("error", run.error or "-"),
        ("created", when(run.created_at)), ("started", when(run.started_at)), ("finished", when(run.finished_at)),
        ("seconds", format_metric(seconds, 1)), ("preset", run.preset),
        ("data", run.data_source or {}), ("data snapshot", run.data_snapshot_id or "-"),
        ("config", run.config or {}), ("metrics", run.metrics or {}), ("folder", str(folder)),
    ]


def _change(action: str, ref: str, project_name: str | None = None) -> str:
    from cellspot.ml import registry
    from cellspot.store.db import session_factory
    from cellspot.store.models import Project
    from cellspot.store.queries import get_project
    from cellspot.workflows import models as wf

    settings, engine = _session_scope()
    try:
        with session_factory(engine)() as session, session.begin():
            if action == "promote":
                run = registry.promote(session, registry.get_run(session, ref), settings)
                if run.project_id is None:  # folder-trained runs have their own active model, no project's
                    return (f"{run.version} is now the active {run.kind} of the runs trained on folders; a "
                            f"project's active {run.kind} is unchanged (predict with this model: "
                            f"`cellspot predict ... --{run.kind} {registry.model_dir(settings, run)}`)")
                project = session.get(Project, run.project_id)
                return f"{run.version} is now the active {run.kind} of project {project.name!r}"
            if action == "rollback":
                project = get_project(session, project_name or settings.default_project)
                run = registry.rollback(session, project, ref)
                return f"{run.version} is the active {ref} again"
            run = wf.cancel_run(session, ref)
            if run.status == "failed":  # its worker was gone: marked failed at once
                return f"{run.version}: failed ({run.error})"
            return f"{run.version}: {'cancelled' if run.status == 'cancelled' else 'cancel requested'}"
    except _registry_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


@models_group.command("promote")
@click.argument("version")
def models_promote(version: str) -> None:
    """Make the finished run VERSION the active model of its kind."""
    click.echo(_change("promote", version))


@models_group.command("rollback")
@click.argument("kind", type=click.Choice(KINDS))
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project (default: the settings' default project).")
def models_rollback(kind: str, project_name: str | None) -> None:
    """Re-activate the previously promoted KIND model."""
    click.echo(_change("rollback", kind, project_name))


@models_group.command("cancel")
@click.argument("version")
def models_cancel(version: str) -> None:
    """Cancel run VERSION (queued: at once; running: at its next check, keeping resume.pt)."""
    click.echo(_change("cancel", version))


@models_group.command("resume")
@click.argument("version")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Default: CUDA when present, else CPU.")
def models_resume(version: str, device: str | None) -> None:
    """Queue the cancelled or failed run VERSION again, going on from its resume.pt."""
    from cellspot.workflows.models import queue_resume

    settings, engine = _session_scope()
    engine.dispose()
    try:
        run = queue_resume(settings, version, device=device)
    except _registry_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{run.version} queued to resume")


@models_group.command("compare")
@click.argument("version_a")
@click.argument("version_b")
def models_compare(version_a: str, version_b: str) -> None:
    """Metrics of two runs side by side."""
    from cellspot.ml.registry import compare_runs, format_metric, scored_on_note
    from cellspot.store.db import session_factory

    _, engine = _session_scope()
    try:
        with session_factory(engine)() as session:
            frame = compare_runs(session, version_a, version_b)
    except _registry_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo(frame.map(lambda v: format_metric(v, 4)).to_string())
    note = scored_on_note(frame)
    if note:
        click.echo(f"warning: {note}", err=True)

"""``cellspot predict``: find and classify the cells of image files, write CSVs and overlays.

Heavy imports (torch via the models, sqlalchemy, pandas) stay inside the command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cellspot.cli import OUT_DIR, PROJECT, main

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cellspot.settings import Settings


@dataclass
class _Models:
    """Model folders to load, and the project's active runs when they are the ones used."""

    detector_dir: Path
    classifier_dir: Path
    detector_run_id: int | None = None
    classifier_run_id: int | None = None

    @property
    def are_active(self) -> bool:
        return self.detector_run_id is not None and self.classifier_run_id is not None


def _open_store(settings: Settings, required: bool) -> Engine | None:
    from cellspot.cli.store_cmds import open_store, store_exists

    if not store_exists(settings):
        if required:
            raise click.ClickException(
                f"no cellspot store at {settings.resolved_database_url}; run `cellspot init` and train models, "
                "or pass both --detector MODEL_DIR and --classifier MODEL_DIR")
        return None
    if required:
        return open_store(settings)
    try:
        return open_store(settings)
    except click.ClickException as exc:  # auto mode: predict anyway, just do not store
        logging.getLogger(__name__).info("not storing predictions: %s", exc.message)
        return None


def _resolve_models(engine: Engine | None, settings: Settings, project_name: str,
                    detector_dir: Path | None, classifier_dir: Path | None) -> _Models:
    """Model folders: the given ones, else the project's active runs (click errors say how to train).
    The run ids are kept when both folders are the project's active ones."""
    given = {"detector": detector_dir, "classifier": classifier_dir}
    if engine is None:  # only when both folders are given (see _open_store)
        return _Models(given["detector"], given["classifier"])  # type: ignore[arg-type]
    from cellspot.ml import registry
    from cellspot.ml.project_predictions import no_active_model_message
    from cellspot.store.db import session_factory
    from cellspot.store.queries import ProjectNotFoundError, get_project

    with session_factory(engine)() as session:
        try:
            project = get_project(session, project_name)
        except ProjectNotFoundError as exc:
            if None in given.values():
                raise click.ClickException(str(exc)) from None
            return _Models(given["detector"], given["classifier"])  # type: ignore[arg-type]
        runs = {kind: registry.active_run(session, project, kind) for kind in given}
        active = {kind: registry.model_dir(settings, run) for kind, run in runs.items() if run is not None}
    for kind, folder in given.items():
        if folder is None and kind not in active:
            raise click.ClickException(no_active_model_message(project_name, kind))
    models = _Models(given["detector"] or active["detector"], given["classifier"] or active["classifier"])
    if len(active) == 2 and _same(models.detector_dir, active["detector"]) and _same(
            models.classifier_dir, active["classifier"]):
        models.detector_run_id, models.classifier_run_id = runs["detector"].id, runs["classifier"].id
    return models


def _same(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _store(engine: Engine, project_name: str, models: _Models, result: Any) -> tuple[int, int]:
    """Store the predictions of the project's images among ``result``: ``(images, cells)``."""
    from cellspot.ml.project_predictions import match_project_images, store_predictions
    from cellspot.store.db import transaction
    from cellspot.store.models import ModelRun
    from cellspot.store.queries import get_project

    with transaction(engine) as session:
        project = get_project(session, project_name)
        matched = match_project_images(session, project, result)
        if not matched:
            return 0, 0
        detector_run = session.get(ModelRun, models.detector_run_id)
        classifier_run = session.get(ModelRun, models.classifier_run_id)
        n_cells = store_predictions(session, matched, result, detector_run, classifier_run)
    return len({image.id for image in matched.values()}), n_cells  # copies of one image are one


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path),
                metavar="IMAGES_OR_DIR...")
@click.option("--out", "out_dir", required=True, type=OUT_DIR,
              help="Folder for cells.csv, summary.csv and overlays/.")
@click.option("--detector", "detector_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Detector checkpoint folder [default: the project's active detector].")
@click.option("--classifier", "classifier_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Classifier checkpoint folder [default: the project's active classifier].")
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project whose active models to use and to store predictions in [default: the settings' "
                   "default project].")
@click.option("--no-overlays", is_flag=True, help="Do not draw overlays/<image>.png.")
@click.option("--store/--no-store", "store", default=None,
              help="Store the predictions of the project's images (matched by content or name) "
                   "[default: when the models are the project's active ones].")
@click.option("--skip-invalid", is_flag=True, help="Skip unreadable images (listed in errors.csv) instead of failing.")
def predict_command(
    inputs: tuple[Path, ...],
    out_dir: Path,
    detector_dir: Path | None,
    classifier_dir: Path | None,
    project_name: str | None,
    no_overlays: bool,
    store: bool | None,
    skip_invalid: bool,
) -> None:
    """Find every cell in IMAGES_OR_DIR (files or folders), classify it alive or dead, and write
    cells.csv, summary.csv (alive, dead, viability % per image) and overlay PNGs to --out."""
    from cellspot.settings import get_settings

    settings = get_settings()
    name = project_name or settings.default_project
    need_store = detector_dir is None or classifier_dir is None or store is True
    engine = _open_store(settings, required=need_store) if need_store or store is None else None
    try:
        from cellspot.ml.common import configure_threads

        configure_threads(settings.torch_threads)  # CELLSPOT_TORCH_THREADS, as for training
        models = _resolve_models(engine, settings, name, detector_dir, classifier_dir)
        if store is True and not models.are_active:
            raise click.ClickException(
                f"--store needs the active models of project {name!r}; the models given are not both active "
                "(promote them with `cellspot models promote`, or leave out --store)")
        result, paths = _predict(models, list(inputs), out_dir, overlays=not no_overlays, skip_invalid=skip_invalid)
        note = _store_note(engine, name, models, result, store)
    finally:
        if engine is not None:
            engine.dispose()
    _report(result, paths, note)


def _predict(models: _Models, inputs: list[Path], out_dir: Path, *, overlays: bool,
             skip_invalid: bool) -> tuple[Any, Any]:
    """Check the output folder and every input, load the models once, predict every image with a
    progress bar, write the outputs."""
    from tqdm import tqdm

    from cellspot.ml import predict

    try:  # before the long part: the output folder, missing inputs, two images with one name, unreadable files
        predict.check_output_dir(out_dir)
        images = predict.collect_images(inputs)
        with tqdm(total=len(images), desc="check", unit="image", leave=False) as bar:
            checked = predict.check_images(images, progress=lambda done, _total, _name: bar.update(done - bar.n))
        if not checked.readable or (checked.errors and not skip_invalid):
            raise predict.UnreadableImagesError(checked.errors, checked.total)
    except predict.UnreadableImagesError as exc:
        raise click.ClickException(_unreadable_message(exc, skip_invalid)) from None
    except predict.PredictionError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        detector = predict.load_detector_dir(models.detector_dir)
        classifier = predict.load_classifier_dir(models.classifier_dir)
    except (ValueError, OSError) as exc:  # cellspot.ml.common.TrainingError is a ValueError
        raise click.ClickException(f"cannot load the models: {exc}") from None
    bar = tqdm(total=0, desc="predict", unit="image", leave=False)

    def progress(done: int, total: int, _image: str) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = predict.predict_images(checked, detector, classifier, progress=progress, skip_invalid=skip_invalid)
        if not result.images:  # every file that passed the check failed to decode
            raise predict.UnreadableImagesError(result.errors, checked.total)
        return result, predict.write_outputs(result, out_dir, overlays=overlays)
    except predict.UnreadableImagesError as exc:
        raise click.ClickException(_unreadable_message(exc, skip_invalid)) from None
    except predict.PredictionError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()


def _unreadable_message(exc: Any, skip_invalid: bool) -> str:
    """The error of an :class:`~cellspot.ml.predict.UnreadableImagesError`, with what to do next
    (with ``skip_invalid`` it is raised only when no image is readable)."""
    from cellspot.ml.predict import format_image_errors

    if exc.n_readable == 0 or skip_invalid:
        return (f"no readable image among the {exc.total} image file(s) given; nothing was predicted or "
                "written (--out is left as it was):\n" + format_image_errors(exc.errors))
    return (f"{exc}\nnothing was written; --skip-invalid skips them (listing them in errors.csv) and predicts "
            f"the other {exc.n_readable} image(s)")


def _store_note(engine: Engine | None, project_name: str, models: _Models, result: Any,
                store: bool | None) -> str | None:
    """Store the predictions when the models are the project's active ones; the line to print."""
    if store is False:
        return None
    if engine is None:
        return "not stored: there is no cellspot store here (`cellspot init`)"
    if not models.are_active:
        return f"not stored: the models are not the active ones of project {project_name!r}"
    n_images, n_cells = _store(engine, project_name, models, result)
    if n_images == 0:
        return f"not stored: none of the images is in project {project_name!r} (matched by content or name)"
    return f"stored {n_cells} cells on {n_images} image(s) of project {project_name!r}"


def _report(result: Any, paths: Any, note: str | None) -> None:
    cells = result.details
    n_alive = int((cells["label"] == "alive").sum())
    viability = f"{100.0 * n_alive / len(cells):.1f}%" if len(cells) else "n/a"
    rate = len(result.images) / result.seconds if result.seconds > 0 else float("inf")
    click.echo(f"predicted {len(result.images)} image(s) with {result.detector_version} + "
               f"{result.classifier_version} in {result.seconds:.1f} s ({rate:.1f} images/s)")
    click.echo(f"  cells: {len(cells)} ({n_alive} alive, {len(cells) - n_alive} dead; viability {viability})")
    click.echo(f"cells:    {paths.cells}")
    click.echo(f"summary:  {paths.summary}")
    if paths.overlays is not None:
        click.echo(f"overlays: {paths.overlays} ({paths.n_overlays} file(s))")
    if result.errors:
        click.echo(f"skipped {len(result.errors)} unreadable file(s), listed in {paths.errors}")
    if note:
        click.echo(note)

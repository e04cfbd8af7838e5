"""``cellspot import images|clicks|gold``: bring files into a project (created when missing).

Each command upgrades the database to the newest schema first, imports in one transaction
and prints a summary. Problems go to stderr; the exit status is 1 when anything failed.
Heavy imports stay inside the command functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from cellspot.cli import PROJECT, main

_PROJECT_OPTION = click.option(
    "--project", "project_name", type=PROJECT, default=None,
    help="Project name [default: the settings' default project]."
)
_EXISTING = click.Path(exists=True, path_type=Path)
#: an existing file (a folder given for a CSV is a usage error, not a traceback)
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_MAX_LISTED_DUPLICATES = 10


@main.group("import")
def import_group() -> None:
    """Import images, crowd clicks and expert (gold) cells into a project."""


@contextmanager
def _project_session(project_name: str | None) -> Iterator[tuple[Any, Any, Any]]:
    """(settings, session, project) in one transaction, on a database upgraded to head."""
    from cellspot.settings import get_settings
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.store.queries import get_or_create_project

    settings = get_settings()
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
        with transaction(engine) as session:
            try:
                project = get_or_create_project(session, project_name or settings.default_project)
            except ValueError as exc:  # a name that only differs in case from a project's
                raise click.ClickException(str(exc)) from exc
            yield settings, session, project
    finally:
        engine.dispose()


def _tqdm_progress(description: str) -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int, label: str) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = tqdm(total=total, desc=description, unit="file")
        bar.update(done - bar.n)

    def close() -> None:
        if "bar" in state:
            state["bar"].close()

    return update, close


class _NothingImported(Exception):
    """Raised inside the import transaction to roll it back."""


@import_group.command("images")
@click.argument("paths", nargs=-1, required=True, type=_EXISTING)
@_PROJECT_OPTION
@click.option("--metadata", "metadata_csv", type=_EXISTING_FILE, default=None,
              help="CSV with an 'image' column plus condition, drug, dose, time, ...")
def images_cmd(paths: tuple[Path, ...], project_name: str | None, metadata_csv: Path | None) -> None:
    """Import image files, folders (recursive) and zip archives (PNG, JPEG, TIFF; 8/16 bit)."""
    from cellspot.imaging import IMAGE_SUFFIXES
    from cellspot.importers import ImageImportError, import_images

    update, close = _tqdm_progress("images")
    changed = True
    try:
        with _project_session(project_name) as (settings, session, project):
            label = project.name
            report = import_images(session, project, paths, settings, metadata_csv, progress=update)
            changed = bool(report.imported or report.attached or report.metadata_applied)
            if not changed:
                raise _NothingImported  # roll back: not even a new, empty project is left behind
    except _NothingImported:
        pass
    except ImageImportError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        close()
    click.echo(f"project {label!r}: {report.summary()}{'' if changed else '; nothing stored'}")
    for problem in report.duplicates[:_MAX_LISTED_DUPLICATES]:
        click.echo(f"duplicate: {problem}", err=True)
    if len(report.duplicates) > _MAX_LISTED_DUPLICATES:
        click.echo(f"duplicate: ... and {len(report.duplicates) - _MAX_LISTED_DUPLICATES} more", err=True)
    for name in report.skipped[:_MAX_LISTED_DUPLICATES]:
        why = ("an archive inside an archive is not opened: unpack the outer one"
               if name.lower().endswith(".zip") else f"not a {', '.join(IMAGE_SUFFIXES)} file")
        click.echo(f"skipped: {name} ({why})", err=True)
    if len(report.skipped) > _MAX_LISTED_DUPLICATES:
        click.echo(f"skipped: ... and {len(report.skipped) - _MAX_LISTED_DUPLICATES} more", err=True)
    for problem in report.notes:
        click.echo(f"note: {problem}", err=True)
    for problem in report.errors:
        click.echo(f"error: {problem}", err=True)
    if report.errors:
        raise click.ClickException(
            f"{len(report.errors)} file(s) or metadata line(s) could not be imported (see above)"
            + ("; the rest was imported, as the summary line says" if changed else "")
        )


@import_group.command("clicks")
@click.argument("file", type=_EXISTING_FILE)
@click.option("--format", "fmt", type=click.Choice(["auto", "csv", "pybossa"]), default="auto", show_default=True,
              help="csv: image,annotator,x,y,label[,task_run,timestamp]; pybossa: Cell Spotting task-run export.")
@_PROJECT_OPTION
@click.option("--skip-invalid", is_flag=True,
              help="Import the valid rows; write the rejects with their reasons to a CSV under CELLSPOT_HOME.")
@click.option("--replace-runs", is_flag=True,
              help="For a corrected or extended copy of a tidy file imported before: its runs (same task_run, "
                   "or annotator and image) replace the earlier ones instead of being refused.")
def clicks_cmd(file: Path, fmt: str, project_name: str | None, skip_invalid: bool, replace_runs: bool) -> None:
    """Import crowd clicks (re-importing the same file changes nothing)."""
    from cellspot.importers import ClickImportError, import_clicks

    stored = True
    try:
        with _project_session(project_name) as (settings, session, project):
            label = project.name
            report = import_clicks(session, project, file, fmt, skip_invalid=skip_invalid, settings=settings,
                                   replace_runs=replace_runs)
            stored = bool(report.runs_imported or report.images_created)
            if not stored:  # every row rejected or present: roll back, so no new empty project is left
                raise _NothingImported
    except _NothingImported:
        pass
    except ClickImportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"project {label!r}: {report.summary()}{'' if stored else '; nothing stored'}")
    if report.rejects_path is not None:
        click.echo(f"rejects: {report.rejects_path}")


@import_group.command("gold")
@click.argument("file", type=_EXISTING_FILE)
@_PROJECT_OPTION
def gold_cmd(file: Path, project_name: str | None) -> None:
    """Import expert (gold) cells from a CSV image,x,y,label (alive|dead)."""
    from cellspot.importers import GoldImportError, import_gold

    try:
        with _project_session(project_name) as (_settings, session, project):
            report = import_gold(session, project, file)
    except GoldImportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"project {project.name!r}: {report.summary()}")

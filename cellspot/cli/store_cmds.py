"""Store commands: ``cellspot init``, ``cellspot aggregate``, ``cellspot projects``.

Heavy imports (sqlalchemy, pandas, consensus) stay inside the command functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from cellspot.cli import PROJECT, main

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cellspot.settings import Settings


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def store_exists(settings: Settings) -> bool:
    """False for a SQLite file that was never created (connecting would leave an empty one)."""
    from cellspot.store.db import sqlite_file

    file = sqlite_file(settings.resolved_database_url)
    return file is None or file.is_file()


def open_store(settings: Settings | None = None) -> Engine:
    """An engine on the settings' database, which must exist and be migrated to head (else a
    CLI error)."""
    from cellspot.settings import get_settings
    from cellspot.store.db import make_engine
    from cellspot.store.migrate import current_revision, head_revision

    settings = settings or get_settings()
    if not store_exists(settings):
        raise click.ClickException(f"database {settings.resolved_database_url} is not initialised; "
                                   "run `cellspot init` first")
    engine = make_engine(settings=settings)
    current, head = current_revision(engine), head_revision()
    if current != head:
        state = "is not initialised" if current is None else f"is at revision {current}, not {head}"
        raise click.ClickException(f"database {_safe_url(engine)} {state}; run `cellspot init` first")
    return engine


@main.command("init")
def init_cmd() -> None:
    """Create CELLSPOT_HOME and upgrade the database to the newest schema."""
    from cellspot.settings import get_settings
    from cellspot.store.migrate import current_revision, prepare_store

    settings = get_settings()
    engine = prepare_store(settings)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"home:     {settings.home.resolve()}")
    click.echo(f"database: {_safe_url(engine)} (revision {revision})")


@main.command("aggregate")
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project name [default: the settings' default project].")
@click.option("--method", default=None,
              help="Consensus method: cluster_em (the default), dbscan_vote or seed_r35.")
@click.option("--cell-radius", type=click.FloatRange(min=0, min_open=True, max=10_000), default=None,
              help="Cell radius hint in pixels (the default method estimates it).")
@click.option("--min-runs", type=click.IntRange(min=1), default=None,
              help="Retire images with at least this many runs ... [project setting retire_min_runs, default 3].")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None,
              help="... whose cells all have at least this label confidence, with the cells and their count "
                   "settled [retire_min_confidence, default 0.9].")
@click.option("--max-runs", type=click.IntRange(min=1), default=None,
              help="Retire images with this many runs whatever their consensus [retire_max_runs, default 10; "
                   "no maximum when min runs is above 10 and retire_max_runs is not set].")
def aggregate_cmd(
    project_name: str | None, method: str | None, cell_radius: float | None,
    min_runs: int | None, min_confidence: float | None, max_runs: int | None,
) -> None:
    """Compute a consensus snapshot of a project's clicks and apply adaptive retirement.

    An image retires once it has --min-runs runs and every cell's label, every cell's
    existence and the cell count have settled, or once it has --max-runs runs. The cell
    thresholds come from the project settings retire_min_cell_certainty (default 0.5) and
    retire_count_tolerance (default 0.25).
    """
    from cellspot.consensus import DEFAULT_METHOD, UnknownMethodError
    from cellspot.settings import get_settings
    from cellspot.store.db import transaction
    from cellspot.store.queries import ProjectNotFoundError
    from cellspot.workflows.aggregate import aggregate

    settings = get_settings()
    engine = open_store(settings)
    name = project_name or settings.default_project
    try:
        with transaction(engine) as session:
            report = aggregate(session, name, method=method or DEFAULT_METHOD, cell_radius=cell_radius,
                               min_runs=min_runs, min_confidence=min_confidence, max_runs=max_runs)
    except (ProjectNotFoundError, UnknownMethodError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    if report.reused:
        click.echo(f"project {name!r}: no click, run or expert cell changed since snapshot "
                   f"{report.snapshot_id}; kept it and applied retirement again")
    click.echo(
        f"project {name!r}: snapshot {report.snapshot_id} ({report.method}): "
        f"{report.cells} cells ({report.gold_cells} gold) on {report.images} images from "
        f"{report.clicks} clicks in {report.task_runs} runs, {report.annotators} annotators rated"
    )
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.retire_reasons.items()))
    click.echo(
        f"retired: {report.retired} images ({report.newly_retired} new, "
        f"{report.reactivated} back to active); decisions: {reasons or 'none'}"
    )


@main.command("projects")
def projects_cmd() -> None:
    """List the projects with their counts."""
    from cellspot.store.db import session_factory
    from cellspot.store.queries import project_summaries

    engine = open_store()
    try:
        with session_factory(engine)() as session:
            table = project_summaries(session)
    finally:
        engine.dispose()
    if table.empty:
        click.echo("no projects yet (`cellspot import ...` or `cellspot demo` creates one)")
        return
    click.echo(table.drop(columns=["project_id"]).to_string(index=False))

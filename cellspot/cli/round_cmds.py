"""``cellspot round open|close|rollback|list``: active-learning rounds from the command line.

The same workflows as the dashboard's Rounds page (:mod:`cellspot.workflows.rounds`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from cellspot.cli import PROJECT, STRATEGY, main, scoring_note

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from cellspot.store.models import Project

LIST_COLUMNS = ["round", "status", "strategy", "images", "detector_version", "classifier_version",
                "task_runs_at_open", "task_runs", "created_at", "closed_at"]
QUEUE_COLUMNS = ["rank", "image", "score", "status", "n_runs", "reason"]


def _in_project(project_name: str | None, work: Callable[[Session, Project], Any]) -> Any:
    """Run ``work(session, project)`` in one committed transaction; workflow errors -> CLI errors."""
    from cellspot.active.rounds import RoundError, ScoresError
    from cellspot.active.strategies import MissingSignalError, UnknownStrategyError
    from cellspot.cli.store_cmds import open_store
    from cellspot.settings import get_settings
    from cellspot.store.db import transaction
    from cellspot.store.queries import ProjectNotFoundError, get_project
    from cellspot.workflows.rounds import RoundsWorkflowError

    settings = get_settings()
    engine = open_store(settings)
    try:
        with transaction(engine) as session:
            return work(session, get_project(session, project_name or settings.default_project))
    except UnknownStrategyError as exc:
        raise click.BadParameter(str(exc), param_hint="--strategy") from None
    except (ProjectNotFoundError, RoundsWorkflowError, RoundError, ScoresError, MissingSignalError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()


_project_option = click.option("--project", "project_name", type=PROJECT, default=None,
                               help="Project name [default: the settings' default project].")


@main.group("round")
def round_group() -> None:
    """Active-learning rounds: the ranked queue of images students get next."""


@round_group.command("open")
@_project_option
@click.option("--strategy", type=STRATEGY, default=None, help="Acquisition strategy [default: combined]; see `cellspot queue "
              "--list-strategies`.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Queue only the N best images [default: all].")
@click.option("--target-runs", type=click.IntRange(min=1), default=None,
              help="Runs per queued image in this round [default: the project setting target_runs_per_image, else 3].")
def open_cmd(project_name: str | None, strategy: str | None, top: int | None, target_runs: int | None) -> None:
    """Open the next round: rank the images with the active models (crowd and coverage
    signals only before any model exists); the open round closes."""
    from cellspot.workflows.rounds import DEFAULT_STRATEGY, open_new_round, scoring_sources

    info, sources = _in_project(project_name, lambda session, project: (open_new_round(
        session, project, strategy=strategy or DEFAULT_STRATEGY, top=top, target_runs=target_runs),
        scoring_sources(session, project)))
    click.echo(f"{info.describe()} opened")
    if info.empty:
        click.echo("note: no open image was left to rank (retired or without pixels), so the queue is empty; "
                   "students get gold images, and any open image outside the queue", err=True)
        return
    note = scoring_note(sources, info.strategy, "this round")
    if note:
        click.echo(note, err=True)


@round_group.command("close")
@_project_option
def close_cmd(project_name: str | None) -> None:
    """Close the open round without opening another: students get the images with the fewest
    runs again, as without rounds, until the next round opens."""
    from cellspot.workflows.auto_rounds import AutoSettings
    from cellspot.workflows.rounds import close_current

    closed, auto = _in_project(project_name, lambda session, project: (
        close_current(session, project), AutoSettings.from_project(project)))
    click.echo(f"round {closed.number} closed; no round is open now: students get the images with the fewest runs")
    if auto.enabled:
        click.echo(f"note: automatic mode is on: it opens a new round after {auto.every_runs} new task runs "
                   "(switch it off on the Rounds page to stay without rounds)", err=True)


@round_group.command("rollback")
@_project_option
def rollback_cmd(project_name: str | None) -> None:
    """Roll back the open round; the round before it opens again."""
    from cellspot.workflows.rounds import rollback_current

    undone, restored = _in_project(project_name, rollback_current)
    again = f"round {restored.number} is open again" if restored is not None else "no round is open now"
    click.echo(f"round {undone.number} rolled back; {again}")


def _when(t: Any) -> str:
    """A round's time as ``2026-03-02 09:00`` (UTC); ``-`` when it has none (still open)."""
    import pandas as pd

    return "-" if t is None or pd.isna(t) else t.strftime("%Y-%m-%d %H:%M")


@round_group.command("list")
@_project_option
@click.option("--queue", "show_queue", is_flag=True, help="Also print the open round's queue.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --queue: the N best queued images.")
def list_cmd(project_name: str | None, show_queue: bool, top: int) -> None:
    """Print the rounds, newest first (and with --queue the open round's best images)."""
    from cellspot.workflows.rounds import history, queue_table

    table, queue = _in_project(project_name, lambda session, project: (
        history(session, project), queue_table(session, project) if show_queue else None))
    if table.empty:
        click.echo("no round yet; open one with `cellspot round open`")
        return
    shown = table[LIST_COLUMNS].assign(**{c: table[c].map(_when) for c in ("created_at", "closed_at")}).astype(object)
    shown = shown.where(shown.notna(), "-")
    click.echo(shown.to_string(index=False, na_rep="-"))
    if queue is not None:
        click.echo("")
        if queue.empty:
            click.echo("no open round" if not (table["status"] == "open").any() else "the open round's queue is empty")
        else:
            click.echo(queue[QUEUE_COLUMNS].head(top).to_string(index=False, float_format="%.3f"))

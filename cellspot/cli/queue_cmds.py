"""``cellspot queue``: rank a project's images by how much labelling them next would help."""

from __future__ import annotations

from pathlib import Path

import click

from cellspot.cli import OUT_FILE, PROJECT, STRATEGY, main, scoring_note

CONTEXT_COLUMNS = ["image_id", "n_runs", "retired", "has_pixels"]


def _list_strategies(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from cellspot.active.strategies import DEFAULT_STRATEGY, list_strategies

    usable = list_strategies(from_signals_only=True)
    for row in usable.itertuples():
        mark = " (default)" if row.name == DEFAULT_STRATEGY else ""
        click.echo(f"{row.name:<14} {row.summary}{mark}")
    other = sorted(set(list_strategies()["name"]) - set(usable["name"]))
    if other:  # bald: MC-dropout samples, which the queue and rounds do not compute
        click.echo(f"\nPython API and benchmark only (need inputs beyond the signal table): {', '.join(other)}")
    ctx.exit(0)


@main.command("queue")
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project name [default: the settings' default project].")
@click.option("--strategy", type=STRATEGY, default=None, help="Acquisition strategy [default: combined]; see --list-strategies.")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Only the N best images [default: all].")
@click.option("--out", type=OUT_FILE, default=None,
              help="Write the CSV here [default: standard output].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random strategy.")
@click.option("--diversity", type=click.FloatRange(0.0, 1.0), default=0.3, show_default=True,
              help="Weight of novelty against score when ordering (0 = by score only; ignored by random).")
@click.option("--snapshot", "snapshot_id", type=int, default=None, help="Consensus snapshot id [default: the latest].")
@click.option("--all", "include_all", is_flag=True, help="Also rank retired images and images without pixels.")
@click.option("--list-strategies", is_flag=True, expose_value=False, is_eager=True, callback=_list_strategies,
              help="List the strategies and exit.")
def queue_cmd(
    project_name: str | None, strategy: str | None, top: int | None, out: Path | None, seed: int,
    diversity: float, snapshot_id: int | None, include_all: bool,
) -> None:
    """Write the image ranking as CSV (image,score,strategy,reason,...), best first.

    Works before any model exists (crowd and coverage signals only). Rows are ordered by
    batch-aware selection: high scores first, near-duplicate images pushed down.
    """
    from cellspot.active.select import select_batch
    from cellspot.active.signals import NoPredictionsError, SnapshotNotFoundError, image_signals
    from cellspot.active.strategies import (
        DEFAULT_STRATEGY,
        MissingSignalError,
        UnknownStrategyError,
        get_strategy,
        score_images,
    )
    from cellspot.cli.store_cmds import open_store
    from cellspot.settings import get_settings
    from cellspot.store.db import session_factory
    from cellspot.store.queries import ProjectNotFoundError
    from cellspot.workflows.rounds import scoring_sources

    name = strategy or DEFAULT_STRATEGY
    try:
        get_strategy(name)
    except UnknownStrategyError as exc:
        raise click.BadParameter(str(exc), param_hint="--strategy") from None
    settings = get_settings()
    project = project_name or settings.default_project
    engine = open_store(settings)
    try:
        with session_factory(engine)() as session:
            signals = image_signals(session, project, snapshot=snapshot_id)
            scoring = scoring_sources(session, project)
    except (ProjectNotFoundError, NoPredictionsError, SnapshotNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    sources = signals.attrs.get("sources", {})
    if not include_all:
        signals = signals[~signals["retired"] & signals["has_pixels"]].reset_index(drop=True)
    try:
        ranked = score_images(name, signals, seed=seed)
    except (MissingSignalError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    context = [c for c in CONTEXT_COLUMNS if c not in ranked.columns]  # coverage gives its own n_runs
    ranked = ranked.merge(signals[["image", *context]], on="image", how="left")
    use_diversity = 0.0 if name in ("random", "diversity") else diversity
    ranked = select_batch(ranked, n=top if top is not None else len(ranked), signals=signals,
                          diversity=use_diversity)
    _write(ranked, out)
    predicted = bool(sources.get("detector_run_id") or sources.get("classifier_run_id"))
    models = (f"models {sources.get('detector_version')} + {sources.get('classifier_version')}"
              if predicted else "no model predictions")
    snapshot = sources.get("snapshot_id")
    snapshot_text = f"snapshot {snapshot}" if snapshot is not None else "no consensus snapshot"
    click.echo(f"project {project!r}: {len(ranked)} image(s) ranked with {name} "
               f"({snapshot_text}, {models})" + (f" -> {out}" if out else ""), err=True)
    note = scoring_note(scoring, name, "this ranking")
    if note:
        click.echo(note, err=True)


def _write(ranked, out: Path | None) -> None:  # noqa: ANN001 - a DataFrame
    if out is None:
        click.echo(ranked.to_csv(index=False, float_format="%.6g"), nl=False)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    ranked.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(out)

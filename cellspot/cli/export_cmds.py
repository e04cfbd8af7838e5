"""``cellspot export``: write the clean dataset of a project's latest consensus snapshot."""

from __future__ import annotations

from pathlib import Path

import click

from cellspot.cli import OUT_DIR, PROJECT, main

#: unreadable image files named on the terminal (the manifest names them all)
UNREADABLE_SHOWN = 20


@main.command("export")
@click.argument("outdir", type=OUT_DIR)
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project name (default: the settings' default project).")
@click.option("--crop-size", default=96, show_default=True, type=click.IntRange(min=1, max=1024), help="Crop side in pixels (at most 1024).")
@click.option("--split", "split_text", default="0.8,0.1,0.1", show_default=True,
              help="Train,val,test fractions of images (split by image, stratified by dead fraction; "
                   "images nobody labelled get the split 'unlabelled').")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
# default: cellspot.export.DEFAULT_MIN_CONFIDENCE (not imported here: --help stays fast)
@click.option("--min-confidence", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Cells below this consensus confidence are left out (and counted in the manifest).")
@click.option("--snapshot", "snapshot_id", default=None, type=int, help="Snapshot id (default: the latest).")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier cellspot export in OUTDIR (one with its manifest.json); any other "
                   "non-empty folder is refused.")
def export_command(
    outdir: Path,
    project_name: str | None,
    crop_size: int,
    split_text: str,
    seed: int,
    min_confidence: float,
    snapshot_id: int | None,
    overwrite: bool,
) -> None:
    """Export cells, clicks, reliability, images, COCO keypoints and crops to OUTDIR."""
    from tqdm import tqdm

    from cellspot.crops import SplitError, parse_fractions
    from cellspot.export import ExportError, export_dataset
    from cellspot.settings import get_settings
    from cellspot.cli.store_cmds import open_store
    from cellspot.store.db import session_factory
    from cellspot.store.queries import ProjectNotFoundError, get_project

    try:
        fractions = parse_fractions(split_text)
    except SplitError as exc:
        raise click.BadParameter(str(exc), param_hint="--split") from None
    settings = get_settings()
    name = project_name or settings.default_project
    engine = open_store(settings)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="image", leave=False)
        bar.update(done - bar.n)

    try:
        with session_factory(engine)() as session:
            project = get_project(session, name)
            report = export_dataset(
                session, project, outdir, settings, crop_size=crop_size, split=fractions, seed=seed,
                min_confidence=min_confidence, snapshot=snapshot_id, overwrite=overwrite, progress=progress,
            )
    except (ProjectNotFoundError, ExportError, SplitError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for bar in bars.values():
            bar.close()
        engine.dispose()

    c = report.counts
    split = c["images_per_split"]
    click.echo(f"exported project {name!r}, snapshot {report.snapshot_id} ({report.method}) to {report.outdir}")
    click.echo(f"  images: {c['images']} (train {split['train']}, val {split['val']}, test {split['test']}, "
               f"{c['images_unlabelled']} unlabelled (no task run or expert cell); "
               f"{c['images_without_pixels']} without pixels)")
    click.echo(f"  cells:  {c['cells_exported']} ({c['cells_alive']} alive, {c['cells_dead']} dead); "
               f"{c['cells_below_min_confidence']} below confidence {min_confidence:g} left out")
    click.echo(f"  crops:  {c['crops']} of {crop_size}x{crop_size} px "
               f"({c['cells_without_pixels']} cells on images without pixels and "
               f"{c['cells_on_unreadable_images']} on unreadable images have none)")
    click.echo(f"  clicks: {c['clicks']} in {c['task_runs']} task runs "
               f"({c['task_runs'] - c['task_runs_with_clicks']} of them without clicks)")
    click.echo(f"manifest: {report.manifest_path}")
    if report.stale:
        click.echo(f"warning: the cells and crops are those of the snapshot, but {report.stale}", err=True)
    if report.unreadable:
        click.echo(f"warning: {len(report.unreadable)} image file(s) could not be read; their "
                   f"{c['cells_on_unreadable_images']} cells are in the tables but have no crops "
                   "(listed as unreadable_images in the manifest):", err=True)
        for image, reason in list(report.unreadable.items())[:UNREADABLE_SHOWN]:
            click.echo(f"  {image}: {reason}", err=True)
        if len(report.unreadable) > UNREADABLE_SHOWN:
            click.echo(f"  ... and {len(report.unreadable) - UNREADABLE_SHOWN} more", err=True)

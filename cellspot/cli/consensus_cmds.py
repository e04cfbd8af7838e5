"""``cellspot consensus``: stateless click consensus, file in / file out."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from cellspot.cli import OutFile, main, os_error_text


@main.command("consensus", short_help="Merge the clicks of a CSV into consensus cells (no store needed).")
@click.argument("clicks_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True,
              type=OutFile("image,x,y,label,p_alive", "cells CSV written by cellspot consensus", "cells.csv"),
              help="Output CSV of consensus cells (an existing file is replaced only when it is such a CSV).")
@click.option("--method", default=None,
              help="Consensus method: cluster_em (the default), dbscan_vote or seed_r35.")
@click.option("--cell-radius", type=click.FloatRange(min=0, min_open=True, max=10_000), default=None,
              help="Optional cell radius hint in pixels; by default the scale is estimated from the clicks.")
@click.option("--annotators-out", default=None,
              type=OutFile("annotator,n_runs,n_clicks", "reliability CSV written by cellspot consensus",
                           "annotators.csv"),
              help="Also write the per-annotator reliability CSV here.")
def consensus_cmd(clicks_csv: Path, out: Path, method: str | None, cell_radius: float | None,
                  annotators_out: Path | None) -> None:
    """Merge the clicks in CLICKS_CSV (image,annotator,x,y,label[,task_run]) into cells.

    Output columns: image,x,y,label,p_alive,confidence,support,n_runs,p_cell.
    """
    from cellspot.consensus import DEFAULT_METHOD, run_consensus
    from cellspot.consensus.io import read_clicks_csv, write_cells_csv
    from cellspot.consensus.types import ConsensusInputError, UnknownMethodError

    _check_distinct_paths(clicks_csv, out, annotators_out)
    try:
        clicks = read_clicks_csv(clicks_csv)
        result = run_consensus(clicks, method or DEFAULT_METHOD, cell_radius=cell_radius, validated=True)
    except (ConsensusInputError, UnknownMethodError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    # both files or neither: the reliability table goes to a temporary file first, renamed once
    # the cells are written
    pending = None if annotators_out is None else annotators_out.with_name(annotators_out.name + ".tmp")
    try:
        if pending is not None:
            pending.parent.mkdir(parents=True, exist_ok=True)
            result.annotators.to_csv(pending, index=False, float_format="%.6g")
        write_cells_csv(result.cells, out)
        if pending is not None:
            pending.replace(annotators_out)
    except OSError as exc:
        if pending is not None:
            with contextlib.suppress(OSError):  # it may never have been created
                pending.unlink()
        raise click.ClickException(f"cannot write the output, nothing was written: {os_error_text(exc)}") from None
    n_alive = int((result.cells["label"] == "alive").sum())
    click.echo(
        f"{len(clicks):,} clicks on {clicks['image'].nunique():,} images -> {len(result.cells):,} cells "
        f"({n_alive:,} alive, {len(result.cells) - n_alive:,} dead) with {result.params['method']} -> {out}",
        err=True,
    )


def _check_distinct_paths(clicks_csv: Path, out: Path, annotators_out: Path | None) -> None:
    """Usage error when an output is the input (it would be replaced by the cells) or both outputs
    are one file (the cells would replace the reliability table)."""
    def same(a: Path, b: Path) -> bool:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))

    if same(out, clicks_csv):
        raise click.UsageError(f"--out {out} is the input file CLICKS_CSV; the clicks would be lost: choose another file")
    if annotators_out is not None:
        if same(annotators_out, clicks_csv):
            raise click.UsageError(f"--annotators-out {annotators_out} is the input file CLICKS_CSV; choose another file")
        if same(annotators_out, out):
            raise click.UsageError(f"--out and --annotators-out are the same file ({out}); give each its own")

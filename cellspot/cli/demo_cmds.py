"""``cellspot demo``: build the demo project (generated images, simulated class, consensus)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import click

from cellspot.cli import PROJECT, main

if TYPE_CHECKING:
    from cellspot.workflows.demo import DemoReport


@main.command("demo")
@click.option("--images", "n_images", default=12, show_default=True, type=click.IntRange(min=1),
              help="Number of generated images.")
@click.option("--students", "n_students", default=5, show_default=True, type=click.IntRange(min=1),
              help="Number of simulated students.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed: same seed, same demo.")
@click.option("--project", "project_name", type=PROJECT, default=None,
              help="Project name (default: the settings' default project, 'demo').")
@click.option("--profile", default="realistic", show_default=True,
              help="Crowd simulation profile: easy, realistic or hard.")
def demo_command(n_images: int, n_students: int, seed: int, project_name: str | None, profile: str) -> None:
    """Build (or rebuild) the demo project in the store and print a summary."""
    from cellspot.settings import get_settings
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.simulate import UnknownProfileError
    from cellspot.workflows.demo import DemoError, build_demo

    settings = get_settings()
    name = project_name or settings.default_project
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
        with transaction(engine) as session:
            report = build_demo(session, settings, project_name=name, n_images=n_images,
                                n_students=n_students, seed=seed, profile=profile)
    except (DemoError, UnknownProfileError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        engine.dispose()
    click.echo("\n".join(summary_lines(report)))
    click.echo(f"store: {engine.url.render_as_string(hide_password=True)}")
    click.echo(f"next: cellspot export {settings.exports_dir / name} --project {name}")


def _num(value: float, fmt: str = "{:.1f}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def summary_lines(report: DemoReport) -> list[str]:
    """A readable multi-line summary of a demo build."""
    lines = [
        f"demo project {report.project!r} (id {report.project_id}) built in {report.seconds:.1f} s "
        f"(seed {report.seed}, profile {report.profile})",
        f"  images:   {report.n_images} generated ({report.n_gold_images} with {report.n_gold_cells} "
        f"expert gold cells), {report.n_retired} retired",
        f"  students: {report.n_students} simulated (class code {report.class_code}): {report.n_runs} task runs, "
        f"{report.n_clicks} clicks",
        f"  cells:    {report.n_cells_alive} alive, {report.n_cells_dead} dead "
        f"(snapshot {report.snapshot_id}, method {report.method})",
        "",
        "  viability per image (consensus vs. generated truth):",
        f"    {'image':<34} {'dose':>6} {'time':>5} {'alive':>5} {'dead':>5} {'viab%':>6} {'true%':>6}  status",
    ]
    for r in report.images.itertuples(index=False):
        tag = " (gold)" if r.gold else ""
        lines.append(
            f"    {r.image:<34} {r.dose_uM:>6g} {r.time_h:>4}h {r.n_alive:>5} {r.n_dead:>5} "
            f"{_num(r.viability_pct):>6} {_num(r.true_viability_pct):>6}  {r.status}{tag}"
        )
    lines += [
        "",
        "  reliability of each simulated student (estimated by consensus | simulated skill):",
        f"    {'nickname':<10} {'runs':>4} {'clicks':>6} {'sens':>5} {'prec':>5} {'acc_alive':>9} "
        f"{'acc_dead':>8} {'weight':>6} | {'recall':>6} {'flip':>5} {'spam':>5}",
    ]
    for s in report.students.itertuples(index=False):
        lines.append(
            f"    {str(s.nickname):<10} {_num(s.n_runs, '{:.0f}'):>4} {_num(s.n_clicks, '{:.0f}'):>6} "
            f"{_num(s.sensitivity, '{:.2f}'):>5} {_num(s.precision, '{:.2f}'):>5} "
            f"{_num(s.accuracy_alive, '{:.2f}'):>9} {_num(s.accuracy_dead, '{:.2f}'):>8} "
            f"{_num(s.weight, '{:.2f}'):>6} | {_num(s.sim_recall, '{:.2f}'):>6} "
            f"{_num(s.sim_flip, '{:.2f}'):>5} {_num(s.sim_spam, '{:.2f}'):>5}"
        )
    return lines

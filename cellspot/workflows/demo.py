"""The demo project: generated cultures, a simulated class's clicks, consensus computed.

One function, :func:`build_demo`, used by ``cellspot demo``, ``make run`` and the tests.
It (re)builds a project in the caller's session and never commits:

1. ``n_images`` cell-culture images with known truth (:mod:`cellspot.synth`), a dose series
   of a drug (metadata condition / drug / dose / time; more dead cells at higher doses),
   written as PNG files and imported through :func:`cellspot.importers.images.import_images`
   (so they get content hashes and live under ``CELLSPOT_HOME`` like any imported image);
2. gold cells for the first :data:`N_GOLD_IMAGES` images from the known truth, entered by an
   expert annotator;
3. a simulated class of ``n_students`` (:mod:`cellspot.simulate`, class code ``DEMO``) whose
   runs are submitted through :func:`cellspot.store.queries.submit_task_run`;
4. consensus and retirement through :func:`cellspot.workflows.aggregate.aggregate`.

Running it again with the same arguments rebuilds the same project (the old demo project is
deleted first). A project of that name that is not a demo project is never touched.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.settings import Settings
from cellspot.store import queries
from cellspot.store.models import ConsensusSnapshot, GoldCell, Image, ModelRun, Project

log = logging.getLogger(__name__)

DEMO_CLASS_CODE = "DEMO"
#: the largest demo :func:`build_demo` makes (it generates every image in memory first)
MAX_DEMO_IMAGES = 1000
MAX_DEMO_STUDENTS = 200
DEMO_PROJECT_SETTINGS: dict[str, Any] = {
    "target_runs_per_image": 5,
    "retire_min_runs": 3,
    "retire_min_confidence": 0.9,
    "gold_rate": 0.1,
    "class_codes": [DEMO_CLASS_CODE],
}
DEMO_MARK = "demo"  # project.settings["demo"] is True for projects build_demo may rebuild
IMAGE_WIDTH, IMAGE_HEIGHT = 384, 288
N_GOLD_IMAGES = 2
EXPERT_NICKNAME = "demo-expert"
DRUG = "cisplatin"
DOSES_UM = (0.0, 2.0, 5.0, 10.0, 20.0, 40.0)
TIMES_H = (24, 48)


class DemoError(ValueError):
    """The demo cannot be built with these arguments (bad counts, name taken by a real project)."""


@dataclass(frozen=True)
class DemoImageSpec:
    """One planned demo image: its name, metadata and expected share of dead cells."""

    name: str
    condition: str
    drug: str
    dose_um: float
    time_h: int
    dead_fraction: float

    @property
    def meta(self) -> dict[str, Any]:
        return {"condition": self.condition, "drug": self.drug, "dose_uM": self.dose_um,
                "time_h": self.time_h, "source": "generated (cellspot.synth)"}


@dataclass
class DemoReport:
    """What :func:`build_demo` built.

    ``images``: one row per image (image, condition, dose_uM, time_h, gold, n_alive, n_dead,
    viability_pct, true_alive, true_dead, true_viability_pct, status);
    ``students``: one row per simulated student: the skills it was simulated with
    (``sim_recall``, ``sim_jitter``, ``sim_flip``, ``sim_stray``, ``sim_lazy``, ``sim_spam``;
    see :func:`cellspot.simulate.draw_students`) and the reliability consensus estimated
    (n_runs, n_clicks, sensitivity, precision, accuracy_alive, accuracy_dead, weight).
    """

    project: str
    project_id: int
    snapshot_id: int
    method: str
    profile: str
    seed: int
    n_images: int
    n_gold_images: int
    n_gold_cells: int
    n_students: int
    n_runs: int
    n_clicks: int
    n_cells_alive: int
    n_cells_dead: int
    n_retired: int
    images: pd.DataFrame
    students: pd.DataFrame
    seconds: float
    class_code: str = DEMO_CLASS_CODE


def demo_plan(n_images: int) -> list[DemoImageSpec]:
    """The images of a demo of ``n_images``: a control plus a dose series, at 24 h and 48 h.

    Dead fraction grows with dose (saturating) and time: about 0.08 for controls up to
    about 0.7 at the highest dose after 48 h. Pure and deterministic.
    """
    specs = []
    for i in range(n_images):
        dose = DOSES_UM[i % len(DOSES_UM)]
        hours = TIMES_H[(i // len(DOSES_UM)) % len(TIMES_H)]
        effect = dose / (dose + 8.0) * (1.0 if hours == 48 else 0.7)
        dead_fraction = float(np.clip(0.08 + 0.75 * effect, 0.0, 0.9))
        condition = "control" if dose == 0 else "treated"
        label = "control" if dose == 0 else f"{DRUG}_{dose:g}uM"
        specs.append(DemoImageSpec(
            name=f"demo_{i + 1:02d}_{label}_{hours}h.png", condition=condition,
            drug="" if dose == 0 else DRUG, dose_um=dose, time_h=hours, dead_fraction=dead_fraction,
        ))
    return specs


def build_demo(
    session: Session,
    settings: Settings,
    project_name: str = "demo",
    n_images: int = 12,
    n_students: int = 5,
    seed: int = 0,
    profile: str = "realistic",
) -> DemoReport:
    """Build (or rebuild) the demo project ``project_name``; see the module docstring.

    Deterministic for given arguments. Flushes, never commits. Raises :class:`DemoError`
    for ``n_images`` / ``n_students`` below 1 or when ``project_name`` names a project that
    is not a demo project; an unknown ``profile`` raises the simulator's error.
    """
    from cellspot.simulate import get_profile
    from cellspot.workflows.aggregate import aggregate

    started = time.perf_counter()
    if n_images < 1 or n_students < 1:
        raise DemoError(f"the demo needs at least 1 image and 1 student; got {n_images} images, "
                        f"{n_students} students")
    if n_images > MAX_DEMO_IMAGES or n_students > MAX_DEMO_STUDENTS:
        raise DemoError(f"the demo makes at most {MAX_DEMO_IMAGES} images and {MAX_DEMO_STUDENTS} students; "
                        f"got {n_images} images, {n_students} students")
    sim_profile = get_profile(profile)  # fail early on an unknown profile name
    code = free_demo_code(session, project_name)
    project = _fresh_project(session, project_name, code, seed=seed, profile=profile)
    rng = np.random.default_rng(seed)
    specs = demo_plan(n_images)
    truth = {s.name: _generate(rng, s) for s in specs}
    images = _import_images(session, project, settings, specs, truth)
    gold_names = [s.name for s in specs[:N_GOLD_IMAGES]]
    n_gold_cells = _add_gold(session, project, images, truth, gold_names)
    crowd = _simulate(truth, n_students, sim_profile, rng)
    n_runs, n_clicks = _submit(session, project, images, crowd, set(gold_names), code)
    agg = aggregate(session, project)
    report = _report(session, project, agg, specs, truth, gold_names, crowd.students, n_gold_cells,
                     n_runs, n_clicks, profile, seed, time.perf_counter() - started, code)
    log.info("demo project %r built in %.1f s: %d images, %d runs, %d clicks, snapshot %d",
             project.name, report.seconds, report.n_images, n_runs, n_clicks, report.snapshot_id)
    return report


# ---------------------------------------------------------------- steps


def free_demo_code(session: Session, project_name: str) -> str:
    """The demo's class code: ``DEMO``, or ``DEMO2``, ``DEMO3``, ... when another project uses it
    (two projects with one code lock their students out of both)."""
    from cellspot.workflows.classroom import class_codes

    others = session.scalars(select(Project).where(Project.name != project_name))
    taken = set().union(*(class_codes(p) for p in others))
    code, k = DEMO_CLASS_CODE, 1
    while code in taken:
        k += 1
        code = f"{DEMO_CLASS_CODE}{k}"
    return code


def _fresh_project(session: Session, name: str, class_code: str, **mark: Any) -> Project:
    """Delete the old demo project called ``name`` (if any) and create it anew with ``class_code``."""
    existing = session.scalar(select(Project).where(Project.name == name))
    if existing is not None:
        if not (existing.settings or {}).get(DEMO_MARK):
            raise DemoError(
                f"project {name!r} exists and is not a demo project; the demo never overwrites it. "
                "Choose another name for the demo project."
            )
        log.info("rebuilding demo project %r (id %d)", name, existing.id)
        runs = session.scalars(select(ModelRun.version).where(ModelRun.project_id == existing.id)).all()
        if runs:  # their rows go with the project; next_version skips their folders' versions
            log.info("the demo project's %d model run(s) (%s) are deleted; their folders under models/ stay "
                     "and their versions are not used again", len(runs), ", ".join(sorted(runs)))
        # Through the ORM so the session forgets every deleted object; snapshots first
        # (their cells and reliabilities cascade), then the project (images, runs, clicks,
        # gold cells, annotators cascade).
        for snap in session.scalars(select(ConsensusSnapshot).where(ConsensusSnapshot.project_id == existing.id)):
            session.delete(snap)
        session.flush()
        session.delete(existing)
        session.flush()
    return queries.get_or_create_project(
        session, name, **{**DEMO_PROJECT_SETTINGS, "class_codes": [class_code]},
        **{DEMO_MARK: True, **{f"demo_{k}": v for k, v in mark.items()}}
    )


def _generate(rng: np.random.Generator, spec: DemoImageSpec):
    from cellspot.synth import generate_culture

    return generate_culture(rng, IMAGE_WIDTH, IMAGE_HEIGHT, dead_fraction=spec.dead_fraction)


def _import_images(
    session: Session, project: Project, settings: Settings, specs: list[DemoImageSpec], truth: dict
) -> dict[str, Image]:
    """Write the generated images as PNG files and import them; returns name -> Image."""
    from cellspot.importers.images import import_images

    with tempfile.TemporaryDirectory(prefix="cellspot-demo-") as tmp:
        paths = []
        for spec in specs:
            path = Path(tmp) / spec.name
            PILImage.fromarray(truth[spec.name].image).save(path)
            paths.append(path)
        imported = import_images(session, project, paths, settings=settings)
    problems = [*imported.errors, *imported.duplicates]
    if problems:
        raise DemoError(f"the demo images did not import: {'; '.join(str(p) for p in problems)}")
    by_name = {img.name: img for img in session.scalars(select(Image).where(Image.project_id == project.id))}
    missing = [s.name for s in specs if s.name not in by_name]
    if missing:
        raise DemoError(f"the image importer did not store the demo images {missing}")
    for spec in specs:
        by_name[spec.name].meta = {**(by_name[spec.name].meta or {}), **spec.meta}
    session.flush()
    return by_name


def _add_gold(
    session: Session, project: Project, images: dict[str, Image], truth: dict, names: list[str]
) -> int:
    """Expert (gold) cells from the known truth of ``names``; returns how many were added."""
    expert = queries.get_or_create_annotator(session, project, EXPERT_NICKNAME, "", role="expert")
    rows = [
        GoldCell(image_id=images[name].id, x=float(c.x), y=float(c.y), label=str(c.label),
                 source="demo truth", annotator_id=expert.id)
        for name in names for c in truth[name].cells.itertuples(index=False)
    ]
    session.add_all(rows)
    session.flush()
    return len(rows)


def _simulate(truth: dict, n_students: int, profile: Any, rng: np.random.Generator):
    """The simulated class: every student labels every image once (zero-click runs included)."""
    from cellspot.simulate import class_runs, draw_students, simulate_crowd

    cells = pd.concat(
        [t.cells.assign(image=name) for name, t in truth.items()], ignore_index=True
    )[["image", "x", "y", "label", "diameter"]]
    images = pd.DataFrame({"image": list(truth), "width": IMAGE_WIDTH, "height": IMAGE_HEIGHT})
    students = draw_students(n_students, profile, rng)
    return simulate_crowd(cells, images, class_runs(images, n_students), profile, rng, students)


def _submit(
    session: Session, project: Project, images: dict[str, Image], crowd: Any, gold: set[str], class_code: str,
) -> tuple[int, int]:
    """Submit every simulated run (those without clicks too) as a task run; returns (runs, clicks)."""
    annotators = {
        name: queries.get_or_create_annotator(session, project, name, class_code, role="student")
        for name in sorted(crowd.students["annotator"].astype(str))
    }
    by_run = {run: group for run, group in crowd.clicks.groupby("task_run", sort=False)}
    empty = crowd.clicks.iloc[:0]
    n_clicks = 0
    for run in crowd.runs.itertuples(index=False):
        image = images[str(run.image)]
        group = by_run.get(run.task_run, empty)
        xs = np.clip(group["x"].to_numpy(float), 0.0, np.nextafter(image.width, 0))
        ys = np.clip(group["y"].to_numpy(float), 0.0, np.nextafter(image.height, 0))
        run_clicks = [(float(x), float(y), str(lab)) for x, y, lab in zip(xs, ys, group["label"])]
        queries.submit_task_run(
            session, image, annotators[str(run.annotator)], run_clicks,
            client_key=f"demo-{project.id}-{run.task_run}", source="demo simulation",
            is_gold_check=image.name in gold,
        )
        n_clicks += len(run_clicks)
    session.flush()
    return len(crowd.runs), n_clicks


def _report(
    session: Session, project: Project, agg: Any, specs: list[DemoImageSpec], truth: dict,
    gold_names: list[str], skills: pd.DataFrame, n_gold_cells: int, n_runs: int, n_clicks: int,
    profile: str, seed: int, seconds: float, class_code: str,
) -> DemoReport:
    snapshot = session.get(ConsensusSnapshot, agg.snapshot_id)
    cells = queries.snapshot_cells_frame(session, snapshot)
    counts = cells.groupby(["image", "label"]).size().unstack(fill_value=0) if len(cells) else pd.DataFrame()
    status = dict(session.execute(
        select(Image.name, Image.status).where(Image.project_id == project.id)).tuples().all())
    rows = []
    for spec in specs:
        t = truth[spec.name].cells
        n_alive = int(counts.at[spec.name, "alive"]) if "alive" in counts and spec.name in counts.index else 0
        n_dead = int(counts.at[spec.name, "dead"]) if "dead" in counts and spec.name in counts.index else 0
        true_alive, true_dead = int((t["label"] == "alive").sum()), int((t["label"] == "dead").sum())
        rows.append({
            "image": spec.name, "condition": spec.condition, "dose_uM": spec.dose_um, "time_h": spec.time_h,
            "gold": spec.name in gold_names, "n_alive": n_alive, "n_dead": n_dead,
            "viability_pct": _pct(n_alive, n_dead), "true_alive": true_alive, "true_dead": true_dead,
            "true_viability_pct": _pct(true_alive, true_dead), "status": status.get(spec.name, ""),
        })
    rel = queries.reliability_frame(session, snapshot)
    estimated = rel[rel["class_code"] == class_code][
        ["nickname", "n_runs", "n_clicks", "sensitivity", "precision", "accuracy_alive", "accuracy_dead", "weight"]
    ]
    simulated = skills.rename(columns={"annotator": "nickname"}).rename(
        columns={c: f"sim_{c}" for c in skills.columns if c != "annotator"})
    students = (simulated.merge(estimated, on="nickname", how="left")
                .sort_values("nickname").reset_index(drop=True))
    images = pd.DataFrame(rows)
    return DemoReport(
        project=project.name, project_id=project.id, snapshot_id=agg.snapshot_id, method=agg.method,
        profile=profile, seed=seed, n_images=len(specs), n_gold_images=len(gold_names),
        n_gold_cells=n_gold_cells, n_students=len(skills), n_runs=n_runs, n_clicks=n_clicks,
        n_cells_alive=int(images["n_alive"].sum()), n_cells_dead=int(images["n_dead"].sum()),
        n_retired=int((images["status"] == "retired").sum()), images=images, students=students,
        seconds=seconds, class_code=class_code,
    )


def _pct(alive: int, dead: int) -> float:
    return round(100.0 * alive / (alive + dead), 1) if alive + dead else float("nan")

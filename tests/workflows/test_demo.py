"""The demo project: build, rebuild, safety, export of the result, and the two CLI commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from cellspot.store import queries
from cellspot.store.models import Annotator, ConsensusSnapshot, GoldCell, Image, Project, TaskRun
from cellspot.workflows.demo import (
    DEMO_CLASS_CODE,
    DEMO_PROJECT_SETTINGS,
    N_GOLD_IMAGES,
    DemoError,
    build_demo,
    demo_plan,
)


def _count(session, model, *where) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model).where(*where))


@pytest.fixture
def demo(session, settings):
    return build_demo(session, settings, n_images=4, n_students=3, seed=1)


def test_demo_builds_a_complete_project(session, settings, demo):
    project = queries.get_project(session, "demo")
    for key, value in DEMO_PROJECT_SETTINGS.items():
        assert project.settings[key] == value
    images = session.scalars(sa.select(Image).where(Image.project_id == project.id)).all()
    assert len(images) == demo.n_images == 4
    for img in images:
        assert img.has_pixels and img.sha256 and (settings.home / img.path).is_file()
        assert {"condition", "dose_uM", "time_h"} <= set(img.meta)
    gold_images = session.scalars(
        sa.select(Image.name).join(GoldCell, GoldCell.image_id == Image.id).distinct()).all()
    assert len(gold_images) == N_GOLD_IMAGES == demo.n_gold_images
    assert _count(session, GoldCell) == demo.n_gold_cells > 0
    expert = session.scalars(sa.select(Annotator).where(Annotator.role == "expert")).one()
    assert session.scalars(sa.select(GoldCell.annotator_id).distinct()).all() == [expert.id]
    students = session.scalars(sa.select(Annotator).where(Annotator.role == "student")).all()
    assert len(students) == 3 and {s.class_code for s in students} == {DEMO_CLASS_CODE}
    assert _count(session, TaskRun) == demo.n_runs > 0
    assert len(queries.clicks_frame(session, project)) == demo.n_clicks > 0
    snap = queries.latest_snapshot(session, project)
    assert snap is not None and snap.id == demo.snapshot_id
    cells = queries.snapshot_cells_frame(session, snap)
    assert demo.n_cells_alive + demo.n_cells_dead == len(cells) > 0
    assert set(demo.students["nickname"]) == {s.nickname for s in students}
    assert list(demo.images["image"]) == [s.name for s in demo_plan(4)]
    assert (demo.images["status"].isin(["active", "retired"])).all()
    assert demo.n_retired == int((demo.images["status"] == "retired").sum())


def test_demo_consensus_resembles_the_truth(demo):
    imgs = demo.images
    found = imgs["n_alive"] + imgs["n_dead"]
    true = imgs["true_alive"] + imgs["true_dead"]
    assert (found > 0).all()
    assert abs(found.sum() - true.sum()) <= 0.25 * true.sum()
    gold = imgs[imgs["gold"]]
    assert (gold["n_alive"] == gold["true_alive"]).all() and (gold["n_dead"] == gold["true_dead"]).all()


def test_rebuild_is_idempotent(session, settings, demo):
    again = build_demo(session, settings, n_images=4, n_students=3, seed=1)
    assert _count(session, Project) == 1
    assert _count(session, Image) == 4
    assert _count(session, ConsensusSnapshot) == 1
    assert (again.n_runs, again.n_clicks, again.n_gold_cells) == (demo.n_runs, demo.n_clicks, demo.n_gold_cells)
    pd.testing.assert_frame_equal(again.images, demo.images)
    pd.testing.assert_frame_equal(again.students, demo.students)


def test_other_seed_gives_another_demo(session, settings, demo):
    other = build_demo(session, settings, project_name="demo2", n_images=4, n_students=3, seed=2)
    assert other.n_clicks != demo.n_clicks or not other.images.equals(demo.images)
    assert _count(session, Project) == 2


def test_never_touches_a_real_project(session, settings):
    real = queries.get_or_create_project(session, "demo")
    session.add(Image(project_id=real.id, name="mine.png", width=5, height=5))
    session.flush()
    with pytest.raises(DemoError, match="not a demo project"):
        build_demo(session, settings, n_images=2, n_students=1)
    assert session.scalars(sa.select(Image.name)).all() == ["mine.png"]


@pytest.mark.parametrize(("n_images", "n_students"), [(0, 3), (3, 0), (-1, 1)])
def test_bad_counts(session, settings, n_images, n_students):
    with pytest.raises(DemoError, match="at least 1"):
        build_demo(session, settings, n_images=n_images, n_students=n_students)


@pytest.mark.parametrize(("n_images", "n_students"), [(10**20, 3), (3, 10**6)])
def test_absurd_counts_are_refused_before_any_work(session, settings, n_images, n_students):
    with pytest.raises(DemoError, match="at most 1000 images and 200 students"):
        build_demo(session, settings, n_images=n_images, n_students=n_students)
    assert _count(session, Project) == 0


def test_a_second_demo_gets_a_class_code_of_its_own(session, settings):
    from cellspot.workflows.classroom import find_class

    first = build_demo(session, settings, project_name="demo", n_images=2, n_students=1)
    second = build_demo(session, settings, project_name="demo-b", n_images=2, n_students=1)
    assert (first.class_code, second.class_code) == ("DEMO", "DEMO2")
    assert find_class(session, "demo2").name == "demo-b" and find_class(session, "DEMO").name == "demo"
    again = build_demo(session, settings, project_name="demo", n_images=2, n_students=1)  # a rebuild keeps DEMO
    assert again.class_code == "DEMO"
    assert set(second.students["nickname"]) and second.students["n_runs"].notna().all()


def test_demo_plan():
    specs = demo_plan(12)
    assert len({s.name for s in specs}) == 12
    control = [s.dead_fraction for s in specs if s.dose_um == 0]
    high = [s.dead_fraction for s in specs if s.dose_um == max(x.dose_um for x in specs)]
    assert max(control) < min(high)
    series = [s.dead_fraction for s in specs if s.time_h == 48]
    assert series == sorted(series)
    assert all(0 <= s.dead_fraction <= 0.9 for s in specs)
    assert demo_plan(1)[0].condition == "control"


def test_export_of_the_demo(session, settings, demo, tmp_path):
    from cellspot.export import export_dataset, verify_export

    project = queries.get_project(session, "demo")
    report = export_dataset(session, project, tmp_path / "ds", settings, crop_size=32, split=(0.5, 0.25, 0.25))
    out = report.outdir
    assert verify_export(out) == []
    index = pd.read_csv(out / "crops" / "index.csv")
    assert len(index) == report.counts["crops"] == report.counts["cells_exported"]
    assert (index.groupby("image")["split"].nunique() == 1).all()
    images = pd.read_csv(out / "images.csv")
    assert len(images) == 4 and set(images["split"]) <= {"train", "val", "test"}
    assert {"meta_condition", "meta_dose_uM"} <= set(images.columns)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["snapshot"]["id"] == demo.snapshot_id
    assert manifest["counts"]["clicks"] == demo.n_clicks
    assert set(pd.read_csv(out / "annotators.csv")["nickname"]) >= set(demo.students["nickname"])
    crop = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(out / "crops" / index["crop_path"][0]))
    assert crop.shape == (32, 32, 3)


def test_cli_demo_then_export(settings, tmp_path):
    from cellspot.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["demo", "--images", "3", "--students", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("demo project 'demo'", "images:", "task runs", "alive", "viability per image",
                 "reliability of each simulated student"):
        assert text in out
    again = runner.invoke(main, ["demo", "--images", "3", "--students", "2", "--seed", "3"])
    assert again.exit_code == 0, again.output

    target = tmp_path / "export"
    result = runner.invoke(main, ["export", str(target), "--crop-size", "24", "--split", "0.6,0.2,0.2"])
    assert result.exit_code == 0, result.output
    assert "manifest:" in result.output and (target / "manifest.json").is_file()
    result = runner.invoke(main, ["export", str(target)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    result = runner.invoke(main, ["export", str(target), "--overwrite", "--split", "0.6,0.3"])
    assert result.exit_code != 0 and "--split" in result.output
    result = runner.invoke(main, ["export", str(tmp_path / "x"), "--project", "nope"])
    assert result.exit_code != 0 and "no project named 'nope'" in result.output

"""End-to-end command-line workflows on tiny synthetic data, as a researcher runs them.

init -> import images -> import clicks (strict, --skip-invalid, re-import) -> import gold ->
aggregate -> export, and demo -> export, each through ``click.testing.CliRunner`` on a
SQLite store in ``tmp_path`` (the ``settings`` fixture points CELLSPOT_* there).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from cellspot.export import verify_export
from cellspot.store.db import make_engine, session_factory
from cellspot.store.models import Click, ConsensusSnapshot, GoldCell, Image, Project, TaskRun
from clikit import ok_cli, run_cli

W, H, RADIUS = 64, 48, 4
# image name -> (PIL mode, cells as (x, y, label))
IMAGES: dict[str, tuple[str, list[tuple[float, float, str]]]] = {
    "well_a.png": ("L", [(12.5, 10.5, "alive"), (40.5, 20.5, "dead"), (20.5, 36.5, "alive")]),
    "well_b.png": ("RGB", [(50.5, 10.5, "dead"), (30.5, 30.5, "alive"), (10.5, 40.5, "alive")]),
    "well_c.tif": ("I;16", [(15.5, 15.5, "alive"), (45.5, 35.5, "dead"), (2.5, 2.5, "alive")]),  # border cell
    "well_d.png": ("RGBA", [(32.5, 8.5, "dead"), (8.5, 28.5, "dead"), (55.5, 40.5, "alive")]),
}
STUDENTS = ("s1", "s2", "s3")
TABLES = ("projects", "images", "annotators", "task_runs", "clicks", "gold_cells")


def _counts(settings) -> dict[str, int]:
    """Rows per table of the settings' store."""
    from sqlalchemy import text

    engine = make_engine(settings=settings)
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in TABLES}
    engine.dispose()
    return counts


def _disc_image(mode: str, cells: list[tuple[float, float, str]]) -> PILImage.Image:
    """Dark background with a bright disc of RADIUS px at every cell."""
    yy, xx = np.mgrid[0:H, 0:W]
    mask = np.zeros((H, W), bool)
    for x, y, _ in cells:
        mask |= (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= RADIUS**2
    if mode == "I;16":
        return PILImage.fromarray(np.where(mask, 60000, 500).astype(np.uint16))
    gray = PILImage.fromarray(np.where(mask, 250, 10).astype(np.uint8))
    return gray.convert(mode)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (mode, cells) in IMAGES.items():
        _disc_image(mode, cells).save(folder / name)
    return folder


def _clicks_csv(path: Path, rng: np.random.Generator, extra_rows: list[str] = ()) -> Path:
    """Every student clicks every cell with 1 px jitter; s3 misses one cell of well_d; a zero-click run."""
    rows = ["image,annotator,task_run,x,y,label"]
    for name, (_, cells) in IMAGES.items():
        for s in STUDENTS:
            for i, (x, y, label) in enumerate(cells):
                if (name, s, i) == ("well_d.png", "s3", 2):
                    continue
                dx, dy = rng.uniform(-1, 1, 2)
                rows.append(f"{name},{s},{s}-{name},{x + dx:.2f},{max(y + dy, 0):.2f},{label}")
    rows.append("well_a.png,s4,s4-empty,,,")  # s4 saw well_a and clicked nothing
    path.write_text("\n".join([*rows, *extra_rows]) + "\n")
    return path


def _nearest_truth(cells: pd.DataFrame) -> list[tuple[str, float, str]]:
    """(image, distance to the nearest true cell, its true label) for every consensus cell."""
    out = []
    for r in cells.itertuples(index=False):
        truth = IMAGES[r.image][1]
        d = [np.hypot(r.x - x, r.y - y) for x, y, _ in truth]
        out.append((r.image, min(d), truth[int(np.argmin(d))][2]))
    return out


def test_main_chain_init_import_aggregate_export(settings, images_dir: Path, tmp_path: Path) -> None:
    init = ok_cli("init")
    assert "revision" in init.stdout and settings.home.is_dir()

    imported = ok_cli("import", "images", str(images_dir), "--project", "lab")
    assert "4 image(s) imported" in imported.stdout

    rng = np.random.default_rng(0)
    good = _clicks_csv(tmp_path / "clicks.csv", rng)
    n_clicks = 3 * 12 - 1
    first = ok_cli("import", "clicks", str(good), "--project", "lab")
    assert f"{n_clicks} clicks: {n_clicks} imported, 0 rejected" in first.stdout
    assert "runs: 13 imported" in first.stdout  # 4 images x 3 students + the zero-click run
    before = _counts(settings)
    again = ok_cli("import", "clicks", str(good), "--project", "lab")
    assert f"0 imported, 0 rejected, {n_clicks} already present" in again.stdout
    assert _counts(settings) == before

    gold = tmp_path / "gold.csv"
    rows = [f"well_a.png,{x},{y},{label}" for x, y, label in IMAGES["well_a.png"][1]]
    gold.write_text("\n".join(["image,x,y,label", *rows]) + "\n")
    ok_cli("import", "gold", str(gold), "--project", "lab")

    agg = ok_cli("aggregate", "--project", "lab")
    assert "12 cells (3 gold) on 4 images" in agg.stdout, agg.stdout

    out = tmp_path / "dataset"
    exported = ok_cli("export", str(out), "--project", "lab", "--crop-size", "16", "--split", "0.5,0.25,0.25")
    assert "clicks: 35 in 13 task runs (1 of them without clicks)" in exported.stdout
    assert verify_export(out) == []

    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    cells = pd.read_csv(out / "cells.csv")
    index = pd.read_csv(out / "crops" / "index.csv")
    images = pd.read_csv(out / "images.csv")
    clicks = pd.read_csv(out / "clicks.csv")
    # every true cell found once, with its true label, near its true position
    assert len(cells) == counts["cells_exported"] == 12
    assert all(d < 2.0 and label == truth for (_, d, truth), label in zip(_nearest_truth(cells), cells["label"]))
    assert (images.set_index("image")[["n_alive", "n_dead"]].sum().tolist()
            == [int((cells["label"] == "alive").sum()), int((cells["label"] == "dead").sum())])
    # crops: one per cell, centred on the bright disc, border cell kept; splits disjoint by image
    assert len(index) == counts["crops"] == 12 == len(list((out / "crops").rglob("*.png")))
    for row in index.itertuples(index=False):
        crop = np.asarray(PILImage.open(out / "crops" / row.crop_path).convert("L"))
        assert crop.shape == (16, 16) and crop[8, 8] > 200, row.crop_path
    assert index.groupby("image")["split"].nunique().max() == 1
    assert set(images["split"]) <= {"train", "val", "test"} and images["split"].notna().all()
    assert len(clicks) == counts["clicks"] == n_clicks
    assert counts["task_runs"] == 13 and counts["task_runs_with_clicks"] == 12
    coco = json.loads((out / "coco_keypoints.json").read_text())
    assert len(coco["annotations"]) == 12 and len(coco["images"]) == 4
    assert manifest["snapshot"]["created_at"].endswith("+00:00")


def test_bad_inputs_change_nothing_already_stored(settings, images_dir: Path, tmp_path: Path) -> None:
    ok_cli("import", "images", str(images_dir), "--project", "lab")
    clicks = _clicks_csv(tmp_path / "clicks.csv", np.random.default_rng(1))
    ok_cli("import", "clicks", str(clicks), "--project", "lab")
    before = _counts(settings)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not an image\n")
    (bad / "cut.png").write_bytes((images_dir / "well_a.png").read_bytes()[:60])
    result = run_cli("import", "images", str(bad / "notes.png"), str(bad / "cut.png"), "--project", "lab")
    assert result.exit_code == 1
    assert f"error: {bad / 'notes.png'}: not a PNG, JPEG or TIFF image" in result.stderr
    assert f"error: {bad / 'cut.png'}:" in result.stderr
    assert _counts(settings) == before

    cases = {  # CSV body -> (line, field) named in the error
        "well_a.png,s9,r9,nan,5,alive": (2, "x"),
        "well_a.png,s9,r9,100,5,alive": (2, "x"),
        "well_a.png,s9,r9,5,5,zombie": (2, "label"),
    }
    for body, (line, field) in cases.items():
        path = tmp_path / "one_bad.csv"
        path.write_text("image,annotator,task_run,x,y,label\n" + body + "\nwell_b.png,s9,r8,5,5,dead\n")
        result = run_cli("import", "clicks", str(path), "--project", "lab")
        assert result.exit_code == 1 and f"{path}:{line}: {field}:" in result.stderr, result.output
        assert "nothing was imported" in result.stderr
        assert _counts(settings) == before

    missing = tmp_path / "missing.csv"
    missing.write_text("image,annotator,x,label\nwell_a.png,s9,5,alive\n")
    result = run_cli("import", "clicks", str(missing), "--project", "lab")
    assert result.exit_code == 1 and f"{missing}:1: y: missing column" in result.stderr, result.output
    assert _counts(settings) == before

    skipped = tmp_path / "mixed.csv"
    skipped.write_text("image,annotator,x,y,label\nwell_a.png,s9,5,5,alive\nwell_a.png,s9,5,99,alive\n")
    lenient = ok_cli("import", "clicks", str(skipped), "--project", "lab", "--skip-invalid")
    rejects = Path(lenient.stdout.split("rejects: ")[1].strip())
    assert rejects.parent == settings.rejects_dir and rejects.is_file()
    table = pd.read_csv(rejects)
    assert table[["line", "field"]].values.tolist() == [[3, "y"]]
    assert table["file"].tolist() == [str(skipped.resolve())]
    assert _counts(settings)["clicks"] == before["clicks"] + 1


@pytest.mark.parametrize("name, why", [
    ("", "must be a non-empty string"), ("   ", "must be a non-empty string"),
    ("lab ", "must not start or end with spaces; got 'lab ' (did you mean 'lab'?)"),
    ("la\tb", "must not hold tabs, line breaks or other control characters; got 'la\\tb'"),
    ("new\nline", "must not hold tabs, line breaks or other control characters"),
    ("a\u2028b", "must not hold tabs, line breaks or other control characters"),
])
@pytest.mark.parametrize("command", [("import", "images"), ("import", "clicks"), ("export",), ("queue",)])
def test_a_blank_or_padded_project_name_is_a_usage_error(settings, images_dir: Path, tmp_path: Path,
                                                        name: str, why: str, command: tuple[str, ...]) -> None:
    ok_cli("import", "images", str(images_dir), "--project", "lab")
    before = _counts(settings)
    target = {"images": images_dir, "clicks": _clicks_csv(tmp_path / "c.csv", np.random.default_rng(0))}
    args = [*command, *([str(target[command[1]])] if len(command) > 1 else []),
            *([str(tmp_path / "out")] if command == ("export",) else [])]
    result = run_cli(*args, "--project", name)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--project" in result.stderr and why in result.stderr
    assert _counts(settings) == before  # nothing went to the default project either
    assert not (tmp_path / "out").exists()


def test_the_library_refuses_a_padded_project_name(session) -> None:
    from cellspot.store.queries import get_or_create_project

    with pytest.raises(ValueError, match="must not start or end with spaces"):
        get_or_create_project(session, "lab ")
    with pytest.raises(ValueError, match="non-empty string"):
        get_or_create_project(session, " ")
    assert get_or_create_project(session, "lab").name == "lab"


def test_a_project_named_like_another_but_for_case_is_refused(settings, images_dir: Path, tmp_path: Path) -> None:
    """``--project CS`` where ``cs`` exists created a second project (a typo, most likely)."""
    ok_cli("import", "images", str(images_dir), "--project", "cs")
    before = _counts(settings)
    result = run_cli("import", "clicks", str(_clicks_csv(tmp_path / "c.csv", np.random.default_rng(0))),
                     "--project", "CS")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "no project named 'CS', but there is 'cs' (the names differ only in case)" in result.stderr
    assert _counts(settings) == before


def test_clicks_before_images_then_pixels_attach(settings, images_dir: Path, tmp_path: Path) -> None:
    """Tidy clicks may come first: their image records are a lower bound the real file fills."""
    first = tmp_path / "first.csv"
    first.write_text("image,annotator,x,y,label\nwell_b.png,s1,20,10,alive\n")
    second = tmp_path / "second.csv"
    second.write_text("image,annotator,x,y,label\nwell_b.png,s2,50.5,30,dead\n")
    ok_cli("import", "clicks", str(first), "--project", "lab")
    ok_cli("import", "clicks", str(second), "--project", "lab")  # enlarges the record, no reject
    result = ok_cli("import", "images", str(images_dir / "well_b.png"), "--project", "lab")
    assert "1 attached to existing records" in result.stdout

    engine = make_engine(settings=settings)
    with session_factory(engine)() as session:
        image = session.scalars(select(Image).where(Image.name == "well_b.png")).one()
        assert (image.width, image.height, image.has_pixels, image.meta) == (W, H, True, {})
        assert session.scalar(select(func.count()).select_from(Click)) == 2
    engine.dispose()


def test_smaller_file_does_not_attach_to_clicks_beyond_it(settings, tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("image,annotator,x,y,label\nwell_b.png,s1,100,90,alive\n")
    ok_cli("import", "clicks", str(path), "--project", "lab")
    small = tmp_path / "small"
    small.mkdir()
    _disc_image("RGB", []).save(small / "well_b.png")
    result = run_cli("import", "images", str(small / "well_b.png"), "--project", "lab")
    assert result.exit_code == 1 and "its clicks reach 101x91" in result.stderr


def test_same_click_file_in_two_projects(settings, tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("image,annotator,x,y,label\nwell_a.png,s1,5,5,alive\nwell_a.png,s2,6,5,alive\n")
    for project in ("one", "two"):
        result = ok_cli("import", "clicks", str(path), "--project", project)
        assert "2 imported" in result.stdout
    engine = make_engine(settings=settings)
    with session_factory(engine)() as session:
        per_project = dict(session.execute(
            select(Project.name, func.count(TaskRun.id))
            .join(Image, Image.project_id == Project.id).join(TaskRun, TaskRun.image_id == Image.id)
            .group_by(Project.name)
        ).tuples().all())
    engine.dispose()
    assert per_project == {"one": 2, "two": 2}


def test_demo_then_export(settings, tmp_path: Path) -> None:
    demo = ok_cli("demo", "--images", "3", "--students", "3")
    assert "demo project 'demo'" in demo.stdout and "3 generated" in demo.stdout
    cells_line = _between(demo.stdout, "cells:", "(snapshot")  # " 20 alive, 9 dead "
    n_alive, n_dead = (int(v) for v in cells_line.replace("alive,", "").replace("dead", "").split())
    out = tmp_path / "demo_export"
    exported = ok_cli("export", str(out), "--crop-size", "32", "--min-confidence", "0")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["cells_alive"], counts["cells_dead"]) == (n_alive, n_dead)
    assert counts["crops"] == n_alive + n_dead == len(pd.read_csv(out / "crops" / "index.csv"))
    assert counts["images"] == 3 and counts["images_without_pixels"] == 0
    assert verify_export(out) == [] and "manifest:" in exported.stdout

    engine = make_engine(settings=settings)
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count()).select_from(ConsensusSnapshot)) == 1
        assert session.scalar(select(func.count()).select_from(GoldCell)) > 0
    engine.dispose()
    again = run_cli("export", str(out))
    assert again.exit_code == 1 and "not empty" in again.stderr


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


@pytest.mark.parametrize(("command", "option", "names"), [
    (["consensus"], "--method", "methods"), (["aggregate"], "--method", "methods"), (["demo"], "--profile", "profiles"),
])
def test_help_lists_every_choice_the_code_has(command, option, names) -> None:
    """The help named no method or profile; this keeps the written list in step with the registries."""
    from cellspot.consensus.registry import DEFAULT_METHOD, METHODS
    from cellspot.simulate import PROFILES

    text = " ".join(ok_cli(*command, "--help").output.split())
    line = text[text.index(option):]
    expected = sorted(METHODS) if names == "methods" else list(PROFILES)
    assert all(name in line[:200] for name in expected), line[:200]
    if names == "methods":
        assert f"{DEFAULT_METHOD} (the default)" in line


def test_every_option_has_help() -> None:
    """``train --preset``, ``models list --kind`` and ``models resume --device`` had none."""
    import click

    from cellspot.cli import main

    def walk(command, path):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, command

    missing = [f"{' '.join(path)} {param.opts[0]}" for path, command in walk(main, [])
               for param in command.params if isinstance(param, click.Option) and not param.help]
    assert not missing, missing

"""``cellspot train``, ``cellspot worker`` and ``cellspot models ...`` with click's CliRunner.

Most tests use the fake trainer (tests/fake_trainer.py); the last one trains the real
classifier for one epoch on a tiny synthetic folder (skipped while the model modules are missing).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cellspot.ml.common import METRICS_FILE, RESUME_FILE
from fake_trainer import FakeFit, install, load_run, request_cancel, seed_project
from clikit import run_cli


def _run(*args: str) -> tuple[int, str]:
    result = run_cli(*args)
    return result.exit_code, result.output


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny annotated folder: 6 RGB images 64x64 with bright (alive) and dark (dead) discs."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,x,y,label"]
    yy, xx = np.mgrid[:64, :64]
    rng = np.random.default_rng(0)
    for i in range(6):
        pixels = rng.integers(90, 110, (64, 64, 3)).astype(np.uint8)
        for x, y, label in [(16, 16, "alive"), (48, 40, "dead" if i % 2 else "alive"), (20, 48, "dead")]:
            disc = (xx - x) ** 2 + (yy - y) ** 2 <= 36
            pixels[disc] = 230 if label == "alive" else 20
            rows.append(f"img{i}.png,{x},{y},{label}")
        Image.fromarray(pixels).save(images / f"img{i}.png")
    csv = tmp_path / "annotations.csv"
    csv.write_text("\n".join(rows) + "\n")
    return images, csv


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--project", "demo", "--images", "{images}", "--annotations", "{csv}"], "either --project or --images"),
        (["--images", "{images}"], "--images and --annotations go together"),
        (["--annotations", "{csv}"], "--images and --annotations go together"),
        (["--masks", "{images}"], "--masks needs --images"),
        (["--images", "{images}", "--annotations", "{csv}", "--source", "expert"], "--source"),
        (["--preset", "huge"], "'huge' is not one of 'cpu-fast', 'quality'"),
        (["--epochs", "0"], "0 is not in the range x>=1"),
    ],
)
def test_bad_option_combinations_are_usage_errors(settings, folder, extra, message) -> None:
    images, csv = folder
    code, out = _run("train", "classifier", *[e.format(images=images, csv=csv) for e in extra])
    assert code == 2 and message in out


@pytest.mark.parametrize(
    ("kind", "extra", "message"),
    [
        ("detector", ["--set", "polarity=flip"], "polarity must be one of"),
        ("detector", ["--set", "colour=red"], "unknown config fields ['colour']; allowed:"),
        ("classifier", ["--set", "input_scale"], "expected FIELD=VALUE, got 'input_scale'"),
        ("classifier", ["--set", "input_scale=9"], "input_scale must be within [0.25, 4]"),
        ("detector", ["--set", "tta=true", "--resume"], "a resumed run keeps the config it started with"),
    ],
)
def test_bad_config_overrides_are_usage_errors(settings, kind, extra, message) -> None:
    code, out = _run("train", kind, *extra)
    assert code == 2 and message in " ".join(out.split()), out


def test_config_overrides_reach_the_stored_run_and_the_fit(settings, monkeypatch) -> None:
    fit = install(monkeypatch)
    seed_project(settings)
    code, out = _run("train", "classifier", "--set", "lr=0.5", "--set", "steps=2", "--epochs", "2")
    assert code == 0, out
    stored = load_run(settings, 1).config
    assert {k: stored[k] for k in ("lr", "steps", "epochs", "preset")} == {"lr": 0.5, "steps": 2, "epochs": 2,
                                                                         "preset": "cpu-fast"}
    assert (fit.calls[0]["config"].lr, fit.calls[0]["config"].steps) == (0.5, 2)


def test_unknown_project_and_missing_snapshot_are_clear_errors(settings, monkeypatch) -> None:
    install(monkeypatch)
    seed_project(settings)
    code, out = _run("train", "classifier", "--project", "nope")
    assert code == 1 and "no project named 'nope'; existing projects: 'demo'" in out
    code, out = _run("train", "classifier", "--resume")
    assert code == 1 and "nothing to resume" in out


def test_foreground_training_registers_runs_and_models_commands(settings, monkeypatch) -> None:
    fit = install(monkeypatch)
    seed_project(settings)
    code, out = _run("train", "classifier", "--project", "demo", "--epochs", "2")
    assert code == 0, out
    assert "classifier-0001 done (active): accuracy 0.700" in out
    assert (settings.home / "models/classifier/classifier-0001" / METRICS_FILE).is_file()
    code, out = _run("train", "classifier", "--epochs", "4", "--preset", "quality")  # default project
    assert code == 0 and "classifier-0002 done:" in out and "(active)" not in out
    assert [c["start_epoch"] for c in fit.calls] == [1, 1]

    code, out = _run("models", "list")
    assert code == 0 and out.splitlines()[0].split()[:4] == ["version", "kind", "status", "preset"]
    assert "classifier-0002" in out and "quality" in out
    assert _run("models", "compare", "classifier-0001", "classifier-0002")[1].count("balanced_accuracy") == 1
    assert _run("models", "promote", "classifier-0002") == (
        0, "classifier-0002 is now the active classifier of project 'demo'\n")
    assert _run("models", "rollback", "classifier") == (0, "classifier-0001 is the active classifier again\n")
    code, out = _run("models", "rollback", "classifier")
    assert code == 1 and "no earlier promoted classifier" in out
    code, out = _run("models", "promote", "classifier-0042")
    assert code == 1 and "no model run 'classifier-0042'" in out


def test_folder_training_without_project_and_custom_out(settings, folder, tmp_path, monkeypatch) -> None:
    install(monkeypatch)
    images, csv = folder
    out_dir = tmp_path / "my_model"
    code, out = _run("train", "detector", "--images", images, "--annotations", csv, "--out", out_dir)
    assert code == 0, out
    assert out.strip().splitlines()[-1] == str(out_dir.resolve())
    run = load_run(settings, "detector-0001")
    assert run.project_id is None and run.path == str(out_dir.resolve())
    assert run.data_source == {"kind": "folder", "images": str(images.resolve()),
                               "annotations": str(csv.resolve()), "masks": None}
    assert (out_dir / METRICS_FILE).is_file()
    code, out = _run("models", "list", "--folder")
    assert code == 0 and "detector-0001" in out
    seed_project(settings)  # the default project, without runs
    code, out = _run("models", "list")
    assert code == 0 and "1 run(s) trained on folders: `cellspot models list --folder`" in out, out
    code, out = _run("models", "promote", "detector-0001")  # says it is not the project's active model
    assert code == 0 and "active detector of the runs trained on folders" in " ".join(out.split())
    assert f"--detector {out_dir.resolve()}" in " ".join(out.split())


def test_out_must_be_a_new_or_empty_folder(settings, folder, tmp_path, monkeypatch) -> None:
    """Training into another run's folder would replace its weights behind the registry's back."""
    install(monkeypatch)
    images, csv = folder
    out_dir = tmp_path / "model"
    assert _run("train", "detector", "--images", images, "--annotations", csv, "--out", out_dir)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    code, out = _run("train", "detector", "--images", images, "--annotations", csv, "--out", out_dir)
    assert code == 1 and "Traceback" not in out
    assert f"--out {out_dir} already holds another run's model; give a new or empty folder" in " ".join(out.split())
    assert {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()} == before
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv, "--out", images)
    assert code == 1 and f"--out {images} already holds files" in " ".join(out.split())
    under_a_file = csv / "model"  # a folder that cannot be made: refused in one line
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv, "--out", under_a_file)
    assert code == 1 and "Traceback" not in out
    assert f"--out {under_a_file}: the folder cannot be created (Not a directory)" in " ".join(out.split())
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv, "--out", "")
    assert code == 2 and "needs a folder; got an empty value" in out  # an unset shell variable: not "here"
    code, out = _run("models", "list", "--folder")
    assert code == 0 and "detector-0002" not in out and "classifier-0001" not in out, out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run("train", "classifier", "--images", images, "--annotations", csv, "--out", empty)[0] == 0


def test_a_bad_folder_is_one_clear_error_and_no_run(settings, folder, monkeypatch) -> None:
    install(monkeypatch)
    images, csv = folder
    csv.write_text("image,x,y,label\nimg0.png,16,16,alive\n\nimg0.png,16,16,zombie\n")
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv)
    assert code == 1 and "Traceback" not in out
    assert f"{csv}, line 4, column 'label': 'zombie' is not a label" in " ".join(out.split())
    (images / "img3.png").unlink()
    csv.write_text("image,x,y,label\nimg0.png,16,16,alive\nimg3.png,16,16,dead\n")
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv)
    assert code == 1 and "line 3, column 'image'" in out and "img3.png does not exist" in " ".join(out.split())
    (images / "img1.png").write_text("not a picture")
    csv.write_text("image,x,y,label\nimg0.png,16,16,alive\nimg1.png,16,16,dead\n")
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv)
    assert code == 1 and "line 3, column 'image'" in out
    assert "img1.png is not a PNG, JPEG or TIFF image" in " ".join(out.split())
    csv.write_text("image,x,y,label\n")
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv)
    assert code == 1 and "has a header but no annotation rows" in " ".join(out.split())
    code, out = _run("models", "list", "--folder")
    assert code == 0 and "classifier-0001" not in out, out


def test_cancelled_run_resumes_with_resume_flag(settings, monkeypatch) -> None:
    seed_project(settings)
    fit = install(monkeypatch, FakeFit(hook=lambda e, s: request_cancel(settings, 1) if (e, s) == (2, 1) else None))
    code, out = _run("train", "classifier", "--epochs", "3")
    assert code == 1 and "classifier-0001 cancelled; go on with `cellspot train classifier --resume`" in out
    assert (settings.home / "models/classifier/classifier-0001" / RESUME_FILE).is_file()
    fit.hook = None
    # another epoch count would not match the schedule in resume.pt: refused before anything changes
    code, out = _run("train", "classifier", "--resume", "--epochs", "4")
    assert code == 2 and "--epochs changes the config; a resumed run keeps the config it started with" in out
    assert load_run(settings, 1).status == "cancelled" and load_run(settings, 1).config["epochs"] == 3
    # so would another preset, even the default typed out (it cannot be told from the stored one)
    for preset in ("quality", "cpu-fast"):
        code, out = _run("train", "classifier", "--resume", "--preset", preset)
        assert code == 2 and "--preset changes the config; a resumed run keeps" in out, out
    assert load_run(settings, 1).status == "cancelled" and load_run(settings, 1).config["preset"] == "cpu-fast"
    code, out = _run("train", "classifier", "--resume")
    assert code == 0 and "classifier-0001 done (active)" in out
    assert [(c["start_epoch"], c["resume"]) for c in fit.calls] == [(1, False), (2, True)]
    assert [r["epoch"] for r in load_run(settings, 1).curves] == [1, 2, 3]


def test_ctrl_c_in_a_foreground_training_saves_a_checkpoint_to_resume_from(settings, monkeypatch) -> None:
    import os
    import signal

    seed_project(settings)
    fit = install(monkeypatch, FakeFit(hook=lambda e, s: os.kill(os.getpid(), signal.SIGINT) if (e, s) == (2, 1)
                                       else None))
    before = signal.getsignal(signal.SIGINT)
    code, out = _run("train", "classifier", "--epochs", "3")
    assert code == 1 and "classifier-0001 cancelled; go on with `cellspot train classifier --resume`" in out
    assert load_run(settings, 1).error == "interrupted (Ctrl-C); resume to go on"
    assert (settings.home / "models/classifier/classifier-0001" / RESUME_FILE).is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    fit.hook = None
    code, out = _run("train", "classifier", "--resume")
    assert code == 0 and "classifier-0001 done (active)" in out


def test_background_queues_a_job_and_models_cancel(settings, monkeypatch) -> None:
    from cellspot.jobs import get_huey

    fit = install(monkeypatch)
    seed_project(settings)
    code, out = _run("train", "detector", "--background")
    assert code == 0 and out.splitlines()[0] == "detector-0001"
    assert get_huey(settings).pending_count() == 1
    assert load_run(settings, "detector-0001").status == "queued" and fit.calls == []
    assert _run("models", "cancel", "detector-0001") == (0, "detector-0001: cancelled\n")
    code, out = _run("models", "cancel", "detector-0001")
    assert code == 1 and "already cancelled" in out
    get_huey(settings).flush()


def test_background_with_a_queue_that_does_not_answer_fails_the_run(settings, monkeypatch) -> None:
    fit = install(monkeypatch)
    seed_project(settings)
    monkeypatch.setenv("CELLSPOT_QUEUE_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    code, out = _run("train", "detector", "--background")
    assert code == 1 and "Traceback" not in out
    assert "the job queue redis://127.0.0.1:1/0 cannot take the job" in out
    assert "detector-0001 is marked failed: train without --background, or run this command again" in out
    run = load_run(settings, "detector-0001")
    assert run.status == "failed" and run.error.startswith("could not be queued: the job queue redis://")
    assert fit.calls == []


def test_a_worker_on_a_queue_that_does_not_answer_stops_with_one_line(settings, monkeypatch) -> None:
    monkeypatch.setenv("CELLSPOT_QUEUE_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    code, out = _run("worker")  # the consumer would log a traceback many times a second, forever
    assert code == 1 and "Traceback" not in out
    assert "Error: the job queue redis://127.0.0.1:1/0 does not answer" in out


def test_worker_shares_cpu_threads_between_workers(settings, monkeypatch) -> None:
    import os

    import cellspot.jobs

    calls = []
    monkeypatch.setattr(cellspot.jobs, "run_worker", lambda s, workers: calls.append((s.torch_threads, workers)))
    assert _run("worker", "--workers", "2")[0] == 0
    cpus = len(os.sched_getaffinity(0))
    assert calls == [(max(1, cpus // 2), 2)]
    monkeypatch.setenv("CELLSPOT_TORCH_THREADS", "1")
    assert _run("worker")[0] == 0 and calls[-1] == (1, 1)


def _real_models_missing() -> str | None:
    for module, name in [("cellspot.ml.classifier", "fit_classifier"), ("cellspot.ml.data", "load_folder")]:
        if importlib.util.find_spec(module) is None or not hasattr(importlib.import_module(module), name):
            return f"{module}.{name} is not there yet"
    return None


@pytest.mark.slow
def test_real_classifier_trains_one_epoch_through_the_cli(settings, folder, monkeypatch) -> None:
    reason = _real_models_missing()
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("CELLSPOT_TORCH_THREADS", "1")
    images, csv = folder
    code, out = _run("train", "classifier", "--images", images, "--annotations", csv, "--epochs", "1",
                     "--device", "cpu")
    assert code == 0, out
    run = load_run(settings, "classifier-0001")
    assert run.status == "done" and run.is_active and len(run.curves) >= 1
    assert run.data_snapshot_id.startswith("folder:") and "balanced_accuracy" in run.metrics
    folder_out = settings.home / "models/classifier/classifier-0001"
    assert (folder_out / "weights.pt").is_file() and (folder_out / "run.json").is_file()

"""The alive/dead crop classifier: model, metrics, calibration, fit / cancel / resume, checkpoints."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch

from cellspot.evaluation import classification_metrics
from cellspot.ml import classifier as classifier_module
from cellspot.ml.classifier import (
    ClassifierConfig,
    CropClassifier,
    WarmupCosine,
    balance_weights,
    build_model,
    config_for,
    crops_from_data,
    dihedral_views,
    fit_classifier,
    fit_temperature,
    load_classifier,
    predict_logits,
    soft_nll,
)
from cellspot.ml.common import (
    RESUME_FILE,
    Progress,
    TrainingCancelled,
    TrainingError,
    read_config,
    read_curves,
    read_metrics,
    save_checkpoint,
)
from cellspot.ml.data import AnnotatedImage, TrainingData

ENCODER = "mobilenetv3_small_050"
TINY = {"encoder": ENCODER, "crop_size": 16, "batch_size": 8, "epochs": 3, "patience": 10, "threads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _culture(seed: int, n_dead: int) -> AnnotatedImage:
    """A 48x48 image with 4 cells: alive cells are bright discs, dead ones dark discs."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(120, 10, (48, 48, 3))
    yy, xx = np.mgrid[:48, :48]
    rows = []
    for k, (x, y) in enumerate([(12, 12), (36, 12), (12, 36), (36, 36)]):
        dead = k < n_dead
        pixels[(xx - x) ** 2 + (yy - y) ** 2 <= 25] = 30 if dead else 230
        rows.append({"x": x + 0.5, "y": y + 0.5, "label": "dead" if dead else "alive",
                     "p_alive": 0.1 if dead else 0.9, "weight": 0.8, "diameter": 10.0})
    rows.append({"x": 24.0, "y": 24.0, "label": "unknown", "p_alive": np.nan, "weight": 0.0, "diameter": np.nan})
    return AnnotatedImage(f"im{seed}", np.clip(pixels, 0, 255).astype(np.uint8), pd.DataFrame(rows), "train")


def _data() -> TrainingData:
    images = [_culture(i, n_dead=1 + i % 3) for i in range(8)]
    for im, split in zip(images, ["train"] * 5 + ["val", "val", "test"]):
        im.split = split
    return TrainingData(images, {"kind": "synthetic", "snapshot_id": 7})


@pytest.mark.parametrize("input_scale", [1.0, 2.0])
def test_forward_and_backward(input_scale):
    model = CropClassifier(ENCODER, input_scale=input_scale)
    x = torch.rand(4, 3, 24, 24, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4,)
    logits.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = dihedral_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_tta_logits_do_not_change_when_the_crop_is_rotated_or_flipped():
    torch.manual_seed(0)
    model = CropClassifier(ENCODER).eval()
    crops = np.random.default_rng(0).integers(0, 255, (3, 24, 24, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.flip(np.rot90(crops, 1, axes=(1, 2)), axis=2))
    plain = predict_logits(model, crops, torch.device("cpu"))
    assert not np.allclose(plain, predict_logits(model, turned, torch.device("cpu")), atol=1e-4)
    tta = predict_logits(model, crops, torch.device("cpu"), tta=True)
    np.testing.assert_allclose(tta, predict_logits(model, turned, torch.device("cpu"), tta=True), atol=1e-5)
    views = dihedral_views(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        expected = torch.stack([model(v) for v in views]).mean(0).numpy()
    np.testing.assert_allclose(tta, expected, atol=1e-5)


def test_a_tiny_batch_overfits():
    torch.manual_seed(0)
    model = CropClassifier(ENCODER)
    x = torch.rand(8, 3, 16, 16)
    y = (torch.arange(8) % 2).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 2000)
    y = (rng.random(2000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    overconfident = 4.0 * true_logit
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(4.0, rel=0.15)
    assert soft_nll(overconfident, y, temperature=t) < 0.8 * soft_nll(overconfident, y)
    assert fit_temperature(np.empty(0), np.empty(0)) == 1.0


def test_crops_and_balance_weights():
    crops = crops_from_data([_culture(0, 1)], 16)
    assert crops.crops.shape == (4, 16, 16, 3) and crops.crops.dtype == np.uint8  # unlabelled cell left out
    assert crops.label.tolist() == [0, 1, 1, 1]
    np.testing.assert_allclose(crops.p_alive, [0.1, 0.9, 0.9, 0.9])
    assert crops.crops[0, 8, 8].max() < 60 and crops.crops[1, 8, 8].min() > 200  # centred on the cell
    np.testing.assert_allclose(balance_weights(crops.label), [2.0, 2 / 3, 2 / 3, 2 / 3])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: config_for("huge"), "allowed: cpu-fast, quality"),
        (lambda: config_for("cpu-fast", colour="red"), "unknown classifier option"),
        (lambda: ClassifierConfig(encoder="not-a-net"), "unknown encoder"),
        (lambda: ClassifierConfig(monitor="auc"), "allowed: balanced_accuracy, loss"),
        (lambda: ClassifierConfig(epochs=0), "epochs must be a positive integer"),
        (lambda: ClassifierConfig(input_scale=8.0), r"input_scale must be within \[0.25, 4\]"),
        (lambda: ClassifierConfig(ema=1.0), r"ema must be in \[0, 1\)"),
        (lambda: ClassifierConfig(label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_bad_configs_are_refused(call, message):
    with pytest.raises(TrainingError, match=message):
        call()


def test_presets():
    assert config_for().preset == "cpu-fast" and config_for("quality").input_scale == 2.0
    assert config_for("cpu-fast", epochs=4, lr=None).epochs == 4


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    cfg = config_for("cpu-fast", **TINY)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    crops = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    logits = predict_logits(model, crops, torch.device("cpu"), tta=cfg.tta)
    save_checkpoint(tmp_path / "classifier-0001", model.state_dict(),
                    {**asdict(cfg), "kind": "classifier", "temperature": 2.0}, {}, [])
    loaded = load_classifier(tmp_path / "classifier-0001")
    assert loaded.version == "classifier-0001" and loaded.config == cfg
    np.testing.assert_allclose(loaded.predict_crops(crops), 1 / (1 + np.exp(-logits / 2.0)), rtol=1e-6)
    pixels = np.zeros((20, 20, 3), np.uint8)
    assert loaded.predict_cells(pixels, np.array([[3.0, 4.0], [19.5, 0.0]])).shape == (2,)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\)"):
        loaded.predict_crops(crops[:, :8])
    save_checkpoint(tmp_path / "det", model.state_dict(), {"kind": "detector"}, {}, [])
    with pytest.raises(TrainingError, match="not a classifier"):
        load_classifier(tmp_path / "det")
    save_checkpoint(tmp_path / "blank", model.state_dict(), {}, {}, [])
    with pytest.raises(TrainingError, match="names no model kind .* not a cellspot model folder"):
        load_classifier(tmp_path / "blank")
    partial = dict(list(model.state_dict().items())[1:])  # one tensor missing
    save_checkpoint(tmp_path / "cut", partial, {**asdict(cfg), "kind": "classifier"}, {}, [])
    with pytest.raises(TrainingError, match="do not fit the network in its config.json"):
        load_classifier(tmp_path / "cut")


def test_fit_writes_a_checkpoint_and_reports_progress(tmp_path):
    events: list[Progress] = []
    result = fit_classifier(_data(), config_for("cpu-fast", **TINY), tmp_path / "m", progress=events.append)
    config, metrics = read_config(tmp_path / "m"), read_metrics(tmp_path / "m")
    assert config["kind"] == "classifier" and config["crop_size"] == 16 and config["preset"] == "cpu-fast"
    assert config["data"]["snapshot_id"] == "synthetic:7" and config["temperature"] == metrics["temperature"] > 0
    assert {"torch", "segmentation_models_pytorch", "timm"} <= set(config["versions"])
    assert metrics["split"] == "test" and metrics["n"] == 4
    assert metrics["counts"]["train"] == {"alive": 11, "dead": 9}
    for key in ("accuracy", "balanced_accuracy", "f1", "f1_macro", "roc_auc", "ece", "brier", "confusion"):
        assert key in metrics
    assert len(read_curves(tmp_path / "m")) == result.epochs_run == 3 and not (tmp_path / "m" / RESUME_FILE).exists()
    # progress: every step and epoch, fraction never goes back, ends at 1
    phases = [e.phase for e in events]
    assert phases.count("train") == 3 * 3 and phases.count("epoch_end") == 3 and phases[-1] == "done"
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions[0] > 0
    assert all(e.train_loss is not None for e in events if e.phase == "train")
    assert all(e.val_loss is not None and "val_balanced_accuracy" in e.metrics for e in events if e.phase == "epoch_end")
    assert events[-2].eta_s is not None
    # the saved model reproduces the saved test metrics
    test = crops_from_data(_data().split("test"), 16)
    again = classification_metrics(test.label, load_classifier(tmp_path / "m").predict_crops(test.crops))
    assert again["brier"] == pytest.approx(metrics["brier"], abs=1e-6) and again["confusion"] == metrics["confusion"]


@pytest.mark.parametrize(("smoothing", "expected"), [(0.0, [0.1, 0.9]), (0.2, [0.18, 0.82])])
def test_label_smoothing_moves_the_training_targets_towards_one_half(tmp_path, monkeypatch, smoothing, expected):
    seen: list[np.ndarray] = []
    real_loss = classifier_module._loss

    def spy(logits, target, weight):
        seen.append(target.detach().cpu().numpy())
        return real_loss(logits, target, weight)

    monkeypatch.setattr(classifier_module, "_loss", spy)
    cfg = config_for("cpu-fast", **{**TINY, "epochs": 1}, label_smoothing=smoothing)
    fit_classifier(_data(), cfg, tmp_path / "m")
    targets = np.unique(np.round(np.concatenate(seen), 6))
    np.testing.assert_allclose(targets, expected, atol=1e-6)  # the consensus p_alive is 0.1 / 0.9
    assert read_config(tmp_path / "m")["label_smoothing"] == smoothing


def test_an_early_stop_ends_progress_at_the_last_epoch_run(tmp_path, monkeypatch):
    # only epoch 1 counts as an improvement: with patience 1 the run stops after epoch 2 of 6
    monkeypatch.setattr(classifier_module, "_improved", lambda cfg, row, state: row["epoch"] == 1)
    events: list[Progress] = []
    result = fit_classifier(_data(), config_for("cpu-fast", **{**TINY, "epochs": 6, "patience": 1}), tmp_path / "m",
                            progress=events.append)
    assert result.epochs_run == 2 and result.best_epoch == 1
    done = events[-1]
    assert done.phase == "done" and (done.epoch, done.epochs) == (2, 6) and done.fraction == 1.0
    assert done.message == "stopped early after epoch 2 of 6, kept epoch 1"
    assert [e.epoch for e in events if e.phase == "calibrate"] == [2]


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_cancel_writes_resume_and_resume_finishes_like_an_uninterrupted_run(tmp_path, ema):
    cfg = config_for("cpu-fast", **{**TINY, "ema": ema})
    calls = {"n": 0}

    def stop_at_fifth_step() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    with pytest.raises(TrainingCancelled):
        fit_classifier(_data(), cfg, tmp_path / "run", should_stop=stop_at_fifth_step)
    assert (tmp_path / "run" / RESUME_FILE).is_file() and not (tmp_path / "run" / "weights.pt").exists()
    events: list[Progress] = []
    resumed = fit_classifier(_data(), cfg, tmp_path / "run", resume=True, progress=events.append)
    assert not (tmp_path / "run" / RESUME_FILE).exists() and resumed.epochs_run == 3
    assert events[0].epoch == 2 and events[0].step == 2  # went on from the cancelled step
    straight = fit_classifier(_data(), cfg, tmp_path / "straight")
    crops = crops_from_data(_data().images, 16).crops
    np.testing.assert_allclose(load_classifier(tmp_path / "run").predict_crops(crops),
                               load_classifier(tmp_path / "straight").predict_crops(crops), atol=1e-5)
    assert [c["train_loss"] for c in resumed.curves] == pytest.approx([c["train_loss"] for c in straight.curves])
    other = config_for("cpu-fast", **{**TINY, "ema": ema, "lr": 0.01})
    with pytest.raises(TrainingCancelled):
        fit_classifier(_data(), other, tmp_path / "x", should_stop=lambda: True)
    with pytest.raises(TrainingError, match="another config"):
        fit_classifier(_data(), cfg, tmp_path / "x", resume=True)


def test_a_run_taken_over_after_its_last_step_writes_no_model_files(tmp_path):
    """A paused worker waking after its run was resumed elsewhere: ``should_stop`` (the store's
    ownership check) is asked once more before the files are written, and its exception stops
    the fit there; the new owner's folder is left alone."""
    class TakenOver(Exception):
        pass

    phases: list[str] = []

    def taken_over_after_training() -> bool:
        if "calibrate" in phases:
            raise TakenOver
        return False

    with pytest.raises(TakenOver):
        fit_classifier(_data(), config_for("cpu-fast", **TINY), tmp_path / "run",
                       progress=lambda e: phases.append(e.phase), should_stop=taken_over_after_training)
    assert not (tmp_path / "run" / "weights.pt").exists() and "done" not in phases


def test_training_needs_both_classes(tmp_path):
    data = _data()
    for im in data.images:
        im.cells = im.cells[im.cells["label"] != "dead"]
    with pytest.raises(TrainingError, match="alive and dead"):
        fit_classifier(data, config_for("cpu-fast", **TINY), tmp_path / "m")


@pytest.mark.parametrize("total", [1, 2, 5, 200])
def test_warmup_cosine_schedule_works_for_any_length(total):
    schedule = WarmupCosine(total)
    factors = [schedule(step) for step in range(total + 1)]
    assert max(factors) == pytest.approx(1.0) and all(0 < f <= 1 for f in factors)
    assert factors[-1] == pytest.approx(0.02) or total == 1


def test_one_short_epoch_trains(tmp_path):
    result = fit_classifier(_data(), config_for("cpu-fast", **{**TINY, "epochs": 1}), tmp_path / "m")
    assert result.epochs_run == 1 and (tmp_path / "m" / "weights.pt").is_file()

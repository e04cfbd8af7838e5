"""Detector: build, loss, overfitting, fit with progress, checkpoint round trip, cancel + resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellspot.ml.common import RESUME_FILE, Progress, TrainingCancelled, TrainingError
from cellspot.ml.data import AnnotatedImage, TrainingData
from cellspot.ml.detector import (
    MIN_INSTANCE_PROB_GRID, POSTPROCESS_KEYS, PRESETS, DetectorLoss, TileAugment, _Prepared, _sample_batch,
    build_model, config_for, default_postprocess, fit_detector, load_detector, resolve_centre, resolve_radius,
    resolve_shape, resolve_target,
)
from cellspot.ml.targets import render_targets

TINY = dict(encoder="tu-mobilenetv3_small_050", encoder_depth=3, decoder_channels=(16, 8, 8), tile=32, infer_tile=64, overlap=8,
            batch_size=2, epochs=2, steps_per_epoch=2, patience=5, max_minutes=None, threads=1, lr=3e-3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(name: str, split: str, seed: int, size: int = 48, with_mask: bool = False) -> AnnotatedImage:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(6, size - 6, (4, 2))
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.int32)
    for k, (x, y) in enumerate(xy, start=1):
        mask[np.hypot(xx - x, yy - y) <= 4] = k
    pixels = np.repeat((20 + 200 * (mask > 0))[..., None], 3, axis=2).astype(np.uint8)
    cells = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "label": "alive", "p_alive": 1.0, "weight": 1.0,
                          "diameter": 8.0})
    return AnnotatedImage(name, pixels, cells, split, mask if with_mask else None)


def _data(with_mask: bool = False) -> TrainingData:
    splits = ["train", "train", "train", "val", "test"]
    return TrainingData([_image(f"im{i}.png", s, i, with_mask=with_mask) for i, s in enumerate(splits)],
                        {"kind": "folder", "annotations_sha256": "abc123"})


def test_presets_build_and_run_forward_backward() -> None:
    for preset in PRESETS:
        config = config_for(preset)
        model = build_model(config)
        x = torch.randn(2, 3, config.divisor * 2, config.divisor * 2)
        out = model(x)
        assert out.shape == (2, 2, *x.shape[2:])
        loss = DetectorLoss(config.loss)(out, torch.rand_like(out))
        loss.backward()
        assert all(p.grad is not None for p in model.segmentation_head.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters() if p.ndim > 1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(arch="mask-rcnn"), "arch must be one of"),
        (dict(tile=100), "multiple of 16"),
        (dict(loss="mse"), "loss must be one of"),
        (dict(decoder_channels=(8, 8)), "decoder_channels"),
        (dict(colour="red"), "unknown detector config field"),
        (dict(centre="ring"), "centre must be"),
        (dict(seeds="blobs"), "seeds must be one of"),
        (dict(scale_jitter=0.5), "scale_jitter must be in"),
        (dict(invert=1.5), "probabilities"),
        (dict(gray=-0.1), "probabilities"),
        (dict(ema=1.0), "ema must be in"),
        (dict(polarity="flip"), "polarity must be one of"),
        (dict(keep="first"), "keep must be one of"),
        (dict(best_from=1.0), r"best_from must be in \[0, 1\)"),
        (dict(min_solidity=1.2), "min_solidity must be in"),
        (dict(max_eccentricity=0.0), "max_eccentricity must be in"),
        (dict(min_instance_prob=1.5), "min_instance_prob must be in"),
        (dict(encoder="nonexistent_net"), "unknown encoder 'nonexistent_net'; use a segmentation-models-pytorch"),
        (dict(decoder_channels=(0, 0, 0, 0)), "decoder_channels must be a list of whole numbers >= 1"),
        (dict(decoder_channels=(-1, 32, 16, 16)), "decoder_channels must be a list of whole numbers >= 1"),
        (dict(decoder_channels=(64.9, 32, 16, 16)), "decoder_channels must be a list of whole numbers >= 1"),
        (dict(decoder_channels=64), "decoder_channels must be a list of whole numbers >= 1"),
        (dict(decoder_channels="64 32"), "decoder_channels must be a list of whole numbers >= 1"),
        (dict(encoder="tu-nonexistent_net"), "unknown encoder 'tu-nonexistent_net'"),
    ],
)
def test_bad_configs_raise(overrides: dict, match: str) -> None:
    with pytest.raises(TrainingError, match=match):
        config_for("cpu-fast", **overrides)
    with pytest.raises(TrainingError, match="valid presets"):
        config_for("turbo")


@pytest.mark.parametrize("loss", ["dice_bce", "focal"])
def test_a_tiny_batch_overfits(loss: str) -> None:
    torch.manual_seed(0)
    model = build_model(config_for("cpu-fast", **{**TINY, "loss": loss}))
    ims = [_image("a", "train", seed, size=32) for seed in (3, 4)]
    x = torch.from_numpy(np.stack([((im.pixels / 255.0 - 0.5) / 0.3).transpose(2, 0, 1) for im in ims]).astype(np.float32))
    y = torch.from_numpy(np.stack([render_targets((32, 32), im.cells, 4.0, "disk") for im in ims]))
    loss_fn, opt = DetectorLoss(loss), torch.optim.Adam(model.parameters(), lr=1e-2)
    first = last = None
    for _ in range(40):
        value = loss_fn(model(x), y)
        opt.zero_grad()
        value.backward()
        opt.step()
        first = float(value.detach()) if first is None else first
        last = float(value.detach())
    assert last < 0.4 * first


def test_target_kind_auto_uses_masks_only_when_every_image_has_one() -> None:
    assert resolve_target(config_for(**TINY), _data(with_mask=True)) == "mask"
    assert resolve_target(config_for(**TINY), _data()) == "disk"
    with pytest.raises(TrainingError, match="needs an instance mask"):
        resolve_target(config_for(**{**TINY, "target": "mask"}), _data())


def test_centre_auto_is_the_distance_map_for_masks_and_a_gaussian_for_points() -> None:
    assert resolve_centre(config_for(**TINY), "mask") == "distance"
    assert resolve_centre(config_for(**TINY), "disk") == "gaussian"
    assert resolve_centre(config_for(**{**TINY, "centre": "gaussian"}), "mask") == "gaussian"


def test_the_estimated_radius_comes_from_train_and_val_never_from_test() -> None:
    data = _data(with_mask=True)  # 16 discs of radius 4 in train and val
    test = data.split("test")[0]
    yy, xx = np.mgrid[:200, :200]
    test.mask = np.zeros((200, 200), np.int32)  # 25 discs of radius 9: more than the others, a leak would show
    for k, (y, x) in enumerate([(y, x) for y in range(20, 200, 40) for x in range(20, 200, 40)], start=1):
        test.mask[np.hypot(xx - x, yy - y) <= 9] = k
    assert resolve_radius(config_for(), data) == pytest.approx(4.0, abs=0.6)
    assert resolve_radius(config_for(radius=7.5), data) == 7.5
    only_test = TrainingData([test], data.source)  # nothing else to estimate from: the test image is used
    assert resolve_radius(config_for(), only_test) > 6.0


def _prepared(size: int = 40) -> _Prepared:
    """A ramp image (so a negation or a zoom shows) with a target of one disc in the middle."""
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    image = np.stack([np.broadcast_to(ramp, (size, size)), np.broadcast_to(ramp[:, None], (size, size)),
                      np.zeros((size, size), np.float32)])
    yy, xx = np.mgrid[:size, :size]
    disc = (np.hypot(xx - size / 2, yy - size / 2) <= size / 8).astype(np.float32)
    return _Prepared(np.ascontiguousarray(image), np.stack([disc, disc]))


@pytest.mark.parametrize("augment", [TileAugment(), TileAugment(scale_jitter=2.0), TileAugment(1.5, 1.0, 1.0)])
def test_sampled_tiles_have_the_tile_shape_and_targets_in_range(augment: TileAugment) -> None:
    x, y = _sample_batch([_prepared()], 32, 6, np.random.default_rng(0), augment)
    assert x.shape == (6, 3, 32, 32) and y.shape == (6, 2, 32, 32)
    assert x.dtype == torch.float32 and float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_scale_jitter_changes_the_cell_area_and_invert_gray_act_on_the_image() -> None:
    base = _prepared(64)
    plain = [_sample_batch([base], 64, 1, np.random.default_rng(s))[1][0, 0].sum().item() for s in range(8)]
    zoomed = [_sample_batch([base], 64, 1, np.random.default_rng(s), TileAugment(scale_jitter=2.0))[1][0, 0].sum()
              .item() for s in range(8)]
    assert np.ptp(plain) < 1.0  # flips and rotations keep the disc's area
    assert np.ptp(zoomed) > 0.3 * np.mean(plain)
    gray = _sample_batch([base], 64, 4, np.random.default_rng(1), TileAugment(gray=1.0))[0]
    # channel 2 was all zeros: grey, it follows the others (up to the per-channel noise)
    assert min(np.corrcoef(t[0].ravel(), t[2].ravel())[0, 1] for t in gray.numpy()) > 0.8
    for seed in range(4):  # the same window and turn; the inverted ramp runs the other way
        plain_x = _sample_batch([base], 64, 1, np.random.default_rng(seed))[0][0, 0].numpy()
        inverted = _sample_batch([base], 64, 1, np.random.default_rng(seed), TileAugment(invert=1.0))[0][0, 0].numpy()
        assert np.corrcoef(plain_x.ravel(), inverted.ravel())[0, 1] < -0.9


def test_shape_prior_comes_from_the_training_masks_unless_set_and_is_off_for_points() -> None:
    masks, points = _data(with_mask=True), _data()
    train = masks.split("train")
    estimated = resolve_shape(config_for(**TINY), train)
    # the training masks hold round discs: a high solidity bound, a low eccentricity one
    assert 0.8 < estimated["min_solidity"] <= 1.0 and 0.0 <= estimated["max_eccentricity"] < 0.5
    assert resolve_shape(config_for(**TINY), points.split("train")) == {"min_solidity": 0.0, "max_eccentricity": 1.0}
    fixed = resolve_shape(config_for(**{**TINY, "min_solidity": 0.5}), train)
    assert fixed == {"min_solidity": 0.5, "max_eccentricity": estimated["max_eccentricity"]}
    off = default_postprocess(config_for(**TINY), 4.0)  # an unresolved prior post-processes without it
    assert off["min_solidity"] == 0.0 and off["max_eccentricity"] == 1.0


def test_without_val_or_test_images_the_metrics_say_they_are_on_the_training_images(tmp_path: Path) -> None:
    data = TrainingData([_image(f"im{i}.png", "train", i) for i in range(3)], {"kind": "folder"})
    result = fit_detector(data, config_for(**TINY), tmp_path / "det")
    assert result.metrics["split"] == "train"
    assert json.loads((tmp_path / "det" / "metrics.json").read_text())["split"] == "train"


def test_fit_reports_progress_and_the_checkpoint_round_trips(tmp_path: Path) -> None:
    events: list[Progress] = []
    data = _data(with_mask=True)
    result = fit_detector(data, config_for(**TINY), tmp_path / "det-1", progress=events.append)
    phases = [e.phase for e in events]
    assert phases.count("train") == 4 and phases.count("epoch_end") == 2 and phases[-1] == "done"
    train = [e for e in events if e.phase == "train"]
    assert all(e.train_loss is not None for e in train)
    # no ETA from the first step (start-up costs), one once 3 more steps have set the pace
    assert train[0].eta_s is None and train[-1].eta_s is not None
    done = events[-1]  # a finished run reads 100 % with no time left (it read step 0 and an ETA)
    assert (done.step, done.steps, done.eta_s, done.fraction) == (done.steps, 2, 0.0, 1.0)
    assert "val_instance_f1" in events[phases.index("epoch_end")].metrics  # as the final curves name it
    assert {"f1", "instance_f1", "val_f1", "split"} <= set(result.metrics) and result.metrics["split"] == "test"
    config = json.loads((tmp_path / "det-1" / "config.json").read_text())
    assert config["kind"] == "detector" and config["target_kind"] == "mask" and config["centre_kind"] == "distance"
    assert config["channels"] == ["foreground", "centre"] and config["data_snapshot_id"] == "folder:abc123"
    assert config["radius"] == pytest.approx(4.0, abs=0.5)
    assert set(config["postprocess"]) == set(POSTPROCESS_KEYS) == {
        "threshold", "min_distance", "peak_threshold", "min_area", "border_margin", "seeds", "min_solidity",
        "max_eccentricity", "min_instance_prob"}
    assert config["postprocess"]["min_instance_prob"] in MIN_INSTANCE_PROB_GRID  # tuned on val: the data have masks
    assert config["postprocess"]["min_solidity"] > 0.8  # the shape prior of the training discs
    assert not (tmp_path / "det-1" / RESUME_FILE).exists()

    loaded = load_detector(tmp_path / "det-1")
    assert loaded.version == "det-1" and loaded.radius == config["radius"]
    pixels = data.images[4].pixels
    expected = loaded.predict(pixels)
    assert expected.shape == (2, 48, 48)
    again = load_detector(tmp_path / "det-1")
    np.testing.assert_allclose(again.predict(pixels), expected, atol=1e-6)
    det = loaded.detect(pixels)
    assert det.labels.shape == (48, 48) and det.xy.shape[1] == 2 and len(det.scores) == len(det.xy)


@pytest.mark.parametrize("keep, best_from, epochs_run, kept_epoch, stopped_early", [
    ("best", 0.0, 2, 1, True),  # every epoch counts: epoch 1 is kept, epoch 2 is the patience
    ("best", 0.5, 3, 2, True),  # epoch 1 (25 % of the run) is only validated: epoch 2 is the first that counts
    ("last", 0.0, 4, 4, False),
])
def test_keep_best_stops_early_on_a_flat_val_metric_and_keep_last_runs_the_schedule(
        tmp_path: Path, keep: str, best_from: float, epochs_run: int, kept_epoch: int, stopped_early: bool) -> None:
    # a learning rate too small to change anything: the val metric stays where epoch 1 left it
    config = config_for(**{**TINY, "epochs": 4, "patience": 1, "lr": 1e-12, "keep": keep, "best_from": best_from})
    events: list[Progress] = []
    result = fit_detector(_data(with_mask=True), config, tmp_path / keep, progress=events.append)
    assert result.metrics["epochs_run"] == epochs_run and result.metrics["kept_epoch"] == kept_epoch
    assert result.metrics["stopped_early"] is stopped_early
    assert result.metrics["best_epoch"] == (kept_epoch if keep == "best" else 1)
    done = events[-1]  # the last progress event says how the run ended, and the bar is full
    assert done.phase == "done" and done.epoch == epochs_run and done.fraction == 1.0
    how = f"stopped early after epoch {epochs_run} of 4" if stopped_early else "ran 4 of 4 epochs"
    assert done.message.endswith(f"{how}, kept epoch {kept_epoch}")


def test_cancel_saves_resume_and_resume_continues(tmp_path: Path) -> None:
    data, config = _data(), config_for(**TINY)
    polls = iter([False, False, False, True])
    with pytest.raises(TrainingCancelled):
        fit_detector(data, config, tmp_path / "m", should_stop=lambda: next(polls, False))
    assert (tmp_path / "m" / RESUME_FILE).is_file() and not (tmp_path / "m" / "weights.pt").exists()
    events: list[Progress] = []
    result = fit_detector(data, config, tmp_path / "m", resume=True, progress=events.append)
    steps = [(e.epoch, e.step) for e in events if e.phase == "train"]
    assert steps == [(2, 2)]  # epoch 1 and the first step of epoch 2 were done before the cancel
    assert [row["epoch"] for row in result.curves] == [1, 2]
    assert (tmp_path / "m" / "weights.pt").is_file() and not (tmp_path / "m" / RESUME_FILE).exists()
    with pytest.raises(TrainingError, match="different config"):
        polls = iter([True])
        with pytest.raises(TrainingCancelled):
            fit_detector(data, config, tmp_path / "n", should_stop=lambda: next(polls, False))
        fit_detector(data, config_for(**{**TINY, "lr": 1e-4}), tmp_path / "n", resume=True)


def test_load_rejects_other_kinds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"kind": "classifier"}))
    with pytest.raises(TrainingError, match="not a detector"):
        load_detector(tmp_path)

"""MC-dropout samples of the classifier for BALD: shapes, randomness, seeding, the dropout layer,
old checkpoints, and the BALD scores made from the samples."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image as PILImage

from cellspot.active.strategies import mutual_information, score_images
from cellspot.ml.classifier import CropClassifier, LoadedClassifier, build_model, config_for, load_classifier
from cellspot.ml.common import save_checkpoint
from cellspot.ml.predict import PredictionError, mc_samples_for_images

ENCODER = "mobilenetv3_small_050"
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _classifier(dropout: float, temperature: float = 1.5) -> LoadedClassifier:
    torch.manual_seed(0)
    cfg = config_for("cpu-fast", encoder=ENCODER, crop_size=SIZE, dropout=dropout)
    model = build_model(cfg).eval()
    return LoadedClassifier(cfg, "classifier-mc", model, temperature, torch.device("cpu"))


def _crops(n: int = 6) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize(("dropout", "samples"), [(0.5, 8), (0.5, 1), (0.0, 5), (0.1, 3)])
def test_shape_range_and_mean_sample(dropout, samples) -> None:
    clf = _classifier(dropout)
    p = clf.predict_crops_mc(_crops(), samples=samples, seed=3)
    assert p.shape == (6, samples) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    if dropout == 0.0:  # no dropout: every sample is the deterministic prediction
        assert np.allclose(p, clf.predict_crops(_crops())[:, None], atol=1e-6)


def test_samples_vary_with_dropout_and_repeat_with_the_seed() -> None:
    clf = _classifier(0.5)
    crops = _crops()
    rng_before = torch.get_rng_state()
    a = clf.predict_crops_mc(crops, samples=10, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert not clf.model.training and not clf.model.dropout.training  # the model stays in eval mode
    assert np.all(a.std(axis=1) > 0)  # every cell's samples differ
    assert np.array_equal(a, clf.predict_crops_mc(crops, samples=10, seed=7))
    assert not np.array_equal(a, clf.predict_crops_mc(crops, samples=10, seed=8))
    assert clf.predict_crops_mc(crops, samples=10, seed=7, batch_size=4).shape == a.shape


@pytest.mark.parametrize(("dropout", "positive"), [(0.5, True), (0.0, False)])
def test_bald_from_the_samples(dropout, positive) -> None:
    clf = _classifier(dropout)
    samples = clf.predict_crops_mc(_crops(), samples=16, seed=0)
    mi = mutual_information(samples)
    assert mi.shape == (6,) and np.all(mi >= 0)
    assert np.all(mi > 0) if positive else np.allclose(mi, 0.0, atol=1e-6)
    ranked = score_images("bald", pd.DataFrame({"image": ["a", "b"]}),
                          mc_samples={"a": samples[:3], "b": samples[3:]})
    assert (ranked["score"] >= 0).all() and ranked["mc_samples"].tolist() == [16, 16]


def test_cells_and_bad_input() -> None:
    clf = _classifier(0.5)
    pixels = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert clf.predict_cells_mc(pixels, [[5.0, 5.0], [49.0, 0.0], [25.0, 20.0]], samples=4).shape == (3, 4)
    assert clf.predict_cells_mc(pixels, np.empty((0, 2)), samples=4).shape == (0, 4)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        clf.predict_crops_mc(_crops(), samples=0)
    with pytest.raises(ValueError, match="expected crops of shape"):
        clf.predict_crops_mc(np.zeros((2, SIZE + 1, SIZE, 3), np.uint8))


@pytest.mark.parametrize("encoder", [ENCODER, "resnet10t"])
def test_dropout_layer_keeps_timm_outputs_and_keys(encoder) -> None:
    """The separate dropout layer computes what timm's ``drop_rate`` did, with the same keys."""
    import timm

    torch.manual_seed(0)
    ours = CropClassifier(encoder, dropout=0.3).eval()
    old = timm.create_model(encoder, pretrained=False, num_classes=1, in_chans=3, drop_rate=0.3).eval()
    state = ours.state_dict()
    assert set(state) == {f"backbone.{k}" for k in old.state_dict()}
    old.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()})
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(ours(x), old((x - 0.5) / 0.25)[:, 0], atol=1e-5)


def test_checkpoint_without_dropout_field_loads(tmp_path: Path) -> None:
    cfg = config_for("cpu-fast", encoder=ENCODER, crop_size=SIZE)
    raw = {k: v for k, v in asdict(cfg).items() if k != "dropout"}
    save_checkpoint(tmp_path / "classifier-0001", build_model(cfg).state_dict(),
                    {**raw, "kind": "classifier", "temperature": 2.0}, {}, [])
    clf = load_classifier(tmp_path / "classifier-0001", device="cpu")
    assert clf.config.dropout == cfg.dropout and clf.model.dropout.p == cfg.dropout
    assert clf.predict_crops_mc(_crops(), samples=2).shape == (6, 2)


def test_mc_samples_for_images(tmp_path: Path) -> None:
    clf = _classifier(0.5)
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "c.png"):
        PILImage.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cells = pd.DataFrame({"image": ["a.png", "b.png", "a.png", "zzz.png"], "x": [5.0, 6.0, 30.0, 1.0],
                          "y": [5.0, 7.0, 20.0, 1.0]})
    paths = {n: tmp_path / n for n in ("a.png", "b.png", "c.png", "bad.png")}
    out = mc_samples_for_images(paths, cells, clf, samples=5, seed=1)
    assert {k: v.shape for k, v in out.items()} == {"a.png": (2, 5), "b.png": (1, 5), "c.png": (0, 5)}
    alone = mc_samples_for_images({"a.png": paths["a.png"]}, cells, clf, samples=5, seed=1)
    assert np.array_equal(alone["a.png"], out["a.png"])  # an image's samples do not depend on the others
    with pytest.raises(PredictionError, match="bad.png"):
        mc_samples_for_images(paths, cells, clf, samples=5, skip_invalid=False)
    with pytest.raises(PredictionError, match="lacks column"):
        mc_samples_for_images(paths, cells.drop(columns=["y"]), clf)


def test_image_mc_samples_from_the_store(session, settings) -> None:
    """The optional BALD input of the signals: the stored pair's classifier sampled at its cells."""
    from cellspot.active.signals import NoPredictionsError, image_mc_samples
    from cellspot.ml import registry
    from cellspot.store.models import Image, PredictionCell
    from cellspot.store.queries import get_or_create_project

    project = get_or_create_project(session, "p")
    with pytest.raises(NoPredictionsError, match="cellspot predict --project p"):
        image_mc_samples(session, settings, project)
    folder = settings.home / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    images = {}
    for name in ("a.png", "b.png", "gone.png"):
        if name != "gone.png":
            PILImage.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name)
        images[name] = Image(project_id=project.id, name=name, width=40, height=30, has_pixels=True,
                             path=f"images/{name}")
    session.add_all(images.values())
    session.flush()
    det = registry.create_run(session, "detector", project=project)
    cls = registry.create_run(session, "classifier", project=project)
    cfg = config_for("cpu-fast", encoder=ENCODER, crop_size=SIZE, dropout=0.5)
    save_checkpoint(registry.model_dir(settings, cls), build_model(cfg).state_dict(),
                    {**asdict(cfg), "kind": "classifier", "temperature": 1.0}, {}, [])
    cells = [("a.png", 5.0, 5.0), ("a.png", 20.0, 15.0), ("b.png", 30.0, 10.0), ("gone.png", 3.0, 3.0)]
    session.add_all(PredictionCell(image_id=images[n].id, detector_run_id=det.id, classifier_run_id=cls.id,
                                   x=x, y=y, label="alive", p_alive=0.5) for n, x, y in cells)
    session.flush()
    out = image_mc_samples(session, settings, "p", samples=4)
    assert {k: v.shape for k, v in out.items()} == {"a.png": (2, 4), "b.png": (1, 4)}  # no file, no samples
    assert np.array_equal(out["a.png"], image_mc_samples(session, settings, project, samples=4)["a.png"])

"""Cell detector / segmenter: a segmentation-models-pytorch U-Net trained on rendered targets.

One training path (:func:`fit_detector`) for the CLI, the dashboard and the tests; a
checkpoint folder (:mod:`cellspot.ml.common`) loaded back by :func:`load_detector`.

* Targets (:mod:`cellspot.ml.targets`): two channels, foreground and a centre map, from
  points (disks or Gaussians of a radius estimated from the data or set) or from instance
  masks when every image has one (``target="auto"``); the centre map is a Gaussian peak per
  point, or for masks each nucleus's normalised distance to its edge (``centre="auto"``).
* Training on random tiles (reflect-padded when an image is smaller), with augmentation
  (flips, 90-degree rotations, scale jitter, gain / offset, noise, optional polarity
  inversion and grey conversion);
  Dice + BCE (default) or focal loss; validation after each epoch by tiled prediction of the
  whole val images: point F1 (matched within half a diameter) and, with masks, instance F1 at
  IoU >= 0.5; early stopping on it; a wall-clock budget (``max_minutes``).
* After training, the post-processing parameters (thresholds, peak distance, minimum area)
  are tuned on the val images by a small grid search and saved in ``config.json``.
* Inference: :func:`cellspot.ml.tiling.predict_tiled` (optionally averaged over the 8
  flips / rotations, ``tta``) then :func:`cellspot.ml.postprocess.postprocess`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import segmentation_models_pytorch as smp
import torch

from cellspot.crops import reflect_indices
from cellspot.evaluation import match_cells
from cellspot.ml.common import (
    RESUME_FILE, EtaClock, FitResult, Progress, ProgressFn, StopFn, TrainingCancelled, TrainingError,
    configure_threads, ema_model, end_message, load_weights, model_version, pick_device, restore_model,
    save_checkpoint, save_torch, seed_everything,
)
from cellspot.ml.data import AnnotatedImage, TrainingData, all_masked
from cellspot.ml.postprocess import (
    SEED_KINDS, Detections, counts_to_scores, match_instances, postprocess, shape_prior,
)
from cellspot.ml.targets import CENTRE_KINDS, CHANNELS, TARGET_KINDS, estimate_radius, render_targets
from cellspot.ml.tiling import POLARITIES, normalize_image, predict_tiled

log = logging.getLogger(__name__)

ARCHS = ("unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet")
LOSSES = ("dice_bce", "focal", "dice_focal")
POSTPROCESS_KEYS = ("threshold", "min_distance", "peak_threshold", "min_area", "border_margin", "seeds",
                    "min_solidity", "max_eccentricity", "min_instance_prob")
#: the shape prior keeps all but this fraction of the training masks' instances on each side
SHAPE_QUANTILE = 0.01
#: mean instance foreground probabilities that post-processing tuning tries as ``min_instance_prob``
MIN_INSTANCE_PROB_GRID: tuple[float, ...] = (0.0, 0.6, 0.7, 0.8)
#: which weights a run keeps: those of its best val epoch, or those of its last epoch
KEEP_KINDS: tuple[str, ...] = ("best", "last")


@dataclass
class DetectorConfig:
    """Typed training config, saved in ``config.json`` next to the weights.

    ``encoder_depth`` sets the network's divisibility ``2 ** encoder_depth``; ``tile`` (training
    tiles) and ``infer_tile`` must be multiples of it. ``target``: "auto" (masks when every
    image has one, else "disk") or one of :data:`cellspot.ml.targets.TARGET_KINDS`.
    ``centre``: the centre channel, "auto" (the normalised distance for masks, a Gaussian for
    points) or one of :data:`cellspot.ml.targets.CENTRE_KINDS`.
    ``radius``: cell radius in pixels, None = estimated from the data. ``max_minutes``: stop
    after the epoch that passes this wall-clock budget (None = no budget). Post-processing
    defaults (``threshold``, ``peak_threshold``, ``min_distance`` (None = 0.5 x radius),
    ``min_area``, ``border_margin``, ``seeds``) are replaced by values tuned on val when
    ``tune_postprocess``. ``min_solidity`` / ``max_eccentricity``: the shape prior of
    :func:`cellspot.ml.postprocess.postprocess`; None = estimated from the training masks
    (:func:`cellspot.ml.postprocess.shape_prior` at :data:`SHAPE_QUANTILE`: 1 % of the true
    instances fall outside each bound) and off for point annotations; 0 / 1 switch it off.
    ``min_instance_prob``: the lowest mean foreground probability of a kept instance (0 = off;
    tuning tries :data:`MIN_INSTANCE_PROB_GRID` when the data have masks).
    Augmentation of the training tiles: ``scale_jitter`` (tiles resized by
    a factor drawn log-uniformly from [1 / scale_jitter, scale_jitter]; 1 = off), ``invert``
    and ``gray`` (probabilities of negating the normalised tile, so dark cells on a light
    background look like bright ones on a dark background, and of replacing its colours by
    their mean). ``polarity``: "keep", or "auto": images whose grey levels are skewed towards
    dark (dark objects on a light background) are negated after normalisation, in training and
    inference alike (:func:`cellspot.ml.tiling.normalize_image`). ``tta``: inference averages
    the 8 flips / rotations of every tile (8x the compute, smoother maps). ``ema``: decay of
    the exponential moving average of the weights that is validated, kept and saved (0 = the
    raw weights). ``keep``: "best" keeps the weights of the epoch with the best val metric and
    stops early after ``patience`` epochs without a better one; "last" keeps the weights at the
    end of the learning-rate schedule and never stops early (for a val split too small to tell
    epochs apart: its best epoch is then a noisy pick, often from the early high-rate phase).
    ``best_from``: with "best", only epochs that end after this fraction of the run (steps or
    time budget, whichever is further) can be kept or count towards ``patience``; earlier ones
    are validated and plotted only (0, the default: every epoch). On a small val split an epoch
    of the high learning-rate phase can score best by chance and end the run early; on
    DSB2018 ``best_from=0.5`` did not give better runs (README, models benchmark).
    """

    preset: str = "cpu-fast"
    arch: str = "unet"
    encoder: str = "mobilenet_v2"
    encoder_depth: int = 4
    decoder_channels: tuple[int, ...] = (64, 32, 16, 16)
    weights_path: str | None = None
    target: str = "auto"
    centre: str = "auto"
    radius: float | None = None
    loss: str = "dice_bce"
    tile: int = 128
    infer_tile: int = 512
    overlap: int = 32
    batch_size: int = 8
    epochs: int = 48
    steps_per_epoch: int = 50
    lr: float = 3e-3
    weight_decay: float = 1e-4
    ema: float = 0.99
    patience: int = 20
    keep: str = "best"
    best_from: float = 0.0
    max_minutes: float | None = 9.0
    seed: int = 0
    threads: int | None = None
    threshold: float = 0.5
    peak_threshold: float = 0.3
    min_distance: int | None = None
    min_area: int = 0
    border_margin: float = 0.0
    seeds: str = "peaks"
    min_solidity: float | None = None
    max_eccentricity: float | None = None
    min_instance_prob: float = 0.0
    tune_postprocess: bool = True
    scale_jitter: float = 1.25
    invert: float = 0.0
    gray: float = 0.0
    polarity: str = "keep"
    tta: bool = False

    def __post_init__(self) -> None:
        channels = self.decoder_channels
        if isinstance(channels, (int, str)) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels):
            raise TrainingError(f"bad detector config: decoder_channels must be a list of whole numbers >= 1 (one "
                                f"per encoder stage, e.g. [64, 32, 16, 16]); got {channels!r}")
        self.decoder_channels = tuple(channels)
        _validate(self)

    @property
    def divisor(self) -> int:
        return 2 ** int(self.encoder_depth)


PRESETS: dict[str, dict[str, Any]] = {
    # small encoder, 4 stages, narrow decoder: ~2.4 M parameters, trains in minutes on 2 CPU cores
    "cpu-fast": {},
    # GPU: deeper encoder, full decoder, bigger tiles and batches, no time budget
    "quality": dict(encoder="resnet34", encoder_depth=5, decoder_channels=(256, 128, 64, 32, 16), tile=256,
                    infer_tile=512, overlap=64, batch_size=16, epochs=150, steps_per_epoch=50, lr=1e-3,
                    patience=20, max_minutes=None),
}


def config_for(preset: str = "cpu-fast", **overrides: Any) -> DetectorConfig:
    """The config of a preset (:data:`PRESETS`) with ``overrides`` applied."""
    if preset not in PRESETS:
        raise TrainingError(f"unknown detector preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    names = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TrainingError(f"unknown detector config field(s) {unknown}; valid fields: {sorted(names)}")
    return DetectorConfig(**{**PRESETS[preset], **overrides, "preset": preset})


def config_from_dict(values: dict[str, Any]) -> DetectorConfig:
    """Rebuild a config from ``config.json`` (extra keys such as ``kind`` are ignored, and
    ``weights_path``: a checkpoint's weights replace the pretrained encoder file)."""
    names = {f.name for f in dataclasses.fields(DetectorConfig)}
    return DetectorConfig(**{k: v for k, v in values.items() if k in names and k != "weights_path"})


def _validate(c: DetectorConfig) -> None:
    checks = [
        (c.arch in ARCHS, f"arch must be one of {ARCHS}, got {c.arch!r}"),
        (known_encoder(c.encoder), f"unknown encoder {c.encoder!r}; use a segmentation-models-pytorch encoder such "
                                   "as mobilenet_v2, resnet18, resnet34, efficientnet-b0, or tu-<a timm model name>"),
        (c.loss in LOSSES, f"loss must be one of {LOSSES}, got {c.loss!r}"),
        (c.target in ("auto",) + TARGET_KINDS, f"target must be 'auto' or one of {TARGET_KINDS}, got {c.target!r}"),
        (c.centre in ("auto",) + CENTRE_KINDS, f"centre must be 'auto' or one of {CENTRE_KINDS}, got {c.centre!r}"),
        (c.seeds in SEED_KINDS, f"seeds must be one of {SEED_KINDS}, got {c.seeds!r}"),
        (1.0 <= c.scale_jitter <= 4.0, f"scale_jitter must be in [1, 4], got {c.scale_jitter}"),
        (0.0 <= c.invert <= 1.0 and 0.0 <= c.gray <= 1.0,
         f"invert and gray are probabilities in [0, 1], got {c.invert} and {c.gray}"),
        (c.polarity in POLARITIES, f"polarity must be one of {POLARITIES}, got {c.polarity!r}"),
        (c.keep in KEEP_KINDS, f"keep must be one of {KEEP_KINDS}, got {c.keep!r}"),
        (0.0 <= c.best_from < 1.0, f"best_from must be in [0, 1) (a fraction of the run), got {c.best_from}"),
        (3 <= c.encoder_depth <= 5, f"encoder_depth must be 3..5, got {c.encoder_depth}"),
        (c.arch not in ("unet", "unetplusplus") or len(c.decoder_channels) == c.encoder_depth,
         f"decoder_channels needs encoder_depth={c.encoder_depth} entries, got {c.decoder_channels}"),
        (c.tile > 0 and c.tile % c.divisor == 0, f"tile must be a positive multiple of {c.divisor}, got {c.tile}"),
        (c.infer_tile > 0 and c.infer_tile % c.divisor == 0,
         f"infer_tile must be a positive multiple of {c.divisor}, got {c.infer_tile}"),
        (0 <= c.overlap <= c.infer_tile // 2, f"overlap must be in [0, infer_tile/2], got {c.overlap}"),
        (c.radius is None or c.radius > 0, f"radius must be positive or None, got {c.radius}"),
        (min(c.batch_size, c.epochs, c.steps_per_epoch) >= 1, "batch_size, epochs and steps_per_epoch must be >= 1"),
        (c.lr > 0 and c.patience >= 1, "lr must be > 0 and patience >= 1"),
        (0.0 <= c.ema < 1.0, f"ema must be in [0, 1) (0 = off), got {c.ema}"),
        (c.border_margin >= 0, f"border_margin must be >= 0 pixels, got {c.border_margin}"),
        (c.min_solidity is None or 0.0 <= c.min_solidity <= 1.0,
         f"min_solidity must be in [0, 1] or None, got {c.min_solidity}"),
        (c.max_eccentricity is None or 0.0 < c.max_eccentricity <= 1.0,
         f"max_eccentricity must be in (0, 1] or None, got {c.max_eccentricity}"),
        (0.0 <= c.min_instance_prob <= 1.0, f"min_instance_prob must be in [0, 1], got {c.min_instance_prob}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(f"bad detector config: {message}")


# --------------------------------------------------------------------------- model and loss


def known_encoder(name: str) -> bool:
    """Whether segmentation-models-pytorch can build ``name``: one of its encoders, or ``tu-``
    and a timm model (checked before a run is queued, so a typo does not fail in the worker)."""
    if name.startswith("tu-"):
        import timm

        return timm.is_model(name[3:])
    return name in smp.encoders.get_encoder_names()


def build_model(config: DetectorConfig) -> torch.nn.Module:
    """The network of ``config`` (random init, or the encoder from ``weights_path``, a local file)."""
    kwargs: dict[str, Any] = dict(encoder_name=config.encoder, encoder_weights=None, in_channels=3,
                                  classes=len(CHANNELS), encoder_depth=config.encoder_depth)
    if config.arch in ("unet", "unetplusplus"):
        kwargs["decoder_channels"] = config.decoder_channels
    try:
        model = smp.create_model(config.arch, **kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainingError(f"cannot build {config.arch} with encoder {config.encoder!r}: {exc}") from exc
    if config.weights_path:
        state = load_weights(Path(config.weights_path))
        missing, unexpected = model.encoder.load_state_dict(state, strict=False)
        log.info("encoder weights from %s (%d missing, %d unexpected keys)", config.weights_path,
                 len(missing), len(unexpected))
    return model


class DetectorLoss(torch.nn.Module):
    """Dice + BCE, focal, or Dice + focal over both target channels (logits in, soft targets)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise TrainingError(f"unknown loss {kind!r}; valid losses: {', '.join(LOSSES)}")
        self.dice = smp.losses.DiceLoss("multilabel", from_logits=True) if "dice" in kind else None
        self.bce = smp.losses.SoftBCEWithLogitsLoss() if "bce" in kind else None
        self.focal = smp.losses.FocalLoss("multilabel") if "focal" in kind else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.contiguous(), target.contiguous()
        parts = [f(logits, target) for f in (self.dice, self.bce, self.focal) if f is not None]
        return torch.stack(parts).sum()


# --------------------------------------------------------------------------- training data


@dataclass
class _Prepared:
    """One training image ready for tiling: ``image`` (3, H, W) normalised, ``target`` (2, H, W)."""

    image: np.ndarray
    target: np.ndarray


def resolve_target(config: DetectorConfig, data: TrainingData) -> str:
    if config.target == "auto":
        return "mask" if data.has_masks else "disk"
    if config.target == "mask" and not data.has_masks:
        raise TrainingError("target 'mask' needs an instance mask for every image; use 'disk' or 'gaussian'")
    return config.target


def resolve_centre(config: DetectorConfig, kind: str) -> str:
    """The centre channel: ``config.centre``, or for "auto" the normalised distance with masks
    (one level cuts a core out of nuclei of any size) and a Gaussian with points."""
    if config.centre != "auto":
        return config.centre
    return "distance" if kind == "mask" else "gaussian"


def resolve_radius(config: DetectorConfig, data: TrainingData) -> float:
    """``config.radius``, or the radius estimated from the images the fit sees (train and val):
    test images never shape the model, so its test metrics stay unbiased."""
    if config.radius is not None:
        return float(config.radius)
    seen = data.without_test().images
    return estimate_radius([im.cells for im in seen], [im.mask for im in seen])


def _prepare(images: list[AnnotatedImage], kind: str, radius: float, tile: int,
             centre: str = "gaussian", polarity: str = "keep") -> list[_Prepared]:
    out = []
    for im in images:
        h, w = im.pixels.shape[:2]
        image = normalize_image(im.pixels, polarity)
        target = render_targets((h, w), im.cells, radius, kind, im.mask, centre)
        if h < tile or w < tile:
            rows, cols = reflect_indices(0, max(h, tile), h), reflect_indices(0, max(w, tile), w)
            image, target = image[:, rows][:, :, cols], target[:, rows][:, :, cols]
        out.append(_Prepared(np.ascontiguousarray(image), np.ascontiguousarray(target)))
    return out


@dataclass(frozen=True)
class TileAugment:
    """Augmentation of the training tiles (see :class:`DetectorConfig`): ``scale_jitter`` >= 1,
    probabilities ``invert`` and ``gray``."""

    scale_jitter: float = 1.0
    invert: float = 0.0
    gray: float = 0.0

    @classmethod
    def of(cls, config: DetectorConfig) -> TileAugment:
        return cls(float(config.scale_jitter), float(config.invert), float(config.gray))


def _window(p: _Prepared, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random ``side`` x ``side`` window of ``p`` (image and target), reflected where it
    runs past the image (a zoomed-out window may be larger than the image)."""
    _, h, w = p.image.shape
    y0, x0 = int(rng.integers(0, max(h - side, 0) + 1)), int(rng.integers(0, max(w - side, 0) + 1))
    if side <= h and side <= w:
        return p.image[:, y0:y0 + side, x0:x0 + side], p.target[:, y0:y0 + side, x0:x0 + side]
    rows, cols = reflect_indices(y0, side, h), reflect_indices(x0, side, w)
    return p.image[:, rows][:, :, cols], p.target[:, rows][:, :, cols]


def _resize(planes: np.ndarray, side: int) -> np.ndarray:
    """``(C, s, s)`` float32 -> ``(C, side, side)``: area averaging when shrinking, bilinear otherwise."""
    mode = cv2.INTER_AREA if planes.shape[1] > side else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(planes.transpose(1, 2, 0)), (side, side), interpolation=mode)
    return out.reshape(side, side, -1).transpose(2, 0, 1)


def _sample_batch(prepared: list[_Prepared], tile: int, batch: int, rng: np.random.Generator,
                  augment: TileAugment = TileAugment()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random augmented tiles: images ``(B, 3, tile, tile)``, targets ``(B, 2, tile, tile)``.

    Images are picked in proportion to their area. Augmentation: a scale factor drawn
    log-uniformly from ``[1 / scale_jitter, scale_jitter]`` (a window of ``tile / factor``
    pixels resized to ``tile``, targets with it), flips, 90-degree rotations, random gain /
    offset on the normalised intensities, Gaussian noise, and with their probabilities a
    negated tile (polarity inversion: the normalised image of ``255 - pixels``) and a grey
    tile (every channel the mean of the three).
    """
    area = np.array([p.image.shape[1] * p.image.shape[2] for p in prepared], dtype=float)
    picks = rng.choice(len(prepared), size=batch, p=area / area.sum())
    xs, ys = [], []
    for k in picks:
        side = tile
        if augment.scale_jitter > 1.0:
            factor = float(np.exp(rng.uniform(-1.0, 1.0) * np.log(augment.scale_jitter)))
            side = max(8, int(round(tile / factor)))
        img, tgt = _window(prepared[k], side, rng)
        if side != tile:
            img, tgt = _resize(img, tile), np.clip(_resize(tgt, tile), 0.0, 1.0)
        turns, flip = int(rng.integers(4)), bool(rng.integers(2))
        img, tgt = np.rot90(img, turns, axes=(1, 2)), np.rot90(tgt, turns, axes=(1, 2))
        if flip:
            img, tgt = img[:, :, ::-1], tgt[:, :, ::-1]
        if augment.gray > 0 and rng.random() < augment.gray:
            img = np.broadcast_to(img.mean(axis=0, keepdims=True), img.shape)
        if augment.invert > 0 and rng.random() < augment.invert:
            img = -img
        img = img * rng.uniform(0.8, 1.25) + rng.uniform(-0.3, 0.3)
        if rng.random() < 0.3:
            img = img + rng.normal(0.0, rng.uniform(0.02, 0.15), img.shape)
        xs.append(np.ascontiguousarray(img, dtype=np.float32))
        ys.append(np.ascontiguousarray(tgt, dtype=np.float32))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


# --------------------------------------------------------------------------- evaluation


def default_postprocess(config: DetectorConfig, radius: float) -> dict[str, Any]:
    """Post-processing parameters of ``config``; ``min_distance`` None -> half the radius; an
    unresolved (None) shape prior -> off."""
    md = config.min_distance if config.min_distance is not None else max(1, int(round(0.5 * radius)))
    return dict(threshold=config.threshold, min_distance=int(md), peak_threshold=config.peak_threshold,
                min_area=int(config.min_area), border_margin=float(config.border_margin), seeds=config.seeds,
                min_solidity=float(config.min_solidity or 0.0),
                max_eccentricity=float(1.0 if config.max_eccentricity is None else config.max_eccentricity),
                min_instance_prob=float(config.min_instance_prob))


def resolve_shape(config: DetectorConfig, train: list[AnnotatedImage]) -> dict[str, float]:
    """The shape prior: ``config``'s bounds, with each None estimated from the masks of
    ``train`` (off when an image has no mask: points say nothing about shape)."""
    estimated = shape_prior([im.mask for im in train], SHAPE_QUANTILE) if all_masked(train) else (0.0, 1.0)
    return dict(min_solidity=float(estimated[0] if config.min_solidity is None else config.min_solidity),
                max_eccentricity=float(estimated[1] if config.max_eccentricity is None else config.max_eccentricity))


def evaluate(images: list[AnnotatedImage], probs: list[np.ndarray], params: dict[str, Any],
             radius: float) -> dict[str, float]:
    """Point metrics (``precision``, ``recall``, ``f1``, matched within half a diameter) and, when
    every image has a mask, instance metrics at IoU >= 0.5 (``instance_*``) of ``probs``."""
    found = [postprocess(p, **params) for p in probs]
    truth, pred = [], []
    for i, (im, det) in enumerate(zip(images, found)):
        cells = im.cells
        diam = cells["diameter"].to_numpy(float) if "diameter" in cells.columns else np.full(len(cells), np.nan)
        truth.append(pd.DataFrame({"image": i, "x": cells["x"].to_numpy(float), "y": cells["y"].to_numpy(float),
                                   "diameter": np.where(np.isfinite(diam), diam, 2.0 * radius)}))
        pred.append(pd.DataFrame({"image": i, "x": det.xy[:, 0], "y": det.xy[:, 1]}))
    truth_df, pred_df = pd.concat(truth, ignore_index=True), pd.concat(pred, ignore_index=True)
    n_m = len(match_cells(truth_df, pred_df).truth)
    out = counts_to_scores(n_m, len(pred_df) - n_m, len(truth_df) - n_m)
    if all_masked(images):
        per = [match_instances(im.mask, det.labels, 0.5) for im, det in zip(images, found)]
        inst = counts_to_scores(*(sum(m[k] for m in per) for k in ("tp", "fp", "fn")))
        out.update({f"instance_{k}": v for k, v in inst.items()})
    return out


def primary_metric(metrics: dict[str, float]) -> str:
    return "instance_f1" if "instance_f1" in metrics else "f1"


def tune_postprocess(images: list[AnnotatedImage], probs: list[np.ndarray], radius: float,
                     start: dict[str, Any], passes: int = 2) -> tuple[dict[str, Any], dict[str, float]]:
    """Post-processing parameters maximising the primary val metric.

    Coordinate ascent over a small grid (one parameter at a time, the others fixed, up to
    ``passes`` rounds): ~15 evaluations a round instead of the ~100 of the full grid.
    Thresholds, the lowest mean foreground probability of an instance, minimum area and the
    seed kind (peaks or cores, see :func:`cellspot.ml.postprocess.postprocess`) only matter
    with masks; for points only the peak parameters and the border margin (data whose
    annotators skipped cells cut by the border) are searched.
    """
    has_masks = all_masked(images)
    if has_masks and "seeds" not in start:
        start = {**start, "seeds": "peaks"}
    grid: dict[str, tuple] = dict(
        peak_threshold=(0.05, 0.1, 0.2, 0.3, 0.45, 0.6),
        min_distance=tuple(sorted({max(1, int(round(radius * f))) for f in (0.3, 0.5, 0.75, 1.0, 1.5)})),
        border_margin=tuple(sorted({0.0, *(round(radius * f, 1) for f in (0.2, 0.35, 0.5))})))
    if has_masks:
        grid.update(threshold=(0.35, 0.5, 0.65), min_instance_prob=MIN_INSTANCE_PROB_GRID,
                    min_area=(0, max(2, int(0.1 * np.pi * radius ** 2)), max(3, int(0.25 * np.pi * radius ** 2))))
    # each seed kind gets its own ascent: the best peak level of one is a poor start for the other
    starts = [{**start, "seeds": kind} for kind in SEED_KINDS] if has_masks else [dict(start)]
    best, best_metrics = starts[0], evaluate(images, probs, starts[0], radius)
    key = primary_metric(best_metrics)
    for first in starts:
        params, metrics = _ascend(images, probs, radius, first, grid, key, passes)
        if metrics[key] > best_metrics[key]:
            best, best_metrics = params, metrics
    log.info("post-processing tuned on %d val images: %s -> %s %.4f", len(images), best, key, best_metrics[key])
    return best, best_metrics


def _ascend(images: list[AnnotatedImage], probs: list[np.ndarray], radius: float, start: dict[str, Any],
            grid: dict[str, tuple], key: str, passes: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Coordinate ascent of ``key`` from ``start`` over ``grid`` (one parameter at a time)."""
    best, best_metrics = dict(start), evaluate(images, probs, start, radius)
    for _ in range(passes):
        changed = False
        for name, values in grid.items():
            if name == "min_distance" and best.get("seeds") == "cores":
                continue  # cores need no distance between seeds
            for value in values:
                if value == best[name]:
                    continue
                params = {**best, name: value}
                metrics = evaluate(images, probs, params, radius)
                if metrics[key] > best_metrics[key]:
                    best, best_metrics, changed = params, metrics, True
        if not changed:
            break
    return best, best_metrics


# --------------------------------------------------------------------------- training


def fit_detector(
    data: TrainingData,
    config: DetectorConfig,
    out_dir: Path,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    resume: bool = False,
    device: str | None = None,
) -> FitResult:
    """Train a detector on ``data`` and write its checkpoint folder ``out_dir``.

    ``progress`` gets a :class:`Progress` after every step ("train") and epoch ("epoch_end"),
    and once at the end ("done"). ``should_stop`` is polled before every step: when it returns
    true, ``resume.pt`` is written and :class:`TrainingCancelled` raised; ``resume=True``
    continues such a run from that step. Metrics are computed on the test split (the val
    split when there is no test image) with the post-processing tuned on val.
    """
    out_dir = Path(out_dir)
    train, val = data.split("train"), data.split("val")
    if not train:
        raise TrainingError("no training images: the data has no image in the 'train' split")
    if not val:
        log.warning("no 'val' images: early stopping and tuning use the training images")
        val = train
    configure_threads(config.threads)
    dev = pick_device(device)
    seed_everything(config.seed)
    kind, radius = resolve_target(config, data), resolve_radius(config, data)
    log.info("detector: %d train / %d val images, target %s, radius %.2f px, device %s",
             len(train), len(val), kind, radius, dev)
    run = _Run(config, out_dir, kind, radius, dev, progress)
    run.prepare(train, val)
    if resume:
        run.load_resume()
    run.train(should_stop)
    return run.finish(data, should_stop)


class _Run:
    """State of one training run (kept small so cancel / resume can save and restore it)."""

    def __init__(self, config: DetectorConfig, out_dir: Path, kind: str, radius: float,
                 device: torch.device, progress: ProgressFn | None) -> None:
        self.config, self.out_dir, self.kind, self.radius, self.device = config, out_dir, kind, radius, device
        self.centre = resolve_centre(config, kind)
        self.augment = TileAugment.of(config)
        self.progress = progress
        # channels-last: convolutions run about 15 % faster on CPU
        self.model = build_model(config).to(device, memory_format=torch.channels_last)
        self.loss_fn = DetectorLoss(config.loss)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # validation, the kept weights and the checkpoint use the exponential moving average of the
        # weights (batch-norm statistics included) when ``ema`` > 0: steadier than the last step's
        self.ema = ema_model(self.model, config.ema)
        self.net = self.ema.module if self.ema is not None else self.model
        self.pp = default_postprocess(config, radius)
        self.epoch, self.step = 1, 0  # next epoch; steps done in it
        self.curves: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self.best_state: dict[str, torch.Tensor] = {}
        self.best_score, self.best_epoch, self.bad = -1.0, 0, 0
        self.elapsed0 = 0.0
        self.clock = EtaClock()
        self.stopped_early = False

    # -- setup
    def prepare(self, train: list[AnnotatedImage], val: list[AnnotatedImage]) -> None:
        self.train_images, self.val_images = train, val
        self.pp.update(resolve_shape(self.config, train))
        log.info("shape prior: solidity >= %.3f, eccentricity <= %.3f", self.pp["min_solidity"],
                 self.pp["max_eccentricity"])
        self.prepared = _prepare(train, self.kind, self.radius, self.config.tile, self.centre,
                                 self.config.polarity)
        self.val_targets = [render_targets(im.pixels.shape[:2], im.cells, self.radius, self.kind, im.mask,
                                           self.centre) for im in val]

    def resume_state(self) -> dict[str, Any]:
        plain = json.loads(json.dumps(dict(
            epoch=self.epoch, step=self.step, curves=self.curves, losses=self.losses, best_score=self.best_score,
            best_epoch=self.best_epoch, bad=self.bad, elapsed=self.elapsed(), radius=self.radius), default=float))
        ema = self.ema.state_dict() if self.ema is not None else {}
        return dict(model=self.model.state_dict(), optimizer=self.opt.state_dict(), best_state=self.best_state,
                    ema=ema, config=_config_key(self.config), **plain)

    def load_resume(self) -> None:
        path = self.out_dir / RESUME_FILE
        if not path.is_file():
            log.warning("resume asked for but %s is missing: starting from scratch", path)
            return
        state = load_weights(path, self.device)
        if state.get("config") != _config_key(self.config):
            raise TrainingError(f"{path} was saved with a different config; resume with the same config "
                                "or start afresh with resume=False")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step, self.curves = int(state["epoch"]), int(state["step"]), list(state["curves"])
        self.losses, self.best_state = list(state["losses"]), dict(state["best_state"])
        self.best_score, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.bad, self.elapsed0, self.radius = int(state["bad"]), float(state["elapsed"]), float(state["radius"])
        log.info("resuming detector training at epoch %d step %d", self.epoch, self.step)

    # -- loop
    def elapsed(self) -> float:
        return self.elapsed0 + self.clock.elapsed()

    def steps_fraction(self) -> float:
        """The share of the run's optimisation steps done (without the time budget)."""
        c = self.config
        return ((self.epoch - 1) * c.steps_per_epoch + self.step) / (c.epochs * c.steps_per_epoch)

    def fraction(self) -> float:
        c = self.config
        done = self.steps_fraction()
        if c.max_minutes:
            done = max(done, self.elapsed() / (60.0 * c.max_minutes))
        return float(min(1.0, done))

    def emit(self, phase: str, **kw: Any) -> None:
        if self.progress is None:
            return
        c = self.config  # ETA: the steps' pace after the first step (EtaClock), within the time budget
        eta = self.clock.eta(self.steps_fraction(), 60.0 * c.max_minutes - self.elapsed() if c.max_minutes else None)
        step = self.step
        if phase == "done":  # the last epoch is complete (its step counter was reset): no time left
            step, eta = self.config.steps_per_epoch, 0.0
        self.progress(Progress(epoch=self.epoch, epochs=self.config.epochs, step=step,
                               steps=self.config.steps_per_epoch, phase=phase, elapsed_s=self.elapsed(),
                               eta_s=eta, **kw))

    def set_lr(self) -> float:
        """Cosine decay from ``lr`` over the run (steps or time budget, whichever is further), 5% warm-up."""
        f = self.fraction()
        lr = self.config.lr * (min(1.0, f / 0.05 + 0.1) if f < 0.05 else 0.5 * (1 + np.cos(np.pi * f)))
        lr = float(max(lr, 0.02 * self.config.lr))
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def train(self, should_stop: StopFn | None) -> None:
        c = self.config
        while self.epoch <= c.epochs:
            self.model.train()
            while self.step < c.steps_per_epoch:
                if should_stop is not None and should_stop():
                    save_torch(self.out_dir / RESUME_FILE, self.resume_state())
                    raise TrainingCancelled(f"detector training cancelled at epoch {self.epoch} step "
                                            f"{self.step}; resume.pt saved in {self.out_dir}")
                self.train_step()
            if self.end_epoch():
                break
            self.epoch, self.step, self.losses = self.epoch + 1, 0, []
        self.epoch = min(self.epoch, c.epochs)

    def train_step(self) -> None:
        c = self.config
        rng = np.random.default_rng([c.seed, self.epoch, self.step])
        x, y = _sample_batch(self.prepared, c.tile, c.batch_size, rng, self.augment)
        lr = self.set_lr()
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.model(x), y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.losses.append(float(loss.detach()))
        self.step += 1
        self.emit("train", train_loss=float(np.mean(self.losses)), message=f"lr {lr:.2e}")

    def val_probs(self, tta: bool = False) -> list[np.ndarray]:
        """Probabilities of the val images (without test-time augmentation during training: 8x cheaper)."""
        return [self.predict(im.pixels, tta) for im in self.val_images]

    def predict(self, pixels: np.ndarray, tta: bool) -> np.ndarray:
        c = self.config
        return predict_tiled(self.net, pixels, c.infer_tile, c.overlap, self.device, divisor=c.divisor, tta=tta,
                             polarity=c.polarity)

    def end_epoch(self) -> bool:
        """Validate, keep the best weights; True when training should stop."""
        probs = self.val_probs()
        val_loss = float(np.mean([_bce(p, t) for p, t in zip(probs, self.val_targets)]))
        metrics = evaluate(self.val_images, probs, self.pp, self.radius)
        row = {"epoch": self.epoch, "train_loss": float(np.mean(self.losses)) if self.losses else None,
               "val_loss": val_loss, "seconds": self.elapsed(), **{f"val_{k}": v for k, v in metrics.items()}}
        self.curves.append(row)
        key = primary_metric(metrics)
        score = metrics[key]
        # the end of the run always counts (fraction 1), so a finished run has a kept epoch
        eligible = self.fraction() >= self.config.best_from - 1e-9
        if eligible and score > self.best_score:
            self.best_score, self.best_epoch, self.bad = score, self.epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        elif eligible:
            self.bad += 1
        best = (f"best {self.best_score:.4f} @ {self.best_epoch}" if self.best_epoch
                else f"epochs count from {100 * self.config.best_from:.0f} % of the run")
        # named as in the curves kept at the end (val_f1, ...), so a live chart's series keep their names
        self.emit("epoch_end", train_loss=row["train_loss"], val_loss=val_loss,
                  metrics={f"val_{k}": float(v) for k, v in metrics.items()}, message=f"val {key} {score:.4f} ({best})")
        log.info("epoch %d: train %.4f val %.4f %s %.4f", self.epoch, row["train_loss"] or float("nan"),
                 val_loss, key, score)
        over_time = bool(self.config.max_minutes) and self.elapsed() > 60.0 * self.config.max_minutes
        if over_time:
            log.info("time budget of %.1f min used: stopping after epoch %d", self.config.max_minutes, self.epoch)
        self.stopped_early = self.config.keep == "best" and self.bad >= self.config.patience
        return self.stopped_early or over_time

    # -- end
    def finish(self, data: TrainingData, should_stop: StopFn | None = None) -> FitResult:
        if self.best_state and self.config.keep == "best":
            self.net.load_state_dict(self.best_state)
        probs = self.val_probs(self.config.tta)
        params, val_metrics = (tune_postprocess(self.val_images, probs, self.radius, self.pp)
                               if self.config.tune_postprocess else (self.pp, evaluate(self.val_images, probs,
                                                                                       self.pp, self.radius)))
        test = data.split("test")
        # without val images the training images stood in (fit warned): say so, not "val"
        split = "test" if test else ("train" if self.val_images is self.train_images else "val")
        metrics = val_metrics
        if test:
            test_probs = [self.predict(im.pixels, self.config.tta) for im in test]
            metrics = evaluate(test, test_probs, params, self.radius)
        final = {**metrics, **{f"val_{k}": v for k, v in val_metrics.items()}, "split": split,
                 "n_eval_images": len(test) if test else len(self.val_images), "best_epoch": self.best_epoch,
                 "kept_epoch": self.best_epoch if self.config.keep == "best" and self.best_state else self.epoch,
                 "epochs_run": self.epoch, "stopped_early": self.stopped_early, "seconds": self.elapsed()}
        config = self.checkpoint_config(params, data)
        if should_stop is not None:  # once more before the files: a run taken over meanwhile raises here
            should_stop()
        save_checkpoint(self.out_dir, self.net.state_dict(), config, final, self.curves)
        (self.out_dir / RESUME_FILE).unlink(missing_ok=True)
        self.emit("done", metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                  message=f"{split} {primary_metric(metrics)} {metrics[primary_metric(metrics)]:.4f}; "
                          + end_message(self.epoch, self.config.epochs, final["kept_epoch"], self.stopped_early))
        return FitResult(model_dir=self.out_dir, metrics=final, curves=self.curves, epochs_run=self.epoch,
                         best_epoch=self.best_epoch, seconds=self.elapsed())

    def checkpoint_config(self, params: dict[str, Any], data: TrainingData) -> dict[str, Any]:
        cfg = asdict(self.config)
        cfg.update(params)
        cfg.update(kind="detector", radius=self.radius, radius_estimated=self.config.radius is None,
                   target_kind=self.kind, centre_kind=self.centre, channels=list(CHANNELS), postprocess=params, divisor=self.config.divisor,
                   data_snapshot_id=data.snapshot_id, data_source=data.source,
                   versions={"torch": torch.__version__, "segmentation_models_pytorch": smp.__version__})
        return cfg


def _config_key(config: DetectorConfig) -> str:
    return json.dumps(asdict(config), sort_keys=True, default=str)


def _bce(prob: np.ndarray, target: np.ndarray) -> float:
    p = np.clip(prob, 1e-6, 1 - 1e-6)
    return float(-np.mean(target * np.log(p) + (1 - target) * np.log(1 - p)))


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedDetector:
    """A trained detector ready to run: ``.detect(pixels)`` -> :class:`Detections`.

    ``config``: the training config with the resolved ``radius`` and the tuned post-processing
    parameters; ``version``: the checkpoint folder's name.
    """

    config: DetectorConfig
    version: str
    model: torch.nn.Module
    device: torch.device
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def radius(self) -> float:
        return float(self.config.radius or 0.0)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """``(2, H, W)`` float32 probabilities (foreground, centre) of ``pixels`` ``(H, W, 3)`` uint8."""
        c = self.config
        return predict_tiled(self.model, pixels, c.infer_tile, c.overlap, self.device, divisor=c.divisor,
                             tta=bool(c.tta), polarity=c.polarity)

    def detect(self, pixels: np.ndarray, **overrides: Any) -> Detections:
        """Cells of ``pixels`` ``(H, W, 3)`` uint8; ``overrides`` replace post-processing parameters."""
        unknown = sorted(set(overrides) - set(POSTPROCESS_KEYS))
        if unknown:
            raise TrainingError(f"unknown post-processing parameter(s) {unknown}; valid: {POSTPROCESS_KEYS}")
        return postprocess(self.predict(pixels), **{**self.params, **overrides})


def load_detector(model_dir: Path, device: str | None = None) -> LoadedDetector:
    """Rebuild the detector of checkpoint folder ``model_dir`` (weights loaded with ``weights_only=True``)."""
    model_dir = Path(model_dir)
    raw, config, model = restore_model(model_dir, "detector", config_from_dict, build_model)
    dev = pick_device(device)
    model.to(dev, memory_format=torch.channels_last).eval()
    params = raw.get("postprocess") or default_postprocess(config, config.radius or 1.0)
    return LoadedDetector(config=config, version=model_version(model_dir), model=model, device=dev, params=dict(params))

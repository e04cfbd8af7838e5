"""The alive/dead classifier: a timm encoder on square crops centred on cells.

One training path, :func:`fit_classifier`, used by the CLI, the job worker and the tests:

* crops around every labelled cell (:func:`crops_from_data`, reflect-padded at borders);
* soft targets: binary cross-entropy against the consensus ``p_alive``, times the cell's
  sample weight (its consensus confidence), times a class-balancing weight (``balance``);
* augmentation (:func:`cellspot.ml.augment.crop_transforms`), AdamW with warm-up + cosine decay;
* early stopping on the validation images (``monitor``: balanced accuracy, ties broken by
  loss; or loss), keeping the best weights;
* temperature scaling fitted on the validation logits, so ``p_alive`` is calibrated;
* metrics on the test images (the validation images when there are no test images).

The network outputs one logit for *alive*: ``p_alive = sigmoid(logit / temperature)``.
Metrics treat **dead as the positive class** (F1, ROC-AUC, confusion matrix).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import cellspot
from cellspot.crops import crop_around
from cellspot.evaluation import classification_metrics
from cellspot.ml.augment import augment_crops, crop_transforms, images_to_tensor
from cellspot.ml.common import (
    RESUME_FILE,
    EtaClock,
    FitResult,
    Progress,
    ProgressFn,
    StopFn,
    TrainingCancelled,
    TrainingError,
    configure_threads,
    ema_model,
    end_message,
    load_weights,
    model_version,
    pick_device,
    restore_model,
    save_checkpoint,
    save_torch,
    seed_everything,
)
from cellspot.ml.data import AnnotatedImage, TrainingData

log = logging.getLogger(__name__)

KIND = "classifier"
MONITORS = ("balanced_accuracy", "loss")
BALANCES = ("weights", "sampler", "none")
#: layout of ``confusion`` in the metrics (dead is the positive class)


@dataclass
class ClassifierConfig:
    """Typed training config, saved in ``config.json`` with every checkpoint.

    ``encoder``: a timm model name (built with ``pretrained=False``); ``crop_size``: side of
    the crop in pixels; ``epochs``: the most epochs (early stopping after ``patience`` epochs
    without improvement of ``monitor`` on the validation images); ``balance``: class
    imbalance by per-class loss ``weights``, a class-balanced ``sampler``, or ``none``;
    ``input_scale``: the crop is resized by this factor before the encoder (2.0 helps small
    details such as malaria parasites in 50 px crops, at 4x the compute);
    ``dropout``: rate of the dropout layer before the head (regularises training; sampled at
    inference for MC dropout, :meth:`LoadedClassifier.predict_crops_mc`; checkpoints without
    the field load with this default); ``tta``: test-time augmentation, the logit is the
    mean over the 8 flips / 90-degree rotations of the crop (cells have no orientation; 8x
    the inference compute; used for the temperature, the final metrics and prediction, not for
    the per-epoch validation of early stopping); ``weights_path``: optional local file with pretrained
    encoder weights (a ``state_dict``, loaded with ``weights_only=True``; the head is left
    out); ``threads``: CPU threads (``None``: every CPU this process may use); ``ema``: decay
    per step of an exponential moving average of the weights that is validated, kept,
    calibrated and saved instead of the raw weights (0 = off); ``label_smoothing``: each
    training target ``t`` becomes ``t (1 - e) + e / 2`` (against labels that are sometimes
    wrong; validation, calibration and metrics use the targets as they are).
    """

    preset: str = "cpu-fast"
    encoder: str = "resnet10t"
    crop_size: int = 40
    epochs: int = 16
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    ema: float = 0.98
    label_smoothing: float = 0.0
    input_scale: float = 1.0
    patience: int = 6
    monitor: str = "balanced_accuracy"
    balance: str = "weights"
    augment: bool = True
    tta: bool = True
    seed: int = 0
    weights_path: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        import timm

        if not timm.is_model(self.encoder):
            raise TrainingError(f"unknown encoder {self.encoder!r}; use a timm model name such as "
                                f"resnet10t, resnet18, mobilenetv3_small_100")
        for name in ("crop_size", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"{name} must be a positive integer; got {value!r}")
        if self.crop_size < 16:
            raise TrainingError(f"crop_size must be at least 16 pixels; got {self.crop_size}")
        if self.batch_size < 2:
            raise TrainingError(f"batch_size must be at least 2 (batch norm); got {self.batch_size}")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.dropout < 1 and self.patience >= 1):
            raise TrainingError("need lr > 0, weight_decay >= 0, 0 <= dropout < 1 and patience >= 1; got "
                                f"{self.lr}, {self.weight_decay}, {self.dropout}, {self.patience}")
        if not 0.0 <= self.ema < 1.0:
            raise TrainingError(f"ema must be in [0, 1) (0 = off); got {self.ema}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainingError(f"label_smoothing must be in [0, 1) (0 = off); got {self.label_smoothing}")
        if not 0.25 <= self.input_scale <= 4.0:
            raise TrainingError(f"input_scale must be within [0.25, 4]; got {self.input_scale}")
        if self.monitor not in MONITORS:
            raise TrainingError(f"unknown monitor {self.monitor!r}; allowed: {', '.join(MONITORS)}")
        if self.balance not in BALANCES:
            raise TrainingError(f"unknown balance {self.balance!r}; allowed: {', '.join(BALANCES)}")


#: presets: "cpu-fast" (the :class:`ClassifierConfig` defaults) trains on ~1,500 LDC crops in
#: about 2 min on one CPU core; "quality" is a bigger encoder on 2x resized crops and more
#: epochs, for a GPU
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-fast": {},
    "quality": {"encoder": "resnet18", "crop_size": 48, "input_scale": 2.0, "epochs": 60, "batch_size": 128,
                "patience": 15},
}


def config_for(preset: str = "cpu-fast", **overrides: Any) -> ClassifierConfig:
    """The config of ``preset`` with ``overrides`` (field name -> value; ``None`` values are ignored)."""
    if preset not in PRESETS:
        raise TrainingError(f"unknown classifier preset {preset!r}; allowed: {', '.join(PRESETS)}")
    names = {f.name for f in fields(ClassifierConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TrainingError(f"unknown classifier option(s) {unknown}; allowed: {', '.join(sorted(names))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return ClassifierConfig(**{**PRESETS[preset], **given, "preset": preset})


def config_from_dict(values: dict[str, Any]) -> ClassifierConfig:
    """Rebuild a config from ``config.json`` (extra keys such as ``kind`` are ignored)."""
    names = {f.name for f in fields(ClassifierConfig)}
    return ClassifierConfig(**{k: v for k, v in values.items() if k in names})


# ---------------------------------------------------------------- model


class CropClassifier(nn.Module):
    """timm encoder with one output: the alive logit. Input ``(N, 3, S, S)`` float in [0, 1].

    ``forward = head(features(x))``: ``features`` is the encoder's pooled pre-logits
    ``(N, F)``; ``head`` applies ``self.dropout`` (an ``nn.Dropout(dropout)``, the network's only
    stochastic layer: the encoder is built with ``drop_rate=0``) and the encoder's classifier.
    This is the computation timm does with ``drop_rate=dropout``, with the same state_dict
    keys (dropout has no parameters), so checkpoints load either way. Dropout right before the
    head lets MC dropout (:meth:`LoadedClassifier.predict_crops_mc`) sample it while batch
    norm stays in eval mode, running the encoder once for all samples.
    """

    def __init__(self, encoder: str, dropout: float = 0.0, input_scale: float = 1.0) -> None:
        super().__init__()
        import timm

        self.input_scale = float(input_scale)
        self.backbone = timm.create_model(encoder, pretrained=False, num_classes=1, in_chans=3, drop_rate=0.0)
        self.dropout = nn.Dropout(float(dropout))
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N, F)`` pooled encoder features (pre-logits, before dropout)."""
        if self.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.backbone.forward_head(self.backbone.forward_features((x - self.mean) / self.std), pre_logits=True)

    def head(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, F)`` features -> ``(N,)`` alive logits (dropout, then the encoder's classifier).

        ``mask``: an ``(N, F)`` dropout mask used instead of the dropout layer (MC dropout
        without switching the shared model to training mode)."""
        dropped = self.dropout(features) if mask is None else features * mask
        return self.backbone.get_classifier()(dropped)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S)`` -> ``(N,)`` alive logits."""
        return self.head(self.features(x))


def build_model(config: ClassifierConfig) -> CropClassifier:
    return CropClassifier(config.encoder, config.dropout, config.input_scale)


def load_pretrained(model: CropClassifier, path: Path | str) -> None:
    """Load encoder weights from a local ``state_dict`` file (``weights_only=True``).

    Keys may carry a ``backbone.`` prefix or not; tensors whose shape does not fit (the
    classification head) are left out. Raises :class:`TrainingError` when nothing fits.
    """
    state = load_weights(Path(path))
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = model.backbone.state_dict()
    usable = {}
    for key, value in state.items():
        key = key.removeprefix("backbone.")
        if key in own and hasattr(value, "shape") and tuple(value.shape) == tuple(own[key].shape):
            usable[key] = value
    if not usable:
        raise TrainingError(f"no tensor of {path} fits encoder {type(model.backbone).__name__}")
    model.backbone.load_state_dict(usable, strict=False)
    log.info("loaded %d of %d encoder tensors from %s", len(usable), len(own), path)


# ---------------------------------------------------------------- crops


class CropSet(NamedTuple):
    """Crops of labelled cells: ``crops`` ``(N, S, S, 3)`` uint8, ``p_alive`` ``(N,)`` float32
    soft target, ``weight`` ``(N,)`` float32 sample weight, ``label`` ``(N,)`` int64
    (1 = alive, 0 = dead)."""

    crops: np.ndarray
    p_alive: np.ndarray
    weight: np.ndarray
    label: np.ndarray


def crops_from_data(images: Sequence[AnnotatedImage], crop_size: int) -> CropSet:
    """Crops (reflect-padded, :func:`cellspot.crops.crop_around`) around every labelled cell
    of ``images``. Cells without an alive/dead label, with a NaN ``p_alive`` or weight <= 0
    are left out."""
    crops, p, w, y = [], [], [], []
    for im in images:
        c = im.cells
        keep = c["label"].isin(("alive", "dead")) & c["p_alive"].notna() & (c["weight"] > 0)
        for row in c[keep].itertuples(index=False):
            crops.append(crop_around(im.pixels, float(row.x), float(row.y), crop_size))
            p.append(row.p_alive)
            w.append(row.weight)
            y.append(1 if row.label == "alive" else 0)
    if not crops:
        empty = np.empty(0, np.float32)
        return CropSet(np.empty((0, crop_size, crop_size, 3), np.uint8), empty, empty.copy(), np.empty(0, np.int64))
    return CropSet(np.stack(crops), np.asarray(p, np.float32), np.asarray(w, np.float32), np.asarray(y, np.int64))


def balance_weights(label: np.ndarray) -> np.ndarray:
    """Per-sample class weights ``n / (2 n_class)`` (``(N,)`` float32): both classes weigh the same."""
    n = len(label)
    counts = np.bincount(label, minlength=2).astype(np.float64)
    per_class = np.where(counts > 0, n / (2.0 * np.maximum(counts, 1)), 0.0)
    return per_class[label].astype(np.float32)


# ---------------------------------------------------------------- calibration


def soft_nll(logits: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None, temperature: float = 1.0) -> float:
    """Weighted mean binary cross-entropy of ``sigmoid(logits / temperature)`` against soft targets."""
    z = torch.as_tensor(np.asarray(logits, np.float64) / temperature)
    t = torch.as_tensor(np.asarray(target, np.float64))
    w = torch.ones_like(t) if weight is None else torch.as_tensor(np.asarray(weight, np.float64))
    loss = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    return float((loss * w).sum() / w.sum().clamp_min(1e-12))


def fit_temperature(logits: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None) -> float:
    """Temperature ``T`` in [0.05, 20] minimising :func:`soft_nll` (1.0 with no data)."""
    from scipy.optimize import minimize_scalar

    if len(logits) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: soft_nll(logits, target, weight, math.exp(log_t)),
                             bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    best = math.exp(float(result.x))
    return best if soft_nll(logits, target, weight, best) < soft_nll(logits, target, weight, 1.0) else 1.0


# ---------------------------------------------------------------- training


@dataclass
class _State:
    """What a resumed run needs besides model / optimiser / scheduler."""

    epoch: int = 1  # the epoch in progress (1-based)
    step: int = 0  # completed steps of that epoch
    loss_sum: float = 0.0
    loss_count: int = 0
    best_key: list[float] = field(default_factory=lambda: [-math.inf, -math.inf])
    best_epoch: int = 0
    bad_epochs: int = 0
    curves: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    seconds: float = 0.0


class WarmupCosine:
    """Learning-rate factor per step: linear warm-up over the first 10 % of ``total`` steps
    (at least one), then a cosine down to ``floor``. Works for any ``total >= 1``; a plain
    object, so ``LambdaLR.state_dict()`` saves it (and ``weights_only`` loading accepts it)."""

    def __init__(self, total: int, warmup_fraction: float = 0.1, floor: float = 0.02) -> None:
        self.total = max(1, int(total))
        self.warmup = max(1, round(warmup_fraction * self.total))
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(n: int, cfg: ClassifierConfig, epoch: int, probs: np.ndarray | None) -> list[np.ndarray]:
    """Index batches of one epoch (deterministic in seed and epoch); a last batch of one is dropped."""
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.choice(n, size=n, replace=True, p=probs) if probs is not None else rng.permutation(n)
    if n % cfg.batch_size == 1 and n > 1:
        order = order[:-1]
    return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def _steps_per_epoch(n: int, cfg: ClassifierConfig) -> int:
    usable = n - 1 if (n % cfg.batch_size == 1 and n > 1) else n
    return max(1, math.ceil(usable / cfg.batch_size))


@torch.no_grad()
def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips / 90-degree rotations of a batch ``(N, C, S, S)`` (the identity first)."""
    views = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        views += [r, torch.flip(r, dims=(3,))]
    return views


def predict_logits(model: nn.Module, crops: np.ndarray, device: torch.device, batch_size: int = 256,
                   tta: bool = False) -> np.ndarray:
    """Alive logits ``(N,)`` float32 of ``crops`` ``(N, S, S, 3)`` uint8 (eval mode).

    ``tta``: the mean logit over the 8 :func:`dihedral_views` of every crop."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(crops), batch_size):
            x = images_to_tensor(crops[i:i + batch_size]).to(device)
            views = dihedral_views(x) if tta else [x]
            out.append(torch.stack([model(v).float() for v in views]).mean(0).cpu())
    return torch.cat(out).numpy() if out else np.empty(0, np.float32)


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / weight.sum().clamp_min(1e-12)


def _validate(model: nn.Module, val: CropSet, val_w: np.ndarray, device: torch.device,
              tta: bool = False) -> dict[str, float]:
    if not len(val.crops):
        return {}
    logits = predict_logits(model, val.crops, device, tta=tta)
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    metrics = classification_metrics(val.label, p)
    return {"val_loss": soft_nll(logits, val.p_alive, val_w), "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"]}


def _improved(cfg: ClassifierConfig, row: dict[str, float], state: _State) -> bool:
    """Early-stopping key: (balanced accuracy, -loss) or (-loss,); larger is better."""
    loss = -row["val_loss"]
    key = [row["val_balanced_accuracy"], loss] if cfg.monitor == "balanced_accuracy" else [loss, 0.0]
    best = state.best_key
    better = key[0] > best[0] + 1e-6 or (abs(key[0] - best[0]) <= 1e-6 and key[1] > best[1] + 1e-6)
    if better:
        state.best_key = key
    return better


class _Run:
    """One training run: data, model, optimiser, schedule and the loop (see :func:`fit_classifier`)."""

    def __init__(self, data: TrainingData, cfg: ClassifierConfig, out_dir: Path, device: torch.device,
                 progress: ProgressFn | None, should_stop: StopFn | None) -> None:
        self.data, self.cfg, self.out_dir, self.device = data, cfg, out_dir, device
        self.progress, self.should_stop = progress, should_stop
        self.sets = {s: crops_from_data(data.split(s), cfg.crop_size) for s in ("train", "val", "test")}
        train = self.sets["train"]
        if len(train.crops) < 2 or len(np.unique(train.label)) < 2:
            raise TrainingError(f"training needs alive and dead cells in the train split; got "
                                f"{int(train.label.sum())} alive, {int((train.label == 0).sum())} dead")
        balance = balance_weights(train.label) if cfg.balance != "none" else np.ones(len(train.label), np.float32)
        self.probs = balance / balance.sum() if cfg.balance == "sampler" else None
        weight = train.weight * (balance if cfg.balance == "weights" else 1.0)
        self.train_w = (weight / weight.mean()).astype(np.float32)
        val = self.sets["val"]
        self.val_w = val.weight * (balance_weights(val.label) if cfg.balance != "none" else 1.0)
        seed_everything(cfg.seed)
        self.model = build_model(cfg).to(device)
        self.steps = _steps_per_epoch(len(train.crops), cfg)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # with ``ema`` > 0, validation, the kept weights, calibration and the checkpoint use the
        # exponential moving average of the weights (batch-norm statistics included)
        self.ema = ema_model(self.model, cfg.ema)
        self.net = self.ema.module if self.ema is not None else self.model
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, WarmupCosine(cfg.epochs * self.steps))
        self.state = _State()
        self.clock = EtaClock()

    # -- resume
    def save_resume(self) -> None:
        s = self.state
        save_torch(self.out_dir / RESUME_FILE, {
            "config": json.dumps(asdict(self.cfg), sort_keys=True), "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "epoch": s.epoch, "step": s.step, "loss_sum": s.loss_sum, "loss_count": s.loss_count,
            "best_key": s.best_key, "best_epoch": s.best_epoch, "bad_epochs": s.bad_epochs, "curves": s.curves,
            "best_state": s.best_state or {}, "seconds": s.seconds + self.clock.elapsed(),
            "rng": torch.get_rng_state(),
        })

    def load_resume(self, path: Path) -> None:
        saved = load_weights(path)
        if json.loads(saved["config"]) != json.loads(json.dumps(asdict(self.cfg), sort_keys=True)):
            raise TrainingError(f"{path} was written with another config; resume with the same config "
                                f"or start a new run")
        self.model.load_state_dict(saved["model"])
        if self.ema is not None and saved.get("ema"):
            self.ema.load_state_dict(saved["ema"])
        self.opt.load_state_dict(saved["optimizer"])
        self.sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self.state = _State(
            epoch=int(saved["epoch"]), step=int(saved["step"]), loss_sum=float(saved["loss_sum"]),
            loss_count=int(saved["loss_count"]), best_key=[float(v) for v in saved["best_key"]],
            best_epoch=int(saved["best_epoch"]), bad_epochs=int(saved["bad_epochs"]), curves=list(saved["curves"]),
            best_state=dict(saved["best_state"]) or None, seconds=float(saved["seconds"]),
        )
        log.info("resuming %s at epoch %d step %d", self.out_dir, self.state.epoch, self.state.step)

    # -- progress
    def emit(self, phase: str, epoch: int, step: int, **values: Any) -> None:
        if self.progress is None:
            return
        event = Progress(epoch=epoch, epochs=self.cfg.epochs, step=step, steps=self.steps, phase=phase,
                         elapsed_s=self.state.seconds + self.clock.elapsed(), **values)
        eta = self.clock.eta(event.fraction)  # the steps' pace after the first step (start-up costs)
        self.progress(Progress(**{**event.__dict__, "eta_s": eta if phase != "done" else 0.0}))

    # -- loop
    def train_epoch(self, epoch: int) -> float:
        cfg, s, train = self.cfg, self.state, self.sets["train"]
        batches = _batches(len(train.crops), cfg, epoch, self.probs)
        pipeline = crop_transforms(cfg.augment, cfg.crop_size)
        self.model.train()
        for step in range(s.step, len(batches)):
            if self.should_stop is not None and self.should_stop():
                self.save_resume()
                raise TrainingCancelled(f"training cancelled at epoch {epoch} step {step}; "
                                        f"resume.pt written to {self.out_dir}")
            idx = batches[step]
            pipeline.set_random_seed(cfg.seed * 1_000_003 + epoch * 10_007 + step)
            crops = augment_crops(pipeline, train.crops[idx])
            x = images_to_tensor(crops).to(self.device)
            target = torch.from_numpy(train.p_alive[idx]).to(self.device)
            if cfg.label_smoothing:
                target = target * (1.0 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
            weight = torch.from_numpy(self.train_w[idx]).to(self.device)
            loss = _loss(self.model(x), target, weight)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            s.step, s.loss_sum, s.loss_count = step + 1, s.loss_sum + float(loss.detach()) * len(idx), s.loss_count + len(idx)
            self.emit("train", epoch, step + 1, train_loss=s.loss_sum / s.loss_count)
        return s.loss_sum / max(1, s.loss_count)

    def run(self) -> None:
        cfg, s = self.cfg, self.state
        while s.epoch <= cfg.epochs:
            epoch, started = s.epoch, time.perf_counter()
            train_loss = self.train_epoch(epoch)
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": self.sched.get_last_lr()[0]}
            row.update(_validate(self.net, self.sets["val"], self.val_w, self.device))  # no TTA: 8x cheaper
            row["seconds"] = time.perf_counter() - started
            has_val = "val_loss" in row
            if not has_val or _improved(cfg, row, s):
                s.best_epoch, s.bad_epochs = epoch, 0
                s.best_state = copy.deepcopy(self.net.state_dict())
            else:
                s.bad_epochs += 1
            s.curves.append(row)
            metrics = {k: v for k, v in row.items() if k.startswith("val_") and k != "val_loss"}
            self.emit("epoch_end", epoch, self.steps, train_loss=train_loss, val_loss=row.get("val_loss"),
                      metrics=metrics, message=f"epoch {epoch}: best {s.best_epoch}")
            log.info("epoch %d/%d: %s", epoch, cfg.epochs, {k: round(v, 4) for k, v in row.items()})
            s.epoch, s.step, s.loss_sum, s.loss_count = epoch + 1, 0, 0.0, 0
            if has_val and s.bad_epochs >= cfg.patience:
                log.info("early stop after epoch %d (best epoch %d)", epoch, s.best_epoch)
                break
        if s.best_state is not None:
            self.net.load_state_dict(s.best_state)

    def finish(self) -> tuple[float, dict[str, Any]]:
        """Temperature on val, metrics on test (or val); returns (temperature, metrics)."""
        val, test = self.sets["val"], self.sets["test"]
        self.emit("calibrate", len(self.state.curves), self.steps, message="temperature scaling")
        val_logits = predict_logits(self.net, val.crops, self.device, tta=self.cfg.tta)
        temperature = fit_temperature(val_logits, val.p_alive, val.weight)
        metrics: dict[str, Any] = {
            "temperature": temperature,
            "val_nll_before": soft_nll(val_logits, val.p_alive, val.weight) if len(val.crops) else None,
            "val_nll_after": soft_nll(val_logits, val.p_alive, val.weight, temperature) if len(val.crops) else None,
        }
        name, chosen = ("test", test) if len(test.crops) else ("val", val)
        if not len(chosen.crops):
            log.warning("no validation or test cells: metrics are on the training crops")
            name, chosen = "train", self.sets["train"]
        logits = predict_logits(self.net, chosen.crops, self.device, tta=self.cfg.tta)
        p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64) / temperature))
        metrics.update(classification_metrics(chosen.label, p))
        metrics["split"] = name
        metrics["counts"] = {k: {"alive": int(v.label.sum()), "dead": int((v.label == 0).sum())}
                             for k, v in self.sets.items()}
        if len(val.crops) and name != "val":
            pv = 1.0 / (1.0 + np.exp(-val_logits.astype(np.float64) / temperature))
            metrics["val"] = classification_metrics(val.label, pv)
        return temperature, metrics


def _versions() -> dict[str, str]:
    import segmentation_models_pytorch as smp
    import timm

    return {"cellspot": cellspot.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "segmentation_models_pytorch": smp.__version__}


def fit_classifier(
    data: TrainingData,
    config: ClassifierConfig | None,
    out_dir: Path | str,
    *,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    resume: bool = False,
    device: str | None = None,
) -> FitResult:
    """Train the alive/dead classifier on ``data`` and write the checkpoint folder ``out_dir``.

    ``config``: default ``config_for("cpu-fast")``. ``progress`` gets a :class:`Progress` after
    every step (phase "train") and epoch ("epoch_end", with validation loss and metrics), then
    "calibrate" and "done". ``should_stop`` is polled before every step; when it returns true,
    ``resume.pt`` is written and :class:`TrainingCancelled` raised. ``resume=True`` continues
    from ``out_dir/resume.pt`` (same config required; without the file training starts over).
    ``device``: "cpu", "cuda", ... (default CUDA when present).

    Writes ``weights.pt``, ``config.json`` (the config plus ``kind``, ``temperature``,
    versions and the data snapshot id / source), ``metrics.json`` (test metrics, see
    :func:`classification_metrics`, plus ``temperature``, validation NLL before / after
    scaling, ``best_epoch``) and ``curves.json``. Raises :class:`TrainingError` for data
    without both classes in the train split or a bad config.
    """
    cfg = config or config_for("cpu-fast")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = configure_threads(cfg.threads)
    dev = pick_device(device)
    run = _Run(data, cfg, out_dir, dev, progress, should_stop)
    resume_path = out_dir / RESUME_FILE
    if resume and resume_path.is_file():
        run.load_resume(resume_path)
    else:
        if resume:
            log.warning("no %s in %s: training from the start", RESUME_FILE, out_dir)
        if cfg.weights_path:
            load_pretrained(run.model, cfg.weights_path)
    log.info("training classifier on %s (%d threads): %s crops", dev, threads,
             {k: len(v.crops) for k, v in run.sets.items()})
    run.run()
    temperature, metrics = run.finish()
    seconds = run.state.seconds + run.clock.elapsed()
    epochs_run = len(run.state.curves)
    metrics.update({"best_epoch": run.state.best_epoch, "epochs_run": epochs_run, "seconds": seconds})
    saved_config = {**asdict(cfg), "kind": KIND, "temperature": temperature, "output": "alive logit",
                    "positive_class": "dead", "versions": _versions(), "device": str(dev), "threads": threads,
                    "data": {"snapshot_id": data.snapshot_id, "source": data.source}}
    if should_stop is not None:  # once more before the files: a run taken over meanwhile raises here
        should_stop()
    save_checkpoint(out_dir, run.net.state_dict(), saved_config, metrics, run.state.curves)
    resume_path.unlink(missing_ok=True)
    run.emit("done", epochs_run, run.steps,
             metrics={k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)},
             message=end_message(epochs_run, cfg.epochs, run.state.best_epoch, epochs_run < cfg.epochs))
    return FitResult(model_dir=out_dir, metrics=metrics, curves=run.state.curves, epochs_run=epochs_run,
                     best_epoch=run.state.best_epoch, seconds=seconds)


# ---------------------------------------------------------------- inference


@dataclass
class LoadedClassifier:
    """A trained classifier ready for inference (see :func:`load_classifier`)."""

    config: ClassifierConfig
    version: str
    model: CropClassifier
    temperature: float
    device: torch.device
    raw_config: dict[str, Any] = field(default_factory=dict)

    def predict_crops(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """``crops`` ``(N, S, S, 3)`` uint8 with ``S = config.crop_size`` -> calibrated ``p_alive`` ``(N,)`` float32."""
        crops = self._check_crops(crops)
        logits = predict_logits(self.model, crops, self.device, batch_size, tta=self.config.tta)
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64) / self.temperature))).astype(np.float32)

    def predict_cells(self, pixels: np.ndarray, xy: np.ndarray) -> np.ndarray:
        """``p_alive`` ``(N,)`` of the cells at ``xy`` ``(N, 2)`` (x, y pixels) of ``pixels`` ``(H, W, 3)`` uint8."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        size = self.config.crop_size
        if not len(xy):
            return np.empty(0, np.float32)
        crops = np.stack([crop_around(pixels, float(x), float(y), size) for x, y in xy])
        return self.predict_crops(crops)

    def predict_crops_mc(
        self, crops: np.ndarray, samples: int = 20, seed: int = 0, batch_size: int = 256
    ) -> np.ndarray:
        """MC-dropout samples of calibrated ``p_alive``: ``crops`` ``(N, S, S, 3)`` uint8 -> ``(N, T)``
        float32 with ``T = samples``.

        Sample ``t`` is ``sigmoid(head_t(f) / temperature)``: ``f`` the encoder features in eval
        mode (batch norm uses its running statistics), ``head_t`` the classifier head with
        dropout on (rate ``config.dropout``, a fresh mask per sample and crop, drawn from a
        ``torch.Generator`` seeded with ``seed``: the same seed gives the same samples; neither
        the global RNG nor the model's train / eval mode changes, so a shared model stays safe).
        Dropout sits only before the head (:class:`CropClassifier`), so the encoder runs once
        and the ``T`` samples cost ``T`` small matrix products. With ``config.tta`` ``f`` is
        the mean feature over the 8 :func:`dihedral_views` (the head is linear, so a sample
        without dropout equals the TTA logit of :meth:`predict_crops`).
        With ``config.dropout == 0`` every sample equals :meth:`predict_crops`.
        :func:`cellspot.active.strategies.mutual_information` turns the samples into BALD.
        """
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"samples must be a positive integer; got {samples!r}")
        crops = self._check_crops(crops)
        model, rate = self.model, float(self.model.dropout.p)
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), batch_size):
                x = images_to_tensor(crops[i:i + batch_size]).to(self.device)
                views = dihedral_views(x) if self.config.tta else [x]
                feats = torch.stack([model.features(v).float() for v in views]).mean(0)
                logits = [model.head(feats, _dropout_mask(feats, rate, generator)) for _ in range(int(samples))]
                out.append(torch.stack(logits, dim=1).double().cpu())
        if not out:
            return np.empty((0, int(samples)), np.float32)
        return torch.sigmoid(torch.cat(out) / self.temperature).numpy().astype(np.float32)

    def predict_cells_mc(self, pixels: np.ndarray, xy: np.ndarray, samples: int = 20, seed: int = 0) -> np.ndarray:
        """MC-dropout ``p_alive`` samples ``(N, T)`` of the cells at ``xy`` ``(N, 2)`` (x, y pixels) of
        ``pixels`` ``(H, W, 3)`` uint8; see :meth:`predict_crops_mc`."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        size = self.config.crop_size
        if not len(xy):
            return self.predict_crops_mc(np.empty((0, size, size, 3), np.uint8), samples, seed)
        crops = np.stack([crop_around(pixels, float(x), float(y), size) for x, y in xy])
        return self.predict_crops_mc(crops, samples, seed)

    def _check_crops(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.config.crop_size, self.config.crop_size, 3):
            raise ValueError(f"expected crops of shape (N, {self.config.crop_size}, {self.config.crop_size}, 3); "
                             f"got {crops.shape}")
        return crops.astype(np.uint8, copy=False)


def _dropout_mask(features: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Inverted-dropout mask shaped like ``features``: 0 with probability ``rate``, else ``1 / (1 - rate)``."""
    if rate <= 0.0:
        return torch.ones_like(features)
    keep = torch.rand(features.shape, generator=generator, device=features.device) >= rate
    return keep.to(features.dtype) / (1.0 - rate)


def load_classifier(model_dir: Path | str, device: str | None = None) -> LoadedClassifier:
    """Rebuild the classifier of a checkpoint folder (``config.json`` + ``weights.pt``, ``weights_only=True``).

    ``version`` is the folder's name. Raises :class:`TrainingError` for a folder that is not
    a classifier checkpoint.
    """
    model_dir = Path(model_dir)
    raw, cfg, model = restore_model(model_dir, KIND, config_from_dict, build_model)
    dev = pick_device(device)
    model.to(dev).eval()
    return LoadedClassifier(config=cfg, version=model_version(model_dir), model=model,
                            temperature=float(raw.get("temperature") or 1.0), device=dev, raw_config=raw)

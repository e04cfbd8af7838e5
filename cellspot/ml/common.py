"""Shared pieces of every training run: progress events, cancellation, device, threads and
checkpoint folders.

A checkpoint is a folder::

    weights.pt      the model's ``state_dict`` (load with :func:`load_weights`, ``weights_only=True``)
    config.json     the typed training config (``dataclasses.asdict``) plus ``kind`` and versions
    metrics.json    final metrics on the validation / test images
    curves.json     one row per epoch: losses, metrics, seconds
    resume.pt       optional: model + optimiser + scheduler + epoch, to resume a cancelled run

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

log = logging.getLogger(__name__)

from cellspot.ml.files import CONFIG_FILE, CURVES_FILE, METRICS_FILE, RESUME_FILE, RUN_FILE, WEIGHTS_FILE  # noqa: F401


class TrainingError(ValueError):
    """Training cannot start or go on (no data, bad config, unreadable checkpoint)."""


class TrainingCancelled(RuntimeError):
    """Raised inside ``fit`` when ``should_stop()`` returned true; ``resume.pt`` is saved first."""


@dataclass(frozen=True)
class Progress:
    """One progress event of a training run (sent after every step and every epoch).

    ``step``/``steps`` count batches within the epoch; ``epoch`` is 1-based.
    ``phase``: "train", "val", "epoch_end", "calibrate", "done".
    """

    epoch: int
    epochs: int
    step: int
    steps: int
    phase: str = "train"
    train_loss: float | None = None
    val_loss: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    eta_s: float | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        """Overall completion in [0, 1] (epochs and steps); 1 once the run is done (also after an early stop)."""
        if self.phase == "done":
            return 1.0
        if self.epochs <= 0:
            return 0.0
        inner = self.step / self.steps if self.steps else 0.0
        return float(min(1.0, max(0.0, ((self.epoch - 1) + inner) / self.epochs)))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = dict(self.metrics)
        out["fraction"] = self.fraction
        return out


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def end_message(epochs_run: int, epochs: int, kept_epoch: int, stopped_early: bool) -> str:
    """How a run ended, for its last progress event: ``"stopped early after epoch 23 of 40, kept
    epoch 15"`` (or ``"ran 40 of 40 epochs, kept epoch 38"``; a time budget can end it before ``epochs``)."""
    how = f"stopped early after epoch {epochs_run} of {epochs}" if stopped_early else \
        f"ran {epochs_run} of {epochs} epochs"
    return f"{how}, kept epoch {kept_epoch}"


class EtaClock:
    """Elapsed time, and an ETA from the pace of the steps after the first.

    The first step carries the start-up (data, model, the first batch's allocations): an ETA
    from it said "8 min 55 s" at the detector's step 1 for an 80 s run. :meth:`eta` therefore
    starts its stopwatch at the first progress it sees and gives ``None`` ("estimating") until
    the fraction has moved ``min_steps`` more times, or once when those steps are slow (at least
    :data:`MIN_SECONDS` since the first): a short run of long steps (a classifier's 3-step
    epochs) said "estimating" for half of it."""

    #: steps after the first one before :meth:`eta` gives an estimate ...
    MIN_STEPS = 3
    #: ... or seconds after the first, when one more step has come
    MIN_SECONDS = 5.0

    def __init__(self, min_steps: int = MIN_STEPS, now: Callable[[], float] = time.perf_counter) -> None:
        self.now, self.min_steps = now, min_steps
        self.start = now()
        self._mark: tuple[float, float] | None = None  # (time, fraction) at the first progress
        self._last, self._steps = 0.0, 0

    def elapsed(self) -> float:
        return self.now() - self.start

    def eta(self, fraction: float, budget_left_s: float | None = None) -> float | None:
        """Seconds left at ``fraction`` (0-1) done, at the pace since the first progress; ``None``
        until ``min_steps`` steps after it (or one, :data:`MIN_SECONDS` after it). ``budget_left_s``: a time budget's remaining seconds,
        an upper bound."""
        now = self.now()
        if fraction >= 1.0:
            return 0.0
        if fraction <= 0:
            return None
        if self._mark is None:
            self._mark, self._last = (now, fraction), fraction
            return None
        if fraction > self._last:
            self._last, self._steps = fraction, self._steps + 1
        slow = self._steps >= 1 and now - self._mark[0] >= self.MIN_SECONDS
        if (self._steps < self.min_steps and not slow) or fraction <= self._mark[1]:
            return None
        eta = (now - self._mark[0]) * (1.0 - fraction) / (fraction - self._mark[1])
        return eta if budget_left_s is None else min(eta, max(0.0, budget_left_s))


@dataclass
class FitResult:
    """What a ``fit`` returns: where the checkpoint is and what it scored."""

    model_dir: Path
    metrics: dict[str, Any]
    curves: list[dict[str, Any]]
    epochs_run: int
    best_epoch: int
    seconds: float


def parse_override(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE`` -> ``(FIELD, VALUE)``: a config override as typed on a command line.

    The value is read as JSON when it parses (``3``, ``0.5``, ``true``, ``[64, 32]``), a list of
    JSON values when it is comma-separated (``64,32``), else kept as text (``polarity=auto``).
    Raises :class:`TrainingError` without a ``=`` or a field name.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise TrainingError(f"expected FIELD=VALUE, got {text!r}")
    for candidate in (value, f"[{value}]" if "," in value else None):
        if candidate is not None:
            try:
                return key.strip(), json.loads(candidate)
            except json.JSONDecodeError:
                pass
    return key.strip(), value


def split_overrides(text: str) -> list[str]:
    """``"a=1 b=[64, 32]"`` -> ``["a=1", "b=[64, 32]"]``: the ``FIELD=VALUE`` items of one line,
    split where a space is followed by the next ``FIELD=`` (a value may hold spaces)."""
    text = text.strip()
    return re.split(r"\s+(?=[A-Za-z_]\w*\s*=)", text) if text else []


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` items -> ``{FIELD: VALUE}`` (see :func:`parse_override`; a later item wins)."""
    return dict(parse_override(item) for item in items)


def pick_device(prefer: str | None = None) -> torch.device:
    """``prefer`` ("cpu", "cuda", "cuda:1") or CUDA when available, else CPU."""
    if prefer:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise TrainingError(f"device {prefer!r} asked for, but CUDA is not available here")
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: ``n`` or the CPUs this process may use (at least 1).

    Returns the number set. Inter-op threads stay at torch's default.
    """
    if n is None:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            n = os.cpu_count() or 1
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's legacy global generator."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TrainingError(f"{path} is missing: not a cellspot model folder?") from None
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None


def save_torch(path: Path, obj: Any) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_weights(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a ``state_dict`` (or resume state) with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"{path} is missing: not a cellspot model folder?")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise TrainingError(f"cannot load weights from {path}: {exc}") from exc


def save_checkpoint(
    model_dir: Path,
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    curves: list[dict[str, Any]],
) -> None:
    """Write the checkpoint folder (weights, config, metrics, curves)."""
    model_dir = Path(model_dir)
    save_torch(model_dir / WEIGHTS_FILE, {k: v.detach().cpu() for k, v in state_dict.items()})
    write_json(model_dir / CONFIG_FILE, config)
    write_json(model_dir / METRICS_FILE, metrics)
    write_json(model_dir / CURVES_FILE, curves)
    log.info("checkpoint written to %s", model_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    return read_json(Path(model_dir) / CONFIG_FILE)


def restore_model(
    model_dir: Path | str,
    kind: str,
    make_config: Callable[[dict[str, Any]], Any],
    build: Callable[[Any], torch.nn.Module],
) -> tuple[dict[str, Any], Any, torch.nn.Module]:
    """Rebuild the network of checkpoint folder ``model_dir`` on the CPU, weights loaded with
    ``weights_only=True``: returns (raw config.json, ``make_config(raw)``, the network).

    Raises :class:`TrainingError` when the folder holds another kind of model, or when its
    weights do not fit the network its config describes.
    """
    model_dir = Path(model_dir)
    raw = read_config(model_dir)
    if raw.get("kind") is None:
        raise TrainingError(f"{model_dir / 'config.json'} names no model kind ('kind': classifier or detector): "
                            "not a cellspot model folder?")
    if raw.get("kind") != kind:
        raise TrainingError(f"{model_dir} holds a {raw.get('kind')!r} model, not a {kind}")
    config = make_config(raw)
    model = build(config)
    try:
        model.load_state_dict(load_weights(model_dir / WEIGHTS_FILE))
    except RuntimeError as exc:
        raise TrainingError(f"weights in {model_dir} do not fit the network in its config.json: {exc}") from exc
    return raw, config, model


def model_version(model_dir: Path | str) -> str:
    """The version of the model in ``model_dir``: the one its :data:`RUN_FILE` records (a run of
    the registry trained into a folder of any name, ``--out``), else the folder's name."""
    model_dir = Path(model_dir)
    try:
        version = json.loads((model_dir / RUN_FILE).read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        version = None
    return version if isinstance(version, str) and version else model_dir.name


def read_metrics(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / METRICS_FILE
    return read_json(path) if path.exists() else {}


def read_curves(model_dir: Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / CURVES_FILE
    return read_json(path) if path.exists() else []


def ema_model(model: torch.nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (None when ``decay`` is 0).

    Call ``.update_parameters(model)`` after every optimiser step; ``.module`` is the averaged
    network. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so
    a short run (a few dozen steps) averages over its recent steps rather than dragging its
    random initialisation along; the first update copies the model.
    """
    if decay <= 0:
        return None

    def average(avg: torch.Tensor, new: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        steps = int(n)
        d = min(float(decay), (1.0 + steps) / (10.0 + steps))
        if not avg.is_floating_point():  # integer buffers (batch-norm counters) take the latest value
            return new.detach().clone()
        return avg.detach() * d + new.detach() * (1.0 - d)

    return AveragedModel(model, avg_fn=average, use_buffers=True)

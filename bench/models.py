"""Benchmark of the models (issue 4) on real data, each beside a classical baseline.

Every step runs the model and its baseline in the same process, on the same images and
crops, and prints the difference / ratio. Data: ../shared/data (skipped with a message when
absent). Splits: the project's image-level rule (:func:`cellspot.ml.data.load_folder`;
NIH malaria by patient, :func:`cellspot.ml.data.load_crop_folder`).

* ``ldc-cls``  LDC alive/dead classifier on crops at the true boxes (balanced accuracy on
  the test images), and again trained on a simulated class's consensus (5 students, the
  realistic profile, :func:`cellspot.consensus.run_consensus` default method; ``p_alive`` as
  soft target, confidence as weight) and tested on the true cells of the same test images.
  Baseline: scikit-learn on hand-made features of the same crops (:mod:`baselines`; the best
  of gradient boosting / logistic regression / random forest on validation).
* ``malaria``  NIH malaria crops, parasitized vs uninfected (accuracy), same baseline.
* ``dsb-det``  DSB2018 nuclei: F1 of one-to-one matched instances at IoU >= 0.5 (counts
  pooled over the test images). Baseline: Otsu + distance-transform watershed, its
  parameters tuned on the training images.
* ``ldc-det``  LDC points matched within half a diameter (F1); baseline as above with
  brightfield feature maps (local variance / gradient / contrast), tuned on train.
* ``pipeline`` LDC: detect, then classify every found cell: F1 and balanced label accuracy
  of the matched cells; baseline watershed + feature classifier.
* ``cost``     training seconds (classifier on the LDC crops, LDC detector), prediction
  images/s at 256x256 and seconds for one 1024x1024 image (detect + classify), peak RSS.
* ``seeds``    (only when named in ``--only``) the LDC true-box and malaria classifiers trained
  again with ``--seeds`` training seeds on the same split: the metric per seed, its spread,
  the metric of the seeds' ensemble, and how many test cells every seed gets wrong.

The LDC detector and classifier trained by one step are reused by the later ones.

    python bench/models.py                         # everything, 2 threads (~30 min on 2 cores)
    python bench/models.py --quick                 # smoke run, tiny subsets and epochs (< 3 min)
    python bench/models.py --only ldc-cls,malaria  # some steps
    python bench/models.py --only pipeline,cost --reuse   # reuse models in bench/out/models
    python bench/models.py --only seeds --seeds 3  # training-seed spread of the classifiers (~20 min)

Writes bench/out/models.json and bench/out/models.md (bench/out is not tracked).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helpers, however this file is run
from baselines import (  # noqa: E402
    WatershedParams, crop_features, default_grid, fit_best_classifier, tune_watershed, watershed_detect,
)
from benchkit import fmt as _fmt, start_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STEPS = ("ldc-cls", "malaria", "dsb-det", "ldc-det", "pipeline", "cost")
#: steps run only when named in ``--only``
EXTRA_STEPS = ("seeds",)
ALL_STEPS = STEPS + EXTRA_STEPS

log = logging.getLogger("bench.models")

#: malaria crops are whole 50 px cells (the default 40 px crop would cut into them); more epochs
#: and patience than the preset for this bigger, noisier set
MALARIA_CLASSIFIER: dict[str, Any] = {"crop_size": 50, "epochs": 30, "patience": 10}


@dataclasses.dataclass
class Target:
    """One row of the final table: ``value`` against ``threshold`` (``>=`` or ``<=``) and a baseline."""

    step: str
    name: str
    value: float
    threshold: float
    higher_is_better: bool = True
    baseline: float | None = None
    unit: str = ""

    @property
    def met(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    @property
    def beats_baseline(self) -> bool | None:
        if self.baseline is None or not np.isfinite(self.baseline):
            return None
        return self.value > self.baseline if self.higher_is_better else self.value < self.baseline

    def row(self) -> dict[str, Any]:
        op = ">=" if self.higher_is_better else "<="
        diff = None if self.baseline is None else self.value - self.baseline
        ratio = (self.value / self.baseline if self.baseline not in (None, 0) and np.isfinite(self.baseline)
                 else None)
        return {"step": self.step, "target": f"{self.name} {op} {self.threshold:g}{self.unit}",
                "value": self.value, "baseline": self.baseline, "difference": diff, "ratio": ratio,
                "met": self.met, "beats_baseline": self.beats_baseline}


@dataclasses.dataclass
class Bench:
    """State shared by the steps: options, results, and the models trained so far."""

    args: argparse.Namespace
    out: Path
    targets: list[Target] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    def model_dir(self, name: str) -> Path:
        return self.out / "models" / name


# --------------------------------------------------------------------------------- helpers


def fit_progress(desc: str) -> tuple[Callable[[Any], None], Callable[[], None]]:
    """A ``progress`` callback drawing a tqdm bar (0..100 %) and a function that closes it."""
    bar = tqdm(total=100, desc=desc, unit="%", leave=True, dynamic_ncols=True)

    def update(event: Any) -> None:
        bar.n = int(round(100 * event.fraction))
        post = {}
        if event.train_loss is not None:
            post["loss"] = f"{event.train_loss:.3f}"
        for key in ("balanced_accuracy", "f1", "instance_f1"):
            if key in event.metrics:
                post[key] = f"{event.metrics[key]:.3f}"
        if event.eta_s is not None:
            post["eta"] = f"{event.eta_s:.0f}s"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    return update, bar.close


def subset(data: Any, caps: dict[str, int], seed: int, smallest: bool = False) -> Any:
    """``data`` with at most ``caps[split]`` images per split (random, or the smallest images)."""
    from cellspot.ml.data import TrainingData

    rng = np.random.default_rng(seed)
    keep = []
    for split in ("train", "val", "test"):
        images = data.split(split)
        if smallest:
            images = sorted(images, key=lambda im: im.pixels.shape[0] * im.pixels.shape[1])
        else:
            images = [images[i] for i in rng.permutation(len(images))]
        keep += images[: caps.get(split, len(images))]
    return TrainingData(images=keep, source=data.source)


def truth_points(images: list[Any]) -> pd.DataFrame:
    """True cells of ``images`` as a table image, x, y, label, diameter (for point_metrics)."""
    rows = [im.cells.assign(image=im.name)[["image", "x", "y", "label", "diameter"]] for im in images]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["image", "x", "y", "label",
                                                                              "diameter"])


def points_frame(name: str, xy: np.ndarray, p_alive: np.ndarray | None = None) -> pd.DataFrame:
    xy = np.asarray(xy, float).reshape(-1, 2)
    p = np.ones(len(xy)) if p_alive is None else np.asarray(p_alive, float)
    return pd.DataFrame({"image": name, "x": xy[:, 0], "y": xy[:, 1],
                         "label": np.where(p >= 0.5, "alive", "dead"), "p_alive": p})


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; ``ru_maxrss`` is KiB on Linux)."""
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def fmt(v: Any, digits: int = 4) -> str:
    """:func:`benchkit.fmt` with 4 decimals by default."""
    return _fmt(v, digits)


def side_by_side(title: str, rows: dict[str, dict[str, float]], keys: list[str]) -> str:
    """A markdown table: one row per method, the ``keys`` as columns, plus model / baseline ratios."""
    lines = [f"\n### {title}\n", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for method, metrics in rows.items():
        lines.append(f"| {method} | " + " | ".join(fmt(metrics.get(k)) for k in keys) + " |")
    if len(rows) == 2:
        (_, a), (_, b) = rows.items()
        ratios = [fmt(a.get(k) / b.get(k) if b.get(k) else None, 3) for k in keys]
        lines.append("| model / baseline | " + " | ".join(ratios) + " |")
    text = "\n".join(lines)
    print(text)
    return text


# --------------------------------------------------------------------------------- data


def load_ldc(bench: Bench) -> Any:
    if "ldc" not in bench.cache:
        from cellspot.ml.data import load_folder

        base = SHARED / "ldc_living_dead_cells"
        data = load_folder(base / "images", base / "annotations.csv", seed=bench.args.seed)
        if bench.quick:
            data = subset(data, {"train": 40, "val": 10, "test": 15}, bench.args.seed)
        bench.cache["ldc"] = data
        log.info("LDC: %s images per split", {s: len(data.split(s)) for s in ("train", "val", "test")})
    return bench.cache["ldc"]


# --------------------------------------------------------------------------------- classifier steps


def classifier_config(bench: Bench, **extra: Any) -> Any:
    from cellspot.ml.classifier import config_for

    over: dict[str, Any] = {"seed": bench.args.seed, "threads": bench.args.threads, **extra, **bench.args.cls_set}
    if bench.quick:
        over.update(epochs=2, patience=2)  # epochs=1 x ~5 steps trips OneCycleLR (see report)
    return config_for(bench.args.cls_preset, **over)


def train_classifier(bench: Bench, data: Any, name: str, **config: Any) -> tuple[Any, float]:
    """Fit (or, with ``--reuse``, load) a classifier in ``out/models/name``; returns it and its training seconds."""
    from cellspot.ml.classifier import fit_classifier, load_classifier

    return _train_or_reuse(bench, data, name, fit_classifier, load_classifier, classifier_config(bench, **config))


def _train_or_reuse(bench: Bench, data: Any, name: str, fit: Callable[..., Any], load: Callable[..., Any],
                    config: Any) -> tuple[Any, float]:
    """Fit a model into ``out/models/name`` with a progress bar, or with ``--reuse`` take the
    one already there; returns the loaded model and its training seconds."""
    from cellspot.ml.common import read_metrics

    model_dir = bench.model_dir(name)
    if bench.args.reuse and (model_dir / "weights.pt").is_file():
        seconds = float(read_metrics(model_dir).get("seconds", float("nan")))
        print(f"{name}: reusing {model_dir} (trained in {seconds:.0f} s)")
    else:
        update, close = fit_progress(f"train {name}")
        start = time.perf_counter()
        try:
            fit(data, config, model_dir, progress=update, device=bench.args.device)
        finally:
            close()
        seconds = time.perf_counter() - start
    return load(model_dir, device=bench.args.device), seconds


def baseline_classifier(bench: Bench, data: Any, crop_size: int, radius: float) -> tuple[Any, dict[str, Any]]:
    """Feature classifier fitted on the train crops of ``data`` (model chosen on val)."""
    from cellspot.ml.classifier import crops_from_data

    sets = {s: crops_from_data(data.split(s), crop_size) for s in ("train", "val")}
    start = time.perf_counter()
    feats = {s: crop_features(v.crops, radius) for s, v in sets.items()}
    fitted = fit_best_classifier(feats["train"], (sets["train"].p_alive >= 0.5).astype(int),
                                 feats["val"], (sets["val"].p_alive >= 0.5).astype(int),
                                 weights=sets["train"].weight, seed=bench.args.seed)
    seconds = time.perf_counter() - start
    return fitted, {"chosen": fitted.name, "val_balanced_accuracy": fitted.val_scores, "seconds": seconds,
                    "n_train": len(sets["train"].crops), "n_val": len(sets["val"].crops)}


def evaluate_classifiers(test_images: list[Any], model: Any, baseline: Any, radius: float,
                         desc: str) -> dict[str, dict[str, Any]]:
    """Metrics of the model and of the baseline on the true cells of ``test_images``."""
    from cellspot.evaluation import classification_metrics
    from cellspot.ml.classifier import crops_from_data

    crops = crops_from_data(test_images, model.config.crop_size)
    y = crops.label
    p_model = np.concatenate([model.predict_crops(chunk) for chunk in
                              tqdm(np.array_split(crops.crops, max(1, len(y) // 256)), desc=desc, leave=False)])
    p_base = baseline.predict_proba(crop_features(crops.crops, radius))
    return {"model": classification_metrics(y, p_model), "baseline": classification_metrics(y, p_base)}


def cell_radius(data: Any) -> float:
    """Half the typical cell diameter, estimated without the test split (for the baselines' features)."""
    from cellspot.ml.data import estimate_diameter

    return estimate_diameter(data.without_test()) / 2


def step_ldc_cls(bench: Bench) -> None:
    data = load_ldc(bench)
    radius = cell_radius(data)
    model, seconds = train_classifier(bench, data, "ldc-classifier")
    base, base_info = baseline_classifier(bench, data, model.config.crop_size, radius)
    res = evaluate_classifiers(data.split("test"), model, base, radius, "ldc test crops")
    bench.cache.update(ldc_classifier=model, ldc_baseline_classifier=base, ldc_classifier_seconds=seconds,
                       ldc_classifier_crops=base_info["n_train"] + base_info["n_val"])
    keys = ["balanced_accuracy", "accuracy", "f1", "roc_auc", "ece", "brier"]
    text = side_by_side(f"LDC alive/dead on true-box crops ({res['model']['n']} test cells, "
                        f"{res['model']['n_dead']} dead); baseline {base_info['chosen']}",
                        {"classifier": res["model"], "features + sklearn": res["baseline"]}, keys)
    bench.details["ldc-cls"] = {"truth": res, "baseline": base_info, "train_seconds": seconds, "table": text}
    bench.targets.append(Target("ldc-cls", "LDC balanced accuracy (true boxes)", res["model"]["balanced_accuracy"],
                                0.97, baseline=res["baseline"]["balanced_accuracy"]))
    consensus_variant(bench, data, radius)


def consensus_training_data(bench: Bench, data: Any) -> tuple[Any, dict[str, Any]]:
    """``data`` with the train / val cells replaced by a simulated class's consensus cells."""
    from cellspot.consensus import run_consensus
    from cellspot.evaluation import point_metrics
    from cellspot.ml.data import TrainingData
    from cellspot.simulate import get_profile, simulate_class
    from cellspot.truth import load_truth

    truth = load_truth("ldc", SHARED)
    names = {im.name for im in data.images}
    cells = truth.cells[truth.cells["image"].isin(names)]
    images = truth.images[truth.images["image"].isin(names)]
    rng = np.random.default_rng(bench.args.seed)
    clicks = simulate_class(cells, images, bench.args.students, get_profile(bench.args.profile), rng)
    clicks["task_run"] = clicks["task_run"].astype(str)
    start = time.perf_counter()
    result = run_consensus(clicks)
    consensus = result.cells
    seconds = time.perf_counter() - start
    train_names = {im.name for im in data.images if im.split in ("train", "val")}
    quality = point_metrics(cells[cells["image"].isin(train_names)],
                            consensus[consensus["image"].isin(train_names)])
    by_image = {k: g for k, g in consensus.groupby("image")}
    out = []
    for im in data.images:
        if im.split == "test":
            out.append(im)
            continue
        c = by_image.get(im.name, consensus.iloc[:0])
        new = pd.DataFrame({"x": c["x"].to_numpy(float), "y": c["y"].to_numpy(float),
                            "label": c["label"].to_numpy(object), "p_alive": c["p_alive"].to_numpy(float),
                            "weight": c["confidence"].to_numpy(float), "diameter": np.nan})
        out.append(dataclasses.replace(im, cells=new))
    info = {"students": bench.args.students, "profile": bench.args.profile, "clicks": len(clicks),
            "consensus_cells": int(len(consensus)), "consensus_seconds": seconds,
            "method": result.params.get("method"),
            "consensus_vs_truth_train_val": {k: quality[k] for k in ("precision", "recall", "f1", "label_accuracy",
                                                                     "balanced_accuracy")}}
    source = {**data.source, "kind": "simulated-consensus", "students": bench.args.students,
              "profile": bench.args.profile}
    return TrainingData(images=out, source=source), info


def consensus_variant(bench: Bench, data: Any, radius: float) -> None:
    cdata, info = consensus_training_data(bench, data)
    q = info["consensus_vs_truth_train_val"]
    print(f"\nsimulated class: {info['students']} students ({info['profile']}), {info['clicks']:,} clicks -> "
          f"{info['consensus_cells']:,} consensus cells in {info['consensus_seconds']:.1f} s; on train/val "
          f"images vs truth: F1 {q['f1']:.3f}, label accuracy {q['label_accuracy']:.4f}")
    model, seconds = train_classifier(bench, cdata, "ldc-classifier-consensus")
    base, base_info = baseline_classifier(bench, cdata, model.config.crop_size, radius)
    res = evaluate_classifiers(cdata.split("test"), model, base, radius, "ldc test crops (consensus-trained)")
    keys = ["balanced_accuracy", "accuracy", "f1", "roc_auc", "ece", "brier"]
    text = side_by_side("LDC alive/dead trained on the simulated class's consensus, tested on true cells; "
                        f"baseline {base_info['chosen']}",
                        {"classifier": res["model"], "features + sklearn": res["baseline"]}, keys)
    bench.details["ldc-cls-consensus"] = {"consensus": info, "results": res, "baseline": base_info,
                                          "train_seconds": seconds, "table": text}
    bench.targets.append(Target("ldc-cls", "LDC balanced accuracy (consensus-trained)",
                                res["model"]["balanced_accuracy"], 0.97,
                                baseline=res["baseline"]["balanced_accuracy"]))


def load_malaria(bench: Bench) -> Any:
    if "malaria" not in bench.cache:
        from cellspot.ml.data import load_crop_folder

        data = load_crop_folder(SHARED / "nih_malaria_cells_50px", positive_label="Parasitized",
                                group_column="patient", seed=bench.args.seed)
        if bench.quick:
            data = subset(data, {"train": 300, "val": 60, "test": 150}, bench.args.seed)
        print(f"\nNIH malaria: {({s: len(data.split(s)) for s in ('train', 'val', 'test')})} crops per split "
              f"(by patient)")
        bench.cache["malaria"] = data
    return bench.cache["malaria"]


def step_malaria(bench: Bench) -> None:
    data = load_malaria(bench)
    model, seconds = train_classifier(bench, data, "malaria-classifier", **MALARIA_CLASSIFIER)
    radius = min(model.config.crop_size / 2 - 1, 24.0)
    base, base_info = baseline_classifier(bench, data, model.config.crop_size, radius)
    res = evaluate_classifiers(data.split("test"), model, base, radius, "malaria test crops")
    text = side_by_side(f"NIH malaria parasitized vs uninfected ({res['model']['n']} test crops); "
                        f"baseline {base_info['chosen']}",
                        {"classifier": res["model"], "features + sklearn": res["baseline"]},
                        ["accuracy", "balanced_accuracy", "f1", "roc_auc", "ece"])
    bench.details["malaria"] = {"results": res, "baseline": base_info, "train_seconds": seconds, "table": text}
    bench.targets.append(Target("malaria", "malaria accuracy", res["model"]["accuracy"], 0.96,
                                baseline=res["baseline"]["accuracy"]))


def seed_spread(label: np.ndarray, probs: list[np.ndarray], metric: str) -> dict[str, Any]:
    """How much of a classifier's test error depends on its training seed.

    ``label`` ``(N,)`` 1 = alive; ``probs`` one calibrated ``p_alive`` ``(N,)`` per training
    seed (same data and split). Returns ``metric`` (a key of ``classification_metrics``) per
    seed, their mean / sd, the metric of the ensemble (mean logit over the seeds),
    and how many test cells every seed gets wrong (``wrong_in_all``) or at least one seed
    does (``wrong_in_any``): when ``wrong_in_all`` is most of each seed's errors, another seed
    or an ensemble of seeds will not fix them.
    """
    from cellspot.ml.classifier import classification_metrics

    if not probs:
        raise ValueError("seed_spread needs at least one seed's predictions")
    label = np.asarray(label)
    p = np.clip(np.stack([np.asarray(q, float) for q in probs]), 1e-7, 1 - 1e-7)
    if p.shape[1] != len(label):
        raise ValueError(f"{p.shape[1]} predictions per seed for {len(label)} labels")
    values = np.array([classification_metrics(label, q)[metric] for q in p])
    mean_logit = np.log(p / (1 - p)).mean(axis=0)
    wrong = (p >= 0.5) != (label == 1)[None, :]
    return {"metric": metric, "per_seed": values.tolist(), "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "ensemble": float(classification_metrics(label, 1 / (1 + np.exp(-mean_logit)))[metric]),
            "errors_per_seed": wrong.sum(axis=1).tolist(), "wrong_in_all": int(wrong.all(axis=0).sum()),
            "wrong_in_any": int(wrong.any(axis=0).sum()), "n": int(len(label))}


def step_seeds(bench: Bench) -> None:
    """The classifier steps' models again with ``--seeds`` training seeds on the same split."""
    from cellspot.ml.classifier import crops_from_data

    n = bench.args.seeds
    sets = {"ldc": (load_ldc(bench), {}, "balanced_accuracy"),
            "malaria": (load_malaria(bench), MALARIA_CLASSIFIER, "accuracy")}
    lines = [f"\n### Classifier training seeds ({n} seeds, split seed {bench.args.seed})\n",
             "| data | metric | per seed | mean (sd) | ensemble of the seeds | errors per seed | "
             "wrong in every seed / in any |", "|---|---|---|---|---|---|---|"]
    results = {}
    for name, (data, extra, metric) in sets.items():
        crops = crops_from_data(data.split("test"), classifier_config(bench, **extra).crop_size)
        probs = []
        for k in range(n):
            model, _ = train_classifier(bench, data, f"{name}-classifier-seed{k}", **extra,
                                        seed=bench.args.seed + k)
            probs.append(model.predict_crops(crops.crops))
        res = results[name] = seed_spread(crops.label, probs, metric)
        lines.append(f"| {name} ({res['n']} test cells) | {metric} | {', '.join(fmt(v) for v in res['per_seed'])} | "
                     f"{fmt(res['mean'])} ({fmt(res['sd'])}) | {fmt(res['ensemble'])} | "
                     f"{', '.join(map(str, res['errors_per_seed']))} | {res['wrong_in_all']} / {res['wrong_in_any']} |")
    text = "\n".join(lines)
    print(text)
    bench.details["seeds"] = {"seeds": n, "results": results, "table": text}


# --------------------------------------------------------------------------------- detector steps


def detector_config(bench: Bench, **extra: Any) -> Any:
    from cellspot.ml.detector import config_for

    over: dict[str, Any] = {"seed": bench.args.seed, "threads": bench.args.threads,
                            "max_minutes": bench.args.det_minutes, **extra, **bench.args.det_set}
    if bench.quick:
        over.update(epochs=1, steps_per_epoch=3, max_minutes=0.5)
    return config_for(bench.args.det_preset, **over)


def train_detector(bench: Bench, data: Any, name: str, **config: Any) -> tuple[Any, float]:
    """Fit (or, with ``--reuse``, load) a detector in ``out/models/name``; ``config``: fields over the preset."""
    from cellspot.ml.detector import fit_detector, load_detector

    return _train_or_reuse(bench, data, name, fit_detector, load_detector, detector_config(bench, **config))


def tune_baseline(bench: Bench, images: list[Any], kind: str, score: Callable[[list[Any], list[Any]], float],
                  cap: int) -> tuple[WatershedParams, float]:
    """Tune the watershed on (at most ``cap``) training images with ``score(images, results)``."""
    rng = np.random.default_rng(bench.args.seed)
    pick = [images[i] for i in sorted(rng.permutation(len(images))[:cap])]
    grid = default_grid(kind)
    if bench.quick:
        grid = grid[:: max(1, len(grid) // 4)]
    bar = tqdm(total=len(grid), desc=f"tune watershed ({kind}, {len(pick)} train images)", leave=False)

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    start = time.perf_counter()
    best, value, _ = tune_watershed([im.pixels for im in pick], lambda res: score(pick, res), grid, progress)
    bar.close()
    print(f"watershed baseline tuned on {len(pick)} train images, {len(grid)} settings, "
          f"{time.perf_counter() - start:.0f} s: train score {value:.4f}, {best}")
    return best, value


def instance_scores(images: list[Any], labels: list[np.ndarray]) -> dict[str, float]:
    """Instance matching at IoU >= 0.5, counts pooled over ``images`` (each with a true mask)."""
    from cellspot.ml.postprocess import counts_to_scores, match_instances

    per = [match_instances(im.mask, lab, 0.5) for im, lab in zip(images, labels)]
    out = counts_to_scores(*(sum(m[k] for m in per) for k in ("tp", "fp", "fn")))
    out["mean_image_f1"] = float(np.mean([m["f1"] for m in per])) if per else float("nan")
    return out


#: detector settings of the DSB2018 step over the preset (``--det-set`` still overrides them)
DSB_DETECTOR: dict[str, Any] = {"polarity": "auto", "tta": True}


def step_dsb_det(bench: Bench) -> None:
    from cellspot.ml.data import load_folder

    base = SHARED / "dsb2018_nuclei_subset"
    data = load_folder(base / "images", None, base / "masks", seed=bench.args.seed)
    if bench.quick:
        data = subset(data, {"train": 10, "val": 3, "test": 4}, bench.args.seed, smallest=True)
    test = data.split("test")
    print(f"\nDSB2018: {({s: len(data.split(s)) for s in ('train', 'val', 'test')})} images per split")
    # mixed modalities (fluorescence, stained, brightfield): every image reaches the network as
    # bright nuclei on a dark background, and inference averages the 8 flips / rotations
    detector, seconds = train_detector(bench, data, "dsb-detector", **DSB_DETECTOR)
    params, _ = tune_baseline(bench, data.split("train"), "fluorescence",
                              lambda ims, res: instance_scores(ims, [r.labels for r in res])["f1"],
                              cap=12 if bench.quick else 40)
    start = time.perf_counter()
    model_labels = [detector.detect(im.pixels).labels for im in tqdm(test, desc="dsb test (model)", leave=False)]
    megapixels = sum(im.pixels.shape[0] * im.pixels.shape[1] for im in test) / 1e6
    infer = (time.perf_counter() - start) / megapixels
    print(f"detector inference with {DSB_DETECTOR}: {infer:.2f} s per megapixel")
    base_labels = [watershed_detect(im.pixels, params).labels for im in test]
    res = {"model": instance_scores(test, model_labels), "baseline": instance_scores(test, base_labels)}
    text = side_by_side(f"DSB2018 nuclei, instances matched at IoU >= 0.5 ({len(test)} test images)",
                        {"U-Net detector": res["model"], "Otsu + watershed": res["baseline"]},
                        ["f1", "precision", "recall", "mean_image_f1"])
    bench.details["dsb-det"] = {"results": res, "baseline_params": dataclasses.asdict(params),
                                "train_seconds": seconds, "config": DSB_DETECTOR,
                                "seconds_per_megapixel": infer, "table": text}
    bench.targets.append(Target("dsb-det", "DSB2018 instance F1@IoU0.5", res["model"]["f1"], 0.85,
                                baseline=res["baseline"]["f1"]))


def point_score(images: list[Any], xys: list[np.ndarray]) -> dict[str, float]:
    from cellspot.evaluation import point_metrics

    pred = pd.concat([points_frame(im.name, xy) for im, xy in zip(images, xys)], ignore_index=True)
    return point_metrics(truth_points(images), pred)


def ldc_detector(bench: Bench) -> tuple[Any, float]:
    if "ldc_detector" not in bench.cache:
        bench.cache["ldc_detector"], bench.cache["ldc_detector_seconds"] = train_detector(
            bench, load_ldc(bench), "ldc-detector")
    return bench.cache["ldc_detector"], bench.cache["ldc_detector_seconds"]


def ldc_watershed(bench: Bench) -> WatershedParams:
    if "ldc_watershed" not in bench.cache:
        data = load_ldc(bench)
        bench.cache["ldc_watershed"], _ = tune_baseline(
            bench, data.split("train"), "brightfield",
            lambda ims, res: point_score(ims, [r.xy for r in res])["f1"], cap=30 if bench.quick else 120)
    return bench.cache["ldc_watershed"]


def step_ldc_det(bench: Bench) -> None:
    data = load_ldc(bench)
    test = data.split("test")
    detector, seconds = ldc_detector(bench)
    params = ldc_watershed(bench)
    model_xy = [detector.detect(im.pixels).xy for im in tqdm(test, desc="ldc test (model)", leave=False)]
    base_xy = [watershed_detect(im.pixels, params).xy for im in test]
    res = {"model": point_score(test, model_xy), "baseline": point_score(test, base_xy)}
    text = side_by_side(f"LDC cells matched within half a diameter ({len(test)} test images, "
                        f"{res['model']['n_truth']} cells)",
                        {"U-Net detector": res["model"], "Otsu + watershed": res["baseline"]},
                        ["f1", "precision", "recall", "median_distance"])
    bench.details["ldc-det"] = {"results": res, "baseline_params": dataclasses.asdict(params),
                                "train_seconds": seconds, "table": text}
    bench.targets.append(Target("ldc-det", "LDC point F1", res["model"]["f1"], 0.93,
                                baseline=res["baseline"]["f1"]))


# --------------------------------------------------------------------------------- pipeline and cost


def ldc_classifiers(bench: Bench) -> tuple[Any, Any, float]:
    """The LDC classifier and baseline classifier (trained on true boxes), training them if needed."""
    if "ldc_classifier" not in bench.cache:
        data = load_ldc(bench)
        model, seconds = train_classifier(bench, data, "ldc-classifier")
        base, info = baseline_classifier(bench, data, model.config.crop_size, cell_radius(data))
        bench.cache.update(ldc_classifier=model, ldc_baseline_classifier=base, ldc_classifier_seconds=seconds,
                           ldc_classifier_crops=info["n_train"] + info["n_val"])
    return bench.cache["ldc_classifier"], bench.cache["ldc_baseline_classifier"], bench.cache["ldc_classifier_seconds"]


def step_pipeline(bench: Bench) -> None:
    from cellspot.crops import crop_around
    from cellspot.evaluation import point_metrics

    data = load_ldc(bench)
    test = data.split("test")
    radius = cell_radius(data)
    detector, _ = ldc_detector(bench)
    classifier, base_classifier, _ = ldc_classifiers(bench)
    params = ldc_watershed(bench)
    size = classifier.config.crop_size
    model_rows, base_rows = [], []
    for im in tqdm(test, desc="pipeline on ldc test", leave=False):
        xy = detector.detect(im.pixels).xy
        model_rows.append(points_frame(im.name, xy, classifier.predict_cells(im.pixels, xy)))
        bxy = watershed_detect(im.pixels, params).xy
        p = (base_classifier.predict_proba(crop_features(np.stack([crop_around(im.pixels, x, y, size)
                                                                   for x, y in bxy]), radius))
             if len(bxy) else np.empty(0))
        base_rows.append(points_frame(im.name, bxy, p))
    truth = truth_points(test)
    res = {"model": point_metrics(truth, pd.concat(model_rows, ignore_index=True)),
           "baseline": point_metrics(truth, pd.concat(base_rows, ignore_index=True))}
    text = side_by_side(f"LDC whole pipeline, detect then classify ({len(test)} test images)",
                        {"detector + classifier": res["model"], "watershed + features": res["baseline"]},
                        ["f1", "precision", "recall", "balanced_accuracy", "label_accuracy", "ece"])
    bench.details["pipeline"] = {"results": res, "table": text}
    bench.targets.append(Target("pipeline", "pipeline F1", res["model"]["f1"], 0.93, baseline=res["baseline"]["f1"]))
    bench.targets.append(Target("pipeline", "pipeline balanced label accuracy (matched)",
                                res["model"]["balanced_accuracy"], 0.97, baseline=res["baseline"]["balanced_accuracy"]))


def _square(pixels: np.ndarray, side: int) -> np.ndarray:
    """``pixels`` reflect-padded / tiled (then cut) to ``(side, side, 3)``."""
    reps = (int(np.ceil(side / pixels.shape[0])), int(np.ceil(side / pixels.shape[1])), 1)
    return np.ascontiguousarray(np.tile(pixels, reps)[:side, :side])


def _time_pipeline(images: list[np.ndarray], detect: Callable[[np.ndarray], Any]) -> float:
    detect(images[0])  # warm-up (first call allocates)
    start = time.perf_counter()
    for px in tqdm(images, desc="timing", leave=False):
        detect(px)
    return (time.perf_counter() - start) / len(images)


def step_cost(bench: Bench) -> None:
    from cellspot.crops import crop_around

    data = load_ldc(bench)
    detector, det_seconds = ldc_detector(bench)
    classifier, base_classifier, cls_seconds = ldc_classifiers(bench)
    params = ldc_watershed(bench)
    radius = cell_radius(data)
    size = classifier.config.crop_size

    def model(px: np.ndarray) -> np.ndarray:
        xy = detector.detect(px).xy
        return classifier.predict_cells(px, xy)

    def baseline(px: np.ndarray) -> np.ndarray:
        xy = watershed_detect(px, params).xy
        if not len(xy):
            return np.empty(0)
        return base_classifier.predict_proba(crop_features(np.stack([crop_around(px, x, y, size) for x, y in xy]),
                                                           radius))

    sources = [im.pixels for im in data.split("test")] or [im.pixels for im in data.images]
    n256 = 4 if bench.quick else 40
    small = [_square(sources[k % len(sources)], 256) for k in range(n256)]
    big = [_square(sources[k % len(sources)], 1024) for k in range(1 if bench.quick else 3)]
    per_small, base_small = _time_pipeline(small, model), _time_pipeline(small, baseline)
    per_big, base_big = _time_pipeline(big, model), _time_pipeline(big, baseline)
    rss = peak_rss_mib()
    n_crops = bench.cache.get("ldc_classifier_crops", 0)
    info = {"classifier_train_seconds": cls_seconds, "classifier_train_crops": n_crops,
            "detector_train_seconds": det_seconds, "images_per_s_256": 1 / per_small,
            "baseline_images_per_s_256": 1 / base_small, "seconds_1024": per_big, "baseline_seconds_1024": base_big,
            "peak_rss_mib": rss, "threads": bench.args.threads}
    print(f"\n### Cost ({bench.args.threads} threads)\n")
    print(f"- classifier training: {cls_seconds:.0f} s on {n_crops} train+val crops")
    print(f"- detector training: {det_seconds:.0f} s")
    print(f"- detect + classify at 256x256: {1 / per_small:.1f} images/s (baseline {1 / base_small:.1f}, "
          f"ratio {base_small / per_small:.2f})")
    print(f"- detect + classify one 1024x1024 image: {per_big:.2f} s (baseline {base_big:.2f} s)")
    print(f"- peak RSS of this process so far: {rss:.0f} MiB")
    bench.details["cost"] = info
    bench.targets += [
        Target("cost", "classifier training", cls_seconds, 180, higher_is_better=False, unit=" s"),
        Target("cost", "detector training", det_seconds, 600, higher_is_better=False, unit=" s"),
        Target("cost", "prediction at 256x256", 1 / per_small, 4, baseline=1 / base_small, unit=" img/s"),
        Target("cost", "one 1024x1024 image", per_big, 3, higher_is_better=False, baseline=base_big, unit=" s"),
        Target("cost", "peak RSS", rss, 4096, higher_is_better=False, unit=" MiB"),
    ]


STEP_FUNCTIONS: dict[str, Callable[[Bench], None]] = {
    "ldc-cls": step_ldc_cls, "malaria": step_malaria, "dsb-det": step_dsb_det,
    "ldc-det": step_ldc_det, "pipeline": step_pipeline, "cost": step_cost, "seeds": step_seeds,
}


# --------------------------------------------------------------------------------- report


def report(bench: Bench, seconds: float) -> None:
    rows = [t.row() for t in bench.targets]
    lines = ["| step | target | value | baseline | difference | ratio | met | beats baseline |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['target']} | {fmt(r['value'])} | {fmt(r['baseline'])} | "
                     f"{fmt(r['difference'])} | {fmt(r['ratio'], 3)} | {'MET' if r['met'] else 'NOT MET'} | "
                     f"{fmt(r['beats_baseline'])} |")
    table = "\n".join(lines)
    print(f"\n## Targets ({'QUICK smoke run: not meaningful' if bench.quick else 'full run'}, "
          f"{bench.args.threads} threads, {seconds / 60:.1f} min)\n")
    print(table)
    env = {"python": platform.python_version(), "machine": platform.machine(), "threads": bench.args.threads,
           "device": bench.args.device or "auto", "quick": bench.quick, "seed": bench.args.seed,
           "steps": bench.args.only, "seconds": seconds, "peak_rss_mib": peak_rss_mib()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        pass
    from cellspot.ml.common import write_json

    write_json(bench.out / "models.json", {"environment": env, "targets": rows,
                                           "details": {k: {kk: vv for kk, vv in v.items() if kk != "table"}
                                                       for k, v in bench.details.items()}})
    md = [f"# Model benchmark ({'quick smoke run' if bench.quick else 'full run'})\n",
          f"Threads {bench.args.threads}, device {env['device']}, seed {bench.args.seed}, "
          f"{seconds / 60:.1f} min, peak RSS {env['peak_rss_mib']:.0f} MiB.\n", "## Targets\n", table]
    md += [v["table"] for v in bench.details.values() if "table" in v]
    (bench.out / "models.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {bench.out / 'models.json'} and {bench.out / 'models.md'}")


def config_item(text: str) -> tuple[str, Any]:
    from cellspot.ml.common import TrainingError, parse_override

    try:
        return parse_override(text)
    except TrainingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets and epochs: a smoke run in < 3 min")
    p.add_argument("--only", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=list(STEPS),
                   help=f"comma-separated steps of {','.join(ALL_STEPS)} (default: "
                        f"{','.join(STEPS)})")
    p.add_argument("--seeds", type=int, default=3,
                   help="training seeds of the 'seeds' step: the LDC and malaria classifiers trained again on "
                        "the same split, to see how much of their test error depends on the seed (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and scikit-learn (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    p.add_argument("--cls-preset", default="cpu-fast")
    p.add_argument("--det-preset", default="cpu-fast")
    for kind, example in (("cls", "input_scale=1.5"), ("det", "polarity=auto")):
        p.add_argument(f"--{kind}-set", type=config_item, action="append", default=[], metavar="FIELD=VALUE",
                       help=f"override a {'classifier' if kind == 'cls' else 'detector'} config field in every "
                            f"step, e.g. {example} (repeatable; VALUE read as JSON when it parses, else as text)")
    p.add_argument("--det-minutes", type=float, default=9.0, help="wall-clock budget of each detector training")
    p.add_argument("--students", type=int, default=5)
    p.add_argument("--profile", default="realistic")
    p.add_argument("--reuse", action="store_true", help="load models already in OUT/models instead of training")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("-v", "--verbose", action="store_true", help="log the library's INFO messages")
    args = p.parse_args(argv)
    args.cls_set, args.det_set = dict(args.cls_set), dict(args.det_set)
    unknown = sorted(set(args.only) - set(ALL_STEPS))
    if unknown:
        p.error(f"unknown step(s) {unknown}; valid: {','.join(ALL_STEPS)}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1; got {args.seeds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not start_run(args, SHARED, seed=args.seed):
        return 0
    bench = Bench(args=args, out=args.out)
    start = time.perf_counter()
    for step in ALL_STEPS:
        if step in args.only:
            t0 = time.perf_counter()
            print(f"\n## {step}")
            STEP_FUNCTIONS[step](bench)
            bench.details.setdefault(step, {})["step_seconds"] = time.perf_counter() - t0
    report(bench, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

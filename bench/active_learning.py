"""Benchmark of active learning (issue 5): simulated rounds on real data, strategies side by side.

Data in ../shared/data (skipped with a message when absent):

* ``ldc`` -- LDC living/dead cells. Model and metric: the alive/dead classifier trained on
  the consensus crops of the labelled images, **balanced accuracy on the true cells of the
  test images**. The whole detect-then-classify pipeline per round would cost too much on 2
  cores, so the cell positions the classifier scores (for the acquisition signals) come from
  a detector trained **once per seed** on the seed images (``--ldc-positions detector``, the
  default; ``truth``, the default with ``--quick``, uses the true centres instead).
* ``dsb`` -- DSB2018 nuclei (labels synthetic, positions real). Model and metric: the U-Net
  detector trained on the consensus *points* (disk targets, the crowd gives points), **point
  F1 on the test images** (instance F1 at IoU 0.5 is reported beside it), with
  ``polarity=auto`` (stained and brightfield images negated, like the models benchmark's
  DSB2018 step). Images wider or taller than ``--dsb-max-side`` (3 of 56 at 700 px) are left
  out to keep rounds cheap.

One simulation per dataset and seed: image-level split 70/10/20 (the seed changes it; the test
split is twice the project's 10 % for steadier curves); the pool is the train split. A class
of ``--students`` students (``realistic`` crowd profile, persistent skills) is simulated up
front: every image gets ``depth = --max-runs`` runs by distinct students in a fixed order
(:class:`cellspot.active.simulation.ClickBank`); labelling an image with
``k = --runs-per-image`` runs reveals its next ``k`` runs, so strategies picking the same
image see the same clicks. The val images are labelled once (``k`` runs each, consensus
fixed for the seed; a constant cost for every strategy, not on the budget axis); the test
images keep their ground truth.

Rounds, for each strategy: the seed (``--seed-images`` random pool images, the same for every
strategy; LDC seeds must hold both classes) gets ``--runs-per-image`` runs each; then, ``--rounds`` times:
consensus of all clicks so far (:func:`cellspot.consensus.run_consensus`, default method),
train from scratch with a fixed small budget of optimisation steps (classifier about
``--cls-steps`` steps, 3 to 24 epochs; detector ``det_epochs x --det-steps`` steps, with
``det_epochs`` per dataset in :data:`PLAN` or ``--det-epochs``; no
wall-clock cap, so the curves do not depend on the machine's load) ``--trainings`` times with
different training seeds (default 2: the metric is their mean, which takes most of the
optimisation's own noise out of the curves; the first training's model drives acquisition), evaluate on test,
predict the pool (strategies that read model signals only), build the signal table
(:func:`cellspot.active.build_signals`), retire settled images
(:mod:`cellspot.active.retirement`, default thresholds, ``max_runs = depth``), score with
the strategy and select ``--batch`` images batch-aware
(:func:`cellspot.active.select.select_batch`, ``--diversity``; 0 for random), reveal the
arm's ``k`` runs of each. Every round spends the same task runs (``batch x
--runs-per-image``), so budgets are equal across arms.

Arms: ``random`` (random *unlabelled* images with ``--runs-per-image`` (3) runs each: the
classic fixed-coverage baseline the target is measured against), ``crowd`` (crowd
disagreement only), ``model`` (the model-only strategy: ``classifier`` on LDC, ``detector``
on DSB) and ``combined`` (the default blend); any registered strategy name may be given too.
Every arm but ``random`` gives ``--adaptive-runs`` (1) run per chosen image and round and
picks three times as many images: an image gets more runs only when the strategy brings it
back in a later round (the crowd disputes it, the model conflicts with it), as the project's
rounds do with ``target_runs`` 1. ``NAME@K`` sets an arm's runs per image; the default arms
include ``random@1`` (random unlabelled images, one run each), an ablation that separates the
gain of spreading runs over more images from the gain of choosing the images.

Reference ("all images labelled"): the same model and budget trained ``--trainings`` times
(mean metric) per seed on every pool image labelled with ``k`` runs. Reported: the learning curves (metric / reference,
averaged over seeds), the task runs each strategy needs to reach 95 % of the reference
(interpolated on the mean curve), the ratio to random, and the target of issue 5: the
combined default reaches it with <= 60 % of the task runs random needs, on both datasets.
Wall time per round (consensus, training, prediction, selection) is measured with
``--threads`` CPU threads.

    python bench/active_learning.py                     # everything, 5 arms (~4 h on 2 idle cores; --trainings 1 about halves it)
    python bench/active_learning.py --quick             # smoke run (< 5 min), not meaningful
    python bench/active_learning.py --datasets ldc --strategies random,combined --seeds 1
    python bench/active_learning.py --report-only bench/out/active_learning.json --out /tmp/again

Writes bench/out/active_learning.json and .md, and the curves as .png (matplotlib) or, when
matplotlib is missing, active_learning_curves.csv + active_learning.vl.json (vega-lite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling helpers, however this file is run
from benchkit import fmt, start_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = ("ldc", "dsb")
ARMS = ("random", "random@1", "crowd", "model", "combined")
MODEL_STRATEGY = {"ldc": "classifier", "dsb": "detector"}
MODEL_FREE = {"random", "crowd", "coverage"}  # strategies that read no model signal
METRIC = {"ldc": "balanced_accuracy", "dsb": "f1"}
EXTRA_METRICS = {"ldc": ("accuracy", "roc_auc", "ece"), "dsb": ("precision", "recall", "instance_f1")}
#: per-dataset defaults of the round plan (full run, --quick). Rounds are small (random: 2
#: images x 3 runs = 6 runs per round) so the curves are sampled finely where they cross the
#: level: with 24 runs per round and a seed at 60 % of the reference, LDC's first crossing
#: could not fall before the first round's 54 runs whatever the strategy. ``det_epochs``: the
#: detector's epochs per round (DSB2018; for LDC the positions detector, trained once per
#: seed, gets twice this); 3 DSB epochs left the two trainings of a reference 0.3 apart.
PLAN = {
    "ldc": {"seed_images": 10, "batch": 2, "rounds": 14, "det_epochs": 3},
    "dsb": {"seed_images": 3, "batch": 2, "rounds": 6, "det_epochs": 6},
}
QUICK_PLAN = {
    "ldc": {"seed_images": 6, "batch": 6, "rounds": 2, "det_epochs": 1},
    "dsb": {"seed_images": 2, "batch": 2, "rounds": 2, "det_epochs": 1},
}
#: detector settings per dataset over the preset: DSB2018 mixes fluorescence with stained and
#: brightfield images, so every image reaches the network as bright nuclei on a dark background
#: (as in bench/models.py; without its test-time augmentation, which would cost 8x per round)
DETECTOR_SETTINGS: dict[str, dict[str, Any]] = {"ldc": {}, "dsb": {"polarity": "auto"}}
#: train (the pool) / val / test: a test split twice the project's 10 % for steadier curves
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
QUICK_CAPS = {"ldc": {"train": 40, "val": 8, "test": 10}, "dsb": {"train": 8, "val": 2, "test": 3}}

log = logging.getLogger("bench.active_learning")


# --------------------------------------------------------------------------------- data


@dataclasses.dataclass
class Dataset:
    """One data set: its ground-truth images (by name) and the truth tables the crowd clicks on."""

    name: str
    images: dict[str, Any]  # name -> AnnotatedImage (ground truth; masks for DSB)
    truth_cells: pd.DataFrame  # image, x, y, label, diameter
    truth_images: pd.DataFrame  # image, width, height

    @property
    def model(self) -> str:
        return MODEL_STRATEGY[self.name]


def load_dataset(name: str, args: argparse.Namespace) -> Dataset:
    from cellspot.ml.data import load_folder
    from cellspot.truth import load_truth

    if name == "ldc":
        base = SHARED / "ldc_living_dead_cells"
        data = load_folder(base / "images", base / "annotations.csv", seed=0)
        truth = load_truth("ldc", SHARED)
    else:
        base = SHARED / "dsb2018_nuclei_subset"
        data = load_folder(base / "images", None, base / "masks", seed=0)
        truth = load_truth("dsb2018", SHARED)
    images = {im.name: im for im in data.images if max(im.pixels.shape[:2]) <= args.dsb_max_side or name == "ldc"}
    dropped = len(data.images) - len(images)
    cells = truth.cells[truth.cells["image"].isin(images)].reset_index(drop=True)
    table = truth.images[truth.images["image"].isin(images)][["image", "width", "height"]].reset_index(drop=True)
    print(f"{name}: {len(images)} images, {len(cells)} true cells" + (f" ({dropped} larger images left out)"
                                                                     if dropped else ""))
    return Dataset(name, images, cells, table)


def split_names(ds: Dataset, seed: int, quick: bool) -> dict[str, list[str]]:
    """Image names per split for one seed (the project's stratified image-level rule)."""
    from cellspot.ml.data import assign_splits

    copies = [dataclasses.replace(im) for im in ds.images.values()]
    assign_splits(copies, SPLIT_FRACTIONS, seed=seed)
    out = {s: sorted(im.name for im in copies if im.split == s) for s in ("train", "val", "test")}
    if quick:
        rng = np.random.default_rng(seed)
        for split, cap in QUICK_CAPS[ds.name].items():
            names = out[split]
            if ds.name == "dsb":  # smallest images: the detector is the slow part
                names = sorted(names, key=lambda n: ds.images[n].pixels.size)
            else:
                names = [names[i] for i in rng.permutation(len(names))]
            out[split] = sorted(names[:cap])
    return out


# --------------------------------------------------------------------------------- one seed


@dataclasses.dataclass
class Setup:
    """Everything shared by the strategies of one dataset and seed."""

    ds: Dataset
    seed: int
    pool: list[str]
    val: list[str]
    test: list[str]
    bank: Any  # ClickBank
    seed_images: list[str]
    val_cells: dict[str, pd.DataFrame]
    val_runs: int
    radius: float
    positions: pd.DataFrame | None = None  # LDC: image, x, y, score of the pool cells the classifier scores
    crops: np.ndarray | None = None  # LDC: (n_positions, S, S, 3) crops at ``positions``
    positions_threshold: float | None = None  # LDC: the peak threshold of the detector that found them
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def consensus_cells(clicks: pd.DataFrame, runs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Default-method consensus of ``clicks`` (``runs``: every run that saw an image)."""
    from cellspot.consensus import run_consensus

    if clicks.empty:
        from cellspot.consensus.types import empty_cells

        return empty_cells(), {}
    result = run_consensus(clicks, runs=runs[["image", "task_run", "annotator"]])
    return result.cells, result.params


def cells_by_image(cells: pd.DataFrame, names: list[str]) -> dict[str, pd.DataFrame]:
    """Consensus cells as training cells (:data:`cellspot.ml.data.CELL_COLUMNS`) of each of ``names``;
    ``weight`` = confidence, an image without consensus cells gets an empty table."""
    from cellspot.ml.data import CELL_COLUMNS

    groups = {k: g for k, g in cells.groupby("image")} if len(cells) else {}
    out = {}
    for name in names:
        c = groups.get(name, cells.iloc[:0])
        out[name] = pd.DataFrame({
            "x": c["x"].to_numpy(float), "y": c["y"].to_numpy(float), "label": c["label"].to_numpy(object),
            "p_alive": c["p_alive"].to_numpy(float), "weight": c["confidence"].to_numpy(float),
            "diameter": np.full(len(c), np.nan)}, columns=CELL_COLUMNS)
    return out


def pick_seed_images(ds: Dataset, pool: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` random pool images; on LDC redrawn until their true cells hold both classes."""
    counts = ds.truth_cells.groupby("image")["label"].agg(lambda s: set(s))
    for _ in range(200):
        pick = sorted(pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False))
        labels = set().union(*(counts.get(p, set()) for p in pick))
        if ds.name != "ldc" or {"alive", "dead"} <= labels:
            return pick
    raise RuntimeError(f"no seed of {n} {ds.name} images holds both alive and dead cells; use more seed images")


def make_setup(ds: Dataset, seed: int, args: argparse.Namespace, plan: dict[str, int], work: Path) -> Setup:
    from cellspot.active.simulation import build_click_bank
    from cellspot.ml.targets import estimate_radius

    splits = split_names(ds, seed, args.quick)
    pool, val, test = splits["train"], splits["val"], splits["test"]
    rng = np.random.default_rng([seed, 7])
    names = set(pool) | set(val)
    bank = build_click_bank(ds.truth_cells[ds.truth_cells["image"].isin(names)],
                            ds.truth_images[ds.truth_images["image"].isin(names)].reset_index(drop=True),
                            args.max_runs, args.students, args.profile, rng)
    k = args.runs_per_image
    runs, clicks = bank.reveal({n: k for n in val})
    cells, _ = consensus_cells(clicks, runs)
    val_cells = cells_by_image(cells, val)
    seed_images = pick_seed_images(ds, pool, plan["seed_images"], rng)
    s_runs, s_clicks = bank.reveal({n: k for n in seed_images})
    s_cells, _ = consensus_cells(s_clicks, s_runs)
    radius = estimate_radius([*val_cells.values(), *cells_by_image(s_cells, seed_images).values()])
    setup = Setup(ds, seed, pool, val, test, bank, seed_images, val_cells, len(runs), radius,
                  info={"pool": len(pool), "val": len(val), "test": len(test), "val_task_runs": len(runs),
                        "seed_images": seed_images, "detector_radius": radius})
    print(f"\n[{ds.name} seed {seed}] pool {len(pool)}, val {len(val)} ({len(runs)} task runs, fixed), "
          f"test {len(test)}; seed {len(seed_images)} images; radius {radius:.1f} px")
    if ds.name == "ldc":
        ldc_positions(setup, s_cells, args, work)
    return setup


def ldc_positions(setup: Setup, seed_cells: pd.DataFrame, args: argparse.Namespace, work: Path) -> None:
    """Cell positions of the LDC pool for the classifier signals: a detector trained once on the
    seed images (or the true centres), and the classifier-sized crops around them."""
    from cellspot.crops import crop_around
    from cellspot.ml.classifier import config_for

    size = config_for(args.cls_preset).crop_size
    ds = setup.ds
    if args.ldc_positions == "truth":
        t = ds.truth_cells[ds.truth_cells["image"].isin(setup.pool)]
        pos = pd.DataFrame({"image": t["image"].to_numpy(object), "x": t["x"].to_numpy(float),
                            "y": t["y"].to_numpy(float), "score": 1.0})
        setup.info["positions"] = {"source": "truth"}
    else:
        from cellspot.ml.detector import fit_detector, load_detector

        data = training_data(setup, cells_by_image(seed_cells, setup.seed_images))
        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="positions-", dir=work))
        try:
            fit = fit_detector(data, detector_config(setup, args, scale=2), folder,
                               device=args.device)
            det = load_detector(folder, device=args.device)
            pos = detect_pool(det, setup)
            setup.positions_threshold = float(det.params["peak_threshold"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        seconds = time.perf_counter() - start
        setup.info["positions"] = {"source": "detector", "test_f1": fit.metrics.get("f1"),
                                   "test_precision": fit.metrics.get("precision"),
                                   "test_recall": fit.metrics.get("recall"), "seconds": seconds}
        print(f"  positions: detector on the seed, test point F1 {fit.metrics.get('f1', float('nan')):.3f}, "
              f"{len(pos)} cells found in {len(setup.pool)} pool images, {seconds:.0f} s")
    crops = [crop_around(ds.images[r.image].pixels, float(r.x), float(r.y), size) for r in pos.itertuples()]
    setup.positions = pos.reset_index(drop=True)
    setup.crops = np.stack(crops) if crops else np.empty((0, size, size, 3), np.uint8)


def detect_pool(det: Any, setup: Setup) -> pd.DataFrame:
    """``image, x, y, score`` of the detector's cells on every pool image."""
    rows = []
    for name in setup.pool:
        found = det.detect(setup.ds.images[name].pixels)
        rows.append(pd.DataFrame({"image": name, "x": found.xy[:, 0], "y": found.xy[:, 1],
                                  "score": np.asarray(found.scores, float)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["image", "x", "y", "score"])


# --------------------------------------------------------------------------------- training


def training_data(setup: Setup, labelled: dict[str, pd.DataFrame]) -> Any:
    """Labelled pool images (consensus cells) as train, the val consensus as val, the true test images."""
    from cellspot.ml.data import AnnotatedImage, TrainingData

    ims = setup.ds.images
    images = [AnnotatedImage(n, ims[n].pixels, cells, "train") for n, cells in labelled.items()]
    images += [AnnotatedImage(n, ims[n].pixels, setup.val_cells[n], "val") for n in setup.val]
    images += [dataclasses.replace(ims[n], split="test") for n in setup.test]
    return TrainingData(images=images, source={"kind": "simulated-consensus", "dataset": setup.ds.name,
                                               "seed": setup.seed, "labelled": len(labelled)})


def classifier_epochs(n_crops: int, batch_size: int, steps: int, lo: int = 3, hi: int = 24) -> int:
    """Epochs giving about ``steps`` optimisation steps on ``n_crops`` crops, clipped to ``[lo, hi]``:
    ``clip(ceil(steps / ceil(n_crops / batch_size)), lo, hi)``. A fixed number of steps, not of
    epochs, so a small labelled set is not also an undertrained one (and a big one not dearer)."""
    per_epoch = max(1, math.ceil(max(n_crops, 1) / batch_size))
    return int(min(hi, max(lo, math.ceil(steps / per_epoch))))


def classifier_config(setup: Setup, args: argparse.Namespace, n_crops: int, seed: int | None = None) -> Any:
    """The per-round classifier budget; ``seed`` the training seed (default the setup's)."""
    from cellspot.ml.classifier import config_for

    batch = config_for(args.cls_preset).batch_size
    epochs = 2 if args.quick else classifier_epochs(n_crops, batch, args.cls_steps)
    return config_for(args.cls_preset, epochs=epochs, patience=max(2, epochs),
                      seed=setup.seed if seed is None else seed, threads=args.threads)


def n_labelled_cells(labelled: dict[str, pd.DataFrame]) -> int:
    """Cells the classifier can train on (alive/dead label, ``p_alive`` known, weight > 0)."""
    return int(sum((c["label"].isin(("alive", "dead")) & c["p_alive"].notna() & (c["weight"] > 0)).sum()
                   for c in labelled.values()))


def detector_config(setup: Setup, args: argparse.Namespace, scale: int = 1, seed: int | None = None) -> Any:
    """The per-round detector budget (``scale`` times the epochs and minutes for the LDC positions
    detector); ``seed`` the training seed (default the setup's)."""
    from cellspot.ml.detector import config_for

    epochs = args.plans[setup.ds.name]["det_epochs"] * scale
    over: dict[str, Any] = {"target": "disk", "radius": setup.radius, "epochs": epochs,
                            "steps_per_epoch": args.det_steps, "patience": epochs,
                            "max_minutes": args.det_minutes * scale if args.det_minutes else None,
                            "seed": setup.seed if seed is None else seed, "threads": args.threads, **DETECTOR_SETTINGS[setup.ds.name]}
    if args.quick:
        over.update(epochs=1, steps_per_epoch=3, tune_postprocess=False)
    return config_for(args.det_preset, **over)


def training_seed(setup: Setup, t: int) -> int:
    """The training seed of the ``t``-th of a round's trainings: the setup's seed for the first
    (so one training per round is what it always was), then ``seed + 1000 t``."""
    return setup.seed + 1000 * t


def mean_metrics(per_training: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the mean over the trainings where it is finite (NaN where none is)."""
    keys = dict.fromkeys(k for m in per_training for k in m)
    out = {}
    for k in keys:
        values = np.array([m.get(k, np.nan) for m in per_training], float)
        finite = values[np.isfinite(values)]
        out[k] = float(finite.mean()) if len(finite) else float("nan")
    return out


def train_once(setup: Setup, data: Any, labelled: dict[str, pd.DataFrame], args: argparse.Namespace,
               folder: Path, seed: int, load: bool) -> tuple[dict[str, float], Any]:
    """One training with ``seed``: (test metrics, the loaded model when ``load``, else None)."""
    from cellspot.ml.common import TrainingError

    ds = setup.ds.name
    try:
        if ds == "ldc":
            from cellspot.ml.classifier import fit_classifier, load_classifier

            config = classifier_config(setup, args, n_labelled_cells(labelled), seed=seed)
            fit = fit_classifier(data, config, folder, device=args.device)
            model = load_classifier(folder, device=args.device) if load else None
        else:
            from cellspot.ml.detector import fit_detector, load_detector

            fit = fit_detector(data, detector_config(setup, args, seed=seed), folder, device=args.device)
            model = load_detector(folder, device=args.device) if load else None
    except TrainingError as exc:  # e.g. no dead cell in the consensus of a tiny seed
        log.warning("training failed: %s", exc)
        print(f"  training failed ({exc}): metric NaN for this training")
        return {METRIC[ds]: float("nan")}, None
    keys = (METRIC[ds], *EXTRA_METRICS[ds])
    return {k: float(fit.metrics[k]) for k in keys if isinstance(fit.metrics.get(k), (int, float))}, model


def train_eval(setup: Setup, labelled: dict[str, pd.DataFrame], args: argparse.Namespace,
               folder: Path) -> tuple[dict[str, float], Any, list[float]]:
    """Train the dataset's model on ``labelled`` ``--trainings`` times (seeds :func:`training_seed`)
    into sub-folders of ``folder``. Returns (the test metrics averaged over the trainings, the
    first training's model for the acquisition signals or None, the metric of each training).
    Averaging several trainings takes the optimisation's own noise out of the learning curves."""
    data = training_data(setup, labelled)
    per, models = [], []
    for t in range(args.trainings):
        sub = folder / f"t{t}"
        sub.mkdir(parents=True, exist_ok=True)
        metrics, model = train_once(setup, data, labelled, args, sub, training_seed(setup, t), load=t == 0)
        per.append(metrics)
        models.append(model)
    return mean_metrics(per), models[0], [m.get(METRIC[setup.ds.name], float("nan")) for m in per]


def model_cells(setup: Setup, model: Any) -> tuple[pd.DataFrame, float | None]:
    """The model's cells on the pool: LDC ``p_alive`` of the classifier at the positions
    (with the positions' detector score), DSB the detector's cells with their score; and the
    peak threshold of the detector behind the scores (None: unknown, e.g. true positions)."""
    if setup.ds.name == "ldc":
        p = model.predict_crops(setup.crops) if len(setup.crops) else np.empty(0)
        return setup.positions.assign(p_alive=np.asarray(p, float)), setup.positions_threshold
    return detect_pool(model, setup), float(model.params["peak_threshold"])


# --------------------------------------------------------------------------------- rounds


def retired_images(cells: pd.DataFrame, runs: pd.DataFrame, clicks: pd.DataFrame, labelled: list[str],
                   max_runs: int) -> set[str]:
    """Labelled images that adaptive retirement (default thresholds, ``max_runs``) takes out of the queue."""
    from cellspot.active.retirement import RetirementPolicy, decide, image_features

    if not labelled:
        return set()
    ids = {name: i for i, name in enumerate(labelled)}
    c = cells[cells["image"].isin(ids)]
    c = c.assign(image_id=c["image"].map(ids).astype("int64"))
    per_run = clicks.groupby("task_run").size()
    r = runs[runs["image"].isin(ids)]
    r = r.assign(image_id=r["image"].map(ids).astype("int64"), n_clicks=r["task_run"].map(per_run).fillna(0))
    decisions = decide(image_features(list(ids.values()), c, r), RetirementPolicy(max_runs=max_runs))
    return {labelled[int(i)] for i in decisions.loc[decisions["retire"], "image_id"]}


def signal_radius(params: dict[str, Any]) -> float:
    """The matching radius the store would use for this consensus (:func:`cellspot.active.signals.snapshot_radius`)."""
    from cellspot.active.signals import snapshot_radius

    return snapshot_radius(SimpleNamespace(params=params))


def parse_arm(arm: str, args: argparse.Namespace) -> tuple[str, int]:
    """``(strategy, k)`` of an arm ``NAME`` or ``NAME@K``: the strategy that scores (``model`` ->
    the dataset's model strategy is resolved later) and the task runs each chosen image gets
    per round. Without ``@K``: ``--runs-per-image`` for ``random`` (the fixed-coverage
    baseline), ``--adaptive-runs`` for the others."""
    name, _, k = arm.partition("@")
    if k:
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"arm {arm!r}: the runs after '@' must be a positive integer")
        return name, int(k)
    return name, args.runs_per_image if name == "random" else args.adaptive_runs


def round_batch(plan: dict[str, int], args: argparse.Namespace, k: int) -> int:
    """Images an arm picks per round: every arm spends ``plan['batch'] x --runs-per-image`` task
    runs per round, so an arm giving ``k`` runs per image picks that many runs / ``k`` images."""
    return max(1, plan["batch"] * args.runs_per_image // k)


def run_arm(setup: Setup, arm: str, args: argparse.Namespace, plan: dict[str, int], work: Path) -> list[dict]:
    """One strategy's learning curve on one seed: a record per round."""
    from cellspot.active import build_signals
    from cellspot.active.rounds import QUEUE_DIVERSITY
    from cellspot.active.signals import DETECTOR_THRESHOLD
    from cellspot.active.simulation import candidates, choose_batch

    name, k = parse_arm(arm, args)
    strategy = setup.ds.model if name == "model" else name
    bank, batch_size = setup.bank, round_batch(plan, args, k)
    diversity = 0.0 if strategy == "random" else (QUEUE_DIVERSITY if args.diversity is None else args.diversity)
    n_runs = {name: 0 for name in setup.pool}
    for name in setup.seed_images:  # the same labelled seed for every arm
        n_runs[name] = args.runs_per_image
    records = []
    for rnd in range(plan["rounds"] + 1):
        t0 = time.perf_counter()
        runs, clicks = bank.reveal(n_runs)
        cells, params = consensus_cells(clicks, runs)
        labelled = [n for n in setup.pool if n_runs[n] > 0]
        t1 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix=f"{setup.ds.name}-{arm}-", dir=work))
        try:
            metrics, model, per_training = train_eval(setup, cells_by_image(cells, labelled), args, folder)
            t2 = time.perf_counter()
            rec: dict[str, Any] = {
                "dataset": setup.ds.name, "strategy": arm, "scorer": strategy, "runs_per_image": k,
                "seed": setup.seed, "round": rnd,
                "task_runs": int(sum(n_runs.values())), "labelled_images": len(labelled),
                "metric": metrics.get(METRIC[setup.ds.name], float("nan")), "metrics": metrics,
                "metric_per_training": per_training,
                "consensus_cells": int(cells["image"].isin(set(setup.pool)).sum()) if len(cells) else 0,
                "consensus_s": t1 - t0, "train_s": t2 - t1}
            if rnd < plan["rounds"]:
                retired = retired_images(cells, runs, clicks, labelled, bank.depth)
                allowed = candidates(n_runs, k=k, depth=bank.depth, retired=retired,
                                     unlabelled_only=strategy == "random")
                predicted, threshold = ((None, None) if strategy in MODEL_FREE or model is None
                                        else model_cells(setup, model))
                t3 = time.perf_counter()
                images = pd.DataFrame({"image": setup.pool, "n_runs": [n_runs[n] for n in setup.pool]})
                signals = build_signals(images, cells[cells["image"].isin(set(setup.pool))], predicted,
                                        predicted_images=setup.pool if predicted is not None else None,
                                        radius=signal_radius(params),
                                        detector_threshold=threshold or DETECTOR_THRESHOLD)
                batch = choose_batch(strategy, signals, allowed, batch_size, seed=setup.seed * 1000 + rnd,
                                     diversity=diversity)
                chosen = batch["image"].astype(str).tolist()
                for name in chosen:
                    n_runs[name] += k
                t4 = time.perf_counter()
                rec.update(predict_s=t3 - t2, select_s=t4 - t3, retired=len(retired), candidates=len(allowed),
                           chosen=chosen, relabelled=int(sum(name in set(labelled) for name in chosen)))
            rec["round_s"] = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        records.append(rec)
        print(f"  {arm:>9} r{rnd}: {rec['task_runs']:4d} runs, {len(labelled):3d} images, "
              f"{METRIC[setup.ds.name]} {rec['metric']:.4f}, {rec['round_s']:.0f} s"
              + (f", picked {len(rec['chosen'])} ({rec['relabelled']} again), {rec['retired']} retired"
                 if "chosen" in rec else ""))
    return records


def reference(setup: Setup, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The model trained on every pool image labelled with ``k`` runs (same budget)."""
    k = args.runs_per_image
    start = time.perf_counter()
    runs, clicks = setup.bank.reveal({n: k for n in setup.pool})
    cells, _ = consensus_cells(clicks, runs)
    folder = Path(tempfile.mkdtemp(prefix=f"{setup.ds.name}-all-", dir=work))
    try:
        metrics, _, per_training = train_eval(setup, cells_by_image(cells, setup.pool), args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = {"dataset": setup.ds.name, "seed": setup.seed, "metric": metrics.get(METRIC[setup.ds.name]),
           "metrics": metrics, "metric_per_training": per_training, "task_runs": len(runs), "seconds": time.perf_counter() - start}
    print(f"  reference, all {len(setup.pool)} pool images labelled ({len(runs)} runs): "
          f"{METRIC[setup.ds.name]} {out['metric']:.4f}"
          + (f" (trainings: {', '.join(f'{v:.4f}' for v in per_training)})" if len(per_training) > 1 else ""))
    return out


# --------------------------------------------------------------------------------- report


def md_table(frame: pd.DataFrame, digits: int = 3) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def summarise(records: list[dict], references: list[dict], quantile: float, max_ratio: float
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from cellspot.active.simulation import compare_strategies, mean_curves

    curves = pd.DataFrame(records)
    refs = pd.DataFrame(references)
    if len(refs):  # a seed whose reference failed to train has no scale: left out of the summary
        refs = refs[np.isfinite(pd.to_numeric(refs["metric"], errors="coerce").to_numpy(float))]
    have = set(zip(refs["dataset"], refs["seed"])) if len(refs) else set()
    curves = curves[[(d, s) in have for d, s in zip(curves["dataset"], curves["seed"])]]
    if curves.empty:
        return curves, pd.DataFrame(), pd.DataFrame()
    mean = mean_curves(curves, refs)
    compare = compare_strategies(mean, quantile=quantile, max_ratio=max_ratio)
    return curves, mean, compare


def verdict(compare: pd.DataFrame, datasets: list[str], max_ratio: float) -> dict[str, Any]:
    """The target of issue 5: ``combined`` within ``max_ratio`` of random's task runs on every dataset."""
    rows = compare[compare["strategy"] == "combined"] if len(compare) else compare
    per = {}
    for ds in datasets:
        r = rows[rows["dataset"] == ds] if len(rows) else rows
        value = r["target_met"].iloc[0] if len(r) else None
        per[ds] = None if value is None or pd.isna(value) else bool(value)
    met = bool(per) and all(v is True for v in per.values())
    return {"per_dataset": per, "met": met, "max_ratio": max_ratio}


def timing_table(curves: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("consensus_s", "train_s", "predict_s", "select_s", "round_s") if c in curves.columns]
    g = curves.groupby(["dataset", "strategy"])[cols].mean().reset_index()
    return g


def plot(mean: pd.DataFrame, curves: pd.DataFrame, out: Path, quantile: float) -> list[str]:
    """Learning curves: PNG with matplotlib, else CSV + a vega-lite JSON (altair). Returns the files written."""
    if mean.empty:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    written = []
    if plt is not None:
        datasets = sorted(mean["dataset"].unique())
        fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
        for ax, ds in zip(axes[0], datasets):
            for strategy, c in mean[mean["dataset"] == ds].groupby("strategy"):
                c = c.sort_values("round")
                ax.plot(c["task_runs"], c["relative"], marker="o", label=strategy)
                ax.fill_between(c["task_runs"], c["relative"] - c["relative_std"], c["relative"] + c["relative_std"],
                                alpha=0.15)
            ax.axhline(quantile, color="grey", linestyle="--", linewidth=1, label=f"{quantile:.0%} of all labelled")
            ax.set(title=f"{ds}: {METRIC[ds]} / all-labelled reference", xlabel="student task runs",
                   ylabel="relative metric")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "active_learning.png", dpi=120)
        plt.close(fig)
        written.append("active_learning.png")
    else:
        mean.to_csv(out / "active_learning_curves.csv", index=False)
        curves[["dataset", "strategy", "seed", "round", "task_runs", "metric"]].to_csv(
            out / "active_learning_curves_by_seed.csv", index=False)
        written += ["active_learning_curves.csv", "active_learning_curves_by_seed.csv"]
        try:
            import altair as alt

            line = alt.Chart().mark_line(point=True).encode(
                x=alt.X("task_runs:Q", title="student task runs"),
                y=alt.Y("relative:Q", title="metric / all-labelled reference", scale=alt.Scale(zero=False)),
                color="strategy:N", tooltip=["strategy", "round", "task_runs", "relative", "metric", "n_seeds"])
            rule = alt.Chart().mark_rule(strokeDash=[4, 4], color="grey").encode(y="target:Q")
            chart = alt.layer(line, rule, data=mean.assign(target=quantile)).facet(
                column=alt.Column("dataset:N")).resolve_scale(x="independent")
            (out / "active_learning.vl.json").write_text(json.dumps(chart.to_dict(), indent=1))
            written.append("active_learning.vl.json")
        except Exception as exc:  # noqa: BLE001 - the CSV is the fallback's real output
            log.warning("vega-lite spec not written: %s", exc)
    return written


def report(args: argparse.Namespace, setups: list[dict], records: list[dict], references: list[dict],
           seconds: float, final: bool) -> None:
    from cellspot.ml.common import write_json

    out = args.out
    curves, mean, compare = summarise(records, references, args.quantile, args.max_ratio)
    target = verdict(compare, args.datasets, args.max_ratio) if len(compare) else {"met": False}
    timing = timing_table(curves) if len(curves) else pd.DataFrame()
    env = {"python": platform.python_version(), "machine": platform.machine(), "threads": args.threads,
           "device": args.device or "auto", "quick": args.quick, "seconds": seconds, "complete": final}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover
        pass
    files = plot(mean, curves, out, args.quantile) if final else []
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(out / "active_learning.json", {
        "environment": env, "params": params, "plans": args.plans, "setups": setups, "references": references,
        "records": records, "mean_curves": mean.to_dict("records"), "comparison": compare.to_dict("records"),
        "target": target, "timing": timing.to_dict("records"), "plots": files})
    md = [f"# Active-learning benchmark ({'QUICK smoke run: not meaningful' if args.quick else 'full run'}"
          f"{'' if final else ', PARTIAL'})\n",
          f"{args.threads} CPU threads, {len(args.seeds)} seed(s), crowd profile {args.profile}, class of "
          f"{args.students} students; task runs per chosen image and round: {args.runs_per_image} for random "
          f"(fixed coverage), {args.adaptive_runs} for the other arms unless NAME@K says otherwise (an arm "
          f"giving k runs per image picks batch x {args.runs_per_image} / k images, so every arm spends the "
          f"same runs per round); up to {args.max_runs} per image; {args.trainings} training(s) per round and "
          f"for the reference (metric = their mean); {seconds / 60:.1f} min.\n",
          "Metric: LDC classifier balanced accuracy on the true test cells; DSB detector point F1 on the "
          "test images. Relative = metric / the same model trained with every pool image labelled.\n"]
    plans = pd.DataFrame([{"dataset": d, **p} for d, p in args.plans.items()])
    md += ["## Round plan\n", md_table(plans), ""]
    if references:
        refs = pd.DataFrame(references)[["dataset", "seed", "metric", "task_runs", "seconds"]]
        md += ["## Reference: all pool images labelled\n", md_table(refs), ""]
    if len(compare):
        md += [f"## Task runs to reach {args.quantile:.0%} of the reference (mean curve over seeds)\n",
               md_table(compare[["dataset", "strategy", "runs_to_target", "ratio_to_random", "ratio_bound",
                               "target_met", "runs_to_stay", "stay_ratio_to_random", "mean_relative",
                               "max_task_runs", "final_relative"]], 3), "",
               "`ratio_bound`: random did not reach the level within its largest budget, so the true ratio is "
               "below this bound. `-` under runs_to_target: not reached. `runs_to_stay`: from where the mean "
               "curve stays at or above the level (a lucky round does not count), with its ratio to random; "
               "`mean_relative`: the mean relative metric over the rounds after the seed (the normalised area "
               "under the curve). The target is judged on runs_to_target, the first crossing.\n",
               f"**Target (combined <= {args.max_ratio:.0%} of random's task runs on every dataset): "
               f"{'MET' if target.get('met') else 'NOT MET'}** {target.get('per_dataset')}\n"]
        wide = mean.pivot_table(index=["dataset", "task_runs"], columns="strategy", values="relative").reset_index()
        wide["task_runs"] = wide["task_runs"].round().astype(int)
        md += ["## Learning curves (relative metric, mean over seeds)\n", md_table(wide, 3), ""]
    if len(timing):
        md += [f"## Wall time per round ({args.threads} threads, seconds, mean)\n", md_table(timing, 1), ""]
    if files:
        md += ["## Plots\n"] + [f"- {f}" for f in files]
        if "active_learning.png" not in files:
            md += ["", "matplotlib is not installed: the curves are written as CSV and a vega-lite spec "
                       "(open it in the vega editor or render it with altair)."]
    (out / "active_learning.md").write_text("\n".join(md) + "\n")
    if final:
        print("\n" + "\n".join(md))
        print(f"\nwrote {out / 'active_learning.json'}, {out / 'active_learning.md'}"
              + "".join(f", {out / f}" for f in files))


# --------------------------------------------------------------------------------- main


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pools, 2 rounds, 1 seed, minimal training (< 5 min)")
    p.add_argument("--datasets", type=parse_list, default=list(DATASETS), help="comma-separated: ldc,dsb")
    p.add_argument("--strategies", type=parse_list, default=list(ARMS),
                   help="comma-separated arms NAME or NAME@K (K task runs per chosen image and round); "
                        "'model' = classifier on LDC, detector on DSB; or any registered strategy")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 3; 1 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="rounds after the seed (default per dataset)")
    p.add_argument("--batch", type=int, default=None, help="images chosen per round (default per dataset)")
    p.add_argument("--seed-images", type=int, default=None, help="images in the labelled seed (default per dataset)")
    p.add_argument("--runs-per-image", type=int, default=3, help="task runs each chosen image gets (default 3)")
    p.add_argument("--adaptive-runs", type=int, default=1,
                   help="task runs per chosen image and round for every arm but random (default 1: an image "
                        "comes back in a later round while the crowd disputes it); NAME@K sets one arm's")
    p.add_argument("--max-runs", type=int, default=10, help="most runs per image = retirement max_runs (default 10)")
    p.add_argument("--students", type=int, default=20, help="simulated class size (default 20)")
    p.add_argument("--profile", default="realistic")
    p.add_argument("--diversity", type=float, default=None,
                   help="batch-aware selection weight for non-random strategies (default: the queue's 0.3)")
    p.add_argument("--quantile", type=float, default=0.95, help="fraction of the reference to reach (0.95)")
    p.add_argument("--max-ratio", type=float, default=0.6, help="target: combined runs / random runs (0.6)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and numpy (default 2)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when present)")
    p.add_argument("--cls-preset", default="cpu-fast")
    p.add_argument("--cls-steps", type=int, default=48,
                   help="classifier optimisation steps per round, about (3..24 epochs; default 48)")
    p.add_argument("--trainings", type=int, default=None,
                   help="trainings (training seeds) per round and for the reference; the metric is their mean "
                        "and the first one's model drives acquisition (default 2; 1 with --quick)")
    p.add_argument("--det-preset", default="cpu-fast")
    p.add_argument("--det-epochs", type=int, default=None,
                   help="detector epochs per round (default per dataset: DSB2018 6, LDC positions 3)")
    p.add_argument("--det-steps", type=int, default=25, help="detector steps per epoch (default 25)")
    p.add_argument("--det-minutes", type=float, default=None,
                   help="optional wall-clock cap per detector training (default none: a fixed number of steps, "
                        "so results do not depend on the machine's load)")
    p.add_argument("--ldc-positions", choices=("detector", "truth"), default=None,
                   help="LDC cells the classifier scores: a detector trained on the seed (default), or the true "
                        "centres (default with --quick)")
    p.add_argument("--dsb-max-side", type=int, default=700, help="leave out larger DSB images (default 700 px)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                   help="summarise a finished run again from its active_learning.json (no training); "
                        "writes the report to --out with the current --quantile / --max-ratio")
    p.add_argument("-v", "--verbose", action="store_true", help="log the library's INFO messages")
    args = p.parse_args(argv)
    bad = sorted(set(args.datasets) - set(DATASETS))
    if bad:
        p.error(f"unknown dataset(s) {bad}; valid: {','.join(DATASETS)}")
    from cellspot.active import STRATEGIES

    if not 1 <= args.adaptive_runs <= args.max_runs:
        p.error("need 1 <= --adaptive-runs <= --max-runs")
    try:
        names = {parse_arm(a, args)[0] for a in args.strategies}
    except ValueError as exc:
        p.error(str(exc))
    unknown = sorted(names - set(STRATEGIES) - {"model"})
    if unknown:
        p.error(f"unknown strategy(ies) {unknown}; valid: model, {', '.join(sorted(STRATEGIES))}")
    if "bald" in names:
        p.error("bald needs MC-dropout samples, which this benchmark does not draw")
    if "random" not in args.strategies and len(args.strategies) > 1:
        p.error("the arms need the baseline 'random' (ratios are to it)")
    args.trainings = args.trainings if args.trainings is not None else (1 if args.quick else 2)
    if args.trainings < 1:
        p.error("need --trainings >= 1")
    args.ldc_positions = args.ldc_positions or ("truth" if args.quick else "detector")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    args.seeds = list(range(n_seeds))
    base = QUICK_PLAN if args.quick else PLAN
    args.plans = {d: {"seed_images": args.seed_images or base[d]["seed_images"],
                      "batch": args.batch or base[d]["batch"],
                      "rounds": args.rounds if args.rounds is not None else base[d]["rounds"],
                      "det_epochs": args.det_epochs or base[d]["det_epochs"]}
                  for d in args.datasets}
    if not 1 <= args.runs_per_image <= args.max_runs <= args.students:
        p.error("need 1 <= --runs-per-image <= --max-runs <= --students")
    return args


def load_saved_run(path: Path, args: argparse.Namespace) -> tuple[list[dict], list[dict], list[dict], float]:
    """``(setups, records, references, seconds)`` of a saved run (its ``active_learning.json``).
    The run's own settings replace those of ``args``, except ``--out``, ``--quantile`` and
    ``--max-ratio``, so a finished run can be summarised again (at another level) without training."""
    try:
        data = json.loads(Path(path).read_text())
        saved, plans = data["params"], data["plans"]
        out = (data["setups"], data["records"], data["references"], float(data["environment"]["seconds"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"--report-only {path}: not a readable active_learning.json ({exc!r})") from exc
    keep = {k: getattr(args, k) for k in ("out", "quantile", "max_ratio", "report_only")}
    vars(args).update(saved)
    vars(args).update(keep)
    args.plans = plans
    args.trainings = saved.get("trainings", 1)  # runs from before --trainings trained once per round
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        setups, records, references, seconds = load_saved_run(args.report_only, args)
        args.out.mkdir(parents=True, exist_ok=True)
        report(args, setups, records, references, seconds, final=True)
        return 0
    if not start_run(args, SHARED):
        return 0
    work = Path(tempfile.mkdtemp(prefix="al-models-", dir=args.out))
    setups, records, references = [], [], []
    start = time.perf_counter()
    try:
        for name in args.datasets:
            ds = load_dataset(name, args)
            plan = args.plans[name]
            for seed in args.seeds:
                setup = make_setup(ds, seed, args, plan, work)
                setups.append({"dataset": name, "seed": seed, **setup.info})
                references.append(reference(setup, args, work))
                for arm in args.strategies:
                    records += run_arm(setup, arm, args, plan, work)
                    report(args, setups, records, references, time.perf_counter() - start, final=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, setups, records, references, time.perf_counter() - start, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

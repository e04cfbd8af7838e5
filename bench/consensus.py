"""Benchmark of the click consensus methods: quality on real ground truth, and speed.

Quality: simulated classes (``cellspot.simulate``) of 1, 3, 5 and 10 students with the
easy / realistic / hard profiles click on the real cells of ../shared/data (LDC
living/dead cells, BCCD, DSB2018 nuclei, stardist) and on generated truth. Every method
runs on the same clicks, side by side:

* ``cluster_em`` — the default, with no scale hint (it estimates the scale itself);
* ``seed_r35`` and ``dbscan_vote`` — given the oracle radius (median true diameter / 2)
  of each source, their best case (35 px would be wrong on most sources);
* ``panoptes`` — the Zooniverse ``panoptes_aggregation`` DBSCAN point reducer, run from
  its own virtualenv (``.venv-bench``: its pins clash with ours), same oracle radius.

Metrics (``cellspot.evaluation``): one-to-one matching within half a cell diameter ->
precision / recall / F1; label accuracy and balanced accuracy on matched cells;
calibration (ECE, Brier) of ``p_alive``.

Speed (``--speed``): >= 1.7 M clicks (10,000+ images x 40 cells x 5 students, realistic
profile) through the ``cellspot consensus`` command (process wall time and peak RSS),
and the panoptes reducer on the same file.

    python bench/consensus.py              # quality, 2 seeds
    python bench/consensus.py --speed      # speed only
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellspot.consensus import run_consensus
from cellspot.evaluation import point_metrics
from cellspot.simulate import get_profile, simulate_class
from cellspot.truth import load_truth

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
PANOPTES_SCRIPT = ROOT / "bench" / "panoptes_reducer.py"
SOURCES = ["ldc", "bccd", "dsb2018", "stardist", "generated"]
PROFILES = ["easy", "realistic", "hard"]
CLASS_SIZES = [1, 3, 5, 10]
METHODS = ["cluster_em", "seed_r35", "dbscan_vote", "panoptes"]
TARGETS = {3: 0.85, 5: 0.92}

log = logging.getLogger("bench.consensus")


def load_sources(names: list[str]) -> dict:
    out = {}
    for name in names:
        if name != "generated" and not SHARED.is_dir():
            log.warning("skipping %s: %s is absent", name, SHARED)
            continue
        out[name] = load_truth(name, SHARED if name != "generated" else None)
    return out


def simulate(truth, profile: str, n_students: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    clicks = simulate_class(truth.cells, truth.images, n_students, get_profile(profile), rng)
    clicks["task_run"] = clicks["task_run"].astype(str)
    return clicks


def run_panoptes(batch: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, float]:
    """Run the panoptes reducer over every (config, image) in ``batch``; returns cells, seconds."""
    if not BENCH_PY.exists():
        log.warning("panoptes skipped: %s missing (make bench-env)", BENCH_PY)
        return pd.DataFrame(), float("nan")
    src, dst = tmp / "panoptes_in.csv", tmp / "panoptes_out.csv"
    batch.to_csv(src, index=False)
    start = time.perf_counter()
    subprocess.run([str(BENCH_PY), str(PANOPTES_SCRIPT), str(src), str(dst)], check=True)
    return pd.read_csv(dst, dtype={"config": str, "image": str}), time.perf_counter() - start


def quality(args: argparse.Namespace) -> pd.DataFrame:
    sources = load_sources(args.sources)
    rows, panoptes_batch = [], []
    for name, truth in sources.items():
        radius = float(truth.cells["diameter"].median()) / 2
        for profile in args.profiles:
            for n in args.students:
                for seed in range(args.seeds):
                    clicks = simulate(truth, profile, n, seed)
                    config = f"{name}|{profile}|{n}|{seed}"
                    for method in (m for m in args.methods if m != "panoptes"):
                        hint = None if method == "cluster_em" else radius
                        t0 = time.perf_counter()
                        cells = run_consensus(clicks, method, cell_radius=hint).cells
                        secs = time.perf_counter() - t0
                        rows.append({"source": name, "profile": profile, "students": n, "seed": seed,
                                     "method": method, "seconds": secs, "n_clicks": len(clicks),
                                     **point_metrics(truth.cells, cells)})
                    if "panoptes" in args.methods:
                        panoptes_batch.append(clicks.assign(config=config, eps=radius, n_students=n))
                log.info("%s %s done", name, profile)
    if panoptes_batch:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        cells, secs = run_panoptes(pd.concat(panoptes_batch, ignore_index=True), out_dir)
        for config, group in cells.groupby("config") if len(cells) else []:
            name, profile, n, seed = config.split("|")
            rows.append({"source": name, "profile": profile, "students": int(n), "seed": int(seed),
                         "method": "panoptes", "seconds": secs / max(len(panoptes_batch), 1),
                         **point_metrics(sources[name].cells, group)})
    return pd.DataFrame(rows)


def report_quality(df: pd.DataFrame, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "consensus_quality.csv", index=False)
    per_source = df.groupby(["profile", "students", "method", "source"])[["f1", "label_accuracy"]].mean()
    mean = per_source.groupby(["profile", "students", "method"]).mean()  # mean over sources
    table = mean.unstack("method")
    pd.set_option("display.width", 200)
    print("\n## F1 (mean over sources and seeds)\n")
    print(table["f1"].round(3).to_markdown())
    print("\n## Label accuracy on matched cells\n")
    print(table["label_accuracy"].round(4).to_markdown())
    cal = df.groupby(["profile", "method"])[["ece", "brier", "balanced_accuracy"]].mean().round(4)
    print("\n## Calibration of p_alive and balanced accuracy (mean over everything)\n")
    print(cal.to_markdown())
    print("\n## Realistic profile, per source (F1)\n")
    real = df[df.profile == "realistic"].groupby(["source", "students", "method"])["f1"].mean()
    print(real.unstack("method").round(3).to_markdown())
    print("\n## Targets (realistic profile, mean over sources)\n")
    if "realistic" in table.index.get_level_values(0):
        f1 = table["f1"].loc["realistic"]
        acc = table["label_accuracy"].loc["realistic"]
        for n, target in TARGETS.items():
            if n in f1.index:
                v = f1.loc[n, "cluster_em"]
                print(f"- F1 with {n} students: {v:.3f} (target >= {target}) "
                      f"{'PASS' if v >= target else 'FAIL'}")
        if 5 in acc.index:
            v = acc.loc[5, "cluster_em"]
            print(f"- label accuracy with 5 students: {v:.4f} (target >= 0.99) {'PASS' if v >= 0.99 else 'FAIL'}")
        for n in f1.index:
            base = f1.loc[n].drop("cluster_em")
            best = base.max()
            ratio = f1.loc[n, "cluster_em"] / best if best > 0 else float("inf")
            print(f"- {n} students: cluster_em F1 / best baseline ({base.idxmax()}) = {ratio:.3f} "
                  f"{'ahead' if ratio > 1 else 'NOT ahead'}")


def speed(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "speed_clicks.csv"
    n_images, n_cells, n_students = 10_000, 40, 5
    rng = np.random.default_rng(0)
    while True:
        cells, images = _tile_truth(n_images, n_cells, rng)
        clicks = simulate_class(cells, images, n_students, get_profile("realistic"), rng)
        if len(clicks) >= 1_700_000:
            break
        n_images = int(math.ceil(n_images * 1_700_000 / len(clicks) * 1.01))
    clicks.to_csv(path, index=False, float_format="%.2f")
    print(f"speed file: {len(clicks):,} clicks, {n_images:,} images x {n_cells} cells x {n_students} students")
    ours = _timed([sys.executable, "-m", "cellspot", "consensus", str(path), "--out", str(out / "speed_cells.csv")])
    print(f"cellspot consensus (cluster_em): {ours[0]:.1f} s wall, peak RSS {ours[1] / 1024:.0f} MiB "
          f"(targets <= 20 s, <= 2048 MiB)")
    ours_q = point_metrics(cells, pd.read_csv(out / "speed_cells.csv", dtype={"image": str}))
    print(f"  quality on that file: F1 {ours_q['f1']:.3f}, label accuracy {ours_q['label_accuracy']:.4f}")
    if args.skip_panoptes or not BENCH_PY.exists():
        print("panoptes: skipped")
        return
    batch = pd.read_csv(path, dtype={"image": str}).assign(config="speed", eps=float(cells["diameter"].median()) / 2,
                                                           n_students=n_students)
    batch.to_csv(out / "speed_panoptes_in.csv", index=False)
    theirs = _timed([str(BENCH_PY), str(PANOPTES_SCRIPT), str(out / "speed_panoptes_in.csv"), str(out / "speed_panoptes_out.csv")])
    print(f"panoptes point_reducer_dbscan: {theirs[0]:.1f} s wall, peak RSS {theirs[1] / 1024:.0f} MiB")
    theirs_q = point_metrics(cells, pd.read_csv(out / "speed_panoptes_out.csv", dtype={"image": str}))
    print(f"  quality on that file: F1 {theirs_q['f1']:.3f}, label accuracy {theirs_q['label_accuracy']:.4f}")
    print(f"speed ratio panoptes / cellspot = {theirs[0] / ours[0]:.1f}x (target >= 5x)")


def _tile_truth(n_images: int, n_cells: int, rng: np.random.Generator):
    """n_images images of 524x391 with ``n_cells`` cells each: 200 generated layouts, tiled."""
    from cellspot.synth import generate_layout

    layouts = []
    while len(layouts) < 200:
        layout = generate_layout(rng, 524, 391, n_cells=n_cells, diameter_scale=30.0)
        if len(layout) == n_cells:
            layouts.append(layout[["x", "y", "label", "diameter"]])
    pick = rng.integers(0, len(layouts), n_images)
    names = np.array([f"img{k:06d}" for k in range(n_images)], dtype=object)
    cells = pd.concat([layouts[s] for s in pick], ignore_index=True)
    cells.insert(0, "image", np.repeat(names, n_cells))
    images = pd.DataFrame({"image": names, "width": 524, "height": 391})
    return cells, images


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return its wall seconds and its own peak RSS in KiB (os.wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return wall, float(usage.ru_maxrss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sources", type=lambda s: s.split(","), default=SOURCES)
    p.add_argument("--profiles", type=lambda s: s.split(","), default=PROFILES)
    p.add_argument("--students", type=lambda s: [int(v) for v in s.split(",")], default=CLASS_SIZES)
    p.add_argument("--methods", type=lambda s: s.split(","), default=METHODS)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--speed", action="store_true", help="run the speed benchmark instead of quality")
    p.add_argument("--skip-panoptes", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.skip_panoptes:
        args.methods = [m for m in args.methods if m != "panoptes"]
    if args.speed:
        speed(args)
        return
    df = quality(args)
    report_quality(df, Path(args.out))


if __name__ == "__main__":
    main()

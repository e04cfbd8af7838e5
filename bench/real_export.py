"""Consensus on the real Cell Spotting crowd export (no ground truth: behaviour checks).

Reads ../shared/data/cellspotting_clicks/clicks.csv (8,004 clicks, 999 runs, 800 images)
and reports, for every consensus method side by side: cells found, share alive (the
clicks are 64 % alive), and what became of the 234 single-click "spam" runs (always
alive, bottom-right corner): how many of their clicks ended up as a cell, on images that
other runs also saw and on images only spam runs saw.

    python bench/real_export.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellspot.consensus import run_consensus

CLICKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "cellspotting_clicks" / "clicks.csv"


def spam_kept(cells: pd.DataFrame, spam: pd.DataFrame, within: float = 3.0) -> int:
    """Spam clicks with a consensus cell within ``within`` px (i.e. that made a cell)."""
    by_image = {k: g[["x", "y"]].to_numpy() for k, g in cells.groupby("image")}
    kept = 0
    for image, x, y in spam[["image_name", "x", "y"]].itertuples(index=False):
        xy = by_image.get(image)
        kept += int(xy is not None and np.min(np.hypot(xy[:, 0] - x, xy[:, 1] - y)) < within)
    return kept


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints a table; writes no files.",
                            ).parse_args(argv)
    if not CLICKS.exists():
        print(f"skipped: {CLICKS} is absent")
        return
    raw = pd.read_csv(CLICKS)
    # the export has one click at y = -3 (above the displayed image); consensus input, like
    # `cellspot import clicks --skip-invalid`, refuses negative pixel coordinates: left out
    outside = (raw.x < 0) | (raw.y < 0)
    if outside.any():
        print(f"left out {int(outside.sum())} click(s) with a negative coordinate")
        raw = raw[~outside]
    clicks = pd.DataFrame({"image": raw.image_name, "annotator": raw.annotator_run.astype(str),
                           "x": raw.x, "y": raw.y, "label": raw.label})
    runs_per_image = clicks.groupby("image")["annotator"].nunique()
    shared = set(runs_per_image[runs_per_image >= 2].index)
    spam = raw[raw.run_n_clicks == 1]
    spam_shared, spam_alone = spam[spam.image_name.isin(shared)], spam[~spam.image_name.isin(shared)]
    print(f"{len(clicks):,} clicks, {clicks.annotator.nunique()} runs, {clicks.image.nunique()} images; "
          f"clicks alive {np.mean(clicks.label == 'alive'):.1%}; single-click runs {len(spam)} "
          f"({len(spam_shared)} on images other runs saw, {len(spam_alone)} on images only they saw)\n")
    print("| method | cells | alive share | spam clicks kept (shared images) | spam clicks kept (spam-only images) | seconds |")
    print("|---|---|---|---|---|---|")
    for method in ("cluster_em", "seed_r35", "dbscan_vote"):
        start = time.perf_counter()
        cells = run_consensus(clicks, method).cells
        secs = time.perf_counter() - start
        print(f"| {method} | {len(cells):,} | {np.mean(cells.label == 'alive'):.1%} | "
              f"{spam_kept(cells, spam_shared)} of {len(spam_shared)} | {spam_kept(cells, spam_alone)} of "
              f"{len(spam_alone)} | {secs:.2f} |")


if __name__ == "__main__":
    sys.exit(main())

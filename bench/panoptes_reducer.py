"""Run the Zooniverse panoptes_aggregation DBSCAN point reducer on a click CSV.

Runs in the bench virtualenv (``.venv-bench``, ``make bench-env``), not in cellspot's:
panoptes_aggregation pins older numpy / scikit-learn. Input columns:
``config, image, task_run, x, y, label, eps, n_students``; every (config, image) is one
Zooniverse subject, every task run one classification with all its points drawn with a
single point tool. The reducer's own DBSCAN clusters them (``eps`` = given radius,
``min_samples`` = half the class, rounded up); a cluster's label is the majority of its
points' labels (ties alive, not sure ignored). Output: ``config, image, x, y, label, p_alive``.

    .venv-bench/bin/python bench/panoptes_reducer.py IN.csv OUT.csv
"""

import math
import sys

import numpy as np
import pandas as pd
from panoptes_aggregation.reducers.point_reducer_dbscan import point_reducer_dbscan

TOOL = "T0_tool0"


def reduce_subject(group: pd.DataFrame, eps: float, min_samples: int) -> list[tuple]:
    extracts, labels, users = [], [], []
    for run, clicks in group.groupby("task_run", sort=False):
        extracts.append({"frame0": {f"{TOOL}_x": clicks["x"].tolist(), f"{TOOL}_y": clicks["y"].tolist()}})
        labels.extend(clicks["label"].tolist())
        users.append(str(run))
    out = point_reducer_dbscan(extracts, user_id=users, eps=eps, min_samples=min_samples)
    frame = out.get("frame0", {})
    cluster_of_point = np.array(frame.get(f"{TOOL}_cluster_labels", []))
    xs, ys = frame.get(f"{TOOL}_clusters_x", []), frame.get(f"{TOOL}_clusters_y", [])
    labels = np.array(labels)
    rows = []
    for k, (x, y) in enumerate(zip(xs, ys)):
        votes = labels[cluster_of_point == k]
        n_alive, n_dead = int((votes == "alive").sum()), int((votes == "dead").sum())
        p = n_alive / (n_alive + n_dead) if n_alive + n_dead else 0.5
        rows.append((x, y, "alive" if p >= 0.5 else "dead", p))
    return rows


def main(src: str, dst: str) -> None:
    clicks = pd.read_csv(src, dtype={"config": str, "image": str, "task_run": str})
    out = []
    for (config, image), group in clicks.groupby(["config", "image"], sort=False):
        eps = float(group["eps"].iloc[0])
        min_samples = max(1, math.ceil(int(group["n_students"].iloc[0]) / 2))
        out.extend((config, image, *row) for row in reduce_subject(group, eps, min_samples))
    pd.DataFrame(out, columns=["config", "image", "x", "y", "label", "p_alive"]).to_csv(dst, index=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

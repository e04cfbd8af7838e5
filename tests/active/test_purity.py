"""Acquisition scoring stays pure: strategies, selection and the pure signal builder load
neither torch, the database layer (sqlalchemy) nor streamlit, even after running every
strategy (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "sqlalchemy", "streamlit")

SCRIPT = """
import json, sys
import numpy as np
import pandas as pd
from cellspot.active import STRATEGIES, build_signals, score_images, select_batch
crowd = pd.DataFrame({"image": ["a", "a", "b"], "x": [1.0, 9.0, 5.0], "y": [1.0, 9.0, 5.0],
                      "p_alive": [0.9, 0.4, 0.5], "confidence": [0.9, 0.5, 0.5], "support": [2, 1, 1],
                      "n_runs": [2, 2, 1], "p_cell": [1.0, 0.7, 0.6]})
model = pd.DataFrame({"image": ["a", "c"], "x": [1.0, 3.0], "y": [1.0, 3.0], "p_alive": [0.1, 0.5],
                      "score": [0.9, 0.6]})
signals = build_signals(pd.DataFrame({"image": ["a", "b", "c"]}), crowd, model, radius=3.0)
samples = {"a": np.array([[0.2, 0.8]]), "c": np.array([[0.5, 0.5]])}
for name in STRATEGIES:
    ranked = score_images(name, signals, mc_samples=samples)
    assert len(select_batch(ranked, n=2, signals=signals)) == 2, name
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in %(forbidden)r)))
"""


def test_scoring_loads_no_heavy_or_ui_dependency() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT % {"forbidden": FORBIDDEN}],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"acquisition scoring imported {loaded}"

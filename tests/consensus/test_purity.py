"""Pure modules stay pure: consensus, evaluation, simulation and crop geometry load neither
torch, the database layer (sqlalchemy) nor streamlit, even after running consensus."""

from __future__ import annotations

import json
import subprocess
import sys


FORBIDDEN = ("torch", "sqlalchemy", "streamlit")

SCRIPT = """
import json, sys
import pandas as pd
import cellspot.consensus, cellspot.evaluation, cellspot.simulate, cellspot.crops
from cellspot.consensus import run_consensus
clicks = pd.DataFrame({
    "image": ["a"] * 6, "annotator": ["s1", "s2", "s3"] * 2,
    "x": [10.0, 11.0, 12.0, 100.0, 101.0, 99.0], "y": [10.0, 10.0, 11.0, 80.0, 80.0, 81.0],
    "label": ["alive", "alive", "dead", "dead", "dead", "not_sure"],
})
for method in %(methods)r:
    cells = run_consensus(clicks, method).cells
    assert len(cells) == 2, (method, cells)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in %(forbidden)r)))
"""


def test_pure_modules_load_no_heavy_or_ui_dependency() -> None:
    # one fresh interpreter (about 2 s of imports) runs every built-in method
    code = SCRIPT % {"methods": ("cluster_em", "seed_r35", "dbscan_vote"), "forbidden": FORBIDDEN}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"pure modules imported {loaded}"

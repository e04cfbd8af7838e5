"""Helpers shared by the benchmark scripts of bench/: the start of a run and table cells."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np


def start_run(args: argparse.Namespace, shared: Path, seed: int | None = None) -> bool:
    """Common start of a benchmark: logging (``args.verbose``), CPU threads for numpy /
    scikit-learn and torch (``args.threads``), the global seed when given, and ``args.out``
    created. Returns False (after saying so) when the real data folder ``shared`` is absent."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if not shared.is_dir():
        print(f"skipped: the real data folder {shared} is absent")
        return False
    from threadpoolctl import threadpool_limits

    from cellspot.ml.common import configure_threads, seed_everything

    threadpool_limits(args.threads)
    configure_threads(args.threads)
    if seed is not None:
        seed_everything(seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return True


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for None / NaN, yes / no for booleans, floats with ``digits`` decimals."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return f"{v:.{digits}f}"
    return str(v)

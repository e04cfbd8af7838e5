"""Click consensus: a registry of methods with one entry point, :func:`run_consensus`.

Pure module: numpy, scipy and pandas only (no torch, no database).

Input ``clicks`` is a DataFrame with one row per click and columns
``image`` (str), ``annotator`` (str), ``task_run`` (str, optional: default one run per
annotator x image), ``x``, ``y`` (float, image pixels) and ``label``
(``alive`` | ``dead`` | ``not_sure``). ``runs`` optionally lists every run that *saw* an
image (columns ``image, task_run, annotator``), including runs that clicked nothing.
``gold`` optionally holds expert cells (``image, x, y, label``) that anchor reliability.
"""

from __future__ import annotations

from cellspot.consensus.types import (
    ANNOTATOR_COLUMNS,
    CELL_COLUMNS,
    ConsensusInputError,
    ConsensusResult,
    UnknownMethodError,
    prepare_clicks,
)
from cellspot.consensus.registry import DEFAULT_METHOD, METHODS, get_method, run_consensus
from cellspot.consensus import cluster_em, dbscan_vote, seed_r35  # noqa: E402,F401  (fill METHODS)

__all__ = [
    "ANNOTATOR_COLUMNS",
    "CELL_COLUMNS",
    "ConsensusInputError",
    "ConsensusResult",
    "DEFAULT_METHOD",
    "METHODS",
    "UnknownMethodError",
    "get_method",
    "prepare_clicks",
    "run_consensus",
]

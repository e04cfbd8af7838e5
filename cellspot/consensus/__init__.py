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
    CELL_COLUMNS,
    ANNOTATOR_COLUMNS,
    ConsensusResult,
    UnknownMethodError,
    prepare_clicks,
)
from cellspot.consensus.registry import METHODS, DEFAULT_METHOD, run_consensus

__all__ = [
    "ANNOTATOR_COLUMNS",
    "CELL_COLUMNS",
    "ConsensusResult",
    "DEFAULT_METHOD",
    "METHODS",
    "UnknownMethodError",
    "prepare_clicks",
    "run_consensus",
]

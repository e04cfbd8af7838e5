"""Shared types and input preparation for consensus methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

CELL_COLUMNS = [
    "image", "x", "y", "label", "p_alive", "confidence", "support", "n_runs", "p_cell",
]
ANNOTATOR_COLUMNS = [
    "annotator", "n_runs", "n_clicks", "sensitivity", "precision",
    "accuracy_alive", "accuracy_dead", "weight",
]
CLICK_LABELS = ("alive", "dead", "not_sure")


class UnknownMethodError(ValueError):
    """Raised for a consensus method name that is not registered."""


class ConsensusInputError(ValueError):
    """Raised when the click table is malformed (missing columns, bad labels, NaN).

    ``row`` is the 0-based row of the first bad record, when there is one.
    """

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


@dataclass
class ConsensusResult:
    """What every method returns.

    ``cells``: one row per consensus cell, columns :data:`CELL_COLUMNS`
    (``label`` is alive|dead, ``p_alive``/``confidence``/``p_cell`` in [0, 1],
    ``support`` = number of runs that clicked it, ``n_runs`` = runs that saw the image).
    ``annotators``: columns :data:`ANNOTATOR_COLUMNS` (may be empty for baselines).
    ``params``: the parameters actually used (estimated radius included).
    """

    cells: pd.DataFrame
    annotators: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ANNOTATOR_COLUMNS))
    params: dict[str, Any] = field(default_factory=dict)


def empty_cells() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=("object" if c in ("image", "label") else "float64"))
                         for c in CELL_COLUMNS})


EMPTY = "is empty"


def _shown(value: object) -> str:
    """A cell's value as the error shows it (missing -> 'empty')."""
    return "(empty)" if value is None or (isinstance(value, float) and np.isnan(value)) else repr(str(value))


#: the largest click coordinate taken (as :data:`cellspot.importers.csvtools.MAX_PIXEL_VALUE`)
MAX_COORDINATE = 1_000_000


def prepare_clicks(clicks: pd.DataFrame) -> pd.DataFrame:
    """Validate and normalise a click table.

    Returns a new frame with ``x``, ``y`` as float64 and ``label`` normalised to
    :data:`CLICK_LABELS` (``not_sure_alive`` from the legacy export is ``not_sure``).
    ``image``, ``annotator`` and ``task_run`` are kept as given; codes are made later.
    Raises :class:`ConsensusInputError` naming the first bad row (0-based), each of its bad
    fields (an empty image or annotator, a coordinate that is not a finite number, is
    negative or is beyond :data:`MAX_COORDINATE`, an unknown label) and the number of bad rows.
    """
    missing = [c for c in ("image", "annotator", "x", "y", "label") if c not in clicks.columns]
    if missing:
        raise ConsensusInputError(
            f"click table lacks column(s) {missing}; needs image, annotator, x, y, label "
            f"(task_run optional); has {list(clicks.columns)}"
        )
    cols = [c for c in ("image", "annotator", "task_run") if c in clicks.columns]
    out = clicks[cols].reset_index(drop=True)
    checks: list[tuple[str, np.ndarray, str]] = []  # (field, bad rows, what is wrong with them)
    for col in ("image", "annotator"):
        values = clicks[col].astype("category")  # checked per distinct value: fast on big tables
        blank = np.append(np.asarray(values.cat.categories.astype(str).str.strip() == ""), True)
        checks.append((col, blank[values.cat.codes.to_numpy()], EMPTY))  # code -1 (missing) -> the True
    for col in ("x", "y"):
        values = pd.to_numeric(clicks[col], errors="coerce").to_numpy(np.float64)
        checks.append((col, ~np.isfinite(values), "is not a finite number"))
        with np.errstate(invalid="ignore"):
            checks.append((col, values < 0, "is negative (pixel coordinates start at 0)"))
            checks.append((col, np.isfinite(values) & (values > MAX_COORDINATE), f"is beyond {MAX_COORDINATE:,} px, more than any image has"))
        out[col] = values
    labels = clicks["label"].astype("category")
    spelled = labels.cat.categories.astype(str).str.strip().str.lower()
    spelled = spelled.where(spelled != "not_sure_alive", "not_sure")
    code_of = np.array([CLICK_LABELS.index(v) if v in CLICK_LABELS else -1 for v in spelled], dtype=np.int64)
    codes = labels.cat.codes.to_numpy()
    mapped = np.full(len(codes), -1, dtype=np.int64)
    mapped[codes >= 0] = code_of[codes[codes >= 0]]
    checks.append(("label", mapped < 0, f"is not a label; allowed: {', '.join(CLICK_LABELS)}"))
    bad = np.zeros(len(clicks), dtype=bool)
    for _, rows, _ in checks:
        bad |= rows
    if bad.any():  # the first bad row, with every bad field of it, and how many rows are bad
        row = int(np.flatnonzero(bad)[0])
        fields = [f"field {col}: " + ("empty" if why == EMPTY else f"{_shown(clicks[col].iloc[row])} {why}")
                  for col, rows, why in checks if rows[row]]
        raise ConsensusInputError(f"row {row}, {'; '.join(fields)} ({int(bad.sum())} bad rows)", row=row)
    out["label"] = np.asarray(CLICK_LABELS, dtype=object)[mapped]
    return out

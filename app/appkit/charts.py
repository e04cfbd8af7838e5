"""Charts and short texts of the Models page: training curves, progress lines, metric tables.

Pure helpers over plain data (lists of dicts, DataFrames) plus the Altair chart builders; no
store access and no Streamlit calls, so they are unit-tested directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import altair as alt
import pandas as pd

LOSS_COLUMNS = ("train_loss", "val_loss")
NOT_CURVES = ("epoch", "step", "steps", "epochs", "seconds", "elapsed_s", "eta_s", "lr", "phase", "time")
#: match counts (``tp``, ``val_fn``, ``n_true``...) are not curves: on the metrics' 0-1 axis they
#: would flatten every rate
_COUNT = re.compile(r"^(?:.*_)?(?:tp|fp|fn|tn|n|n_.*)$")


def curves_frame(curves: Any) -> pd.DataFrame:
    """One row per epoch from ``curves`` (a list of dicts or a DataFrame, as stored with a run).

    Missing ``epoch`` numbers are filled 1, 2, ...; nested dicts (``metrics``) are flattened
    into their own columns. Returns an empty frame with an ``epoch`` column when there is none.
    """
    if curves is None:
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    if isinstance(curves, pd.DataFrame):
        rows = curves.to_dict("records")
    else:
        rows = [dict(r) for r in curves]
    flat = []
    for row in rows:
        nested = row.pop("metrics", None)
        if isinstance(nested, Mapping):
            row = {**row, **{k: v for k, v in nested.items() if k not in row}}
        flat.append(row)
    table = pd.DataFrame(flat)
    if table.empty:
        return pd.DataFrame({"epoch": pd.Series(dtype=int)})
    if "epoch" not in table.columns:
        table.insert(0, "epoch", range(1, len(table) + 1))
    return table


def curves_long(curves: Any, run: str | None = None) -> pd.DataFrame:
    """``curves`` (see :func:`curves_frame`) as long rows ``epoch, series, value[, run]``.

    Only numeric series are kept (losses and metrics, not timings, match counts or the epoch).
    """
    table = curves_frame(curves)
    series = [c for c in table.columns if c not in NOT_CURVES and not _COUNT.match(str(c))
              and pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().any()]
    long = table.melt(id_vars=["epoch"], value_vars=series, var_name="series", value_name="value")
    long = long.dropna(subset=["value"])
    long["kind"] = ["loss" if "loss" in s else "metric" for s in long["series"]]
    if run is not None:
        long["run"] = run
    return long.reset_index(drop=True)


def curves_charts(long: pd.DataFrame, title: str = "") -> list[alt.Chart]:
    """Losses and metrics against epoch from :func:`curves_long` rows, one chart each (shown
    side by side in columns); when the rows carry a ``run`` column each run gets its own dash
    (two runs overlaid). Each chart fits its column's width (``fit-x``: with the default
    autosize and a legend below, Streamlit squeezed a lone chart's plot to a few pixels)."""
    compare = "run" in long.columns and long["run"].nunique() > 1
    charts = []
    for kind, heading in (("loss", "loss"), ("metric", "metrics")):
        part = long[long["kind"] == kind]
        if part.empty:
            continue
        encoding: dict[str, Any] = {
            "x": alt.X("epoch:Q", title="epoch", axis=alt.Axis(tickMinStep=1, format="d")),
            "y": alt.Y("value:Q", title=heading),
            # legends below the plot: on the right, long names (val_balanced_accuracy) were cut off
            "color": alt.Color("series:N", title=None, legend=alt.Legend(orient="bottom", columns=2, labelLimit=0)),
            "tooltip": ["epoch", "series", alt.Tooltip("value:Q", format=".4f")],
        }
        if compare:
            encoding["strokeDash"] = alt.StrokeDash("run:N", title="run", legend=alt.Legend(orient="bottom"))
            encoding["tooltip"] = ["run", *encoding["tooltip"]]
        charts.append(alt.Chart(part, title=f"{title} {heading}".strip()).mark_line(point=True)
                      .encode(**encoding)
                      .properties(height=220, autosize=alt.AutoSizeParams(type="fit-x", contains="padding")))
    return charts


def format_seconds(seconds: float | None) -> str:
    """``75`` -> ``"1 min 15 s"``; ``None`` or not finite -> ``"-"``."""
    if seconds is None or not math.isfinite(float(seconds)) or seconds < 0:
        return "-"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_fraction(progress: Mapping[str, Any] | None) -> float:
    """The completed fraction in [0, 1] of a stored progress dict (0 when unknown)."""
    if not progress:
        return 0.0
    value = progress.get("fraction")
    if value is None:
        epochs, epoch = progress.get("epochs") or 0, progress.get("epoch") or 0
        steps, step = progress.get("steps") or 0, progress.get("step") or 0
        value = ((epoch - 1) + (step / steps if steps else 0.0)) / epochs if epochs else 0.0
    try:
        return float(min(1.0, max(0.0, float(value))))
    except (TypeError, ValueError):
        return 0.0


#: how a training phase reads on the progress bar ("" = not shown)
PHASE_WORDS = {"train": "", "epoch_end": "", "val": "validating", "calibrate": "calibrating", "done": "done"}


def progress_text(progress: Mapping[str, Any] | None, status: str | None = None) -> str:
    """One line for the progress bar: ``"epoch 2/5 · step 3/10 · train loss 0.412 · ETA 1 min 05 s"``;
    before the first step it says what the run is doing (``status``: the run's status; a queued run's line
    under the bar says what it waits for: a worker, or the run ahead of it)."""
    if not {k: v for k, v in (progress or {}).items() if k != "queued_at"}:
        return "loading the data and building the model" if status == "running" else "queued"
    parts = []
    if progress.get("epochs"):
        parts.append(f"epoch {progress.get('epoch', 0)}/{progress['epochs']}")
    if progress.get("steps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['steps']}")
    phase = PHASE_WORDS.get(str(progress.get("phase") or "train"), str(progress.get("phase")))
    if phase:
        parts.append(phase)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        if progress.get(key) is not None:
            parts.append(f"{label} {float(progress[key]):.3f}")
    fraction = progress_fraction(progress)
    parts.append(f"{100 * fraction:.0f} %")
    if status == "running" and fraction >= 1.0 and progress.get("phase") != "done":
        parts.append("finishing: best epoch, calibration, post-processing")  # an "ETA 0 s" that lasts
    elif progress.get("eta_s") is not None:
        parts.append(f"ETA {format_seconds(progress['eta_s'])}")
    if progress.get("message"):
        parts.append(str(progress["message"]))
    return " · ".join(parts)


def scalar_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The plain numbers of a metrics dict (confusion matrices and other nested values dropped)."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[str(key)] = float(value)
    return out


def short_metrics(metrics: Mapping[str, Any] | None, keys: Iterable[str] = (
        "balanced_accuracy", "accuracy", "f1", "roc_auc", "ece", "dice", "iou", "precision", "recall"),
        limit: int = 3) -> str:
    """A short ``"balanced_accuracy 0.951 · f1 0.930"`` summary of the best-known metrics."""
    values = scalar_metrics(metrics)
    chosen = [k for k in keys if k in values][:limit] or list(values)[:limit]
    return " · ".join(f"{k} {values[k]:.3f}" for k in chosen)

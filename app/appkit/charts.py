"""Charts and short texts of the researcher pages: the Models page's training curves, progress
lines and metric tables; the Class page's timeline and confidence histogram; the Results
page's viability by condition.

Pure helpers over plain data (lists of dicts, DataFrames) plus the Altair chart builders; no
store access and no Streamlit calls, so they are unit-tested directly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import altair as alt
import numpy as np
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
            # the runs' legend on a row of its own above the plot (beside the series legend below,
            # at 1280 px its labels were cut to "classifier-0"), its symbol a stretch of each run's
            # dash (the points' default circle drew both runs as the same black dot)
            encoding["strokeDash"] = alt.StrokeDash("run:N", title="run", legend=alt.Legend(
                orient="top", labelLimit=0, symbolType="stroke", symbolSize=900, symbolStrokeWidth=2,
                symbolStrokeColor="#555555"))
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
    elif status == "running" and progress.get("steps"):  # no ETA from the first steps (start-up costs)
        parts.append("ETA estimating…")
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
        limit: int = 3, labels: Mapping[str, str] | None = None) -> str:
    """A short ``"balanced_accuracy 0.951 · dead F1 0.930"`` summary of the best-known metrics;
    ``labels``: names for people of some keys (``{"f1": "dead F1"}`` for a classifier,
    :func:`cellspot.ml.registry.metric_labels`)."""
    values = scalar_metrics(metrics)
    chosen = [k for k in keys if k in values][:limit] or list(values)[:limit]
    labels = labels or {}
    return " · ".join(f"{labels.get(k, k)} {values[k]:.3f}" for k in chosen)


# --------------------------------------------------------------------------- Class page


def timeline_chart(timeline: pd.DataFrame) -> alt.Chart:
    """Runs and clicks per minute from ``timeline`` (``minute, runs, clicks``, minutes in UTC, as
    :func:`cellspot.workflows.dashboard.class_activity` gives it).

    The time axis is a UTC scale labelled ``HH:MM`` on a 24-hour clock, and the tooltip shows the
    same text (a plain time axis showed the browser's local time, 12-hour without AM/PM, under a
    "minute (UTC)" title). Counts start at 0 with whole-number ticks (``[0, max(1, highest)]``):
    an idle minute is a line on the floor, not one "0.000000" tick with a line mid-chart.
    """
    long = timeline.melt("minute", value_vars=["runs", "clicks"], var_name="what", value_name="count")
    long["minute"] = pd.to_datetime(long["minute"], utc=True)  # naive minutes are UTC, never local
    long["minute_utc"] = long["minute"].dt.strftime("%H:%M")
    top = max(1, int(long["count"].max())) if len(long) else 1
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("minute:T", title="minute (UTC)", scale=alt.Scale(type="utc"), axis=alt.Axis(format="%H:%M")),
        y=alt.Y("count:Q", title="per minute", scale=alt.Scale(domain=[0, top]),
                axis=alt.Axis(tickMinStep=1, format="d")),
        color=alt.Color("what:N", title=None),
        strokeDash=alt.StrokeDash("what:N", title=None),
        tooltip=[alt.Tooltip("minute_utc:N", title="minute (UTC)"), alt.Tooltip("what:N", title="what"),
                 alt.Tooltip("count:Q", title="count", format="d")],
    )


#: width of a bin of the Class page's confidence histogram
CONFIDENCE_STEP = 0.05
#: fewest runs an image needs for its consensus confidence to measure agreement between students
AGREEMENT_MIN_RUNS = 2


class ConfidenceHistogram(NamedTuple):
    """``bins``: ``bin_start, bin_end, range, status, images`` (one row per bin and image status
    with images; bins are ``[start, end)`` except the last, ``[1 - step, 1]``); ``n_images``: the
    images counted; ``single_run`` / ``expert``: images left out because they have fewer than
    ``min_runs`` runs, or expert cells (confidence 1 by definition)."""

    bins: pd.DataFrame
    n_images: int
    single_run: int
    expert: int
    min_runs: int


def confidence_bins(values: Any, step: float = CONFIDENCE_STEP) -> tuple[np.ndarray, np.ndarray]:
    """``(bin_start, bin_end)`` of each value in [0, 1] (values outside are clipped), bins of width
    ``step`` with the last one closed: 1.0 falls in ``[1 - step, 1]``, not in a bin beyond 1."""
    n = round(1 / step) if step > 0 else 0
    if n < 1 or not math.isclose(n * step, 1.0):
        raise ValueError(f"step must divide 1 into whole bins (0.05, 0.1, 0.25...), got {step}")
    edges = np.round(np.arange(n + 1) * step, 10)
    clipped = np.clip(np.asarray(values, dtype=float), 0.0, 1.0)
    index = np.clip(np.searchsorted(edges, clipped, side="right") - 1, 0, n - 1)
    return edges[index], edges[index + 1]


def confidence_histogram(
    agreement: pd.DataFrame, step: float = CONFIDENCE_STEP, min_runs: int = AGREEMENT_MIN_RUNS
) -> ConfidenceHistogram:
    """The images of ``agreement`` (``Activity.agreement``) whose mean consensus confidence says how
    much students agreed, binned (:func:`confidence_bins`). An image with fewer than
    ``min_runs`` runs is left out (one student's clicks: nothing to agree on), and so is one whose
    cells are expert cells (confidence 1 whatever the students did); both are counted."""
    rows = agreement.dropna(subset=["mean_confidence"])
    expert = (rows["expert"].fillna(False).astype(bool) if "expert" in rows.columns
              else pd.Series(False, index=rows.index))
    few = ~expert & (rows["n_runs"] < min_runs)
    kept = rows[~expert & ~few]
    start, end = confidence_bins(kept["mean_confidence"], step)
    binned = kept.assign(bin_start=start, bin_end=end)
    bins = (binned.groupby(["bin_start", "bin_end", "status"]).size().rename("images").reset_index()
            if len(binned) else pd.DataFrame(columns=["bin_start", "bin_end", "status", "images"]))
    bins.insert(2, "range", [f"{a:.2f}-{b:.2f}" for a, b in zip(bins["bin_start"], bins["bin_end"])])
    return ConfidenceHistogram(bins, len(kept), int(few.sum()), int(expert.sum()), min_runs)


def confidence_chart(hist: ConfidenceHistogram) -> alt.Chart:
    """Stacked bars of :func:`confidence_histogram` (images per bin, coloured by status) on a fixed
    0-1 axis (the bins come pre-computed: Vega-Lite's own binning put 1.0 in a bin past 1)."""
    return alt.Chart(hist.bins).mark_bar().encode(
        x=alt.X("bin_start:Q", bin="binned", scale=alt.Scale(domain=[0, 1]),
                title="mean confidence of the image's consensus cells"),
        x2="bin_end:Q",
        y=alt.Y("images:Q", title="images", axis=alt.Axis(tickMinStep=1, format="d")),
        color=alt.Color("status:N", title="status"),
        tooltip=[alt.Tooltip("range:N", title="confidence"), alt.Tooltip("status:N"),
                 alt.Tooltip("images:Q", format="d")],
    )


def confidence_note(hist: ConfidenceHistogram) -> str:
    """What :func:`confidence_chart` counts and what it leaves out, in one line."""
    text = (f"{hist.n_images} image(s) with {hist.min_runs}+ runs. Confidence is how sure the consensus is "
            "of each cell and its label (mean over the image's cells): high when the students' clicks agree.")
    left = [f"{n} {what}" for n, what in (
        (hist.single_run, f"with fewer than {hist.min_runs} runs (one student's clicks: nothing to agree on)"),
        (hist.expert, "with expert cells (confidence 1 by definition)")) if n]
    return text + (f" Left out: {'; '.join(left)}." if left else "")


# --------------------------------------------------------------------------- Results page

#: the statistics columns of ``Results.by_condition``; every other column is a condition key
CONDITION_STATS = ("n_images", "n_alive", "n_dead", "viability_pct", "viability_mean", "viability_sd")


def condition_plot_frame(by_condition: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``(plot rows, condition keys)`` of ``Results.by_condition``: adds ``group`` (a readable
    label such as ``"treated · dose_uM 5"``; images without those keys: ``"(no condition
    metadata)"``) and the whiskers ``whisker_low`` / ``whisker_high``,
    mean ± SD of the images' viability cut to [0, 100] % (a viability is a percentage: 75 ± 38
    draws 37-100, not 37-113). A condition without an SD (one counted image) has no whisker."""
    groups = [c for c in by_condition.columns if c not in CONDITION_STATS]
    mean, sd = by_condition["viability_mean"].astype(float), by_condition["viability_sd"].astype(float)
    label = by_condition[groups].apply(
        lambda row: " · ".join(f"{k} {v}" if k in ("dose_uM", "time_h") else str(v)
                               for k, v in row.items() if str(v) not in ("", "nan", "None"))
        or "(no condition metadata)", axis=1)
    plot = by_condition.assign(group=label if len(by_condition) else pd.Series(dtype=str),
                               whisker_low=(mean - sd).clip(0.0, 100.0), whisker_high=(mean + sd).clip(0.0, 100.0))
    return plot, groups


def viability_chart(plot: pd.DataFrame, groups: list[str]) -> alt.LayerChart:
    """Viability by condition from :func:`condition_plot_frame`: a bar per condition (pooled over
    its cells), a diamond at the mean over its images and a whisker of ± SD cut to [0, 100] %."""
    order = plot["group"].tolist()
    y = alt.Y("group:N", sort=order, title=None, axis=alt.Axis(labelLimit=480))
    scale = alt.Scale(domain=[0, 100])
    tooltip = [*groups, alt.Tooltip("n_images:Q", title="images"), alt.Tooltip("n_alive:Q", title="alive"),
               alt.Tooltip("n_dead:Q", title="dead"),
               alt.Tooltip("viability_pct:Q", title="viability % (pooled cells)", format=".1f"),
               alt.Tooltip("viability_mean:Q", title="mean over images %", format=".1f"),
               alt.Tooltip("viability_sd:Q", title="SD over images", format=".1f"),
               alt.Tooltip("whisker_low:Q", title="whisker from (mean - SD, not below 0)", format=".1f"),
               alt.Tooltip("whisker_high:Q", title="whisker to (mean + SD, not above 100)", format=".1f")]
    base = alt.Chart(plot)
    bars = base.mark_bar().encode(
        y=y, x=alt.X("viability_pct:Q", title="viability % (alive / counted cells)", scale=scale), tooltip=tooltip)
    whiskers = base.mark_errorbar(ticks=True).encode(
        y=y, x=alt.X("whisker_low:Q", title="", scale=scale), x2="whisker_high:Q", tooltip=tooltip)
    means = base.mark_point(shape="diamond", filled=True, size=60, color="black").encode(
        y=y, x=alt.X("viability_mean:Q", title="", scale=scale), tooltip=tooltip)
    return bars + whiskers + means

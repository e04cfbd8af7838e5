"""The Class and Results pages: their chart builders (pure, in ``appkit.charts``) from tables of
cases, and the pages themselves with ``AppTest`` on the seeded store (see conftest.py): every
annotator in the Class table, UTC time axes, empty states, honest histograms and whiskers."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from app_testkit import login, texts
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from appkit import charts
from cellspot.store.models import Annotator, Image, Project, TaskRun

# --------------------------------------------------------------------------- helpers


def open_page(at, page: str):
    login(at)
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def specs(at) -> list[dict]:
    """The Vega-Lite specs of the page's charts, in page order."""
    return [json.loads(chart.proto.spec) for chart in at.get("vega_lite_chart")]


def chart_rows(at, index: int = 0) -> list[dict]:
    """The data rows of the page's ``index``-th chart (Streamlit sends them as Arrow datasets)."""
    from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df

    chart = at.get("vega_lite_chart")[index].proto
    return [row for named in chart.datasets
            for row in convert_arrow_bytes_to_pandas_df(named.data.data).to_dict("records")]


def column_config(frame) -> dict:
    return json.loads(frame.proto.columns)


def layers(spec: dict) -> list[dict]:
    return spec.get("layer", [spec])


# --------------------------------------------------------------------------- timeline chart

TIMELINE = pd.DataFrame({"minute": pd.date_range("2025-03-04 14:57", periods=3, freq="min", tz="UTC"),
                         "runs": [0, 2, 1], "clicks": [0, 7, 3]})


def test_the_timeline_is_a_utc_axis_in_24_hour_time() -> None:
    spec = charts.timeline_chart(TIMELINE).to_dict()
    x = spec["encoding"]["x"]
    assert x["scale"]["type"] == "utc" and x["axis"]["format"] == "%H:%M" and x["title"] == "minute (UTC)"
    rows = next(iter(spec["datasets"].values()))
    assert {r["minute_utc"] for r in rows} == {"14:57", "14:58", "14:59"}  # the tooltip's text, 24-hour UTC
    assert all(r["minute"].endswith("+00:00") for r in rows)  # an offset: the browser cannot read local time
    assert spec["encoding"]["tooltip"][0] == {"field": "minute_utc", "type": "nominal", "title": "minute (UTC)"}


def test_naive_timeline_minutes_are_taken_as_utc() -> None:
    naive = TIMELINE.assign(minute=TIMELINE["minute"].dt.tz_localize(None))
    rows = next(iter(charts.timeline_chart(naive).to_dict()["datasets"].values()))
    assert rows[0]["minute"] == "2025-03-04T14:57:00+00:00" and rows[0]["minute_utc"] == "14:57"


@pytest.mark.parametrize(("runs", "clicks", "top"), [
    ([0, 0, 0], [0, 0, 0], 1),  # an idle window: the line lies on 0, one whole-number step above it
    ([0, 1, 0], [0, 1, 0], 1),
    ([0, 2, 1], [0, 7, 3], 7),
])
def test_the_timeline_counts_start_at_zero_in_whole_numbers(runs, clicks, top) -> None:
    y = charts.timeline_chart(TIMELINE.assign(runs=runs, clicks=clicks)).to_dict()["encoding"]["y"]
    assert y["scale"]["domain"] == [0, top]
    assert y["axis"] == {"format": "d", "tickMinStep": 1}


# --------------------------------------------------------------------------- confidence histogram

@pytest.mark.parametrize(("value", "start", "end"), [
    (0.0, 0.0, 0.05), (0.05, 0.05, 0.1), (0.15, 0.15, 0.2), (0.3, 0.3, 0.35), (0.949, 0.9, 0.95),
    (0.95, 0.95, 1.0), (0.999, 0.95, 1.0),
    (1.0, 0.95, 1.0),  # the last bin is closed: 1.0 is not drawn in a bin past the 1.00 tick
    (1.2, 0.95, 1.0), (-0.1, 0.0, 0.05),  # outside [0, 1]: clipped
])
def test_confidence_bins(value, start, end) -> None:
    got_start, got_end = charts.confidence_bins([value])
    assert (got_start[0], got_end[0]) == pytest.approx((start, end))


@pytest.mark.parametrize("step", [0.3, 0.0, -0.1, 2.0])
def test_confidence_bins_need_a_step_that_divides_one(step) -> None:
    with pytest.raises(ValueError, match="step must divide 1"):
        charts.confidence_bins([0.5], step)


AGREEMENT = pd.DataFrame({
    "image_id": [1, 2, 3, 4, 5, 6], "image": list("abcdef"),
    "status": ["active", "retired", "active", "active", "retired", "active"],
    "n_runs": [3, 4, 1, 0, 2, 5], "n_cells": [2, 2, 1, 1, 3, 2],
    "mean_confidence": [1.0, 0.97, 1.0, 0.5, 0.42, np.nan],
    "min_confidence": [1.0, 0.9, 1.0, 0.5, 0.3, np.nan],
    "expert": [False, False, False, True, False, False],
})


def test_the_confidence_histogram_leaves_out_images_that_say_nothing_about_agreement() -> None:
    hist = charts.confidence_histogram(AGREEMENT)
    # a, b, e have 2+ runs; c has one run; d has expert cells; f has no confidence (no cells)
    assert (hist.n_images, hist.single_run, hist.expert) == (3, 1, 1)
    bins = hist.bins.set_index(["bin_start", "status"])
    assert bins.loc[(0.95, "active"), "images"] == 1 and bins.loc[(0.95, "retired"), "images"] == 1
    assert bins.loc[(0.4, "retired"), "range"] == "0.40-0.45"
    assert hist.bins["bin_end"].max() == 1.0 and int(hist.bins["images"].sum()) == 3
    note = charts.confidence_note(hist)
    assert "3 image(s) with 2+ runs" in note
    assert "1 with fewer than 2 runs" in note and "1 with expert cells" in note


def test_the_confidence_chart_draws_the_bins_it_is_given_on_0_to_1() -> None:
    spec = charts.confidence_chart(charts.confidence_histogram(AGREEMENT)).to_dict()
    x = spec["encoding"]["x"]
    assert x["bin"] == "binned" and x["scale"]["domain"] == [0, 1] and spec["encoding"]["x2"]["field"] == "bin_end"
    assert spec["encoding"]["y"]["axis"] == {"format": "d", "tickMinStep": 1}


def test_an_empty_confidence_histogram() -> None:
    hist = charts.confidence_histogram(AGREEMENT.iloc[:0])
    assert hist.n_images == 0 and hist.bins.empty
    charts.confidence_chart(hist).to_dict()


# --------------------------------------------------------------------------- viability by condition

@pytest.mark.parametrize(("mean", "sd", "low", "high"), [
    (75.0, 38.0, 37.0, 100.0),  # the auditor's case: not 113 %
    (10.0, 20.0, 0.0, 30.0),
    (50.0, 10.0, 40.0, 60.0),
    (50.0, 0.0, 50.0, 50.0),
    (50.0, float("nan"), float("nan"), float("nan")),  # one counted image: no SD, no whisker
])
def test_viability_whiskers_stay_within_0_and_100(mean, sd, low, high) -> None:
    by_condition = pd.DataFrame({"condition": ["treated"], "dose_uM": [5], "n_images": [3], "n_alive": [10],
                                 "n_dead": [5], "viability_pct": [66.67], "viability_mean": [mean],
                                 "viability_sd": [sd]})
    plot, groups = charts.condition_plot_frame(by_condition)
    assert groups == ["condition", "dose_uM"] and plot["group"].tolist() == ["treated · dose_uM 5"]
    got = plot[["whisker_low", "whisker_high"]].iloc[0].tolist()
    assert all((math.isnan(g) and math.isnan(e)) or g == pytest.approx(e) for g, e in zip(got, [low, high]))


def test_the_viability_chart_draws_the_cut_whiskers_and_says_so() -> None:
    by_condition = pd.DataFrame({"condition": ["control", ""], "n_images": [2, 3], "n_alive": [9, 3],
                                 "n_dead": [1, 3], "viability_pct": [90.0, 50.0], "viability_mean": [85.0, 60.0],
                                 "viability_sd": [30.0, 70.0]})
    plot, groups = charts.condition_plot_frame(by_condition)
    assert plot["group"].tolist() == ["control", "(no condition metadata)"]
    spec = charts.viability_chart(plot, groups).to_dict()
    whisker = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "errorbar")
    assert (whisker["encoding"]["x"]["field"], whisker["encoding"]["x2"]["field"]) == ("whisker_low", "whisker_high")
    rows = next(iter(spec["datasets"].values()))
    assert [(r["whisker_low"], r["whisker_high"]) for r in rows] == [(55.0, 100.0), (0.0, 100.0)]
    titles = [t.get("title", "") for t in whisker["encoding"]["tooltip"]]
    assert "whisker to (mean + SD, not above 100)" in titles


# --------------------------------------------------------------------------- Class page

CROWD = """image,annotator,x,y,label
{image},crowd-1,5,5,alive
{image},crowd-1,9,9,dead
"""


def _import_crowd(engine, store, tmp_path) -> None:
    from cellspot.importers.clicks import import_clicks

    with Session(engine) as session:
        project = session.scalars(select(Project)).one()
        image = session.scalars(select(Image).where(Image.project_id == project.id).order_by(Image.id)).first()
        (tmp_path / "crowd.csv").write_text(CROWD.format(image=image.name))
        import_clicks(session, project, tmp_path / "crowd.csv", settings=store)
        session.commit()


def test_the_class_page_lists_imported_annotators_with_their_role(app, app_engine, store, tmp_path) -> None:
    _import_crowd(app_engine, store, tmp_path)
    open_page(app, "class_view")
    table = app.dataframe[0].value
    crowd = table.set_index("nickname").loc["crowd-1"]
    assert (crowd["role"], crowd["runs"], crowd["clicks"]) == ("imported", 1, 2)
    assert set(table["role"]) == {"student", "imported", "expert"}  # the demo's expert has expert cells, no runs
    # the totals in the caption are the table's runs and clicks; the caption names every role
    caption = texts(app.caption)
    assert f"{table['runs'].sum()} runs, {table['clicks'].sum()} clicks in all" in caption
    assert "2 class students (2 active), 1 imported annotator (1 active), 1 expert" in caption
    metric = next(m for m in app.metric if m.label == "Students active")
    assert metric.value == "2 / 2" and "Imported annotators" in metric.proto.help  # says what it counts


def test_the_class_table_shows_the_weight_early_and_explains_clicks_used(app) -> None:
    open_page(app, "class_view")
    frame = app.dataframe[0]
    assert list(frame.value.columns[:4]) == ["nickname", "role", "runs", "weight"]
    config = column_config(frame)
    assert config["consensus_clicks"]["label"] == "clicks used"
    assert "same spot clicked twice" in config["consensus_clicks"]["help"]
    assert "annotators.csv" in config["consensus_clicks"]["help"]
    assert all(config[c]["width"] == "small" for c in ("role", "runs", "weight", "clicks", "consensus_clicks"))
    weights = frame.value["weight"]
    assert weights[frame.value["role"] == "student"].notna().all()  # the seeded store has a consensus


def test_the_class_charts_are_utc_and_the_histogram_says_what_it_counts(app) -> None:
    open_page(app, "class_view")
    timeline, histogram = specs(app)
    assert timeline["encoding"]["x"]["scale"] == {"type": "utc"}
    assert timeline["encoding"]["x"]["axis"]["format"] == "%H:%M"
    assert histogram["encoding"]["x"]["bin"] == "binned"
    bins = chart_rows(app, 1)
    assert bins and max(r["bin_end"] for r in bins) <= 1.0  # confidence 1.0 is drawn inside [0, 1]
    assert "Consensus confidence per image" in [h.value for h in app.subheader]
    assert re.search(r"\d+ image\(s\) with 2\+ runs", texts(app.caption))


def test_the_class_page_says_when_no_run_is_in_the_window(app, app_engine) -> None:
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    with Session(app_engine) as session:
        session.execute(update(TaskRun).values(submitted_at=long_ago))
        session.execute(update(Annotator).values(created_at=long_ago))
        session.commit()
    open_page(app, "class_view")
    assert "No task runs in the last 10 minutes." in texts(app.info)
    assert len(specs(app)) == 1  # the histogram only: no empty timeline
    assert next(m for m in app.metric if m.label == "Runs per minute").value == "0.0"


def test_the_class_page_of_an_empty_project(app, app_engine) -> None:
    from cellspot.workflows.dashboard import create_project

    with Session(app_engine) as session:
        project_id = create_project(session, "empty").id
        session.commit()
    login(app)
    app.session_state["r_project_id"] = project_id
    app.switch_page("views/class_view.py").run()
    assert not app.exception, [e.value for e in app.exception]
    info = texts(app.info)
    assert "No task runs in the last 10 minutes." in info and "No consensus yet." in info
    assert "No annotators yet" in info
    assert not specs(app) and not app.dataframe


# --------------------------------------------------------------------------- Results page


def test_the_results_page_draws_whiskers_cut_at_0_and_100(app, app_engine) -> None:
    # the seeded images' viabilities are about 96, 55, 55 and 70 %: put the first two in one condition,
    # whose mean + SD then passes 100 %
    with Session(app_engine) as session:
        images = session.scalars(select(Image).order_by(Image.id)).all()
        for image in images:
            dose = (image.meta or {}).get("dose_uM")
            image.meta = {"condition": "mixed" if dose in (0, 0.0, 2, 2.0) else "rest"}
        session.commit()
    open_page(app, "results")
    by_condition = app.dataframe[0].value.set_index("condition")
    mixed = by_condition.loc["mixed"]
    assert mixed["n_images"] == 2 and mixed["viability_mean"] + mixed["viability_sd"] > 100
    chart = specs(app)[0]
    whisker = next(layer for layer in layers(chart) if layer["mark"]["type"] == "errorbar")
    assert (whisker["encoding"]["x"]["field"], whisker["encoding"]["x2"]["field"]) == ("whisker_low", "whisker_high")
    rows = {r["group"]: r for r in chart_rows(app)}
    assert rows["mixed"]["whisker_high"] == 100.0
    assert rows["mixed"]["whisker_low"] == pytest.approx(mixed["viability_mean"] - mixed["viability_sd"])
    assert all(0 <= r[k] <= 100 for r in rows.values() for k in ("whisker_low", "whisker_high") if pd.notna(r[k]))
    assert "whiskers cut at 0 and 100 %" in texts(app.caption)

"""Researcher workflows: class activity, review, adjudication, results, settings, export zip."""

from __future__ import annotations

import math
import zipfile
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.store import queries as q
from cellspot.store.models import ConsensusCell, ConsensusSnapshot, GoldCell, Image, Project
from cellspot.workflows import dashboard as d
from cellspot.workflows import review as rv
from cellspot.workflows.aggregate import aggregate

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=timezone.utc)
CELLS = [(20.0, 20.0, "alive"), (60.0, 30.0, "dead")]
META = {"a": {"condition": "control", "dose_uM": 0}, "b": {"condition": "treated", "dose_uM": 5},
        "c": {"condition": "treated", "dose_uM": 5}, "d": {"condition": "treated", "dose_uM": 10}}


@pytest.fixture
def project(session: Session) -> Project:
    return q.get_or_create_project(session, "p", class_codes=["7B"], retire_min_runs=3)


@pytest.fixture
def images(session: Session, project) -> dict[str, Image]:
    out = {n: Image(project=project, name=n, width=100, height=80, has_pixels=False, meta=m)
           for n, m in META.items()}
    session.add_all(out.values())
    session.flush()
    return out


def _submit(session, image, who, clicks, key, when):
    run, _ = q.submit_task_run(session, image, who, clicks, key)
    run.submitted_at = when
    return run


@pytest.fixture
def busy(session, project, images):
    """3 students of 7B and one of 8A; image a has 3 agreeing runs, b one, c and d none."""
    people = [q.get_or_create_annotator(session, project, f"s{i}", "7B") for i in range(3)]
    people.append(q.get_or_create_annotator(session, project, "other", "8A"))
    for who in people:
        who.created_at = NOW - timedelta(hours=1)
    for i, who in enumerate(people[:3]):
        clicks = [(x + i, y - i, label) for x, y, label in CELLS]
        _submit(session, images["a"], who, clicks, f"a{i}", NOW - timedelta(minutes=2 * i))
    _submit(session, images["b"], people[0], CELLS[:1], "b0", NOW - timedelta(minutes=30))
    _submit(session, images["b"], people[3], [], "b3", NOW - timedelta(minutes=1))
    session.flush()
    return people


# --------------------------------------------------------------------------- activity


def test_class_activity_counts(session, project, busy) -> None:
    act = d.class_activity(session, project, window_minutes=10, now=NOW)
    assert act.students_total == 4
    assert act.students_active == 4  # s0, s1, s2 and 'other' ran within 10 min
    assert act.runs_total == 5 and act.clicks_total == 7
    assert act.runs_per_minute == pytest.approx(4 / 10)  # the 30-min-old run is outside the window
    assert act.clicks_per_minute == pytest.approx(6 / 10)
    assert (act.images_total, act.images_unseen, act.images_in_progress, act.images_retired) == (4, 2, 2, 0)
    students = act.students.set_index("nickname")
    assert students.loc["s0", "runs"] == 2 and students.loc["s0", "clicks"] == 3
    assert students.loc["s0", "runs_in_window"] == 1
    assert students[["sensitivity", "weight"]].isna().all().all()  # no snapshot yet
    assert list(act.timeline.columns) == d.TIMELINE_COLUMNS and len(act.timeline) == 10
    assert act.timeline["runs"].sum() == 4
    assert act.agreement.empty and act.snapshot_id is None


def test_class_activity_window_and_class_filter(session, project, busy) -> None:
    act = d.class_activity(session, project, window_minutes=3, class_code="7b", now=NOW)
    assert set(act.students["nickname"]) == {"s0", "s1", "s2"}
    assert act.students_active == 2  # s0 (now) and s1 (2 min ago)
    assert act.runs_total == 4
    with pytest.raises(d.DashboardError, match="window_minutes"):
        d.class_activity(session, project, window_minutes=0)


def test_class_activity_after_aggregate(session, project, busy) -> None:
    aggregate(session, project)
    act = d.class_activity(session, project, now=NOW)
    assert act.snapshot_id is not None
    assert act.students.set_index("nickname").loc["s1", "weight"] > 0
    row = act.agreement.set_index("image").loc["a"]
    assert row["n_cells"] == 2 and row["n_runs"] == 3 and 0 <= row["mean_confidence"] <= 1
    assert act.images_retired + act.images_in_progress + act.images_unseen == 4


# --------------------------------------------------------------------------- review + adjudication


def test_image_review_shows_consensus_then_expert_cells(session, project, images, busy) -> None:
    with pytest.raises(rv.ImageNotInStoreError):
        rv.image_review(session, 999_999)
    assert rv.image_review(session, images["a"].id).cells.empty  # no snapshot yet
    aggregate(session, project)
    review = rv.image_review(session, images["a"].id)
    assert not review.expert and len(review.cells) == 2 and len(review.clicks) == 6
    assert list(review.cells.columns) == rv.REVIEW_CELL_COLUMNS
    assert list(review.clicks.columns) == rv.REVIEW_CLICK_COLUMNS
    assert set(review.clicks["nickname"]) == {"s0", "s1", "s2"}
    rv.adjudicate(session, images["a"].id, "accept")
    review = rv.image_review(session, images["a"].id)
    assert review.expert and set(review.cells["source"]) == {"adjudication"}
    assert review.cells["support"].tolist() == [3, 3]
    assert review.n_runs == 3 and set(review.cells["n_runs"]) == {3}


def test_image_review_counts_runs_that_marked_nothing(session, project, images, busy) -> None:
    # image b: one run with a click and one that marked nothing, as the per-image results count them
    review = rv.image_review(session, images["b"].id)
    assert review.n_runs == 2 and review.clicks["task_run_id"].nunique() == 1
    assert rv.image_review(session, images["c"].id).n_runs == 0
    rv.adjudicate(session, images["b"].id, "add", x=21, y=19, label="alive")
    cell = rv.image_review(session, images["b"].id).cells.iloc[0]
    assert (cell["support"], cell["n_runs"]) == (1, 2)  # the empty run did not support it


ADJUDICATIONS = [
    # action, x, y, label, expected cells (x, y, label) afterwards, or an error fragment
    ("accept", 21, 19, None, [(21, 19, "alive"), (61, 29, "dead")], None),
    ("relabel", 22, 18, "dead", [(21, 19, "dead"), (61, 29, "dead")], None),
    ("delete", 60, 30, None, [(21, 19, "alive")], None),
    ("add", 90, 70, "dead", [(21, 19, "alive"), (61, 29, "dead"), (90, 70, "dead")], None),
    ("relabel", 21, 19, "not_sure", None, "not allowed for an expert cell"),
    ("delete", 40, 40, None, None, "no cell within 15 px"),
    ("add", 21, 20, "alive", None, "already lies"),
    ("add", 100, 5, "alive", None, "outside image"),
    ("shrug", 1, 1, None, None, "unknown adjudication action 'shrug'; allowed: accept, relabel"),
]


@pytest.mark.parametrize(("action", "x", "y", "label", "expected", "error"), ADJUDICATIONS)
def test_adjudicate(session, project, images, busy, action, x, y, label, expected, error) -> None:
    aggregate(session, project)
    researcher = rv.researcher_annotator(session, project)
    image_id = images["a"].id
    if error:
        with pytest.raises(rv.AdjudicationError, match=error):
            rv.adjudicate(session, image_id, action, x, y, label, researcher)
        return
    result = rv.adjudicate(session, image_id, action, x, y, label, researcher)
    assert result.seeded == 2 and result.n_expert_cells == len(expected)
    stored = session.execute(sa.select(GoldCell.x, GoldCell.y, GoldCell.label, GoldCell.source,
                                       GoldCell.annotator_id).where(GoldCell.image_id == image_id)
                             .order_by(GoldCell.x)).tuples().all()
    got = [(round(x_), round(y_), lab) for x_, y_, lab, _, _ in stored]
    assert got == sorted(expected)
    assert {(src, who) for *_, src, who in stored} == {("adjudication", researcher.id)}
    # the expert cells override consensus in the next aggregate
    report = aggregate(session, project)
    snap = session.get(ConsensusSnapshot, report.snapshot_id)
    cells = q.snapshot_cells_frame(session, snap)
    mine = cells[cells["image_id"] == image_id]
    assert mine["from_gold"].all()
    assert sorted((round(r.x), round(r.y), r.label) for r in mine.itertuples()) == sorted(expected)


def test_adjudicate_without_snapshot_starts_empty(session, project, images) -> None:
    res = rv.adjudicate(session, images["c"].id, "add", 50, 40, "alive")
    assert (res.seeded, res.n_expert_cells, res.label) == (0, 1, "alive")
    res = rv.adjudicate(session, images["c"].id, "delete", 52, 41)
    assert res.n_expert_cells == 0 and res.gold_cell_id is None
    assert rv.clear_expert_cells(session, images["c"].id) == 0


# --------------------------------------------------------------------------- results


def _snapshot(session, project, images, cells) -> None:
    snap = ConsensusSnapshot(project_id=project.id, method="test")
    session.add(snap)
    session.flush()
    session.add_all(ConsensusCell(snapshot_id=snap.id, image_id=images[n].id, x=10.0 + i, y=10.0, label=lab,
                                  p_alive=1.0 if lab == "alive" else 0.0, confidence=conf, support=1, n_runs=1)
                    for i, (n, lab, conf) in enumerate(cells))
    session.flush()


def test_results_per_image_and_by_condition(session, project, images) -> None:
    cells = ([("a", "alive", 1.0)] * 3 + [("a", "dead", 1.0)] + [("b", "alive", 1.0), ("b", "dead", 1.0)]
             + [("c", "dead", 1.0), ("c", "alive", 0.2)])
    _snapshot(session, project, images, cells)
    per_image, by_condition = d.results(session, project)
    row = per_image.set_index("image")
    assert row.loc["a", ["n_alive", "n_dead", "viability_pct"]].tolist() == [3, 1, 75.0]
    assert row.loc["c", ["n_alive", "n_dead", "viability_pct"]].tolist() == [1, 1, 50.0]
    assert math.isnan(row.loc["d", "viability_pct"]) and row.loc["d", "n_alive"] == 0
    assert {"meta_condition", "meta_dose_uM"} <= set(per_image.columns)
    groups = by_condition.set_index(["condition", "dose_uM"])
    assert groups.loc[("treated", 5), ["n_images", "n_alive", "n_dead", "viability_pct"]].tolist() == [2, 2, 2, 50.0]
    assert groups.loc[("control", 0), "viability_pct"] == 75.0
    # confident cells only
    strict = d.results(session, project, by=["condition"], min_confidence=0.5)
    assert strict.per_image.set_index("image").loc["c", "viability_pct"] == 0.0
    assert list(strict.by_condition["condition"]) == ["control", "treated"]


def test_results_without_metadata_or_snapshot(session, project) -> None:
    session.add(Image(project=project, name="x", width=10, height=10))
    session.flush()
    res = d.results(session, project)
    assert res.per_image["n_alive"].tolist() == [0]
    assert res.by_condition["group"].tolist() == ["all"]
    with pytest.raises(d.DashboardError, match="unknown metadata key"):
        d.results(session, project, by=["drug"])


def test_consensus_basis_names_the_snapshot_and_says_when_the_store_moved_on(session, project, images, busy):
    assert d.consensus_basis(session, project) == (None, None, None)
    report = aggregate(session, project)
    basis = d.consensus_basis(session, project)
    assert basis.snapshot_id == report.snapshot_id and basis.snapshot_at.tzinfo is not None
    assert basis.behind is None
    _submit(session, images["c"], busy[1], CELLS[:2], "c1", NOW)
    session.flush()
    behind = d.consensus_basis(session, project).behind
    assert behind.startswith(f"consensus snapshot {report.snapshot_id} is older than the store")
    assert "task runs" in behind


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("changes", "expected", "error"),
    [
        ({"class_codes": ["7b", " 8a ", "7B"]}, {"class_codes": ["7B", "8A"]}, None),
        ({"class_codes": "x1, y2"}, {"class_codes": ["X1", "Y2"]}, None),
        ({"target_runs_per_image": 5, "retire_min_runs": "3"},
         {"target_runs_per_image": 5, "retire_min_runs": 3}, None),
        ({"retire_min_runs": None}, None, "whole number"),
        ({"retire_min_confidence": 0.8, "gold_rate": 0}, {"retire_min_confidence": 0.8, "gold_rate": 0.0}, None),
        ({"feedback_radius": 12}, {"feedback_radius": 12.0}, None),
        ({"lease_seconds": "300"}, {"lease_seconds": 300}, None),
        ({"lease_seconds": 5}, None, "lease_seconds must be a whole number from 30 to 86400"),
        ({"class_codes": ["a b!"]}, None, "class code 'a b!' is not allowed"),
        ({"class_codes": 7}, None, "must be a list"),
        ({"retire_min_runs": 0}, None, "retire_min_runs must be a whole number from 1 to 1000"),
        ({"retire_min_runs": 2.5}, None, "whole number"),
        ({"retire_min_confidence": 1.5}, None, r"retire_min_confidence must be a number in \[0, 1\]"),
        ({"gold_rate": "lots"}, None, "gold_rate"),
        ({"feedback_radius": 0}, None, "feedback_radius"),
        ({"colour": "red"}, None, "unknown project setting 'colour'; allowed: class_codes"),
        ({"retire_max_runs": "12", "retire_min_cell_certainty": 0.4, "retire_count_tolerance": None},
         {"retire_max_runs": 12, "retire_min_cell_certainty": 0.4, "retire_count_tolerance": None}, None),
        ({"retire_max_runs": None, "retire_count_tolerance": 0.5},
         {"retire_max_runs": None, "retire_count_tolerance": 0.5}, None),
        ({"retire_max_runs": 0}, None, "retire_max_runs must be a whole number from 1 to 1000"),
        ({"retire_min_cell_certainty": 2}, None, "retire_min_cell_certainty"),
        ({"retire_min_runs": 8, "retire_max_runs": 5}, None, "retire_max_runs = 5 .* retire_min_runs = 8"),
    ],
)
def test_update_project_settings(session, project, changes, expected, error) -> None:
    before = dict(project.settings)
    if error:
        with pytest.raises(d.InvalidProjectSettingError, match=error):
            d.update_project_settings(session, project, **{"target_runs_per_image": 7, **changes})
        assert project.settings == before  # nothing changed
        return
    new = d.update_project_settings(session, project, **changes)
    assert new == {**before, **expected}
    session.expire_all()
    assert session.get(Project, project.id).settings == new  # really persisted


def test_class_codes_unique_across_projects(session, project) -> None:
    other = d.create_project(session, "other", class_codes=["9z"])
    with pytest.raises(d.ClassCodeTakenError, match="already belong to project 'p'"):
        d.update_project_settings(session, other, class_codes=["9Z", "7b"])
    d.update_project_settings(session, project, class_codes=["7B", "7C"])  # its own codes are fine
    with pytest.raises(d.ClassCodeTakenError):
        d.create_project(session, "third", class_codes=["7c"])


@pytest.mark.parametrize(
    ("name", "options", "error"),
    [("new one", {"gold_rate": 0.1}, None), ("p", {}, d.ProjectExistsError), ("  ", {}, d.DashboardError),
     ("x", {"gold_rate": 2}, d.InvalidProjectSettingError), ("P", {}, d.ProjectExistsError),
     ("a" * 201, {}, d.DashboardError)],
)
def test_create_project(session, project, name, options, error) -> None:
    if error:
        with pytest.raises(error):
            d.create_project(session, name, **options)
        return
    created = d.create_project(session, name, "desc", **options)
    assert (created.name, created.description, created.settings) == (name, "desc", options)


# --------------------------------------------------------------------------- export


def test_export_zip(session, project, busy, settings) -> None:
    from cellspot.export import NoSnapshotError

    with pytest.raises(NoSnapshotError):
        d.export_zip(session, project, settings)
    aggregate(session, project)
    path, report = d.export_zip(session, project, settings)
    assert report.stale is None  # nothing changed since the consensus
    assert path.parent == settings.exports_dir and path.suffix == ".zip"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        top = names[0].split("/")[0]
        assert f"{top}/manifest.json" in names and f"{top}/cells.csv" in names
        cells = pd.read_csv(archive.open(f"{top}/cells.csv"))
    assert set(cells["image"]) <= {"a", "b"} and len(cells) >= 2
    assert not list(settings.exports_dir.glob(".*.part"))


# --------------------------------------------------------------------------- class view: every annotator

#: a tidy click file: crowd-2 on image c (a minute ago), crowd-10 on c (2 min ago) and d (2 h ago)
CROWD_CSV = """image,annotator,x,y,label,timestamp
c,crowd-2,20,20,alive,2025-03-04T09:59:00Z
c,crowd-2,60,30,dead,2025-03-04T09:59:00Z
c,crowd-10,21,19,alive,2025-03-04T09:58:00Z
d,crowd-10,50,50,dead,2025-03-04T08:00:00Z
"""


def test_class_activity_lists_imported_annotators_and_experts_with_their_role(
    session, project, busy, tmp_path, settings
) -> None:
    from cellspot.importers.clicks import import_clicks

    (tmp_path / "crowd.csv").write_text(CROWD_CSV)
    import_clicks(session, project, tmp_path / "crowd.csv", settings=settings)
    q.get_or_create_annotator(session, project, "prof", "", role="expert").created_at = NOW - timedelta(days=1)
    session.flush()
    act = d.class_activity(session, project, window_minutes=10, now=NOW)
    table = act.students
    # class students first, then imported (numbers in nicknames compared as numbers), then experts
    assert table["nickname"].tolist() == ["other", "s0", "s1", "s2", "crowd-2", "crowd-10", "prof"]
    assert table["role"].tolist() == ["student"] * 4 + ["imported"] * 2 + ["expert"]
    # the table and the totals count the same runs; the metric counts class students only
    assert table["runs"].sum() == act.runs_total == 5 + 3
    assert table["clicks"].sum() == act.clicks_total == 7 + 4
    assert (act.students_active, act.students_total) == (4, 4)
    assert act.runs_per_minute == pytest.approx((4 + 2) / 10)
    counts = d.annotator_counts(table).set_index("role")
    assert counts.index.tolist() == ["student", "imported", "expert"]
    assert counts.loc["imported"].tolist() == [2, 2, 3, 4]  # annotators, active, runs, clicks
    assert counts.loc["expert"].tolist() == [1, 0, 0, 0]
    assert list(d.class_activity(session, project, class_code="7B", now=NOW).students["role"]) == ["student"] * 3


def test_class_activity_reliability_of_imported_annotators(session, project, busy, tmp_path, settings) -> None:
    from cellspot.importers.clicks import import_clicks

    (tmp_path / "crowd.csv").write_text(CROWD_CSV)
    import_clicks(session, project, tmp_path / "crowd.csv", settings=settings)
    aggregate(session, project)
    table = d.class_activity(session, project, now=NOW).students.set_index("nickname")
    rel = q.reliability_frame(session, q.latest_snapshot(session, project)).set_index("nickname")
    for name in ("crowd-2", "crowd-10"):
        assert table.loc[name, "weight"] == pytest.approx(rel.loc[name, "weight"])


def test_students_show_the_clicks_the_consensus_counted(session, project, images, busy) -> None:
    # s0 clicks the same spot twice on image c: the consensus sets the repeat aside
    _submit(session, images["c"], busy[0], [(40.0, 40.0, "alive"), (40.0, 40.0, "alive"), (70.0, 20.0, "dead")],
            "c0", NOW)
    session.flush()
    assert d.class_activity(session, project, now=NOW).students["consensus_clicks"].isna().all()  # no snapshot
    aggregate(session, project)
    s0 = d.class_activity(session, project, now=NOW).students.set_index("nickname").loc["s0"]
    assert (s0["clicks"], s0["consensus_clicks"]) == (2 + 1 + 3, 2 + 1 + 2)
    rel = q.reliability_frame(session, q.latest_snapshot(session, project)).set_index("nickname")
    assert s0["consensus_clicks"] == rel.loc["s0", "n_clicks"]  # the export's annotators.csv n_clicks


def test_class_activity_columns_put_the_weight_early() -> None:
    assert d.STUDENT_COLUMNS[:5] == ["annotator_id", "nickname", "role", "runs", "weight"]


def test_agreement_marks_images_whose_cells_are_expert_cells(session, project, images, busy) -> None:
    session.add(GoldCell(image_id=images["b"].id, x=20.0, y=20.0, label="alive", source="test"))
    session.flush()
    aggregate(session, project)
    agreement = d.class_activity(session, project, now=NOW).agreement
    assert list(agreement.columns) == d.AGREEMENT_COLUMNS
    agreement = agreement.set_index("image")
    assert agreement.loc["b", "expert"] and agreement.loc["b", "mean_confidence"] == 1.0
    assert not agreement.loc["a", "expert"] and agreement.loc["a", "n_runs"] == 3

"""Adaptive retirement: the rules from a table, thresholds from settings, the store update."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sqlalchemy.orm import Session

from cellspot.active import retirement as r
from cellspot.store import queries as q
from cellspot.store.models import ConsensusCell, ConsensusSnapshot, Image, Project
from cellspot.workflows.aggregate import RetirementRule, settled_images

NAN = float("nan")
DEFAULT = r.RetirementPolicy()  # min_runs 3, min_confidence 0.9, max_runs 10, certainty 0.5, tolerance 0.25
RULE_ONLY = r.RetirementPolicy.from_rule(RetirementRule(min_runs=3, min_confidence=0.9))

# policy, (n_runs, n_cells, min_confidence, min_cell_certainty, median_clicks), retire, reason
CASES = [
    (DEFAULT, (2, 5, 1.0, 1.0, 5), False, "few_runs"),
    (DEFAULT, (0, 0, NAN, NAN, NAN), False, "few_runs"),
    (DEFAULT, (10, 5, 0.1, 0.0, 0), True, "max_runs"),  # enough runs: retire whatever the consensus
    (DEFAULT, (12, 0, NAN, NAN, NAN), True, "max_runs"),
    (DEFAULT, (3, 5, 0.95, 0.8, 5), True, "settled"),
    (DEFAULT, (3, 5, 0.85, 0.8, 5), False, "label_unsure"),  # one cell's label below 0.9
    (DEFAULT, (3, 5, 0.95, 0.2, 5), False, "cell_unsure"),  # a cell with p_cell 0.6 (|2p-1| = 0.2)
    (DEFAULT, (3, 5, 0.95, 0.5, 5), True, "settled"),  # p_cell 0.75 is settled enough
    (DEFAULT, (3, 20, 0.95, 0.8, 14), False, "count_unsettled"),  # 6 clicks off, 5 allowed
    (DEFAULT, (3, 20, 0.95, 0.8, 15), True, "settled"),
    (DEFAULT, (3, 2, 0.95, 0.8, 3), True, "settled"),  # at least one click of slack
    (DEFAULT, (3, 2, 0.95, 0.8, 4), False, "count_unsettled"),
    (DEFAULT, (3, 0, NAN, NAN, 0), True, "settled"),  # runs agree there is nothing to click
    (DEFAULT, (3, 0, NAN, NAN, 2), False, "count_unsettled"),
    (DEFAULT, (4, 5, 0.5, 0.0, 0), False, "label_unsure"),  # the first failing rule is the reason
    (RULE_ONLY, (3, 5, 0.95, 0.0, 0), True, "settled"),  # aggregate's rule: runs + confidence only
    (RULE_ONLY, (50, 5, 0.5, 1.0, 5), False, "label_unsure"),  # ... and no maximum
    (r.RetirementPolicy(max_runs=4), (4, 5, 0.5, 0.0, 0), True, "max_runs"),
    (r.RetirementPolicy(count_tolerance=None), (3, 20, 0.95, 0.8, 1), True, "settled"),
    (r.RetirementPolicy(min_cell_certainty=0.0), (3, 5, 0.95, 0.0, 5), True, "settled"),
]


@pytest.mark.parametrize(("policy", "features", "retire", "reason"), CASES)
def test_decide(policy, features, retire, reason) -> None:
    frame = pd.DataFrame([(7, *features)], columns=r.FEATURE_COLUMNS)
    out = r.decide(frame, policy)
    assert list(out.columns) == r.DECISION_COLUMNS
    assert (bool(out["retire"].iloc[0]), out["reason"].iloc[0]) == (retire, reason)
    assert reason in r.REASONS


def test_decide_many_rows_at_once_keeps_order() -> None:
    frame = pd.DataFrame([(i, *f) for i, (policy, f, _, _) in enumerate(CASES) if policy is DEFAULT],
                         columns=r.FEATURE_COLUMNS)
    out = r.decide(frame, DEFAULT)
    expected = [reason for policy, _, _, reason in CASES if policy is DEFAULT]
    assert out["reason"].tolist() == expected and out["image_id"].tolist() == frame["image_id"].tolist()


def test_image_features() -> None:
    cells = pd.DataFrame({"image_id": [1, 1, 2], "confidence": [0.9, 0.7, 1.0], "p_cell": [0.9, 0.6, 1.0]})
    runs = pd.DataFrame({"image_id": [1, 1, 1, 3], "n_clicks": [2, 3, 7, 0]})
    out = r.image_features([3, 1, 2, 4], cells, runs)
    assert out.columns.tolist() == r.FEATURE_COLUMNS
    assert out["image_id"].tolist() == [3, 1, 2, 4]
    assert out["n_runs"].tolist() == [1, 3, 0, 0] and out["n_cells"].tolist() == [0, 2, 1, 0]
    assert out["min_confidence"].iloc[1] == 0.7 and np.isclose(out["min_cell_certainty"].iloc[1], 0.2)
    assert out["median_clicks"].iloc[1] == 3.0 and np.isnan(out["median_clicks"].iloc[2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_only_policy_equals_aggregates_settled_images(seed) -> None:
    """``from_rule`` decides exactly like the retirement ``aggregate`` applies today."""
    rng = np.random.default_rng(seed)
    ids = np.arange(40)
    cells = pd.DataFrame({"image_id": rng.integers(0, 40, 120), "confidence": rng.uniform(0.6, 1.0, 120),
                          "p_cell": rng.uniform(0.5, 1.0, 120)})
    runs = pd.DataFrame({"image_id": rng.integers(0, 40, 150), "n_clicks": rng.integers(0, 9, 150)})
    rule = RetirementRule(min_runs=4, min_confidence=0.8)
    out = r.decide(r.image_features(ids, cells, runs), r.RetirementPolicy.from_rule(rule))
    assert set(out.loc[out["retire"], "image_id"]) == settled_images(cells, runs, rule)


@pytest.mark.parametrize(
    ("settings", "overrides", "expected"),
    [
        ({}, {}, DEFAULT),
        ({"retire_min_runs": 5, "retire_max_runs": None}, {}, r.RetirementPolicy(min_runs=5, max_runs=None)),
        ({"retire_count_tolerance": None, "retire_min_confidence": 0.8}, {},
         r.RetirementPolicy(count_tolerance=None, min_confidence=0.8)),
        ({"retire_min_runs": 5}, {"min_runs": 2, "max_runs": None}, r.RetirementPolicy(min_runs=2)),
        ({"retire_min_cell_certainty": "0.3", "retire_max_runs": "6"}, {},
         r.RetirementPolicy(min_cell_certainty=0.3, max_runs=6)),
    ],
)
def test_policy_from_project_settings(settings, overrides, expected) -> None:
    assert r.RetirementPolicy.for_project(Project(name="p", settings=settings), **overrides) == expected


@pytest.mark.parametrize(
    ("settings", "overrides", "error", "match"),
    [
        ({"retire_min_runs": 0}, {}, r.RetirementPolicyError, "min_runs must be >= 1"),
        ({"retire_max_runs": 2}, {}, r.RetirementPolicyError, r"max_runs \(2\) must be >= min_runs \(3\)"),
        ({"retire_min_cell_certainty": 1.5}, {}, r.RetirementPolicyError, r"min_cell_certainty must be in \[0, 1\]"),
        ({"retire_count_tolerance": -1}, {}, r.RetirementPolicyError, "count_tolerance must be >= 0"),
        ({}, {"max_run": 3}, TypeError, "unknown retirement thresholds"),
    ],
)
def test_bad_policy_is_refused(settings, overrides, error, match) -> None:
    with pytest.raises(error, match=match):
        r.RetirementPolicy.for_project(Project(name="p", settings=settings), **overrides)



@pytest.mark.parametrize(
    ("settings", "overrides", "expected"),
    [
        # a min_runs above the default max_runs (10) with no max_runs set: no maximum
        ({"retire_min_runs": 15}, {}, r.RetirementPolicy(min_runs=15, max_runs=None)),
        ({"retire_min_runs": "12", "retire_min_confidence": 0.8}, {},
         r.RetirementPolicy(min_runs=12, min_confidence=0.8, max_runs=None)),
        ({}, {"min_runs": 11}, r.RetirementPolicy(min_runs=11, max_runs=None)),
        ({"retire_min_runs": 15}, {"max_runs": None}, r.RetirementPolicy(min_runs=15, max_runs=None)),
        # ... up to the default the default maximum stays
        ({"retire_min_runs": 10}, {}, r.RetirementPolicy(min_runs=10, max_runs=10)),
        # a max_runs set explicitly is kept
        ({"retire_min_runs": 15, "retire_max_runs": 20}, {}, r.RetirementPolicy(min_runs=15, max_runs=20)),
        ({"retire_min_runs": 15, "retire_max_runs": None}, {}, r.RetirementPolicy(min_runs=15, max_runs=None)),
        ({"retire_min_runs": 15}, {"max_runs": 15}, r.RetirementPolicy(min_runs=15, max_runs=15)),
        # an override min_runs below the default takes the default maximum again
        ({"retire_min_runs": 15}, {"min_runs": 4}, r.RetirementPolicy(min_runs=4, max_runs=10)),
    ],
)
def test_max_runs_follows_a_large_min_runs_unless_set(settings, overrides, expected) -> None:
    assert r.RetirementPolicy.for_project(Project(name="p", settings=settings), **overrides) == expected
    assert r.RetirementPolicy.from_settings(settings, **overrides) == expected


@pytest.mark.parametrize(
    ("settings", "overrides", "match"),
    [
        ({"retire_min_runs": 15, "retire_max_runs": 10}, {},
         r"retire_max_runs = 10 \(project setting\) is below retire_min_runs = 15 \(project setting\)"),
        ({"retire_max_runs": 12}, {"min_runs": 15},
         r"retire_max_runs = 12 \(project setting\) is below retire_min_runs = 15 \(given\)"),
        ({"retire_min_runs": 8}, {"max_runs": 5},
         r"retire_max_runs = 5 \(given\) is below retire_min_runs = 8 \(project setting\)"),
        ({"retire_max_runs": 2}, {},
         r"retire_max_runs = 2 \(project setting\) is below retire_min_runs = 3 \(default\)"),
    ],
)
def test_contradictory_min_and_max_runs_are_refused(settings, overrides, match) -> None:
    with pytest.raises(r.RetirementPolicyError, match=match):
        r.RetirementPolicy.for_project(Project(name="p", settings=settings), **overrides)


def test_policy_built_directly_still_checks_max_against_min_runs() -> None:
    with pytest.raises(r.RetirementPolicyError, match=r"max_runs \(10\) must be >= min_runs \(15\)"):
        r.RetirementPolicy(min_runs=15)
    assert r.RetirementPolicy(min_runs=15, max_runs=None).max_runs is None


# --------------------------------------------------------------------------- the store


def _setup(session: Session):
    """Images a (settled), b (an unsure label), c (retired before, 1 run), d (4 runs, unsure)."""
    project = q.get_or_create_project(session, "p")
    images = {n: Image(project=project, name=n, width=100, height=80, has_pixels=True) for n in "abcd"}
    images["c"].status = "retired"
    session.add_all(images.values())
    session.flush()
    students = [q.get_or_create_annotator(session, project, f"s{i}") for i in range(4)]
    for name, n_runs in (("a", 3), ("b", 3), ("c", 1), ("d", 4)):
        for k in range(n_runs):
            q.submit_task_run(session, images[name], students[k], [(10, 10, "alive"), (50, 50, "dead")], f"{name}{k}")
    snapshot = ConsensusSnapshot(project_id=project.id, method="test")
    session.add(snapshot)
    session.flush()
    cells = [("a", 0.95, 1.0), ("a", 0.99, 0.9), ("b", 0.95, 1.0), ("b", 0.6, 1.0), ("c", 1.0, 1.0),
             ("d", 0.55, 0.55), ("d", 0.9, 0.9)]
    session.add_all(ConsensusCell(snapshot_id=snapshot.id, image_id=images[n].id, x=10, y=10, label="alive",
                                  p_alive=0.9, confidence=conf, p_cell=p_cell, support=3, n_runs=3)
                    for n, conf, p_cell in cells)
    session.flush()
    return project, images, snapshot


def test_apply_retirement_retires_reactivates_and_says_why(session) -> None:
    project, images, snapshot = _setup(session)
    policy = r.RetirementPolicy(max_runs=4)
    change = r.apply_retirement(session, project, snapshot, policy)
    ids = {n: img.id for n, img in images.items()}
    assert change.retired == (ids["a"], ids["d"]) and change.reactivated == (ids["c"],)
    assert change.n_retired == 2
    assert dict(zip(change.decisions["image_id"], change.decisions["reason"])) == {
        ids["a"]: "settled", ids["b"]: "label_unsure", ids["c"]: "few_runs", ids["d"]: "max_runs"}
    assert {n: img.status for n, img in images.items()} == {
        "a": "retired", "b": "active", "c": "active", "d": "retired"}
    assert images["a"].retired_snapshot_id == snapshot.id and images["c"].retired_snapshot_id is None
    again = r.apply_retirement(session, project, None, policy)  # the latest snapshot; nothing changes
    assert (again.retired, again.reactivated, again.n_retired) == ((), (), 2)
    assert again.as_dict()["reasons"] == {"settled": 1, "label_unsure": 1, "few_runs": 1, "max_runs": 1}


def test_apply_retirement_takes_thresholds_from_the_project(db) -> None:
    project, images, snapshot = _setup(db)
    project.settings = {"retire_min_confidence": 0.5, "retire_max_runs": None}
    change = r.apply_retirement(db, project, snapshot.id)
    assert {n for n, img in images.items() if img.status == "retired"} == {"a", "b"}  # d: cell p 0.55
    assert change.policy == r.RetirementPolicy(min_confidence=0.5, max_runs=None)


def test_apply_retirement_without_a_snapshot(db) -> None:
    project = q.get_or_create_project(db, "empty")
    with pytest.raises(LookupError, match="no consensus snapshot"):
        r.apply_retirement(db, project)


@pytest.fixture
def db(sqlite_engine) -> Session:
    with Session(sqlite_engine, expire_on_commit=False) as sess:
        yield sess
        sess.rollback()


@pytest.mark.parametrize("settings_", [{}, {"retire_min_confidence": 0.5, "retire_max_runs": 3}])
def test_aggregate_applies_this_policy(db, settings_) -> None:
    """``aggregate`` retires with the project's adaptive policy: applying it again to the new
    snapshot changes nothing and gives the same decisions."""
    from cellspot.workflows.aggregate import aggregate

    project, images, _ = _setup(db)
    project.settings = settings_
    db.flush()
    report = aggregate(db, project)
    again = r.apply_retirement(db, project, report.snapshot_id)
    assert (again.retired, again.reactivated, again.n_retired) == ((), (), report.retired)
    assert again.as_dict()["reasons"] == report.retire_reasons
    assert again.policy == r.RetirementPolicy.for_project(project)

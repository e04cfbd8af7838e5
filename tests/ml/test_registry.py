"""Model registry on SQLite and PostgreSQL: versions, lookup, promote / rollback, frames."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest

from cellspot.ml import registry
from cellspot.store.models import ModelRun, utcnow
from cellspot.store.queries import get_or_create_project


@pytest.fixture
def project(session):
    return get_or_create_project(session, "demo")


def _done_run(session, project, kind: str = "classifier", status: str = "done", **metrics) -> ModelRun:
    run = registry.create_run(session, kind, project=project)
    run.status = status
    run.started_at = utcnow() - timedelta(seconds=90)
    run.finished_at = utcnow()
    run.metrics = metrics
    session.flush()
    return run


def test_versions_grow_per_kind_and_runs_are_found_by_id_or_version(session, project) -> None:
    versions = [registry.create_run(session, k, project=project).version
                for k in ("classifier", "detector", "classifier", "classifier")]
    assert versions == ["classifier-0001", "detector-0001", "classifier-0002", "classifier-0003"]
    run = registry.get_run(session, "classifier-0002")
    assert registry.get_run(session, run.id) is run and registry.get_run(session, str(run.id)) is run
    assert run.status == "queued" and run.path == "models/classifier/classifier-0002"
    with pytest.raises(registry.RunNotFoundError,
                       match="no model run 'classifier-0099'; latest versions: classifier-0003"):
        registry.get_run(session, "classifier-0099")
    with pytest.raises(registry.RegistryError, match="valid kinds: classifier, detector"):
        registry.create_run(session, "segmenter", project=project)


def test_create_run_stores_plain_json(session, project) -> None:
    import numpy as np

    run = registry.create_run(session, "detector", project=project, preset="quality",
                              config={"epochs": np.int64(4), "radius": float("nan"), "path": Path("/x")})
    assert run.config == {"epochs": 4, "radius": None, "path": "/x"}


# each case: statuses of runs 1..n, then steps ("promote", i) / ("rollback",) with the
# expected active run number after the step, or an error message the step must raise
PROMOTE_CASES = {
    "promote then roll back": (["done", "done"], [("promote", 1, 1), ("promote", 2, 2), ("rollback", 1)]),
    "roll back twice walks the history": (
        ["done", "done", "done"],
        [("promote", 1, 1), ("promote", 2, 2), ("promote", 3, 3), ("rollback", 2), ("rollback", 1)],
    ),
    "nothing to roll back to": (["done"], [("promote", 1, 1), ("rollback", "no earlier promoted classifier")]),
    "a rolled-back run leaves the history": (
        ["done", "done", "done"],
        [("promote", 1, 1), ("promote", 2, 2), ("rollback", 1), ("promote", 3, 3), ("rollback", 1)],
    ),
    "only done runs can be promoted": (["done", "failed"], [("promote", 1, 1), ("promote", 2, "only 'done'")]),
    "re-promoting the active run is harmless": (["done", "done"], [("promote", 1, 1), ("promote", 1, 1)]),
    "unpromoted done runs are not rollback targets": (
        ["done", "done"], [("promote", 2, 2), ("rollback", "no earlier promoted")],
    ),
}


@pytest.mark.parametrize("statuses, steps", list(PROMOTE_CASES.values()), ids=list(PROMOTE_CASES))
def test_promote_and_rollback(session, project, statuses, steps) -> None:
    runs = [_done_run(session, project, status=s) for s in statuses]
    other = get_or_create_project(session, "other")
    elsewhere = _done_run(session, other)
    registry.promote(session, elsewhere)
    for step in steps:
        action, *args, expected = step
        if isinstance(expected, str):
            with pytest.raises(registry.RegistryError, match=expected):
                _apply(session, project, runs, action, args)
            continue
        _apply(session, project, runs, action, args)
        active = registry.active_run(session, project, "classifier")
        assert active is runs[expected - 1]
        assert sum(r.is_active for r in runs) == 1
    assert registry.active_run(session, other, "classifier") is elsewhere  # other projects untouched
    assert registry.active_run(session, project, "detector") is None


def _apply(session, project, runs, action, args) -> None:
    if action == "promote":
        registry.promote(session, runs[args[0] - 1])
    else:
        registry.rollback(session, project, "classifier")


def test_model_dir_is_under_home_unless_absolute(session, project, settings, tmp_path) -> None:
    run = registry.create_run(session, "classifier", project=project)
    assert registry.model_dir(settings, run) == settings.home / "models/classifier/classifier-0001"
    assert registry.relative_path(settings, settings.home / "models" / "x") == "models/x"
    elsewhere = tmp_path / "elsewhere"
    run.path = registry.relative_path(settings, elsewhere)
    assert run.path == str(elsewhere.resolve()) and registry.model_dir(settings, run) == elsewhere.resolve()


def test_a_resumed_runs_time_is_its_whole_training_not_the_last_part(session, project) -> None:
    """A resume starts the wall clock again; the fit's own ``seconds`` adds the parts up."""
    resumed = _done_run(session, project, balanced_accuracy=0.9, seconds=185.4)  # 90 s since the last start
    plain = _done_run(session, project, balanced_accuracy=0.9)
    frame = registry.runs_frame(session, project).set_index("version")
    assert frame.loc[resumed.version, "seconds"] == pytest.approx(185.4)
    assert frame.loc[plain.version, "seconds"] == pytest.approx(90, abs=1)


def test_the_two_kinds_f1_are_two_columns(session, project) -> None:
    """One "f1" column held the classifier's dead-class F1 (0.105) and the detector's detection
    F1 (0.978), sortable and exported as if comparable."""
    _done_run(session, project, f1=0.105)
    det = registry.create_run(session, "detector", project=project)
    det.status, det.metrics = "done", {"f1": 0.978}
    session.flush()
    frame = registry.runs_frame(session, project).set_index("kind")
    assert "f1" not in frame.columns
    assert frame.loc["classifier", "dead_f1"] == 0.105 and math.isnan(frame.loc["classifier", "detection_f1"])
    assert frame.loc["detector", "detection_f1"] == 0.978 and math.isnan(frame.loc["detector", "dead_f1"])


def test_runs_frame_compare_and_curves(session, project) -> None:
    a = _done_run(session, project, balanced_accuracy=0.9, accuracy=0.95, per_class={"dead": {"recall": 0.8}},
                  confusion_matrix=[[1, 2], [3, 4]])
    b = _done_run(session, project, balanced_accuracy=0.93, accuracy=0.94)
    registry.promote(session, b)
    det = registry.create_run(session, "detector", project=project)
    det.progress = {"fraction": 0.25}
    b.curves = [{"epoch": 2, "train_loss": 0.5}, {"epoch": 1, "train_loss": 0.9}]
    session.flush()

    frame = registry.runs_frame(session, project)
    assert list(frame["version"]) == ["detector-0001", "classifier-0002", "classifier-0001"]
    assert list(frame.columns[:len(registry.RUNS_FRAME_COLUMNS)]) == registry.RUNS_FRAME_COLUMNS
    assert list(frame["active"]) == [False, True, False]
    assert list(frame["progress"]) == [0.25, 1.0, 1.0]
    assert frame.loc[1, "balanced_accuracy"] == 0.93 and math.isnan(frame.loc[0, "balanced_accuracy"])
    assert frame.loc[1, "seconds"] == pytest.approx(90, abs=1) and math.isnan(frame.loc[0, "seconds"])
    assert list(registry.runs_frame(session, project, "detector")["version"]) == ["detector-0001"]
    assert registry.runs_frame(session, None).empty

    cmp = registry.compare_runs(session, "classifier-0001", b.id)
    assert list(cmp.columns) == ["classifier-0001", "classifier-0002", "difference"]
    assert cmp.loc["balanced_accuracy", "difference"] == pytest.approx(0.03)
    assert cmp.loc["per_class.dead.recall", "classifier-0001"] == 0.8
    assert math.isnan(cmp.loc["per_class.dead.recall", "classifier-0002"])
    assert "confusion_matrix" not in cmp.index and cmp.loc["epochs", "classifier-0002"] == 2
    with pytest.raises(registry.RegistryError, match="two different runs"):
        registry.compare_runs(session, a.version, a.id)
    with pytest.raises(registry.RegistryError, match="compare runs of one kind: detector-0001 is a detector"):
        registry.compare_runs(session, det.version, a.version)
    assert [registry.format_metric(v) for v in (48.0, 0.93125, float("nan"), None, 3)] == [
        "48", "0.931", "-", "-", "3"]

    curves = registry.run_curves(b)
    assert list(curves["epoch"]) == [1, 2] and list(curves.columns) == ["epoch", "train_loss"]
    assert list(registry.run_curves(a).columns) == ["epoch"] and registry.run_curves(a).empty


def test_model_version_comes_from_run_json_else_the_folder_name(tmp_path) -> None:
    from cellspot.ml.common import RUN_FILE, model_version

    folder = tmp_path / "my_detector"
    folder.mkdir()
    assert model_version(folder) == "my_detector"
    (folder / RUN_FILE).write_text('{"version": "detector-0007", "kind": "detector"}')
    assert model_version(folder) == "detector-0007"
    for broken in ("{not json", "[1, 2]", '{"version": 7}'):
        (folder / RUN_FILE).write_text(broken)
        assert model_version(folder) == "my_detector"


def test_runs_and_comparisons_say_what_the_metrics_were_measured_on(session) -> None:
    project = get_or_create_project(session, "p")
    runs = []
    for split in ("test", "train"):
        run = registry.create_run(session, "classifier", project=project)
        run.status, run.metrics = "done", {"balanced_accuracy": 0.9, "split": split}
        runs.append(run)
    session.flush()
    frame = registry.runs_frame(session, project)
    assert dict(zip(frame["version"], frame["scored_on"])) == {"classifier-0001": "test", "classifier-0002": "train"}
    table = registry.compare_runs(session, "classifier-0001", "classifier-0002")
    assert registry.scored_on_note(table) == ("not like for like: classifier-0001 on its test split, "
                                              "classifier-0002 on its own training data")
    runs[1].metrics = {"balanced_accuracy": 0.8, "split": "test"}
    session.flush()
    assert registry.scored_on_note(registry.compare_runs(session, "classifier-0001", "classifier-0002")) is None
    for run in runs:  # both on their own training data: like for like, but neither held out
        run.metrics = {"balanced_accuracy": 0.8, "split": "train"}
    session.flush()
    note = registry.scored_on_note(registry.compare_runs(session, "classifier-0001", "classifier-0002"))
    assert note.startswith("neither score is held out: both runs were scored on their own training data")

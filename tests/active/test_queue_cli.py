"""``cellspot queue`` through CliRunner on a SQLite store in tmp_path (the ``settings`` fixture
points CELLSPOT_* there): before any model, with stored predictions, and its errors."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from click.testing import Result

from clikit import ok_cli, run_cli

from .test_signals import IMAGES, add_images, add_predictions, add_snapshot


def _csv(result: Result) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(result.stdout))


@pytest.fixture
def store(settings):
    """A migrated store with project "p": images, runs and a snapshot; returns a function that
    adds active predictions."""
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.store.queries import get_or_create_project

    engine = make_engine(settings=settings)
    upgrade(engine)
    with transaction(engine) as session:
        project = get_or_create_project(session, "p")
        add_snapshot(session, project, add_images(session, project))

    def predict() -> None:
        from cellspot.store.models import Image

        with transaction(engine) as session:
            project = get_or_create_project(session, "p")
            images = {i.name: i for i in session.query(Image).filter_by(project_id=project.id)}
            add_predictions(session, project, images)

    yield predict
    engine.dispose()


def test_queue_before_any_model(store) -> None:
    result = ok_cli("queue", "--project", "p")
    table = _csv(result)
    assert list(table.columns[:4]) == ["image", "score", "strategy", "reason"]
    labelable = sorted(n for n, (pixels, _, retired, _) in IMAGES.items() if pixels and not retired)
    assert sorted(table["image"]) == labelable  # retired and pixel-less images left out
    assert (table["strategy"] == "combined").all() and table["score"].notna().all()
    assert table["image"].iloc[-1] == "sure.png"  # confident and seen three times
    assert table["reason"].str.contains("no model prediction").all()
    assert "no model predictions" in result.stderr and "warning" not in result.stderr  # combined works without
    tied = ok_cli("queue", "--project", "p", "--strategy", "detector")
    assert "warning: strategy 'detector' scores model predictions" in tied.stderr
    assert "every image ties" in " ".join(tied.stderr.split())


def test_queue_with_predictions_to_a_file(store, tmp_path: Path) -> None:
    store()
    out = tmp_path / "q" / "queue.csv"
    result = ok_cli("queue", "--project", "p", "--strategy", "conflict", "--top", "1", "--out", out)
    table = pd.read_csv(out)
    assert table["image"].tolist() == ["conflict.png"] and table["n_conflicts"].tolist() == [1]
    assert result.stdout == "" and "detector-0001 + classifier-0001" in result.stderr
    assert "warning" not in result.stderr  # a model strategy with predictions
    everything = _csv(ok_cli("queue", "--project", "p", "--all", "--diversity", "0"))
    assert sorted(everything["image"]) == sorted(IMAGES)
    assert everything["score"].is_monotonic_decreasing  # --diversity 0: by score only


def test_random_queue_is_seeded(store) -> None:
    first = _csv(ok_cli("queue", "--project", "p", "--strategy", "random", "--seed", "7"))["image"].tolist()
    again = _csv(ok_cli("queue", "--project", "p", "--strategy", "random", "--seed", "7"))["image"].tolist()
    assert first == again


def test_queue_after_a_real_aggregation(store) -> None:
    ok_cli("aggregate", "--project", "p")
    table = _csv(ok_cli("queue", "--project", "p", "--strategy", "crowd", "--all"))
    assert table["score"].notna().sum() == sum(runs > 0 for _, runs, _, _ in IMAGES.values())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--strategy", "magic"], 2, "unknown acquisition strategy 'magic'; valid: bald, classifier, combined"),
        (["--project", "nope"], 1, "no project named 'nope'; existing projects: 'p'"),
        (["--snapshot", "999"], 1, "consensus snapshot 999 does not exist"),
        (["--top", "0"], 2, "--top"),
        (["--strategy", "bald"], 1, "needs MC-dropout samples of the classifier"),
        (["--out", ""], 2, "needs a file name; got an empty value"),
        (["--out", "sub/"], 2, "'sub/' names a folder; give a file name in it, e.g. sub/queue.csv"),
        (["--strategy", ""], 2, "needs a strategy name; got an empty value"),
    ],
)
def test_queue_errors(store, args: list[str], code: int, message: str) -> None:
    if "--project" not in args:
        args = ["--project", "p", *args]
    result = run_cli("queue", *args)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output


def test_list_strategies() -> None:
    result = ok_cli("queue", "--list-strategies")
    lines = result.output.splitlines()
    assert any(line.startswith("combined") and line.endswith("(default)") for line in lines)
    assert "default: ranked" not in result.output  # "default" said once
    assert not any(line.startswith("bald") for line in lines)  # refused by queue and round open
    assert lines[-1] == "Python API and benchmark only (need inputs beyond the signal table): bald"


def test_the_coverage_queue_has_one_n_runs_column(store) -> None:
    table = _csv(ok_cli("queue", "--project", "p", "--strategy", "coverage"))
    assert "n_runs" in table.columns and not table.columns.str.startswith("n_runs_").any()
    assert (table["score"] == 1 / (1 + table["n_runs"])).all()


def test_an_existing_file_is_replaced_only_when_it_is_a_queue_csv(store, settings, tmp_path: Path) -> None:
    database = Path(settings.resolved_database_url.removeprefix("sqlite:///"))
    before = database.read_bytes()
    refused = run_cli("queue", "--project", "p", "--out", database)
    assert refused.exit_code == 2 and "is not a queue CSV written by cellspot queue (binary data" in refused.output
    assert database.read_bytes() == before
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    assert run_cli("queue", "--project", "p", "--out", notes).exit_code == 2 and notes.read_text() == "my,own\n1,2\n"
    out = tmp_path / "queue.csv"
    ok_cli("queue", "--project", "p", "--out", out)
    ok_cli("queue", "--project", "p", "--strategy", "random", "--out", out)  # an earlier queue: replaced
    assert (pd.read_csv(out)["strategy"] == "random").all()
    assert ok_cli("projects").exit_code == 0


def test_queue_says_when_the_active_models_have_not_predicted_the_project(store, settings) -> None:
    from cellspot.ml import registry
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.queries import get_project

    engine = make_engine(settings=settings)
    with transaction(engine) as session:  # a trained, active classifier that has not predicted yet
        run = registry.create_run(session, "classifier", project=get_project(session, "p"))
        run.status = "done"
        registry.promote(session, run)
    result = ok_cli("queue", "--project", "p", "--strategy", "classifier")
    said = " ".join(result.stderr.split())
    assert "the active models (classifier-0001) have not predicted this project yet" in said
    assert "used no model, and with strategy 'classifier' every image ties" in said
    assert "`cellspot predict IMAGES_DIR --out DIR --project NAME`" in said and "train and promote" not in said

    store()  # detector-0001 + classifier-0002 predict and are promoted: no note
    assert "note" not in ok_cli("queue", "--project", "p").stderr
    with transaction(engine) as session:  # the classifier rolled back to classifier-0001
        registry.promote(session, registry.get_run(session, "classifier-0001"))
    said = " ".join(ok_cli("queue", "--project", "p").stderr.split())
    assert ("the active models (detector-0001 + classifier-0001) have not predicted this project yet, so this "
            "ranking used the stored predictions of detector-0001 + classifier-0002") in said
    engine.dispose()


def test_queue_without_a_consensus_snapshot_says_so(store, settings) -> None:
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.models import Image
    from cellspot.store.queries import get_or_create_project

    engine = make_engine(settings=settings)
    with transaction(engine) as session:  # images, never labelled nor aggregated
        project = get_or_create_project(session, "fresh")
        session.flush()
        session.add_all([Image(project_id=project.id, name=f"new{i}.png", width=8, height=8, has_pixels=True)
                         for i in range(2)])
    engine.dispose()
    result = ok_cli("queue", "--project", "fresh")
    assert "(no consensus snapshot, no model predictions)" in result.stderr
    assert "None" not in result.stderr

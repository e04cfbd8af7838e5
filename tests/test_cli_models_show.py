"""``cellspot models list`` says why a run failed (short), ``cellspot models show VERSION`` says
everything (config, status, whole error, metrics)."""

from __future__ import annotations

import pytest

from cellspot.store.db import make_engine, transaction
from cellspot.store.models import ModelRun
from cellspot.store.queries import get_project
from cellspot.workflows import models as wf
from clikit import ok_cli, run_cli
from fake_trainer import FakeFit, install, seed_project

LONG_ERROR = "ValueError: " + "the crops are all black " * 10 + "\nsecond line of the traceback"


@pytest.fixture
def runs(settings, monkeypatch) -> dict[str, int]:
    seed_project(settings)
    engine = make_engine(settings=settings)
    ids = {}
    try:
        for name in ("failed", "done"):
            with transaction(engine) as session:
                ids[name] = wf.start_training(session, settings, get_project(session, "demo"), "classifier",
                                              epochs=2).id
        install(monkeypatch, FakeFit(fail_at=1))
        wf.run_training(settings, ids["failed"])
        install(monkeypatch)
        wf.run_training(settings, ids["done"])
        with transaction(engine) as session:
            session.get(ModelRun, ids["failed"]).error = LONG_ERROR
    finally:
        engine.dispose()
    return ids


def test_list_shows_a_short_error(runs) -> None:
    out = ok_cli("models", "list").output
    header, done, failed = out.splitlines()[:3]
    assert header.split()[-1] == "error" and "classifier-0002" in done and "classifier-0001" in failed
    assert "ValueError: the crops are all black" in failed and failed.rstrip().endswith("...")
    assert "second line" not in out and "models show VERSION" in out
    assert "None" not in done and "nan" not in done  # no error: a blank cell


@pytest.mark.parametrize(
    ("version", "expected"),
    [("classifier-0001", ["status: failed", f"error: {LONG_ERROR}", '"epochs": 2', "project: demo"]),
     ("classifier-0002", ["status: done (active)", "error: -", '"accuracy": 0.7', "seconds: "]),
     ],
)
def test_show_prints_config_status_error_and_metrics(runs, version, expected) -> None:
    out = ok_cli("models", "show", version).output
    for text in expected:
        assert text in out
    assert "folder: " in out and version in out


def test_show_of_an_unknown_version_names_the_known_ones(runs) -> None:
    result = run_cli("models", "show", "classifier-0042")
    assert result.exit_code != 0 and "no model run 'classifier-0042'" in result.output
    assert "classifier-0002" in result.output

"""End-to-end: a researcher trains a model from the Models page in a real browser.

``cellspot app`` runs on its own demo store (4 images, 2 simulated students, consensus
computed, so there is something to train on) with the job queue in that store's home
(``queue.db``, SQLite huey) and **no worker**: pressing Train must put a queued run in the
store and a training task on the queue, and the page must show the run, say that no worker
picked it up yet, follow the progress that a worker writes (written here by the test, as the
worker's progress reporter does) without a reload, and cancel it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_server import E2E_PASSWORD, AppServer, app_command, free_port, running_server, store_env
from st_ui import click_button, dataframe_rows, go_to, open_as_researcher, screenshot, wait_idle

pytestmark = pytest.mark.slow

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

SERVER_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory):
    """Settings of a migrated store holding the demo project (consensus computed)."""
    from cellspot.settings import Settings
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.workflows.demo import build_demo

    root = tmp_path_factory.mktemp("e2e-models")
    settings = Settings(home=root / "home", database_url=f"sqlite:///{root / 'cellspot.db'}")
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
        with transaction(engine) as session:
            build_demo(session, settings, n_images=4, n_students=2, seed=3)
    finally:
        engine.dispose()
    return settings


@pytest.fixture(scope="module")
def models_server(app_available: None, demo_store, artifacts_dir: Path) -> Iterator[AppServer]:
    port = free_port()
    env = store_env(demo_store.home, demo_store.resolved_database_url, password=E2E_PASSWORD)
    with running_server(app_command(port), env, port, artifacts_dir / "e2e-models-server.log",
                        timeout_s=SERVER_START_TIMEOUT_S) as server:
        yield server


def stored_runs(settings) -> list[dict]:
    from sqlalchemy import select

    from cellspot.store.db import make_engine, session_factory
    from cellspot.store.models import ModelRun

    engine = make_engine(settings=settings)
    try:
        with session_factory(engine)() as session:
            return [{"id": r.id, "version": r.version, "kind": r.kind, "status": r.status, "config": r.config,
                     "cancel_requested": r.cancel_requested}
                    for r in session.scalars(select(ModelRun).order_by(ModelRun.id))]
    finally:
        engine.dispose()


def write_progress(settings, run_id: int, progress: dict, curves: list[dict]) -> None:
    """What a worker does while it trains: the run is running and its progress is stored."""
    from sqlalchemy import update

    from cellspot.store.db import make_engine, transaction
    from cellspot.store.models import ModelRun, utcnow

    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            session.execute(update(ModelRun).where(ModelRun.id == run_id).values(
                status="running", started_at=utcnow(), progress=progress, curves=curves))
    finally:
        engine.dispose()


def test_researcher_trains_watches_and_cancels_a_run(
    models_server: AppServer, demo_store, new_page, artifacts_dir: Path,
) -> None:
    from cellspot.jobs import get_queue

    page = new_page()
    open_as_researcher(page, models_server.url, E2E_PASSWORD)
    go_to(page, "Models")
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    expect(page.get_by_text("No model yet: train one")).to_be_visible()

    page.get_by_label("Epochs (optional)").fill("2")
    click_button(page, "Train", exact=True)
    expect(page.get_by_text(re.compile(r"^classifier-0001 queued\.$"))).to_be_visible()
    runs = stored_runs(demo_store)
    assert [(r["version"], r["kind"], r["status"], r["config"]) for r in runs] == [
        ("classifier-0001", "classifier", "queued", {"epochs": 2})]
    assert get_queue(demo_store).huey.pending_count() == 1  # the task waits for `cellspot worker`
    history = {row.get("version"): row for row in dataframe_rows(page)}
    assert history["classifier-0001"].get("status") == "queued", history
    expect(page.get_by_text("Queued: waiting for a worker to pick it up.")).to_be_visible()

    # a worker starts and reports progress: the live view follows without a reload
    write_progress(demo_store, runs[0]["id"],
                   {"epoch": 2, "epochs": 2, "step": 3, "steps": 4, "phase": "train", "fraction": 0.875,
                    "train_loss": 0.31, "eta_s": 4.0},
                   [{"epoch": 1, "train_loss": 0.6, "val_loss": 0.7, "balanced_accuracy": 0.71}])
    expect(page.get_by_text(re.compile(r"epoch 2/2 · step 3/4 · train loss 0\.310"))).to_be_visible(
        timeout=15_000)
    expect(page.locator('[data-testid="stVegaLiteChart"]').first).to_be_visible()
    wait_idle(page)  # the run went from queued to running: the whole page was run again
    history = {row.get("version"): row for row in dataframe_rows(page)}
    assert history["classifier-0001"].get("status") == "running", history
    screenshot(page, artifacts_dir / "e2e-models-live.png")

    page.get_by_role("button", name="Cancel", exact=True).first.click()
    wait_idle(page)
    expect(page.get_by_text(re.compile(r"classifier-0001 will stop at its next check"))).to_be_visible()
    assert stored_runs(demo_store)[0]["cancel_requested"] is True

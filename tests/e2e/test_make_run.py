"""`make run` serves the app: start it on an empty store, wait for the health endpoint, load the page.

The real Makefile target runs (``make -o .venv/.installed run APP_ARGS="--server.port <free>"``:
the install step is taken as done, since the test runs inside that environment), with
``CELLSPOT_HOME`` in a temporary folder that does not exist yet; so this also checks that the
launcher creates and migrates the store and builds the demo project (class code ``DEMO``).
"""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_server import REPO_ROOT, AppServer, free_port, running_server, store_env
from st_ui import click_button, open_app, screenshot

pytestmark = pytest.mark.slow

MAKE_RUN_TIMEOUT_S = 150.0  # migrations + demo build + Streamlit start


@pytest.fixture(scope="module")
def make_run_server(app_available: None, tmp_path_factory: pytest.TempPathFactory,
                    artifacts_dir: Path) -> Iterator[AppServer]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("`make` is not on PATH")
    root = tmp_path_factory.mktemp("make-run")
    home = root / "home"  # does not exist yet: a fresh machine
    env = store_env(home, f"sqlite:///{root / 'cellspot.db'}", password=None)
    port = free_port()
    command = [make, "--no-print-directory", "-C", str(REPO_ROOT), "-o", ".venv/.installed", "run",
               f"APP_ARGS=--server.port {port}"]
    with running_server(command, env, port, artifacts_dir / "make-run-server.log",
                        timeout_s=MAKE_RUN_TIMEOUT_S) as server:
        yield server


def test_make_run_serves_health_and_page(make_run_server: AppServer) -> None:
    with urllib.request.urlopen(f"{make_run_server.url}/_stcore/health", timeout=10) as resp:
        assert resp.status == 200 and resp.read().strip() == b"ok"
    with urllib.request.urlopen(make_run_server.url + "/", timeout=10) as resp:
        body = resp.read().decode("utf-8", errors="replace")
    assert resp.status == 200
    assert '<div id="root">' in body, body[:500]


def test_make_run_page_renders_the_demo_join_page(make_run_server: AppServer, new_page, artifacts_dir: Path) -> None:
    expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect
    page = new_page()
    open_app(page, make_run_server.url)
    screenshot(page, artifacts_dir / "make-run-home.png")
    assert page.get_by_role("textbox", name="Class code").count() == 1, page.inner_text("body")[:2000]
    # the demo project was built: its class code DEMO lets a student in
    page.get_by_role("textbox", name="Class code").fill("DEMO")
    page.get_by_role("textbox", name="Nickname").fill("make-run")
    click_button(page, "Join")
    expect(page.get_by_role("heading", name="How to spot cells")).to_be_visible()

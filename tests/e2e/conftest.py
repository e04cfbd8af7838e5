"""Fixtures of the end-to-end tests: seeded store, app server, headless Chromium page.

Everything here skips with a reason when a piece is missing (no Chromium binary, no
Playwright, no ``cellspot app`` yet); ``make browser`` installs Debian Chromium.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_server import (
    ARTIFACTS_DIR,
    CHROMIUM_ARGS,
    E2E_PASSWORD,
    AppServer,
    SeededStore,
    app_command,
    app_command_available,
    chromium_executable,
    free_port,
    running_server,
    seed_store,
    store_env,
)

VIEWPORT = {"width": 1400, "height": 1000}
SERVER_START_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``test-artifacts/`` at the repository root (gitignored): screenshots and server logs."""
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    for stale in ARTIFACTS_DIR.glob("FAILED-*.png"):
        stale.unlink()
    return ARTIFACTS_DIR


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = chromium_executable()
    if path is None:
        pytest.skip("no chromium binary on PATH; `make browser` installs Debian chromium (root + apt-get)")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator:
    """One headless Chromium for the session (Playwright, never `playwright install`)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install -r requirements-dev.txt)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def app_available() -> None:
    reason = app_command_available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> SeededStore:
    """A migrated SQLite store with project ``e2e`` (class code ``E2E``) and a few images."""
    root = tmp_path_factory.mktemp("e2e-store")
    return seed_store(root / "home", f"sqlite:///{root / 'cellspot.db'}")


@pytest.fixture(scope="module")
def app_server(app_available: None, seeded_store: SeededStore, artifacts_dir: Path) -> Iterator[AppServer]:
    """``cellspot app`` on a free port over ``seeded_store``, researcher password ``E2E_PASSWORD``."""
    port = free_port()
    env = store_env(seeded_store.home, seeded_store.database_url, password=E2E_PASSWORD)
    with running_server(app_command(port), env, port, artifacts_dir / "e2e-server.log",
                        timeout_s=SERVER_START_TIMEOUT_S) as server:
        yield server


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item so fixtures can tell that the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def new_page(browser, request: pytest.FixtureRequest, artifacts_dir: Path) -> Iterator:
    """A factory of fresh pages, each in its own browser context (own cookies, own session).

    When the test fails, every page it opened is saved as ``test-artifacts/FAILED-<test>-<i>.png``.
    """
    contexts = []

    def make(viewport: dict[str, int] = VIEWPORT):
        context = browser.new_context(viewport=viewport, device_scale_factor=1)
        context.set_default_timeout(20_000)
        contexts.append(context)
        return context.new_page()

    yield make
    report = getattr(request.node, "report_call", None)
    failed = report is not None and report.failed
    for i, context in enumerate(contexts):
        if failed:
            for page in context.pages:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(artifacts_dir / f"FAILED-{request.node.name}-{i}.png"),
                                    full_page=True)
        context.close()

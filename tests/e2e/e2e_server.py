"""Helpers for the end-to-end tests: a seeded store, the app server, a headless Chromium.

The server is started exactly as a user starts it (``cellspot app --server.port <port>
--server.headless true``, or ``make run``) in its own process group, with the store chosen by
``CELLSPOT_HOME`` / ``CELLSPOT_DATABASE_URL`` and the researcher password by
``CELLSPOT_RESEARCHER_PASSWORD``; it is ready when ``/_stcore/health`` answers ``ok``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
APP_SCRIPT = REPO_ROOT / "app" / "cellspot_app.py"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

E2E_PROJECT = "e2e"
E2E_CLASS_CODE = "E2E"
E2E_PASSWORD = "e2e-researcher-pw-7f3a"
# Larger than the labelling page shows it, so the display scaling is exercised.
E2E_IMAGE_SIZE = (1000, 750)  # (width, height) in image pixels
E2E_N_IMAGES = 4


def chromium_executable() -> str | None:
    """Path of the Debian Chromium binary, or None when it is not installed."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def cellspot_executable() -> str:
    """The ``cellspot`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "cellspot"
    if beside.exists():
        return str(beside)
    found = shutil.which("cellspot")
    if not found:
        raise FileNotFoundError(f"no `cellspot` script beside {sys.executable} or on PATH; "
                                "install the package (pip install -e .)")
    return found


def app_command_available() -> str | None:
    """None when ``cellspot app`` and the app script exist, else why not (a skip reason)."""
    from cellspot.cli import main

    if "app" not in main.commands:
        return "the `cellspot app` command is not registered (cellspot/cli/app_cmds.py missing)"
    if not APP_SCRIPT.is_file():
        return f"the app script {APP_SCRIPT} does not exist"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def store_env(home: Path, database_url: str, password: str | None = E2E_PASSWORD) -> dict[str, str]:
    """The environment of a server on the store (``home``, ``database_url``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELLSPOT_", "STREAMLIT_"))}
    env.update({
        "CELLSPOT_HOME": str(home),
        "CELLSPOT_DATABASE_URL": database_url,
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        "PYTHONUNBUFFERED": "1",
    })
    if password is not None:
        env["CELLSPOT_RESEARCHER_PASSWORD"] = password
    return env


@dataclass(frozen=True)
class SeededStore:
    """A migrated store holding one project ready for a class.

    ``images``: name -> (image id, width, height), in import order.
    """

    home: Path
    database_url: str
    project: str
    class_code: str
    images: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def seed_store(home: Path, database_url: str, n_images: int = E2E_N_IMAGES,
               size: tuple[int, int] = E2E_IMAGE_SIZE, seed: int = 3) -> SeededStore:
    """Migrate the store and create project ``e2e`` (class code ``E2E``, no gold images) with
    ``n_images`` generated culture images of ``size`` (width, height) pixels."""
    import tempfile

    import numpy as np
    from PIL import Image as PILImage
    from sqlalchemy import select

    from cellspot.importers.images import import_images
    from cellspot.settings import Settings
    from cellspot.store import queries
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.store.models import Image
    from cellspot.synth import generate_culture

    settings = Settings(home=home, database_url=database_url)
    for folder in (settings.home, settings.images_dir, settings.exports_dir):
        folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
        rng = np.random.default_rng(seed)
        with tempfile.TemporaryDirectory(prefix="cellspot-e2e-") as tmp, transaction(engine) as session:
            project = queries.get_or_create_project(
                session, E2E_PROJECT, class_codes=[E2E_CLASS_CODE], gold_rate=0.0,
                target_runs_per_image=3, retire_min_runs=3, retire_min_confidence=0.9,
            )
            # one generated culture, shown in different orientations: distinct images, fast
            culture = generate_culture(rng, size[0], size[1], dead_fraction=0.3).image
            variants = [culture, culture[::-1], culture[:, ::-1], culture[::-1, ::-1]]
            paths = []
            for i in range(n_images):
                pixels = variants[i % len(variants)]
                if i >= len(variants):
                    pixels = np.roll(pixels, 37 * i, axis=1)
                path = Path(tmp) / f"e2e_{i + 1:02d}.png"
                PILImage.fromarray(np.ascontiguousarray(pixels)).save(path)
                paths.append(path)
            report = import_images(session, project, paths, settings=settings)
            if report.errors:
                raise RuntimeError(f"seeding the e2e store failed: {report.errors}")
            rows = session.scalars(
                select(Image).where(Image.project_id == project.id).order_by(Image.id)
            ).all()
            images = {img.name: (img.id, img.width, img.height) for img in rows}
    finally:
        engine.dispose()
    return SeededStore(home, database_url, E2E_PROJECT, E2E_CLASS_CODE, images)


class ServerError(RuntimeError):
    """The app server exited or did not become healthy; the message holds its log tail."""


@dataclass
class AppServer:
    """A running app server: its base ``url``, process and log file."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"


def wait_healthy(server: AppServer, timeout_s: float) -> float:
    """Poll ``/_stcore/health`` until it answers ``ok``; returns the seconds it took."""
    started = time.monotonic()
    url = f"{server.url}/_stcore/health"
    while True:
        if server.process.poll() is not None:
            raise ServerError(f"the app server exited with code {server.process.returncode} before "
                              f"{url} answered; log tail:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200 and resp.read().strip() == b"ok":
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - started > timeout_s:
            raise ServerError(f"{url} did not answer `ok` within {timeout_s:.0f} s; log tail:\n"
                              f"{server.log_tail()}")
        time.sleep(0.25)


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the process group this module started (SIGTERM, then SIGKILL after ``grace_s``)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=grace_s)
    else:  # the leader is gone; children of its group may still run
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def running_server(command: Sequence[str], env: dict[str, str], port: int, log_path: Path,
                   timeout_s: float = 90.0, cwd: Path = REPO_ROOT) -> Iterator[AppServer]:
    """Start ``command`` (which must serve the app on ``port``), wait until healthy, yield it,
    and stop it (its whole process group) afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = AppServer(url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path)
    try:
        wait_healthy(server, timeout_s)
        yield server
    finally:
        stop(process)


def app_command(port: int, *extra: str) -> list[str]:
    """``cellspot app --server.port <port> --server.headless true [extra...]``."""
    return [cellspot_executable(), "app", "--server.port", str(port), "--server.headless", "true", *extra]

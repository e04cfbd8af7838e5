"""``cellspot app``: the launcher prepares the store and starts Streamlit with streamlit_config/.

The config mechanism: ``app/.streamlit`` is a committed symlink to ``../streamlit_config`` and
Streamlit reads ``.streamlit/config.toml`` beside the main script. The server test starts the
app exactly as ``make run`` does (``cellspot app``), from an unrelated working folder and with
an empty home folder (so neither ``$CWD/.streamlit`` nor ``~/.streamlit`` can supply the
option), and reads back an option that only streamlit_config/config.toml sets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cellspot.cli.app_cmds import APP_SCRIPT, CONFIG_DIR, check_layout, prepare_store, streamlit_command

REPO = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((REPO / "streamlit_config" / "config.toml").read_text(encoding="utf-8"))
START_TIMEOUT_S = 90


def test_the_app_folder_links_to_streamlit_config():
    link = REPO / "app" / ".streamlit"
    assert link.is_symlink() and os.readlink(link) == "../streamlit_config"
    assert link.resolve() == CONFIG_DIR.resolve()
    assert (link / "config.toml").read_bytes() == (CONFIG_DIR / "config.toml").read_bytes()
    check_layout()  # the launcher's own check agrees


def test_the_config_sets_what_the_app_relies_on():
    assert CONFIG["server"]["headless"] is True
    assert CONFIG["client"]["toolbarMode"] == "minimal"
    assert CONFIG["client"]["allowedOrigins"] == []
    assert CONFIG["browser"]["gatherUsageStats"] is False


@pytest.mark.parametrize("extra", [(), ("--server.port", "8600"), ("--server.port=8600", "--", "--script-arg")])
def test_streamlit_command_runs_the_app_script_with_the_options_given(extra):
    command = streamlit_command(extra)
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT)]
    assert command[5:] == list(extra)


def test_prepare_store_builds_the_demo_only_when_the_store_is_empty(settings):
    from cellspot.store.db import make_engine, session_factory
    from cellspot.store.queries import project_summaries

    assert "store was empty: built the demo project 'demo'" in prepare_store()
    assert prepare_store() == "store: 1 project(s) ready"
    engine = make_engine(settings=settings)
    with session_factory(engine)() as session:
        table = project_summaries(session)
    engine.dispose()
    assert table["project"].tolist() == ["demo"] and int(table["images"].iloc[0]) == 12


def test_prepare_store_without_demo_leaves_an_empty_store_empty(settings):
    assert prepare_store(build_demo_if_empty=False) == "store: 0 project(s) ready"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local test server
        return response.read()


@pytest.mark.slow
def test_cellspot_app_serves_the_app_with_streamlit_config_in_force(tmp_path):
    import streamlit.config as st_config

    default_origins = st_config._config_options_template["client.allowedOrigins"].default_val
    assert default_origins != CONFIG["client"]["allowedOrigins"]  # else the check below proves nothing

    port = _free_port()
    workdir, home = tmp_path / "elsewhere", tmp_path / "user-home"
    workdir.mkdir()
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "CELLSPOT_HOME": str(tmp_path / "store"),
           "CELLSPOT_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    env = {k: v for k, v in env.items() if not k.startswith("STREAMLIT_")}
    cellspot = Path(sys.executable).with_name("cellspot")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(cellspot), "app", "--server.port", str(port)], cwd=workdir, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if _get(f"{base}/_stcore/health") == b"ok":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start: {(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        host_config = json.loads(_get(f"{base}/_stcore/host-config"))
        assert host_config["allowedOrigins"] == CONFIG["client"]["allowedOrigins"]
        assert b'<div id="root">' in _get(f"{base}/")  # the page itself loads
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert "built the demo project 'demo'" in output  # the launcher prepared the empty store

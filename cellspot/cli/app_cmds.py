"""``cellspot app``: start the Streamlit app (classroom labelling station + researcher dashboard).

The app's Streamlit configuration lives in ``streamlit_config/`` at the repository root.
Streamlit reads a ``.streamlit/`` folder beside the main script (script-level config, after
``~/.streamlit`` and ``$CWD/.streamlit``), and ``app/.streamlit`` is a committed symlink to
``../streamlit_config``; so the configuration takes effect however the app is started
(``cellspot app`` from any folder, or ``streamlit run app/cellspot_app.py``), and options given
on the command line still win over it.

Before starting, the store is migrated to the newest schema and, when it holds no project
yet, the demo project is built, so ``make run`` opens a ready demo (class code ``DEMO``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from cellspot.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO_ROOT / "app" / "cellspot_app.py"
CONFIG_DIR = REPO_ROOT / "streamlit_config"


class AppNotFoundError(click.ClickException):
    """The app script or its config folder is missing (cellspot runs from a repository checkout)."""


def streamlit_command(extra_args: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The command that starts the app: ``python -m streamlit run <app script> <extra args>``.

    ``extra_args`` are Streamlit options such as ``--server.port 8600`` (they override
    ``streamlit_config/config.toml``); after a ``--`` they go to the script itself.
    """
    return [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), *extra_args]


def check_layout() -> None:
    """Raise :class:`AppNotFoundError` unless the app script and its config link are in place."""
    if not APP_SCRIPT.is_file():
        raise AppNotFoundError(
            f"the app script {APP_SCRIPT} is missing; `cellspot app` runs from a repository "
            "checkout installed with `pip install -e .`"
        )
    link = APP_SCRIPT.parent / ".streamlit"
    if not (link / "config.toml").is_file():
        raise AppNotFoundError(
            f"{link}/config.toml is missing: {link} must be the symlink to ../streamlit_config "
            f"(recreate it with `ln -s ../streamlit_config {link}`)"
        )


def prepare_store(build_demo_if_empty: bool = True) -> str:
    """Create ``CELLSPOT_HOME``, migrate the store, build the demo when it has no project.

    Returns one line saying what was done (for the terminal).
    """
    from sqlalchemy import func, select

    from cellspot.settings import get_settings
    from cellspot.store.db import transaction
    from cellspot.store.migrate import prepare_store
    from cellspot.store.models import Project
    from cellspot.workflows.demo import build_demo

    settings = get_settings()
    engine = prepare_store(settings)
    try:
        with transaction(engine) as session:
            n_projects = session.scalar(select(func.count()).select_from(Project)) or 0
            if n_projects or not build_demo_if_empty:
                return f"store: {n_projects} project(s) ready"
            report = build_demo(session, settings, project_name=settings.default_project)
        return (f"store was empty: built the demo project {report.project!r} "
                f"({report.n_images} images, class code DEMO)")
    finally:
        engine.dispose()


@main.command(
    "app",
    short_help="Start the app (migrates the store; builds the demo project in an empty one).",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                      "help_option_names": ["-h", "--help"]},
)
@click.option("--no-demo", is_flag=True, help="Do not build the demo project when the store is empty.")
@click.argument("streamlit_args", nargs=-1, type=click.UNPROCESSED)
def app_cmd(no_demo: bool, streamlit_args: tuple[str, ...]) -> None:
    """Start the app; STREAMLIT_ARGS are Streamlit options, e.g. --server.port 8600.

    The Streamlit configuration in streamlit_config/ applies; options given here override it.
    The researcher password comes from CELLSPOT_RESEARCHER_PASSWORD (or ..._HASH, or
    researcher_password in streamlit_config/secrets.toml).
    """
    check_layout()
    click.echo(prepare_store(build_demo_if_empty=not no_demo))
    command = streamlit_command(streamlit_args)
    click.echo(f"starting: {' '.join(command[1:])}")
    sys.stdout.flush()
    if os.name == "posix":
        # Replace this process: Ctrl-C, SIGTERM and the process id reach Streamlit itself.
        os.execv(command[0], command)
    raise SystemExit(subprocess.call(command))  # pragma: no cover - non-POSIX

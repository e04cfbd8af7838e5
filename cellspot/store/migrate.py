"""Run the Alembic migrations in ``migrations/`` against an engine (``cellspot init`` uses this)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

import cellspot

if TYPE_CHECKING:
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(cellspot.__file__).resolve().parents[1]
MIGRATIONS_DIR = REPO_ROOT / "migrations"


class MigrationsNotFoundError(FileNotFoundError):
    """``migrations/`` is not beside the package (install a checkout with ``pip install -e .``)."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic :class:`Config` for ``migrations/``; ``connection`` is handed to ``env.py``."""
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationsNotFoundError(
            f"no Alembic migrations at {MIGRATIONS_DIR}; cellspot must run from a repository "
            "checkout installed with `pip install -e .`"
        )
    ini = REPO_ROOT / "alembic.ini"
    config = Config(str(ini)) if ini.is_file() else Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> None:
    """Run the Alembic ``step`` to ``revision`` in one transaction. On SQLite, foreign keys are
    off meanwhile (the pragma is ignored inside a transaction, so it is set before): a batch
    migration copies a table and drops the old one, and with foreign keys on, that drop deletes
    every row pointing at it through ``ON DELETE CASCADE``. Refuses to commit when rows are left
    pointing at nothing (``PRAGMA foreign_key_check``)."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                step(alembic_config(connection), revision)
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall() if sqlite else []
                if broken:
                    raise RuntimeError(f"migrating to {revision} would leave {len(broken)} row(s) pointing at "
                                       f"missing rows (first: {tuple(broken[0])}); nothing was changed")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (default: the newest)."""
    _migrate(engine, command.upgrade, revision)
    log.info("database %s upgraded to %s", _safe_url(engine), revision)


def prepare_store(settings: "Settings") -> Engine:
    """Create ``CELLSPOT_HOME`` and its folders, then an engine on a database at head.

    The caller disposes of the engine.
    """
    from cellspot.store.db import make_engine

    for folder in (settings.home, settings.images_dir, settings.exports_dir):
        folder.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
    except Exception:
        engine.dispose()
        raise
    return engine


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the database behind ``engine`` to ``revision`` (``"base"`` empties it)."""
    _migrate(engine, command.downgrade, revision)
    log.info("database %s downgraded to %s", _safe_url(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty (unmigrated) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)

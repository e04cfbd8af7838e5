"""Run the Alembic migrations in ``migrations/`` against an engine (``cellspot init`` uses this)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

import cellspot

if TYPE_CHECKING:
    from cellspot.settings import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(cellspot.__file__).resolve().parents[1]
MIGRATIONS_DIR = REPO_ROOT / "migrations"
#: the PostgreSQL advisory lock (one per database) that lets one starter migrate at a time:
#: any fixed 64-bit number; this one is "cellspot" in ASCII
PG_MIGRATION_LOCK = 0x63656C6C73706F74


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


class MigrationError(RuntimeError):
    """A migration failed; the message says where the database from before it is."""


def _migrate(engine: Engine, step: Callable[[Config, str], None], revision: str) -> tuple[str | None, str | None]:
    """Run the Alembic ``step`` to ``revision`` in one transaction; returns the revisions
    before and after. One starter at a time (:func:`_migration_lock`): workers and
    ``cellspot init`` started together on a fresh database each wait, then find it at head
    (they used to create the same tables at once, and all but one died). On SQLite, foreign keys are
    off meanwhile (the pragma is ignored inside a transaction, so it is set before): a batch
    migration copies a table and drops the old one, and with foreign keys on, that drop deletes
    every row pointing at it through ``ON DELETE CASCADE``. Refuses to commit when rows are left
    pointing at nothing (``PRAGMA foreign_key_check``).

    SQLite's driver runs DDL outside the transaction, so a migration that fails midway can leave
    a half-changed database: an existing SQLite store with migrations to run is first copied
    beside itself (``<file>.before-<head>``), and a failure raises :class:`MigrationError`
    naming that copy."""
    with _migration_lock(engine):
        backup = _backup_sqlite(engine)
        try:
            return _run_step(engine, step, revision)
        except Exception as exc:
            if backup is None:
                raise
            raise MigrationError(f"migrating {_safe_url(engine)} to {revision} failed ({exc}); the database "
                                 f"from before is saved as {backup}: copy it back over the database file to "
                                 "undo") from exc


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Hold the database's migration lock while the block runs, waiting for it as long as
    another process migrates. PostgreSQL: a session-level advisory lock
    (:data:`PG_MIGRATION_LOCK`, released by the server should this process die); a SQLite
    file: an exclusive ``flock`` on ``<file>.migrate-lock`` beside it (the busy timeout alone
    does not serialize: SQLite's driver runs DDL outside the transaction, so two starters both
    found no tables and both created them); anything else: no lock."""
    from cellspot.store.db import sqlite_file

    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_MIGRATION_LOCK})
            connection.commit()  # the lock belongs to the session, not to this transaction
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_MIGRATION_LOCK})
                connection.commit()
        return
    file = sqlite_file(engine.url.render_as_string(hide_password=False))
    try:
        import fcntl
    except ImportError:  # Windows: no flock; starters there are not serialized
        fcntl = None  # type: ignore[assignment]
    if file is None or fcntl is None:
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(f"{file.name}.migrate-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _backup_sqlite(engine: Engine) -> Path | None:
    """A copy of an existing SQLite store that has migrations to run (SQLite's backup API, safe
    with WAL), or None (PostgreSQL, in-memory, a new database, nothing to run)."""
    import sqlite3

    from cellspot.store.db import sqlite_file

    file = sqlite_file(engine.url.render_as_string(hide_password=False))
    if file is None or not file.is_file():
        return None
    current, head = current_revision(engine), head_revision()
    if current is None or current == head:
        return None
    target = file.with_name(f"{file.name}.before-{head}")
    with sqlite3.connect(file) as source, sqlite3.connect(target) as copy:
        source.backup(copy)
    source.close()
    copy.close()
    log.info("SQLite store %s copied to %s before migrating from %s to %s", file, target, current, head)
    return target


def _run_step(engine: Engine, step: Callable[[Config, str], None], revision: str) -> tuple[str | None, str | None]:
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                before = MigrationContext.configure(connection).get_current_revision()
                step(alembic_config(connection), revision)
                after = MigrationContext.configure(connection).get_current_revision()
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall() if sqlite else []
                if broken:
                    raise RuntimeError(f"migrating to {revision} would leave {len(broken)} row(s) pointing at "
                                       f"missing rows (first: {tuple(broken[0])})")
            return before, after
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` to ``revision`` (default: the newest)."""
    before, after = _migrate(engine, command.upgrade, revision)
    if before == after:
        log.info("database %s already at %s%s; nothing to migrate", _safe_url(engine), revision,
                 f" ({after})" if after != revision else "")
    else:
        log.info("database %s upgraded from %s to %s", _safe_url(engine), before or "an empty database", after)


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
    before, after = _migrate(engine, command.downgrade, revision)
    log.info("database %s downgraded from %s to %s", _safe_url(engine), before, after or "an empty database")


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty (unmigrated) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _safe_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)

"""Engine settings: SQLite pragmas in effect on every connection."""

from __future__ import annotations

import sqlalchemy as sa

from cellspot.store.db import make_engine


def test_sqlite_pragmas(sqlite_engine: sa.Engine, settings) -> None:
    with sqlite_engine.connect() as conn:
        pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()  # noqa: E731
        assert str(pragma("journal_mode")).lower() == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") == settings.sqlite_busy_timeout_ms


def test_make_engine_uses_settings_url(settings) -> None:
    engine = make_engine(settings=settings)
    try:
        assert str(engine.url) == settings.resolved_database_url
    finally:
        engine.dispose()

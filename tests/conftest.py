"""Shared pytest fixtures: real-data folder, bench scripts, settings, migrated engines (SQLite +
PostgreSQL), sessions."""

from __future__ import annotations

import importlib.util
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: the Redis server of the tests; they use database 13 and queue names of their own
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 13
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data`` (real data, never copied into the repo); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def bench_script() -> Iterator[Callable[[str], ModuleType]]:
    """``bench_script("models")`` loads ``bench/models.py`` by path (bench/ is a folder of
    scripts, not a package) as the module ``bench_models``; it is unregistered when the test
    module ends."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Settings rooted in ``tmp_path``; the CELLSPOT_* environment variables match them."""
    from cellspot.settings import Settings

    home = tmp_path / "home"
    url = f"sqlite:///{tmp_path / 'cellspot.db'}"
    monkeypatch.setenv("CELLSPOT_HOME", str(home))
    monkeypatch.setenv("CELLSPOT_DATABASE_URL", url)
    return Settings(home=home, database_url=url)


def _postgres_available() -> str | None:
    """None when the server answers, else the reason it does not."""
    import sqlalchemy as sa

    try:
        probe = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with probe.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        probe.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return f"PostgreSQL at {POSTGRES_URL} does not answer: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _redis_skip_reason() -> str | None:
    """None when a Redis server answers PING at REDIS_HOST:REDIS_PORT, else the reason it does not."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return f"{REDIS_HOST}:{REDIS_PORT} answers, but not like Redis"
    except OSError as exc:
        return f"Redis at {REDIS_HOST}:{REDIS_PORT} does not answer: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """``redis://127.0.0.1:6379/13``, the tests' Redis database, when a server answers there; skips
    the test otherwise. A test keeps to queue names of its own and flushes only those."""
    reason = _redis_skip_reason()
    if reason:
        pytest.skip(reason)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture(scope="session")
def _postgres_skip_reason() -> str | None:
    return _postgres_available()


@pytest.fixture
def postgres_schema_url(_postgres_skip_reason: str | None) -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL schema (dropped CASCADE at teardown); skips when no server."""
    if _postgres_skip_reason:
        pytest.skip(_postgres_skip_reason)
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def _make_test_engine(request: pytest.FixtureRequest, backend: str, settings):
    from cellspot.store.db import make_engine

    if backend == "sqlite":
        return make_engine(settings=settings)
    url = request.getfixturevalue("postgres_schema_url")
    return make_engine(url, settings=settings)


@pytest.fixture
def empty_engine(request: pytest.FixtureRequest, settings) -> Iterator:
    """An engine on an empty database (not migrated), parametrized like ``engine``."""
    backend = getattr(request, "param", "sqlite")
    eng = _make_test_engine(request, backend, settings)
    yield eng
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, settings) -> Iterator:
    """An engine migrated to head, on SQLite and on PostgreSQL (own schema; skipped when down)."""
    from cellspot.store.migrate import upgrade

    eng = _make_test_engine(request, request.param, settings)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sqlite_engine(settings) -> Iterator:
    """A SQLite engine (file in tmp_path) migrated to head."""
    from cellspot.store.db import make_engine
    from cellspot.store.migrate import upgrade

    eng = make_engine(settings=settings)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session(engine) -> Iterator:
    """A Session on ``engine``; rolled back and closed at teardown."""
    from sqlalchemy.orm import Session

    sess = Session(engine, expire_on_commit=False)
    try:
        yield sess
    finally:
        sess.rollback()
        sess.close()

"""Several starters (workers, ``cellspot init``) migrating one fresh database at once: each waits
for the one that migrates, then finds the database at head; a database at head says so."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import sqlalchemy as sa

from cellspot.store.db import make_engine
from cellspot.store.migrate import current_revision, head_revision, upgrade

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
STARTERS = 3
#: one starter: a process of its own (Alembic's ``context`` is module-global, so threads of one
#: process cannot migrate at once); it waits for the go file so that all start together
STARTER = """
import sys, time
from pathlib import Path
from cellspot.settings import Settings
from cellspot.store.db import make_engine
from cellspot.store.migrate import upgrade
url, home, go = sys.argv[1:4]
engine = make_engine(url, settings=Settings(home=home, database_url=url))
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.01)
upgrade(engine)
engine.dispose()
"""


def _url(request: pytest.FixtureRequest, backend: str, settings) -> str:
    return settings.resolved_database_url if backend == "sqlite" else request.getfixturevalue("postgres_schema_url")


@pytest.mark.parametrize("backend", BACKENDS)
def test_starters_migrating_a_fresh_database_at_once_all_succeed(request, settings, backend) -> None:
    url = _url(request, backend, settings)
    go = settings.home.parent / "go"
    starters = [subprocess.Popen([sys.executable, "-c", STARTER, url, str(settings.home), str(go)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for _ in range(STARTERS)]
    assert [starter.stdout.readline().strip() for starter in starters] == ["ready"] * STARTERS
    go.touch()
    outputs = [starter.communicate(timeout=120)[0] for starter in starters]
    assert [starter.returncode for starter in starters] == [0] * STARTERS, "\n".join(outputs)
    engine = make_engine(url, settings=settings)
    try:
        assert current_revision(engine) == head_revision()
        assert "projects" in sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_a_database_at_head_is_logged_as_already_there(settings, caplog) -> None:
    engine = make_engine(settings=settings)
    try:
        with caplog.at_level(logging.INFO, logger="cellspot.store.migrate"):
            upgrade(engine)
            first = [r.getMessage() for r in caplog.records if r.name == "cellspot.store.migrate"]
            caplog.clear()
            upgrade(engine)
            second = [r.getMessage() for r in caplog.records if r.name == "cellspot.store.migrate"]
    finally:
        engine.dispose()
    head = head_revision()
    assert any(f"upgraded from an empty database to {head}" in m for m in first)
    assert second == [f"database {settings.resolved_database_url} already at head ({head}); nothing to migrate"]

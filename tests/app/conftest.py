"""Fixtures of the app tests: a seeded temporary store and a fresh ``AppTest`` of the app.

The store is built once per test session (a small demo project: 4 generated images, 2 of them
gold, 2 simulated students, consensus computed; class code ``DEMO``) and copied into each
test's ``CELLSPOT_HOME`` / ``CELLSPOT_DATABASE_URL`` (the ``settings`` fixture), so every test
starts from the same state and may write freely.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_testkit import APP_SCRIPT, PASSWORD


@pytest.fixture(scope="session")
def seeded_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(database file, home folder)`` of the seed store (built once)."""
    from cellspot.settings import Settings
    from cellspot.store.db import make_engine, transaction
    from cellspot.store.migrate import upgrade
    from cellspot.workflows.demo import build_demo

    root = tmp_path_factory.mktemp("seed")
    settings = Settings(home=root / "home", database_url=f"sqlite:///{root / 'cellspot.db'}")
    engine = make_engine(settings=settings)
    try:
        upgrade(engine)
        with transaction(engine) as session:
            build_demo(session, settings, n_images=4, n_students=2, seed=3)
        with engine.connect() as conn:  # everything into the main file before copying it
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        engine.dispose()
    return root / "cellspot.db", root / "home"


@pytest.fixture
def store(settings, seeded_store, monkeypatch: pytest.MonkeyPatch):
    """The settings of this test's own copy of the seed store (researcher password set)."""
    import streamlit as st

    db, home = seeded_store
    shutil.copy(db, settings.resolved_database_url.removeprefix("sqlite:///"))
    shutil.copytree(home, settings.home)
    monkeypatch.setenv("CELLSPOT_RESEARCHER_PASSWORD", PASSWORD)
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD_HASH", raising=False)
    st.cache_data.clear()
    st.cache_resource.clear()  # engines of earlier tests, the login throttle
    yield settings
    st.cache_resource.clear()


@pytest.fixture
def app_engine(store) -> Iterator:
    """An engine on this test's store (to check what the app stored)."""
    from cellspot.store.db import make_engine

    eng = make_engine(settings=store)
    yield eng
    eng.dispose()


@pytest.fixture
def app(store):
    """A fresh app (not run yet) on this test's store, isolated from any secrets.toml."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.secrets["unused"] = "tests use CELLSPOT_RESEARCHER_PASSWORD only"
    return at

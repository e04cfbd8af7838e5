"""Alembic migrations: upgrade / downgrade / upgrade on both backends, no drift vs the models."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from cellspot.store.migrate import current_revision, downgrade, head_revision, upgrade
from cellspot.store.models import Base

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
TABLES = set(Base.metadata.tables)


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


@pytest.mark.parametrize("empty_engine", BACKENDS, indirect=True)
def test_upgrade_downgrade_upgrade(empty_engine: sa.Engine) -> None:
    assert current_revision(empty_engine) is None
    upgrade(empty_engine)
    assert current_revision(empty_engine) == head_revision()
    assert _tables(empty_engine) == TABLES
    downgrade(empty_engine, "base")
    assert current_revision(empty_engine) is None
    assert _tables(empty_engine) == set()
    upgrade(empty_engine)
    assert _tables(empty_engine) == TABLES


def test_autogenerate_finds_no_difference(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_retired_snapshot_foreign_key_exists(engine: sa.Engine) -> None:
    fks = {fk["name"]: fk for fk in sa.inspect(engine).get_foreign_keys("images")}
    fk = fks["fk_images_retired_snapshot_id_consensus_snapshots"]
    assert fk["referred_table"] == "consensus_snapshots"
    assert fk["constrained_columns"] == ["retired_snapshot_id"]
    assert fk["options"].get("ondelete", "").upper() == "SET NULL"


@pytest.mark.parametrize(
    ("table", "name"),
    [
        ("clicks", "ck_clicks_label"),
        ("images", "ck_images_status"),
        ("images", "ck_images_positive_size"),
        ("consensus_cells", "ck_consensus_cells_p_alive_range"),
        ("annotators", "ck_annotators_role"),
    ],
)
def test_named_check_constraints(engine: sa.Engine, table: str, name: str) -> None:
    names = {ck["name"] for ck in sa.inspect(engine).get_check_constraints(table)}
    assert name in names


def test_head_is_single_and_described() -> None:
    from alembic.script import ScriptDirectory

    from cellspot.store.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert all(rev.doc and rev.doc.strip() for rev in revisions)


@pytest.mark.parametrize("empty_engine", BACKENDS, indirect=True)
def test_one_open_round_migration_keeps_the_newest_open_round(empty_engine: sa.Engine) -> None:
    """A store where a race left several rounds open: the newest stays open, the others close."""
    upgrade(empty_engine, "e5a1f3c7b209")
    with empty_engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO projects (id, name, description, settings, created_at) "
                             "VALUES (1, 'p', '', '{}', CURRENT_TIMESTAMP), (2, 'q', '', '{}', CURRENT_TIMESTAMP)"))
        for rid, project, number, status in [(1, 1, 1, "closed"), (2, 1, 2, "open"), (3, 1, 3, "open"),
                                             (4, 2, 1, "open")]:
            conn.execute(sa.text("INSERT INTO al_rounds (id, project_id, number, status, strategy, params, created_at) "
                                 "VALUES (:id, :p, :n, :s, 'random', '{}', CURRENT_TIMESTAMP)"),
                         {"id": rid, "p": project, "n": number, "s": status})
    upgrade(empty_engine)
    with empty_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, status, closed_at IS NOT NULL FROM al_rounds ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, "closed", False), (2, "closed", True), (3, "open", False), (4, "open", False)]
    with empty_engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text("UPDATE al_rounds SET status = 'open' WHERE id = 1"))

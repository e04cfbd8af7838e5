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


COUNTED = ("projects", "images", "annotators", "task_runs", "clicks", "gold_cells")


def _counts(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in COUNTED}


@pytest.mark.parametrize("empty_engine", BACKENDS, indirect=True)
def test_the_expert_empty_migration_keeps_every_row(empty_engine: sa.Engine) -> None:
    """Upgrading a SQLite store that had data emptied task_runs, clicks and gold_cells: the
    batch migration copied ``images`` and dropped the old table with foreign keys on."""
    upgrade(empty_engine, "f1b7a2c9d4e6")
    now = "CURRENT_TIMESTAMP"
    with empty_engine.begin() as conn:
        for sql in (
            f"INSERT INTO projects (id, name, description, settings, created_at) VALUES (1, 'p', '', '{{}}', {now})",
            "INSERT INTO images (id, project_id, name, width, height, channels, bit_depth, has_pixels, metadata, "
            f"status, created_at) VALUES (1, 1, 'a.png', 10, 10, 1, 8, false, '{{}}', 'active', {now})",
            f"INSERT INTO annotators (id, project_id, nickname, class_code, role, created_at) "
            f"VALUES (1, 1, 's', 'C', 'student', {now})",
            "INSERT INTO task_runs (id, image_id, annotator_id, client_key, source, is_gold_check, submitted_at) "
            f"VALUES (1, 1, 1, 'k', 'app', false, {now})",
            "INSERT INTO clicks (id, task_run_id, click_index, x, y, label) VALUES (1, 1, 0, 2.0, 3.0, 'alive')",
            "INSERT INTO gold_cells (id, image_id, x, y, label, source, created_at) "
            f"VALUES (1, 1, 4.0, 5.0, 'dead', 'import', {now})",
        ):
            conn.execute(sa.text(sql))
    before = _counts(empty_engine)
    assert set(before.values()) == {1}
    upgrade(empty_engine)
    assert _counts(empty_engine) == before
    with empty_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT expert_empty FROM images")).scalar() in (False, 0)
    downgrade(empty_engine, "f1b7a2c9d4e6")
    assert _counts(empty_engine) == before
    upgrade(empty_engine)
    assert _counts(empty_engine) == before


def test_a_sqlite_migration_runs_with_foreign_keys_off_and_turns_them_on_after(settings) -> None:
    """The safety net under every batch migration: SQLite ignores the pragma inside a
    transaction, so it is set around it; the pooled connection gets foreign keys back."""
    from alembic import command

    from cellspot.store.db import make_engine
    from cellspot.store.migrate import _migrate

    engine = make_engine(settings=settings)
    seen = []

    def spy(config, revision):
        seen.append(config.attributes["connection"].exec_driver_sql("PRAGMA foreign_keys").scalar())
        command.upgrade(config, revision)

    try:
        _migrate(engine, spy, "head")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    assert seen == [0]


def test_a_failed_sqlite_migration_names_the_copy_made_before_it(settings) -> None:
    """SQLite runs DDL outside the transaction: a migration failing midway left a half-changed
    store (a column added, the old version recorded), and the message said nothing was changed."""
    from alembic import command

    from cellspot.store.db import make_engine, sqlite_file
    from cellspot.store.migrate import MigrationError, _migrate

    engine = make_engine(settings=settings)
    try:
        upgrade(engine, "f1b7a2c9d4e6")
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO projects (id, name, description, settings, created_at) "
                                 "VALUES (1, 'p', '', '{}', CURRENT_TIMESTAMP)"))

        def fails_midway(config, revision):
            command.upgrade(config, revision)
            raise RuntimeError("disk full")

        with pytest.raises(MigrationError, match=r"failed \(disk full\); the database from before is saved as") as info:
            _migrate(engine, fails_midway, "head")
        copy = sqlite_file(settings.resolved_database_url).with_name(
            f"{sqlite_file(settings.resolved_database_url).name}.before-{head_revision()}")
        assert str(copy) in str(info.value)
        saved = sa.create_engine(f"sqlite:///{copy}")
        assert current_revision(saved) == "f1b7a2c9d4e6" and _counts(saved)["projects"] == 1
        saved.dispose()
    finally:
        engine.dispose()


def test_an_up_to_date_or_new_store_is_not_copied(settings) -> None:
    from cellspot.store.db import make_engine, sqlite_file

    engine = make_engine(settings=settings)
    try:
        upgrade(engine)  # a new database: nothing to keep
        upgrade(engine)  # at head: nothing to run
    finally:
        engine.dispose()
    assert not list(sqlite_file(settings.resolved_database_url).parent.glob("*.before-*"))

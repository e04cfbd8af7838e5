"""``cellspot init``, ``cellspot aggregate`` and ``cellspot projects`` on a SQLite store in tmp_path."""

from __future__ import annotations

import pytest

from cellspot.store.db import make_engine, transaction
from cellspot.store import queries as q
from cellspot.store.migrate import current_revision, head_revision
from cellspot.store.models import Image
from clikit import run_cli


def _run(*args: str) -> tuple[int, str]:
    result = run_cli(*args)
    return result.exit_code, result.output


def _seed(settings) -> None:
    engine = make_engine(settings=settings)
    with transaction(engine) as session:
        project = q.get_or_create_project(session, "demo")
        image = Image(project=project, name="a.png", width=100, height=100)
        session.add(image)
        for i in range(3):
            ann = q.get_or_create_annotator(session, project, f"s{i}")
            clicks = [(10.0 + i, 10.0, "alive"), (50.0, 60.0 - i, "dead")]
            q.submit_task_run(session, image, ann, clicks, f"k{i}")
    engine.dispose()


def test_init_creates_home_and_migrates(settings) -> None:
    code, out = _run("init")
    assert code == 0, out
    assert settings.home.is_dir()
    assert "revision" in out and str(settings.home.resolve()) in out
    engine = make_engine(settings=settings)
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert _run("init")[0] == 0  # idempotent


@pytest.mark.postgres
def test_init_on_postgresql_hides_password(settings, postgres_schema_url: str, monkeypatch) -> None:
    url = postgres_schema_url.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    monkeypatch.setenv("CELLSPOT_DATABASE_URL", url)
    code, out = _run("init")
    assert code == 0, out
    assert "s3cret" not in out and "***" in out


def test_aggregate_and_projects(settings) -> None:
    assert _run("init")[0] == 0
    _seed(settings)
    code, out = _run("aggregate", "--min-confidence", "0.5")
    assert code == 0, out
    assert "project 'demo': snapshot 1" in out and "retired: 1 images" in out
    assert "kept it" not in out
    code, out = _run("aggregate", "--min-confidence", "0.5")  # nothing new: the same snapshot
    assert code == 0, out
    assert "changed since snapshot 1; kept it" in out and "project 'demo': snapshot 1 " in out
    code, out = _run("projects")
    assert code == 0, out
    assert "demo" in out and "snapshots" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["aggregate", "--project", "nope"], "no project named 'nope'"),
        (["aggregate", "--method", "bogus"], "unknown consensus method 'bogus'"),
        (["aggregate", "--min-confidence", "2"], "min-confidence"),
    ],
)
def test_aggregate_errors(settings, args: list[str], message: str) -> None:
    assert _run("init")[0] == 0
    _seed(settings)
    code, out = _run(*args)
    assert code != 0 and message in out


def test_commands_need_init(settings) -> None:
    code, out = _run("projects")
    assert code != 0 and "cellspot init" in out


@pytest.mark.parametrize(("url", "fragment"), [
    ("bogus://x", "Can't load plugin: sqlalchemy.dialects:bogus"),
    ("postgresql://nobody@127.0.0.1:1/x", "driver of postgresql://nobody@127.0.0.1:1/x is not installed"),
    ("NOTAFILE", "file is not a database"),
])
def test_a_store_that_cannot_be_opened_is_one_clear_error(settings, tmp_path, monkeypatch, url, fragment) -> None:
    if url == "NOTAFILE":
        (tmp_path / "junk.db").write_text("not sqlite")
        url = f"sqlite:///{tmp_path / 'junk.db'}"
    monkeypatch.setenv("CELLSPOT_DATABASE_URL", url)
    for args in (("projects",), ("init",), ("export", str(tmp_path / "out"))):
        code, out = _run(*args)
        assert code == 1 and "Traceback" not in out, out
        assert "cannot use the database" in out and fragment in out and "CELLSPOT_DATABASE_URL" in out


def test_export_and_init_on_a_store_that_is_not_there(settings, tmp_path, monkeypatch) -> None:
    for args in (("export", str(tmp_path / "out")), ("projects",), ("queue",)):
        code, out = _run(*args)
        assert code == 1 and "is not initialised; run `cellspot init` first" in out, (args, out)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cellspot.db").exists()  # asking left no empty database behind
    home_file = tmp_path / "a_file"
    home_file.write_text("")
    monkeypatch.setenv("CELLSPOT_HOME", str(home_file))
    monkeypatch.delenv("CELLSPOT_DATABASE_URL")
    code, out = _run("init")
    assert code == 1 and "Traceback" not in out and str(home_file) in out and "CELLSPOT_HOME" in out

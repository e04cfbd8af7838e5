"""The dashboard's export zip: the zipping stage of its progress, and the pruning of older
zips (SQLite and PostgreSQL)."""

from __future__ import annotations

import zipfile

import pytest

from cellspot.store import queries as q
from cellspot.store.models import Image
from cellspot.workflows import dashboard as d
from cellspot.workflows.aggregate import aggregate


def _project(session, name: str):
    """A project with two images (no pixels) that three students agree on, aggregated."""
    project = q.get_or_create_project(session, name)
    students = [q.get_or_create_annotator(session, project, f"s{k}", "DEMO") for k in range(3)]
    for image_name in ("a.png", "b.png"):
        image = Image(project=project, name=image_name, width=100, height=80, has_pixels=False, meta={})
        session.add(image)
        session.flush()
        for k, who in enumerate(students):
            q.submit_task_run(session, image, who, [(10.0 + k, 20.0, "alive"), (50.0, 40.0 + k, "dead")],
                              client_key=f"{name}-{image_name}-{k}")
    aggregate(session, project)
    return project


def test_export_zip_reports_the_zipping_stage(session, settings):
    """The progress bar sat at "Cutting crops: 46 / 46" for seconds while the zip was written."""
    project = _project(session, "p")
    calls = []
    path, _ = d.export_zip(session, project, settings, crop_size=8, progress=lambda *a: calls.append(a))
    with zipfile.ZipFile(path) as archive:
        n_files = len(archive.namelist())
    zipping = [c for c in calls if c[0] == "zip"]
    assert zipping[0] == ("zip", 0, n_files) and zipping[-1] == ("zip", n_files, n_files)
    assert calls.index(zipping[0]) > max(i for i, c in enumerate(calls) if c[0] == "crops")  # after the crops
    assert [c[1] for c in zipping] == sorted(c[1] for c in zipping)


def test_a_new_export_deletes_the_older_zips_of_the_project(session, settings):
    """Every build left a zip in CELLSPOT_HOME/exports forever."""
    project = _project(session, "p")
    built = [d.export_zip(session, project, settings, crop_size=8)[0] for _ in range(5)]
    left = sorted(settings.exports_dir.glob("*.zip"))
    assert len(left) == d.EXPORTS_KEPT == 3
    assert left == sorted(built[-3:])  # the newest three, the one just built among them
    assert not list(settings.exports_dir.glob(".*"))


def test_pruning_leaves_other_projects_and_other_files_alone(session, settings):
    mine, other = _project(session, "my lab"), _project(session, "my_lab")  # the same file-safe stem
    theirs = d.export_zip(session, other, settings, crop_size=8)[0]
    assert theirs.name.startswith("my_lab-")
    exports = settings.exports_dir
    not_a_zip = exports / "my_lab-20200101T000000Z-abcdef.zip"
    not_a_zip.write_text("a file with an export's name that is no zip")
    notes = exports / "notes.zip"
    notes.write_bytes(b"PK")
    built = [d.export_zip(session, mine, settings, crop_size=8, keep_last=2)[0] for _ in range(4)]
    assert sorted(exports.glob("*.zip")) == sorted([theirs, not_a_zip, notes, *built[-2:]])


def test_a_zip_offered_for_download_is_kept(session, settings):
    project = _project(session, "p")
    offered = d.export_zip(session, project, settings, crop_size=8)[0]
    built = [d.export_zip(session, project, settings, crop_size=8, keep_last=1, keep=(offered,))[0]
             for _ in range(3)]
    assert sorted(settings.exports_dir.glob("*.zip")) == sorted([offered, built[-1]])


@pytest.mark.parametrize("keep_last", [0, -1, 1.5, True])
def test_keep_last_must_keep_the_new_zip(session, settings, keep_last):
    project = _project(session, "p")
    with pytest.raises(d.DashboardError, match="keep_last must be a whole number, 1 or more"):
        d.export_zip(session, project, settings, crop_size=8, keep_last=keep_last)
    assert not settings.exports_dir.exists() or not list(settings.exports_dir.iterdir())


def test_a_zip_another_session_deleted_meanwhile_does_not_fail_the_export(session, settings, monkeypatch):
    """Two exports at once: the other cleanup deleted a listed zip before this one sorted them
    by time, and FileNotFoundError escaped after the new zip was built."""
    project = _project(session, "p")
    built = [d.export_zip(session, project, settings, crop_size=8, keep_last=10)[0] for _ in range(3)]
    real = d._export_zip_project_id

    def read_then_lose(path):
        found = real(path)
        if path == built[0]:
            path.unlink()  # the other session's cleanup, between the listing and the sort
        return found

    monkeypatch.setattr(d, "_export_zip_project_id", read_then_lose)
    assert d.prune_export_zips(settings.exports_dir, project, keep_last=1) == [built[1]]
    assert sorted(settings.exports_dir.glob("*.zip")) == [built[2]]

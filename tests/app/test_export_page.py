"""The Export page (``streamlit.testing.v1.AppTest``) on the seeded demo store: the CLI's
options, what a build shows while it runs and after, the numbers it uses, the zips it keeps."""

from __future__ import annotations

import json
import re
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from app_testkit import PASSWORD, no_exception, texts
from sqlalchemy import select
from sqlalchemy.orm import Session

from cellspot.store.models import ConsensusSnapshot, Project

INT = 0  # NumberInput.DataType.INT of Streamlit's proto
KEPT = 3  # cellspot.workflows.dashboard.EXPORTS_KEPT: export zips kept per project


def open_export(at):
    at.run()
    at.switch_page("views/login.py").run()
    at.text_input(key="login_password").input(PASSWORD)
    at.button[0].click().run()
    at.switch_page("views/export.py").run()
    no_exception(at)
    return at


def build(at):
    at.button[0].click().run()  # Build the export
    no_exception(at)
    return at


def snapshot_box(at):
    return next(s for s in at.selectbox if s.label == "Consensus snapshot")


def manifest_of(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/manifest.json"))
        return json.loads(archive.read(name))


def only_zip(store) -> Path:
    zips = list(store.exports_dir.glob("*.zip"))
    assert len(zips) == 1, zips
    return zips[0]


# --------------------------------------------------------------------------- the CLI's options


def test_the_page_offers_the_split_and_a_snapshot_like_the_cli(app, store, app_engine):
    """The page had no split fractions and always exported the latest snapshot."""
    with Session(app_engine) as session, session.begin():
        project_id = session.scalar(select(Project.id).where(Project.name == "demo"))
        demo = session.scalar(select(ConsensusSnapshot).where(ConsensusSnapshot.project_id == project_id))
        later = ConsensusSnapshot(project_id=project_id, method="empty", params={}, stats={},
                                  created_at=demo.created_at + timedelta(hours=1))
        session.add(later)
        session.flush()
        demo_id, later_id = demo.id, later.id
    open_export(app)
    box = snapshot_box(app)
    assert box.options[0].startswith(f"{later_id} · empty") and box.options[0].endswith("(latest)")
    assert box.value == later_id  # the latest by default
    split = app.text_input(key="export_split")
    assert split.value == "0.8,0.1,0.1"
    box.set_value(demo_id)
    split.input("0.5,0.25,0.25")
    build(app)
    manifest = manifest_of(only_zip(store))
    assert manifest["snapshot"]["id"] == demo_id
    assert manifest["split"] == {"train": 0.5, "val": 0.25, "test": 0.25}
    assert f"Snapshot {demo_id} (cluster_em)" in texts(app.caption) and "split 0.5/0.25/0.25" in texts(app.caption)


@pytest.mark.parametrize(("text", "message"), [
    ("0.8,0.3,0.1", "sum to 1"),
    ("0.8,0.2", "3 fractions"),
    ("eighty,ten,ten", "three comma-separated numbers"),
])
def test_a_bad_split_builds_nothing_and_says_why(app, store, text, message):
    open_export(app)
    app.text_input(key="export_split").input(text)
    build(app)
    assert "Nothing was built. Split: " in texts(app.error) and message in texts(app.error)
    assert not store.exports_dir.exists() or not list(store.exports_dir.glob("*.zip"))


def test_the_confidence_field_says_that_cells_below_it_are_left_out(app, store):
    open_export(app)
    help_text = app.number_input(key="export_min_confidence").help
    assert "left out" in help_text and "Results page" in help_text and "starts at 0" in help_text


# --------------------------------------------------------------------------- the numbers used


def test_whole_number_fields_are_integer_fields_stepping_by_one(app, store):
    """Crop size 12.5 became 12 and seed 2.7 became 2 without a word: the fields are integer
    fields (the browser shows the whole number it sends) and the page says what it used."""
    open_export(app)
    for key in ("export_crop_size", "export_seed"):
        field = app.number_input(key=key)
        assert (field.proto.data_type, field.step, field.proto.format) == (INT, 1, "%d"), key
    app.number_input(key="export_crop_size").set_value(12.5)
    app.number_input(key="export_seed").set_value(2.7)
    build(app)
    shown = (app.number_input(key="export_crop_size").value, app.number_input(key="export_seed").value)
    manifest = manifest_of(only_zip(store))
    assert (manifest["crop_size"], manifest["seed"]) == shown == (12, 2)
    assert "crop size 12 px" in texts(app.caption) and "seed 2:" in texts(app.caption)


@pytest.mark.parametrize(("typed", "used"), [(None, 0.5), (0.555, 0.56), (0.125, 0.13), (0.7, 0.7)])
def test_the_minimum_confidence_used_is_the_one_shown(app, store, typed, used):
    """An emptied field is the default the field shows again (0.50); a value with more decimals
    than the field shows is used as shown."""
    open_export(app)
    field = app.number_input(key="export_min_confidence")
    assert field.proto.format in ("%.2f", "%0.2f")  # the browser shows it rounded half up to two decimals
    field.set_value(typed)
    build(app)
    assert manifest_of(only_zip(store))["min_confidence"] == used
    assert f"minimum confidence {used:.2f}" in texts(app.caption)


# --------------------------------------------------------------------------- a build and the next


def test_the_outcome_is_one_block_under_the_form(app, store):
    """A new build's first draw (the progress bar in the same slot) replaces the previous
    outcome at once: the message and the download button stayed on screen, dimmed and
    clickable, while the next build ran."""
    build(open_export(app))
    children = app.main.children
    form = next(i for i, node in children.items() if node.type == "form")
    assert max(children) == form + 1  # nothing else after the form
    outcome = children[form + 1]
    assert "Export ready" in texts(outcome.success) and len(outcome.get("download_button")) == 1


def test_a_new_build_clears_the_previous_outcome(app, store, monkeypatch):
    from cellspot.export import ExportError
    from cellspot.workflows import dashboard

    build(open_export(app))
    assert "Export ready" in texts(app.success)

    def failing(*args, **kwargs):
        raise ExportError("disk full")

    monkeypatch.setattr(dashboard, "export_zip", failing)
    build(app)
    assert "The export failed: disk full" in texts(app.error)
    assert "Export ready" not in texts(app.success) and not app.get("download_button")
    app.run()  # and it does not come back on the next rerun
    assert "Export ready" not in texts(app.success) and not app.get("download_button")


def test_the_progress_bar_names_the_zipping_stage(app, store, monkeypatch):
    """The bar sat at "Cutting crops: 46 / 46" for seconds while the zip was written."""
    from cellspot.workflows import dashboard

    def stuck_while_zipping(*args, progress, **kwargs):
        progress("crops", 46, 46)
        progress("zip", 30, 120)
        raise RuntimeError("stopped while zipping")  # not caught: the bar stays as it was

    monkeypatch.setattr(dashboard, "export_zip", stuck_while_zipping)
    open_export(app).button[0].click().run()
    assert [b.proto.text for b in app.progress] == ["Zipping the export: 30 / 120 files"]


def test_a_build_keeps_only_the_newest_zips(app, store):
    """Every build left a zip in CELLSPOT_HOME/exports forever (79 MB after 5 builds)."""
    open_export(app)
    built = []
    for _ in range(KEPT + 2):
        before = set(store.exports_dir.glob("*.zip")) if store.exports_dir.exists() else set()
        build(app)
        new = set(store.exports_dir.glob("*.zip")) - before
        assert len(new) == 1
        built.append(new.pop())
        assert re.search(rf"Export ready: {re.escape(built[-1].name)} ", texts(app.success))
    assert sorted(store.exports_dir.glob("*.zip")) == sorted(built[-KEPT:])
    assert [d.label for d in app.download_button] == ["Download the zip"]


def test_an_unreadable_image_is_named_and_the_export_still_built(app, store, app_engine):
    """One corrupt image file made the whole build fail ("cannot read the pixels of image ...")."""
    from cellspot.store.models import Image

    with Session(app_engine) as session:
        name, rel = session.execute(select(Image.name, Image.path).where(Image.has_pixels.is_(True))
                                    .order_by(Image.name).limit(1)).one()
    file = store.home / rel
    file.write_bytes(file.read_bytes()[:100])
    build(open_export(app))
    assert "Export ready" in texts(app.success)
    warning = texts(app.warning)
    assert "1 image file(s) could not be read" in warning and name in warning
    assert list(manifest_of(only_zip(store))["unreadable_images"]) == [name]


# --------------------------------------------------------------------------- empty projects


def test_kept_zips_match_the_dashboard():
    from cellspot.workflows.dashboard import EXPORTS_KEPT

    assert EXPORTS_KEPT == KEPT


def test_a_project_without_images_says_so(app, store, app_engine):
    """It said "There is no consensus yet: press 'Recompute consensus' on the Class page first"."""
    from cellspot.store.queries import get_or_create_project

    with Session(app_engine) as session, session.begin():
        bare = get_or_create_project(session, "bare").id
    open_export(app)
    app.selectbox(key="r_project_pick").set_value(bare).run()
    no_exception(app)
    assert "has no images yet: import them on the Setup page" in texts(app.info)
    assert "consensus" not in texts(app.info) and not app.get("form")

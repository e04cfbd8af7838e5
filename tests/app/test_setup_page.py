"""The researcher Setup page: the settings form only says "Saved." for values it stored, the
import forms keep their files, contradictory settings are refused in the form's words, and a
project name with spaces around it is tidied and the page says so."""

from __future__ import annotations

import io

import numpy as np
import pytest
from app_testkit import login, no_exception, texts
from sqlalchemy import select
from sqlalchemy.orm import Session

from PIL import Image as PILImage

from cellspot.store.models import GoldCell, Image, Project

LEASE = "Hold a student's image for (minutes)"
MAX_BELOW_MIN = ('"Retire after at most ... runs" (3) is below "Retire after at least ... runs" (5): raise the '
                 "maximum, lower the minimum, or set the maximum to 0 for none.")
MAX_BELOW_TARGET = ('"Retire after at most ... runs" (10) is below "Target runs per image" (20): images retire at '
                    "the maximum, so a round could never give them the target; lower the target, raise the maximum, "
                    "or set the maximum to 0 for none.")


def _settings(engine, name: str | None = None) -> dict | None:
    """The settings of project ``name`` (the first project when ``None``), ``None`` when there is none."""
    with Session(engine) as session:
        where = Project.name == name if name is not None else Project.id.is_not(None)
        project = session.scalars(select(Project).where(where).order_by(Project.id)).first()
        return None if project is None else dict(project.settings or {})


def _setup(app) -> int:
    """The Setup page opened by a researcher; returns the picked project's id."""
    login(app)
    app.switch_page("views/setup.py").run()
    no_exception(app)
    return app.session_state["r_project_id"]


def _png(seed: int) -> bytes:
    """A small random RGB PNG (40 x 60 px)."""
    buffer = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def _press(app, label: str) -> None:
    [b for b in app.button if b.label == label][0].click().run()
    no_exception(app)


# --------------------------------------------------------------------------- values out of range


@pytest.mark.parametrize(("field", "typed", "message", "fixed", "setting", "stored"), [
    ("gold", 1.5, '"Gold rate" must be a number from 0 to 1; you typed 1.5.', 0.35, "gold_rate", 0.35),
    ("lease", 0, f'"{LEASE}" must be a whole number from 1 to 1440; you typed 0.', 20, "lease_seconds", 1200),
    ("max_runs", -1, '"Retire after at most ... runs (0 = no maximum)" must be a whole number from 0 to 1000; '
                     "you typed -1.", 12, "retire_max_runs", 12),
])
def test_save_refuses_a_value_out_of_range_and_stores_nothing(app, app_engine, field, typed, message, fixed,
                                                               setting, stored):
    """A widget with bounds kept its previous value for one typed out of range (shown red), so
    Save stored the old value (gold rate 0.1, lease 900 s) and said "Saved."."""
    pid = _setup(app)
    before = _settings(app_engine)
    app.number_input(key=f"p{pid}_{field}").set_value(typed)
    _press(app, "Save")
    assert f"Nothing was saved. {message}" in texts(app.error)
    assert "Saved." not in texts(app.success)
    assert _settings(app_engine) == before
    # the value fixed: saved as typed
    app.number_input(key=f"p{pid}_{field}").set_value(fixed)
    _press(app, "Save")
    assert "Saved." in texts(app.success) and not app.error
    assert _settings(app_engine)[setting] == pytest.approx(stored)


def test_an_unticked_count_check_ignores_its_tolerance(app, app_engine):
    pid = _setup(app)
    app.checkbox(key=f"p{pid}_count_check").uncheck()
    app.number_input(key=f"p{pid}_count_tolerance").set_value(50.0)  # not used: no complaint
    _press(app, "Save")
    assert "Saved." in texts(app.success) and not app.error
    assert _settings(app_engine)["retire_count_tolerance"] is None


def test_create_refuses_a_value_out_of_range_and_creates_nothing(app, app_engine):
    _setup(app)
    app.text_input(key="new_name").input("Lab 8")
    app.number_input(key="new_gold").set_value(1.5)
    app.number_input(key="new_target").set_value(0)
    app.button[0].click().run()  # Create
    no_exception(app)
    assert ('Nothing was created. "Target runs per image" must be a whole number from 1 to 1000; you typed 0. '
            '"Gold rate" must be a number from 0 to 1; you typed 1.5.') in texts(app.error)
    assert _settings(app_engine, "Lab 8") is None


# --------------------------------------------------------------------------- uploads kept after an import


def test_images_and_expert_cells_stay_chosen_after_a_refused_import(app, app_engine):
    """With ``clear_on_submit`` the browser cleared the uploaders after each import and ignored
    the same file chosen again ("Choose an expert cells file first."), as it did for the click
    file before; AppTest does not emulate the clearing, so the forms are checked for it, then
    the refused expert-cells file is imported again, unchanged, once its image exists."""
    pid = _setup(app)
    forms = {block.proto.form.form_id: block.proto.form.clear_on_submit for block in app.get("form")}
    assert {name: forms[name] for name in ("upload_images", "upload_gold", "upload_clicks")} == {
        "upload_images": False, "upload_gold": False, "upload_clicks": False}

    gold = b"image,x,y,label\nnew.png,10,12,alive\n"
    app.file_uploader(key="upload_gold").set_value(("gold.csv", gold, "text/csv"))
    _press(app, "Import expert cells")
    assert "no image named 'new.png'" in texts(app.error)
    app.file_uploader(key="upload_images").set_value([("new.png", _png(5), "image/png")])
    _press(app, "Import")
    assert "1 image(s) imported" in texts(app.success)
    _press(app, "Import expert cells")  # the same file, still chosen
    assert "Choose an expert cells file first." not in texts(app.warning) and not app.error
    with Session(app_engine) as session:
        cells = session.scalars(select(GoldCell).join(Image).where(Image.project_id == pid,
                                                                    Image.name == "new.png")).all()
    assert [(c.x, c.y, c.label) for c in cells] == [(10.0, 12.0, "alive")]


# --------------------------------------------------------------------------- settings that contradict each other


def test_save_refuses_target_runs_above_the_maximum_unless_there_is_none(app, app_engine):
    pid = _setup(app)
    before = _settings(app_engine)
    app.number_input(key=f"p{pid}_target").set_value(20)
    app.number_input(key=f"p{pid}_max_runs").set_value(10)
    _press(app, "Save")
    assert MAX_BELOW_TARGET in texts(app.error)
    assert "Saved." not in texts(app.success) and _settings(app_engine) == before
    app.number_input(key=f"p{pid}_max_runs").set_value(0)  # no maximum: any target
    _press(app, "Save")
    assert "Saved." in texts(app.success) and not app.error
    after = _settings(app_engine)
    assert (after["target_runs_per_image"], after["retire_max_runs"]) == (20, None)


@pytest.mark.parametrize(("fields", "message"), [
    ({"min_runs": 5, "max_runs": 3}, MAX_BELOW_MIN),
    ({"target": 20, "max_runs": 10}, MAX_BELOW_TARGET),
])
def test_create_says_contradictory_settings_in_the_forms_words(app, app_engine, fields, message):
    """The page showed the library's "retirement max_runs (3) must be ≥ min_runs (5), or None:
    retire_max_runs = 3 (project setting) ...", with internal names, and on Create no project
    setting existed yet."""
    _setup(app)
    app.text_input(key="new_name").input("Lab 8")
    for field, value in fields.items():
        app.number_input(key=f"new_{field}").set_value(value)
    app.button[0].click().run()  # Create
    no_exception(app)
    error = texts(app.error)
    assert message in error
    assert not any(word in error for word in ("None", "project setting", "retire_", "max_runs"))
    assert _settings(app_engine, "Lab 8") is None


@pytest.mark.parametrize(("changes", "low", "high", "match"), [
    ({"retire_min_runs": 5, "retire_max_runs": 3}, ("retire_max_runs", 3), ("retire_min_runs", 5),
     r"retire_max_runs = 3 \(project setting\) is below retire_min_runs = 5 \(project setting\)"),
    ({"target_runs_per_image": 20, "retire_max_runs": 10}, ("retire_max_runs", 10), ("target_runs_per_image", 20),
     "target_runs_per_image = 20 is above retire_max_runs = 10: images retire after 10 runs"),
    ({"target_runs_per_image": 11}, ("retire_max_runs", 10), ("target_runs_per_image", 11),
     r"retire_max_runs = 10 \(the default\)"),
])
def test_the_workflow_refuses_contradictory_settings_on_update_and_create(app_engine, changes, low, high, match):
    """One rule for the page and the Python API (the CLI sets no project settings)."""
    from cellspot.workflows import dashboard as d

    with Session(app_engine) as session:
        project = session.scalars(select(Project).order_by(Project.id)).first()
        before = dict(project.settings)
        with pytest.raises(d.ConflictingProjectSettingsError, match=match) as refused:
            d.update_project_settings(session, project, **changes)
        assert (refused.value.low, refused.value.high) == (low, high) and "None" not in str(refused.value)
        assert project.settings == before
        with pytest.raises(d.ConflictingProjectSettingsError):
            d.create_project(session, "Lab 8", **changes)
        # a maximum switched off agrees with any target and minimum
        d.update_project_settings(session, project, **{**changes, "retire_max_runs": None})
        d.update_project_settings(session, project, target_runs_per_image=10, retire_max_runs=10)  # equal: fine


@pytest.mark.parametrize(("settings", "overrides", "match"), [
    ({"retire_min_runs": 5, "retire_max_runs": 3}, {},
     r"retire_max_runs = 3 \(project setting\) is below retire_min_runs = 5 \(project setting\); raise "
     r"retire_max_runs, lower retire_min_runs, or switch the maximum off \(no maximum\)"),
    ({"retire_min_runs": 5}, {"max_runs": 3}, r"retire_max_runs = 3 \(given\)"),
])
def test_the_library_error_names_the_settings_without_none(settings, overrides, match):
    from cellspot.active.retirement import MaxBelowMinRunsError, RetirementPolicy

    with pytest.raises(MaxBelowMinRunsError, match=match) as refused:
        RetirementPolicy.from_settings(settings, **overrides)
    assert "None" not in str(refused.value)
    assert (refused.value.max_runs, refused.value.min_runs) == (3, 5)
    with pytest.raises(MaxBelowMinRunsError) as built:
        RetirementPolicy(min_runs=5, max_runs=3)
    assert "None" not in str(built.value)


# --------------------------------------------------------------------------- project names


@pytest.mark.parametrize(("typed", "stored", "said"), [
    ("  spaced  ", "spaced", "Project 'spaced' created (spaces around the name removed)."),
    ("Lab\t  9 ", "Lab 9", "Project 'Lab 9' created (spaces around the name removed; tabs, line breaks and runs "
                           "of spaces inside the name made one space)."),
    ("Lab 10", "Lab 10", "Project 'Lab 10' created."),
])
def test_create_tidies_spaces_in_the_name_and_says_so(app, app_engine, typed, stored, said):
    """The page silently made 'spaced' of "  spaced  " (which the CLI's --project refuses)."""
    _setup(app)
    app.text_input(key="new_name").input(typed)
    app.button[0].click().run()  # Create
    no_exception(app)
    assert said in texts(app.success)
    assert _settings(app_engine, stored) is not None


@pytest.mark.parametrize(("typed", "tidy", "note"), [
    ("lab", "lab", ""),
    (" lab\n", "lab", "spaces around the name removed"),
    ("a \t b", "a b", "tabs, line breaks and runs of spaces inside the name made one space"),
])
def test_tidy_spaces_and_its_note(typed, tidy, note):
    from cellspot.names import tidy_spaces, tidying_note

    assert (tidy_spaces(typed), tidying_note(typed)) == (tidy, note)

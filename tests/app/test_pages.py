"""One ``streamlit.testing.v1.AppTest`` test (or a small table of them) per page of the app, on a
seeded temporary store (see conftest.py): what a student or researcher does, and what the
store holds afterwards."""

from __future__ import annotations

import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_testkit import (
    APP_SCRIPT,
    CLASS_CODE,
    PASSWORD,
    REPO,
    click_image,
    count,
    join,
    login,
    no_exception,
    reload,
    start_labelling,
    texts,
    titles,
)
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cellspot.active.retirement import SETTING_KEYS, RetirementPolicy
from cellspot.active.scheduler import DEFAULT_LEASE_SECONDS
from cellspot.store.models import Annotator, Click, GoldCell, Image, Project, TaskRun

RESEARCHER_PAGES = ["class_view", "review", "results", "models", "rounds", "setup", "export"]


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- join


def test_join_creates_the_student_and_opens_the_tutorial(app, app_engine):
    join(app, code=" demo ", nickname="  Ana  ")
    assert app.session_state["role"] == "student"
    assert "How to spot cells" in titles(app)
    assert app.query_params["class"] == CLASS_CODE and app.query_params["nick"] == "Ana"
    assert count(app_engine, Annotator, Annotator.nickname == "Ana", Annotator.role == "student") == 1


def test_joining_with_a_nickname_that_has_work_says_welcome_back(app, app_engine):
    with Session(app_engine) as session:
        nickname, class_code, runs = session.execute(
            select(Annotator.nickname, Annotator.class_code, func.count(TaskRun.id))
            .join(TaskRun, TaskRun.annotator_id == Annotator.id)
            .where(Annotator.role == "student").group_by(Annotator.id).limit(1)).one()
    assert runs > 0
    join(app, code=class_code, nickname=nickname)
    assert (f"Welcome back, {nickname}: the {runs} image(s) labelled with this nickname in class {class_code} "
            "count as yours. Not you? Press Leave") in texts(app.info)
    app.button(key="skip").click().run()
    assert "welcome_back" not in app.session_state


def test_a_new_nickname_gets_no_welcome_back(app):
    join(app, nickname="zed")
    assert "Welcome back" not in texts(app.info)


@pytest.mark.parametrize(("code", "nickname", "message"), [
    ("NOPE", "ana", "no class has the code"),
    ("", "ana", "class code is empty"),
    (CLASS_CODE, "   ", "nickname is empty"),
    (CLASS_CODE, "a\x07b", "control characters"),
    (CLASS_CODE, "evil\u202eright-to-left", "control characters"),  # a bidi override is still refused
])
def test_join_refuses_bad_input_with_a_message(app, code, nickname, message):
    join(app, code=code, nickname=nickname)
    assert "role" not in app.session_state
    assert message in texts(app.error).lower()


def test_the_error_keeps_the_case_of_the_code(app):
    join(app, code="NOPE", nickname="ana")
    assert "No class has the code 'NOPE'" in texts(app.error)


@pytest.mark.parametrize("nickname", ["\U0001f469\u200d\U0001f52c Ana", "**md** $x$ <b>b</b>"])
def test_a_nickname_shows_as_typed(app, nickname):
    start_labelling(app, nickname=nickname)
    assert app.session_state["role"] == "student"
    student_line = next(m.value for m in app.markdown if "· class" in str(m.value))
    escaped = student_line.split("**")[1]  # the nickname between the bold markers, escaped
    assert escaped.replace("\\", "") == nickname  # every markdown character escaped, nothing else changed


def test_a_reloaded_tab_rejoins_from_the_url(app):
    app.query_params["class"] = CLASS_CODE
    app.query_params["nick"] = "ana"
    app.run()
    no_exception(app)
    assert app.session_state["role"] == "student"
    assert app.session_state["tutorial_done"] is True  # straight back to labelling


# --------------------------------------------------------------------------- tutorial


def test_tutorial_shows_alive_and_dead_examples_and_can_be_skipped(app):
    join(app)
    captions = " ".join(c for img in app.image for c in img.captions)
    assert "Alive" in captions and "Dead" in captions
    # one wrapping row of small crops (in columns a phone stacked them at full width)
    assert len(app.image) == 1 and len(app.image[0].captions) >= 2
    app.button(key="skip").click().run()
    no_exception(app)
    assert app.session_state["tutorial_done"] is True
    assert app.session_state["task"] is not None  # the label page picked an image


# --------------------------------------------------------------------------- label


@pytest.mark.parametrize(("button", "label"), [("label-dead", "dead"), ("label-not_sure", "not_sure"),
                                               ("label-alive", "alive")])
def test_label_buttons_change_the_current_label(app, button, label):
    start_labelling(app)
    app.button(key=button).click().run()
    assert app.session_state["current_label"] == label
    assert app.button(key=button).proto.type == "primary"
    assert f"Label: **{app.button(key=button).label}**" in texts(app.markdown)
    # no tooltip on the buttons tapped all the time: on a tablet it stayed and covered the next one
    for key in ("label-alive", "label-dead", "label-not_sure", "zoom_in", "zoom_out"):
        assert not app.button(key=key).help, key


@pytest.mark.parametrize(("zoom", "shown_width", "display", "expected"), [
    (1, 384, (100, 50), (100.0, 50.0)),          # shown at original size: pixel for pixel
    (1, 768, (201, 101), (100.25, 50.25)),       # shown twice as large
    (1, 192, (50, 25), (100.5, 50.5)),           # shown at half size
    (2, 768, (0, 0), (96.0, 72.0)),              # zoom 2 around the centre: window starts at (96, 72)
    (4, 768, (767, 575), (239.0, 179.0)),        # zoom 4: a 96x72 window from (144, 108), last pixel
])
def test_a_click_places_a_mark_at_the_original_pixel(app, zoom, shown_width, display, expected):
    start_labelling(app)
    app.session_state["zoom"] = zoom
    app.run()
    task = app.session_state["task"]
    assert (task["width"], task["height"]) == (384, 288)
    click_image(app, *display, shown_width=shown_width, stamp=1)
    (x, y, label), = app.session_state["marks"]
    assert (x, y) == pytest.approx(expected, abs=0.01)
    assert label == "alive"
    click_image(app, *display, shown_width=shown_width, stamp=1)  # the same click again: used once
    assert len(app.session_state["marks"]) == 1


def test_clicking_a_mark_relabels_or_removes_it_undo_and_clear(app):
    start_labelling(app)
    click_image(app, 100, 100, 384, stamp=1)
    click_image(app, 200, 150, 384, stamp=2)
    assert [m[2] for m in app.session_state["marks"]] == ["alive", "alive"]
    app.button(key="label-dead").click().run()
    click_image(app, 101, 99, 384, stamp=3)  # on the first mark, another label: relabel
    assert [m[2] for m in app.session_state["marks"]] == ["dead", "alive"]
    click_image(app, 100, 100, 384, stamp=4)  # again, same label: remove
    assert [m[:2] for m in app.session_state["marks"]] == [(200.0, 150.0)]
    assert "Alive **1** · ☒ Dead **0**" in texts(app.markdown)
    app.button(key="undo").click().run()
    assert [m[2] for m in app.session_state["marks"]] == ["dead", "alive"]
    app.button(key="clear").click().run()
    assert app.session_state["marks"] == []
    app.button(key="undo").click().run()
    assert len(app.session_state["marks"]) == 2


def test_images_that_cannot_be_shown_are_skipped_for_the_session(app, app_engine, store):
    """A missing file and corrupt ones: each one met is left out for the rest of the session
    (with a notice), so the page cannot go back and forth between them."""
    with Session(app_engine) as session:
        images = session.scalars(select(Image).order_by(Image.id)).all()
        paths = [store.home / i.path for i in images]
        broken = [(i.id, i.name, i.width, i.height) for i in images[:-1]]
        good = images[-1].id
    paths[0].unlink()
    for path in paths[1:-1]:
        path.write_bytes(b"not an image")
    start_labelling(app)
    no_exception(app)
    assert app.session_state["task"]["image_id"] == good
    for image_id, name, width, height in broken:  # a task on each broken image in turn
        app.session_state["task"] = {"image_id": image_id, "name": name, "width": width, "height": height,
                                     "client_key": f"app-test-{image_id}",
                                     "annotator_id": app.session_state["task"]["annotator_id"]}
        app.run()
        no_exception(app)
        # the page moved on (through any other broken image not met yet: the last one's notice shows)
        assert "cannot be shown; here is another one." in texts(app.error)
        assert image_id in app.session_state["unshowable"]
        assert app.session_state["task"]["image_id"] == good
    assert set(app.session_state["unshowable"]) == {b[0] for b in broken}


def test_submit_stores_one_run_and_a_repeat_stores_nothing(app, app_engine):
    start_labelling(app, nickname="bea")
    first = dict(app.session_state["task"])
    click_image(app, 10, 20, 384, stamp=1)
    app.button(key="label-dead").click().run()
    click_image(app, 300, 200, 384, stamp=2)
    app.button(key=f"submit-{first['client_key']}").click().run()
    no_exception(app)
    assert "Saved: 2 mark(s)" in texts(app.success) and not app.toast
    with Session(app_engine) as session:
        runs = session.scalars(select(TaskRun).where(TaskRun.client_key == first["client_key"])).all()
        assert len(runs) == 1 and runs[0].image_id == first["image_id"]
        clicks = session.execute(select(Click.x, Click.y, Click.label).where(Click.task_run_id == runs[0].id)
                                 .order_by(Click.click_index)).tuples().all()
    assert clicks == [(10.0, 20.0, "alive"), (300.0, 200.0, "dead")]
    second = app.session_state["task"]
    assert second["image_id"] != first["image_id"] and second["client_key"] != first["client_key"]
    assert app.session_state["marks"] == []
    # a repeat of the same submit (a rerun interrupted after the commit, a second click that
    # reached the server late): the same key stores nothing new
    app.session_state["task"] = first
    app.session_state["marks"] = [(10.0, 20.0, "alive")]
    app.run()
    app.button(key=f"submit-{first['client_key']}").click().run()
    assert "Already saved" in texts(app.success)
    assert count(app_engine, TaskRun, TaskRun.client_key == first["client_key"]) == 1
    assert count(app_engine, Click, Click.task_run_id == runs[0].id) == 2


def test_a_reload_keeps_the_image_and_the_unsubmitted_marks(app, app_engine):
    """The marks are kept in the store on every change: a reload (a new session) comes back to
    the same image with them, and the submit then stores them and drops the draft."""
    start_labelling(app, nickname="rey")
    task = dict(app.session_state["task"])
    click_image(app, 10, 20, 384, stamp=1)
    app.button(key="label-dead").click().run()
    click_image(app, 300, 200, 384, stamp=2)
    for _ in range(3):  # every reload, not only the first
        reloaded = reload("rey")
        assert reloaded.session_state["task"]["image_id"] == task["image_id"]
        assert reloaded.session_state["marks"] == [(10.0, 20.0, "alive"), (300.0, 200.0, "dead")]
        assert "Your 2 unsubmitted mark(s) on this image are back." in texts(reloaded.info)
    # a change in the new session is kept as well (Clear, then Undo of it, then a new mark)
    reloaded.button(key="clear").click().run()
    assert reload("rey").session_state["marks"] == []
    reloaded.button(key="undo").click().run()
    click_image(reloaded, 50, 60, 384, stamp=3)
    assert reload("rey").session_state["marks"] == [(10.0, 20.0, "alive"), (300.0, 200.0, "dead"),
                                                      (50.0, 60.0, "alive")]
    new_key = reloaded.session_state["task"]["client_key"]
    reloaded.button(key=f"submit-{new_key}").click().run()
    assert "Saved: 3 mark(s)." in texts(reloaded.success)
    with Session(app_engine) as session:
        run = session.scalars(select(TaskRun).where(TaskRun.client_key == new_key)).one()
        assert run.image_id == task["image_id"]
    after = reload("rey")  # the draft went with the submit: a new image, no marks, no notice
    assert after.session_state["task"]["image_id"] != task["image_id"] and after.session_state["marks"] == []
    assert not after.info


def test_a_reload_before_the_first_mark_keeps_the_image(app):
    start_labelling(app, nickname="una")
    shown = app.session_state["task"]["image_id"]
    for _ in range(3):
        reloaded = reload("una")
        assert reloaded.session_state["task"]["image_id"] == shown and reloaded.session_state["marks"] == []
        assert not reloaded.info  # nothing came back: no notice


def test_a_second_tab_submit_says_its_marks_were_dropped(app, app_engine):
    start_labelling(app, nickname="kim")
    click_image(app, 10, 20, 384, stamp=1)
    click_image(app, 100, 120, 384, stamp=2)
    other = reload("kim")  # the same image (the draft), its own client key
    assert other.session_state["task"]["image_id"] == app.session_state["task"]["image_id"]
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()
    assert "Saved: 2 mark(s)." in texts(app.success)
    click_image(other, 300, 200, 384, stamp=3)
    other.button(key=f"submit-{other.session_state['task']['client_key']}").click().run()
    no_exception(other)
    assert ("Not saved: you had already submitted this image (2 mark(s)) in another tab or device; "
            "the marks here were dropped.") in texts(other.warning)
    assert not other.success
    assert count(app_engine, TaskRun, TaskRun.annotator_id == app.session_state["annotator_id"]) == 1


def test_a_stale_tab_cannot_replace_the_draft_of_the_current_image(app):
    """Tab B stays on an image tab A submitted; a mark placed in B is not kept (and B is told at
    once), so A's marks on its next image survive a reload."""
    start_labelling(app, nickname="old")
    stale = reload("old")
    first = app.session_state["task"]["image_id"]
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()  # no marks: confirm
    assert app.session_state["task"]["image_id"] != first
    click_image(app, 30, 40, 384, stamp=1)
    click_image(stale, 200, 100, 384, stamp=2)  # on the image already submitted
    assert "You already submitted this image in another tab or device" in texts(stale.warning)
    reloaded = reload("old")
    assert reloaded.session_state["task"]["image_id"] == app.session_state["task"]["image_id"]
    assert reloaded.session_state["marks"] == [(30.0, 40.0, "alive")]


def test_every_new_image_starts_unzoomed(app):
    start_labelling(app, nickname="zed")
    app.button(key="zoom_in").click().run()
    app.button(key="zoom_in").click().run()
    assert app.session_state["zoom"] == 4
    click_image(app, 10, 20, 384, stamp=1)
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()
    assert app.session_state["zoom"] == 1
    assert "zoom" not in texts(app.caption)


def test_a_double_click_places_one_mark(app):
    """The second half of a double click (within DOUBLE_CLICK_MS, on the same spot) would remove
    the mark just placed; it is ignored. A second click later on the mark still removes it."""
    start_labelling(app, nickname="dbl")
    click_image(app, 100, 100, 384, stamp=10.0)
    click_image(app, 101, 100, 384, stamp=10.12)
    assert [m[:2] for m in app.session_state["marks"]] == [(100.0, 100.0)]
    click_image(app, 200, 100, 384, stamp=10.2)  # a quick click elsewhere is a new mark
    assert len(app.session_state["marks"]) == 2
    click_image(app, 100, 100, 384, stamp=12.0)  # later, on the first mark: removes it
    assert [m[:2] for m in app.session_state["marks"]] == [(200.0, 100.0)]


def test_an_empty_submit_asks_first_and_stores_on_the_second_press(app, app_engine):
    start_labelling(app, nickname="dot")
    task = dict(app.session_state["task"])
    key = f"submit-{task['client_key']}"
    app.button(key=key).click().run()
    no_exception(app)
    assert count(app_engine, TaskRun, TaskRun.client_key == task["client_key"]) == 0
    assert app.session_state["task"]["client_key"] == task["client_key"]  # still the same image
    assert any("No marks. No cells on this image? Press **Submit with no cells**." in w.value for w in app.warning)
    assert app.button(key=key).label == "Submit with no cells"
    # a mark placed now is a normal submit again
    click_image(app, 10, 20, 384, stamp=1)
    assert app.button(key=key).label == "Submit" and not app.warning
    # taking the mark back does not re-arm the question by itself: the next press asks again
    app.button(key="undo").click().run()
    assert app.button(key=key).label == "Submit" and not app.warning
    app.button(key=key).click().run()
    assert count(app_engine, TaskRun, TaskRun.client_key == task["client_key"]) == 0
    assert app.button(key=key).label == "Submit with no cells"
    app.button(key=key).click().run()
    assert count(app_engine, TaskRun, TaskRun.client_key == task["client_key"]) == 1
    assert "Saved: 0 mark(s)" in texts(app.success)
    assert app.session_state["task"]["client_key"] != task["client_key"]


def test_a_gold_image_shows_feedback_after_submit(app, app_engine):
    start_labelling(app)
    with Session(app_engine) as session:
        gold_id = session.scalar(select(GoldCell.image_id).limit(1))
        image = session.get(Image, gold_id)
        cell = session.scalars(select(GoldCell).where(GoldCell.image_id == gold_id)).first()
        n_gold = count(app_engine, GoldCell, GoldCell.image_id == gold_id)
        task = {"image_id": image.id, "name": image.name, "width": image.width, "height": image.height,
                "client_key": "app-test-gold", "annotator_id": app.session_state["annotator_id"]}
    app.session_state["task"] = task
    app.session_state["current_label"] = cell.label
    app.session_state["marks"] = [(cell.x, cell.y, cell.label)]
    app.run()
    app.button(key="submit-app-test-gold").click().run()
    no_exception(app)
    feedback = [e.label for e in app.expander]
    assert any(f"you found 1 of {n_gold} cells" in label and f"{n_gold - 1} missed" in label for label in feedback)
    captions = {c for img in app.image for c in img.captions}
    assert "Your marks" in captions
    assert f"The expert's cells you missed or labelled differently ({n_gold - 1})" in captions
    assert "Saved: 1 mark(s). Check result below." in texts(app.success)


def test_when_nothing_is_left_the_student_is_told(app, app_engine):
    start_labelling(app)
    for _ in range(10):
        task = app.session_state["task"]
        if task is None:
            break
        app.button(key=f"submit-{task['client_key']}").click().run()  # no marks: asks first
        app.button(key=f"submit-{task['client_key']}").click().run()
        no_exception(app)
    assert "All done!" in titles(app)
    assert count(app_engine, TaskRun, TaskRun.annotator_id == app.session_state["annotator_id"]) >= 1


def test_a_class_with_nothing_open_does_not_say_all_done(app, app_engine):
    with Session(app_engine) as session:  # every image finished before this student came, no gold checks
        for image in session.scalars(select(Image)):
            image.status = "retired"
        for cell in session.scalars(select(GoldCell)):
            session.delete(cell)
        session.commit()
    start_labelling(app, nickname="late")
    no_exception(app)
    assert app.session_state["task"] is None
    assert "Nothing to label here yet" in titles(app) and "All done!" not in titles(app)


def test_leave_forgets_the_student(app):
    start_labelling(app)
    app.switch_page("views/leave.py").run()
    # a page change keeps the class and nickname in the URL (a reload carries on labelling)
    assert (app.query_params.get("class"), app.query_params.get("nick")) == (CLASS_CODE, "ana")
    app.button[0].click().run()
    no_exception(app)
    assert "role" not in app.session_state and "task" not in app.session_state
    assert "class" not in app.query_params and "nick" not in app.query_params
    assert "Cell spotting" in titles(app)


# --------------------------------------------------------------------------- access control


@pytest.mark.parametrize("page", RESEARCHER_PAGES)
@pytest.mark.parametrize(("who", "offered"), [
    ("anonymous", {"join.py", "login.py"}),
    ("student", {"tutorial.py", "label.py", "leave.py"}),
])
def test_researcher_pages_are_out_of_reach_without_the_password(app, page, who, offered):
    """The navigation of a session without the password does not even register them."""
    if who == "student":
        start_labelling(app)
    else:
        app.run()
    with pytest.raises(ValueError, match="Could not find a navigation page") as refused:
        app.switch_page(f"views/{page}.py")
    known = set(re.findall(r"views/(\w+\.py)", str(refused.value).split("Known pages:")[1]))
    assert known == offered


@pytest.mark.parametrize("page", RESEARCHER_PAGES)
def test_researcher_pages_check_the_role_themselves(app, page):
    """Even when a page is run directly (not through the navigation), it shows nothing."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(REPO / "app" / "views" / f"{page}.py"), default_timeout=30).run()
    assert "This page is for researchers" in texts(at.error)
    assert not at.metric and not at.dataframe


def test_wrong_password_is_refused_and_slowed_down(app):
    login(app, "not the password")
    assert "Wrong password" in texts(app.error)
    assert "role" not in app.session_state
    login(app, PASSWORD)  # at once: refused without being checked
    assert "Wrong passwords slow the next attempt down: try again in 1 s." in texts(app.error)
    assert "role" not in app.session_state
    time.sleep(0.6)
    login(app, PASSWORD)
    assert app.session_state["role"] == "researcher"
    assert "Class" in titles(app)


def test_the_password_is_never_echoed(app):
    login(app, "hunter2-typo")
    rendered = " ".join(str(e.value) for e in (*app.error, *app.markdown, *app.warning, *app.success))
    assert "hunter2" not in rendered


def test_without_a_configured_password_nobody_logs_in(app, monkeypatch):
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD")
    app.run()
    app.switch_page("views/login.py").run()
    assert "No researcher password is configured" in texts(app.warning)
    assert not app.text_input


def test_the_password_can_come_from_streamlit_secrets(app, monkeypatch):
    monkeypatch.delenv("CELLSPOT_RESEARCHER_PASSWORD")
    app.secrets["researcher_password"] = "from secrets"
    login(app, "from secrets")
    assert app.session_state["role"] == "researcher"


# --------------------------------------------------------------------------- researcher pages


def test_class_view_shows_the_live_numbers(app, app_engine):
    start_labelling(app, nickname="cleo")
    task = app.session_state["task"]
    click_image(app, 50, 50, 384, stamp=1)
    app.button(key=f"submit-{task['client_key']}").click().run()
    app.switch_page("views/leave.py").run()
    app.button[0].click().run()
    login(app)
    no_exception(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Students active"].endswith("/ 3")  # 2 simulated students + cleo
    assert metrics["Images unseen"] == "0"
    students = app.dataframe[0].value
    assert "cleo" in set(students["nickname"])
    assert int(students.loc[students["nickname"] == "cleo", "runs"].iloc[0]) == 1
    n_runs = count(app_engine, TaskRun)
    assert f"{n_runs} runs" in texts(app.caption)
    app.button[0].click().run()  # Recompute consensus
    assert "Snapshot" in texts(app.success)


def test_review_adjudication_stores_expert_cells(app, app_engine):
    login(app)
    app.switch_page("views/review.py").run()
    no_exception(app)
    image_id = review_picker(app).value
    cells = app.dataframe[-1].value
    target = cells.iloc[0]
    key = f"review-canvas-{image_id}"
    view = app.session_state[f"{key}.view"]
    app.session_state[key] = {"x": target["x"], "y": target["y"], "width": view.width,
                              "height": view.height, "unix_time": 7}
    app.run()
    # named by its id, as in the tables' "cell" column (not by its row number)
    assert f"cell #{target['cell']}" in texts(app.markdown) and target["cell"] != 0
    app.radio(key="review_action").set_value("relabel").run()
    new_label = "dead" if target["label"] == "alive" else "alive"
    app.radio(key="review_label").set_value(new_label).run()
    app.button(key="review_apply").click().run()
    no_exception(app)
    assert "Relabel the cell: done" in texts(app.success)
    with Session(app_engine) as session:
        expert = session.scalars(select(GoldCell).where(GoldCell.image_id == image_id)).all()
    assert len(expert) >= len(cells) - (1 if cells["from_gold"].all() else 0)
    moved = [c for c in expert if abs(c.x - target["x"]) < 1e-6 and abs(c.y - target["y"]) < 1e-6]
    assert moved and moved[0].label == new_label and moved[0].source == "adjudication"


def review_picker(app):
    """The Review page's image picker (its key changes with the listing it shows)."""
    return next(box for box in app.selectbox if (box.key or "").startswith("review_image-"))


def open_review(app):
    """The Review page of a researcher at its first image: ``(canvas key, view, cells table)``."""
    login(app)
    app.switch_page("views/review.py").run()
    key = f"review-canvas-{review_picker(app).value}"
    return key, app.session_state[f"{key}.view"], app.dataframe[-1].value


def pick_on_review(app, image_id: int, x: float, y: float, stamp: int) -> None:
    """A click at image pixel (x, y) on the Review page's image, shown at its own size."""
    key = f"review-canvas-{image_id}"
    view = app.session_state[f"{key}.view"]
    app.session_state[key] = {"x": x, "y": y, "width": view.width, "height": view.height, "unix_time": stamp}
    app.run()


def apply_on_review(app, action: str) -> None:
    app.radio(key="review_action").set_value(action).run()
    app.button(key="review_apply").click().run()
    no_exception(app)


def test_review_apply_needs_a_cell_except_to_add_one(app, app_engine):
    key, view, cells = open_review(app)
    far = max(((x, y) for x in (2.0, view.width / 2, view.width - 2) for y in (2.0, view.height / 2, view.height - 2)),
              key=lambda p: ((cells["x"] - p[0]) ** 2 + (cells["y"] - p[1]) ** 2).min())
    app.session_state[key] = {"x": far[0], "y": far[1], "width": view.width, "height": view.height, "unix_time": 8}
    app.run()
    assert "no cell there" in texts(app.markdown)
    for action in ("accept", "relabel", "delete"):
        app.radio(key="review_action").set_value(action).run()
        assert app.button(key="review_apply").disabled
        assert "needs a cell: click one on the image" in texts(app.caption)
    app.radio(key="review_action").set_value("add").run()
    assert not app.button(key="review_apply").disabled


@pytest.mark.parametrize(("shown_width", "picked"), [(192, True), (768, False)])
def test_review_picks_a_cell_by_its_marker_size_on_screen(app, shown_width, picked):
    """A click 12 image px from a cell: on the marker when the image is shown at half size
    (12 image px = 6 screen px), beside it when shown at twice the size (24 screen px)."""
    key, view, cells = open_review(app)
    others = cells.drop(index=cells.index[0])
    x, y = float(cells["x"].iloc[0]) + 12.0, float(cells["y"].iloc[0])
    if len(others):  # the click must not be near another cell
        assert (((others["x"] - x) ** 2 + (others["y"] - y) ** 2) ** 0.5).min() > 40
    f = shown_width / view.width
    app.session_state[key] = {"x": x * f, "y": y * f, "width": shown_width, "height": view.height * f,
                              "unix_time": 5}
    app.run()
    no_exception(app)
    assert (" · cell #" in texts(app.markdown)) is picked
    assert ("no cell there" in texts(app.markdown)) is not picked


def test_review_accept_the_whole_image_then_back_to_consensus(app, app_engine):
    login(app)
    app.switch_page("views/review.py").run()
    image_id = review_picker(app).value
    n_cells = len(app.dataframe[-1].value)
    app.button(key="review_accept_all").click().run()
    no_exception(app)
    assert count(app_engine, GoldCell, GoldCell.image_id == image_id) == n_cells
    assert "expert cells (they override consensus)" in texts(app.markdown)
    app.button(key="review_aggregate").click().run()  # the snapshot now holds them as the image's cells
    no_exception(app)
    assert "Snapshot" in texts(app.success) or "kept it" in texts(app.success)  # shown after the rerun
    # its confidence is 1.00 now, so it moved in the least-certain-first list: still the one shown
    picker = review_picker(app)
    assert picker.value == image_id and "confidence 1.00" in picker.format_func(image_id)
    app.button(key="review_clear").click().run()
    no_exception(app)
    assert review_picker(app).value == image_id
    assert f"Removed {n_cells} expert cells and recomputed consensus" in texts(app.success)
    assert count(app_engine, GoldCell, GoldCell.image_id == image_id) == 0
    # the page shows the crowd's cells of the new snapshot, not the expert cells the old one held
    cells = app.dataframe[-1].value
    assert len(cells) and set(cells["source"]) == {"consensus"}
    assert "expert cells (they override consensus)" not in texts(app.markdown)


def test_review_deleting_the_only_cell_leaves_the_image_empty_until_back_to_consensus(app, app_engine):
    """The deleted cell came back at once ("1 consensus cells"): an empty expert set gave the
    image back to consensus."""
    from cellspot.workflows.review import adjudicate

    login(app)
    app.switch_page("views/review.py").run()
    image_id = review_picker(app).value
    with Session(app_engine) as session:  # every cell of the image deleted but one, by the workflow
        cells = app.dataframe[-1].value
        for row in cells.iloc[1:].itertuples():
            adjudicate(session, image_id, "delete", row.x, row.y)
        session.commit()
    app.run()
    last = app.dataframe[-1].value.iloc[0]
    pick_on_review(app, image_id, last["x"], last["y"], stamp=11)
    apply_on_review(app, "delete")
    assert "the image has no cells now: an expert decision" in texts(app.success)
    assert "an expert found none" in texts(app.markdown) and app.dataframe[-1].value.empty
    button = app.button(key="review_accept_all")
    assert button.label == "Confirm no cells" and button.disabled  # already decided
    app.button(key="review_aggregate").click().run()
    no_exception(app)
    assert app.dataframe[-1].value.empty  # still empty after a recompute
    app.button(key="review_clear").click().run()
    no_exception(app)
    assert len(app.dataframe[-1].value) and "an expert found none" not in texts(app.markdown)
    assert 'Removed the expert\'s "no cells" and recomputed consensus' in texts(app.success)  # not "0 expert cells"


@pytest.mark.parametrize("whole", [False, True])
def test_review_warns_before_uncertain_cells_become_expert_cells(app, app_engine, whole):
    """The first decision copies every consensus cell into the expert set, a 0.47 one too
    (``whole``: "Accept all cells", whose message said nothing of them)."""
    from cellspot.store.models import ConsensusCell

    login(app)
    app.switch_page("views/review.py").run()
    image_id = review_picker(app).value
    cells = app.dataframe[-1].value
    assert len(cells) >= 2 and set(cells["source"]) == {"consensus"}
    with Session(app_engine) as session:  # one cell of the image becomes uncertain
        session.get(ConsensusCell, int(cells["cell"].iloc[1])).confidence = 0.47
        session.commit()
    app.run()
    no_exception(app)
    n_unsure = int((app.dataframe[-1].value["confidence"] < 0.5).sum())
    assert n_unsure >= 1
    assert f"{n_unsure} of them with a consensus confidence below 0.5" in texts(app.warning)
    if whole:
        app.button(key="review_accept_all").click().run()
        no_exception(app)
    else:
        pick_on_review(app, image_id, cells["x"].iloc[0], cells["y"].iloc[0], stamp=12)
        apply_on_review(app, "accept")
    assert f"copied from consensus first, {n_unsure} of them uncertain)" in texts(app.success)
    assert "consensus confidence below" not in texts(app.warning)  # expert cells now: nothing to warn of


def test_review_add_on_a_cell_is_refused(app, app_engine):
    key, view, cells = open_review(app)
    x, y = float(cells["x"].iloc[0]) + 2.0, float(cells["y"].iloc[0])  # on the first cell's marker
    app.session_state[key] = {"x": x, "y": y, "width": view.width, "height": view.height, "unix_time": 9}
    app.run()
    app.radio(key="review_action").set_value("add").run()
    no_exception(app)
    assert app.button(key="review_apply").disabled
    assert "relabel or delete it, or click an empty place to add a cell there" in texts(app.caption)


def test_back_to_consensus_asks_before_deleting_imported_expert_cells(app, app_engine):
    login(app)
    app.switch_page("views/review.py").run()
    image_id = review_picker(app).value
    with Session(app_engine) as session:
        session.add_all([GoldCell(image_id=image_id, x=5.0, y=6.0, label="dead", source="import:truth.csv"),
                         GoldCell(image_id=image_id, x=20.0, y=9.0, label="alive", source="adjudication")])
        session.commit()
    app.run()
    app.button(key="review_clear").click().run()
    no_exception(app)
    assert "1 of this image's 2 expert cells were not decided here but imported (import:truth.csv)" in texts(
        app.warning)
    assert count(app_engine, GoldCell, GoldCell.image_id == image_id) == 2  # nothing deleted yet
    app.button(key="review_clear_cancel").click().run()
    assert count(app_engine, GoldCell, GoldCell.image_id == image_id) == 2
    assert "imported (import:truth.csv)" not in texts(app.warning)
    app.button(key="review_clear").click().run()
    app.button(key="review_clear_confirm").click().run()
    no_exception(app)
    assert "Removed 2 expert cells" in texts(app.success)
    assert count(app_engine, GoldCell, GoldCell.image_id == image_id) == 0


def test_results_show_counts_viability_and_conditions(app):
    login(app)
    app.switch_page("views/results.py").run()
    no_exception(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Images"] == "4"
    per_image, by_condition = app.dataframe[-1].value, app.dataframe[0].value
    assert len(per_image) == 4 and {"n_alive", "n_dead", "viability_pct"} <= set(per_image.columns)
    assert {"condition", "viability_pct"} <= set(by_condition.columns)
    assert {d.label for d in app.download_button} >= {"Download per image (CSV)"}


def test_results_say_which_consensus_they_count_and_when_it_is_behind(app, app_engine):
    login(app)
    app.switch_page("views/results.py").run()
    no_exception(app)
    assert re.search(r"From consensus snapshot \d+ of .* UTC, up to date with every click", texts(app.caption))
    assert not app.warning
    # a student submits: the counts shown are now behind the store, and the page says so
    student = reload("late")
    click_image(student, 10, 20, 384, stamp=1)
    student.button(key=f"submit-{student.session_state['task']['client_key']}").click().run()
    assert "Saved: 1 mark(s)." in texts(student.success)
    import streamlit as st

    st.cache_data.clear()  # the page's summaries live a few seconds (SUMMARY_TTL_S)
    app.run()
    assert "These counts are out of date: consensus snapshot" in texts(app.warning)
    app.button(key="results_aggregate").click().run()
    no_exception(app)
    assert re.match(r"Snapshot \d+: ", texts(app.success)) and not app.warning
    assert "up to date with every click" in texts(app.caption)


@pytest.mark.parametrize(("threshold", "name"), [
    (0.0, "demo-per-image.csv"), (0.95, "demo-per-image-min-confidence-0.95.csv"),
    (0.5, "demo-per-image-min-confidence-0.50.csv"),
])
def test_results_downloads_name_their_confidence_threshold(threshold, name):
    from appkit.researcher import csv_name

    assert csv_name("demo", "per-image", threshold) == name


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def test_setup_creates_a_project_sets_rules_and_imports(app, app_engine, tmp_path):
    login(app)
    app.switch_page("views/setup.py").run()
    no_exception(app)
    app.text_input(key="new_name").input("Lab 7")
    app.text_input(key="new_codes").input("bio7a, bio7b")
    app.button[0].click().run()  # Create
    no_exception(app)
    assert "Project 'Lab 7' created." in texts(app.success)
    with Session(app_engine) as session:
        project = session.scalar(select(Project).where(Project.name == "Lab 7"))
        assert project.settings["class_codes"] == ["BIO7A", "BIO7B"]
        # every retirement threshold is stored, at the RetirementPolicy defaults
        assert {k: project.settings[k] for k in SETTING_KEYS.values()} == {
            key: getattr(RetirementPolicy(), name) for name, key in SETTING_KEYS.items()}
    assert app.session_state["r_project_id"] == project.id

    # a class code that another project has is refused with a message
    app.text_input(key=f"p{project.id}_codes").input("DEMO")
    [b for b in app.button if b.label == "Save"][0].click().run()
    assert "DEMO" in texts(app.error) and "already belong" in texts(app.error)

    # upload: two good images, a corrupt one and a zip; the corrupt one is named, the others import
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("zipped.png", _png(3))
    app.file_uploader(key="upload_images").set_value([
        ("a.png", _png(1), "image/png"), ("b.png", _png(2), "image/png"),
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png"),
        ("more.zip", archive.getvalue(), "application/zip"),
    ])
    app.file_uploader(key="upload_meta").set_value(("meta.csv", b"image,condition\na.png,control\n", "text/csv"))
    [b for b in app.button if b.label == "Import"][0].click().run()
    no_exception(app)
    assert "3 image(s) imported" in texts(app.success)
    errors = texts(app.error)
    assert "broken.png" in errors and "cellspot-upload" not in errors
    with Session(app_engine) as session:
        names = set(session.scalars(select(Image.name).where(Image.project_id == project.id)))
        meta = session.scalar(select(Image.meta).where(Image.project_id == project.id, Image.name == "a.png"))
    assert names == {"a.png", "b.png", "zipped.png"}
    assert meta.get("condition") == "control"
    # the counts line is drawn after the import: it said "0 images" until the next rerun
    assert app.caption[0].value.startswith("3 images (0 retired)"), app.caption[0].value

    # a folder on the server
    folder = tmp_path / "server_images"
    folder.mkdir()
    (folder / "c.png").write_bytes(_png(4))
    app.text_input(key="folder_path").input(str(folder))
    [b for b in app.button if b.label == "Import"][1].click().run()
    no_exception(app)
    assert "1 image(s) imported" in texts(app.success)
    bars = [el.proto.text for el in app.get("progress")]
    assert "Imported 1 / 1: c.png" in bars, bars



def test_setup_says_the_name_a_project_was_created_under(app, app_engine):
    """A tab in the name was collapsed to a space, but the message showed the typed name."""
    login(app)
    app.switch_page("views/setup.py").run()
    app.text_input(key="new_name").input("Lab\t  9")
    app.button[0].click().run()
    no_exception(app)
    assert "Project 'Lab 9' created (tabs, line breaks and runs of spaces inside the name made one space)." \
        in texts(app.success)
    with Session(app_engine) as session:
        assert session.scalar(select(Project.name).where(Project.name.like("Lab%9"))) == "Lab 9"


def test_setup_shows_what_a_project_without_settings_really_gets(app, app_engine):
    """A project imported from the CLI has no settings: the form showed 5 runs per image and a
    gold rate of 0.1 while rounds used 3 and students got no gold, and Save stored the shown values."""
    from cellspot.active.rounds import DEFAULT_TARGET_RUNS
    from cellspot.store.queries import get_or_create_project
    from cellspot.workflows.classroom import DEFAULT_FEEDBACK_RADIUS, DEFAULT_GOLD_RATE

    with Session(app_engine) as session, session.begin():
        bare = get_or_create_project(session, "bare").id
    login(app)
    app.switch_page("views/setup.py").run()
    app.selectbox(key="r_project_pick").set_value(bare).run()
    no_exception(app)
    assert app.number_input(key=f"p{bare}_target").value == DEFAULT_TARGET_RUNS
    assert app.number_input(key=f"p{bare}_gold").value == DEFAULT_GOLD_RATE
    assert app.number_input(key=f"p{bare}_radius").value == DEFAULT_FEEDBACK_RADIUS


def test_setup_shows_names_in_its_messages_as_they_are_not_as_markdown(app, app_engine):
    """An image named ``**b** _i_ [l](x).png`` showed in bold and italics with a live link."""
    from appkit.roles import plain

    login(app)
    app.switch_page("views/setup.py").run()
    name = "**b** _i_ [l](x).png"
    app.file_uploader(key="upload_images").set_value([(name, b"\x89PNG\r\n\x1a\nnot really", "image/png")])
    [b for b in app.button if b.label == "Import"][0].click().run()
    no_exception(app)
    shown = "\n".join(str(e.value) for e in app.error)  # the markdown source
    assert plain(name) in shown, shown
    assert name not in shown


def test_setup_lists_each_problem_of_a_rejected_click_file_and_asks_for_an_empty_folder(app, app_engine, store):
    login(app)
    app.switch_page("views/setup.py").run()
    before = count(app_engine, Click)
    bad = b"image,annotator,x,y,label\nmissing.png,ana,1,2,alive\nmissing.png,ana,-5,2,alive\nmissing.png,bo,1,2,purple\n"
    app.file_uploader(key="upload_clicks").set_value(("clicks.csv", bad, "text/csv"))
    app.button(key="FormSubmitter:upload_clicks-Import clicks").click().run()
    no_exception(app)
    error = texts(app.error)
    head, _, listing = error.partition("\n\n")
    assert "clicks.csv" in head and "nothing was imported" in head
    items = listing.splitlines()
    assert len(items) >= 2 and all(item.startswith("- clicks.csv:") for item in items), error
    assert any(":3: x:" in item for item in items) and any(":4: label:" in item for item in items)
    assert count(app_engine, Click) == before
    # importing the valid rows: the rejected ones can be downloaded, naming the uploaded file
    with Session(app_engine) as session:
        image = session.scalars(select(Image).order_by(Image.id)).first()
        name = image.name
    good = bad.replace(b"missing.png", name.encode())
    app.file_uploader(key="upload_clicks").set_value(("clicks.csv", good, "text/csv"))
    app.checkbox(key="clicks_skip").check()
    app.button(key="FormSubmitter:upload_clicks-Import clicks").click().run()
    no_exception(app)
    assert count(app_engine, Click) == before + 1
    assert "2 rejected rows" in texts(app.warning)
    rejects = app.get("download_button")[-1]
    assert rejects.proto.label == "Download the rejected rows (CSV)"
    written, = Path(store.rejects_dir).glob("clicks-*-rejects.csv")
    assert set(pd.read_csv(written)["file"]) == {"uploaded clicks.csv"}  # not the deleted temporary copy
    app.text_input(key="folder_path").input("   ")
    [b for b in app.button if b.label == "Import"][1].click().run()
    assert "Enter the path of a folder, zip or image on the server." in texts(app.error)


def _demo_settings(engine) -> tuple[int, dict]:
    with Session(engine) as session:
        project = session.scalars(select(Project).order_by(Project.id)).first()
        return project.id, dict(project.settings or {})


def test_setup_saves_the_adaptive_retirement_thresholds(app, app_engine):
    login(app)
    app.switch_page("views/setup.py").run()
    no_exception(app)
    pid, before = _demo_settings(app_engine)
    app.number_input(key=f"p{pid}_min_runs").set_value(12)
    app.number_input(key=f"p{pid}_max_runs").set_value(20)
    app.number_input(key=f"p{pid}_min_cell_certainty").set_value(0.3)
    app.checkbox(key=f"p{pid}_count_check").uncheck()
    assert app.number_input(key=f"p{pid}_lease").value == DEFAULT_LEASE_SECONDS // 60
    app.number_input(key=f"p{pid}_lease").set_value(5)
    [b for b in app.button if b.label == "Save"][0].click().run()
    no_exception(app)
    assert "Saved." in texts(app.success) and not app.error
    _, after = _demo_settings(app_engine)
    assert after["retire_min_runs"] == 12 and after["retire_max_runs"] == 20
    assert after["lease_seconds"] == 300
    assert after["retire_min_cell_certainty"] == pytest.approx(0.3)
    assert "retire_count_tolerance" in after and after["retire_count_tolerance"] is None
    assert after["class_codes"] == before["class_codes"]  # the other settings are kept
    assert RetirementPolicy.from_settings(after) == RetirementPolicy(
        min_runs=12, max_runs=20, min_cell_certainty=0.3, count_tolerance=None,
        min_confidence=after["retire_min_confidence"])

    # 0 switches the maximum off; ticking the count check stores its tolerance
    app.number_input(key=f"p{pid}_max_runs").set_value(0)
    app.checkbox(key=f"p{pid}_count_check").check()
    app.number_input(key=f"p{pid}_count_tolerance").set_value(0.4)
    [b for b in app.button if b.label == "Save"][0].click().run()
    no_exception(app)
    _, after = _demo_settings(app_engine)
    assert "retire_max_runs" in after and after["retire_max_runs"] is None
    assert after["retire_count_tolerance"] == pytest.approx(0.4) and after["retire_min_runs"] == 12


def test_setup_refuses_a_maximum_below_the_minimum_runs(app, app_engine):
    login(app)
    app.switch_page("views/setup.py").run()
    no_exception(app)
    pid, before = _demo_settings(app_engine)
    app.number_input(key=f"p{pid}_min_runs").set_value(15)
    app.number_input(key=f"p{pid}_max_runs").set_value(10)
    app.number_input(key=f"p{pid}_min_cell_certainty").set_value(0.2)
    [b for b in app.button if b.label == "Save"][0].click().run()
    no_exception(app)
    errors = texts(app.error)
    assert ('"Retire after at most ... runs" (10) is below "Retire after at least ... runs" (15): raise the '
            "maximum, lower the minimum, or set the maximum to 0 for none.") in errors
    assert "Saved." not in texts(app.success)
    assert _demo_settings(app_engine) == (pid, before)  # nothing stored


def test_export_builds_a_downloadable_zip(app, store):
    login(app)
    app.switch_page("views/export.py").run()
    no_exception(app)
    app.button[0].click().run()  # Build the export
    no_exception(app)
    assert "Export ready" in texts(app.success)
    zips = list(store.exports_dir.glob("*.zip"))
    assert len(zips) == 1
    with zipfile.ZipFile(zips[0]) as zf:
        assert any(name.endswith("manifest.json") for name in zf.namelist())
    assert [d.label for d in app.download_button] == ["Download the zip"]


@pytest.mark.parametrize(("field", "value", "message"), [
    (0, 5000, "Nothing was built. Crop size must be from 1 to 1024 px; got 5000."),
    (1, 1.5, "Nothing was built. Minimum confidence must be from 0 to 1; got 1.5."),
    (2, -1, "Nothing was built. Split seed must be 0 or more; got -1."),
])
def test_export_says_what_is_wrong_with_a_value_out_of_range(app, store, field, value, message):
    login(app)
    app.switch_page("views/export.py").run()
    app.number_input[field].set_value(value)
    app.button[0].click().run()  # Build the export
    no_exception(app)
    assert message in texts(app.error)
    assert not list(store.exports_dir.glob("*.zip")) if store.exports_dir.exists() else True


def test_an_empty_password_is_asked_for_not_counted(app):
    login(app, "")
    assert "Enter the password." in texts(app.error)
    login(app, PASSWORD)  # at once: an empty field is no wrong password, nothing slows this down
    assert app.session_state["role"] == "researcher"


def test_logout_ends_the_researcher_session(app):
    login(app)
    app.switch_page("views/logout.py").run()
    app.button[0].click().run()
    assert "role" not in app.session_state and "researcher_ok" not in app.session_state
    assert "Cell spotting" in titles(app)


def test_leaving_gives_the_leased_image_back_to_the_round(app, app_engine):
    from cellspot.store.models import ImageLease
    from cellspot.workflows import rounds as wr

    with Session(app_engine) as session, session.begin():
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**(project.settings or {}), "gold_rate": 0.0}  # the queued image, not a check
        wr.open_new_round(session, "demo", strategy="crowd", top=1, target_runs=1)
    start_labelling(app, nickname="gina")
    annotator_id = app.session_state["annotator_id"]
    assert count(app_engine, ImageLease, ImageLease.annotator_id == annotator_id) == 1
    app.switch_page("views/leave.py").run()
    app.button[0].click().run()
    no_exception(app)
    # a classmate joining now gets that image at once, not after the lease expires
    assert count(app_engine, ImageLease, ImageLease.annotator_id == annotator_id) == 0


def test_the_progress_line_is_not_another_sessions_cached_one(app, app_engine, store):
    """The line is cached per browser session: a reload (a new session, its submit counter back
    at 0) must not get the line an earlier session cached for the same student."""
    from streamlit.testing.v1 import AppTest

    start_labelling(app, nickname="cara")
    for _ in range(2):
        task = app.session_state["task"]
        click_image(app, 10, 20, 384, stamp=1)
        app.button(key=f"submit-{task['client_key']}").click().run()
    assert "(2 in all)" in texts(app.markdown)
    again = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    again.secrets["unused"] = "tests use CELLSPOT_RESEARCHER_PASSWORD only"
    start_labelling(again, nickname="cara")
    assert "(2 in all)" in texts(again.markdown)

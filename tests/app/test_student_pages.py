"""The student pages (join, tutorial, label, leave) in the situations an audit in a real browser
found wrong: classmates spread over the images, marks on an image that closed meanwhile, two
students typing one nickname, a withdrawn class code, images that cannot be shown, long
nicknames, the check result after a gold image. ``AppTest`` on the seeded store (conftest.py)."""

from __future__ import annotations

from app_testkit import (
    CLASS_CODE,
    click_image,
    count,
    join,
    new_session,
    no_exception,
    reload,
    start_labelling,
    texts,
    titles,
)
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cellspot.store.models import Annotator, Click, GoldCell, Image, LabelDraft, Project, TaskRun

# --------------------------------------------------------------------------- helpers


def under_image_line(at) -> str:
    return next(str(m.value) for m in at.markdown if "left for you" in str(m.value))


# --------------------------------------------------------------------------- 1: spread


def test_classmates_joining_one_after_another_get_different_images(app, app_engine):
    """The audit: students joining within seconds all got the one image with the fewest runs.
    The image shown is held by the student's draft: the next classmate gets another one."""
    from cellspot.store import queries

    with Session(app_engine) as session, session.begin():  # work images only; one with fewer runs than the other
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**project.settings, "gold_rate": 0.0}
        gold = select(GoldCell.image_id)
        work = session.scalars(select(Image).where(Image.id.not_in(gold)).order_by(Image.id)).all()
        runs = {i.id: session.scalar(select(func.count()).select_from(TaskRun).where(TaskRun.image_id == i.id))
                for i in work}
        busiest = max(work, key=lambda i: runs[i.id])
        extra = queries.get_or_create_annotator(session, project, "extra", CLASS_CODE)
        queries.submit_task_run(session, busiest, extra, [], "extra-run")
    start_labelling(app, nickname="first")
    second = start_labelling(new_session(), nickname="second")
    assert app.session_state["task"]["image_id"] != second.session_state["task"]["image_id"]
    with Session(app_engine) as session:
        drafts = dict(session.execute(select(LabelDraft.annotator_id, LabelDraft.image_id)).tuples().all())
    assert drafts[app.session_state["annotator_id"]] == app.session_state["task"]["image_id"]


# --------------------------------------------------------------------------- 2: closed meanwhile


def _close(engine, image_id: int) -> None:
    """The researcher's "Recompute consensus" retired the image."""
    with Session(engine) as session, session.begin():
        session.execute(update(Image).where(Image.id == image_id).values(status="retired"))
        session.execute(GoldCell.__table__.delete().where(GoldCell.image_id == image_id))  # not a check image


def test_marks_on_an_image_that_closed_meanwhile_come_back_and_are_stored(app, app_engine):
    start_labelling(app, nickname="rita")
    task = dict(app.session_state["task"])
    click_image(app, 10, 20, stamp=1)
    click_image(app, 300, 200, stamp=2)
    _close(app_engine, task["image_id"])
    reloaded = reload("rita")
    assert reloaded.session_state["task"]["image_id"] == task["image_id"]
    assert reloaded.session_state["marks"] == [(10.0, 20.0, "alive"), (300.0, 200.0, "alive")]
    assert ("This image was closed meanwhile (the class has enough marks on it), but your 2 mark(s) on it "
            "are kept: finish it and press Submit.") in texts(reloaded.warning)
    assert count(app_engine, LabelDraft, LabelDraft.image_id == task["image_id"]) == 1  # not deleted
    key = reloaded.session_state["task"]["client_key"]
    reloaded.button(key=f"submit-{key}").click().run()
    no_exception(reloaded)
    assert "Saved: 2 mark(s)." in texts(reloaded.success)
    with Session(app_engine) as session:
        run = session.scalars(select(TaskRun).where(TaskRun.client_key == key)).one()
        assert run.image_id == task["image_id"]
        assert session.scalar(select(func.count()).select_from(Click).where(Click.task_run_id == run.id)) == 2


def test_an_empty_draft_on_an_image_that_closed_moves_on_without_a_notice(app, app_engine):
    start_labelling(app, nickname="noel")
    shown = app.session_state["task"]["image_id"]
    _close(app_engine, shown)
    reloaded = reload("noel")
    assert reloaded.session_state["task"]["image_id"] != shown
    assert not reloaded.warning and not reloaded.info


# --------------------------------------------------------------------------- 3: one nickname, two students


def test_a_nickname_someone_is_labelling_under_asks_before_showing_an_image(app, app_engine):
    """The audit: "Max" and "max" on two devices became one annotator, shared one draft and
    overwrote each other's marks, with no warning."""
    start_labelling(app, nickname="Max")
    click_image(app, 50, 60, stamp=1)
    mine = (app.session_state["task"]["image_id"], [(50.0, 60.0, "alive")])
    other = join(new_session(), nickname="max")
    assert "Someone is labelling as **Max** in class DEMO right now. Is that you" in texts(other.warning)
    assert "task" not in other.session_state  # nothing shown, nothing loaded yet
    other.switch_page("views/label.py").run()  # the page menu does not get round the question
    no_exception(other)
    assert "Someone is labelling as **Max**" in texts(other.warning) and "task" not in other.session_state
    other.button(key="same_student_no").click().run()
    no_exception(other)
    assert "role" not in other.session_state and "Cell spotting" in titles(other)
    assert other.text_input(key="join_code").value == CLASS_CODE and other.text_input(key="join_nickname").value == ""
    assert "Max is taken in this class right now: pick another nickname." in texts(other.warning)
    with Session(app_engine) as session:  # Max's draft is untouched
        draft = session.get(LabelDraft, app.session_state["annotator_id"])
        assert (draft.image_id, [tuple(m) for m in draft.marks]) == mine
    # the same student on a second device says so, and carries on
    again = join(new_session(), nickname="MAX")
    again.button(key="same_student_yes").click().run()
    assert not again.warning
    again.button(key="skip").click().run()
    no_exception(again)
    assert again.session_state["task"]["image_id"] == mine[0] and again.session_state["marks"] == mine[1]


def test_the_nickname_goes_into_the_url_only_once_the_student_says_it_is_them(app):
    """A reload while "is that you?" was open rejoined from the URL without asking, onto the
    other student's image and marks."""
    start_labelling(app, nickname="Zed")
    click_image(app, 50, 60, stamp=1)
    other = join(new_session(), nickname="zed")
    assert "Someone is labelling as **Zed**" in texts(other.warning)
    assert "nick" not in other.query_params
    other.switch_page("views/label.py").run()  # a page change puts a student's name back: not this one
    assert "nick" not in other.query_params
    other.button(key="same_student_yes").click().run()
    no_exception(other)
    assert other.query_params["nick"] in ("Zed", ["Zed"])


def test_rejoining_after_leave_is_not_asked(app):
    """After Leave the nickname has no draft: "Someone is labelling as Lou right now" was wrong."""
    start_labelling(app, nickname="Lou")
    app.switch_page("views/leave.py").run()
    app.button[0].click().run()
    no_exception(app)
    again = join(new_session(), nickname="Lou")
    assert not any("Someone is labelling" in str(w.value) for w in again.warning)


def test_leaving_before_answering_leaves_the_other_students_work_alone(app, app_engine):
    start_labelling(app, nickname="Lou")
    click_image(app, 50, 60, stamp=1)
    other = join(new_session(), nickname="lou")
    other.switch_page("views/leave.py").run()
    other.button[0].click().run()
    no_exception(other)
    assert "role" not in other.session_state
    with Session(app_engine) as session:
        draft = session.get(LabelDraft, app.session_state["annotator_id"])
        assert draft is not None and [tuple(m) for m in draft.marks] == [(50.0, 60.0, "alive")]


def test_a_reload_is_never_asked_who_it_is(app):
    start_labelling(app, nickname="rey")
    click_image(app, 10, 20, stamp=1)
    reloaded = reload("rey")
    assert reloaded.session_state["role"] == "student" and not any(
        "Someone is labelling" in str(w.value) for w in reloaded.warning)
    assert reloaded.session_state["marks"] == [(10.0, 20.0, "alive")]


def test_a_new_nickname_and_an_old_one_are_not_asked(app, app_engine):
    join(app, nickname="fresh")
    assert not app.warning
    with Session(app_engine) as session:  # a demo student: runs, nobody on it now
        nickname = session.scalar(select(Annotator.nickname).join(TaskRun, TaskRun.annotator_id == Annotator.id)
                                  .where(Annotator.role == "student").limit(1))
    old = join(new_session(), nickname=nickname)
    assert not old.warning and "Welcome back" in texts(old.info)


# --------------------------------------------------------------------------- 4: withdrawn class code


def test_a_reload_with_a_withdrawn_class_code_says_so_and_keeps_the_nickname(app, app_engine):
    start_labelling(app, nickname="Zoë")
    with Session(app_engine) as session, session.begin():
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**project.settings, "class_codes": ["NEWCODE"]}
    reloaded = reload("Zoë", code="demo")
    assert "role" not in reloaded.session_state and "Cell spotting" in titles(reloaded)
    assert ("The class code DEMO is no longer open: ask your teacher for the current one."
            in texts(reloaded.warning))
    assert reloaded.text_input(key="join_nickname").value == "Zoë"
    reloaded.text_input(key="join_code").input("newcode")
    reloaded.button[0].click().run()
    no_exception(reloaded)
    assert reloaded.session_state["role"] == "student" and not reloaded.warning  # the notice went with the join


# --------------------------------------------------------------------------- 5: images that cannot be shown


def test_when_no_image_can_be_shown_the_page_says_so_and_counts_them(app, app_engine, store):
    """The audit: "cannot be shown; here is another one", then "All done!" and "6 left for you"."""
    with Session(app_engine) as session:
        paths = [store.home / i.path for i in session.scalars(select(Image))]
    for path in paths:
        path.write_bytes(b"not an image")
    start_labelling(app, nickname="bo")
    no_exception(app)
    assert app.session_state["task"] is None
    assert "No image can be shown" in titles(app) and "All done!" not in titles(app)
    n = len(app.session_state["unshowable"])
    assert n == len(paths)
    assert f"{n} image(s) left for you could not be shown (a missing or damaged file)" in texts(app.markdown)
    assert f"0 left for you ({n} more cannot be shown)" in texts(app.markdown)
    assert "cannot be shown; no other image is open to you." in texts(app.error)
    assert "here is another one" not in texts(app.error)


def test_the_saved_line_stays_when_the_next_image_cannot_be_shown(app, app_engine, store):
    """After a submit, the "Saved" line vanished behind "the next image cannot be shown"."""
    start_labelling(app, nickname="cy")
    current = app.session_state["task"]["image_id"]
    with Session(app_engine) as session:
        paths = [store.home / i.path for i in session.scalars(select(Image).where(Image.id != current))]
    for path in paths:
        path.write_bytes(b"not an image")
    click_image(app, 50, 60, stamp=1)
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()
    no_exception(app)
    assert "cannot be shown" in texts(app.error)
    assert "Saved: 1 mark(s)" in texts(app.success)


# --------------------------------------------------------------------------- 6: nickname length


def test_a_long_nickname_is_refused_with_its_length_and_the_field_takes_it(app):
    app.run()
    assert app.text_input(key="join_nickname").proto.max_chars == 0  # the browser cuts nothing off
    join(app, nickname="x" * 41)
    assert "role" not in app.session_state
    assert "The nickname is too long: at most 40 characters; got 41" in texts(app.error)
    join(new_session(), nickname="\U0001f52c" * 40)  # 40 emoji: 40 characters, not 80


# --------------------------------------------------------------------------- 8: gold feedback


def test_after_a_gold_image_the_line_under_the_image_says_the_check_result_is_below(app, app_engine):
    with Session(app_engine) as session, session.begin():  # the images after it are work images
        project = session.scalar(select(Project).where(Project.name == "demo"))
        project.settings = {**project.settings, "gold_rate": 0.0}
    start_labelling(app, nickname="gil")
    with Session(app_engine) as session:
        gold_id = session.scalar(select(GoldCell.image_id).limit(1))
        image = session.get(Image, gold_id)
        cell = session.scalars(select(GoldCell).where(GoldCell.image_id == gold_id)).first()
        task = {"image_id": image.id, "name": image.name, "width": image.width, "height": image.height,
                "client_key": "app-test-gold", "annotator_id": app.session_state["annotator_id"]}
    app.session_state["task"] = task
    app.session_state["marks"] = [(cell.x, cell.y, cell.label)]
    app.run()
    app.button(key="submit-app-test-gold").click().run()
    no_exception(app)
    assert under_image_line(app).startswith("✓ Saved: 1 mark(s) · your check result is below · ")
    assert any("Check image: you found" in e.label for e in app.expander)
    # a normal image: no such words
    app.button(key="hide_feedback").click().run()
    click_image(app, 10, 20, stamp=1)
    app.button(key=f"submit-{app.session_state['task']['client_key']}").click().run()
    assert "check result" not in under_image_line(app)


def test_a_class_too_busy_to_hold_an_image_says_so(app, monkeypatch):
    """next_image gives up after racing classmates for seconds (PostgreSQL): the page says so
    instead of failing or claiming the student is done."""
    from cellspot.active.scheduler import LeaseContentionError
    from cellspot.workflows import classroom

    def busy(*_args, **_kwargs):
        raise LeaseContentionError("every open image was being taken by other requests")

    with monkeypatch.context() as patch:
        patch.setattr(classroom, "next_image", busy)
        start_labelling(app, nickname="dee")
        no_exception(app)
        assert "Busy right now" in titles(app) and "All done!" not in titles(app)
    app.button[-1].click().run()  # Look for new images
    no_exception(app)
    assert app.session_state["task"] is not None

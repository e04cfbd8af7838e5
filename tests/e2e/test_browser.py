"""End-to-end in a real browser: Debian Chromium driven by Playwright against `cellspot app`.

The server runs on a seeded temporary store (project ``e2e``, class code ``E2E``, four images
of 1000x750 pixels, shown smaller than that) with the researcher password in
``CELLSPOT_RESEARCHER_PASSWORD``. What the browser did is checked in the store itself
(SQLAlchemy on the same database). The tests of this module are one journey and run in
order: a student labels and submits, a second student gets another image, the researcher
sees the runs and exports, a wrong password is refused. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from e2e_server import E2E_PASSWORD, AppServer, SeededStore
from st_ui import (
    assert_no_exception,
    click_button,
    click_image_pixel,
    dataframe_rows,
    fill_text,
    go_to,
    log_in,
    nav_links,
    open_app,
    open_as_researcher,
    screenshot,
    wait_idle,
)

pytestmark = pytest.mark.slow

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

TOLERANCE_PX = 1.0
RESEARCHER_PAGES = ("Class", "Review", "Results", "Models", "Rounds", "Setup", "Export")
# (x, y, label, how the label is picked) in original image pixels; far apart (> marker size)
FIRST_STUDENT_MARKS = [
    (150, 120, "alive", "button"),
    (620, 410, "alive", "button"),
    (330, 560, "dead", "key"),
    (820, 200, "not_sure", "button"),
]
UNDONE_MARK = (480, 300, "dead", "button")  # placed last, removed, undone...: never stored
LABEL_BUTTONS = {"alive": "Alive", "dead": "Dead", "not_sure": "Not sure"}
LABEL_KEYS = {"alive": "a", "dead": "d", "not_sure": "n"}


@dataclass
class Journey:
    """What earlier steps of the journey left for later ones."""

    first_run: dict | None = None
    second_run: dict | None = None


@pytest.fixture(scope="module")
def journey() -> Journey:
    return Journey()


# --------------------------------------------------------------------------- store


def stored_runs(store: SeededStore, nickname: str) -> list[dict]:
    """Every task run of student ``nickname`` in the store: image, client key, clicks (x, y, label)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cellspot.store.db import make_engine
    from cellspot.store.models import Annotator, Click, Image, TaskRun

    engine = make_engine(store.database_url)
    try:
        with Session(engine) as session:
            runs = session.execute(
                select(TaskRun.id, TaskRun.client_key, Image.id, Image.name)
                .join(Annotator, TaskRun.annotator_id == Annotator.id)
                .join(Image, TaskRun.image_id == Image.id)
                .where(Annotator.nickname == nickname, Annotator.class_code == store.class_code)
                .order_by(TaskRun.id)
            ).all()
            out = []
            for run_id, key, image_id, image_name in runs:
                clicks = session.execute(
                    select(Click.x, Click.y, Click.label).where(Click.task_run_id == run_id)
                    .order_by(Click.click_index)
                ).all()
                out.append({"id": run_id, "client_key": key, "image_id": image_id, "image": image_name,
                            "clicks": [tuple(c) for c in clicks]})
    finally:
        engine.dispose()
    return out


def store_totals(store: SeededStore) -> tuple[int, int]:
    """(task runs, clicks) in the store."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from cellspot.store.db import make_engine
    from cellspot.store.models import Click, TaskRun

    engine = make_engine(store.database_url)
    try:
        with Session(engine) as session:
            return (session.scalar(select(func.count()).select_from(TaskRun)) or 0,
                    session.scalar(select(func.count()).select_from(Click)) or 0)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- steps


def join_as(page, url: str, class_code: str, nickname: str) -> None:
    """Open the app, join the class and skip the tutorial: the labelling page is shown."""
    open_app(page, url)
    page.get_by_role("textbox", name="Class code").fill(class_code)
    page.get_by_role("textbox", name="Nickname").fill(nickname)
    click_button(page, "Join")
    expect(page.get_by_role("button", name="Skip the tutorial")).to_be_visible()
    click_button(page, "Skip the tutorial")
    expect(page.get_by_role("button", name=re.compile("Submit"))).to_be_visible()


def shown_image(page) -> tuple[str, tuple[int, int]]:
    """Name and (width, height) of the image on the labelling page, from its caption."""
    caption = page.get_by_text(re.compile(r"\(\d+×\d+ px\)")).first.inner_text()
    match = re.search(r"^(\S+) \((\d+)×(\d+) px\)", caption)
    assert match, f"unexpected image caption {caption!r}"
    return match.group(1), (int(match.group(2)), int(match.group(3)))


def pick_label(page, label: str, how: str) -> None:
    """Make ``label`` current with its button or its keyboard key; checks the page says so."""
    if how == "key":
        page.keyboard.press(LABEL_KEYS[label])
        wait_idle(page)
    else:
        click_button(page, LABEL_BUTTONS[label])
    expect(page.get_by_text(re.compile(r"^Label: .*" + re.escape(LABEL_BUTTONS[label])))).to_be_visible()


def expect_counts(page, alive: int, dead: int, not_sure: int) -> None:
    expect(page.get_by_text(re.compile(
        rf"Alive {alive} · ☒ Dead {dead} · △ Not sure {not_sure}$"))).to_be_visible()


# --------------------------------------------------------------------------- tests


def test_student_labels_and_one_run_holds_the_clicked_pixels(
    app_server: AppServer, seeded_store: SeededStore, new_page, artifacts_dir: Path, journey: Journey
) -> None:
    page = new_page()
    join_as(page, app_server.url, seeded_store.class_code, "ada")
    assert not set(nav_links(page)) & set(RESEARCHER_PAGES), f"a student is offered {nav_links(page)}"
    name, size = shown_image(page)
    assert name in seeded_store.images and size == seeded_store.images[name][1:]

    counts = {"alive": 0, "dead": 0, "not_sure": 0}
    for x, y, label, how in [*FIRST_STUDENT_MARKS, UNDONE_MARK]:
        pick_label(page, label, how)
        click_image_pixel(page, x, y, size)
        counts[label] += 1
        expect_counts(page, **counts)
    screenshot(page, artifacts_dir / "e2e-label-page-5-marks.png")

    # clicking an existing mark with its own label removes it; Undo brings it back
    click_image_pixel(page, UNDONE_MARK[0], UNDONE_MARK[1], size)
    counts[UNDONE_MARK[2]] -= 1
    expect_counts(page, **counts)
    click_button(page, "Undo")
    counts[UNDONE_MARK[2]] += 1
    expect_counts(page, **counts)
    # ... and the next Undo takes back placing it
    click_button(page, "Undo")
    counts[UNDONE_MARK[2]] -= 1
    expect_counts(page, **counts)
    screenshot(page, artifacts_dir / "e2e-label-page.png")
    assert stored_runs(seeded_store, "ada") == [], "nothing may be stored before Submit"

    # a double click on Submit must still store one run
    page.get_by_role("button", name=re.compile("Submit")).dblclick()
    wait_idle(page)
    expect(page.get_by_text(re.compile(rf"Saved: {len(FIRST_STUDENT_MARKS)} mark\(s\)\."))
           ).to_be_visible()
    next_name, _ = shown_image(page)
    assert next_name != name, "after Submit the next image is shown"

    runs = stored_runs(seeded_store, "ada")
    assert len(runs) == 1, f"expected exactly one stored run, got {runs}"
    run = runs[0]
    assert run["image"] == name
    assert len(run["clicks"]) == len(FIRST_STUDENT_MARKS), run["clicks"]
    for (x, y, label, _how), (sx, sy, slabel) in zip(FIRST_STUDENT_MARKS, run["clicks"], strict=True):
        assert slabel == label
        assert abs(sx - x) <= TOLERANCE_PX and abs(sy - y) <= TOLERANCE_PX, (
            f"{label} mark aimed at image pixel ({x}, {y}) was stored at ({sx}, {sy})")
    journey.first_run = run


def test_second_student_gets_another_image(
    app_server: AppServer, seeded_store: SeededStore, new_page, journey: Journey
) -> None:
    if journey.first_run is None:
        pytest.skip("the first student's run was not stored (previous test failed)")
    page = new_page()
    join_as(page, app_server.url, seeded_store.class_code, "bob")
    name, size = shown_image(page)
    assert name != journey.first_run["image"], "the second student got the first student's image"
    pick_label(page, "alive", "button")
    x, y = size[0] // 2, size[1] // 2
    click_image_pixel(page, x, y, size)
    expect_counts(page, alive=1, dead=0, not_sure=0)
    click_button(page, "Submit")
    expect(page.get_by_text(re.compile(rf"Saved: 1 mark\(s\)\."))).to_be_visible()
    runs = stored_runs(seeded_store, "bob")
    assert len(runs) == 1 and runs[0]["image"] == name, runs
    assert runs[0]["image_id"] != journey.first_run["image_id"]
    (sx, sy, label), = runs[0]["clicks"]
    assert label == "alive" and abs(sx - x) <= TOLERANCE_PX and abs(sy - y) <= TOLERANCE_PX
    journey.second_run = runs[0]


def test_reload_mid_image_and_after_submit_keeps_the_student_and_stores_one_run(
    app_server: AppServer, seeded_store: SeededStore, new_page
) -> None:
    page = new_page()
    join_as(page, app_server.url, seeded_store.class_code, "cy")
    name, size = shown_image(page)
    click_image_pixel(page, 100, 100, size)
    expect_counts(page, alive=1, dead=0, not_sure=0)

    for _ in range(2):  # mid-image, twice: the same image with the mark, the student stays in
        page.reload()
        wait_idle(page)
        expect(page.get_by_role("button", name=re.compile("Submit")),
               f"after a reload mid-image the page is: {page.inner_text('body')[:300]!r}").to_be_visible()
        assert shown_image(page)[0] == name, "a reload mid-image served another image"
        expect_counts(page, alive=1, dead=0, not_sure=0)
        expect(page.get_by_text("Your 1 unsubmitted mark(s) on this image are back.")).to_be_visible()
    click_button(page, "Submit")
    expect(page.get_by_text(re.compile(rf"Saved: 1 mark\(s\)\."))).to_be_visible()

    page.reload()  # after submit: never a second run
    wait_idle(page)
    expect(page.get_by_role("button", name=re.compile("Submit")),
           f"after a reload after submit the page is: {page.inner_text('body')[:300]!r}").to_be_visible()
    runs = stored_runs(seeded_store, "cy")
    assert len(runs) == 1 and runs[0]["image"] == name and len(runs[0]["clicks"]) == 1, runs


def test_an_empty_submit_asks_first_and_the_shortcut_confirms(
    app_server: AppServer, seeded_store: SeededStore, new_page, artifacts_dir: Path
) -> None:
    page = new_page()
    join_as(page, app_server.url, seeded_store.class_code, "dee")
    name, _ = shown_image(page)
    submit = page.get_by_role("button", name=re.compile("Submit"))  # its name carries the shortcut too
    expect(submit).not_to_have_text(re.compile("no cells"))
    submit.click()
    wait_idle(page)
    expect(page.get_by_text(re.compile("No marks. No cells on this image?"))).to_be_visible()
    expect(page.get_by_role("button", name=re.compile("Submit with no cells"))).to_be_visible()
    screenshot(page, artifacts_dir / "e2e-empty-submit.png")
    assert stored_runs(seeded_store, "dee") == [], "the first press on an empty image stores nothing"
    page.keyboard.press("Control+Enter")  # the Submit shortcut confirms
    wait_idle(page)
    expect(page.get_by_text(re.compile(rf"Saved: 0 mark\(s\)\."))).to_be_visible()
    runs = stored_runs(seeded_store, "dee")
    assert len(runs) == 1 and runs[0]["image"] == name and runs[0]["clicks"] == [], runs


def test_researcher_sees_the_runs_and_exports(
    app_server: AppServer, seeded_store: SeededStore, new_page, artifacts_dir: Path,
    journey: Journey, tmp_path: Path,
) -> None:
    if journey.first_run is None:
        pytest.skip("the first student's run was not stored (previous test failed)")
    page = new_page()
    open_app(page, app_server.url)
    assert not set(nav_links(page)) & set(RESEARCHER_PAGES)
    go_to(page, "Researcher login")
    log_in(page, E2E_PASSWORD)
    expect(page.get_by_role("heading", name="Class")).to_be_visible()
    assert set(RESEARCHER_PAGES) <= set(nav_links(page)), nav_links(page)

    n_runs, n_clicks = store_totals(seeded_store)
    expect(page.get_by_text(re.compile(rf"^{n_runs} runs, {n_clicks} clicks in all"))).to_be_visible()
    students = {row.get("nickname"): row for row in dataframe_rows(page)}
    assert "ada" in students, f"the class table lists {list(students)}"
    assert students["ada"].get("runs") == "1", students["ada"]

    click_button(page, "Recompute consensus")
    expect(page.get_by_text(re.compile(r"^Snapshot \d+: "))).to_be_visible(timeout=60_000)
    screenshot(page, artifacts_dir / "e2e-dashboard-class.png")
    click_button(page, "Recompute consensus")  # nothing new: the snapshot is kept, not copied
    expect(page.get_by_text(re.compile(r"^No click changed since snapshot \d+: kept it"))).to_be_visible(
        timeout=60_000)

    go_to(page, "Export")
    expect(page.get_by_role("heading", name="Export")).to_be_visible()
    click_button(page, "Build the export")
    expect(page.get_by_text(re.compile(r"^Export ready: "))).to_be_visible(timeout=60_000)
    screenshot(page, artifacts_dir / "e2e-dashboard-export.png")
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download the zip").click()
    target = tmp_path / "export.zip"
    download_info.value.save_as(target)
    with zipfile.ZipFile(target) as archive:
        names = archive.namelist()
    assert any(n.endswith("manifest.json") for n in names), names[:20]
    assert any("clicks" in n for n in names), names[:20]


def test_wrong_researcher_password_is_refused(app_server: AppServer, new_page) -> None:
    page = new_page()
    open_app(page, app_server.url)
    go_to(page, "Researcher login")
    page.get_by_role("textbox", name="Password").fill(E2E_PASSWORD + "-wrong")
    click_button(page, "Log in")
    expect(page.get_by_text(re.compile("Wrong password"))).to_be_visible()
    assert E2E_PASSWORD not in page.inner_text("body")
    expect(page.get_by_role("textbox", name="Password")).to_have_value("")
    assert not set(nav_links(page)) & set(RESEARCHER_PAGES), nav_links(page)
    expect(page.get_by_role("textbox", name="Password")).to_be_visible()


def test_a_reloaded_researcher_page_asks_for_the_password_at_its_own_url(app_server: AppServer, new_page) -> None:
    page = new_page()
    open_as_researcher(page, app_server.url, E2E_PASSWORD)
    go_to(page, "Rounds")
    expect(page.get_by_role("heading", name="Rounds")).to_be_visible()
    page.reload(wait_until="domcontentloaded")
    wait_idle(page)
    # the session (and the role with it) is new: the login page answers at /rounds, with no
    # "page not found" and without showing the page
    expect(page.get_by_text(re.compile("Log in to open the Rounds page"))).to_be_visible()
    assert "does not seem to exist" not in page.inner_text("body")
    assert not set(nav_links(page)) & set(RESEARCHER_PAGES), nav_links(page)
    assert page.url.rstrip("/").endswith("/rounds"), page.url
    log_in(page, E2E_PASSWORD)
    expect(page.get_by_role("heading", name="Rounds")).to_be_visible()
    assert page.url.rstrip("/").endswith("/rounds"), page.url


def test_review_keeps_the_picked_image_when_a_recompute_reorders_the_list(
    app_server: AppServer, seeded_store: SeededStore, new_page, artifacts_dir: Path,
) -> None:
    """The picker lists the least certain images first; accepting an image's cells and
    recomputing moves it down the list. The browser reports a pick by its position, so a
    picker kept under one key showed its old label and went to another image, and the next
    click ("Back to consensus") was lost."""
    from sqlalchemy.orm import Session

    from cellspot.store import queries
    from cellspot.store.db import make_engine
    from cellspot.store.models import Image

    names = list(seeded_store.images)[-2:]  # two images no other test labels
    engine = make_engine(seeded_store.database_url)
    with Session(engine) as session:  # three students: they disagree on the first image's labels
        project = queries.get_project(session, seeded_store.project)
        for k, labels in enumerate((("alive", "alive"), ("dead", "alive"), ("alive", "dead"))):
            student = queries.get_or_create_annotator(session, project, f"seed{k}", seeded_store.class_code)
            for name, label in zip(names, labels if k else ("alive", "alive")):
                image = session.get(Image, seeded_store.images[name][0])
                queries.submit_task_run(session, image, student, [(50.0 + k, 60.0, label), (200.0, 90.0 + k, "dead")],
                                        client_key=f"review-e2e-{name}-{k}")
        session.commit()
    engine.dispose()
    page = new_page()
    open_as_researcher(page, app_server.url, E2E_PASSWORD)
    go_to(page, "Review")
    expect(page.get_by_role("heading", name="Review")).to_be_visible()
    click_button(page, "Recompute consensus")
    expect(page.get_by_text(re.compile(r"^Snapshot \d+: "))).to_be_visible(timeout=60_000)
    picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="Image (least certain first)")
    shown = picker.locator("input")
    name = names[0]  # one of the least certain: it moves down once accepted
    shown.click()
    shown.fill(name)  # the list shows a few options at a time: typing filters it (students of other
    # tests may have labelled this image too, now that a class spreads over the images)
    page.get_by_role("option", name=re.compile(rf"^{re.escape(name)} · ")).click()
    wait_idle(page)
    expect(shown).to_have_value(re.compile(rf"^{re.escape(name)} · "))
    click_button(page, "Accept all cells")
    expect(page.get_by_text(re.compile(r"^Accepted: the image has [1-9]\d* expert cells"))).to_be_visible()
    click_button(page, "Recompute consensus")  # its confidence is 1.00 now: it moves down the list
    expect(page.get_by_text(re.compile(r"^Snapshot \d+: "))).to_be_visible(timeout=60_000)
    expect(shown).to_have_value(re.compile(rf"^{re.escape(name)} · .*confidence 1\.00"))
    expect(page.get_by_text(re.compile(rf"^{re.escape(name)} \("))).to_be_visible()  # the caption too
    click_button(page, "Back to consensus")
    expect(page.get_by_text(re.compile(r"^Removed \d+ expert cells and recomputed consensus"))).to_be_visible(
        timeout=60_000)
    expect(shown).to_have_value(re.compile(rf"^{re.escape(name)} · "))
    screenshot(page, artifacts_dir / "e2e-review-picker.png")
    assert_no_exception(page)


def test_on_a_1024x768_tablet_submit_and_its_saved_line_are_above_the_fold(
    app_server: AppServer, seeded_store: SeededStore, new_page
) -> None:
    page = new_page({"width": 1024, "height": 768})
    join_as(page, app_server.url, seeded_store.class_code, "tablet")
    name, size = shown_image(page)
    click_image_pixel(page, size[0] // 3, size[1] // 3, size)
    expect_counts(page, alive=1, dead=0, not_sure=0)
    click_button(page, "Submit")
    saved = page.get_by_text(re.compile(rf"Saved: 1 mark\(s\)\."))
    expect(saved).to_be_visible()
    assert page.evaluate("window.scrollY") == 0
    for what, box in (("Submit", page.get_by_role("button", name=re.compile("^Submit")).bounding_box()),
                      ("the Saved line", page.locator('[data-testid="stAlert"]').first.bounding_box())):
        assert box is not None and box["y"] + box["height"] <= 768, f"{what} ends below the fold: {box}"
    # the question of an empty submit, under the button, fits too
    click_button(page, "Submit")
    expect(page.get_by_role("button", name=re.compile("^Submit with no cells"))).to_be_visible()
    box = page.locator('[data-testid="stAlert"]').first.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 768, f"the empty-submit question ends below the fold: {box}"
    # zoomed in, the pan buttons add a row above Submit: the Saved line must still fit
    page.keyboard.press("z")
    wait_idle(page)
    expect(page.get_by_text(re.compile(r"· zoom 2× · showing x"))).to_be_visible()
    name, size = shown_image(page)
    click_image_pixel(page, size[0] // 2, size[1] // 2, size)
    expect_counts(page, alive=1, dead=0, not_sure=0)
    click_button(page, "Submit")
    expect(page.get_by_text(re.compile(r"Saved: 1 mark\(s\)\."))).to_be_visible()
    box = page.locator('[data-testid="stAlert"]').first.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 768, f"zoomed, the Saved line ends below the fold: {box}"


def test_on_a_phone_zoom_and_submit_bring_the_image_back_into_view(
    app_server: AppServer, seeded_store: SeededStore, new_page
) -> None:
    """390x844: the tools column is below the picture. After a zoom or a Submit pressed down
    there, the page scrolls back to the image; the pan arrows sit in one row right under it."""
    page = new_page({"width": 390, "height": 844})
    join_as(page, app_server.url, seeded_store.class_code, "phone")
    picture = page.locator('iframe[title^="streamlit_image_coordinates"]').first

    def image_top() -> float:
        box = picture.bounding_box()
        assert box is not None
        return box["y"]

    zoom_in = page.get_by_role("button", name=re.compile(r"^zoom_in icon"))
    zoom_in.scroll_into_view_if_needed()
    assert image_top() < 0, "the zoom button should be below the image on a phone"
    zoom_in.click()
    wait_idle(page)
    expect(page.get_by_text(re.compile(r"· zoom 2× · showing x"))).to_be_visible()
    page.wait_for_function("() => document.querySelector('iframe[title^=\"streamlit_image_coordinates\"]')"
                           ".getBoundingClientRect().top >= 0")
    image = picture.bounding_box()
    arrows = [page.get_by_role("button", name=re.compile(rf"^{icon} icon")).bounding_box()
              for icon in ("arrow_back", "arrow_upward", "arrow_downward", "arrow_forward")]
    assert all(a is not None for a in arrows)
    assert len({round(a["y"]) for a in arrows}) == 1, f"the pan arrows are not in one row: {arrows}"
    assert image["y"] + image["height"] <= arrows[0]["y"] <= image["y"] + image["height"] + 60
    assert arrows[0]["y"] + arrows[0]["height"] <= 844, "the pan arrows are below the fold"

    name, size = shown_image(page)
    click_image_pixel(page, size[0] // 2, size[1] // 2, size)
    expect_counts(page, alive=1, dead=0, not_sure=0)
    page.get_by_role("button", name=re.compile("^Submit")).click()  # scrolls down to it first
    wait_idle(page)  # the whole rerun: the Saved line is drawn before the new image's caption
    expect(page.get_by_text(re.compile(r"Saved: 1 mark\(s\)\."))).to_be_attached()
    page.wait_for_function("() => document.querySelector('iframe[title^=\"streamlit_image_coordinates\"]')"
                           ".getBoundingClientRect().top >= 0")
    assert shown_image(page)[0] != name
    # the Saved line under Submit is out of sight now: the line under the image says it
    under_image = page.get_by_text(re.compile(r"^✓ Saved: 1 mark\(s\) · Today you did"))
    expect(under_image).to_be_visible()
    box = under_image.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 844, f"the saved note is below the fold: {box}"


def test_a_created_project_is_the_one_the_setup_page_imports_into(
    app_server: AppServer, seeded_store: SeededStore, new_page, artifacts_dir: Path, tmp_path: Path,
) -> None:
    """The picker kept the old project after "Create" (the browser keeps a widget's value and
    ignores a changed default), so the header named the new project and the next upload went
    into the old one."""
    import numpy as np
    from PIL import Image as PILImage
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cellspot.store.db import make_engine
    from cellspot.store.models import Image, Project

    page = new_page()
    open_as_researcher(page, app_server.url, E2E_PASSWORD)
    go_to(page, "Setup")
    picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="Project").locator("input")
    expect(picker).to_have_value(seeded_store.project)
    page.get_by_text("Create a project").click()
    fill_text(page, "Name", "Lab picker", exact=True)  # committed (Tab) before the press: under load a
    click_button(page, "Create", exact=True)            # press right after typing was lost
    expect(page.get_by_text("Project 'Lab picker' created.")).to_be_visible(timeout=20_000)
    expect(picker).to_have_value("Lab picker")
    expect(page.get_by_role("heading", name="Lab picker")).to_be_visible()

    image = tmp_path / "picked.png"
    PILImage.fromarray(np.full((40, 60), 128, dtype=np.uint8)).save(image)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(str(image))
    wait_idle(page)
    page.get_by_role("button", name="Import", exact=True).first.click()
    expect(page.get_by_text(re.compile(r"1 image\(s\) imported"))).to_be_visible(timeout=30_000)
    expect(picker).to_have_value("Lab picker")
    screenshot(page, artifacts_dir / "e2e-setup-created-project.png")
    engine = make_engine(seeded_store.database_url)
    with Session(engine) as session:
        owner = session.scalar(select(Project.name).join(Image, Image.project_id == Project.id)
                               .where(Image.name == "picked.png"))
    engine.dispose()
    assert owner == "Lab picker"

    # a pick by hand still wins over the remembered project, on the next page too
    picker.click()
    page.get_by_role("option", name=seeded_store.project, exact=True).click()
    wait_idle(page)
    expect(page.get_by_role("heading", name=seeded_store.project, exact=True)).to_be_visible()
    expect(picker).to_have_value(seeded_store.project)
    go_to(page, "Results")
    expect(picker).to_have_value(seeded_store.project)

    # a project created after a pick by hand stays picked on another page (each page has its
    # own picker: it showed the first project) and back on Setup
    go_to(page, "Setup")
    page.get_by_text("Create a project").click()
    fill_text(page, "Name", "Lab second", exact=True)
    click_button(page, "Create", exact=True)
    expect(picker).to_have_value("Lab second", timeout=20_000)
    go_to(page, "Class")
    expect(page.get_by_role("heading", name="Class")).to_be_visible()
    expect(picker).to_have_value("Lab second")
    go_to(page, "Setup")
    expect(picker).to_have_value("Lab second")
    assert_no_exception(page)

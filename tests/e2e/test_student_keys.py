"""The label page's keyboard shortcuts with Shift held, in a real browser (Chromium + Playwright).

Streamlit matches a shortcut's modifiers exactly: an audit found Shift+A leaving the label on
Dead. Only a browser sends real key events through Streamlit's shortcut handling, so this
checks it there: Shift+A/D/N/U act as A/D/N/U (with the focus on the page and after a click
in the image frame), Shift+Z stays "zoom out", and capitals still type into a text field.
"""

from __future__ import annotations

import re

import pytest
from e2e_server import AppServer, SeededStore
from st_ui import click_button, click_image_pixel, open_app, wait_idle

pytestmark = pytest.mark.slow

expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect


def _label_is(page, text: str) -> None:
    expect(page.get_by_text(re.compile(r"^Label: .*" + re.escape(text)))).to_be_visible()


def _press(page, key: str) -> None:
    page.keyboard.press(key)
    wait_idle(page)


def _counts(page, alive: int, dead: int, not_sure: int) -> None:
    expect(page.get_by_text(re.compile(rf"Alive {alive} · ☒ Dead {dead} · △ Not sure {not_sure}$"))).to_be_visible()


def test_shift_with_a_shortcut_letter_is_the_letter_and_shift_z_still_zooms_out(
    app_server: AppServer, seeded_store: SeededStore, new_page
) -> None:
    page = new_page()
    open_app(page, app_server.url)
    page.get_by_role("textbox", name="Class code").fill(seeded_store.class_code)
    nickname = page.get_by_role("textbox", name="Nickname")
    nickname.click()
    nickname.press_sequentially("DANU")  # capitals typed with Shift stay capitals in a text field
    expect(nickname).to_have_value("DANU")
    click_button(page, "Join")
    click_button(page, "Skip the tutorial")
    expect(page.get_by_role("button", name=re.compile("Submit"))).to_be_visible()
    caption = page.get_by_text(re.compile(r"\(\d+×\d+ px\)")).first.inner_text()
    width, height = (int(v) for v in re.search(r"\((\d+)×(\d+) px\)", caption).groups())

    page.evaluate("document.activeElement && document.activeElement.blur()")  # the focus on the page
    for key, label in (("Shift+D", "Dead"), ("Shift+N", "Not sure"), ("Shift+A", "Alive")):
        _press(page, key)
        _label_is(page, label)

    # after a click in the image the focus is in its frame: the forwarded Shift+letter works too
    click_image_pixel(page, width // 3, height // 3, (width, height))
    _counts(page, alive=1, dead=0, not_sure=0)
    _press(page, "Shift+D")
    _label_is(page, "Dead")
    _press(page, "Shift+U")  # undo: the mark goes
    _counts(page, alive=0, dead=0, not_sure=0)

    _press(page, "z")
    expect(page.get_by_text(re.compile(r"· zoom 2× · showing x"))).to_be_visible()
    _press(page, "Shift+Z")  # still "zoom out", not "z"
    expect(page.get_by_text(re.compile(r"· zoom \d× · showing x"))).to_have_count(0)

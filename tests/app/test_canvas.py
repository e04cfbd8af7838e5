"""The clickable image's geometry: render scale by screen size, margins beside tall pictures,
and clicks mapped back through them (appkit/canvas.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image as PILImage

import app_testkit  # noqa: F401 - puts app/ on sys.path
from appkit import canvas
from appkit.marks import View


@pytest.fixture
def state(monkeypatch) -> dict:
    """``canvas``'s ``st.session_state`` as a plain dict; ``_shown`` lists the pictures sent."""
    fake = SimpleNamespace(session_state={"_shown": []})
    monkeypatch.setattr(canvas, "st", fake)
    monkeypatch.setattr(canvas, "streamlit_image_coordinates",
                        lambda picture, **_: fake.session_state["_shown"].append(picture.picture))
    return fake.session_state


@pytest.mark.parametrize(("image_width", "css_width", "rendered"), [
    (384, 358, 1152),   # phone: sharp on its 3 device px per CSS px (it was 384 px, stretched 3x)
    (384, 944, 1152),   # laptop: as before
    (2400, 358, 1074),  # phone: what its screen can show (it was 2,000 px)
    (2400, 944, 2000),  # laptop: as before
    (1500, 944, 1500),
])
def test_render_width_follows_the_screen(state, image_width, css_width, rendered) -> None:
    state["canvas.label.width"] = css_width
    view = View(0, 0, image_width, image_width * 3 // 4)
    assert round(view.width * canvas.render_scale(view)) == rendered


def test_a_square_picture_gets_margins_and_clicks_map_through_them(state) -> None:
    view = View(0, 0, 512, 512)
    picture = PILImage.new("RGB", (1024, 1024), (255, 255, 255))
    canvas.show(picture, view, "k")
    sent = state["_shown"][-1]
    assert sent.size == (1366, 1024)  # 3/4 as tall as wide: the tools stay on a laptop's screen
    left, inner, outer = state["k.frame"]
    assert (left, inner, outer) == (171, 1024, 1366)
    assert sent.getpixel((10, 500)) == canvas.MARGIN_GREY and sent.getpixel((683, 500)) == (255, 255, 255)
    # shown 683 CSS px wide: half a CSS px per render px; the image part is 512 CSS px from 85.5
    state["k"] = {"x": 85.5 + 256, "y": 128, "width": 683, "height": 512, "unix_time": 1}
    x, y = canvas.take_click("k")
    assert (round(x), round(y)) == (256, 128)
    assert state["canvas.label.width"] == pytest.approx(512)  # the image's own width on screen
    state["k"] = {"x": 20, "y": 128, "width": 683, "height": 512, "unix_time": 2}  # on the left margin
    assert canvas.take_click("k") is None


def test_a_wide_picture_is_shown_as_it_is(state) -> None:
    view = View(0, 0, 384, 288)
    canvas.show(PILImage.new("RGB", (1152, 864)), view, "k")
    assert state["_shown"][-1].size == (1152, 864) and state["k.frame"] == (0, 1152, 1152)
    state["k"] = {"x": 425, "y": 318.75, "width": 850, "height": 637.5, "unix_time": 3}
    x, y = canvas.take_click("k")
    assert (round(x), round(y)) == (192, 144)

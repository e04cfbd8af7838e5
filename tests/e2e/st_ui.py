"""Playwright helpers for driving a Streamlit page (sync API).

Streamlit marks its root ``[data-testid=stApp]`` with ``data-test-script-state`` =
``running`` / ``notRunning``; :func:`wait_idle` waits for a rerun to finish. Custom components
(``streamlit-image-coordinates``) render inside iframes: :func:`image_box` finds the image
element inside the component's frame and :func:`click_image_pixel` clicks the screen point
that shows a given original image pixel, from the element's on-screen box (CSS pixels; the
page runs at device scale factor 1, so CSS pixels are the coordinates Playwright clicks).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

APP_ROOT = '[data-testid="stApp"]'
IMAGE_COMPONENT_IFRAME = 'iframe[title="streamlit_image_coordinates.streamlit_image_coordinates"]'


def wait_idle(page, timeout_ms: int = 30_000, settle_ms: int = 600, quiet_ms: int = 300) -> None:
    """Wait until the app's script has stopped running and stays stopped for ``quiet_ms``
    (a rerun that starts within ``settle_ms`` of the call is waited for, and so is a second
    run started by ``st.rerun``); fails when the app shows an exception."""
    root = page.locator(APP_ROOT)
    root.wait_for(timeout=timeout_ms)
    running = f'{APP_ROOT}[data-test-script-state="running"]'
    with contextlib.suppress(Exception):  # the rerun may be over before we look
        page.wait_for_selector(running, timeout=settle_ms)
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_since = None
    while True:
        state = root.get_attribute("data-test-script-state")
        now = time.monotonic()
        if state == "running":
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_ms / 1000:
            break
        if now > deadline:
            raise AssertionError(f"the app was still running after {timeout_ms / 1000:.0f} s")
        time.sleep(0.05)
    assert_no_exception(page)


def assert_no_exception(page) -> None:
    """Fail with the shown text when the app displays a Python exception."""
    shown = page.locator('[data-testid="stException"]')
    if shown.count():
        raise AssertionError(f"the app shows an exception: {shown.first.inner_text()[:2000]}")


def open_app(page, url: str, timeout_ms: int = 60_000) -> None:
    """Load the app at ``url`` and wait until its first run is finished."""
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    wait_idle(page, timeout_ms=timeout_ms)


def click_button(page, name: str, exact: bool = False) -> None:
    """Click the visible button called ``name`` (first match) and wait for the rerun."""
    page.get_by_role("button", name=name, exact=exact).first.click()
    wait_idle(page)


def fill_text(page, label: str, value: str, exact: bool = False) -> None:
    """Type ``value`` into the text input labelled ``label`` (commits it with Tab)."""
    box = page.get_by_label(label, exact=exact).first
    box.fill(value)
    box.press("Tab")
    wait_idle(page)


def screenshot(page, path: Path) -> Path:
    """Save the whole app page as PNG: Streamlit scrolls inside its main container, so the
    viewport is stretched to the content's height for the shot, then restored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no hover tooltip in the shot
    size = page.viewport_size
    height = page.evaluate(
        """() => Math.max(...[...document.querySelectorAll(
               '[data-testid="stMain"], [data-testid="stAppViewContainer"], body')]
             .map(el => el.scrollHeight))"""
    )
    tall = size is not None and height > size["height"]
    if tall:
        page.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, 6000)})
        page.wait_for_timeout(300)
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        if tall:
            page.set_viewport_size(size)
    return path


@dataclass(frozen=True)
class ImageBox:
    """Where the clickable image is on screen: top-left ``x``, ``y`` and size, CSS pixels."""

    x: float
    y: float
    width: float
    height: float


def image_locator(page, index: int = 0):
    """The ``<img>`` of the ``index``-th image-coordinates component."""
    return page.frame_locator(IMAGE_COMPONENT_IFRAME).nth(index).locator("img#image")


def image_box(page, index: int = 0, timeout_ms: int = 20_000) -> ImageBox:
    """The on-screen box of the clickable image once it is loaded and laid out."""
    img = image_locator(page, index)
    img.wait_for(state="visible", timeout=timeout_ms)
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        box = img.bounding_box()
        complete = img.evaluate("el => el.complete && el.naturalWidth > 0")
        if box and complete and box["width"] > 1 and box["height"] > 1:
            return ImageBox(box["x"], box["y"], box["width"], box["height"])
        if time.monotonic() > deadline:
            raise AssertionError(f"the clickable image never got a size (box {box})")
        time.sleep(0.1)


def click_image_pixel(page, x: float, y: float, image_size: tuple[int, int], index: int = 0) -> tuple[float, float]:
    """Click the screen point showing original image pixel (``x``, ``y``) of an image of
    ``image_size`` (width, height) shown whole in the component; waits for the rerun.

    Pixel-centre convention (as :mod:`cellspot.render`): image pixel ``x`` is shown by display
    pixel ``d = round((x + 0.5) * f - 0.5)``, ``f`` = shown width / image width. The click lands
    at offset ``d + 0.4`` inside the image element: inside display pixel ``d`` and, since
    Chromium reports a click's ``offsetX`` rounded to whole CSS pixels, reported as ``d``.
    Returns the image pixel whose display pixel centre was clicked, ``(d + 0.5) / f - 0.5``:
    within ``0.5 / f`` of the target.
    """
    box = image_box(page, index)
    fx, fy = box.width / image_size[0], box.height / image_size[1]
    dx, dy = round((x + 0.5) * fx - 0.5), round((y + 0.5) * fy - 0.5)
    image_locator(page, index).click(position={"x": dx + 0.4, "y": dy + 0.4})
    wait_idle(page)
    return (dx + 0.5) / fx - 0.5, (dy + 0.5) / fy - 0.5


def nav_links(page) -> list[str]:
    """Texts of the navigation links offered to this session (icon names stripped)."""
    links = page.locator('[data-testid="stTopNavLink"], [data-testid="stSidebarNavLink"]')
    texts = []
    for i in range(links.count()):
        spans = links.nth(i).locator('[data-testid="stMarkdownContainer"]')
        texts.append((spans.first.inner_text() if spans.count() else links.nth(i).inner_text()).strip())
    return texts


def go_to(page, link_text: str) -> None:
    """Open the page called ``link_text`` through the app's navigation (keeps the session)."""
    page.locator('[data-testid="stTopNavLink"], [data-testid="stSidebarNavLink"]').filter(
        has_text=link_text).first.click()
    wait_idle(page)


def dataframe_rows(page, index: int = 0) -> list[dict[str, str]]:
    """The rows of the ``index``-th ``st.dataframe`` as {column: text}, read from the grid's
    accessible table (the visible grid is a canvas)."""
    frame = page.locator('[data-testid="stDataFrame"]').nth(index)
    table = frame.locator('table[role="grid"]')
    table.wait_for(state="attached")
    header = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    rows = []
    for tr in table.locator("tbody tr").all():
        cells = [c.strip() for c in tr.locator("td").all_inner_texts()]
        rows.append(dict(zip(header, cells)))
    return rows


def log_in(page, password: str) -> None:
    """On the researcher login page: type ``password`` and press "Log in"."""
    page.get_by_role("textbox", name="Password").fill(password)
    click_button(page, "Log in")


def open_as_researcher(page, url: str, password: str) -> None:
    """Open the app at ``url``, go to the researcher login and log in with ``password``."""
    open_app(page, url)
    go_to(page, "Researcher login")
    log_in(page, password)

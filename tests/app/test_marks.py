"""The label page's draft helpers (pure): click edits, counts, zoom window, panning."""

from __future__ import annotations

import app_testkit  # noqa: F401 - puts app/ on sys.path
import pytest
from appkit.marks import View, apply_click, counts, pan, view_window

MARKS = [(10.0, 10.0, "alive"), (50.0, 20.0, "dead")]


@pytest.mark.parametrize(("x", "y", "label", "expected"), [
    (100, 100, "alive", [*MARKS, (100.0, 100.0, "alive")]),            # empty place: add
    (11, 9, "alive", [MARKS[1]]),                                     # on a mark, same label: remove
    (11, 9, "dead", [(10.0, 10.0, "dead"), MARKS[1]]),                # other label: relabel in place
    (52, 21, "not_sure", [MARKS[0], (50.0, 20.0, "not_sure")]),
    (13.5, 10, "alive", [*MARKS, (13.5, 10.0, "alive")]),            # just outside the tolerance (3 px)
])
def test_apply_click(x, y, label, expected):
    assert apply_click(MARKS, x, y, label, tolerance=3.0) == expected
    assert MARKS == [(10.0, 10.0, "alive"), (50.0, 20.0, "dead")]  # the input is not changed


def test_counts():
    assert counts([*MARKS, (1, 1, "dead"), (2, 2, "not_sure")]) == {"alive": 1, "dead": 2, "not_sure": 1}
    assert counts([]) == {"alive": 0, "dead": 0, "not_sure": 0}


@pytest.mark.parametrize(("size", "zoom", "centre", "expected"), [
    ((384, 288), 1, None, View(0, 0, 384, 288)),
    ((384, 288), 2, None, View(96, 72, 192, 144)),
    ((384, 288), 2, (0, 0), View(0, 0, 192, 144)),            # kept inside the image
    ((384, 288), 4, (1000, 1000), View(288, 216, 96, 72)),
    ((301, 225), 2, (150.5, 112.5), View(75, 56, 151, 113)),  # odd sizes round up
])
def test_view_window(size, zoom, centre, expected):
    assert view_window(*size, zoom, centre) == expected


def test_pan_moves_half_a_window_and_stays_inside():
    view = view_window(384, 288, 2, None)
    right = view_window(384, 288, 2, pan(view, 1, 0))
    assert right == View(192, 72, 192, 144)
    assert view_window(384, 288, 2, pan(right, 1, 0)) == right  # at the edge already
    assert view_window(384, 288, 2, pan(view, 0, -1)) == View(96, 0, 192, 144)

"""The draft of marks on the label page: pure list edits and the zoom window.

A mark is ``(x, y, label)`` in original image pixels. These helpers only edit the
student's draft before it is submitted; storing it is
:func:`cellspot.workflows.classroom.submit_run`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cellspot.render import find_mark

Mark = tuple[float, float, str]
ZOOMS = (1, 2, 4)


def apply_click(marks: Sequence[Mark], x: float, y: float, label: str, tolerance: float) -> list[Mark]:
    """The marks after a click at image pixel ``(x, y)`` with ``label`` picked.

    On an existing mark (within ``tolerance`` px): removed when it has ``label``, else
    relabelled to ``label``. Elsewhere: a new mark is added.
    """
    out = [tuple(m) for m in marks]
    hit = find_mark(out, x, y, tolerance)
    if hit is None:
        out.append((float(x), float(y), label))
    elif out[hit][2] == label:
        del out[hit]
    else:
        out[hit] = (out[hit][0], out[hit][1], label)
    return out  # type: ignore[return-value]


def counts(marks: Sequence[Mark]) -> dict[str, int]:
    """Marks per label: ``{"alive": n, "dead": n, "not_sure": n}``."""
    out = {"alive": 0, "dead": 0, "not_sure": 0}
    for _x, _y, label in marks:
        out[label] = out.get(label, 0) + 1
    return out


@dataclass(frozen=True)
class View:
    """The part of an image on screen: ``x0, y0`` (top-left, image px), ``width x height``."""

    x0: int
    y0: int
    width: int
    height: int

    def contains(self, x: float, y: float, margin: float = 0.0) -> bool:
        return (self.x0 - margin <= x < self.x0 + self.width + margin
                and self.y0 - margin <= y < self.y0 + self.height + margin)


def view_window(width: int, height: int, zoom: int, centre: tuple[float, float] | None) -> View:
    """The window of a ``width x height`` image at ``zoom`` around ``centre`` (image px).

    ``zoom`` 1 shows the whole image; ``z`` shows ``ceil(width / z) x ceil(height / z)``
    pixels, moved so the window stays inside the image.
    """
    zoom = max(1, int(zoom))
    w, h = max(1, math.ceil(width / zoom)), max(1, math.ceil(height / zoom))
    cx, cy = centre if centre is not None else (width / 2, height / 2)
    x0 = int(min(max(round(cx - w / 2), 0), width - w))
    y0 = int(min(max(round(cy - h / 2), 0), height - h))
    return View(x0, y0, w, h)


def pan(view: View, dx: int, dy: int) -> tuple[float, float]:
    """The centre after moving ``view`` by ``(dx, dy)`` half-windows."""
    return (view.x0 + view.width / 2 + dx * view.width / 2,
            view.y0 + view.height / 2 + dy * view.height / 2)

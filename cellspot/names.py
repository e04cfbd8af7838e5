"""What a name typed or imported may hold: the one rule for nicknames, project, image and
annotator names."""

from __future__ import annotations

import unicodedata
from collections.abc import Collection
from pathlib import PurePosixPath


def has_control_character(text: str, allowed: Collection[str] = ()) -> bool:
    """Whether ``text`` holds a control or format character (a NUL, a tab, a line break, a
    bidi override, a zero-width space) or a line or paragraph separator, other than ``allowed``."""
    return any((unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp"))
               and ch not in allowed for ch in text)


def tidy_spaces(text: str) -> str:
    """``text`` without whitespace at either end and with each run of whitespace inside (spaces,
    tabs, line breaks) made one space: how a project name typed on the Setup page is stored."""
    return " ".join(text.split())


def tidying_note(typed: str) -> str:
    """What :func:`tidy_spaces` changes in ``typed``, in words for the person who typed it
    (``"spaces around the name removed"``), or ``""`` when it changes nothing."""
    inner = typed.strip()
    notes = (["spaces around the name removed"] if inner != typed else []) + (
        ["tabs, line breaks and runs of spaces inside the name made one space"] if tidy_spaces(inner) != inner else [])
    return "; ".join(notes)


class ImageNames:
    """The image names of a project (and an import), to find the one a CSV row means: a file
    name, or one without its extension (metadata and expert-cells CSVs both accept either)."""

    def __init__(self, names: Collection[str]) -> None:
        self.names = set(names)
        self.by_stem: dict[str, list[str]] = {}
        for name in sorted(self.names):
            self.by_stem.setdefault(PurePosixPath(name).stem, []).append(name)

    def match(self, name: str) -> tuple[str | None, list[str]]:
        """``(the image name, [])``; ``(None, the names it could mean)`` when ``name`` has no
        extension and several images share it; ``(None, [])`` when it names none."""
        if name in self.names:
            return name, []
        alike = self.by_stem.get(name, [])
        return (alike[0], []) if len(alike) == 1 else (None, list(alike))

    @staticmethod
    def reason(name: str, alike: list[str], where: str) -> str:
        """Why ``name`` matches no single image (:meth:`match`'s ``alike``), in words; ``where``
        says which images were looked at ("in this import or the project")."""
        if alike:
            return f"{name!r} matches {len(alike)} images ({', '.join(alike)}); give the full file name"
        return f"no image named {name!r} {where}"

"""What a name typed or imported may hold: the one rule for nicknames, project, image and
annotator names."""

from __future__ import annotations

import unicodedata
from collections.abc import Collection


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

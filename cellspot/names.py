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

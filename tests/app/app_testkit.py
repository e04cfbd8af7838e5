"""Constants shared by the app tests (a module with its own name: every test folder has a
``conftest`` module, so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP_SCRIPT = REPO / "app" / "cellspot_app.py"
PASSWORD = "correct horse battery"
CLASS_CODE = "DEMO"

if str(APP_SCRIPT.parent) not in sys.path:  # `appkit` (the pages' helpers) for unit tests
    sys.path.append(str(APP_SCRIPT.parent))


# --------------------------------------------------------------------------- AppTest helpers
# (imported lazily where they need streamlit or sqlalchemy, so this module stays a plain import)


def texts(elements) -> str:
    """The elements' texts as a reader sees them: markdown escapes (``created\\.``) removed."""
    import re

    return re.sub(r"\\(.)", r"\1", "\n".join(str(e.value) for e in elements))


def titles(at) -> list[str]:
    return [t.value for t in at.title]


def no_exception(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


def join(at, code: str = CLASS_CODE, nickname: str = "ana"):
    """The join form filled in and sent."""
    at.run()
    at.text_input(key="join_code").input(code)
    at.text_input(key="join_nickname").input(nickname)
    at.button[0].click().run()
    no_exception(at)
    return at


def start_labelling(at, nickname: str = "ana"):
    """Joined, tutorial skipped: the label page."""
    join(at, nickname=nickname)
    at.button(key="skip").click().run()
    no_exception(at)
    return at


def login(at, password: str = PASSWORD):
    """A researcher logged in."""
    at.run()
    at.switch_page("views/login.py").run()
    at.text_input(key="login_password").input(password)
    at.button[0].click().run()
    no_exception(at)
    return at


def new_session():
    """Another browser session (another device), nothing in it yet."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
    at.secrets["unused"] = "tests use CELLSPOT_RESEARCHER_PASSWORD only"
    return at


def reload(nickname: str, code: str = CLASS_CODE):
    """A reload of the student's tab (or a second tab): a new session at the same URL, with
    the class code and nickname in it, nothing else."""
    at = new_session()
    at.query_params["class"] = code
    at.query_params["nick"] = nickname
    at.run()
    no_exception(at)
    return at


def click_image(at, x: float, y: float, shown_width: float = 384, stamp: float = 1.0):
    """A click at display pixel (x, y) on the clickable image shown ``shown_width`` px wide, at
    browser time ``stamp`` seconds (the component sends milliseconds)."""
    key = f"canvas-{at.session_state['task']['client_key']}"
    view = at.session_state[f"{key}.view"]
    at.session_state[key] = {"x": x, "y": y, "width": shown_width,
                             "height": shown_width * view.height / view.width, "unix_time": int(stamp * 1000)}
    return at.run()


def count(engine, model, *where) -> int:
    """Rows of ``model`` in the store (``where``: filters)."""
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0

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

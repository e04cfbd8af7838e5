"""Running the ``cellspot`` CLI in-process for the tests (click's CliRunner)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from cellspot.cli import main


def run_cli(*args: str | Path) -> Result:
    """``cellspot ARGS...`` in-process; the arguments may be paths."""
    return CliRunner().invoke(main, [str(a) for a in args])


def ok_cli(*args: str | Path) -> Result:
    """:func:`run_cli` that must succeed: exit code 0 and no traceback in the output."""
    result = run_cli(*args)
    assert result.exit_code == 0, f"cellspot {' '.join(map(str, args))} failed:\n{result.output}"
    assert "Traceback" not in result.output
    return result

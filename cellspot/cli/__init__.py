"""The ``cellspot`` command line. Sub-modules add commands; heavy imports stay inside commands."""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """cellspot: crowd clicks on microscopy images -> trustworthy cell datasets and models."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from cellspot.cli import consensus_cmds  # noqa: F401

    for name in ("store_cmds", "import_cmds", "export_cmds", "demo_cmds"):
        try:
            __import__(f"cellspot.cli.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - while modules are being written
            if exc.name != f"cellspot.cli.{name}":
                raise


_register()

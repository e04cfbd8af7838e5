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


# Command modules register themselves on ``main``; imported last so ``main`` exists.
from cellspot.cli import (  # noqa: E402,F401
    app_cmds,
    consensus_cmds,
    demo_cmds,
    export_cmds,
    import_cmds,
    model_cmds,
    predict_cmds,
    queue_cmds,
    round_cmds,
    store_cmds,
)

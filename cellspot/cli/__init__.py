"""The ``cellspot`` command line. Sub-modules add commands; heavy imports stay inside commands."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

log = logging.getLogger(__name__)


class _Main(click.Group):
    """The command group; a store that cannot be opened (bad ``CELLSPOT_DATABASE_URL``, a file
    that is no database, a server that does not answer, ``CELLSPOT_HOME`` not a folder) ends any
    command with one clear line instead of a traceback (the traceback is logged with ``-vv``); so
    does any other operating-system error (an output folder that cannot be created, a read-only
    disk, no permission)."""

    def invoke(self, ctx: click.Context):
        from pydantic import ValidationError
        from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, OperationalError

        from cellspot.store.migrate import MigrationError

        try:
            return super().invoke(ctx)
        except ValidationError as exc:  # a CELLSPOT_* variable with a bad value
            if exc.title != "Settings":
                raise
            bad = "; ".join(f"CELLSPOT_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
                            for e in exc.errors())
            raise click.ClickException(f"bad setting: {bad}") from None
        except MigrationError as exc:  # names the copy of the store made before it
            log.debug("migration error", exc_info=True)
            raise click.ClickException(str(exc)) from None
        except IntegrityError as exc:  # a unique row written by another command at the same moment
            log.debug("store conflict", exc_info=True)
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise click.ClickException(
                f"another command wrote the same rows at the same moment ({reason}); nothing of this one was "
                "stored: run it again") from None
        except (ArgumentError, DatabaseError, OperationalError) as exc:
            log.debug("store error", exc_info=True)
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise click.ClickException(
                f"cannot use the database: {reason} ({type(exc).__name__}); check CELLSPOT_DATABASE_URL "
                f"and CELLSPOT_HOME, and run `cellspot init` for a new store") from None
        except OSError as exc:  # a folder that cannot be created, a read-only disk, no permission, ...
            log.debug("file system error", exc_info=True)
            raise click.ClickException(f"{os_error_text(exc)} (check CELLSPOT_HOME and the paths given)") from None


def os_error_text(exc: OSError) -> str:
    """The error in words; "File exists" from creating a folder where a file is says so."""
    from pathlib import Path

    if isinstance(exc, FileExistsError) and exc.filename and Path(exc.filename).is_file():
        return f"{exc.filename} is a file where a folder is needed"
    return str(exc)


def scoring_note(sources, strategy: str, what: str) -> str | None:  # noqa: ANN001 - ScoringSources
    """What ``queue`` and ``round open`` say about the models a ranking scored, or None when it
    scored the active ones (or none exist and the strategy does not need them). ``sources``: a
    :class:`cellspot.workflows.rounds.ScoringSources`; ``what``: "this round" / "this ranking"."""
    from cellspot.active.strategies import get_strategy

    needs_model = get_strategy(strategy).needs_model
    if sources.stale:
        active = " + ".join(v for v in (sources.active_detector, sources.active_classifier) if v)
        scored = " + ".join(v for v in (sources.scored_detector, sources.scored_classifier) if v)
        used = (f"used the stored predictions of {scored}" if scored else
                "used no model" + (f", and with strategy {strategy!r} every image ties" if needs_model else ""))
        return (f"note: the active models ({active}) have not predicted this project yet, so {what} {used}; "
                "predict the project's images (\"Predict project\" on the Models page, or `cellspot predict "
                "IMAGES_DIR --out DIR --project NAME` on the folder of its images), then rank again")
    if sources.crowd_only and needs_model:
        return no_model_warning(strategy)
    return None


def no_model_warning(strategy: str) -> str:
    """The warning of ``queue`` and ``round open`` for a strategy that scores model predictions
    only (``needs_model``) when no model has predicted the project."""
    from cellspot.active.strategies import DEFAULT_STRATEGY

    return (f"warning: strategy {strategy!r} scores model predictions and no active model has predicted this "
            f"project, so every image ties; train and promote a model, or use --strategy {DEFAULT_STRATEGY} "
            "(crowd and coverage signals before any model)")


class _ProjectName(click.ParamType):
    """``--project NAME``: a non-empty name without spaces at either end (an empty value, as from
    an unset shell variable, is an error, not the default project)."""

    name = "NAME"

    def convert(self, value, param, ctx):
        from cellspot.store.queries import check_project_name

        try:
            return check_project_name(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


PROJECT = _ProjectName()


class _StrategyName(click.ParamType):
    """``--strategy NAME``: refused when empty (an unset shell variable), never the default; an
    unknown name is refused by the command, with the valid ones."""

    name = "NAME"

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("needs a strategy name; got an empty value (see `cellspot queue --list-strategies`)", param, ctx)
        return value


STRATEGY = _StrategyName()


class _OutDir(click.Path):
    """A folder to write into (``--out`` of train / predict, export's OUTDIR): not a file, and
    refused when empty (an unset shell variable would write into the current folder)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        if not str(value).strip():
            self.fail("needs a folder; got an empty value", param, ctx)
        return super().convert(value, param, ctx)


OUT_DIR = _OutDir()


class OutFile(click.Path):
    """``--out FILE``: a CSV file to write (not an existing folder), refused when empty (an unset
    shell variable) or written as a folder (``sub/``), which would otherwise write a file named
    ``sub``. An existing file is replaced only when it is empty or a CSV of the same kind, one whose
    first line starts with ``header`` (what this option writes): any other file (the store's
    database, a user's spreadsheet) is refused before anything runs, as ``export --overwrite``
    replaces only an export. ``example``: the file name the folder error suggests."""

    def __init__(self, header: str, what: str, example: str) -> None:
        super().__init__(dir_okay=False, path_type=Path)
        self.header, self.what, self.example = header, what, example

    def convert(self, value, param, ctx):
        text = str(value)
        if not text.strip():
            self.fail("needs a file name; got an empty value", param, ctx)
        if text.endswith(("/", os.sep)):
            self.fail(f"{text!r} names a folder; give a file name in it, e.g. {text}{self.example}", param, ctx)
        path = super().convert(value, param, ctx)
        found = _first_line(path)
        if found is not None and found and not found.replace('"', "").startswith(self.header):
            shown = "binary data, not a CSV file" if "\0" in found else f"its first line is {found[:80]!r}"
            self.fail(f"{path} exists and is not a {self.what} ({shown}); it is left as it is: "
                      "remove it or choose another file", param, ctx)
        return path


def _first_line(path: Path) -> str | None:
    """The first line of an existing file ('' when empty), None when there is no readable file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:  # no such file, or unreadable (the write then reports why)
        return None
    return head.decode("utf-8", errors="replace").lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")


OUT_FILE = OutFile("image,score,strategy,reason", "queue CSV written by cellspot queue", "queue.csv")


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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

"""Fast CSV input/output for the stateless ``cellspot consensus`` command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from cellspot.consensus.types import CELL_COLUMNS, ConsensusInputError, prepare_clicks

REQUIRED = ("image", "annotator", "x", "y", "label")
_ROW_PREFIX = re.compile(r"^row \d+, ")


def read_clicks_csv(path: Path) -> pd.DataFrame:
    """Read ``image,annotator,x,y,label[,task_run]`` (other columns ignored).

    Identifiers are read as text exactly as written (``007`` stays ``007``). Raises
    :class:`ConsensusInputError` naming the file, and the CSV line and field of a bad row.
    """
    try:
        header = pd.read_csv(path, nrows=0).columns
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConsensusInputError(f"{path}: not a readable CSV file (UTF-8, with a header line): {exc}") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConsensusInputError(
            f"{path}: missing column(s) {missing}; needs image, annotator, x, y, label "
            f"(task_run optional); found {list(header)}"
        )
    usecols = [c for c in (*REQUIRED, "task_run") if c in header]
    text = {c: pa.string() for c in ("image", "annotator", "label", "task_run") if c in usecols}
    options = pacsv.ConvertOptions(include_columns=usecols, column_types=text, strings_can_be_null=False)
    invalid: list[Any] = []  # the first row with a wrong number of fields, to name its line

    def on_invalid_row(row: Any) -> str:
        invalid.append(row)
        return "error"

    try:
        table = pacsv.read_csv(path, convert_options=options,
                               parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid_row))
    except (pa.ArrowInvalid, ValueError) as exc:
        if invalid:
            row = invalid[0]
            line = _line_of(path, row.text)
            raise ConsensusInputError(
                f"{path}{f', line {line}' if line else ''}: {row.actual_columns} fields where the header has "
                f"{row.expected_columns}: {row.text[:200]!r}") from None
        raise ConsensusInputError(f"{path}: cannot parse as click CSV: {exc}") from exc
    df = table.to_pandas()
    for col in text:
        df[col] = df[col].astype(object)
    try:
        return prepare_clicks(df)
    except ConsensusInputError as exc:
        if exc.row is None:
            raise ConsensusInputError(f"{path}: {exc}") from exc
        # the row index means nothing to the reader of the file: the line replaces it (found again
        # in the file, since the reader skipped blank lines and quoted fields may span lines)
        from cellspot.importers.csvtools import data_record_line  # the error path only: keeps the CLI light

        line = data_record_line(path, exc.row) or exc.row + 2
        raise ConsensusInputError(f"{path}, line {line}: {_ROW_PREFIX.sub('', str(exc))}", row=exc.row) from exc


def _line_of(path: Path, text: str) -> int | None:
    """The 1-based line of ``path`` that reads ``text`` (None when no line does)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if line.rstrip("\r\n") == text:
                return number
    return None


def write_cells_csv(cells: pd.DataFrame, path: Path) -> None:
    """Write the cells table with the standard columns first, then any extra ones."""
    cols = CELL_COLUMNS + [c for c in cells.columns if c not in CELL_COLUMNS]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table = cells[cols].copy()
    for col in ("x", "y"):
        table[col] = table[col].round(2)
    for col in ("p_alive", "confidence", "p_cell"):
        table[col] = table[col].round(4)
    pacsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), tmp,
                    write_options=pacsv.WriteOptions(quoting_style="needed"))
    tmp.replace(path)

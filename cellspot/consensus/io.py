"""Fast CSV input/output for the stateless ``cellspot consensus`` command."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
    # only an empty field is missing: a written "nan" or "NA" is a bad value, shown as written
    options = pacsv.ConvertOptions(include_columns=usecols, column_types=text, strings_can_be_null=False,
                                   null_values=[""])
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
    for col in ("x", "y"):  # a written nan / inf parses as a float; keep its text for the error
        column = table.column(col)
        if pa.types.is_floating(column.type) and not pc.all(pc.is_finite(column)).as_py():
            table = table.set_column(table.schema.get_field_index(col), col, pc.cast(column, pa.string()))
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
    _write_csv_quoted_as_needed(table, tmp)
    tmp.replace(path)


def _write_csv_quoted_as_needed(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` as CSV quoting only the fields that need it, as the other CSVs do.

    pyarrow writes fast but quotes every text field ("needed") or none ("none", which refuses
    a value holding a comma, quote or newline); it writes the body unquoted and pandas the
    whole file when a value needs quotes."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerow(table.columns)
    try:
        with open(path, "ab") as handle:
            pacsv.write_csv(pa.Table.from_pandas(table, preserve_index=False), handle,
                            write_options=pacsv.WriteOptions(include_header=False, quoting_style="none"))
    except pa.ArrowInvalid:  # a value with a comma, a quote or a line break
        table.to_csv(path, index=False, lineterminator="\n")

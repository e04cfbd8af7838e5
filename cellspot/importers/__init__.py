"""Importers: images (files, folders, zip; any bit depth), crowd clicks (tidy CSV, PyBossa
export) and expert gold cells. Each takes a caller-owned session and never commits.
"""

from cellspot.importers.clicks import (
    ClickImportReport,
    ParsedClicks,
    import_clicks,
    parse_clicks,
    parse_pybossa_taskruns,
    parse_tidy_csv,
)
from cellspot.importers.errors import (
    CellspotImportError,
    ClickImportError,
    GoldImportError,
    ImageImportError,
    ImportProblem,
)
from cellspot.importers.gold import GoldImportReport, import_gold, parse_gold_csv
from cellspot.importers.images import ImageImportReport, import_images, read_metadata_csv

__all__ = [
    "CellspotImportError",
    "ClickImportError",
    "ClickImportReport",
    "GoldImportError",
    "GoldImportReport",
    "ImageImportError",
    "ImageImportReport",
    "ImportProblem",
    "ParsedClicks",
    "import_clicks",
    "import_gold",
    "import_images",
    "parse_clicks",
    "parse_gold_csv",
    "parse_pybossa_taskruns",
    "parse_tidy_csv",
    "read_metadata_csv",
]

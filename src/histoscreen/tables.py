"""CSV tables, written atomically and safe to open in a spreadsheet; every CSV histoscreen
writes goes through here.

A cell that begins with =, +, -, @ (or a tab or carriage return) is run as a formula by
Excel and LibreOffice; folder and file names end up in our CSVs, so such text cells get
a leading apostrophe (OWASP's advice against CSV injection). Numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from numbers import Number
from pathlib import Path
from typing import TYPE_CHECKING

from histoscreen.atomic import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd

_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: object) -> object:
    """`cell` as it may be written to a CSV: text that a spreadsheet would run is quoted.

    >>> spreadsheet_safe("=HYPERLINK(1)"), spreadsheet_safe(-1.5), spreadsheet_safe("900000")
    ("'=HYPERLINK(1)", -1.5, '900000')
    """
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for row in rows:
        writer.writerow([spreadsheet_safe(cell) if not isinstance(cell, Number) else cell for cell in row])
    return buffer.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]], *, replace: bool = True) -> None:
    atomic_write_text(path, csv_text(header, rows), replace=replace)


def write_frame(path: Path, frame: pd.DataFrame, float_format: str | None = None, *, replace: bool = True) -> None:
    """A DataFrame as CSV (missing values as empty cells), text cells made safe."""
    import pandas as pd

    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(spreadsheet_safe)
    atomic_write_text(path, safe.to_csv(index=False, float_format=float_format), replace=replace)

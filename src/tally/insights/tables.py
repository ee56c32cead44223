"""Answer rows as tables: RFC 4180 CSV (``Accept: text/csv``, CSV exports) — one writer."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any


def _field(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def csv_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str],
             header: bool = True) -> bytes:
    """``rows`` (JSON answer rows) as RFC 4180 CSV, ``columns`` first as its header row
    (``header``: a first page)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(columns)
    for row in rows:
        writer.writerow([_field(row.get(column)) for column in columns])
    return out.getvalue().encode()

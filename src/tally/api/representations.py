"""An answer as CSV (``Accept: text/csv`` on timeseries and slice, CONTRACT §8): the same rows
as the JSON answer's ``series`` or ``items``, one line each, in the same order.

RFC 4180: a header row, CRLF line ends, fields quoted only when they hold a comma, a quote
or a line break, UTF-8. A ``null`` is an empty field, a boolean ``true``/``false``, a number
as JSON writes it (integers whole: money stays in minor units). The answer's envelope is in
the headers: the next page as ``Link: <…>; rel="next"`` (RFC 8288), the metric and currency
in the file name of ``Content-Disposition``.

The representation is chosen by the ``Accept`` header's weights (RFC 9110 §12.5.1, read by
``api/strict.py``) between ``application/json`` (also the default, and what a tie gives) and
``text/csv``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request

from tally.api.strict import quality
from tally.insights.tables import csv_rows

__all__ = ["CSV", "CSV_MEDIA_TYPE", "csv_headers", "csv_rows", "wants_csv"]

JSON, CSV = "application/json", "text/csv"
CSV_MEDIA_TYPE = "text/csv; charset=utf-8; header=present"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def wants_csv(request: Request) -> bool:
    """Whether the client prefers CSV to JSON (no ``Accept``, or a tie: JSON). An ``Accept``
    that allows neither was answered ``406`` before (``api/strict.py``)."""
    accept = request.headers.get("accept")
    if not accept:
        return False
    return quality(accept, CSV) > quality(accept, JSON)


def csv_headers(request: Request, answer: dict[str, Any], name: Sequence[str]) -> dict[str, str]:
    """The envelope of a CSV answer: ``Link`` to the next page (the request with its cursor),
    and a file name of ``name``'s parts (e.g. metric, granularity, currency)."""
    stem = _SAFE_NAME.sub("_", "-".join(part for part in name if part)) or "answer"
    headers = {"Content-Disposition": f'inline; filename="{stem}.csv"'}
    cursor = answer.get("next_cursor")
    if cursor:
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
        headers["Link"] = (f'<{request.url.path}?{urlencode([*params, ("cursor", cursor)])}>; '
                           'rel="next"')
    return headers

"""ETag / If-None-Match, Cache-Control by granularity and the data watermark.

The ETag of an answer is derived before computing it, from the request's meaning and the data
versions it reads (the latest change to its brands on the days of its range, and the FX
version): a late event for the range changes the tag, an event elsewhere does not, and a
``304`` costs no query. The same tag keys the answer cache (``insights/cache.py``), so
ingestion invalidates it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from fastapi import Request, Response

MAX_AGE = {"1m": 30, "5m": 60, "1h": 300, "1d": 900}  # seconds; slices: 60
SLICE_MAX_AGE = 60
COHORT_MAX_AGE = 300  # funnels, retention, LTV: day-scale answers


def etag_for(fingerprint: str, data_version: int, fx_version: int) -> str:
    digest = hashlib.sha256(f"{fingerprint}|{data_version}|{fx_version}".encode())
    return '"' + digest.hexdigest()[:32] + '"'


def format_watermark(latest: datetime | None, lateness: int) -> str:
    """The greatest accepted occurred_at in the answer's brands, less the allowed lateness."""
    if latest is None:
        return "1970-01-01T00:00:00Z"
    return (latest - timedelta(seconds=lateness)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def not_modified(request: Request, etag: str) -> bool:
    match = request.headers.get("if-none-match", "")
    return match.strip() == "*" or etag in [tag.strip() for tag in match.split(",")]


def headers(etag: str, max_age: int, data_watermark: str) -> dict[str, str]:
    return {"ETag": etag, "Cache-Control": f"private, max-age={max_age}",
            "X-Data-Watermark": data_watermark, "Vary": "Authorization, Accept"}


def respond(etag: str, content: bytes | None, max_age: int, data_watermark: str,
            media_type: str = "application/json",
            extra: dict[str, str] | None = None) -> Response:
    """The answer (``None``: ``304``) with its validators; ``extra`` headers on a ``200``."""
    h = headers(etag, max_age, data_watermark)
    if content is None:
        return Response(status_code=304, headers=h)
    return Response(content, media_type=media_type, headers={**h, **(extra or {})})

"""ETag / If-None-Match, Cache-Control by granularity, and the data watermark header."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import msgspec
from fastapi import Request, Response

from tally.storage.base import Backend

MAX_AGE = {"1m": 30, "5m": 60, "1h": 300, "1d": 900}  # seconds; slices: 60
SLICE_MAX_AGE = 60


def watermark(backend: Backend, brands: tuple[str, ...] | None, lateness: int) -> str:
    """The greatest accepted occurred_at in the answer's brands, less the allowed lateness."""
    sql = "SELECT max(occurred_at) FROM events"
    params: list[str] = []
    if brands is not None:
        sql += f" WHERE tenant_id IN ({', '.join('?' for _ in brands)})"
        params = list(brands)
    latest = backend.query(sql, params).column(0)[0].as_py()
    if latest is None:
        return "1970-01-01T00:00:00Z"
    return str((latest - timedelta(seconds=lateness)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


def cached_json(request: Request, body: dict[str, object], max_age: int,
                data_watermark: str) -> Response:
    """A JSON answer with a strong ETag of its bytes: data that changes the answer changes
    the tag, data elsewhere does not. ``If-None-Match`` with it gives 304."""
    content = msgspec.json.encode(body)
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": f"private, max-age={max_age}",
               "X-Data-Watermark": data_watermark, "Vary": "Authorization"}
    match = request.headers.get("if-none-match", "")
    if etag in [tag.strip() for tag in match.split(",")] or match.strip() == "*":
        return Response(status_code=304, headers=headers)
    return Response(content, media_type="application/json", headers=headers)

"""``GET /v1/admin/audit`` (entries, cursor paging) and ``GET /v1/admin/audit/verify``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tally.api.cursors import MAX_POSITION, decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.insights.request import parse_bounded_int

router = APIRouter(tags=["admin"])
NO_STORE = {"Cache-Control": "private, no-store"}


@router.get("/v1/admin/audit", summary="Audit log entries, oldest first")
async def list_audit(
    request: Request,
    _: Admin,
    runtime: RuntimeDep,
    after: Annotated[str | None, Query(description="Entries with seq greater than this.")] = None,
    cursor: str | None = None,
    limit: Annotated[str | None, Query(description="1 to 1000 (default 100).")] = None,
) -> JSONResponse:
    size = parse_bounded_int(limit, "limit", 1, 1000, default=100)
    first = parse_bounded_int(after, "after", 0, MAX_POSITION, default=0)
    start = decode_cursor("a", cursor) if cursor else first
    rows = await asyncio.to_thread(runtime.audit.entries, start, size + 1)
    page = rows[:size]
    request.state.audit_rows = len(page)
    next_cursor = encode_cursor("a", int(page[-1]["seq"])) if len(rows) > size else None
    return JSONResponse({"items": page, "next_cursor": next_cursor}, headers=NO_STORE)


@router.get("/v1/admin/audit/verify",
            summary="Verify the audit log now: chain, signed checkpoints, length")
async def verify_audit(_: Admin, runtime: RuntimeDep) -> JSONResponse:
    verdict = await asyncio.to_thread(runtime.audit.verify)
    status = await asyncio.to_thread(runtime.audit.status)
    return JSONResponse({**verdict.public(), **status}, headers=NO_STORE)

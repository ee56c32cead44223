"""``GET /v1/admin/audit`` (entries, cursor paging) and ``GET /v1/admin/audit/verify``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep

router = APIRouter(tags=["admin"])
NO_STORE = {"Cache-Control": "private, no-store"}


@router.get("/v1/admin/audit", summary="Audit log entries, oldest first")
async def list_audit(
    request: Request,
    _: Admin,
    runtime: RuntimeDep,
    after: Annotated[int, Query(ge=0, description="Entries with seq greater than this.")] = 0,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    start = decode_cursor("a", cursor) if cursor else after
    rows = await asyncio.to_thread(runtime.audit.entries, start, limit + 1)
    page = rows[:limit]
    request.state.audit_rows = len(page)
    next_cursor = encode_cursor("a", int(page[-1]["seq"])) if len(rows) > limit else None
    return JSONResponse({"items": page, "next_cursor": next_cursor}, headers=NO_STORE)


@router.get("/v1/admin/audit/verify",
            summary="Verify the audit log now: chain, signed checkpoints, length")
async def verify_audit(_: Admin, runtime: RuntimeDep) -> JSONResponse:
    verdict = await asyncio.to_thread(runtime.audit.verify)
    status = await asyncio.to_thread(runtime.audit.status)
    return JSONResponse({**verdict.public(), **status}, headers=NO_STORE)

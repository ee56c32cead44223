"""``GET /v1/admin/audit`` (entries, cursor paging) and ``GET /v1/admin/audit/verify``.

Both obey the caller's limits (``security/policy.py``): an admin with limits reads only the
entries of calls provably inside them (its own client's, and those of clients registered with
limits inside its own), and verifying the whole log — which reports on every entry — needs an
admin without limits.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tally.api.cursors import MAX_POSITION, decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.audit.log import EntryPage
from tally.insights.request import parse_bounded_int
from tally.runtime import Runtime
from tally.security import policy
from tally.security.clients import registered_clients
from tally.security.tokens import Principal

router = APIRouter(tags=["admin"])
NO_STORE = {"Cache-Control": "private, no-store"}


@router.get("/v1/admin/audit", summary="Audit log entries, oldest first")
async def list_audit(
    request: Request,
    principal: Admin,
    runtime: RuntimeDep,
    after: Annotated[str | None, Query(description="Entries with seq greater than this.")] = None,
    cursor: str | None = None,
    limit: Annotated[str | None, Query(description="1 to 1000 (default 100).")] = None,
) -> JSONResponse:
    size = parse_bounded_int(limit, "limit", 1, 1000, default=100)
    first = parse_bounded_int(after, "after", 0, MAX_POSITION, default=0)
    start = decode_cursor("a", cursor) if cursor else first
    page = await asyncio.to_thread(_readable_page, runtime, principal, start, size)
    request.state.audit_rows = len(page.items)
    next_cursor = None if page.next_after is None else encode_cursor("a", page.next_after)
    return JSONResponse({"items": page.items, "next_cursor": next_cursor}, headers=NO_STORE)


def _readable_page(runtime: Runtime, principal: Principal, after: int,
                   limit: int) -> EntryPage:
    actors = policy.audit_actors(principal, registered_clients(runtime.meta))
    return runtime.audit.entries(after, limit, actors)


@router.get("/v1/admin/audit/verify",
            summary="Verify the audit log now: chain, signed checkpoints, length")
async def verify_audit(principal: Admin, runtime: RuntimeDep) -> JSONResponse:
    policy.require_unrestricted(principal, "verifying the audit log")
    verdict = await asyncio.to_thread(runtime.audit.verify)
    status = await asyncio.to_thread(runtime.audit.status)
    return JSONResponse({**verdict.public(), **status}, headers=NO_STORE)

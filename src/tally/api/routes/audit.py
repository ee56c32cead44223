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

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.api.models import AuditQuery
from tally.audit.log import EntryPage
from tally.runtime import Runtime
from tally.security import policy
from tally.security.clients import registered_clients
from tally.security.tokens import Principal

router = APIRouter(tags=["admin"])
NO_STORE = {"Cache-Control": "private, no-store"}


@router.get("/v1/admin/audit", summary="Audit log entries, oldest first", response_model=None,
            responses={200: {"model": answers.AuditPage}, **problems(*AUTHED)})
async def list_audit(
    request: Request,
    principal: Admin,
    runtime: RuntimeDep,
    q: Annotated[AuditQuery, Query()],
) -> JSONResponse:
    size = q.limit or 100
    start = decode_cursor("a", q.cursor) if q.cursor else (q.after or 0)
    page = await asyncio.to_thread(_readable_page, runtime, principal, start, size)
    request.state.audit_rows = len(page.items)
    next_cursor = None if page.next_after is None else encode_cursor("a", page.next_after)
    return JSONResponse({"items": page.items, "next_cursor": next_cursor}, headers=NO_STORE)


def _readable_page(runtime: Runtime, principal: Principal, after: int,
                   limit: int) -> EntryPage:
    actors = policy.audit_actors(principal, registered_clients(runtime.meta))
    return runtime.audit.entries(after, limit, actors)


@router.get("/v1/admin/audit/verify",
            summary="Verify the audit log now: chain, signed checkpoints, length",
            response_model=None, responses={200: {"model": answers.Open},
                                            **problems(*AUTHED)})
async def verify_audit(principal: Admin, runtime: RuntimeDep) -> JSONResponse:
    policy.require_unrestricted(principal, "verifying the audit log")
    verdict = await asyncio.to_thread(runtime.audit.verify)
    status = await asyncio.to_thread(runtime.audit.status)
    return JSONResponse({**verdict.public(), **status}, headers=NO_STORE)

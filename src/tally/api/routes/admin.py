"""Operator routes: FX rates and the quarantine of rejected events.

They obey the caller's limits like every other route (``security/policy.py``): the quarantine
is confined to the token's brands and regions, and setting FX rates — which changes every
brand's money answers — needs an admin without limits. Reading the rates is open to any admin.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.errors import BadRequest
from tally.insights.request import parse_bounded_int
from tally.json_input import ANY, decode
from tally.security import policy
from tally.semantic.fx import parse_rates

router = APIRouter(tags=["admin"])
QUARANTINE_LIMIT = Query(description="Items per page, 1 to 1000 (default 100).")


@router.post("/v1/admin/fx-rates", summary="Append FX rates (append-only, per UTC day)")
async def add_fx_rates(request: Request, principal: Admin, runtime: RuntimeDep) -> JSONResponse:
    policy.require_unrestricted(principal, "setting FX rates")
    body = decode(await request.body(), "body", ANY)
    rows = parse_rates(body, runtime.fx.base)
    result = await asyncio.to_thread(runtime.fx.add, rows)
    return JSONResponse(result, headers={"Cache-Control": "no-store"})


@router.get("/v1/admin/fx-rates", summary="Every FX rate, by currency then date")
async def list_fx_rates(_: Admin, runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"base_currency": runtime.fx.base, "rates": runtime.fx.listing()},
                        headers={"Cache-Control": "private, no-store"})


FILTER_HELP = ("Only entries of this {0} (repeatable; values OR-ed). A {0} outside the "
               "token's limits is 403.")


@router.get("/v1/admin/quarantine", summary="Rejected events with their reasons, oldest first")
async def quarantine(
    principal: Admin,
    runtime: RuntimeDep,
    cursor: str | None = None,
    limit: Annotated[str | None, QUARANTINE_LIMIT] = None,
    brand_id: Annotated[list[str] | None, Query(description=FILTER_HELP.format("brand"))] = None,
    region: Annotated[list[str] | None, Query(description=FILTER_HELP.format("region"))] = None,
) -> Response:
    size = parse_bounded_int(limit, "limit", 1, 1000, default=100)
    scope = policy.confine_rows(principal, _named("brand_id", brand_id),
                                _named("region", region))
    after = decode_cursor("q", cursor) if cursor else 0
    # every acknowledged rejection is listed, if the applier gets it in within the bound
    await asyncio.to_thread(runtime.ingest.read_your_writes,
                            runtime.settings.read_your_writes_ms / 1000)
    rows = await asyncio.to_thread(runtime.backend.quarantine, after, size + 1, scope.brands,
                                   scope.regions)
    page = rows[:size]
    items: list[dict[str, Any]] = [
        {
            "received_at": row.received_at.isoformat(timespec="microseconds") + "Z",
            "reason": row.reason,
            # the text as sent, never decoded again: whatever its depth or numbers, it was
            # JSON when it came in (json_input), so it is JSON in the answer
            "event": msgspec.Raw(row.event.encode()),
            "event_id": row.event_id,
            "batch_index": row.batch_index,
            "client_id": row.client_id,
        }
        for row in page
    ]
    next_cursor = encode_cursor("q", page[-1].id) if len(rows) > size else None
    return Response(msgspec.json.encode({"items": items, "next_cursor": next_cursor}),
                    media_type="application/json",
                    headers={"Cache-Control": "private, no-store"})


def _named(key: str, values: list[str] | None) -> tuple[str, ...]:
    """A listing filter's values; an empty one is a mistake, not "any"."""
    for value in values or ():
        if not value.strip():
            raise BadRequest(f"{key} must not be empty", parameter=key)
    return tuple(values or ())

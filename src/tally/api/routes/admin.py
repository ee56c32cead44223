"""Operator routes: FX rates and the quarantine of rejected events."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.insights.request import parse_bounded_int
from tally.json_input import ANY, decode
from tally.semantic.fx import parse_rates

router = APIRouter(tags=["admin"])
QUARANTINE_LIMIT = Query(description="Items per page, 1 to 1000 (default 100).")


@router.post("/v1/admin/fx-rates", summary="Append FX rates (append-only, per UTC day)")
async def add_fx_rates(request: Request, _: Admin, runtime: RuntimeDep) -> JSONResponse:
    body = decode(await request.body(), "body", ANY)
    rows = parse_rates(body, runtime.fx.base)
    result = await asyncio.to_thread(runtime.fx.add, rows)
    return JSONResponse(result, headers={"Cache-Control": "no-store"})


@router.get("/v1/admin/fx-rates", summary="Every FX rate, by currency then date")
async def list_fx_rates(_: Admin, runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"base_currency": runtime.fx.base, "rates": runtime.fx.listing()},
                        headers={"Cache-Control": "private, no-store"})


@router.get("/v1/admin/quarantine", summary="Rejected events with their reasons, oldest first")
async def quarantine(
    _: Admin,
    runtime: RuntimeDep,
    cursor: str | None = None,
    limit: Annotated[str | None, QUARANTINE_LIMIT] = None,
) -> Response:
    size = parse_bounded_int(limit, "limit", 1, 1000, default=100)
    after = decode_cursor("q", cursor) if cursor else 0
    await asyncio.to_thread(runtime.ingest.flush)  # every acknowledged rejection is listed
    rows = runtime.backend.quarantine(after, size + 1)
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

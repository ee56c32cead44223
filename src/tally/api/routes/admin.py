"""Operator routes: the quarantine of rejected events."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.errors import BadRequest
from tally.semantic.fx import parse_rates

router = APIRouter(tags=["admin"])


@router.post("/v1/admin/fx-rates", summary="Append FX rates (append-only, per UTC day)")
async def add_fx_rates(request: Request, _: Admin, runtime: RuntimeDep) -> JSONResponse:
    try:
        body = msgspec.json.decode(await request.body())
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
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
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    after = decode_cursor("q", cursor) if cursor else 0
    # every acknowledged rejection is listed, if the applier gets it in within the bound
    await asyncio.to_thread(runtime.ingest.read_your_writes,
                            runtime.settings.read_your_writes_ms / 1000)
    rows = runtime.backend.quarantine(after, limit + 1)
    page = rows[:limit]
    items: list[dict[str, Any]] = [
        {
            "received_at": row.received_at.isoformat(timespec="microseconds") + "Z",
            "reason": row.reason,
            "event": msgspec.json.decode(row.event),
            "event_id": row.event_id,
            "batch_index": row.batch_index,
            "client_id": row.client_id,
        }
        for row in page
    ]
    next_cursor = encode_cursor("q", page[-1].id) if len(rows) > limit else None
    return JSONResponse({"items": items, "next_cursor": next_cursor},
                        headers={"Cache-Control": "private, no-store"})

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
from pydantic import RootModel

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.cursors import decode_cursor, encode_cursor
from tally.api.deps import Admin, RuntimeDep
from tally.api.models import FxRate, QuarantineQuery, validated
from tally.errors import InvalidParameter
from tally.json_input import ANY, decode
from tally.security import policy
from tally.semantic.fx import parse_rates

router = APIRouter(tags=["admin"])
MAX_RATES = 10_000


class FxRates(RootModel[list[FxRate]]):
    """``POST /v1/admin/fx-rates``: a JSON array of rates."""


@router.post("/v1/admin/fx-rates", summary="Append FX rates (append-only, per UTC day)",
             response_model=None,
             responses={200: {"model": answers.FxInserted}, **problems(*AUTHED, 409, 413, 415)},
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/FxRates"}}}}})
async def add_fx_rates(request: Request, principal: Admin, runtime: RuntimeDep) -> JSONResponse:
    policy.require_unrestricted(principal, "setting FX rates")
    body = decode(await request.body(), "body", ANY)
    rows = parse_rates(body, runtime.fx.base)  # the meaning, with its own messages
    validated(FxRates, body)  # and the documented shape, so the two cannot drift apart
    result = await asyncio.to_thread(runtime.fx.add, rows)
    return JSONResponse(result, headers={"Cache-Control": "no-store"})


@router.get("/v1/admin/fx-rates", summary="Every FX rate, by currency then date",
            response_model=None,
            responses={200: {"model": answers.FxListing}, **problems(*AUTHED)})
async def list_fx_rates(_: Admin, runtime: RuntimeDep) -> JSONResponse:
    return JSONResponse({"base_currency": runtime.fx.base, "rates": runtime.fx.listing()},
                        headers={"Cache-Control": "private, no-store"})


@router.get("/v1/admin/quarantine", summary="Rejected events with their reasons, oldest first",
            response_model=None,
            responses={200: {"model": answers.Quarantine}, **problems(*AUTHED)})
async def quarantine(
    principal: Admin,
    runtime: RuntimeDep,
    q: Annotated[QuarantineQuery, Query()],
) -> Response:
    size = q.limit or 100
    scope = policy.confine_rows(principal, _named("brand_id", q.brand_id),
                                _named("region", q.region))
    after = decode_cursor("q", q.cursor) if q.cursor else 0
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
            raise InvalidParameter(f"{key} must not be empty", parameter=key)
    return tuple(values or ())

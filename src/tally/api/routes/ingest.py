"""``POST /v1/events:batch`` (CONTRACT §3)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from tally.api import answers
from tally.api.answers import AUTHED, problems
from tally.api.deps import EventsWriter, RuntimeDep
from tally.events.envelope import ValidationContext

router = APIRouter(tags=["ingestion"])
MAX_IDEMPOTENCY_KEY = 255


BATCH_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array",
    "description": "At most TALLY_MAX_BATCH_EVENTS (default 10,000) events and "
                   "TALLY_MAX_BATCH_BYTES (default 10 MiB). Events (CONTRACT §2): each object "
                   "is checked on its own against the envelope and its type's payload "
                   "schema (`GET /v1/schemas`); an invalid one is rejected with a reason and "
                   "quarantined, the rest accepted (202). A body that is not an array of "
                   "objects is 400.",
    "items": {"type": "object"}}}}}}


@router.post(
    "/v1/events:batch",
    status_code=202,
    summary="Ingest a batch of events (at-least-once in, exactly-once in effect)",
    response_model=None,
    responses={202: {"model": answers.Receipt,
                     "description": "Every accepted event is durable."},
               **problems(*AUTHED, 408, 413, 415, 421, 422)},
    openapi_extra=BATCH_BODY,
)
async def ingest_batch(
    request: Request, principal: EventsWriter, runtime: RuntimeDep,
    x_idempotency_key: Annotated[str | None, Header(
        min_length=1, max_length=MAX_IDEMPOTENCY_KEY,
        description="Replays the first response for the same key and body (per client); "
                    "the same key with another body is 422.",
        examples=["batch-2026-11-02T10:00:00Z-0001"])] = None,
) -> JSONResponse:
    settings = runtime.settings
    key = x_idempotency_key
    body = await request.body()  # bounded by TALLY_MAX_BATCH_BYTES as it streams (api/bodies.py)
    ctx = ValidationContext(
        received_at=datetime.now(UTC),
        served_regions=settings.served_regions,
        allowed_brands=principal.brands,
        allowed_regions=principal.regions,
        allowed_providers=principal.providers,
    )
    receipt = await runtime.ingest.ingest(body, ctx, principal.client_id,
                                          request.state.trace_id, key)
    request.app.state.metrics.count_receipt(receipt)
    return JSONResponse(receipt, status_code=202)

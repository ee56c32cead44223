"""``POST /v1/events:batch`` (CONTRACT §3)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tally.api.deps import EventsWriter, RuntimeDep
from tally.errors import BadRequest
from tally.events.envelope import ValidationContext

router = APIRouter(tags=["ingestion"])
MAX_IDEMPOTENCY_KEY = 255


@router.post(
    "/v1/events:batch",
    status_code=202,
    summary="Ingest a batch of events (at-least-once in, exactly-once in effect)",
)
async def ingest_batch(request: Request, principal: EventsWriter,
                       runtime: RuntimeDep) -> JSONResponse:
    settings = runtime.settings
    key = request.headers.get("x-idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY:
        raise BadRequest(f"X-Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} characters")
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

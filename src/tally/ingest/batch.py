"""One batch, from request body to columns: decode, validate per event, build Arrow arrays.

Everything here is CPU work that needs no store; the writer (``writer.py``) does dedup and the
durable commit. The happy path decodes the whole array with one typed msgspec call; only a batch
with an invalid event falls back to decoding event by event to find it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import pyarrow as pa

from tally.errors import BadRequest, PayloadTooLarge
from tally.events.envelope import Envelope, Rejected, ValidationContext, ValidEvent, validate
from tally.storage.schema import (
    EVENTS_SCHEMA,
    PAYLOAD_BOOL_FIELDS,
    PAYLOAD_INT_FIELDS,
    PAYLOAD_TEXT_FIELDS,
    QUARANTINE_SCHEMA,
)

_BATCH_DECODER = msgspec.json.Decoder(list[Envelope])
_RAW_DECODER = msgspec.json.Decoder(list[msgspec.Raw])
_ONE_DECODER = msgspec.json.Decoder(Envelope)
_EVENT_ID = msgspec.json.Decoder(dict[str, Any])
_PAYLOAD_FIELDS = PAYLOAD_TEXT_FIELDS + PAYLOAD_INT_FIELDS + PAYLOAD_BOOL_FIELDS


@dataclass
class Rejection:
    index: int
    event_id: str | None
    reason: str
    raw: bytes
    residency: bool = False

    def error(self) -> dict[str, Any]:
        return {"index": self.index, "event_id": self.event_id, "detail": self.reason}


@dataclass
class PreparedBatch:
    """The valid events (in body order) and the rejections of one request."""

    received_at: datetime  # naive UTC
    client_id: str
    valid: list[ValidEvent] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # body index of each valid event
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.valid) + len(self.rejections)


def check_size(body: bytes, max_events: int, max_bytes: int) -> None:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"batch body is {len(body)} bytes; the limit is {max_bytes}")


def prepare(body: bytes, ctx: ValidationContext, client_id: str, max_events: int) -> PreparedBatch:
    """Decode and validate a request body; raise 400/413 for a body that is not a batch."""
    batch = PreparedBatch(ctx.received_at.replace(tzinfo=None), client_id)
    try:
        envelopes: list[Envelope] | None = _BATCH_DECODER.decode(body)
    except msgspec.ValidationError:
        envelopes = None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if envelopes is not None:
        _check_count(len(envelopes), max_events)
        for i, env in enumerate(envelopes):
            _validate_one(batch, i, env, ctx)
        if batch.rejections:  # quarantine keeps the event exactly as the producer sent it
            raws = _RAW_DECODER.decode(body)
            for rejection in batch.rejections:
                rejection.raw = bytes(raws[rejection.index])
        return batch
    raws = _decode_raw_array(body)
    _check_count(len(raws), max_events)
    for i, raw in enumerate(raws):
        try:
            env = _ONE_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            batch.rejections.append(Rejection(i, _event_id_of(raw), str(exc), bytes(raw)))
            continue
        _validate_one(batch, i, env, ctx)
        if batch.rejections and batch.rejections[-1].index == i:
            batch.rejections[-1].raw = bytes(raw)
    return batch


def _decode_raw_array(body: bytes) -> list[msgspec.Raw]:
    try:
        raws = _RAW_DECODER.decode(body)
    except msgspec.ValidationError:
        raise BadRequest("body must be a JSON array of event objects") from None
    for i, raw in enumerate(raws):
        if bytes(memoryview(raw)[:1]) != b"{":
            raise BadRequest(f"body must be a JSON array of event objects; item {i} is not one")
    return raws


def _check_count(count: int, max_events: int) -> None:
    if count > max_events:
        raise PayloadTooLarge(f"batch has {count} events; the limit is {max_events}")


def _event_id_of(raw: msgspec.Raw) -> str | None:
    value = _EVENT_ID.decode(raw).get("event_id")
    return value if isinstance(value, str) else None


def _validate_one(batch: PreparedBatch, i: int, env: Envelope, ctx: ValidationContext) -> None:
    try:
        batch.valid.append(validate(env, ctx))
        batch.positions.append(i)
    except Rejected as exc:
        batch.rejections.append(Rejection(i, env.event_id, exc.reason, b"", exc.residency))


def event_columns(events: list[ValidEvent], keys: list[tuple[int, int]], received_at: datetime,
                  ingest_seq: int) -> pa.Table:
    """The Arrow table (EVENTS_SCHEMA) of validated events, in order."""
    n = len(events)
    cols: dict[str, list[Any]] = {
        "ingest_seq": [ingest_seq] * n,
        "id_hi": [k[0] for k in keys],
        "id_lo": [k[1] for k in keys],
        "received_at": [received_at] * n,
    }
    envs = [e.envelope for e in events]
    for name in ("event_id", "event_type", "tenant_id", "region", "player_id", "trace_id",
                 "schema_version"):
        cols[name] = [getattr(env, name) for env in envs]
    cols["occurred_at"] = [e.occurred_at for e in events]
    cols["ingested_at"] = [e.ingested_at for e in events]
    payloads = [e.payload for e in events]
    for name in _PAYLOAD_FIELDS:
        cols[name] = [getattr(pl, name, None) for pl in payloads]
    cols["payload"] = [bytes(env.payload).decode() for env in envs]
    return pa.Table.from_pydict(cols, schema=EVENTS_SCHEMA)


def quarantine_columns(rejections: list[Rejection], received_at: datetime,
                       client_id: str) -> pa.Table:
    """Quarantine rows. An event refused for residency keeps only its identity, not its data:
    CONTRACT §3 says it is stored nowhere in this deployment."""
    return pa.Table.from_pydict(
        {
            "received_at": [received_at] * len(rejections),
            "client_id": [client_id] * len(rejections),
            "batch_index": [r.index for r in rejections],
            "event_id": [r.event_id for r in rejections],
            "reason": [r.reason for r in rejections],
            "event": [_residency_stub(r) if r.residency else r.raw.decode() for r in rejections],
        },
        schema=QUARANTINE_SCHEMA,
    )


def _residency_stub(rejection: Rejection) -> str:
    return msgspec.json.encode({"event_id": rejection.event_id, "redacted": True}).decode()

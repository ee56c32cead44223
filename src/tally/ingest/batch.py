"""One batch, from request body to columns: decode, check per event, build an Arrow table.

Everything here is CPU work that needs no store; the writer (``writer.py``) does dedup and the
durable commit. The happy path decodes the whole array with one typed msgspec call; only a batch
with an event that fails type checks falls back to decoding event by event to find it.

A body that is not JSON at all is refused whole (``400``, :mod:`tally.json_input`); once it is,
every event in it either is accepted or is rejected with a reason and kept in the quarantine as
the UTF-8 JSON text it was sent as (so the listing can always return it again).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import msgspec
import pyarrow as pa

from tally.errors import InvalidBody, PayloadTooLarge
from tally.events.envelope import (
    AnyEvent,
    Checker,
    ClosedEvent,
    Event,
    PayloadText,
    ValidationContext,
    explain,
)
from tally.events.registry import REGISTRY
from tally.ingest.dedup import KeyHasher
from tally.json_input import ANY, check_utf8, decode
from tally.security.pseudonym import Pseudonymiser
from tally.storage.schema import EVENTS_SCHEMA, PAYLOAD_COLUMNS, QUARANTINE_SCHEMA


class _Identity(msgspec.Struct):
    """The ``event_id`` of an event that failed type checks, whatever its type."""

    event_id: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


_CLOSED_BATCH = msgspec.json.Decoder(list[ClosedEvent])  # type: ignore[valid-type]
_BATCH = msgspec.json.Decoder(list[AnyEvent])  # type: ignore[valid-type]
_ONE = msgspec.json.Decoder(AnyEvent)
_RAW = msgspec.json.Decoder(list[msgspec.Raw])
_PAYLOADS = msgspec.json.Decoder(list[PayloadText])
_IDENTITY = msgspec.json.Decoder(_Identity)
_TEXT = msgspec.json.Decoder(str)
_TOP_LEVEL = msgspec.json.Decoder(dict[str, msgspec.Raw])
_ENVELOPE_TEXT = ("event_id", "tenant_id", "region", "player_id", "trace_id", "schema_version")
UTC_US = pa.timestamp("us", tz="UTC")



@dataclass
class Rejection:
    index: int
    event_id: str | None
    reason: str
    raw: bytes = b""
    residency: bool = False

    def error(self) -> dict[str, Any]:
        return {"index": self.index, "event_id": self.event_id, "detail": self.reason}


@dataclass
class PreparedBatch:
    """The valid events of one request as an Arrow table, and its rejections."""

    received_at: datetime  # naive UTC
    client_id: str
    table: pa.Table
    rejections: list[Rejection] = field(default_factory=list)


def prepare(body: bytes, ctx: ValidationContext, client_id: str, max_events: int,
            hasher: KeyHasher, pseudonymiser: Pseudonymiser | None = None) -> PreparedBatch:
    """Decode and check a request body; raise 400/413 for a body that is not a batch.
    With a ``pseudonymiser`` no raw player id leaves this function (events nor quarantine)."""
    rejections: list[Rejection] = []
    check_utf8(body, "body")
    open_payloads = False  # a payload has a field beyond its type's: keep the payload texts
    decoded: list[Event] | None
    try:
        decoded = decode(body, "body", _CLOSED_BATCH, checked=True)
    except msgspec.ValidationError:
        open_payloads = True
        try:
            decoded = decode(body, "body", _BATCH, checked=True)
        except msgspec.ValidationError:
            decoded = None
    indexed = (list(enumerate(decoded)) if decoded is not None
               else _decode_one_by_one(body, rejections))
    if len(indexed) + len(rejections) > max_events:
        raise PayloadTooLarge(
            f"batch has {len(indexed) + len(rejections)} events; the limit is {max_events}"
        )
    payload_texts = decode(body, "body", _PAYLOADS, checked=True) if open_payloads else None
    valid: list[tuple[int, Event]] = []
    check = Checker(ctx)
    for i, event in indexed:
        problem = check(event)
        if problem is None:
            valid.append((i, event))
        else:
            rejections.append(Rejection(i, event.event_id, problem.reason,
                                        residency=problem.residency))
    if rejections:  # quarantine keeps each event exactly as the producer sent it
        raws = decode(body, "body", _RAW, checked=True)
        for rejection in rejections:
            rejection.raw = bytes(raws[rejection.index])
            # ...once it is JSON any client decodes again: no number beyond a float (1e400 is
            # Infinity in JavaScript) or 4,300 digits (Python's json refuses those), no nesting
            # beyond the decoder's depth; else the body is refused (400) and nothing is kept
            decode(rejection.raw, f"body item {rejection.index}", ANY, checked=True)
            if pseudonymiser is not None:
                rejection.raw = _pseudonymised_raw(rejection.raw, pseudonymiser)
        rejections.sort(key=lambda r: r.index)
    received = ctx.received_at.astimezone(UTC).replace(tzinfo=None)
    table = event_table(valid, payload_texts, received, hasher, pseudonymiser)
    return PreparedBatch(received, client_id, table, rejections)


def _pseudonymised_raw(raw: bytes, pseudonymiser: Pseudonymiser) -> bytes:
    """A rejected event as sent, but with its player id (whatever its type) pseudonymised.
    Only the top level is decoded: every other value is kept as the bytes it was sent as."""
    event = decode(raw, "body", _TOP_LEVEL, checked=True)
    player = event.get("player_id")
    if player is None or bytes(player) == b"null":
        return raw
    tenant = _text(event.get("tenant_id")) or ""
    text = _text(player)
    if text is None:  # not a string: the JSON text it was sent as
        text = bytes(player).decode()
    event["player_id"] = msgspec.Raw(msgspec.json.encode(pseudonymiser.pseudonym(tenant, text)))
    return msgspec.json.encode(event)


def _text(raw: msgspec.Raw | None) -> str | None:
    """The string a raw JSON value is, or None when it is no string."""
    if raw is None:
        return None
    try:
        return _TEXT.decode(raw)
    except msgspec.ValidationError:
        return None


def _decode_one_by_one(body: bytes, rejections: list[Rejection]) -> list[tuple[int, Event]]:
    try:
        raws = decode(body, "body", _RAW, checked=True)
    except msgspec.ValidationError:
        raise InvalidBody("body must be a JSON array of event objects") from None
    indexed: list[tuple[int, Event]] = []
    for i, raw in enumerate(raws):
        if bytes(memoryview(raw)[:1]) != b"{":
            raise InvalidBody(f"body must be a JSON array of event objects; item {i} is not one")
        try:
            indexed.append((i, decode(raw, "body", _ONE, checked=True)))
        except msgspec.ValidationError as exc:
            event_id = _text(decode(raw, "body", _IDENTITY, checked=True).event_id)
            rejections.append(Rejection(i, event_id, explain(exc)))
    return indexed


def warm_up() -> None:
    """Convert an instant as :func:`event_table` does, once: pyarrow imports pandas (when it
    is installed) on its first conversion of an aware datetime — seconds, on the event loop —
    so a server does it at start, not in its first ingestion request."""
    pa.array([datetime(2000, 1, 1, tzinfo=UTC)], UTC_US)


def event_table(valid: list[tuple[int, Event]], payload_texts: list[PayloadText] | None,
                received_at: datetime, hasher: KeyHasher,
                pseudonymiser: Pseudonymiser | None = None) -> pa.Table:
    """EVENTS_SCHEMA rows of the valid events, grouped by type (row order carries no meaning),
    one Arrow chunk a column; ``ingest_seq`` is left 0 for the writer to stamp.
    ``payload_texts``: each event's payload as sent, by batch index; None when no payload has
    a field beyond its type's, and then the stored text is empty (the typed columns are the
    whole payload)."""
    by_type: dict[str, list[tuple[int, Event]]] = defaultdict(list)
    for item in valid:
        by_type[item[1].__struct_config__.tag].append(item)  # type: ignore[index]
    items = [item for group in by_type.values() for item in group]
    n = len(items)
    if not n:
        return EVENTS_SCHEMA.empty_table()
    events = [event for _, event in items]
    cols: dict[str, Any] = {name: list(map(attrgetter(name), events))
                            for name in (*_ENVELOPE_TEXT, "occurred_at", "ingested_at")}
    cols["event_type"] = [tag for tag, group in by_type.items() for _ in group]
    for name in PAYLOAD_COLUMNS:  # each type's own fields, None where it has no such field
        column: list[Any] = []
        for tag, group in by_type.items():
            if name in REGISTRY[tag].field_names:
                column += map(attrgetter(f"payload.{name}"), (event for _, event in group))
            else:
                column += [None] * len(group)
        cols[name] = column
    id_hi, id_lo = hasher.columns(cols["tenant_id"], cols["event_id"])
    received = pa.array([received_at] * n, pa.timestamp("us"))
    cols.update({
        "ingest_seq": pa.repeat(pa.scalar(0, pa.int64()), n),
        "id_hi": pa.array(id_hi),
        "id_lo": pa.array(id_lo),
        "occurred_at": pa.array(cols["occurred_at"], UTC_US).cast(pa.timestamp("us")),
        "ingested_at": pa.array(cols["ingested_at"], UTC_US).cast(pa.timestamp("us"))
                       .fill_null(received),
        "received_at": received,
        "payload": (pa.repeat(pa.scalar(""), n) if payload_texts is None
                    else [bytes(payload_texts[i].payload).decode() for i, _ in items]),
    })
    if pseudonymiser is not None:  # the one place events become columns: ids replaced here
        cols["player_id"] = pseudonymiser.column(cols["tenant_id"], cols["player_id"])
    return pa.Table.from_arrays(
        [a if isinstance(a, pa.Array) else pa.array(a, f.type)
         for a, f in zip((cols[f.name] for f in EVENTS_SCHEMA), EVENTS_SCHEMA, strict=True)],
        schema=EVENTS_SCHEMA,
    )


def quarantine_table(rejections: list[Rejection], received_at: datetime,
                     client_id: str) -> pa.Table:
    """Quarantine rows. An event refused for residency keeps only its identity, not its data:
    CONTRACT §3 says it is stored nowhere in this deployment. Every row also keeps the brand
    and region its event names, residency refusals included (routing, not the event's data),
    so that the operator routes can confine the quarantine by them."""
    where = [_named_place(r.raw) for r in rejections]
    return pa.Table.from_pydict(
        {
            "received_at": [received_at] * len(rejections),
            "client_id": [client_id] * len(rejections),
            "batch_index": [r.index for r in rejections],
            "event_id": [r.event_id for r in rejections],
            "reason": [r.reason for r in rejections],
            "event": [_residency_stub(r) if r.residency else r.raw.decode() for r in rejections],
            "tenant_id": [place.tenant_id for place in where],
            "region": [place.region for place in where],
        },
        schema=QUARANTINE_SCHEMA,
    )


class _Place(msgspec.Struct):
    """The members of a raw event the quarantine is confined by; anything else is skipped."""

    tenant_id: Any = None
    region: Any = None


_PLACE = msgspec.json.Decoder(_Place)


def _named_place(raw: bytes) -> _Place:
    """The brand and region a rejected event names as strings; None for a member that is
    absent, not a string, or in text that is not a JSON object (a malformed event: only an
    operator without limits sees it)."""
    try:
        place = _PLACE.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return _Place()
    return _Place(*(value if isinstance(value, str) else None
                    for value in (place.tenant_id, place.region)))


def _residency_stub(rejection: Rejection) -> str:
    return msgspec.json.encode({"event_id": rejection.event_id, "redacted": True}).decode()

"""The event envelope (CONTRACT §2) and per-event validation into a normalised record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec

from tally.events.currencies import ISO_4217
from tally.events.payloads import Id, Label, Payload
from tally.events.registry import REGISTRY, EventSpec, parse_semver


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    event_type: Annotated[str, msgspec.Meta(max_length=64)]
    occurred_at: datetime
    tenant_id: Id
    region: Label
    schema_version: Annotated[str, msgspec.Meta(max_length=64)]
    payload: msgspec.Raw
    ingested_at: datetime | None = None
    player_id: Id | None = None
    trace_id: Id | None = None


class Rejected(Exception):
    """One event is invalid; ``reason`` says precisely why (shown to the producer)."""

    def __init__(self, reason: str, *, residency: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.residency = residency


@dataclass(frozen=True, slots=True)
class ValidEvent:
    envelope: Envelope
    payload: Payload
    occurred_at: datetime  # naive UTC
    ingested_at: datetime  # naive UTC


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know beyond the event itself."""

    received_at: datetime  # aware UTC
    served_regions: frozenset[str]
    allowed_brands: frozenset[str] | None = None  # None: every brand
    allowed_regions: frozenset[str] | None = None
    max_future_skew: timedelta = timedelta(hours=1)


_PAYLOAD_DECODERS = {
    name: msgspec.json.Decoder(spec.payload_type) for name, spec in REGISTRY.items()
}
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)


def _utc(value: datetime, field: str) -> datetime:
    if value.tzinfo is None:
        raise Rejected(f"{field} has no UTC offset (RFC 3339 requires 'Z' or '+hh:mm')")
    return value.astimezone(UTC)


def _spec_for(env: Envelope) -> EventSpec:
    spec = REGISTRY.get(env.event_type)
    if spec is None:
        raise Rejected(f"unknown event_type {env.event_type!r} (see GET /v1/schemas)")
    version = parse_semver(env.schema_version)
    if version is None:
        raise Rejected(f"schema_version {env.schema_version!r} is not semver (e.g. '1.3.0')")
    if version[0] not in spec.majors:
        raise Rejected(
            f"schema_version {env.schema_version!r}: major version {version[0]} of "
            f"{spec.name} is unknown (accepted: {sorted(spec.majors)})"
        )
    return spec


def validate(env: Envelope, ctx: ValidationContext) -> ValidEvent:
    """Check one decoded envelope against the contract; raise :class:`Rejected` if it fails."""
    if env.region not in ctx.served_regions:
        raise Rejected(
            f"region {env.region!r} is not served by this deployment "
            f"(served: {','.join(sorted(ctx.served_regions))})",
            residency=True,
        )
    if ctx.allowed_regions is not None and env.region not in ctx.allowed_regions:
        raise Rejected(f"region {env.region!r} is outside this client's regions")
    if ctx.allowed_brands is not None and env.tenant_id not in ctx.allowed_brands:
        raise Rejected(f"tenant_id {env.tenant_id!r} is outside this client's brands")
    spec = _spec_for(env)
    occurred = _utc(env.occurred_at, "occurred_at")
    if occurred < EARLIEST:
        raise Rejected("occurred_at is before 2000-01-01")
    if occurred > ctx.received_at + ctx.max_future_skew:
        raise Rejected(
            f"occurred_at is more than {int(ctx.max_future_skew.total_seconds())} s in the future"
        )
    ingested = ctx.received_at if env.ingested_at is None else _utc(env.ingested_at, "ingested_at")
    if spec.player_required and env.player_id is None:
        raise Rejected(f"player_id is required for {spec.name}")
    try:
        payload = _PAYLOAD_DECODERS[spec.name].decode(env.payload)
    except msgspec.ValidationError as exc:
        raise Rejected(str(exc).replace("`$", "`$.payload", 1)) from None
    except msgspec.DecodeError as exc:  # pragma: no cover - the batch already parsed as JSON
        raise Rejected(f"payload is not valid JSON: {exc}") from None
    currency = getattr(payload, "currency", None)
    if currency is not None and currency not in ISO_4217:
        raise Rejected(f"payload.currency {currency!r} is not an ISO 4217 code")
    return ValidEvent(
        env,
        payload,
        occurred.replace(tzinfo=None),
        ingested.replace(tzinfo=None),
    )

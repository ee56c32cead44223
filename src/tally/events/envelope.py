"""The event envelope (CONTRACT §2) and the per-event rules a decoder cannot express.

Every event type is its own msgspec Struct, tagged by ``event_type`` and carrying its typed
payload, so one C-level decode of a batch checks the envelope and every payload together. What
is left for Python (offsets, residency, token limits, semver, ISO 4217) is a handful of set
lookups per event in :func:`check`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Union

import msgspec

from tally.events.currencies import ISO_4217
from tally.events.payloads import Id, Label
from tally.events.registry import REGISTRY, parse_semver
from tally.security import policy


class Event(msgspec.Struct, tag_field="event_type", forbid_unknown_fields=True, kw_only=True):
    """Fields common to every event; subclasses add ``payload`` with its type."""

    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    occurred_at: datetime
    tenant_id: Id
    region: Label
    schema_version: Annotated[str, msgspec.Meta(max_length=64)]
    ingested_at: datetime | None = None
    player_id: Id | None = None
    trace_id: Id | None = None
    payload: Any


def _class_name(event_type: str) -> str:
    return "".join(part.capitalize() for part in event_type.replace("_", ".").split("."))


EVENT_CLASSES: dict[str, type[Event]] = {
    name: msgspec.defstruct(  # type: ignore[misc]
        _class_name(name) + "Event",
        [("payload", spec.payload_type)],
        bases=(Event,),
        tag=name,
        kw_only=True,
    )
    for name, spec in REGISTRY.items()
}
AnyEvent = Union[tuple(EVENT_CLASSES.values())]  # type: ignore[valid-type]  # noqa: UP007
# The same events with closed payloads: a payload field the type does not know fails the
# decode. A batch that decodes so carries nothing beyond its typed columns, so its payload
# texts need not be stored (the typed columns rebuild them: ``tally.ingest.columnar``).
CLOSED_EVENT_CLASSES: dict[str, type[Event]] = {
    name: msgspec.defstruct(  # type: ignore[misc]
        _class_name(name) + "ClosedEvent",
        [("payload", msgspec.defstruct(spec.payload_type.__name__ + "Closed", [],
                                       bases=(spec.payload_type,), frozen=True,
                                       forbid_unknown_fields=True))],
        bases=(EVENT_CLASSES[name],),
        tag=name,
        kw_only=True,
    )
    for name, spec in REGISTRY.items()
}
ClosedEvent = Union[tuple(CLOSED_EVENT_CLASSES.values())]  # type: ignore[valid-type]  # noqa: UP007


class PayloadText(msgspec.Struct):
    """Only the payload, verbatim: stored as received so unknown fields are never lost."""

    payload: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know beyond the event itself."""

    received_at: datetime  # aware UTC
    served_regions: frozenset[str]
    allowed_brands: frozenset[str] | None = None  # None: every brand
    allowed_regions: frozenset[str] | None = None
    allowed_providers: frozenset[str] | None = None  # a partner: only bets on these providers
    max_future_skew: timedelta = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Problem:
    reason: str
    residency: bool = False


EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
PLAYER_OPTIONAL = frozenset(name for name, spec in REGISTRY.items() if not spec.player_required)


@lru_cache(maxsize=256)
def _version_problem(event_type: str, version: str) -> str | None:
    parsed = parse_semver(version)
    if parsed is None:
        return f"schema_version {version!r} is not semver (e.g. '1.3.0')"
    majors = REGISTRY[event_type].majors
    if parsed[0] not in majors:
        return (f"schema_version {version!r}: major version {parsed[0]} of {event_type} is "
                f"unknown (accepted: {sorted(majors)})")
    return None


def version_problem(event_type: str, version: str) -> str | None:
    """The rule on ``schema_version``: semver, of a major the registry knows for the type."""
    return _version_problem(event_type, version)


def latest_instant(ctx: ValidationContext) -> datetime:
    """The latest ``occurred_at``/``ingested_at`` accepted: the receive time plus the skew."""
    return ctx.received_at + ctx.max_future_skew


def instant_problem(name: str, value: datetime, ctx: ValidationContext) -> str | None:
    """The rule on an instant of the envelope: an explicit offset, from 2000-01-01 (EARLIEST)
    to :func:`latest_instant`."""
    if value.tzinfo is None:
        return f"{name} has no UTC offset (RFC 3339 requires 'Z' or '+hh:mm')"
    if value < EARLIEST:  # year 1 less an offset is year 0: no datetime can hold it
        return f"{name} is before 2000-01-01"
    if value > latest_instant(ctx):
        return f"{name} is more than {int(ctx.max_future_skew.total_seconds())} s in the future"
    return None


def player_problem(event_type: str) -> str | None:
    """The rule for an event without ``player_id``: only the registry's optional types."""
    return None if event_type in PLAYER_OPTIONAL else f"player_id is required for {event_type}"


def currency_problem(currency: str) -> str | None:
    """The rule on a payload's ``currency`` beyond its pattern: a code of ISO 4217."""
    return (None if currency in ISO_4217
            else f"payload.currency {currency!r} is not an ISO 4217 code")


class Checker:
    """The rules beyond types, for the events of one batch: ``checker(event)`` is None when
    the event is valid, else its problem. Residency comes first, so an event for a region this
    deployment does not serve is never looked at further. The columnar path
    (``tally.ingest.columnar``) applies the same rules, in this order. What depends only on
    the context (the latest instant) is computed once a batch, and the policy is asked once
    per distinct (brand, region, provider)."""

    __slots__ = ("ctx", "latest", "_refusals")

    def __init__(self, ctx: ValidationContext) -> None:
        self.ctx = ctx
        self.latest = latest_instant(ctx)
        self._refusals: dict[tuple[str, str, str | None], policy.Refusal | None] = {}

    def __call__(self, event: Event) -> Problem | None:
        ctx = self.ctx
        providers = ctx.allowed_providers  # a partner's events: bets on its providers' games
        provider = None if providers is None else getattr(event.payload, "provider_id", None)
        key = (event.tenant_id, event.region, provider)
        try:
            refusal = self._refusals[key]
        except KeyError:
            refusal = self._refusals[key] = policy.check_event(
                event.tenant_id, event.region, ctx.served_regions, ctx.allowed_brands,
                ctx.allowed_regions, providers=providers, provider_id=provider)
        if refusal is not None:
            return Problem(refusal.reason, residency=refusal.residency)
        event_type: str = event.__struct_config__.tag  # type: ignore[assignment]
        problem = (version_problem(event_type, event.schema_version)
                   or self._instant("occurred_at", event.occurred_at)
                   or (None if event.ingested_at is None
                       else self._instant("ingested_at", event.ingested_at))
                   or (player_problem(event_type) if event.player_id is None else None))
        currency = getattr(event.payload, "currency", None)
        if problem is None and currency is not None:
            problem = currency_problem(currency)
        return None if problem is None else Problem(problem)

    def _instant(self, name: str, value: datetime) -> str | None:
        if value.tzinfo is not None and EARLIEST <= value <= self.latest:
            return None  # the common case, without building a reason
        return instant_problem(name, value, self.ctx)


def explain(error: msgspec.ValidationError) -> str:
    """msgspec's message, with the one case it words poorly (an unknown tag) made plain."""
    text = str(error)
    if text.startswith("Invalid value") and text.endswith("`$.event_type`"):
        value = text[len("Invalid value "):].split(" - at ")[0]
        return f"unknown event_type {value} (see GET /v1/schemas)"
    return text

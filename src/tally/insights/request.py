"""Common query parameters (CONTRACT §4): time range, filters, group_by, cursors; and the
caller's hard limits (brands, regions, metrics) applied to every query."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, date, datetime

import msgspec

from tally.errors import BadRequest
from tally.security import policy
from tally.security.admission import admit_scope
from tally.security.tokens import Principal
from tally.semantic.catalog import DIMENSIONS, Metric

GRANULARITIES = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 50_000  # per timeseries request (checked before running: 400)
# group values (timeseries) or dimension keys (slice) with data in a query's range: found by
# a DISTINCT query before the values, a 422 past it (docs/api.md#query-limits)
MAX_GROUPS = 10_000


def parse_instant(value: str, name: str) -> datetime:
    """RFC 3339 or ``YYYY-MM-DD`` (00:00 UTC) → naive UTC."""
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            return datetime(day.year, day.month, day.day)
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{name}={value!r} is neither RFC 3339 nor YYYY-MM-DD") from None
    if parsed.tzinfo is None:
        raise BadRequest(f"{name}={value!r} has no UTC offset")
    return parsed.astimezone(UTC).replace(tzinfo=None)


def parse_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    if not start or not end:
        raise BadRequest("from and to are required")
    lo, hi = parse_instant(start, "from"), parse_instant(end, "to")
    if lo >= hi:
        raise BadRequest("from must be before to")
    return lo, hi


def parse_metric(name: str | None, principal: Principal) -> Metric:
    return policy.allow_metric(principal, name)  # the one authorisation decision on metrics


def parse_filters(text: str | None, metric: Metric) -> dict[str, tuple[str, ...]]:
    """``key:value,key:value``: values of a repeated key are OR-ed, keys AND-ed."""
    filters: dict[str, list[str]] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise BadRequest(f"filter {part!r} is not key:value")
        check_dimension(key, metric, "filter key")
        filters.setdefault(key, []).append(value)
    return {k: tuple(dict.fromkeys(v)) for k, v in filters.items()}


def check_dimension(key: str, metric: Metric, what: str) -> None:
    if key not in DIMENSIONS:
        raise BadRequest(f"unknown {what} {key!r} (one of {', '.join(DIMENSIONS)})", key=key)
    if key not in metric.dimensions:
        raise BadRequest(f"{what} {key!r} does not apply to metric {metric.name!r} "
                         f"(it has: {', '.join(metric.dimensions)})", key=key)


def parse_group_by(text: str | None, metric: Metric) -> tuple[str, ...]:
    keys = tuple(dict.fromkeys(k.strip() for k in (text or "").split(",") if k.strip()))
    for key in keys:
        check_dimension(key, metric, "group_by key")
    return keys


def confine(filters: dict[str, tuple[str, ...]], principal: Principal,
            served_regions: frozenset[str]) -> dict[str, tuple[str, ...]]:
    """The filters narrowed to the caller's limits: :func:`tally.security.policy.confine`;
    then the rate limits of the brands and regions the caller confined the query to, by its
    filters or its token (not the deployment's regions: an unconfined query spends none)."""
    confined = policy.confine(filters, principal, served_regions)
    admit_scope(filters.get("brand_id") or principal.brands,
                filters.get("region") or principal.regions)
    return confined


def bucket_count(start: datetime, end: datetime, step: int) -> int:
    first = int(start.replace(tzinfo=UTC).timestamp()) // step
    last = (int(end.replace(tzinfo=UTC).timestamp()) - 1) // step
    return last - first + 1


def cursor_offset(cursor: str | None, fingerprint: str) -> int:
    """Where a page starts: 0, or the offset a cursor of this same query carries."""
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = msgspec.json.decode(raw, type=tuple[int, str])
    except (ValueError, msgspec.DecodeError):
        raise BadRequest("cursor is not one this API issued") from None
    if data[1] != fingerprint or data[0] < 0:
        raise BadRequest("cursor belongs to another query")
    return data[0]


def next_cursor(offset: int, fingerprint: str) -> str:
    raw = msgspec.json.encode((offset, fingerprint))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

"""Common query parameters (CONTRACT §4): time range, filters, group_by, cursors; and the
caller's hard limits (brands, regions, metrics) applied to every query.

Instants, days and bounded integers sent by clients are parsed here for every route (the
cohort routes included), each by one function that answers ``400`` naming the parameter:
only ASCII digits count as digits (``"²".isdigit()`` is true, ``int("²")`` fails), and every
instant and day lies in :data:`EARLIEST` .. :data:`LATEST`, so no arithmetic on them (offsets,
windows, horizons, time zones) can leave the calendar.
"""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, date, datetime, timedelta

import msgspec

from tally.errors import InvalidCursor, InvalidFilter, InvalidParameter
from tally.security import policy
from tally.security.admission import admit_scope
from tally.security.tokens import Principal
from tally.semantic.catalog import DIMENSIONS, Metric

GRANULARITIES = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
MAX_BUCKETS = 50_000  # per timeseries request (checked before running: 400)
# group values (timeseries) or dimension keys (slice) with data in a query's range: found by
# a DISTINCT query before the values, a 422 past it (docs/api.md#query-limits)
MAX_GROUPS = 10_000
# The instants a query may name, in UTC: what every store Tally runs on represents exactly
# (ClickHouse DateTime64 spans 1900-2299), and far around any event (CONTRACT §2: occurred_at
# from 2000-01-01 to an hour ahead); days, windows and horizons added to them stay in Python's.
EARLIEST = datetime(1900, 1, 1)
LATEST = datetime(2300, 1, 1)
_DAY = r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
_DATE = re.compile(_DAY, re.ASCII)
_RFC3339 = re.compile(  # RFC 3339 §5.6 (a space for the "T" as its note allows; at most ns)
    _DAY + r"[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})?",
    re.ASCII)
_COUNT = re.compile(r"[0-9]{1,19}", re.ASCII)


def shown(value: str, limit: int = 40) -> str:
    """``value`` quoted for an error detail, cut short: a detail never echoes a megabyte."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"


def parse_bounded_int(text: str | int | None, name: str, minimum: int, maximum: int, *,
                      default: int, form: str = "an integer") -> int:
    """A limit-like parameter: ASCII digits only (or an int a model parsed), from ``minimum``
    to ``maximum``."""
    if text is None:
        return default
    if isinstance(text, int):
        text = str(text)
    if not _COUNT.fullmatch(text) or not minimum <= int(text) <= maximum:
        raise InvalidParameter(f"{name} must be {form} from {minimum} to {maximum} (ASCII digits)",
                         field=name)
    return int(text)


def parse_date(value: str, name: str) -> date:
    """``YYYY-MM-DD``, a calendar day from :data:`EARLIEST` to the day before :data:`LATEST`."""
    day = _day(value, name)
    if not EARLIEST.date() <= day < LATEST.date():
        raise InvalidParameter(f"{name}={shown(value)} is outside {EARLIEST:%Y-%m-%d} .. "
                         f"{LATEST - timedelta(days=1):%Y-%m-%d}", field=name)
    return day


def _day(value: str, name: str) -> date:
    try:
        if not _DATE.fullmatch(value):
            raise ValueError(value)
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidParameter(f"{name}={shown(value)} is not YYYY-MM-DD", field=name) from None


def parse_instant(value: str, name: str) -> datetime:
    """RFC 3339 or ``YYYY-MM-DD`` (00:00 UTC) → naive UTC, from :data:`EARLIEST` to
    :data:`LATEST` once converted (an offset may not carry it out of the calendar)."""
    if _DATE.fullmatch(value):
        day = _day(value, name)
        local, shift = datetime(day.year, day.month, day.day), timedelta(0)
    else:
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise InvalidParameter(f"{name}={shown(value)} is neither RFC 3339 nor YYYY-MM-DD",
                             field=name)
        shift = _offset(match[8], value, name)
        year, month, day_, hour, minute, second = (int(part) for part in match.groups()[:6])
        try:
            local = datetime(year, month, day_, hour, minute, second,
                             int((match[7] or ".0")[1:7].ljust(6, "0")))
        except ValueError:
            raise InvalidParameter(f"{name}={shown(value)} is not a date and time that exists",
                             field=name) from None
    if not EARLIEST + shift <= local <= LATEST + shift:  # i.e. local - shift (UTC) in range
        raise InvalidParameter(f"{name}={shown(value)} is outside {EARLIEST:%Y-%m-%d} .. "
                         f"{LATEST:%Y-%m-%d} (UTC)", field=name)
    return local - shift


def _offset(text: str | None, value: str, name: str) -> timedelta:
    """The UTC offset of an RFC 3339 time: ``Z`` or ``±hh:mm`` up to ±23:59."""
    if text is None:
        raise InvalidParameter(f"{name}={shown(value)} has no UTC offset", field=name)
    if text in ("Z", "z"):
        return timedelta(0)
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise InvalidParameter(f"{name}={shown(value)}: the offset must be -23:59 .. +23:59",
                         field=name)
    return (-1 if text[0] == "-" else 1) * timedelta(hours=hours, minutes=minutes)


def parse_range(start: str | None, end: str | None) -> tuple[datetime, datetime]:
    if not start or not end:
        raise InvalidParameter("from and to are required")
    lo, hi = parse_instant(start, "from"), parse_instant(end, "to")
    if lo >= hi:
        raise InvalidParameter("from must be before to")
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
            raise InvalidFilter(f"filter {part!r} is not key:value")
        check_dimension(key, metric, "filter key")
        filters.setdefault(key, []).append(value)
    return {k: tuple(dict.fromkeys(v)) for k, v in filters.items()}


def check_dimension(key: str, metric: Metric, what: str) -> None:
    if key not in DIMENSIONS:
        raise InvalidFilter(f"unknown {what} {key!r} (one of {', '.join(DIMENSIONS)})", key=key)
    if key not in metric.dimensions:
        raise InvalidFilter(f"{what} {key!r} does not apply to metric {metric.name!r} "
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
        raise InvalidCursor("cursor is not one this API issued") from None
    if data[1] != fingerprint or data[0] < 0:
        raise InvalidCursor("cursor belongs to another query")
    return data[0]


def next_cursor(offset: int, fingerprint: str) -> str:
    raw = msgspec.json.encode((offset, fingerprint))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

"""Request bodies of funnel and retention, and the parameters of LTV (docs/cohorts.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlglot import exp

from tally.errors import InvalidFilter, InvalidParameter, QueryTooLarge
from tally.events.registry import REGISTRY
from tally.insights.request import parse_date
from tally.semantic.catalog import PLAYER_ATTRIBUTES
from tally.semantic.compiler import Params, column
from tally.storage.schema import PAYLOAD_BOOL_FIELDS, PAYLOAD_INT_FIELDS, PAYLOAD_TEXT_FIELDS

FIELD_TYPES: dict[str, type] = {**{f: str for f in PAYLOAD_TEXT_FIELDS},
                                **{f: int for f in PAYLOAD_INT_FIELDS},
                                **{f: bool for f in PAYLOAD_BOOL_FIELDS}}
CORRELATE_FIELDS = ("player_id", "payment_id", "bet_id", "session_id", "bonus_id",
                    "reference_id")
EVENT_FILTER_KEYS = ("brand_id", "region", "provider_id", "game_id", "method", "currency",
                     *PLAYER_ATTRIBUTES)
PLAYER_FILTER_KEYS = ("brand_id", "region", *PLAYER_ATTRIBUTES)
# size limits, checked before running (docs/cohorts.md#limits): each bounds one query's work
MAX_STEPS = 10  # funnel steps: one ASOF join each
MAX_EXCLUSIONS = 10  # funnel exclusions: one ASOF join each
MAX_WINDOW = 90 * 86_400  # funnel window_sec and within_sec
MAX_FUNNEL_DAYS = 366  # funnel from..to (events are read to `to` + window_sec)
MAX_COHORT_DAYS = 366  # retention and LTV start_date..end_date
# LTV: cohort days × horizon, the answer's values (and the per-row FX work in Python is at
# most that × currencies): a year of cohorts over 100 days, or 100 days of cohorts over a year.
# Retention's answer is bounded by the limits above (366 cohort days × 64 days).
MAX_COHORT_CELLS = 36_600


@dataclass(frozen=True)
class Step:
    """An event type with conditions on typed payload fields (a funnel step, an exclusion,
    a return event)."""

    event: str
    conditions: tuple[tuple[str, tuple[Any, ...]], ...]
    name: str
    within_sec: int | None = None
    between: tuple[int, int] | None = None  # exclusions only

    def condition(self, params: Params) -> exp.Expr:
        """The event type (a registry name) and the payload conditions, values bound."""
        parts: list[exp.Expr] = [column("event_type").eq(exp.Literal.string(self.event))]
        for field, values in self.conditions:
            parts.append(column(field).isin(*(params.bind(v) for v in values)))
        return exp.and_(*parts)

    def may_match_same_event(self, other: Step) -> bool:
        """Could one event satisfy both steps (same type, no contradicting condition)?"""
        if self.event != other.event:
            return False
        mine = dict(self.conditions)
        return all(not set(mine[f]).isdisjoint(v) for f, v in other.conditions if f in mine)


def _object(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidParameter(f"{what} must be a JSON object")
    return value


def _positive_int(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidParameter(f"{what} must be an integer from 1 to {maximum}", field=what)
    return value


def parse_step(raw: Any, what: str, extra: tuple[str, ...] = ()) -> Step:
    """``"bet.placed"`` or ``{"event": …, "name"?, <payload field>: value | [values]}``."""
    if isinstance(raw, str):
        raw = {"event": raw}
    body = _object(raw, what)
    event = body.get("event")
    if not isinstance(event, str) or event not in REGISTRY:  # a list or object is unhashable
        raise InvalidParameter(f"{what}.event {event!r} is not an event type "
                         f"(one of {', '.join(sorted(REGISTRY))})", field=f"{what}.event")
    name = body.get("name", event)
    if not isinstance(name, str) or not name:
        raise InvalidParameter(f"{what}.name must be a non-empty string", field=f"{what}.name")
    conditions = []
    for key, value in body.items():
        if key in ("event", "name", *extra):
            continue
        kind = FIELD_TYPES.get(key)
        if kind is None:
            raise InvalidParameter(f"{what}: {key!r} is not a queryable payload field (one of "
                             f"{', '.join(FIELD_TYPES)})", field=f"{what}.{key}")
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(type(v) is kind for v in values):
            raise InvalidParameter(f"{what}.{key} must be a {kind.__name__} or a non-empty list of "
                             "them", field=f"{what}.{key}")
        conditions.append((key, tuple(dict.fromkeys(values))))
    return Step(str(event), tuple(sorted(conditions)), name)


def parse_filters(raw: Any, allowed: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``{"brand_id": "b1" | ["b1", "b2"], …}`` on the ``allowed`` keys."""
    if raw is None:
        return {}
    filters: dict[str, tuple[str, ...]] = {}
    for key, value in _object(raw, "filters").items():
        if key not in allowed:
            raise InvalidFilter(f"unknown filter key {key!r} here (one of {', '.join(allowed)})",
                             key=key)
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) and v for v in values):
            raise InvalidFilter(f"filter {key} must be a string or a list of strings", key=key)
        filters[key] = tuple(dict.fromkeys(values))
    return filters


def parse_day(value: Any, what: str) -> date:
    if not isinstance(value, str):
        raise InvalidParameter(f"{what} is required (YYYY-MM-DD)", field=what)
    return parse_date(value, what)


def parse_days_range(start: Any, end: Any) -> tuple[date, date]:
    first, last = parse_day(start, "start_date"), parse_day(end, "end_date")
    if last < first:
        raise InvalidParameter("end_date must not be before start_date")
    if (last - first).days + 1 > MAX_COHORT_DAYS:
        raise InvalidParameter(f"at most {MAX_COHORT_DAYS} cohort days per request")
    return first, last


def check_cohort_cells(first: date, last: date, horizon: int) -> None:
    """``422`` when cohort days × ``horizon`` is over :data:`MAX_COHORT_CELLS`."""
    days = (last - first).days + 1
    if days * horizon > MAX_COHORT_CELLS:
        raise QueryTooLarge(
            f"{days} cohort days × a {horizon}-day horizon is {days * horizon} values, over "
            f"the limit of {MAX_COHORT_CELLS}; ask for fewer cohort days or a shorter horizon",
            limit="max_cohort_cells", max_cohort_cells=MAX_COHORT_CELLS)


def parse_cohort(value: Any) -> str:
    from tally.cohorts.tables import COHORTS

    if not isinstance(value, str) or value not in COHORTS:
        raise InvalidParameter(f"cohort must be one of {', '.join(COHORTS)}", field="cohort")
    return str(value)


def parse_timezone(value: Any) -> ZoneInfo:
    if value is None:
        value = "UTC"
    if not isinstance(value, str):
        raise InvalidParameter("timezone must be an IANA time zone name", field="timezone")
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidParameter(f"unknown time zone {value!r} (an IANA name such as Europe/London)",
                         field="timezone") from None


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The instant (naive UTC) at which ``day`` starts in ``zone``."""
    from datetime import UTC

    local = datetime(day.year, day.month, day.day, tzinfo=zone)
    return local.astimezone(UTC).replace(tzinfo=None)


def epoch_seconds(at: exp.Expr) -> exp.Expr:
    from tally.semantic.compiler import EPOCH

    return exp.DateDiff(this=at, expression=EPOCH.copy(), unit=exp.var("SECOND"))


def day_starts(zone: ZoneInfo, first: date, last: date) -> list[int]:
    """Epoch seconds at which each day of ``first..last+1`` starts in ``zone``."""
    return [int((local_midnight(first + timedelta(days=i), zone)
                 - datetime(1970, 1, 1)).total_seconds())
            for i in range((last - first).days + 2)]


def day_index(zone: ZoneInfo, first: date, last: date, seconds: exp.Expr) -> exp.Expr:
    """SQL: the calendar day in ``zone`` of the instant ``seconds`` (since the epoch) as days
    since ``first``, exact across DST for instants between the starts of ``first`` and of the
    day after ``last``: runs of 24-hour days with one offset are integer divisions, each 23-
    or 25-hour day is its own branch. Instants outside the span get the offset at its nearest
    edge."""
    base = (datetime(first.year, first.month, first.day) - datetime(1970, 1, 1)).days

    def start_of(day: date) -> int:
        return int((local_midnight(day, zone) - datetime(1970, 1, 1)).total_seconds())

    def by_offset(offset: int) -> exp.Expr:
        shifted = exp.Add(this=seconds.copy(), expression=exp.Literal.number(offset))
        days = exp.IntDiv(this=exp.Paren(this=shifted), expression=exp.Literal.number(86_400))
        return exp.Sub(this=days, expression=exp.Literal.number(base))

    # (first instant, value at and after it): an offset formula, or a constant day index
    pieces: list[tuple[int, exp.Expr, int | None]] = []
    day = first
    while day <= last:
        begin, end = start_of(day), start_of(day + timedelta(days=1))
        offset = (day - date(1970, 1, 1)).days * 86_400 - begin
        if end - begin != 86_400:
            pieces.append((begin, exp.Literal.number((day - first).days), None))
        elif not pieces or pieces[-1][2] != offset:
            pieces.append((begin, by_offset(offset), offset))
        day += timedelta(days=1)
    after = last + timedelta(days=1)
    pieces.append((start_of(after), by_offset((after - date(1970, 1, 1)).days * 86_400
                                              - start_of(after)), None))
    first_offset = (first - date(1970, 1, 1)).days * 86_400 - start_of(first)
    if all(offset == first_offset for _, _, offset in pieces[:-1]):
        return by_offset(first_offset)  # one offset throughout (UTC, no DST in the span)
    case = exp.Case()
    previous: exp.Expr = by_offset(first_offset)
    for boundary, value, _ in pieces:
        case = case.when(seconds.copy() < exp.Literal.number(boundary), previous)
        previous = value
    return case.else_(previous)

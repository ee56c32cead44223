"""A plain-Python reference of docs/cohorts.md: funnels, retention and LTV.

Independent of ``tally`` (FX, dedup, filters and metric observations come from
``tests/reference.py``, itself independent): it reads the event envelopes as they were sent and
answers what docs/cohorts.md says. Written to be checked line by line against that page, not
for speed.

Readings where docs/cohorts.md leaves a choice (the tests expect the same):

- events are deduplicated per ``(tenant_id, event_id)``, the first sent wins (as ingestion does);
- "(occurred_at, event_id) order" compares ``event_id`` as a string (byte order for ASCII ids);
- funnel: events of a unit are the unit's events (same brand, same ``correlate_by`` value) that
  match the filters; exclusion events too. An exclusion event "strictly after step i and at or
  before step k" compares ``occurred_at`` only. The steps of an attempt are searched without
  regard to ``to``; "could also match an earlier step" = same event type and no condition key
  set by both steps with disjoint value sets;
- a tie between steps searched "at or after" is resolved by the smallest ``(occurred_at,
  event_id)`` (it only matters when a later step can share the event type);
- retention: ``dN`` with ``N = 0`` counts a return event anywhere in the local cohort day c,
  also before the cohort event; filters (brand_id, region) apply to the player's first-ever
  cohort event (the first is found before filtering); return events count in the player's
  brand in any region;
- the day of ``c + N`` is finished when ``watermark ≥`` its local end (the watermark includes
  every event before it); LTV day ``c + k`` likewise with UTC days;
- LTV counts the metric of the cohort's players from 00:00 UTC of day c (also before the
  cohort event that day), converted per (UTC day, source currency) of the cohort's sum, then
  cumulated, divided by the size and rounded half-to-even.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from tests import reference as ref

Event = dict[str, Any]
Key = tuple[datetime, str]

STEP_RESERVED = ("event", "name", "within_sec")
EXCLUSION_RESERVED = ("event", "between")


# --------------------------------------------------------------------------- helpers


def t(event: Event) -> datetime:
    return ref.parse_time(event["occurred_at"])


def key(event: Event) -> Key:
    """The ``(occurred_at, event_id)`` order of docs/cohorts.md."""
    return t(event), event["event_id"]


def values(value: Any) -> list[Any]:
    """A condition or filter value: a scalar (equal) or a list (any of)."""
    return value if isinstance(value, list) else [value]


def conditions(obj: dict[str, Any], reserved: Iterable[str]) -> dict[str, list[Any]]:
    return {k: values(v) for k, v in obj.items() if k not in reserved}


def matches_step(event: Event, obj: dict[str, Any], reserved: Iterable[str] = STEP_RESERVED) \
        -> bool:
    """Same event type, and every condition's payload field present with an allowed value."""
    if event["event_type"] != obj["event"]:
        return False
    payload = event["payload"]
    return all(k in payload and payload[k] in allowed
               for k, allowed in conditions(obj, reserved).items())


def matches_filters(event: Event, filters: dict[str, Any]) -> bool:
    return ref.matches(event, {k: values(v) for k, v in filters.items()})


def could_share(earlier: dict[str, Any], later: dict[str, Any]) -> bool:
    """Step ``later`` could match ``earlier``'s event: same type, no contradicting condition."""
    if earlier["event"] != later["event"]:
        return False
    a, b = conditions(earlier, STEP_RESERVED), conditions(later, STEP_RESERVED)
    return all(set(a[k]) & set(b[k]) for k in a.keys() & b.keys())


def nearest_rank_median(numbers: list[float]) -> float | None:
    """The smallest value with at least half of the values ≤ it: rank ceil(n / 2)."""
    if not numbers:
        return None
    ordered = sorted(numbers)
    return ordered[(len(ordered) + 1) // 2 - 1]


def watermark(events: list[Event], brands: Iterable[str] | None = None,
              lateness_sec: int = 0) -> datetime:
    """Greatest ``occurred_at`` among the events of ``brands`` (all when None), less lateness."""
    chosen = set(brands) if brands is not None else None
    return max(t(e) for e in ref.dedup(events)
               if chosen is None or e["tenant_id"] in chosen) - timedelta(seconds=lateness_sec)


def scope_brands(filters: dict[str, Any] | None) -> list[str] | None:
    """The brands an answer is confined to (a full token): the brand_id filter, else all."""
    if filters and "brand_id" in filters:
        return values(filters["brand_id"])
    return None


# --------------------------------------------------------------------------- funnel


def unit_of(event: Event, correlate_by: str) -> tuple[str, Any] | None:
    """Units are per brand; an event without the correlate_by value is ignored."""
    value = event.get("player_id") if correlate_by == "player_id" \
        else event["payload"].get(correlate_by)
    return None if value is None else (event["tenant_id"], value)


def build_attempt(first: Event, events: list[Event], steps: list[dict[str, Any]],
                  window: timedelta) -> list[Event]:
    """Greedy: the events of steps 1..m the attempt starting at ``first`` reaches."""
    found = [first]
    for k in range(1, len(steps)):
        step = steps[k]
        if any(could_share(steps[j], step) for j in range(k)):
            floor = max(key(e) for e in found)  # strictly after all earlier events
            candidates = [e for e in events if matches_step(e, step) and key(e) > floor]
        else:
            candidates = [e for e in events if matches_step(e, step) and t(e) >= t(found[-1])]
        if not candidates:
            break
        event = min(candidates, key=key)
        if t(event) - t(first) > window:
            break
        if "within_sec" in step and t(event) - t(found[-1]) > timedelta(
                seconds=step["within_sec"]):
            break
        found.append(event)
    return found


def apply_exclusions(found: list[Event], events: list[Event],
                     exclusions: list[dict[str, Any]], n: int) -> list[Event]:
    """An exclusion event in (step i, step k], i < k ≤ j, ends the attempt at step k − 1."""
    for k in range(2, len(found) + 1):  # 1-based step numbers
        for ex in exclusions:
            i, j = ex.get("between", [1, n])
            if not i < k <= j:
                continue
            if any(matches_step(x, ex, EXCLUSION_RESERVED)
                   and t(found[i - 1]) < t(x) <= t(found[k - 1]) for x in events):
                return found[:k - 1]
    return found


def funnel(events: list[Event], body: dict[str, Any]) -> dict[str, Any]:
    """The answer of ``POST /v1/analytics/funnel`` for ``body``."""
    steps = body["steps"]
    n = len(steps)
    window = timedelta(seconds=body["window_sec"])
    start, end = ref.parse_bound(body["from"]), ref.parse_bound(body["to"])
    filters = body.get("filters") or {}
    correlate_by = body.get("correlate_by", "player_id")
    exclusions = body.get("exclusions") or []

    by_unit: dict[tuple[str, Any], list[Event]] = defaultdict(list)
    for e in ref.dedup(events):
        unit = unit_of(e, correlate_by)
        if unit is not None and matches_filters(e, filters):
            by_unit[unit].append(e)

    best: list[list[Event]] = []
    for unit_events in by_unit.values():
        starts = sorted((e for e in unit_events
                         if matches_step(e, steps[0]) and start <= t(e) < end), key=key)
        attempts = [apply_exclusions(build_attempt(s, unit_events, steps, window),
                                     unit_events, exclusions, n) for s in starts]
        if attempts:  # the most steps; ties: the earliest start (max keeps the first)
            best.append(max(attempts, key=len))

    total = len(best)
    out = []
    for k in range(n):
        reached = [a for a in best if len(a) > k]
        median = None if k == 0 else nearest_rank_median(
            [(t(a[k]) - t(a[k - 1])).total_seconds() for a in reached])
        rate = None if total == 0 else len(reached) / total
        out.append({"name": steps[k].get("name", steps[k]["event"]), "count": len(reached),
                    "rate": rate, "median_sec": median})
    return {"total": total, "steps": out, "window_sec": body["window_sec"],
            "correlate_by": correlate_by}


# --------------------------------------------------------------------------- cohorts


def is_cohort_event(event: Event, cohort: str) -> bool:
    if cohort == "first_deposit":
        return event["event_type"] == "wallet.credit" and event["payload"].get(
            "reason") == "deposit"
    if cohort == "registration":
        return event["event_type"] == "player.registered"
    raise ValueError(cohort)


def first_cohort_events(events: list[Event], cohort: str) -> dict[tuple[str, str], Event]:
    """Each (brand, player)'s first cohort event ever, in (occurred_at, event_id) order."""
    firsts: dict[tuple[str, str], Event] = {}
    for e in ref.dedup(events):
        if e.get("player_id") is None or not is_cohort_event(e, cohort):
            continue
        unit = (e["tenant_id"], e["player_id"])
        if unit not in firsts or key(e) < key(firsts[unit]):
            firsts[unit] = e
    return firsts


def cohorts_by_day(events: list[Event], cohort: str, start_date: str, end_date: str,
                   filters: dict[str, Any] | None, tz: ZoneInfo) \
        -> dict[date, set[tuple[str, str]]]:
    """Cohort day (calendar day of the first cohort event in ``tz``) → its players."""
    first, last = date.fromisoformat(start_date), date.fromisoformat(end_date)
    out: dict[date, set[tuple[str, str]]] = defaultdict(set)
    for unit, e in first_cohort_events(events, cohort).items():
        day = t(e).astimezone(tz).date()
        if first <= day <= last and matches_filters(e, filters or {}):
            out[day].add(unit)
    return out


def day_end(day: date, tz: ZoneInfo) -> datetime:
    """The UTC instant local ``day`` ends (the next local midnight; DST-aware)."""
    return datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz).astimezone(UTC)


def retention(events: list[Event], body: dict[str, Any], wm: datetime) -> dict[str, Any]:
    """The answer of ``POST /v1/analytics/retention`` for ``body`` at watermark ``wm``."""
    cohort = body["cohort"]
    zone = body.get("timezone", "UTC")
    mode = body.get("mode", "on")
    days = body.get("days", [1, 7, 14, 30])
    ret = body.get("return_event", "bet.placed")
    ret_obj = ret if isinstance(ret, dict) else {"event": ret}
    tz = ZoneInfo(zone)
    cohorts = cohorts_by_day(events, cohort, body["start_date"], body["end_date"],
                             body.get("filters"), tz)

    returned_on: dict[tuple[str, str], set[date]] = defaultdict(set)
    for e in ref.dedup(events):
        if e.get("player_id") is not None and matches_step(e, ret_obj):
            returned_on[e["tenant_id"], e["player_id"]].add(t(e).astimezone(tz).date())

    rows = []
    for c in sorted(cohorts):
        players = cohorts[c]
        row: dict[str, Any] = {"cohort_date": c.isoformat(), "size": len(players)}
        for n in days:
            target = c + timedelta(days=n)
            if wm < day_end(target, tz):
                row[f"d{n}"] = None
                continue
            back = [p for p in players
                    if any(d == target if mode == "on" else d >= target
                           for d in returned_on[p])]
            row[f"d{n}"] = len(back) / len(players)
        rows.append(row)
    return {"cohort": cohort, "timezone": zone, "mode": mode, "rows": rows}


def ltv(events: list[Event], rates: list[dict[str, str]], *, cohort: str, metric: str,
        horizon: int, start_date: str, end_date: str, wm: datetime, currency: str = ref.BASE,
        filters: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer of ``GET /v1/analytics/ltv`` (``horizon`` already parsed to days)."""
    fx = ref.Rates(rates)
    utc = ZoneInfo("UTC")
    cohorts = cohorts_by_day(events, cohort, start_date, end_date, filters, utc)
    # (brand, player) → {(UTC day, source currency): signed metric sum}
    sums: dict[tuple[str, str], dict[tuple[date, str], int]] = defaultdict(
        lambda: defaultdict(int))
    for o in ref.observations(ref.dedup(events), metric):
        player = o.dims.get("player_id")
        if player is not None:
            sums[o.dims["tenant_id"], player][o.t.date(), o.currency] += o.amounts[0]

    out = []
    for c in sorted(cohorts):
        players = cohorts[c]
        finished = [c + timedelta(days=k) for k in range(horizon)
                    if wm >= day_end(c + timedelta(days=k), utc)]
        cohort_sum: dict[tuple[date, str], int] = defaultdict(int)  # the cohort's, per day
        for p in players:
            for (day, source), amount in sums[p].items():
                cohort_sum[day, source] += amount
        cumulative, series = 0, []
        for day in finished:
            cumulative += sum(fx.convert(amount, source, currency, d)
                              for (d, source), amount in cohort_sum.items() if d == day)
            series.append(round(Fraction(cumulative, len(players))))  # half-to-even
        out.append({"date": c.isoformat(), "size": len(players), "ltv_minor": series})
    return {"metric": metric, "currency": currency, "horizon": horizon, "cohorts": out}

"""A plain-Python reference of CONTRACT §4/§5 for ``timeseries`` and ``slice``.

Independent of ``tally``: it reads the event envelopes exactly as they were sent (CONTRACT §2)
and FX rates as posted (``{"date","currency","rate"}``, base currency ``EUR``), and answers what
the contract says the API must answer. Written for clarity, not speed.

Choices where the contract is silent (each one is also what the tests expect):

- dedup: the first event with a given ``(tenant_id, event_id)`` wins, later ones are ignored;
- ``device`` and ``geo`` (CONTRACT §4) are the ``device`` and ``country`` of the player's first
  ``player.registered`` by ``occurred_at`` — of equal instants, the smallest ``event_id`` —
  of the same ``(tenant_id, player_id)``, for every event of that player; an event without a
  player, or of a player without registration, has neither (``None``: it matches no
  ``device``/``geo`` filter and is the ``None`` group or slice key). :func:`dedup` attaches them
  to each event it keeps, so everything that reads the stored events sees them;
- a group is *present* in a range when at least one observation the metric counts (after the
  filters) falls in ``[start, end)``; without ``group_by`` the one series is always complete;
  groups are ordered by their values as strings, a ``None`` value after every other;
- ``settle_lag_p95`` (CONTRACT §5): each ``bet.settled`` is paired with the latest
  ``bet.placed`` of the same ``(tenant_id, bet_id)`` at or before it (by ``occurred_at``; an
  equal instant counts, lag 0); a settlement with none is not an observation. Dimensions are
  those of the settlement;
- ``dau``: a session is paired by ``(tenant_id, session_id)``; it counts for the player, brand
  and region of its ``session.started``, at that time, when its ``session.ended`` has
  ``duration_sec`` ≥ 60 (``TALLY_ACTIVE_SESSION_MIN`` = 1);
- ``rtp`` is exact(wins) / exact(stake): each sum of a (bucket, source currency) — per UTC
  day and source currency for slice — multiplied by its rate and added *without* rounding
  (CONTRACT §5: "a ratio is computed from the exact converted sums, before any rounding");
- percentiles are nearest-rank: the value at 1-based rank ceil(0.95·n) of the sorted values;
- slice: a ``None`` value (a ratio with a zero denominator) sorts last in both orders; ties by
  key ascending, a ``None`` key (no attribute) after every other.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Any

BASE = "EUR"
EXACT = Context(prec=100)
ACTIVE_SESSION_SEC = 60

GRANULARITIES = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
# Filter / group-by keys: envelope fields, else the payload field of the same name.
ENVELOPE_KEYS = {"brand_id": "tenant_id", "region": "region"}
# Player attributes: the key → the field of the player's registration (CONTRACT §4).
REGISTRATION_KEYS = {"device": "device", "geo": "country"}
REGISTERED = "_registration"  # where dedup() puts an event's player's registration payload
FILTER_KEYS = ("brand_id", "region", "provider_id", "game_id", "method", "currency", "device",
               "geo")
# ISO 4217 minor exponents that are not 2 (a subset is enough for the tests).
_EXPONENTS = {"JPY": 0, "KRW": 0, "CLP": 0, "ISK": 0, "KWD": 3, "BHD": 3, "JOD": 3}

MONEY = "money"
COUNT = "count"
RATIO = "ratio"
PERCENTILE = "percentile"
DISTINCT = "distinct"

# name → kind (how buckets aggregate)
METRICS: dict[str, str] = {
    "stake": MONEY, "wins": MONEY, "ggr": MONEY, "ngr": MONEY, "deposits": MONEY,
    "bets": COUNT, "deposits_count": COUNT,
    "rtp": RATIO, "deposits_success": RATIO,
    "settle_lag_p95": PERCENTILE, "webhook_lag_p95": PERCENTILE,
    "dau": DISTINCT, "wau": DISTINCT, "mau": DISTINCT,
}
WINDOW_DAYS = {"dau": 1, "wau": 7, "mau": 30}


class MissingRate(Exception):
    """No FX rate on or before a day: the API answers 422 naming the currency."""

    def __init__(self, currency: str, day: date) -> None:
        super().__init__(f"no FX rate for {currency} on or before {day}")
        self.currency = currency
        self.day = day


def answer_field(metric: str) -> str:
    return "value_minor" if METRICS[metric] == MONEY else "value"


def minor_exponent(currency: str) -> int:
    return _EXPONENTS.get(currency, 2)


# --------------------------------------------------------------------------- time


def parse_time(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) → aware UTC datetime."""
    parsed = datetime.fromisoformat(text.replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return parsed.astimezone(UTC)


def parse_bound(text: str) -> datetime:
    """``from`` / ``to``: RFC 3339, or ``YYYY-MM-DD`` meaning 00:00 UTC that day."""
    if len(text) == 10:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    return parse_time(text)


def bucket_start(t: datetime, granularity: str) -> datetime:
    step = GRANULARITIES[granularity]
    seconds = int(t.timestamp() // step) * step
    return datetime.fromtimestamp(seconds, UTC)


def format_ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def buckets(start: datetime, end: datetime, granularity: str) -> list[datetime]:
    """Every bucket start of ``granularity`` in ``[start, end)`` (bounds assumed aligned)."""
    step = timedelta(seconds=GRANULARITIES[granularity])
    out, t = [], bucket_start(start, granularity)
    while t < end:
        if t >= start:
            out.append(t)
        t += step
    return out


# --------------------------------------------------------------------------- FX


class Rates:
    def __init__(self, rates: Iterable[dict[str, str]], base: str = BASE) -> None:
        self.base = base
        self._by_currency: dict[str, list[tuple[date, Decimal]]] = defaultdict(list)
        for row in rates:
            self._by_currency[row["currency"]].append(
                (date.fromisoformat(row["date"]), Decimal(row["rate"])))
        for rows in self._by_currency.values():
            rows.sort()

    def rate(self, currency: str, day: date) -> Decimal:
        """Base units per major unit of ``currency`` on ``day``; latest earlier if unset."""
        if currency == self.base:
            return Decimal(1)
        earlier = [rate for d, rate in self._by_currency.get(currency, []) if d <= day]
        if not earlier:
            raise MissingRate(currency, day)
        return earlier[-1]

    def exact(self, minor_sum: int, source: str, target: str, day: date) -> Decimal:
        """One (bucket or day, source currency) sum in minor units of ``target``, unrounded."""
        if source == target:
            return Decimal(minor_sum)
        factor = EXACT.divide(self.rate(source, day), self.rate(target, day))
        factor = EXACT.multiply(
            factor, EXACT.power(Decimal(10), minor_exponent(target) - minor_exponent(source)))
        return EXACT.multiply(Decimal(minor_sum), factor)

    def convert(self, minor_sum: int, source: str, target: str, day: date) -> int:
        """One (bucket or day, source currency) sum → rounded minor units of ``target``."""
        exact = self.exact(minor_sum, source, target, day)
        return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN, context=EXACT))


def convert_sums(sums: dict[tuple[date, str], int], rates: Rates, target: str) -> int:
    """Σ over (day, source currency) of the rounded converted sum."""
    return sum(rates.convert(amount, source, target, day)
               for (day, source), amount in sums.items())


def exact_sums(sums: dict[tuple[date, str], int], rates: Rates, target: str) -> Decimal:
    """Σ over (day, source currency) of the converted sum, nothing rounded (for ratios)."""
    total = Decimal(0)
    for (day, source), amount in sums.items():
        total = EXACT.add(total, rates.exact(amount, source, target, day))
    return total


# --------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class Obs:
    """One thing a metric counts: when, which event gives its dimensions, what it adds."""

    t: datetime
    dims: dict[str, Any]  # the event envelope whose fields filter and group
    currency: str | None = None
    amounts: tuple[int, ...] = ()  # money: (signed amount,) — rtp: (wins, stake)
    tag: str = ""  # deposits_success: "num" or "den"
    number: float = 0.0  # percentiles: the value
    player: str | None = None  # distinct counts


def dedup(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events as stored: the first of each ``(tenant_id, event_id)``, in sending order,
    each a copy carrying its player's registration payload under :data:`REGISTERED`."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for event in events:
        key = (event["tenant_id"], event["event_id"])
        if key not in seen:
            seen.add(key)
            kept.append(event)
    firsts = first_registrations(kept)
    return [{**e, REGISTERED: firsts.get((e["tenant_id"], e.get("player_id")), {})}
            for e in kept]


def first_registrations(events: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(brand, player) → the payload of the player's first ``player.registered``, the
    earliest ``occurred_at`` and then the smallest ``event_id``."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for e in _of_type(events, "player.registered"):
        player = (e["tenant_id"], e["player_id"])
        order = (parse_time(e["occurred_at"]), e["event_id"])
        known = first.get(player)
        if known is None or order < (parse_time(known["occurred_at"]), known["event_id"]):
            first[player] = e
    return {player: e["payload"] for player, e in first.items()}


def field_value(event: dict[str, Any], key: str) -> Any:
    if key in ENVELOPE_KEYS:
        return event.get(ENVELOPE_KEYS[key])
    if key in REGISTRATION_KEYS:  # the player's, never the event's own payload field
        return event.get(REGISTERED, {}).get(REGISTRATION_KEYS[key])
    return event.get("payload", {}).get(key)


def _money(event: dict[str, Any], amount: int) -> Obs:
    return Obs(parse_time(event["occurred_at"]), event, event["payload"]["currency"], (amount,))


def _of_type(events: list[dict[str, Any]], *types: str) -> Iterator[dict[str, Any]]:
    return (e for e in events if e["event_type"] in types)


def _is_deposit(event: dict[str, Any]) -> bool:
    return event["event_type"] == "wallet.credit" and event["payload"]["reason"] == "deposit"


def _activity(events: list[dict[str, Any]]) -> list[Obs]:
    out = []
    for e in events:
        if e["event_type"] == "bet.placed" or _is_deposit(e):
            out.append(Obs(parse_time(e["occurred_at"]), e, player=e["player_id"]))
    started: dict[tuple[str, str], dict[str, Any]] = {}
    for e in _of_type(events, "session.started"):
        started.setdefault((e["tenant_id"], e["payload"]["session_id"]), e)
    long_sessions = {(e["tenant_id"], e["payload"]["session_id"])
                     for e in _of_type(events, "session.ended")
                     if e["payload"]["duration_sec"] >= ACTIVE_SESSION_SEC}
    for key in sorted(long_sessions & set(started)):
        s = started[key]
        out.append(Obs(parse_time(s["occurred_at"]), s, player=s["player_id"]))
    return out


def _settle_lags(events: list[dict[str, Any]]) -> list[Obs]:
    placed: dict[tuple[str, str], list[datetime]] = defaultdict(list)
    for e in _of_type(events, "bet.placed"):
        placed[e["tenant_id"], e["payload"]["bet_id"]].append(parse_time(e["occurred_at"]))
    out = []
    for e in _of_type(events, "bet.settled"):
        t = parse_time(e["occurred_at"])
        before = [p for p in placed.get((e["tenant_id"], e["payload"]["bet_id"]), []) if p <= t]
        if before:
            out.append(Obs(t, e, number=(t - max(before)).total_seconds()))
    return out


def _webhook_lags(events: list[dict[str, Any]]) -> list[Obs]:
    out = []
    for e in events:
        if "ingested_at" not in e:
            raise ValueError(f"event {e['event_id']} has no ingested_at: the reference cannot "
                             "know the server's receive time")
        t = parse_time(e["occurred_at"])
        out.append(Obs(t, e, number=(parse_time(e["ingested_at"]) - t).total_seconds()))
    return out


def _settled_money(events: list[dict[str, Any]], amount: Callable[[dict[str, Any]], int]) \
        -> list[Obs]:
    return [_money(e, amount(e["payload"])) for e in _of_type(events, "bet.settled")]


def observations(events: list[dict[str, Any]], metric: str) -> list[Obs]:
    """What ``metric`` counts in (deduplicated) ``events``."""
    if metric == "stake":
        return _settled_money(events, lambda p: p["stake_minor"])
    if metric == "wins":
        return _settled_money(events, lambda p: p["win_minor"])
    if metric == "ggr":
        return _settled_money(events, lambda p: p["stake_minor"] - p["win_minor"])
    if metric == "ngr":
        # one signed sum per (bucket, currency): stake − win − jackpot − commission − bonus
        out = _settled_money(events, lambda p: p["stake_minor"] - p["win_minor"]
                             - (p.get("jackpot_contribution_minor") or 0)
                             - (p.get("commission_minor") or 0))
        out += [_money(e, -e["payload"]["amount_minor"])
                for e in _of_type(events, "bonus.consumed")]
        return out
    if metric == "rtp":
        return [Obs(parse_time(e["occurred_at"]), e, e["payload"]["currency"],
                    (e["payload"]["win_minor"], e["payload"]["stake_minor"]))
                for e in _of_type(events, "bet.settled")]
    if metric == "bets":
        return [Obs(parse_time(e["occurred_at"]), e) for e in _of_type(events, "bet.settled")]
    if metric == "deposits":
        return [_money(e, e["payload"]["amount_minor"]) for e in events if _is_deposit(e)]
    if metric == "deposits_count":
        return [Obs(parse_time(e["occurred_at"]), e) for e in events if _is_deposit(e)]
    if metric == "deposits_success":
        tags = {"payment.captured": "num", "payment.intent": "den"}
        return [Obs(parse_time(e["occurred_at"]), e, tag=tags[e["event_type"]])
                for e in _of_type(events, *tags)]
    if metric == "settle_lag_p95":
        return _settle_lags(events)
    if metric == "webhook_lag_p95":
        return _webhook_lags(events)
    if metric in WINDOW_DAYS:
        return _activity(events)
    raise KeyError(metric)


def matches(event: dict[str, Any], filters: dict[str, list[str]]) -> bool:
    """Values within a key OR-ed, keys AND-ed; an event without the field never matches."""
    return all(field_value(event, key) in values for key, values in filters.items())


# --------------------------------------------------------------------------- aggregation


def nearest_rank_p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-95 * len(ordered) // 100)  # ceil(0.95 n), in integers
    return ordered[rank - 1]


def aggregate(metric: str, obs: list[Obs], day_of: Callable[[Obs], date], rates: Rates,
              currency: str) -> Any:
    """The value of ``metric`` over ``obs`` (one bucket, or one slice key). Money sums are
    converted per (day_of(obs), source currency); an empty ``obs`` gives the empty value."""
    kind = METRICS[metric]
    if kind == MONEY:
        sums: dict[tuple[date, str], int] = defaultdict(int)
        for o in obs:
            sums[day_of(o), o.currency] += o.amounts[0]
        return convert_sums(sums, rates, currency)
    if kind == COUNT:
        return len(obs)
    if metric == "rtp":
        wins: dict[tuple[date, str], int] = defaultdict(int)
        stake: dict[tuple[date, str], int] = defaultdict(int)
        for o in obs:
            wins[day_of(o), o.currency] += o.amounts[0]
            stake[day_of(o), o.currency] += o.amounts[1]
        converted_stake = exact_sums(stake, rates, currency)
        if converted_stake == 0:
            return None
        return float(EXACT.divide(exact_sums(wins, rates, currency), converted_stake))
    if metric == "deposits_success":
        den = sum(1 for o in obs if o.tag == "den")
        return None if den == 0 else sum(1 for o in obs if o.tag == "num") / den
    if kind == PERCENTILE:
        return nearest_rank_p95([o.number for o in obs])
    if kind == DISTINCT:
        return len({o.player for o in obs})
    raise KeyError(metric)


def _prepare(events: list[dict[str, Any]], metric: str, filters: dict[str, list[str]]) \
        -> list[Obs]:
    if metric not in METRICS:
        raise KeyError(metric)
    return [o for o in observations(dedup(events), metric) if matches(o.dims, filters)]


def timeseries(events: list[dict[str, Any]], rates: list[dict[str, str]], metric: str,
               granularity: str, start: str | datetime, end: str | datetime,
               filters: dict[str, list[str]] | None = None, group_by: list[str] | None = None,
               currency: str = BASE) -> list[dict[str, Any]]:
    """The whole series ``GET /v1/analytics/timeseries`` answers, without pagination."""
    start = parse_bound(start) if isinstance(start, str) else start
    end = parse_bound(end) if isinstance(end, str) else end
    group_by = list(group_by or [])
    fx = Rates(rates)
    window = WINDOW_DAYS.get(metric, 1)
    if window > 1 and granularity != "1d":
        raise ValueError(f"{metric} needs granularity 1d")
    obs = _prepare(events, metric, filters or {})
    field = answer_field(metric)

    def group_of(o: Obs) -> tuple[Any, ...]:
        return tuple(field_value(o.dims, key) for key in group_by)

    by_cell: dict[tuple[datetime, tuple[Any, ...]], list[Obs]] = defaultdict(list)
    for o in obs:
        by_cell[bucket_start(o.t, granularity), group_of(o)].append(o)
    if window > 1:  # wau / mau: a day's bucket sees the activity of the N days ending with it
        spread: dict[tuple[datetime, tuple[Any, ...]], list[Obs]] = defaultdict(list)
        for (day, group), cell in by_cell.items():
            for k in range(window):
                spread[day + timedelta(days=k), group] += cell
        by_cell = spread

    all_buckets = buckets(start, end, granularity)
    in_range = set(all_buckets)
    if group_by:
        groups = sorted({g for (b, g) in by_cell if b in in_range},
                        key=lambda g: tuple((v is None, "" if v is None else str(v))
                                            for v in g))
    else:
        groups = [()]
    series = []
    for b in all_buckets:
        for g in groups:
            value = aggregate(metric, by_cell.get((b, g), []), lambda o: o.t.date(), fx,
                              currency)
            series.append({"ts": format_ts(b), **dict(zip(group_by, g, strict=True)),
                           field: value})
    return series


def slice_(events: list[dict[str, Any]], rates: list[dict[str, str]], metric: str, dim: str,
           start: str | datetime, end: str | datetime,
           filters: dict[str, list[str]] | None = None, order: str = "-value",
           currency: str = BASE) -> list[dict[str, Any]]:
    """Every item ``GET /v1/analytics/slice`` answers, without pagination. Money is converted
    per (UTC day, source currency) within each key."""
    start = parse_bound(start) if isinstance(start, str) else start
    end = parse_bound(end) if isinstance(end, str) else end
    if order not in ("-value", "value"):
        raise ValueError(order)
    fx = Rates(rates)
    obs = [o for o in _prepare(events, metric, filters or {}) if start <= o.t < end]
    by_key: dict[Any, list[Obs]] = defaultdict(list)
    for o in obs:
        by_key[field_value(o.dims, dim)].append(o)
    field = answer_field(metric)
    items = [{dim: key, field: aggregate(metric, cell, lambda o: o.t.date(), fx, currency)}
             for key, cell in by_key.items()]
    sign = -1 if order == "-value" else 1
    # A None value (ratio with a zero denominator) has no place on the value axis: it goes
    # last in both orders (like SQL's NULLS LAST for ascending order), ties by key ascending.
    items.sort(key=lambda item: (item[field] is None,
                                 0 if item[field] is None else sign * item[field],
                                 item[dim] is None, str(item[dim])))
    return items

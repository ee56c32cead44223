"""``POST /v1/analytics/retention`` and ``GET /v1/analytics/ltv`` (CONTRACT §4; rules in
docs/cohorts.md). Cohort members come from ``player_firsts`` (first deposit / registration
per player, kept incrementally); retention reads the return events, LTV ``player_days``."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from sqlglot import exp

from tally.cohorts.request import (
    PLAYER_FILTER_KEYS,
    Step,
    _object,
    day_index,
    day_starts,
    epoch_seconds,
    local_midnight,
    parse_cohort,
    parse_days_range,
    parse_filters,
    parse_step,
    parse_timezone,
)
from tally.cohorts.tables import hashes_collided, keeps_player_hashes, player_hash
from tally.errors import InvalidParameter
from tally.insights.request import parse_bounded_int
from tally.rollups import activity
from tally.semantic import attributes, rules
from tally.semantic.catalog import Metric
from tally.semantic.compiler import Compiled, Params, column, filter_conditions
from tally.semantic.fx import FxRates
from tally.storage.base import Backend

DEFAULT_DAYS = (1, 7, 14, 30)
MAX_DAY = 365
MODES = ("on", "on_or_after")
UTC_ZONE = ZoneInfo("UTC")


@dataclass(frozen=True)
class Retention:
    cohort: str
    first: date
    last: date
    return_event: Step
    days: tuple[int, ...]
    filters: dict[str, tuple[str, ...]]
    zone: ZoneInfo
    mode: str


def parse_retention(body: Any) -> Retention:
    raw = _object(body, "the request body")
    cohort = parse_cohort(raw.get("cohort"))
    first, last = parse_days_range(raw.get("start_date"), raw.get("end_date"))
    return_event = parse_step(raw.get("return_event", rules.BET_PLACED.event_type),
                              "return_event")
    days = raw.get("days", list(DEFAULT_DAYS))
    if (not isinstance(days, list) or not days or len(days) > 64
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DAY
                       for d in days) or len(set(days)) != len(days)):
        raise InvalidParameter(f"days must be a list of distinct integers from 0 to {MAX_DAY}",
                         field="days")
    mode = raw.get("mode", "on")
    if mode not in MODES:
        raise InvalidParameter("mode must be on or on_or_after", field="mode")
    return Retention(cohort, first, last, return_event, tuple(sorted(days)),
                     parse_filters(raw.get("filters"), PLAYER_FILTER_KEYS),
                     parse_timezone(raw.get("timezone")), str(mode))


def members(cohort: str, first: date, last: date, zone: ZoneInfo,
            filters: dict[str, tuple[str, ...]], params: Params,
            hashed: bool = False) -> exp.Select:
    """``(tenant_id, player_id, c[, k])``: the cohort's players, ``c`` = their cohort day as
    days since ``first`` in ``zone`` (``k``: their hash, ``hashed``); ``device`` and ``geo``
    filters choose them by their registration attributes (semantic/attributes.py), like
    every query."""
    select = (
        exp.select(column("tenant_id"), column("player_id"),
                   exp.alias_(day_index(zone, first, last, epoch_seconds(column("first_at"))), "c"),
                   *([exp.alias_(player_hash(), "k")] if hashed else []))
        .from_(attributes.source("player_firsts", filters))
        .where(column("kind").eq(params.bind(cohort)))
        .where(column("first_at") >= params.bind(local_midnight(first, zone)))
        .where(column("first_at") < params.bind(local_midnight(last + timedelta(days=1),
                                                               zone)))
    )
    for condition in filter_conditions(filters, params):
        select = select.where(condition)
    return select


def _epoch(moment: datetime) -> int:
    return int((moment - datetime(1970, 1, 1)).total_seconds())


def activity_source(step: Step, starts: list[int]) -> tuple[str, str] | None:
    """(activity grain, kind) when the return event is a bet or a deposit — the activity
    tables keep who placed a bet or deposited per minute, hour and UTC day — and a grain
    tiles every local day of the span (UTC: days; whole-hour offsets: hours); else None."""
    rule = rules.matching(step.event, step.conditions)
    kinds = [kind for kind, always in rules.ALWAYS_ACTIVE.items() if always == rule]
    if not kinds:
        return None
    kind = kinds[0]
    for grain in sorted(activity.GRAINS, key=activity.GRAINS.__getitem__, reverse=True):
        if all(start % activity.GRAINS[grain] == 0 for start in starts):
            return grain, kind
    return None


def _pair(table: str, hashed: bool = False) -> exp.Expr:
    if hashed:
        return column("k", "r").eq(column("k", table))
    return exp.and_(column("tenant_id", "r").eq(column("tenant_id", table)),
                    column("player_id", "r").eq(column("player_id", table)))


def compile_retention(r: Retention, hashed: bool = False) -> tuple[Compiled, Compiled]:
    """Cohort sizes ``(c, size)`` and returns ``(c, n, players)``: for mode ``on``, ``n`` is
    a day offset with a return; for ``on_or_after``, ``n`` is each member's latest return
    offset (a member returned on or after day N when that offset is ≥ N). ``hashed``: the
    store keeps the players' hashes and none has collided, so members meet their returns of
    the activity tables on ``k`` alone (an integer join, ~2× faster than on the strings at
    100M events)."""
    params = Params()
    span_last = r.last + timedelta(days=max(r.days))
    source = activity_source(r.return_event, day_starts(r.zone, r.first, span_last))
    hashed = hashed and source is not None
    m = members(r.cohort, r.first, r.last, r.zone, r.filters, params, hashed)
    sizes = exp.select(column("c"), exp.alias_(exp.Count(this=exp.Star()), "size")) \
        .from_(m.subquery("m")).group_by(column("c"))
    size_params = dict(params.values)  # the members' parameters only
    player = ["k"] if hashed else ["tenant_id", "player_id"]
    brands = r.filters.get("brand_id")
    begin = local_midnight(r.first, r.zone)
    finish = local_midnight(span_last + timedelta(days=1), r.zone)
    if source is not None:  # bets or deposits: the activity table of a grain that tiles days
        grain, kind = source
        at: exp.Expr = column("bucket")
        returns = (
            exp.select(*(column(c) for c in player),
                       exp.alias_(day_index(r.zone, r.first, span_last, at), "d"))
            .from_(activity.table(grain))
            .where(column("kind").eq(params.bind(kind)))
            .where(at.copy() >= params.bind(_epoch(begin)))
        )
        if r.mode == "on":
            returns = returns.where(at.copy() < params.bind(_epoch(finish)))
    else:
        returns = (
            exp.select(column("tenant_id"), column("player_id"),
                       exp.alias_(day_index(r.zone, r.first, span_last,
                                            epoch_seconds(column("occurred_at"))), "d"))
            .from_("events")
            .where(r.return_event.condition(params))
            .where(column("occurred_at") >= params.bind(begin))
            .where(column("player_id").is_(exp.null()).not_())
        )
        if r.mode == "on":
            returns = returns.where(column("occurred_at") < params.bind(finish))
    if brands:
        returns = returns.where(column("tenant_id").isin(*(params.bind(b) for b in brands)))
    offset = exp.Sub(this=column("d", "r"), expression=column("c", "m"))
    # a player's returns are many rows a day (each event, or each batch's activity row): they
    # are made distinct after the join, over the members' rows of the asked offsets only —
    # not over every player's days (a member has one cohort day, so (c, n, player) is (player,
    # day)); the latest offset (on_or_after) needs no distinct rows at all
    joined = exp.select(column("c", "m"), exp.alias_(offset, "n"),
                        *(column(c, "m") for c in player)) \
        .from_(m.subquery("m")).join(returns.subquery("r"), on=_pair("m", hashed)) \
        .where(offset >= exp.Literal.number(0))
    if r.mode == "on":
        joined = joined.where(offset.copy().isin(*(exp.Literal.number(d) for d in r.days))) \
            .distinct()
        rows = exp.select(column("c"), column("n"),
                          exp.alias_(exp.Count(this=exp.Star()), "players")) \
            .from_(joined.subquery("j")).group_by(column("c"), column("n"))
    else:
        latest = exp.select(column("c"), *(column(c) for c in player),
                            exp.alias_(exp.Max(this=column("n")), "n")) \
            .from_(joined.subquery("j")).group_by(column("c"), *(column(c) for c in player))
        rows = exp.select(column("c"), column("n"),
                          exp.alias_(exp.Count(this=exp.Star()), "players")) \
            .from_(latest.subquery("l")).group_by(column("c"), column("n"))
    return Compiled(sizes, size_params), Compiled(rows, params.values)


def hashed_players(backend: Backend) -> bool:
    """Whether ``backend`` keeps the players' hashes and none has ever collided: its plans may
    join players on ``k`` alone (cohorts/tables.py)."""
    if not keeps_player_hashes(backend.dialect):
        return False
    found = backend.rows(exp.select(exp.alias_(hashes_collided(), "collided")), {})
    return not found[0]["collided"]


def answer_retention(backend: Backend, r: Retention,
                     watermark: datetime | None) -> dict[str, Any]:
    sizes_q, rows_q = compile_retention(r, hashed_players(backend))
    sizes = {int(row["c"]): int(row["size"])
             for row in backend.rows(sizes_q.tree, sizes_q.params)}
    returned: dict[int, dict[int, int]] = defaultdict(dict)
    for row in backend.rows(rows_q.tree, rows_q.params):
        returned[int(row["c"])][int(row["n"])] = int(row["players"])
    rows = []
    for c in sorted(sizes):
        day = r.first + timedelta(days=c)
        size = sizes[c]
        out: dict[str, Any] = {"cohort_date": day.isoformat(), "size": size}
        per_offset = returned.get(c, {})
        for n in r.days:
            done = local_midnight(day + timedelta(days=n + 1), r.zone)
            if watermark is None or done > watermark:
                out[f"d{n}"] = None
                continue
            if r.mode == "on":
                count = per_offset.get(n, 0)
            else:
                count = sum(v for offset, v in per_offset.items() if offset >= n)
            out[f"d{n}"] = count / size
        rows.append(out)
    return {"cohort": r.cohort, "timezone": r.zone.key, "mode": r.mode, "rows": rows}


# --------------------------------------------------------------------------- LTV


@dataclass(frozen=True)
class Ltv:
    cohort: str
    metric: Metric
    first: date
    last: date
    horizon: int
    filters: dict[str, tuple[str, ...]]
    currency: str


def parse_horizon(value: str | None) -> int:
    return parse_bounded_int((value or "90d").removesuffix("d"), "horizon", 1, MAX_DAY,
                             default=90, form="Nd with N")


def compile_ltv(q: Ltv, hashed: bool = False) -> Compiled:
    """Per (cohort day c, UTC day, source currency): the cohort's money measures (``hashed``:
    members meet their ``player_days`` on ``k``, as retention's their returns)."""
    params = Params()
    m = members(q.cohort, q.first, q.last, UTC_ZONE, q.filters, params, hashed)
    first_epoch = (datetime(q.first.year, q.first.month, q.first.day)
                   - datetime(1970, 1, 1)).days * 86_400
    cohort_start = exp.Add(this=exp.Literal.number(first_epoch), expression=exp.Mul(
        this=column("c", "m"), expression=exp.Literal.number(86_400)))
    names = list(dict.fromkeys(name for _, name in q.metric.terms))
    tree = (
        exp.select(column("c", "m"), column("day", "r"), column("currency", "r"),
                   *(exp.alias_(exp.Sum(this=column(n, "r")), n) for n in names))
        .from_(m.subquery("m"))
        .join(exp.alias_(exp.to_table("player_days"), "r", table=True),
              on=_pair("m", hashed))
        .where(column("day", "r") >= cohort_start)
        .where(column("day", "r") < exp.Add(this=cohort_start.copy(), expression=exp.Literal
                                            .number(q.horizon * 86_400)))
        .group_by(column("c", "m"), column("day", "r"), column("currency", "r"))
    )
    return Compiled(tree, params.values)


def answer_ltv(backend: Backend, fx: FxRates, q: Ltv,
               watermark: datetime | None) -> dict[str, Any]:
    params = Params()
    sizes_tree = exp.select(column("c"), exp.alias_(exp.Count(this=exp.Star()), "size")) \
        .from_(members(q.cohort, q.first, q.last, UTC_ZONE, q.filters, params).subquery("m")) \
        .group_by(column("c"))
    sizes = {int(row["c"]): int(row["size"])
             for row in backend.rows(sizes_tree, params.values)}
    compiled = compile_ltv(q, hashed_players(backend))
    table = backend.execute(compiled.tree, compiled.params)
    amounts = [0] * table.num_rows
    for sign, name in q.metric.terms:
        for i, value in enumerate(table.column(name).to_pylist()):
            amounts[i] += sign * int(value)
    daily: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    days: dict[int, date] = {}
    for c, epoch, currency, amount in zip(table.column("c").to_pylist(),
                                          table.column("day").to_pylist(),
                                          table.column("currency").to_pylist(), amounts,
                                          strict=True):
        day = days.get(epoch)
        if day is None:
            day = days[epoch] = datetime.fromtimestamp(epoch, UTC).date()
        k = (day - q.first).days - c
        daily[c][k] += amount if currency == q.currency else \
            fx.convert(((day, currency, amount),), q.currency)
    cohorts = []
    for c in sorted(sizes):
        start = q.first + timedelta(days=c)
        values, total = [], 0
        for k in range(q.horizon):
            end = datetime(start.year, start.month, start.day) + timedelta(days=k + 1)
            if watermark is None or end > watermark:
                break
            total += daily[c].get(k, 0)
            values.append(round(Fraction(total, sizes[c])))
        cohorts.append({"date": start.isoformat(), "size": sizes[c], "ltv_minor": values})
    return {"metric": q.metric.name, "currency": q.currency, "horizon": q.horizon,
            "cohort": q.cohort, "cohorts": cohorts}

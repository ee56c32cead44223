"""``POST /v1/analytics/funnel`` (CONTRACT §4; rules in docs/cohorts.md).

One query: the events of every step and exclusion in ``[from, to + window]``, each step-1
event in ``[from, to)`` an attempt, each later step found by an ``ASOF`` join (the earliest
matching event at or after the previous step — greedy, as the rules define attempts), the
exclusions by one more ``ASOF`` each; then per attempt the steps it reaches, per unit its
best attempt. Python only counts units per depth and takes medians.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from tally.cohorts.request import (
    CORRELATE_FIELDS,
    EVENT_FILTER_KEYS,
    MAX_EXCLUSIONS,
    MAX_FUNNEL_DAYS,
    MAX_STEPS,
    MAX_WINDOW,
    Step,
    _object,
    _positive_int,
    epoch_seconds,
    parse_filters,
    parse_step,
)
from tally.cohorts.tables import (
    DAY,
    HOUR,
    STEP_TIMES,
    gathers_step_lists,
    hashes_collided,
    hour_index,
    keeps_player_hashes,
)
from tally.errors import InvalidParameter
from tally.insights.cache import DataVersion, PartCache
from tally.insights.evaluate import nearest_rank
from tally.insights.request import fingerprint, parse_instant
from tally.semantic import attributes
from tally.semantic.catalog import PLAYER_ATTRIBUTES
from tally.semantic.compiler import Compiled, Params, column, filter_conditions
from tally.storage.base import Backend
from tally.storage.dialects import hash64

EPOCH_DT = datetime(1970, 1, 1)


@dataclass(frozen=True)
class Funnel:
    steps: tuple[Step, ...]
    exclusions: tuple[Step, ...]
    window_sec: int
    start: datetime
    end: datetime
    filters: dict[str, tuple[str, ...]]
    correlate_by: str


def parse(body: Any) -> Funnel:
    raw = _object(body, "the request body")
    raw_steps = raw.get("steps")
    if not isinstance(raw_steps, list) or not 1 <= len(raw_steps) <= MAX_STEPS:
        raise InvalidParameter(f"steps must be a list of 1 to {MAX_STEPS} steps", field="steps")
    steps = []
    for i, item in enumerate(raw_steps):
        step = parse_step(item, f"steps[{i}]", ("within_sec",))
        within = _object(item, f"steps[{i}]").get("within_sec") if isinstance(item, dict) \
            else None
        if within is not None:
            if i == 0:
                raise InvalidParameter("steps[0].within_sec: the first step has no previous step",
                                 field="steps[0].within_sec")
            within = _positive_int(within, f"steps[{i}].within_sec", MAX_WINDOW)
        steps.append(Step(step.event, step.conditions, step.name, within))
    window = _positive_int(raw.get("window_sec"), "window_sec", MAX_WINDOW)
    if not isinstance(raw.get("from"), str) or not isinstance(raw.get("to"), str):
        raise InvalidParameter("from and to are required")
    start, end = parse_instant(raw["from"], "from"), parse_instant(raw["to"], "to")
    if start >= end:
        raise InvalidParameter("from must be before to")
    if end - start > timedelta(days=MAX_FUNNEL_DAYS):
        raise InvalidParameter(f"a funnel range (from..to) is at most {MAX_FUNNEL_DAYS} days",
                         field="to")
    correlate = raw.get("correlate_by", "player_id")
    if correlate not in CORRELATE_FIELDS:
        raise InvalidParameter(f"correlate_by must be one of {', '.join(CORRELATE_FIELDS)}",
                         field="correlate_by")
    exclusions = []
    raw_exclusions = raw.get("exclusions", [])
    if not isinstance(raw_exclusions, list) or len(raw_exclusions) > MAX_EXCLUSIONS:
        raise InvalidParameter(f"exclusions must be a list of at most {MAX_EXCLUSIONS}",
                         field="exclusions")
    for i, item in enumerate(raw_exclusions):
        what = f"exclusions[{i}]"
        step = parse_step(item, what, ("between",))
        between = _object(item, what).get("between", [1, len(steps)])
        if (not isinstance(between, list) or len(between) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) for b in between)
                or not 1 <= between[0] < between[1] <= len(steps)):
            raise InvalidParameter(f"{what}.between must be [i, j] with 1 ≤ i < j ≤ {len(steps)}",
                             field=f"{what}.between")
        exclusions.append(Step(step.event, step.conditions, step.name,
                               between=(between[0], between[1])))
    filters = parse_filters(raw.get("filters"), EVENT_FILTER_KEYS)
    return Funnel(tuple(steps), tuple(exclusions), window, start, end, filters, correlate)


# what a funnel on the kept rows (``step_times``) may ask: steps' conditions on the fields
# that key the rows, filters on the brand, region and the player's attributes, units that
# are players, no exclusions, no step able to take an earlier step's event, a window of at
# most a day (an attempt's next step is looked for in every hour up to its window's end)
KEPT_CONDITIONS = ("reason",)
KEPT_FILTERS = ("brand_id", "region", *PLAYER_ATTRIBUTES)
KEPT_MAX_WINDOW = 86_400


def _overlaps(f: Funnel) -> list[bool]:
    """Per step: may it match an earlier step's event?"""
    return [any(f.steps[k].may_match_same_event(f.steps[j]) for j in range(k))
            for k in range(len(f.steps))]


def kept(f: Funnel) -> bool:
    """Whether the kept rows answer ``f`` (else: the events), on either store."""
    return (f.correlate_by == "player_id" and not f.exclusions
            and f.window_sec <= KEPT_MAX_WINDOW and not any(_overlaps(f))
            and all(field in KEPT_CONDITIONS for s in f.steps for field, _ in s.conditions)
            and all(key in KEPT_FILTERS for key in f.filters))


def _micros(start: exp.Expr, end: exp.Expr) -> exp.Expr:
    return exp.DateDiff(this=end, expression=start, unit=exp.var("MICROSECOND"))


def compile_funnel(f: Funnel, hashed: bool = True) -> Compiled:
    """One row per unit: its best attempt's depth and the microseconds between its steps,
    and whether a hashed join met another unit (then the caller asks again unhashed).

    ``hashed``: the ASOF joins match units on a 64-bit hash of (brand, unit) — 2.5x faster
    than on the two strings (measured at 10M) — and every match is checked against the
    strings; a collision sets ``collided`` and the answer is recomputed on the strings, so
    the result is exact either way."""
    params = Params()
    n = len(f.steps)
    overlaps = _overlaps(f)
    sequenced = any(overlaps)
    flags = [exp.alias_(s.condition(params), f"s{k}") for k, s in enumerate(f.steps)] + \
        [exp.alias_(x.condition(params), f"x{k}") for k, x in enumerate(f.exclusions)]
    unit = column(f.correlate_by)
    event_types = sorted({s.event for s in (*f.steps, *f.exclusions)})
    key = [exp.alias_(hash64(column("tenant_id"), unit.copy()), "k")] if hashed \
        else []
    base = (
        exp.select(column("tenant_id"), exp.alias_(unit, "unit"), *key,
                   exp.alias_(column("occurred_at"), "t"),
                   # the costliest column to read: only where ties need an order
                   *([column("event_id")] if sequenced else []), *flags)
        # device / geo filters: each event's player's registration attributes
        .from_(attributes.source("events", f.filters))
        .where(column("occurred_at") >= params.bind(f.start))
        .where(column("occurred_at") <= params.bind(f.end + timedelta(seconds=f.window_sec)))
        .where(column("event_type").isin(*(exp.Literal.string(t) for t in event_types)))
        .where(unit.is_(exp.null()).not_())
    )
    for condition in filter_conditions(f.filters, params):
        base = base.where(condition)
    if sequenced:  # a total order of each unit's events: (occurred_at, event_id)
        order = exp.Window(this=exp.RowNumber(), partition_by=[column("tenant_id"),
                                                                column("unit")],
                           order=exp.Order(expressions=[exp.Ordered(this=column("t")),
                                                        exp.Ordered(this=column("event_id"))]))
        base = exp.select("*", exp.alias_(order, "seq")).from_(base.subquery("b"))
    ctes: list[tuple[str, exp.Expr]] = [("ev", base)]

    def only(flag: str, *extra: exp.Expr) -> exp.Select:
        cols = [column("tenant_id"), column("unit"), *([column("k")] if hashed else []),
                column("t"), *([column("seq")] if sequenced else [])]
        select = exp.select(*cols).from_("ev").where(column(flag))
        for e in extra:
            select = select.where(e)
        return select

    ctes.append(("a0", exp.select(
        column("tenant_id"), column("unit"), *([column("k")] if hashed else []),
        exp.alias_(column("t"), "t0"),
        *([exp.alias_(column("seq"), "q0")] if sequenced else []))
        .from_(only("s0", column("t") < params.bind(f.end)).subquery("s"))))
    def same_unit() -> exp.Expr:
        if hashed:
            return column("k", "r").eq(column("k", "l"))
        return exp.and_(column("tenant_id", "r").eq(column("tenant_id", "l")),
                        column("unit", "r").eq(column("unit", "l")))

    def met_other(name: str) -> list[exp.Expr]:
        """Hashed: did this join match an event of another unit with the same hash?"""
        if not hashed:
            return []
        other = exp.or_(column("tenant_id", "r").neq(column("tenant_id", "l")),
                        column("unit", "r").neq(column("unit", "l")))
        return [exp.alias_(exp.Coalesce(this=other, expressions=[exp.false()]), name)]

    collisions: list[str] = []
    prev = "a0"
    for k in range(1, n):
        ctes.append((f"m{k}", only(f"s{k}")))
        on: exp.Expr = same_unit()
        if overlaps[k]:  # strictly after every earlier step's event
            on = exp.and_(on, column("seq", "r") > column(f"q{k - 1}", "l"))
        else:
            on = exp.and_(on, column("t", "r") >= column(f"t{k - 1}", "l"))
        keep = [exp.alias_(column("t", "r"), f"t{k}"), *met_other(f"w{k}")]
        collisions += [f"w{k}"] if hashed else []
        if sequenced:
            # the latest position so far (a non-overlapping step may tie before it)
            keep.append(exp.alias_(exp.Greatest(this=column(f"q{k - 1}", "l"),
                                                expressions=[column("seq", "r")],
                                                ignore_nulls=True), f"q{k}"))
        step = (exp.select(exp.Column(this=exp.Star(), table=exp.to_identifier("l")), *keep)
                .from_(exp.alias_(exp.to_table(prev), "l", table=True))
                .join(exp.alias_(exp.to_table(f"m{k}"), "r", table=True), on=on,
                      join_type="ASOF LEFT"))
        ctes.append((f"a{k}", step))
        prev = f"a{k}"
    for k, x in enumerate(f.exclusions):
        i = x.between[0] - 1 if x.between else 0
        ctes.append((f"n{k}", only(f"x{k}")))
        on = exp.and_(same_unit(), column("t", "r") > column(f"t{i}", "l"))
        collisions += [f"v{k}"] if hashed else []
        step = (exp.select(exp.Column(this=exp.Star(), table=exp.to_identifier("l")),
                           exp.alias_(column("t", "r"), f"y{k}"), *met_other(f"v{k}"))
                .from_(exp.alias_(exp.to_table(prev), "l", table=True))
                .join(exp.alias_(exp.to_table(f"n{k}"), "r", table=True), on=on,
                      join_type="ASOF LEFT"))
        ctes.append((f"c{k}", step))
        prev = f"c{k}"
    # a hashed join that met another unit's event, or two units under one hash
    collided: exp.Expr = exp.false()
    for name in collisions:
        collided = exp.or_(collided, exp.LogicalOr(this=column(name)))
    if hashed:
        for name in ("tenant_id", "unit"):
            collided = exp.or_(collided, exp.Min(this=column(name)).neq(
                exp.Max(this=column(name))))
    return _best(f, ctes, prev, collided, sequenced, params,
                 ("k",) if hashed else ("tenant_id", "unit"),
                 (*collisions, "tenant_id", "unit"))


def _table(name: str) -> exp.Table:
    """A table by name, not parsed (sqlglot parses a string it is given)."""
    return exp.Table(this=exp.to_identifier(name))


def _kept_unit(hashed: bool) -> tuple[str, ...]:
    """The columns that tell a kept row's player: its hash, or its (brand, player)."""
    return ("k",) if hashed else ("tenant_id", "player_id")


def _hours_after_starts(f: Funnel, unit: tuple[str, ...], first: int, last_start: int,
                        params: Params) -> exp.Expr:
    """Whether a kept row (its unit, its hour) may hold a later step of an attempt: the
    64-bit hash of (unit, hour) is one of those of the step-1 rows' units and the hours from
    each such row's to the last its window reaches. A superset (a hash that two pairs share
    only lets more rows in), so a plan that reads only these rows is exact."""
    step = f.steps[0]
    reach = exp.IntDiv(this=exp.Paren(this=exp.Add(
        this=exp.Mul(this=column("hour"), expression=exp.Literal.number(HOUR)),
        expression=exp.Literal.number(HOUR - 1 + f.window_sec))),
        expression=exp.Literal.number(HOUR))
    starts = (exp.select(hash64(*(column(u) for u in unit), exp.Explode(
        this=exp.GenerateSeries(start=column("hour"), end=reach))), copy=False)
        .from_(attributes.source(STEP_TIMES, f.filters), copy=False)
        .where(column("event_type").eq(exp.Literal.string(step.event)), copy=False)
        .where(column("hour") >= exp.Literal.number(first), copy=False)
        .where(column("hour") <= exp.Literal.number(last_start), copy=False))
    for field, values in step.conditions:
        starts = starts.where(column(field).isin(*(params.bind(v) for v in values)),
                              copy=False)
    for condition in filter_conditions(f.filters, params):
        starts = starts.where(condition, copy=False)
    return exp.In(this=hash64(*(column(u) for u in unit), column("hour")),
                  query=starts.subquery(copy=False))


def _kept_hours(f: Funnel, spans: tuple[tuple[datetime, datetime], ...] | None
                ) -> tuple[tuple[tuple[datetime, datetime], ...], int, int, int]:
    """The attempts' ranges (``spans``, or the funnel's), and the hours (since the epoch) a
    kept-rows plan reads: the first attempt's, the last attempt's, the last window's end."""
    ranges = spans if spans is not None else ((f.start, f.end),)
    begin, end = min(s for s, _ in ranges), max(e for _, e in ranges)
    first = int((begin - EPOCH_DT).total_seconds()) // HOUR
    last_start = int((end - EPOCH_DT).total_seconds()) // HOUR
    last = int((end - EPOCH_DT).total_seconds() + f.window_sec) // HOUR
    return ranges, first, last_start, last


def compile_kept(f: Funnel, dialect: str = "duckdb",
                 spans: tuple[tuple[datetime, datetime], ...] | None = None) -> Compiled:
    """:func:`compile_funnel` on the kept rows (``step_times``, when :func:`kept`) for a
    store of ``dialect``: its players matched on their hash where it keeps one
    (:func:`~tally.cohorts.tables.keeps_player_hashes`), by the plan that is faster there
    (:func:`~tally.cohorts.tables.gathers_step_lists`: ``_kept_lists`` or ``_kept_joins``).

    ``spans``: the attempts are those starting in these ``[start, end)`` parts of the range
    instead, and the rows are per (unit, UTC day of the start): each unit's best attempt of
    each day (:func:`_best`), for :func:`_by_day` to keep per day."""
    plan = _kept_lists if gathers_step_lists(dialect) else _kept_joins
    return plan(f, keeps_player_hashes(dialect), spans)


def _kept_lists(f: Funnel, hashed: bool,
                spans: tuple[tuple[datetime, datetime], ...] | None) -> Compiled:
    """The kept rows' funnel with no join: the rows of the steps' event types in the range's
    hours are gathered per unit into one list of instants per step (a step's conditions on
    ``reason`` its aggregate's filter), a later step's rows only in the hours an attempt of
    the unit can reach (:func:`_hours_after_starts`: most of a player's bets are far from
    any deposit, 6.7M of 21.5M bets in 30 days at 100M events); the attempts are the step-1
    instants in ``[from, to)``, and each next step is the earliest instant of its list at or
    after the previous step's. Units are their (brand, player)
    hash ``k`` when ``hashed``, else the two strings. ClickHouse's plan: at 100M events
    0.7 s against 1.2 s for :func:`_kept_joins` (whose hash joins build on every bet row of
    the range), where DuckDB's joins take 0.4 s and these lists 0.85 s.

    An instant found past the window is kept (:func:`_best` counts a step only within it,
    and the lists hold every instant of the hours up to the window's end: the earliest at or
    after the previous step is found if one is in the window)."""
    params = Params()
    n = len(f.steps)
    hour = exp.Literal.number
    ranges, first, last_start, last = _kept_hours(f, spans)
    unit = _kept_unit(hashed)
    x = exp.to_identifier("x")

    def lam(body: exp.Expr) -> exp.Lambda:
        return exp.Lambda(this=body, expressions=[x.copy()])

    lists = []
    for k, step in enumerate(f.steps):
        cond: exp.Expr = column("event_type").eq(exp.Literal.string(step.event))
        if k == 0:
            cond = exp.and_(cond, column("hour") <= hour(last_start), copy=False)
        for field, values in step.conditions:
            cond = exp.and_(cond, column(field).isin(*(params.bind(v) for v in values)),
                            copy=False)
        lists.append(exp.alias_(exp.Flatten(this=exp.Filter(
            this=exp.ArrayAgg(this=column("times")), expression=exp.Where(this=cond))),
            f"s{k}", copy=False))
    gathered = (exp.select(*(column(u) for u in unit), *lists, copy=False)
                .from_(attributes.source(STEP_TIMES, f.filters), copy=False)
                .where(column("event_type").isin(
                    *(exp.Literal.string(t) for t in sorted({s.event for s in f.steps}))),
                    copy=False)
                .where(column("hour") >= hour(first), copy=False)
                .where(column("hour") <= hour(last), copy=False)
                .where(exp.or_(column("event_type").eq(exp.Literal.string(f.steps[0].event)),
                               _hours_after_starts(f, unit, first, last_start, params)),
                       copy=False))
    for condition in filter_conditions(f.filters, params):
        gathered = gathered.where(condition, copy=False)
    ctes: list[tuple[str, exp.Expr]] = [
        ("p", gathered.group_by(*(column(u) for u in unit), copy=False))]
    # an attempt is its unit and start: two starts of a unit at one instant find the same
    # steps (steps share no events here), one attempt in effect
    in_range = exp.or_(*(exp.and_(exp.column(x.copy()) >= params.bind(s),
                                  exp.column(x.copy()) < params.bind(e)) for s, e in ranges),
                       copy=False)
    ctes.append(("a0", exp.select(
        *(column(u) for u in unit), *(column(f"s{k}") for k in range(1, n)),
        exp.alias_(exp.Explode(this=exp.ArrayFilter(this=column("s0"),
                                                   expression=lam(in_range))), "t0"),
        copy=False).from_("p", copy=False)))
    for k in range(1, n):
        # the earliest instant of the step at or after the previous step's (none when that
        # was not found)
        earliest = exp.ArrayMin(this=exp.ArrayFilter(
            this=column(f"s{k}"),
            expression=lam(exp.GTE(this=exp.column(x.copy()), expression=column(f"t{k - 1}")))))
        ctes.append((f"a{k}", exp.select(
            *(column(u) for u in unit), *(column(f"t{j}") for j in range(k)),
            *(column(f"s{j}") for j in range(k + 1, n)),
            exp.alias_(earliest, f"t{k}"), copy=False).from_(f"a{k - 1}", copy=False)))
    # hashed: players told apart by their hash alone, asked again of the events if any
    # collided
    return _best(f, ctes, f"a{n - 1}", hashes_collided() if hashed else exp.false(), False,
                 params, unit, per_day=spans is not None)


def _kept_joins(f: Funnel, hashed: bool,
                spans: tuple[tuple[datetime, datetime], ...] | None) -> Compiled:
    """The kept rows' funnel by joins (DuckDB's plan): the attempts are the step-1 instants
    in ``[from, to)``; each next step joins an attempt to its
    player's rows of that step in the hours from the previous step's to the window's end, and
    takes the earliest instant at or after the previous step's. Players are matched on their
    (brand, player) hash ``k`` when ``hashed`` (a hash that two players share makes the
    caller ask the events again, on the strings), else on the two strings.

    Each attempt's columns go on through the step's ``GROUP BY`` (not joined back): every
    common table expression is read once, as ClickHouse, which inlines them, needs."""
    params = Params()
    n = len(f.steps)
    hour = exp.Literal.number
    ranges, first, last_start, last = _kept_hours(f, spans)
    unit = _kept_unit(hashed)

    def rows(step: Step, upto: int) -> exp.Select:
        """The kept rows of ``step`` (its event type, its conditions on ``reason``) in the
        hours from ``from`` to ``upto`` that pass the filters."""
        select = (exp.select(*(column(u) for u in unit), column("hour"), column("times"),
                             copy=False)
                  .from_(attributes.source(STEP_TIMES, f.filters), copy=False)
                  .where(column("event_type").eq(exp.Literal.string(step.event)), copy=False)
                  .where(column("hour") >= hour(first), copy=False)
                  .where(column("hour") <= hour(upto), copy=False))
        for field, values in step.conditions:
            select = select.where(column(field).isin(*(params.bind(v) for v in values)),
                                  copy=False)
        for condition in filter_conditions(f.filters, params):
            select = select.where(condition, copy=False)
        return select

    starts = exp.select(*(column(u) for u in unit),
                        exp.alias_(exp.Explode(this=column("times")), "t", copy=False),
                        copy=False) \
        .from_(rows(f.steps[0], last_start)
               .subquery("r", copy=False), copy=False)
    # an attempt is its unit and start: two starts of a unit at one instant are one attempt
    # (steps share no events here, so both would find the same steps), and a step's instants
    # are gathered per (unit, t0, ...) with no row number to carry through every GROUP BY
    ctes: list[tuple[str, exp.Expr]] = [("a0", exp.select(
        *(column(u) for u in unit), exp.alias_(column("t"), "t0", copy=False), copy=False)
        .from_(starts.subquery("s", copy=False), copy=False)
        .where(exp.or_(*(exp.and_(column("t") >= params.bind(s), column("t") < params.bind(e))
                         for s, e in ranges), copy=False), copy=False))]
    window = exp.Literal.number(f.window_sec)
    x = exp.to_identifier("x")
    for k in range(1, n):
        carried = (*unit, *(f"t{j}" for j in range(k)))
        t_prev = column(f"t{k - 1}")
        # the hours to look in: from the previous step's to the window's end (none when the
        # previous step was not found in time: later steps cannot count)
        hours = exp.GenerateSeries(
            start=hour_index(epoch_seconds(t_prev.copy())),
            end=hour_index(exp.Add(this=epoch_seconds(column("t0")), expression=window)))
        found = exp.and_(t_prev.is_(exp.null()).not_(),
                         _micros(column("t0"), t_prev.copy())
                         <= exp.Literal.number(f.window_sec * 1_000_000))
        look = exp.Case().when(found, hours).else_(exp.Array(expressions=[exp.null()]))
        ctes.append((f"c{k}", exp.select(
            *(column(name) for name in carried),
            exp.alias_(exp.Explode(this=look), "h", copy=False), copy=False)
            .from_(_table(f"a{k - 1}"), copy=False)))
        earliest = exp.ArrayMin(this=exp.ArrayFilter(
            this=column("times", "s"),
            expression=exp.Lambda(this=exp.GTE(this=x.copy(), expression=column(
                f"t{k - 1}", "c")), expressions=[x.copy()])))
        on = exp.and_(*(column(u, "s").eq(column(u, "c")) for u in unit),
                      column("hour", "s").eq(column("h", "c")))
        # grouped by the attempt's columns (one value per attempt: keys cost DuckDB less
        # than ANY_VALUE aggregates, measured at 100M)
        ctes.append((f"a{k}", exp.select(
            *(column(name, "c") for name in carried),
            exp.alias_(exp.Min(this=earliest), f"t{k}", copy=False), copy=False)
            .from_(exp.alias_(_table(f"c{k}"), "c", table=True, copy=False), copy=False)
            .join(exp.alias_(rows(f.steps[k], last).subquery(copy=False), "s", table=True,
                             copy=False), on=on, join_type="LEFT", copy=False)
            .group_by(*(column(name, "c") for name in carried), copy=False)))
    # hashed: players told apart by their hash alone, asked again of the events if any
    # collided
    return _best(f, ctes, f"a{n - 1}", hashes_collided() if hashed else exp.false(), False,
                 params, unit, per_day=spans is not None)


def _best(f: Funnel, ctes: list[tuple[str, exp.Expr]], prev: str, collided: exp.Expr,
          sequenced: bool, params: Params, unit: tuple[str, ...],
          carry: tuple[str, ...] = (), per_day: bool = False) -> Compiled:
    """The answer's rows from the attempts (CTE ``prev``: ``tenant_id``, ``unit``, ``t0``…
    ``t{n-1}`` the instants found for each step, ``y{j}`` each exclusion's, ``q0`` when
    ``sequenced``): per unit (grouped by the columns ``unit``: the hash ``k``, or
    ``tenant_id`` and ``unit``) its best attempt's depth, the microseconds between its steps
    (``gaps``) and ``collided``, an aggregate (of the attempts' columns ``carry``): whether
    a hash met another unit. ``per_day``: per (unit, UTC day of ``t0``) instead, each row
    with its unit's columns and ``day`` (days since the epoch)."""
    n = len(f.steps)
    # reach_k: found, within the window, within its own limit, not cut by an exclusion
    reach: list[exp.Expr] = []
    for k in range(1, n):
        t_k, t_prev, t_0 = column(f"t{k}"), column(f"t{k - 1}"), column("t0")
        parts: list[exp.Expr] = [
            t_k.is_(exp.null()).not_(),
            _micros(t_0, t_k) <= exp.Literal.number(f.window_sec * 1_000_000)]
        within = f.steps[k].within_sec
        if within is not None:
            parts.append(_micros(t_prev, t_k) <= exp.Literal.number(within * 1_000_000))
        for j, x in enumerate(f.exclusions):
            assert x.between is not None
            if x.between[0] - 1 < k <= x.between[1] - 1:
                y = column(f"y{j}")
                parts.append(exp.or_(y.is_(exp.null()), y > t_k.copy()))
        if reach:
            parts.append(exp.Paren(this=reach[-1].copy()))
        reach.append(exp.and_(*parts))
    depth: exp.Expr = exp.Literal.number(1)
    for r in reach:
        depth = exp.Add(this=depth, expression=exp.Case().when(r.copy(), exp.Literal.number(1))
                        .else_(exp.Literal.number(0)))
    gaps = exp.Array(expressions=[_micros(column(f"t{k - 1}"), column(f"t{k}"))
                                  for k in range(1, n)])
    day = [exp.alias_(exp.IntDiv(this=exp.Paren(this=epoch_seconds(column("t0"))),
                                 expression=exp.Literal.number(DAY)), "day", copy=False)] \
        if per_day else []
    attempts = exp.select(*(column(name) for name in dict.fromkeys((*unit, "t0", *carry))),
                          *([column("q0")] if sequenced else []), *day,
                          exp.alias_(depth, "d", copy=False),
                          exp.alias_(gaps, "g", copy=False), copy=False) \
        .from_(_table(prev), copy=False)
    # per unit its best attempt: the most steps, then the earliest start (attempts starting
    # at the same instant are identical unless steps may share events; then the first in
    # (occurred_at, event_id) order wins)
    # (the attempts' columns are named apart from the answer's: ClickHouse would read an
    # alias of the select list inside an aggregate)
    rank = exp.Tuple(expressions=[exp.Neg(this=column("d")), column("t0"),
                                  *([column("q0")] if sequenced else [])])
    best = exp.ArgMin(this=column("g"), expression=rank)
    keys = (*unit, "day") if per_day else unit
    tree = exp.select(*(column(name) for name in keys if per_day),
                      exp.alias_(exp.Max(this=column("d")), "depth", copy=False),
                      exp.alias_(best, "gaps", copy=False),
                      exp.alias_(collided, "collided", copy=False), copy=False) \
        .from_(attempts.subquery("at", copy=False), copy=False) \
        .group_by(*(column(name) for name in keys), copy=False)
    for name, cte in ctes:
        tree = tree.with_(name, as_=cte, copy=False)
    return Compiled(tree, params.values)


def reads(f: Funnel, start: datetime, end: datetime) -> tuple[datetime, datetime] | None:
    """The instants whose events can change the attempts of ``f`` starting in ``[start,
    end)``: up to the end of the last one's window (a step is at most ``window_sec`` after
    its attempt's start); ``None`` (any) when a filter reads the players' registrations."""
    if any(key in PLAYER_ATTRIBUTES for key in f.filters):
        return None
    return start, end + timedelta(seconds=f.window_sec)


ONE_DAY = timedelta(days=1)


def _by_day(backend: Backend, f: Funnel, days: PartCache, version: DataVersion) -> pa.Table | None:
    """A kept-rows funnel's rows per unit (``depth``, ``gaps``, ``collided``) from each whole
    UTC day's best attempts, kept in ``days`` under the data version of the events they read,
    and the rest of the range (its partial first and last days, the days not kept) computed
    in one statement. Exact: an attempt depends only on its start and the window after it (at
    most a day, :data:`KEPT_MAX_WINDOW`: the events of its day and the next), so each unit's
    best attempt over the range is the best of its days' bests — the most steps, then the
    earliest start (a day's version: :func:`reads`). ``None`` when the range holds fewer than
    two whole days (nothing to keep); a table whose ``collided`` is true when a hash has
    collided (the caller asks the events on the strings)."""
    first = datetime.combine(f.start.date(), datetime.min.time())
    if first < f.start:
        first += ONE_DAY
    stop = datetime.combine(f.end.date(), datetime.min.time())
    if (stop - first).days < 2:
        return None
    hashed = keeps_player_hashes(backend.dialect)
    unit = _kept_unit(hashed)
    definition = fingerprint("funnel-day", f.steps, f.window_sec, sorted(f.filters.items()),
                             f.correlate_by, hashed)
    brands = f.filters.get("brand_id")
    parts, missing = [], {}
    for i in range((stop - first).days):
        day = first + i * ONE_DAY
        key = (definition, day, version(brands, reads(f, day, day + ONE_DAY)))
        kept_part = days.get(key)
        if kept_part is None:
            missing[(day - EPOCH_DT).days] = key
        else:
            parts.append(kept_part)
    spans: list[tuple[datetime, datetime]] = []
    wanted = ([(f.start, first)] if f.start < first else []) + \
        [(EPOCH_DT + d * ONE_DAY, EPOCH_DT + (d + 1) * ONE_DAY) for d in sorted(missing)] + \
        ([(stop, f.end)] if stop < f.end else [])
    for s, e in wanted:  # adjacent parts as one
        if spans and spans[-1][1] == s:
            spans[-1] = (spans[-1][0], e)
        else:
            spans.append((s, e))
    columns = [*unit, "day", "depth", "gaps"]
    if spans:
        c = compile_kept(f, backend.dialect, tuple(spans))
        fresh = backend.execute(c.tree, c.params)
        if len(fresh) and pc.any(fresh.column("collided")).as_py():
            return fresh
        # the rows in day order (one take), then each kept day a copy of its slice: a slice
        # would hold the whole table's buffers
        day_of = fresh.column("day").to_numpy()
        order = np.argsort(day_of, kind="stable")
        ordered = day_of[order]
        fresh = fresh.select(columns).take(order).combine_chunks()
        for d, key in missing.items():
            lo, hi = np.searchsorted(ordered, [d, d + 1])
            part = fresh.slice(lo, hi - lo)
            days.put(key, pa.table([pa.concat_arrays(c.chunks) for c in part.columns],
                                   schema=part.schema) if hi > lo else
                     part.schema.empty_table())
        parts.append(fresh)
    else:  # every day kept: whether a hash has collided since is asked on its own
        collided = backend.execute(exp.select(exp.alias_(hashes_collided(), "collided")), {}) \
            if hashed else None
        if collided is not None and collided.column("collided")[0].as_py():
            return collided
    rows = pa.concat_tables(parts, promote_options="permissive")
    # each unit's best row: the most steps, then the earliest start — its earliest day, as a
    # unit's rows are of different days — found as the least of one integer a row (steps
    # missed, day, row number) per unit
    depth = rows.column("depth").to_numpy().astype(np.int64)
    rank = ((MAX_STEPS - depth) << 52) | (rows.column("day").to_numpy().astype(np.int64) << 32) \
        | np.arange(len(rows), dtype=np.int64)
    best = pa.table([*(rows.column(u) for u in unit), pa.array(rank)], names=[*unit, "rank"]) \
        .group_by(list(unit), use_threads=False).aggregate([("rank", "min")])
    rows = rows.take(pc.bit_wise_and(best.column("rank_min"), (1 << 32) - 1))
    return pa.table({"depth": rows.column("depth"), "gaps": rows.column("gaps"),
                     "collided": np.zeros(len(rows), dtype=bool)})


def answer(backend: Backend, f: Funnel, *, kept_rows: bool | None = None,
           days: PartCache | None = None, version: DataVersion | None = None) -> dict[str, Any]:
    """The funnel's answer, from the kept rows when they can give it (:func:`kept`; or as
    ``kept_rows`` says: both plans give the same answer), else from the events; a hash
    collision either way is answered again from the events on the strings. With ``days``
    and ``version``, a kept-rows funnel keeps and reuses its whole days' results
    (:func:`_by_day`): a sliding range computes only what is new."""
    if kept_rows is None:
        kept_rows = kept(f)
    table = _by_day(backend, f, days, version) \
        if kept_rows and days is not None and version is not None else None
    if table is None:
        c = compile_kept(f, backend.dialect) if kept_rows \
            else compile_funnel(f)
        table = backend.execute(c.tree, c.params)
    if len(table) and pc.any(table.column("collided")).as_py():
        table = backend.execute((c := compile_funnel(f, hashed=False)).tree, c.params)
    depth = table.column("depth").to_numpy(zero_copy_only=False).astype(np.int64)
    total = int(len(depth))
    steps = []
    for k, step in enumerate(f.steps):
        reached = depth >= k + 1
        count = int(reached.sum())
        median = None
        if k and count:
            gaps = pc.list_element(table.column("gaps"), k - 1) \
                .to_numpy(zero_copy_only=False)[reached]
            # the one percentile rule of the semantic layer, at q = 0.5
            median = nearest_rank(gaps, 0.5) / 1_000_000
        rate = None if total == 0 else (1.0 if k == 0 else count / total)
        steps.append({"name": step.name, "count": count, "rate": rate, "median_sec": median})
    return {"total": total, "steps": steps, "window_sec": f.window_sec,
            "correlate_by": f.correlate_by}

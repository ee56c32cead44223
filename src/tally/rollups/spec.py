"""Rollup tables: measure sums per (bucket, brand, region, provider, game, method, currency),
and narrow ones without the game's columns (read by the queries that name no game or provider).

Each grain's rows are appended in the same transaction as the events they summarise (the store
runs :func:`maintenance` on every appended batch), so a rollup can never disagree with the
events, a late event simply adds a row to the buckets it belongs to, and a journal replay
rebuilds exactly what it applies. Queries sum the rows of a bucket; distinct counts and
percentiles are not additive and stay on the events.
"""

from __future__ import annotations

from datetime import UTC
from functools import cache

from sqlglot import exp

from tally.cohorts.tables import derived_tables as cohort_tables
from tally.rollups import activity
from tally.semantic import attributes
from tally.semantic.catalog import DIMENSIONS, MEASURES, Measure, Metric
from tally.semantic.compiler import (
    Compiled,
    Params,
    Scope,
    bucket,
    filter_conditions,
    measure_sum,
    measure_sum_type,
)
from tally.storage.base import DerivedTable
from tally.storage.dialects import render

GRAINS = {"1m": 60, "1h": 3600, "1d": 86400}
# event_type is kept so a group is present exactly when the events path finds it present
DIMENSION_COLUMNS = ("event_type", "tenant_id", "region", "provider_id", "game_id", "method",
                     "currency")
EVENT_TYPES = tuple(sorted({m.event_type for m in MEASURES.values()}))
# A narrow rollup leaves out the game's columns: a query that names neither reads it, a few
# rows a minute per brand where the full rollup holds one per game played (at 100M events a
# day of minutes is 141K full rows against 38.7K narrow ones, measured)
GAME_COLUMNS = ("provider_id", "game_id")
NARROW_COLUMNS = tuple(c for c in DIMENSION_COLUMNS if c not in GAME_COLUMNS)


def table(grain: str, narrow: bool = False) -> str:
    return f"rollup_{grain}_narrow" if narrow else f"rollup_{grain}"


def _columns(narrow: bool) -> tuple[str, ...]:
    return NARROW_COLUMNS if narrow else DIMENSION_COLUMNS


def ddl(grain: str, narrow: bool = False) -> str:
    columns = ["bucket BIGINT NOT NULL", *(f"{c} VARCHAR" for c in _columns(narrow)),
               *(f"{name} {measure_sum_type(m)} NOT NULL" for name, m in MEASURES.items())]
    return f"CREATE TABLE IF NOT EXISTS {table(grain, narrow)} ({', '.join(columns)})"


def _rows(grain: str, source: str, narrow: bool) -> exp.Select:
    """The rollup rows of the events of ``source``: ``SELECT … GROUP BY …`` in time order."""
    dimensions = _columns(narrow)
    keys = [exp.alias_(bucket(GRAINS[grain]), "bucket"),
            *(exp.column(c) for c in dimensions)]
    return (
        exp.select(*keys, *(measure_sum(m) for m in MEASURES.values()))
        .from_(source)
        .where(exp.column("event_type").isin(*(exp.Literal.string(t) for t in EVENT_TYPES)))
        .group_by(exp.column("bucket"), *(exp.column(c) for c in dimensions))
        # stored in time order, so a range query skips row groups by their bucket min/max
        .order_by(exp.column("bucket"))
    )


def maintenance(grain: str, source: str, narrow: bool = False) -> exp.Insert:
    """``INSERT INTO rollup_<grain>[_narrow] SELECT … FROM <source> GROUP BY …``: how a
    rollup is filled from the stored events."""
    return exp.insert(_rows(grain, source, narrow), table(grain, narrow))


# A batch's full minute rows, which every rollup of the batch sums again: the events' measure
# expressions are planned once a batch, not once a table (DuckDB spends ~5 ms binding them,
# a 1,000-event batch's whole GROUP BY being far less)
BATCH_MINUTES = "_new_minutes"


def _resummed(grain: str, narrow: bool) -> exp.Insert:
    """``INSERT INTO rollup_<grain>[_narrow]`` the batch's minute rows summed to ``grain``:
    the rows ``maintenance`` makes from the same events (a minute lies in one hour and one
    day; sums of sums are the sums)."""
    # every column by its table's name: ClickHouse would read `SUM(stake_sum) AS stake_sum`'s
    # inner name as the alias (an aggregate in an aggregate), and the bucket likewise
    dimensions = [exp.column(c, BATCH_MINUTES) for c in _columns(narrow)]
    at: exp.Expr = exp.column("bucket", BATCH_MINUTES)
    if GRAINS[grain] != GRAINS["1m"]:
        size = exp.Literal.number(GRAINS[grain])
        at = exp.Mul(this=exp.IntDiv(this=at, expression=size), expression=size.copy())
    select = (
        exp.select(exp.alias_(at, "bucket"), *dimensions,
                   *(exp.alias_(exp.Sum(this=exp.column(name, BATCH_MINUTES)), name)
                     for name in MEASURES))
        .from_(BATCH_MINUTES)
        # by expression: the source's own `bucket` would win over the alias
        .group_by(at.copy(), *(d.copy() for d in dimensions))
        .order_by(exp.column("bucket"))
    )
    return exp.insert(select, table(grain, narrow))


def _batch_statements(grain: str, narrow: bool) -> list[exp.Expr]:
    if (grain, narrow) != ("1m", False):
        return [_resummed(grain, narrow)]
    minutes = exp.Create(this=exp.to_table(BATCH_MINUTES), kind="TABLE", replace=True,
                         properties=exp.Properties(expressions=[exp.TemporaryProperty()]),
                         expression=_rows("1m", "_new_events", False))
    copied = exp.select(exp.Star()).from_(BATCH_MINUTES)
    return [minutes, exp.insert(copied, table("1m"))]


@cache
def derived_tables(dialect: str) -> tuple[DerivedTable, ...]:
    """The rollups as tables the store keeps from the events, one per grain, and the other
    derived tables, their statements in ``dialect`` (ClickHouse keeps the upserts of
    ``player_firsts`` and ``player_attributes`` as argMin states: see
    docs/architecture.md#derived-tables-on-clickhouse). ``rollup_1m`` comes first: its
    batch statements make the minute rows the others sum. Built once a dialect (the
    statements are constants, and generating them takes a tenth of a second)."""
    assert next(iter(GRAINS)) == "1m"
    types = tuple((name, measure_sum_type(m)) for name, m in MEASURES.items())
    return (*(DerivedTable(table(grain, narrow), ddl(grain, narrow),
                           tuple(render(sql, dialect)
                                 for sql in _batch_statements(grain, narrow)),
                           (render(maintenance(grain, "events", narrow), dialect),), types)
              for narrow in (False, True) for grain in GRAINS),
            *activity.derived_tables(dialect), *cohort_tables(dialect),
            attributes.derived_table(dialect))


def compile_from_rollup(metric: Metric, scope: Scope, by_currency: bool) -> Compiled | None:
    """The measures of ``metric`` summed from the coarsest rollup that tiles the request, or
    None when no rollup can answer it exactly (unaligned range, no grain divides the step, a
    player attribute named: the events answer those)."""
    grain = grain_for(scope.step_seconds)
    if grain is None or scope.player_attributes:  # rollups keep no player to join
        return None
    size = GRAINS[grain]
    start = int(scope.start.replace(tzinfo=UTC).timestamp())
    end = int(scope.end.replace(tzinfo=UTC).timestamp())
    if start % size or end % size:
        return None
    params = Params()
    # every column by its table's name: the answer's `bucket` (an alias) is not the table's
    # (ClickHouse resolves a bare name to the alias first, in WHERE and GROUP BY too)
    name = table(grain, narrow=not {DIMENSIONS[k].column for k in scope.keys} & set(GAME_COLUMNS))
    step = exp.Literal.number(scope.step_seconds)
    keys: list[exp.Expr] = [
        exp.alias_(exp.Mul(this=exp.IntDiv(this=exp.column("bucket", name), expression=step),
                           expression=step.copy()), "bucket"),
        *(exp.alias_(exp.column(DIMENSIONS[g].column, name), g) for g in scope.group_by)]
    if by_currency:
        keys.append(exp.alias_(exp.column("currency", name), "source_currency"))
    measures = list(dict.fromkeys(metric.measures))
    conditions: list[exp.Expr] = [exp.column("bucket", name) >= params.bind(start),
                                  exp.column("bucket", name) < params.bind(end),
                                  counted_rows(measures, name)]
    conditions += filter_conditions(scope.filters, params, name)
    # built fresh here: no copies (sqlglot copies the whole tree per call by default), and the
    # table as a node (a string would be parsed)
    tree = (
        exp.select(*keys, *(exp.alias_(exp.Sum(this=exp.column(m.name, name)), m.name)
                            for m in measures), copy=False)
        .from_(exp.to_table(name), copy=False)
        .where(exp.and_(*conditions, copy=False), copy=False)
        # by expression, not alias: the table's own `bucket` column would win over the alias
        .group_by(*(k.this.copy() for k in keys), copy=False)
    )
    return Compiled(tree, params.values)


def counted_rows(measures: list[Measure], name: str | None = None) -> exp.Expr:
    """The rollup rows holding an event ``measures`` count — a group is present exactly where
    it is on the events (``compiler.counted_events``). The reason of a wallet event is not
    a rollup dimension: a row of its event type holds one when that reason's count is not 0
    (leaving out the other rows changes no sum: theirs are 0). Columns of table ``name``."""
    plain = sorted({m.event_type for m in measures if m.reason is None})
    kind = exp.column("event_type", name)
    conditions: list[exp.Expr] = \
        [kind.isin(*(exp.Literal.string(t) for t in plain), copy=False)] if plain else []
    for event_type, reason in sorted({(m.event_type, m.reason) for m in measures
                                      if m.reason is not None}):
        count = next(c for c in MEASURES.values() if c.column is None
                     and (c.event_type, c.reason) == (event_type, reason))
        conditions.append(exp.and_(kind.copy().eq(exp.Literal.string(event_type)),
                                   exp.column(count.name, name) > exp.Literal.number(0)))
    return exp.or_(*conditions)


def grain_for(step_seconds: int) -> str | None:
    """The coarsest grain whose buckets tile ``step_seconds`` (5m reads 1m, 1d reads 1d)."""
    for grain in ("1d", "1h", "1m"):
        if step_seconds and step_seconds % GRAINS[grain] == 0:
            return grain
    return None

"""Player activity: who was active in which minute, hour and UTC day, for dau/wau/mau.

Rows ``(bucket, tenant_id, region, player_id, session_sec, kind[, k])`` per grain (``kind``:
bet, deposit or session, so retention can read bets or deposits alone; ``k`` the player's
64-bit hash where the store keeps them, which retention joins on): ``session_sec`` is
NULL for a bet or a deposit (always active) and the session's duration for a session start, so
the ``TALLY_ACTIVE_SESSION_MIN`` threshold is applied when querying and changing it needs no
rebuild. A session start and its end may arrive in either order, in different batches:
``session_starts`` and ``session_ends`` keep both sides, and each batch pairs its own starts
with every known end and its own ends with every known start, once per batch for all grains
(a repeated row is harmless: the query counts distinct players). Everything runs in the events'
transaction.
"""

from __future__ import annotations

from datetime import UTC

from sqlglot import exp

from tally.cohorts.tables import keeps_player_hashes, player_hash
from tally.semantic import attributes, rules
from tally.semantic.catalog import DIMENSIONS
from tally.semantic.compiler import Compiled, Params, Scope, bucket, filter_conditions
from tally.storage.base import DerivedTable
from tally.storage.dialects import render

DAY = 86_400
# measured on the 10M demo store (docs/benchmarks.md): see GRAINS' comment there
GRAINS = {"1m": 60, "1h": 3600, "1d": DAY}


def _not_null(name: str) -> exp.Expr:
    return exp.column(name).is_(exp.null()).not_()


def _side(source: str | exp.Expr, alias: str) -> exp.Expr:
    """A table, or a query of the new events, under ``alias``."""
    if isinstance(source, str):
        return exp.alias_(exp.to_table(source), alias, table=True)
    return exp.alias_(exp.Subquery(this=source), alias, table=True)


def _pairs(starts: str | exp.Expr, ends: str | exp.Expr) -> exp.Select:
    """Each session start with its end's duration (a session known from both sides)."""
    return (
        # every column named (ClickHouse names an unaliased `e.duration_sec` with its table)
        exp.select(*(exp.alias_(exp.column(c, "s"), c)
                     for c in ("tenant_id", "region", "player_id")),
                   exp.alias_(exp.column("occurred_at", "s"), "started_at"),
                   exp.alias_(exp.column("duration_sec", "e"), "duration_sec"))
        .from_(_side(starts, "s"))
        .join(_side(ends, "e"), on=exp.and_(
            exp.column("tenant_id", "e").eq(exp.column("tenant_id", "s")),
            exp.column("session_id", "e").eq(exp.column("session_id", "s"))))
    )


_NEW_STARTS = exp.select("*").from_("_new_events").where(rules.SESSION_STARTED.condition()) \
    .where(_not_null("player_id"))
_NEW_ENDS = exp.select("*").from_("_new_events").where(rules.SESSION_ENDED.condition())
_START_COLUMNS = ("tenant_id", "session_id", "occurred_at", "region", "player_id")
_END_COLUMNS = ("tenant_id", "session_id", "duration_sec")


def _keep_starts(source: str) -> exp.Expr:
    """The session starts of ``source`` (of a player) into ``session_starts``."""
    return exp.insert(exp.select(*_START_COLUMNS).from_(source)
                      .where(rules.SESSION_STARTED.condition())
                      .where(_not_null("player_id")), "session_starts")


def _keep_ends(source: str) -> exp.Expr:
    """The session ends of ``source`` into ``session_ends``."""
    return exp.insert(exp.select(*_END_COLUMNS).from_(source)
                      .where(rules.SESSION_ENDED.condition()), "session_ends")


def derived_tables(dialect: str) -> list[DerivedTable]:
    """The session sides and the activity tables, their statements in ``dialect``."""
    new_pairs = exp.Create(
        this=exp.to_table("_new_pairs"), kind="TABLE", replace=True,
        properties=exp.Properties(expressions=[exp.TemporaryProperty()]),
        expression=exp.union(_pairs(_NEW_STARTS, "session_ends"),
                             _pairs("session_starts", _NEW_ENDS), distinct=True))
    starts = DerivedTable(
        "session_starts",
        "CREATE TABLE IF NOT EXISTS session_starts (tenant_id VARCHAR, session_id VARCHAR, "
        "occurred_at TIMESTAMP, region VARCHAR, player_id VARCHAR)",
        (render(_keep_starts("_new_events"), dialect),),
        (render(_keep_starts("events"), dialect),))
    ends = DerivedTable(
        "session_ends",
        "CREATE TABLE IF NOT EXISTS session_ends (tenant_id VARCHAR, session_id VARCHAR, "
        "duration_sec BIGINT)",
        (render(_keep_ends("_new_events"), dialect),
         # the sessions this batch completes, paired once for every grain
         render(new_pairs, dialect)),
        (render(_keep_ends("events"), dialect),))
    return [starts, ends, *(_activity(grain, dialect) for grain in GRAINS)]


def table(grain: str) -> str:
    return f"active_{grain}"


# tables of earlier versions, dropped when a store is opened (see storage.duckdb)
RETIRED = tuple(f"activity_{grain}" for grain in GRAINS)


def _activity(grain: str, dialect: str) -> DerivedTable:
    name, size = table(grain), GRAINS[grain]
    kind = rules.active_kind()
    # the player's 64-bit hash, where the store keeps them: retention joins on it
    hashed = keeps_player_hashes(dialect)
    k: list[exp.Expr] = [player_hash()] if hashed else []

    def direct(source: str) -> exp.Expr:
        return exp.insert(
            exp.select(bucket(size), "tenant_id", "region", "player_id", exp.null(), kind, *k)
            .distinct().from_(source).where(rules.always_active())
            .where(_not_null("player_id"))
            .order_by(exp.Literal.number(1)), name)

    def sessions(pairs: exp.Expr) -> exp.Expr:
        return exp.insert(
            exp.select(bucket(size, None, "started_at"), "tenant_id", "region", "player_id",
                       "duration_sec", exp.Literal.string(rules.SESSION_KIND),
                       *(h.copy() for h in k))
            .distinct().from_(exp.Subquery(this=pairs)), name)

    return DerivedTable(
        name,
        f"CREATE TABLE IF NOT EXISTS {name} (bucket BIGINT NOT NULL, tenant_id VARCHAR, "
        "region VARCHAR, player_id VARCHAR, session_sec BIGINT, kind VARCHAR"
        + (", k UBIGINT)" if hashed else ")"),
        (render(direct("_new_events"), dialect),
         render(sessions(exp.select("*").from_("_new_pairs")), dialect)),
        (render(direct("events"), dialect),
         render(sessions(_pairs("session_starts", "session_ends")), dialect)))


def grain_for(scope: Scope) -> str | None:
    """The coarsest activity grain that tiles the request's buckets and range, if any."""
    start = int(scope.start.replace(tzinfo=UTC).timestamp())
    end = int(scope.end.replace(tzinfo=UTC).timestamp())
    for grain in sorted(GRAINS, key=GRAINS.__getitem__, reverse=True):
        size = GRAINS[grain]
        if scope.step_seconds and not scope.step_seconds % size and not start % size \
                and not end % size:
            return grain
    return None


def compile_active_from_rollup(scope: Scope, min_session_seconds: int,
                               distinct: bool) -> Compiled | None:
    """Active players per (bucket, groups) from the coarsest activity table that tiles the
    request; None when none does (a range not aligned to a minute). Its rows name the player,
    so a player attribute is joined on like on the events."""
    grain = grain_for(scope)
    if grain is None:
        return None
    params = Params()
    start = int(scope.start.replace(tzinfo=UTC).timestamp())
    end = int(scope.end.replace(tzinfo=UTC).timestamp())
    # every column by its table's name: the answer's `bucket` (an alias) is not the table's
    # (ClickHouse resolves a bare name to the alias first, in WHERE and GROUP BY too)
    name = table(grain)
    conditions: list[exp.Expr] = [
        exp.column("bucket", name) >= params.bind(start),
        exp.column("bucket", name) < params.bind(end),
        exp.or_(exp.column("session_sec", name).is_(exp.null()),
                rules.long_enough(exp.column("session_sec", name),
                                  params.bind(min_session_seconds))),
    ]
    conditions += filter_conditions(scope.filters, params, name)
    at: exp.Expr = exp.column("bucket", name)
    if scope.step_seconds != GRAINS[grain]:
        step = exp.Literal.number(scope.step_seconds)
        at = exp.Mul(this=exp.IntDiv(this=at, expression=step), expression=step.copy())
    keys: list[exp.Expr] = [exp.alias_(at, "bucket"),
                            *(exp.alias_(exp.column(DIMENSIONS[g].column, name), g)
                              for g in scope.group_by)]
    player = exp.column("player_id", name)
    value = exp.Count(this=exp.Distinct(expressions=[player])) if distinct else player
    tree = exp.select(*keys, exp.alias_(value, "value")) \
        .from_(attributes.source(name, scope.keys)).where(exp.and_(*conditions))
    tree = tree.group_by(*(k.this.copy() for k in keys)) if distinct else tree.distinct()
    return Compiled(tree, params.values)

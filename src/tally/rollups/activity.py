"""Player activity: who was active in which minute, hour and UTC day, for dau/wau/mau.

Rows ``(bucket, tenant_id, region, player_id, session_sec, kind)`` per grain (``kind``: bet,
deposit or session, so retention can read bets or deposits alone): ``session_sec`` is
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

from tally.semantic import attributes
from tally.semantic.catalog import DIMENSIONS
from tally.semantic.compiler import Compiled, Params, Scope, bucket, filter_conditions
from tally.storage.base import DerivedTable

DAY = 86_400
# measured on the 10M demo store (docs/benchmarks.md): see GRAINS' comment there
GRAINS = {"1m": 60, "1h": 3600, "1d": DAY}
_DIRECT = ("event_type = 'bet.placed' OR (event_type = 'wallet.credit' AND reason = 'deposit')")


_PAIRS = ("SELECT s.tenant_id, s.region, s.player_id, s.occurred_at AS started_at, "
          "e.duration_sec FROM {s} AS s JOIN {e} AS e "
          "ON e.tenant_id = s.tenant_id AND e.session_id = s.session_id")
_NEW_STARTS = ("(SELECT * FROM _new_events WHERE event_type = 'session.started' "
               "AND player_id IS NOT NULL)")
_NEW_ENDS = "(SELECT * FROM _new_events WHERE event_type = 'session.ended')"


def _bucket(size: int) -> str:
    return bucket(size).sql(dialect="duckdb")


def derived_tables() -> list[DerivedTable]:
    starts = DerivedTable(
        "session_starts",
        "CREATE TABLE IF NOT EXISTS session_starts (tenant_id VARCHAR, session_id VARCHAR, "
        "occurred_at TIMESTAMP, region VARCHAR, player_id VARCHAR)",
        ("INSERT INTO session_starts SELECT tenant_id, session_id, occurred_at, region, "
         "player_id FROM _new_events WHERE event_type = 'session.started' "
         "AND player_id IS NOT NULL",),
        ("INSERT INTO session_starts SELECT tenant_id, session_id, occurred_at, region, "
         "player_id FROM events WHERE event_type = 'session.started' "
         "AND player_id IS NOT NULL",))
    ends = DerivedTable(
        "session_ends",
        "CREATE TABLE IF NOT EXISTS session_ends (tenant_id VARCHAR, session_id VARCHAR, "
        "duration_sec BIGINT)",
        ("INSERT INTO session_ends SELECT tenant_id, session_id, duration_sec FROM _new_events "
         "WHERE event_type = 'session.ended'",
         # the sessions this batch completes, paired once for every grain
         "CREATE OR REPLACE TEMP TABLE _new_pairs AS "
         + _PAIRS.format(s=_NEW_STARTS, e="session_ends") + " UNION "
         + _PAIRS.format(s="session_starts", e=_NEW_ENDS)),
        ("INSERT INTO session_ends SELECT tenant_id, session_id, duration_sec FROM events "
         "WHERE event_type = 'session.ended'",))
    return [starts, ends, *(_activity(grain) for grain in GRAINS)]


def table(grain: str) -> str:
    return f"active_{grain}"


# tables of earlier versions, dropped when a store is opened (see storage.duckdb)
RETIRED = tuple(f"activity_{grain}" for grain in GRAINS)
KINDS = {"bet.placed": "bet", "deposit": "deposit"}  # retention's return events, by kind


def _activity(grain: str) -> DerivedTable:
    name, size = table(grain), GRAINS[grain]
    kind = "CASE WHEN event_type = 'bet.placed' THEN 'bet' ELSE 'deposit' END"
    direct = ("SELECT DISTINCT {b}, tenant_id, region, player_id, NULL, " + kind  # noqa: S608
              + " FROM {src} WHERE (" + _DIRECT + ") AND player_id IS NOT NULL ORDER BY 1")
    sessions = ("SELECT DISTINCT {b}, tenant_id, region, player_id, duration_sec, "  # noqa: S608
                "'session' FROM ({src})")
    here, started = _bucket(size), bucket(size, None, "started_at").sql(dialect="duckdb")
    insert = f"INSERT INTO {name} "  # noqa: S608 - names and SQL of this module only
    return DerivedTable(
        name,
        f"CREATE TABLE IF NOT EXISTS {name} (bucket BIGINT NOT NULL, tenant_id VARCHAR, "
        "region VARCHAR, player_id VARCHAR, session_sec BIGINT, kind VARCHAR)",
        (insert + direct.format(b=here, src="_new_events"),
         insert + sessions.format(b=started, src="SELECT * FROM _new_pairs")),
        (insert + direct.format(b=here, src="events"),
         insert + sessions.format(
             b=started, src=_PAIRS.format(s="session_starts", e="session_ends"))))


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
    conditions: list[exp.Expr] = [
        exp.column("bucket") >= params.bind(start), exp.column("bucket") < params.bind(end),
        exp.or_(exp.column("session_sec").is_(exp.null()),
                exp.column("session_sec") >= params.bind(min_session_seconds)),
    ]
    conditions += filter_conditions(scope.filters, params)
    at: exp.Expr = exp.column("bucket")
    if scope.step_seconds != GRAINS[grain]:
        step = exp.Literal.number(scope.step_seconds)
        at = exp.Mul(this=exp.IntDiv(this=at, expression=step), expression=step.copy())
    keys: list[exp.Expr] = [exp.alias_(at, "bucket"),
                            *(exp.alias_(exp.column(DIMENSIONS[g].column), g)
                              for g in scope.group_by)]
    player = exp.column("player_id")
    value = exp.Count(this=exp.Distinct(expressions=[player])) if distinct else player
    tree = exp.select(*keys, exp.alias_(value, "value")) \
        .from_(attributes.source(table(grain), scope.keys)).where(exp.and_(*conditions))
    tree = tree.group_by(*(k.this.copy() for k in keys)) if distinct else tree.distinct()
    return Compiled(tree, params.values)

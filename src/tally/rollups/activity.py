"""Daily player activity: who was active on which UTC day, for dau/wau/mau at 1d.

Rows ``(bucket, tenant_id, region, player_id, session_sec)``: ``session_sec`` is NULL for a bet
or a deposit (always active) and the session's duration for a session start, so the
``TALLY_ACTIVE_SESSION_MIN`` threshold is applied when querying and changing it needs no
rebuild. A session start and its end may arrive in either order, in different batches:
``session_starts`` and ``session_ends`` keep both sides, and each batch pairs its own starts
with every known end and its own ends with every known start (a repeated row is harmless: the
query counts distinct players). Everything runs in the events' transaction.
"""

from __future__ import annotations

from datetime import UTC

from sqlglot import exp

from tally.semantic.catalog import DIMENSIONS
from tally.semantic.compiler import Compiled, Params, Scope, bucket
from tally.storage.base import DerivedTable

DAY = 86_400
_DAY_BUCKET = bucket(DAY).sql(dialect="duckdb")
_DIRECT = ("event_type = 'bet.placed' OR (event_type = 'wallet.credit' AND reason = 'deposit')")


def _bucket_of(table: str) -> str:
    return bucket(DAY, table).sql(dialect="duckdb")


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
         "WHERE event_type = 'session.ended'",),
        ("INSERT INTO session_ends SELECT tenant_id, session_id, duration_sec FROM events "
         "WHERE event_type = 'session.ended'",))
    pair = ("SELECT {b}, s.tenant_id, s.region, s.player_id, e.duration_sec FROM {s} AS s "
            "JOIN {e} AS e ON e.tenant_id = s.tenant_id AND e.session_id = s.session_id")
    new_starts = ("(SELECT * FROM _new_events WHERE event_type = 'session.started' "
                  "AND player_id IS NOT NULL)")
    new_ends = "(SELECT * FROM _new_events WHERE event_type = 'session.ended')"
    direct = ("SELECT DISTINCT {b}, tenant_id, region, player_id, NULL FROM {src} "  # noqa: S608
              "WHERE (" + _DIRECT + ") AND player_id IS NOT NULL")
    activity = DerivedTable(
        "activity_1d",
        "CREATE TABLE IF NOT EXISTS activity_1d (bucket BIGINT NOT NULL, tenant_id VARCHAR, "
        "region VARCHAR, player_id VARCHAR, session_sec BIGINT)",
        ("INSERT INTO activity_1d " + direct.format(b=_DAY_BUCKET, src="_new_events"),
         "INSERT INTO activity_1d " + pair.format(b=_bucket_of("s"), s=new_starts,
                                                  e="session_ends"),
         "INSERT INTO activity_1d " + pair.format(b=_bucket_of("s"), s="session_starts",
                                                  e=new_ends)),
        ("INSERT INTO activity_1d " + direct.format(b=_DAY_BUCKET, src="events"),
         "INSERT INTO activity_1d " + pair.format(b=_bucket_of("s"), s="session_starts",
                                                  e="session_ends")))
    return [starts, ends, activity]


def compile_active_from_rollup(scope: Scope, min_session_seconds: int,
                               distinct: bool) -> Compiled | None:
    """Active players per (day, groups) from ``activity_1d``; None unless the request is in
    whole UTC days (1d buckets over a day-aligned range)."""
    start = int(scope.start.replace(tzinfo=UTC).timestamp())
    end = int(scope.end.replace(tzinfo=UTC).timestamp())
    if scope.step_seconds != DAY or start % DAY or end % DAY:
        return None
    params = Params()
    conditions = [
        exp.column("bucket") >= params.bind(start), exp.column("bucket") < params.bind(end),
        exp.or_(exp.column("session_sec").is_(exp.null()),
                exp.column("session_sec") >= params.bind(min_session_seconds)),
    ]
    for key, values in sorted(scope.filters.items()):
        conditions.append(exp.column(DIMENSIONS[key].column).isin(
            *(params.bind(v) for v in values)))
    keys: list[exp.Expr] = [exp.alias_(exp.column("bucket"), "bucket"),
                            *(exp.alias_(exp.column(DIMENSIONS[g].column), g)
                              for g in scope.group_by)]
    player = exp.column("player_id")
    value = exp.Count(this=exp.Distinct(expressions=[player])) if distinct else player
    tree = exp.select(*keys, exp.alias_(value, "value")).from_("activity_1d") \
        .where(exp.and_(*conditions))
    tree = tree.group_by(*(k.this.copy() for k in keys)) if distinct else tree.distinct()
    return Compiled(tree, params.values)

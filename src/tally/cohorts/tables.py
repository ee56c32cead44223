"""What cohorts read, kept from the events in the events' transaction (like the rollups).

- ``player_firsts``: one row per (brand, player, cohort kind) with the first-ever cohort event
  (:data:`COHORTS`: ``first_deposit`` a deposit, ``registration`` a registration, each the
  rule of semantic/rules.py)
  and its region. A late, earlier event moves the row back (``ON CONFLICT … least``).
- ``player_days``: per (UTC day, brand, player, currency) the money measures of ggr and ngr,
  one row per batch and key (a batch adds rows, it never rewrites them), so LTV sums a
  cohort's players per day without touching the events.
- ``step_times``: per (event type, reason, brand, region, player, UTC hour) the instants of
  the player's events (on DuckDB with the 64-bit hash of (brand, player)), one row per batch
  and key, and on DuckDB ``unit_hashes``, each hash with a pair it stands for and whether two
  pairs met under it: what a funnel reads instead of the events (cohorts/funnel.py:
  :func:`~tally.cohorts.funnel.kept` decides, :func:`~tally.cohorts.funnel.compile_kept`
  plans): an attempt's next step is the
  earliest instant at or after the previous step's in the hours up to the window's end, found
  by joining the attempt to the rows of its player and those hours (DuckDB) or in its
  player's lists of each step's instants (ClickHouse, :func:`gathers_step_lists`) — a few
  rows an attempt, where the events give every event of the step's type in the range.
"""

from __future__ import annotations

from sqlglot import exp

from tally.cohorts.request import epoch_seconds
from tally.semantic.catalog import MEASURES, METRICS
from tally.semantic.compiler import bucket, measure_sum, measure_sum_type
from tally.semantic.rules import DEPOSIT, REGISTRATION, EventRule
from tally.storage.base import Compaction, DerivedTable, Least
from tally.storage.dialects import excluded, hash64, render, upsert

TABLE = "player_firsts"
# one row per (brand, player, cohort kind): the earliest
FIRSTS = Least(keys=("tenant_id", "player_id", "kind"), by=("first_at",))

DAY = 86_400
# each cohort kind by the rule of its first event (semantic/rules.py)
COHORTS: dict[str, EventRule] = {"first_deposit": DEPOSIT, "registration": REGISTRATION}
# the measures LTV needs: every term of ggr and ngr
LTV_MEASURES = tuple(dict.fromkeys(name for metric in ("ggr", "ngr")
                                   for _, name in METRICS[metric].terms))


def keeps_player_hashes(dialect: str) -> bool:
    """Whether a store of ``dialect`` keeps the players' 64-bit hashes: ``unit_hashes``, and
    ``k`` in ``step_times``, the activity tables and ``player_days`` (DuckDB: a ClickHouse
    store's funnels, retention and LTV join the players' strings, which it joins about as
    fast, and keeps no table of one row per key to find a collision in)."""
    return dialect == "duckdb"


def gathers_step_lists(dialect: str) -> bool:
    """Whether a kept-rows funnel on ``dialect`` gathers each player's instants of each step
    into lists and finds every attempt's steps in them (ClickHouse: its hash joins build on
    every row of a step's type in the range, 1.2 s against 0.7 s at 100M events), rather
    than joining each attempt to its player's rows of the hours it reaches (DuckDB: 0.4 s
    against 0.85 s; both measured in-process, docs/benchmarks.md)."""
    return dialect != "duckdb"


def player_hash(table: str | None = None) -> exp.Expr:
    """The 64-bit hash of (brand, player) kept as ``k``: a join on it is exact while no two
    pairs have met under one hash (:func:`hashes_collided`)."""
    return hash64(exp.column("tenant_id", table), exp.column("player_id", table))


def _firsts(source: str) -> exp.Insert:
    """Each (brand, player, cohort kind)'s first event of ``source``, kept when earlier than
    the stored one (the region moves with it)."""
    kind = exp.Case()
    for name, rule in COHORTS.items():
        kind = kind.when(rule.condition(), exp.Literal.string(name))
    select = (
        exp.select("tenant_id", "player_id", exp.alias_(kind, "kind"),
                   exp.Min(this=exp.column("occurred_at")),
                   exp.ArgMin(this=exp.column("region"), expression=exp.column("occurred_at")))
        .from_(source)
        .where(exp.column("player_id").is_(exp.null()).not_())
        .where(exp.or_(*(rule.condition() for rule in COHORTS.values())))
    )
    select.set("group", exp.Group(all=True))
    kept = exp.column("first_at", TABLE)
    earlier = excluded("first_at") < kept
    return upsert(exp.insert(select, TABLE), FIRSTS.keys, {
        "region": exp.Case().when(earlier, excluded("region"))
        .else_(exp.column("region", TABLE)),
        "first_at": exp.Least(this=kept.copy(), expressions=[excluded("first_at")],
                              ignore_nulls=True),
    })


def _player_days(source: str, dialect: str) -> str:
    measures = [MEASURES[name] for name in LTV_MEASURES]
    keys = [exp.alias_(bucket(DAY), "day"), exp.column("tenant_id"), exp.column("player_id"),
            exp.column("currency")]
    if keeps_player_hashes(dialect):  # LTV joins the cohort's members on it
        keys.append(exp.alias_(player_hash(), "k"))
    select = (
        exp.select(*keys[:4], *(measure_sum(m) for m in measures), *keys[4:])
        .from_(source)
        .where(exp.column("player_id").is_(exp.null()).not_())
        .where(exp.column("event_type").isin(
            *(exp.Literal.string(t) for t in sorted({m.event_type for m in measures}))))
        .group_by(*(exp.column(k.alias_or_name) for k in keys))
        .order_by(exp.column("day"))
    )
    return render(exp.insert(select, "player_days"), dialect)


STEP_TIMES = "step_times"
HOUR = 3_600
# the columns of an event that key a step_times row: what a funnel on the kept rows may name
# in a step's conditions (``reason``) and its filters (``tenant_id``, ``region``, and the
# player's attributes, joined on by player)
STEP_KEYS = ("event_type", "reason", "tenant_id", "region", "player_id")


def hour_index(seconds: exp.Expr) -> exp.Expr:
    """The UTC hour (hours since the epoch) of an instant given as epoch seconds."""
    return exp.IntDiv(this=exp.Paren(this=seconds), expression=exp.Literal.number(HOUR))


def _step_times(source: str, dialect: str) -> str:
    """Each (event type, reason, brand, region, player, hour)'s instants in ``source``, with
    the 64-bit hash of (brand, player) the funnel joins on where the store keeps it."""
    keys = [exp.column(name) for name in STEP_KEYS]
    hashed = [exp.alias_(player_hash(), "k")] if keeps_player_hashes(dialect) else []
    select = (
        exp.select(*keys, *hashed,
                   exp.alias_(hour_index(epoch_seconds(exp.column("occurred_at"))), "hour"),
                   exp.alias_(exp.ArrayAgg(this=exp.column("occurred_at")), "times"))
        .from_(source)
        .where(exp.column("player_id").is_(exp.null()).not_())
        .group_by(*(k.copy() for k in keys), *(exp.column("k") for _ in hashed),
                  exp.column("hour"))
        # rows of one type and hour together: the funnel's scans skip the others' row groups
        .order_by(exp.column("event_type"), exp.column("hour"))
    )
    return render(exp.insert(select, STEP_TIMES), dialect)


UNIT_HASHES = "unit_hashes"


def hashes_collided() -> exp.Expr:
    """Whether two (brand, player) pairs have ever met under one hash (``unit_hashes``): a
    plan joining players on ``k`` alone is then not exact, and is asked again on the
    strings."""
    return exp.Exists(this=exp.select(exp.Literal.number(1), copy=False)
                      .from_(exp.to_table(UNIT_HASHES), copy=False)
                      .where(exp.column("collided"), copy=False))


def _unit_hashes(source: str, dialect: str) -> str:
    """Each (brand, player) hash of ``source`` with one of its (brand, player) pairs, marked
    ``collided`` when two pairs have met under it (in this batch, or one stored and one
    new): a funnel on the kept rows joins players on the hash alone, so its answer says
    whether any of its hashes has collided, and a funnel that met one is answered again from
    the events on the strings (a 64-bit hash: about one store in 10^7 of a million players)."""
    pairs = exp.select(exp.column("tenant_id"), exp.column("player_id")).distinct() \
        .from_(source).where(exp.column("player_id").is_(exp.null()).not_())
    select = exp.select(
        exp.alias_(player_hash(), "k"),
        exp.alias_(exp.Min(this=exp.column("tenant_id")), "tenant_id"),
        exp.alias_(exp.Min(this=exp.column("player_id")), "player_id"),
        exp.alias_(exp.GT(this=exp.Count(this=exp.Star()), expression=exp.Literal.number(1)),
                   "collided")) \
        .from_(pairs.subquery("p")).group_by(exp.column("k"))
    kept = {name: exp.column(name, UNIT_HASHES) for name in ("tenant_id", "player_id")}
    met = exp.or_(excluded("collided"), excluded("tenant_id").neq(kept["tenant_id"]),
                  excluded("player_id").neq(kept["player_id"]))
    return render(upsert(exp.insert(select, UNIT_HASHES), ("k",), {"collided": exp.true()},
                         where=exp.and_(exp.column("collided", UNIT_HASHES).not_(), met)),
                  dialect)


# a store fed by many small writes holds a row per write and key, and row groups that mix
# event types: rewritten, a range of hours is one row per key, sorted by type and hour
STEP_KEY_COLUMNS = ", ".join((*STEP_KEYS, "k", "hour"))
COMPACT_STEP_TIMES = Compaction("hour", HOUR, (
    "CREATE OR REPLACE TEMPORARY TABLE _compacted AS SELECT "  # noqa: S608 - our names
    f"{STEP_KEY_COLUMNS}, flatten(list(times)) AS times FROM {STEP_TIMES} "
    f"WHERE hour >= $first AND hour < $end GROUP BY {STEP_KEY_COLUMNS} "
    "ORDER BY event_type, hour",
    f"DELETE FROM {STEP_TIMES} WHERE hour >= $first AND hour < $end",  # noqa: S608
    f"INSERT INTO {STEP_TIMES} SELECT * FROM _compacted",  # noqa: S608
    "DROP TABLE _compacted"))


def derived_tables(dialect: str) -> list[DerivedTable]:
    firsts = DerivedTable(
        "player_firsts",
        "CREATE TABLE IF NOT EXISTS player_firsts (tenant_id VARCHAR NOT NULL, "
        "player_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, first_at TIMESTAMP NOT NULL, "
        "region VARCHAR, PRIMARY KEY (tenant_id, player_id, kind))",
        (render(_firsts("_new_events"), dialect),), (render(_firsts("events"), dialect),),
        least=FIRSTS)
    types = {name: measure_sum_type(MEASURES[name]) for name in LTV_MEASURES}
    columns = ", ".join(f"{name} {kind} NOT NULL" for name, kind in types.items())
    days = DerivedTable(
        "player_days",
        "CREATE TABLE IF NOT EXISTS player_days (day BIGINT NOT NULL, tenant_id VARCHAR, "
        f"player_id VARCHAR, currency VARCHAR, {columns}"
        + (", k UBIGINT)" if keeps_player_hashes(dialect) else ")"),
        (_player_days("_new_events", dialect),), (_player_days("events", dialect),),
        tuple(types.items()))
    steps = DerivedTable(
        STEP_TIMES,
        "CREATE TABLE IF NOT EXISTS step_times (event_type VARCHAR NOT NULL, reason VARCHAR, "
        "tenant_id VARCHAR NOT NULL, region VARCHAR NOT NULL, player_id VARCHAR NOT NULL, "
        + ("k UBIGINT NOT NULL, " if keeps_player_hashes(dialect) else "")
        + "hour BIGINT NOT NULL, times TIMESTAMP[] NOT NULL)",
        (_step_times("_new_events", dialect),), (_step_times("events", dialect),),
        compaction=COMPACT_STEP_TIMES,
        # a funnel's scan names a step's type and a range of hours, then its players
        order=("event_type", "hour", "tenant_id", "player_id"))
    units = DerivedTable(
        UNIT_HASHES,
        "CREATE TABLE IF NOT EXISTS unit_hashes (k UBIGINT NOT NULL, tenant_id VARCHAR NOT NULL, "
        "player_id VARCHAR NOT NULL, collided BOOLEAN NOT NULL, PRIMARY KEY (k))",
        (_unit_hashes("_new_events", dialect),), (_unit_hashes("events", dialect),))
    return [firsts, days, steps] + ([units] if keeps_player_hashes(dialect) else [])

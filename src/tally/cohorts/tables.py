"""What cohorts read, kept from the events in the events' transaction (like the rollups).

- ``player_firsts``: one row per (brand, player, cohort kind) with the first-ever cohort event
  (``first_deposit``: wallet.credit with reason=deposit; ``registration``: player.registered)
  and its region. A late, earlier event moves the row back (``ON CONFLICT … least``).
- ``player_days``: per (UTC day, brand, player, currency) the money measures of ggr and ngr,
  one row per batch and key (a batch adds rows, it never rewrites them), so LTV sums a
  cohort's players per day without touching the events.
"""

from __future__ import annotations

from sqlglot import exp

from tally.semantic.catalog import MEASURES, METRICS
from tally.semantic.compiler import bucket, measure_sum, measure_sum_type
from tally.storage.base import DerivedTable
from tally.storage.dialects import render

DAY = 86_400
COHORTS = {"first_deposit": "event_type = 'wallet.credit' AND reason = 'deposit'",
           "registration": "event_type = 'player.registered'"}
# the measures LTV needs: every term of ggr and ngr
LTV_MEASURES = tuple(dict.fromkeys(name for metric in ("ggr", "ngr")
                                   for _, name in METRICS[metric].terms))


def _firsts(source: str) -> str:
    kind = "CASE " + " ".join(f"WHEN {cond} THEN '{name}'" for name, cond in COHORTS.items()) \
        + " END"
    any_cohort = " OR ".join(f"({cond})" for cond in COHORTS.values())
    return (
        f"INSERT INTO player_firsts SELECT tenant_id, player_id, {kind} AS kind, "  # noqa: S608
        "min(occurred_at), arg_min(region, occurred_at) "
        f"FROM {source} WHERE player_id IS NOT NULL AND ({any_cohort}) GROUP BY ALL "
        "ON CONFLICT (tenant_id, player_id, kind) DO UPDATE SET "
        "region = CASE WHEN excluded.first_at < player_firsts.first_at "
        "THEN excluded.region ELSE player_firsts.region END, "
        "first_at = least(player_firsts.first_at, excluded.first_at)")


def _player_days(source: str, dialect: str) -> str:
    measures = [MEASURES[name] for name in LTV_MEASURES]
    keys = [exp.alias_(bucket(DAY), "day"), exp.column("tenant_id"), exp.column("player_id"),
            exp.column("currency")]
    select = (
        exp.select(*keys, *(measure_sum(m) for m in measures))
        .from_(source)
        .where(exp.column("player_id").is_(exp.null()).not_())
        .where(exp.column("event_type").isin(
            *(exp.Literal.string(t) for t in sorted({m.event_type for m in measures}))))
        .group_by(*(exp.column(k.alias_or_name) for k in keys))
        .order_by(exp.column("day"))
    )
    return render(exp.insert(select, "player_days"), dialect)


def derived_tables(dialect: str) -> list[DerivedTable]:
    firsts = DerivedTable(
        "player_firsts",
        "CREATE TABLE IF NOT EXISTS player_firsts (tenant_id VARCHAR NOT NULL, "
        "player_id VARCHAR NOT NULL, kind VARCHAR NOT NULL, first_at TIMESTAMP NOT NULL, "
        "region VARCHAR, PRIMARY KEY (tenant_id, player_id, kind))",
        (_firsts("_new_events"),), (_firsts("events"),))
    types = {name: measure_sum_type(MEASURES[name]) for name in LTV_MEASURES}
    columns = ", ".join(f"{name} {kind} NOT NULL" for name, kind in types.items())
    days = DerivedTable(
        "player_days",
        "CREATE TABLE IF NOT EXISTS player_days (day BIGINT NOT NULL, tenant_id VARCHAR, "
        f"player_id VARCHAR, currency VARCHAR, {columns})",
        (_player_days("_new_events", dialect),), (_player_days("events", dialect),),
        tuple(types.items()))
    return [firsts, days]

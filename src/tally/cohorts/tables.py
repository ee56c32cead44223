"""What cohorts read, kept from the events in the events' transaction (like the rollups).

- ``player_firsts``: one row per (brand, player, cohort kind) with the first-ever cohort event
  (:data:`COHORTS`: ``first_deposit`` a deposit, ``registration`` a registration, each the
  rule of semantic/rules.py)
  and its region. A late, earlier event moves the row back (``ON CONFLICT … least``).
- ``player_days``: per (UTC day, brand, player, currency) the money measures of ggr and ngr,
  one row per batch and key (a batch adds rows, it never rewrites them), so LTV sums a
  cohort's players per day without touching the events.
"""

from __future__ import annotations

from sqlglot import exp

from tally.semantic.catalog import MEASURES, METRICS
from tally.semantic.compiler import bucket, measure_sum, measure_sum_type
from tally.semantic.rules import DEPOSIT, REGISTRATION, EventRule
from tally.storage.base import DerivedTable, Least
from tally.storage.dialects import excluded, render, upsert

TABLE = "player_firsts"
# one row per (brand, player, cohort kind): the earliest
FIRSTS = Least(keys=("tenant_id", "player_id", "kind"), by=("first_at",))

DAY = 86_400
# each cohort kind by the rule of its first event (semantic/rules.py)
COHORTS: dict[str, EventRule] = {"first_deposit": DEPOSIT, "registration": REGISTRATION}
# the measures LTV needs: every term of ggr and ngr
LTV_MEASURES = tuple(dict.fromkeys(name for metric in ("ggr", "ngr")
                                   for _, name in METRICS[metric].terms))


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
        (render(_firsts("_new_events"), dialect),), (render(_firsts("events"), dialect),),
        least=FIRSTS)
    types = {name: measure_sum_type(MEASURES[name]) for name in LTV_MEASURES}
    columns = ", ".join(f"{name} {kind} NOT NULL" for name, kind in types.items())
    days = DerivedTable(
        "player_days",
        "CREATE TABLE IF NOT EXISTS player_days (day BIGINT NOT NULL, tenant_id VARCHAR, "
        f"player_id VARCHAR, currency VARCHAR, {columns})",
        (_player_days("_new_events", dialect),), (_player_days("events", dialect),),
        tuple(types.items()))
    return [firsts, days]

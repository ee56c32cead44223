"""SQL snapshots of the semantic compiler for both dialects, and that values are never inlined.

To accept an intended change: ``TALLY_UPDATE_SNAPSHOTS=1 pytest tests/test_compiler.py``,
then review the diff of tests/snapshots/ like code.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import date, datetime
from pathlib import Path

import pytest

from tally.cohorts import funnel, retention
from tally.rollups.activity import compile_active_from_rollup
from tally.rollups.spec import compile_from_rollup, maintenance
from tally.semantic import attributes
from tally.semantic.catalog import METRICS
from tally.semantic.compiler import (
    Compiled,
    Scope,
    compile_active,
    compile_measures,
    compile_settle_lag,
    compile_webhook_lag,
)
from tally.storage.dialects import render

SNAPSHOTS = Path(__file__).parent / "snapshots"
SCOPE = Scope(datetime(2025, 10, 22), datetime(2025, 10, 23), 300,
              {"brand_id": ("brand-7", "x'); DROP TABLE events; --"), "region": ("EU",)},
              ("brand_id",))
CASES = {
    "ggr_5m_by_brand": compile_measures(METRICS["ggr"], SCOPE, by_currency=True),
    "ngr_5m_by_brand": compile_measures(METRICS["ngr"], SCOPE, by_currency=True),
    "deposits_success": compile_measures(METRICS["deposits_success"], SCOPE, by_currency=False),
    "settle_lag": compile_settle_lag(SCOPE),
    "webhook_lag": compile_webhook_lag(SCOPE),
    "dau": compile_active(SCOPE, 60, distinct=True),
    "active_players_daily": compile_active(SCOPE, 60, distinct=False),
    "ggr_5m_from_rollup": compile_from_rollup(METRICS["ggr"], SCOPE, by_currency=True),
    "dau_1d_from_activity": compile_active_from_rollup(
        Scope(SCOPE.start, SCOPE.end, 86400, SCOPE.filters, SCOPE.group_by), 60, True),
}
INJECTION = "x'); DROP TABLE events; --"
FUNNEL = funnel.parse({
    "steps": [{"event": "payment.intent", "method": ["card", INJECTION]},
              {"event": "payment.captured", "within_sec": 600},
              {"event": "wallet.credit", "reason": "deposit"}],
    "window_sec": 3600, "from": "2025-10-01", "to": "2025-10-31",
    "filters": {"brand_id": ["brand-7", INJECTION], "region": "EU"},
    "exclusions": [{"event": "payment.failed", "between": [1, 2]}]})
# a step that may share its event with an earlier one: the sequenced form
FUNNEL_REPEATED = funnel.parse({
    "steps": [{"event": "bet.placed"}, {"event": "bet.placed", "game_id": INJECTION}],
    "window_sec": 60, "from": "2025-10-01", "to": "2025-10-02",
    "filters": {"brand_id": "brand-7", "region": "EU"}})
RETENTION = retention.parse_retention({
    "cohort": "first_deposit", "start_date": "2025-10-20", "end_date": "2025-10-30",
    "return_event": {"event": "bet.placed", "game_id": INJECTION}, "days": [0, 1, 7],
    "filters": {"brand_id": ["brand-7"], "region": "EU"}, "timezone": "Europe/London"})
CASES.update({
    "funnel": funnel.compile_funnel(FUNNEL),
    "funnel_repeated_step": funnel.compile_funnel(FUNNEL_REPEATED),
    "retention_london": retention.compile_retention(RETENTION)[1],
    "retention_on_or_after": retention.compile_retention(dataclasses.replace(
        RETENTION, mode="on_or_after"))[1],
    # bets as the return event: read from the activity table of hours (London tiles by hour)
    "retention_bets_from_activity": retention.compile_retention(dataclasses.replace(
        RETENTION, return_event=retention.parse_step("bet.placed", "r"),
        filters={"brand_id": ("brand-7", INJECTION), "region": ("EU",)}))[1],
    "ltv": retention.compile_ltv(retention.Ltv(
        "first_deposit", METRICS["ngr"], date(2025, 10, 1), date(2025, 10, 31), 90,
        {"brand_id": ("brand-7", INJECTION), "region": ("EU",)}, "EUR")),
})
# device / geo: the players' registration attributes joined on (semantic/attributes.py)
ATTRIBUTE_SCOPE = Scope(SCOPE.start, SCOPE.end, 3600,
                        {"device": ("mobile", INJECTION), "brand_id": ("brand-7",)}, ("geo",))
DAILY_ATTRIBUTES = dataclasses.replace(ATTRIBUTE_SCOPE, step_seconds=86400)
CASES.update({
    "ggr_1h_by_geo_where_device": compile_measures(METRICS["ggr"], ATTRIBUTE_SCOPE,
                                                   by_currency=True),
    # a reason: only the deposits are present, on the events and on the rollup alike
    "deposits_1d_from_rollup": compile_from_rollup(
        METRICS["deposits"], dataclasses.replace(SCOPE, step_seconds=86400), by_currency=True),
    "settle_lag_by_geo_where_device": compile_settle_lag(ATTRIBUTE_SCOPE),
    "dau_1d_by_geo_where_device_from_activity": compile_active_from_rollup(
        DAILY_ATTRIBUTES, 60, True),
    "funnel_where_device": funnel.compile_funnel(dataclasses.replace(
        FUNNEL, filters={**FUNNEL.filters, "device": ("mobile", INJECTION)})),
    "retention_where_geo": retention.compile_retention(dataclasses.replace(
        RETENTION, filters={"brand_id": ("brand-7",), "geo": ("GB", INJECTION)}))[1],
})
MAINTENANCE = {grain: maintenance(grain, "_new_events") for grain in ("1m", "1h", "1d")}


def test_player_attribute_queries_read_players_and_the_others_the_rollups():
    """The rollups keep no player: a query naming device or geo reads the events (joined to
    the registration attributes); every other query keeps the rollup fast path."""
    for scope in (ATTRIBUTE_SCOPE, DAILY_ATTRIBUTES,
                  dataclasses.replace(DAILY_ATTRIBUTES, filters={}, group_by=("device",))):
        assert compile_from_rollup(METRICS["ggr"], scope, by_currency=True) is None
        sql = compile_measures(METRICS["ggr"], scope, by_currency=True).sql("duckdb")
        assert "LEFT JOIN player_attributes" in sql
    plain = dataclasses.replace(DAILY_ATTRIBUTES, filters={"brand_id": ("b",)}, group_by=())
    assert "rollup_1d" in compile_from_rollup(METRICS["ggr"], plain, True).sql("duckdb")
    for compiled in (compile_measures(METRICS["ggr"], plain, True), compile_settle_lag(plain),
                     compile_active(plain, 60, True),
                     compile_active_from_rollup(plain, 60, True)):
        assert compiled is not None and "player_attributes" not in compiled.sql("duckdb")
    assert "player_attributes" in CASES["dau_1d_by_geo_where_device_from_activity"] \
        .sql("duckdb")


def test_player_attributes_maintenance_snapshot():
    sql = attributes.derived_table().from_batch[0] + "\n"
    path = SNAPSHOTS / "player_attributes_maintenance.duckdb.sql"
    if os.environ.get("TALLY_UPDATE_SNAPSHOTS") == "1":
        path.write_text(sql)
    assert path.read_text() == sql


@pytest.mark.parametrize("dialect", ["duckdb", "clickhouse"])
@pytest.mark.parametrize("grain", sorted(MAINTENANCE))
def test_rollup_maintenance_snapshot(grain: str, dialect: str):
    sql = render(MAINTENANCE[grain], dialect) + "\n"
    path = SNAPSHOTS / f"rollup_{grain}_maintenance.{dialect}.sql"
    if os.environ.get("TALLY_UPDATE_SNAPSHOTS") == "1":
        path.write_text(sql)
    assert path.read_text() == sql


@pytest.mark.parametrize("dialect", ["duckdb", "clickhouse"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_sql_snapshot(name: str, dialect: str):
    sql = CASES[name].sql(dialect) + "\n"
    path = SNAPSHOTS / f"{name}.{dialect}.sql"
    if os.environ.get("TALLY_UPDATE_SNAPSHOTS") == "1":
        path.write_text(sql)
    assert path.read_text() == sql


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_values_are_bound_never_inlined(name: str):
    compiled: Compiled = CASES[name]
    for dialect in ("duckdb", "clickhouse"):
        sql = compiled.sql(dialect)
        assert "DROP TABLE" not in sql and "brand-7" not in sql and "'EU'" not in sql
    assert "x'); DROP TABLE events; --" in compiled.params.values()

"""Every committed ClickHouse SQL snapshot runs on the real engine (chDB) and answers what its
DuckDB snapshot answers on the same data.

One realistic event set (players registering, sessions, bets placed and settled, payments,
deposits, bonuses, around the snapshots' ranges and values) is ingested through the API into a
DuckDB store; the ClickHouse form of Tally's tables (``storage/clickhouse_schema.py``) is
created in an embedded chDB and loaded with the same rows (the events and each derived table,
as DuckDB keeps them). Then each snapshot file is executed as committed, with the bound
parameters its test renders it with, on both engines, and the answers are compared.
The rollup maintenance snapshots (``INSERT … SELECT … FROM _new_events``) run too, each on its
engine's copy of the events, and fill the same rollup sums.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import clickhouse_connect
import duckdb
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.cohorts.tables import STEP_KEYS, STEP_TIMES
from tally.config import Settings
from tally.rollups import activity
from tally.rollups.spec import GRAINS, derived_tables, table
from tally.storage import clickhouse_schema
from tally.storage.base import declared_columns
from tally.storage.dialects import CLICKHOUSE_SETTINGS
from tests.conftest import bearer
from tests.test_compiler import CASES, INJECTION, SNAPSHOTS

BRANDS = ("brand-7", "brand-8")
REGIONS = ("EU", "UK")


def _at(day: date, rng: random.Random) -> datetime:
    return datetime(day.year, day.month, day.day) + timedelta(
        seconds=rng.randrange(86_400), microseconds=rng.choice((0, rng.randrange(1_000_000))))


def _iso(t: datetime) -> str:
    return t.isoformat() + "Z"


def event_set(seed: int = 11) -> list[dict[str, Any]]:
    """~5,000 events of 80 players from 2025-10-01 to 2025-11-08, dense on 2025-10-22."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []

    def add(kind: str, at: datetime, brand: str, region: str, player: str | None,
            payload: dict[str, Any]) -> None:
        out.append({"event_id": f"e{len(out)}", "event_type": kind, "occurred_at": _iso(at),
                    "tenant_id": brand, "region": region, "player_id": player,
                    "schema_version": "1.3.0", "payload": payload})

    days = [date(2025, 9, 28) + timedelta(days=d) for d in range(42)]
    for p in range(80):
        player, brand, region = f"p{p}", rng.choice(BRANDS), rng.choice(REGIONS)
        joined = rng.randrange(17, 33)  # mostly active from their registration on
        registered = _at(days[joined], rng)
        if p % 9:  # a few players never register
            add("player.registered", registered, brand, region, player,
                {"device": rng.choice(("mobile", "desktop")), "country": rng.choice(("GB", "DE"))})
        if p % 13 == 0:  # a second, later registration changes nothing
            add("player.registered", registered + timedelta(days=1), brand, region, player,
                {"device": "tablet", "country": "FR"})
        active_days = [*rng.sample(days[joined:], 6), date(2025, 10, 22), date(2025, 10, 22),
                       *([date(2025, 10, 1)] if p % 3 == 0 else [])]
        for n, day in enumerate(active_days):
            start = _at(day, rng)
            currency = rng.choice(("EUR", "GBP"))
            session = f"s{p}-{n}"
            add("session.started", start, brand, region, player, {"session_id": session})
            add("session.ended", start + timedelta(seconds=rng.randrange(30, 4000)), brand,
                region, player, {"session_id": session,
                                 "duration_sec": rng.choice((20, 90, 600, 3000))})
            if rng.random() < 0.6:
                intent = start + timedelta(seconds=rng.randrange(1, 300))
                method = rng.choice(("card", "wire"))
                pay = {"payment_id": f"pay{p}-{n}", "amount_minor": 2000, "currency": currency,
                       "method": method}
                add("payment.intent", intent, brand, region, player, pay)
                if rng.random() < 0.2:
                    add("payment.failed", intent + timedelta(seconds=rng.randrange(1, 200)),
                        brand, region, player, pay)
                if rng.random() < 0.8:
                    captured = intent + timedelta(seconds=rng.randrange(5, 900))
                    add("payment.captured", captured, brand, region, player, pay)
                    add("wallet.credit", captured + timedelta(seconds=rng.randrange(0, 700)),
                        brand, region, player, {"amount_minor": 2000, "currency": currency,
                                                "reason": "deposit"})
            for b in range(rng.randrange(0, 6)):
                placed = start + timedelta(seconds=rng.randrange(0, 3000),
                                           microseconds=rng.randrange(1_000_000))
                stake = rng.randrange(10, 5000)
                bet = {"bet_id": f"b{p}-{n}-{b}", "stake_minor": stake, "currency": currency,
                       "game_id": rng.choice(("g1", "g2")), "provider_id": rng.choice("xy")}
                add("bet.placed", placed, brand, region, player, bet)
                if rng.random() < 0.9:
                    add("bet.settled", placed + timedelta(seconds=rng.randrange(0, 120),
                                                          microseconds=rng.randrange(1_000_000)),
                        brand, region, player,
                        {**bet, "win_minor": rng.choice((0, 0, stake * 2, stake // 2)),
                         "jackpot_contribution_minor": rng.randrange(3),
                         "commission_minor": rng.randrange(5)})
                if rng.random() < 0.1:
                    add("wallet.credit", placed + timedelta(seconds=30), brand, region, player,
                        {"amount_minor": 500, "currency": currency, "reason": "win"})
            if rng.random() < 0.2:
                add("bonus.consumed", start + timedelta(seconds=99), brand, region, player,
                    {"bonus_id": f"bo{p}-{n}", "amount_minor": 300, "currency": currency})
    rng.shuffle(out)  # arrival order is not time order
    return out


@pytest.fixture(scope="module")
def duck(tmp_path_factory: pytest.TempPathFactory) -> Iterator[duckdb.DuckDBPyConnection]:
    """The events ingested through the API in three batches; the store, read-only. DuckDB
    whatever the suite's store: this module compares the engines."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("duck"), regions=",".join(REGIONS),
                        store="duckdb")
    events = event_set()
    with TestClient(create_app(settings)) as client:
        headers = bearer(client, settings.data_dir, "events:write")
        third = len(events) // 3
        for part in (events[:third], events[third:2 * third], events[2 * third:]):
            response = client.post("/v1/events:batch", json=part, headers=headers)
            assert response.status_code == 202, response.text
            assert response.json()["accepted"] == len(part)
    con = duckdb.connect(str(settings.data_dir / "events.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchall() == [(len(events),)]
    yield con
    con.close()


# the derived tables both stores keep, as the ClickHouse store declares them (DuckDB's own:
# the funnels' unit_hashes, the player hashes of step_times and the activity tables)
DERIVED = derived_tables("clickhouse")


@pytest.fixture(scope="module")
def chdb(duck: duckdb.DuckDBPyConnection,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An embedded ClickHouse with Tally's tables, holding the DuckDB store's rows."""
    client = clickhouse_connect.get_client(
        dsn=f"chdb://{tmp_path_factory.mktemp('chdb')}", settings=CLICKHOUSE_SETTINGS)
    for statement in clickhouse_schema.ddl(DERIVED):
        client.command(statement)
    client.insert_arrow("events", duck.sql("SELECT * FROM events").to_arrow_table())
    for t in DERIVED:
        kept = duck.sql(f"SELECT {', '.join(declared_columns(t.ddl))} "  # noqa: S608
                        f"FROM {t.name}").to_arrow_table()
        if t.least is None:
            client.insert_arrow(t.name, kept)
            continue
        # a table of one row per key is a view of argMin states: DuckDB's rows become states
        columns = clickhouse_schema.parse_table(t.ddl).types
        client.command(f"CREATE TEMPORARY TABLE _kept_{t.name} "
                       f"({', '.join(f'{c} {k}' for c, k in columns.items())}) ENGINE = Memory")
        client.insert_arrow(f"_kept_{t.name}", kept)
        client.command(clickhouse_schema.derived_statement(
            f"INSERT INTO {t.name} SELECT {', '.join(columns)} FROM _kept_{t.name}", t))
    yield client
    client.close()


def _value(v: Any) -> Any:
    """One cell, as both engines' answers compare: numbers by value (a DuckDB HUGEINT sum is
    a Decimal, a ClickHouse Int128 16 little-endian bytes in Arrow; a ratio a float to 9
    digits)."""
    if isinstance(v, datetime) and v.tzinfo is not None:  # a client without session_timezone
        return v.astimezone(UTC).replace(tzinfo=None)
    if isinstance(v, bool) or v is None or isinstance(v, str | datetime | date):
        return v
    if isinstance(v, bytes) and len(v) == 16:
        return int.from_bytes(v, "little", signed=True)
    if isinstance(v, Decimal | int):
        return int(v) if v == int(v) else float(v)
    if isinstance(v, float):
        return int(v) if v.is_integer() else round(v, 9)
    return v


def rows(answer: pa.Table) -> list[tuple[Any, ...]]:
    return sorted((tuple(_value(v) for v in row.values()) for row in answer.to_pylist()),
                  key=repr)


def _snapshot(name: str, dialect: str) -> str:
    return (SNAPSHOTS / f"{name}.{dialect}.sql").read_text()


# the snapshots' hostile value, where it is a filter's or a step's value, as one that matches
# (a game): the same SQL then has rows to answer with where the injection matches nothing
MATCHING = {INJECTION: "g1"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_clickhouse_snapshot_answers_what_duckdb_answers(name: str, duck, chdb) -> None:
    answers = 0
    for values in (CASES[name].params, {k: MATCHING.get(v, v) if isinstance(v, str) else v
                                        for k, v in CASES[name].params.items()}):
        expected = duck.sql(_snapshot(name, "duckdb"), params=values).to_arrow_table()
        answer = chdb.query_arrow(_snapshot(name, "clickhouse"), parameters=values)
        assert answer.column_names == expected.column_names
        assert rows(answer) == rows(expected)
        answers += len(expected)
    assert answers, "the event set should give every snapshot an answer"


@pytest.fixture(scope="module")
def fresh(chdb) -> Iterator[Any]:
    """A second database of the same engine (one engine a process: a second client on its
    path) with the events and empty derived tables, for the statements that fill them."""
    chdb.command("CREATE DATABASE IF NOT EXISTS fresh")
    client = clickhouse_connect.get_client(dsn=f"chdb://{chdb.path}", database="fresh",
                                           settings=CLICKHOUSE_SETTINGS)
    for statement in clickhouse_schema.ddl(DERIVED):
        client.command(statement)
    client.command("INSERT INTO fresh.events SELECT * FROM default.events")
    client.command("CREATE TABLE _new_events AS events")
    client.command("INSERT INTO _new_events SELECT * FROM events")
    yield client
    client.close()


def _summed(table_name: str, keys: tuple[str, ...], sums: tuple[str, ...]) -> str:
    """Per key, the sums of a table a store appends to batch by batch (the rows of a key are
    one per batch on DuckDB, one in all here): comparable on both engines."""
    return (f"SELECT {', '.join(keys)}, {', '.join(f'sum({s}) AS {s}' for s in sums)} "
            f"FROM {table_name} GROUP BY {', '.join(keys)}")


ROLLUP_KEYS = ("bucket", "event_type", "tenant_id", "region", "provider_id", "game_id",
               "method", "currency")


@pytest.mark.parametrize("grain", sorted(GRAINS))
def test_clickhouse_rollup_maintenance_fills_what_duckdb_keeps(grain: str, duck, fresh) -> None:
    """The committed maintenance snapshot, run on ClickHouse over all the events, sums to
    what DuckDB's rollup holds after the three batches it was kept from."""
    fresh.command(_snapshot(f"rollup_{grain}_maintenance", "clickhouse"))
    sums = tuple(name for name in duck.sql(f"SELECT * FROM {table(grain)}").columns
                 if name not in ROLLUP_KEYS)
    query = _summed(table(grain), ROLLUP_KEYS, sums)
    expected = duck.sql(query).to_arrow_table()
    assert len(expected) > 100
    assert rows(fresh.query_arrow(query)) == rows(expected)


@pytest.mark.parametrize("grain", sorted(activity.GRAINS))
def test_clickhouse_activity_backfill_fills_what_duckdb_keeps(grain: str, duck, fresh) -> None:
    """The activity tables' back-fill (from the events, through the session sides), rendered
    for ClickHouse, finds the distinct rows DuckDB kept batch by batch."""
    tables = {t.name: t for t in activity.derived_tables("clickhouse")}
    for side in ("session_starts", "session_ends"):
        if not fresh.query(f"SELECT count() FROM {side}").result_rows[0][0]:
            for statement in tables[side].from_all:
                fresh.command(statement)
    for statement in tables[activity.table(grain)].from_all:
        fresh.command(statement)
    kept = tables[activity.table(grain)]
    query = f"SELECT DISTINCT {', '.join(declared_columns(kept.ddl))} FROM {kept.name}"  # noqa: S608
    expected = duck.sql(query).to_arrow_table()
    assert len(expected) > 100
    assert rows(fresh.query_arrow(query)) == rows(expected)


def test_clickhouse_player_days_backfill_fills_what_duckdb_keeps(duck, fresh) -> None:
    days = next(t for t in derived_tables("clickhouse") if t.name == "player_days")
    for statement in days.from_all:
        fresh.command(statement)
    sums = tuple(name for name in declared_columns(days.ddl)
                 if name not in ("day", "tenant_id", "player_id", "currency"))
    query = _summed("player_days", ("day", "tenant_id", "player_id", "currency"), sums)
    expected = duck.sql(query).to_arrow_table()
    assert len(expected) > 100
    assert rows(fresh.query_arrow(query)) == rows(expected)


def test_clickhouse_step_times_backfill_fills_what_duckdb_keeps(duck, fresh) -> None:
    """The funnels' kept instants, filled on ClickHouse from all the events, are per (type,
    reason, brand, region, player, hour) the instants DuckDB kept batch by batch."""
    steps = next(t for t in derived_tables("clickhouse") if t.name == STEP_TIMES)
    assert "k" not in declared_columns(steps.ddl)  # ClickHouse joins the players' strings
    for statement in steps.from_all:
        fresh.command(statement)
    keys = ", ".join((*STEP_KEYS, "hour"))
    expected = duck.sql(f"SELECT {keys}, list_sort(flatten(list(times))) AS times "  # noqa: S608
                        f"FROM {STEP_TIMES} GROUP BY {keys}").to_arrow_table()
    answer = fresh.query_arrow(f"SELECT {keys}, arraySort(arrayFlatten(groupArray(times))) "  # noqa: S608
                               f"AS times FROM {STEP_TIMES} GROUP BY {keys}")
    assert len(expected) > 100

    def kept(table: pa.Table) -> list[tuple[Any, ...]]:
        return sorted(((*(_value(v) for v in row[:-1]), [_value(t) for t in row[-1]])
                       for row in (tuple(r.values()) for r in table.to_pylist())), key=repr)

    assert kept(answer) == kept(expected)


@pytest.mark.parametrize("name", ["player_firsts", "player_attributes"])
def test_clickhouse_keeps_the_least_row_per_key_as_duckdbs_upsert_does(name: str, duck,
                                                                      fresh) -> None:
    """The tables DuckDB keeps by upsert, batch by batch: on ClickHouse the same statement
    over all the events, as argMin states, answers the same rows through the table's view
    (the first registration whole, with its NULL attributes; the first deposit's region)."""
    derived = next(t for t in derived_tables("clickhouse") if t.name == name)
    assert derived.least is not None
    for statement in derived.from_all:
        fresh.command(clickhouse_schema.derived_statement(statement, derived))
    query = f"SELECT * FROM {name}"
    expected = duck.sql(query).to_arrow_table()
    assert len(expected) > 10
    assert rows(fresh.query_arrow(query)) == rows(expected)

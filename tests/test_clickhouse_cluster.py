"""The ClickHouse store's cluster DDL (``TALLY_STORE=http(s)://…?cluster=NAME``).

No cluster runs here, so the DDL is a committed snapshot (accept an intended change with
``TALLY_UPDATE_SNAPSHOTS=1 pytest tests/test_clickhouse_cluster.py``), every statement parses
in ClickHouse's dialect, and what chDB can run is run: each shard table with its replicated
engine replaced by the non-replicated twin and ``ON CLUSTER`` removed is created in chDB and
has the columns, sort key, engine and settings of the single-node table the backend creates
(``storage/clickhouse.py``); each ``Distributed`` table's columns are those too, and its
sharding key evaluates there to the integer ClickHouse requires, the same for a replayed row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest
import sqlglot
from sqlglot import exp

from tally.errors import StoreUnavailable
from tally.rollups.spec import derived_tables
from tally.storage.clickhouse import DDL, DEDUP_WINDOW
from tally.storage.clickhouse_cluster import LOCAL, cluster_ddl, on_cluster, parse_store
from tally.storage.clickhouse_schema import STATE, derived_ddl
from tally.storage.dialects import CLICKHOUSE_SETTINGS
from tests.test_compiler import SNAPSHOTS

CLUSTER, DATABASE = "tally_cluster", "tally"
TABLES = ("events", "quarantine", "idempotency", "fx_rates", "store_settings")
STATEMENTS = cluster_ddl(CLUSTER, DATABASE)


def _name(statement: str) -> str:
    create = sqlglot.parse_one(statement, read="clickhouse")
    assert isinstance(create, exp.Create)
    return create.this.this.name


def test_cluster_ddl_snapshot() -> None:
    text = ";\n\n".join(STATEMENTS) + ";\n"
    path = SNAPSHOTS / "cluster_ddl.clickhouse.sql"
    if os.environ.get("TALLY_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.read_text() == text


def test_every_statement_parses_in_clickhouse_dialect() -> None:
    assert [_name(s) for s in DDL] == list(TABLES)
    assert [_name(s) for s in STATEMENTS] == [n for t in TABLES for n in (t + LOCAL, t)]
    for statement in STATEMENTS:
        create = sqlglot.parse_one(statement, read="clickhouse",
                                   error_level=sqlglot.ErrorLevel.RAISE)
        assert isinstance(create, exp.Create) and create.args.get("exists")
        on = create.find(exp.OnCluster)
        assert on is not None and on.this.name == CLUSTER


def test_shard_tables_are_replicated_and_distributed_tables_point_at_them() -> None:
    paths = set()
    for table in TABLES:
        local = STATEMENTS[2 * TABLES.index(table)]
        distributed = STATEMENTS[2 * TABLES.index(table) + 1]
        engine = re.search(r"ENGINE=(Replicated\w*MergeTree)\('([^']*)', '([^']*)'", local)
        assert engine is not None, local
        assert engine.group(2) == f"/clickhouse/tables/{{shard}}/{DATABASE}.{table}"
        assert engine.group(3) == "{replica}"
        paths.add(engine.group(2))
        assert "non_replicated_deduplication_window" not in local
        assert f"ENGINE=Distributed('{CLUSTER}', '{DATABASE}', '{table}{LOCAL}', " \
            in distributed
        assert "rand()" not in distributed  # a replayed insert must split as the first did
    assert len(paths) == len(TABLES)
    deduplicated = [s for s in DDL if "deduplication_window" in s]
    assert len(deduplicated) == 4
    for statement in deduplicated:
        local = STATEMENTS[2 * TABLES.index(_name(statement))]
        assert f"SETTINGS replicated_deduplication_window = {DEDUP_WINDOW}" in local


def _twin(statement: str) -> str:
    """A shard table as chDB can create it: no ``ON CLUSTER``, the engine's non-replicated
    twin (the Keeper path and replica name dropped) and deduplication window."""
    create = sqlglot.parse_one(statement, read="clickhouse")
    for node in list(create.find_all(exp.OnCluster)):
        node.pop()
    engine = create.find(exp.EngineProperty)
    assert engine is not None and isinstance(engine.this, exp.Anonymous)
    name = str(engine.this.this)
    assert name.startswith("Replicated")
    args = engine.this.expressions[2:]
    engine.set("this", exp.Anonymous(this=name[len("Replicated"):], expressions=args)
               if args else exp.to_identifier(name[len("Replicated"):]))
    return create.sql("clickhouse").replace(
        "replicated_deduplication_window", "non_replicated_deduplication_window")


def _memory(statement: str) -> str:
    """A ``Distributed`` table's columns in a ``Memory`` table (chDB has no cluster)."""
    create = sqlglot.parse_one(statement, read="clickhouse")
    for node in list(create.find_all(exp.OnCluster)):
        node.pop()
    engine = create.find(exp.EngineProperty)
    assert engine is not None
    engine.set("this", exp.to_identifier("Memory"))
    return create.sql("clickhouse")


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An embedded ClickHouse: the single-node DDL in database ``single``, the shard tables'
    twins in ``shard``, the Distributed tables' columns in ``dist``."""
    path: Path = tmp_path_factory.mktemp("chdb")
    client = clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=CLICKHOUSE_SETTINGS)
    try:
        for database, statements in (
                ("single", list(DDL)),
                ("shard", [_twin(s) for s in STATEMENTS[0::2]]),
                ("dist", [_memory(s) for s in STATEMENTS[1::2]])):
            client.command(f"CREATE DATABASE {database}")
            inside = clickhouse_connect.get_client(dsn=f"chdb://{path}", database=database,
                                                   settings=CLICKHOUSE_SETTINGS)
            for statement in statements:
                inside.command(statement)
            inside.close()
        yield client
    finally:
        client.close()


def _columns(client: Any, database: str) -> list[tuple[Any, ...]]:
    return [(row[0].removesuffix(LOCAL), *row[1:]) for row in client.query(
        "SELECT table, name, position, type, default_kind, default_expression "
        "FROM system.columns WHERE database = {d:String} ORDER BY table, position",
        parameters={"d": database}).result_rows]


def test_shard_tables_have_the_single_node_columns_sort_keys_and_settings(chdb) -> None:
    assert len(_columns(chdb, "single")) > 40
    assert _columns(chdb, "shard") == _columns(chdb, "single")
    assert _columns(chdb, "dist") == _columns(chdb, "single")
    tables = ("SELECT table_name, engine, sorting_key, primary_key, "
              "extract(engine_full, 'SETTINGS .*') FROM (SELECT replaceRegexpOne(name, "
              "'_local$', '') AS table_name, * FROM system.tables "
              "WHERE database = {d:String}) ORDER BY table_name")
    single = chdb.query(tables, parameters={"d": "single"}).result_rows
    shard = chdb.query(tables, parameters={"d": "shard"}).result_rows
    assert [row[0] for row in single] == sorted(TABLES)
    assert shard == single
    settings = [row[4] for row in single if "deduplication" in row[4]]
    assert len(settings) == 4 and all(
        f"non_replicated_deduplication_window = {DEDUP_WINDOW}" in s for s in settings)


def test_sharding_keys_are_integers_and_keep_a_player_on_one_shard(chdb) -> None:
    chdb.command(
        "INSERT INTO shard.events_local (ingest_seq, id_hi, id_lo, event_id, event_type, "
        "occurred_at, ingested_at, received_at, tenant_id, region, player_id, schema_version, "
        "payload) VALUES (1, 1, 1, 'e1', 'bet.placed', now64(6), now64(6), now64(6), 'b7', "
        "'EU', 'p1', '1', '{}'), (2, 2, 2, 'e2', 'bet.settled', now64(6), now64(6), now64(6), "
        "'b7', 'EU', 'p1', '1', '{}'), (3, 3, 3, 'e3', 'session.started', now64(6), now64(6), "
        "now64(6), 'b7', 'EU', NULL, '1', '{}'), (4, 4, 4, 'e4', 'bet.placed', now64(6), "
        "now64(6), now64(6), 'b8', 'EU', 'p1', '1', '{}')")
    for statement in STATEMENTS[1::2]:
        create = sqlglot.parse_one(statement, read="clickhouse")
        engine = create.find(exp.EngineProperty)
        assert engine is not None
        key = engine.this.expressions[3].sql("clickhouse")
        table = f"shard.{_name(statement)}{LOCAL}"
        kind = chdb.query(f"DESCRIBE TABLE (SELECT {key} AS k FROM {table})").result_rows
        assert kind[0][1] == "UInt64", (statement, kind)  # an integer, never NULL
    key = "cityHash64(tenant_id, coalesce(player_id, event_id))"
    rows = dict(chdb.query(f"SELECT event_id, {key} FROM shard.events_local").result_rows)
    assert rows["e1"] == rows["e2"]  # one player's events: one shard
    assert rows["e4"] != rows["e1"]  # the same player id of another tenant: placed apart
    assert rows["e3"] is not None and rows["e3"] != rows["e1"]
    hashed = chdb.query("SELECT cityHash64('b7', 'p1'), cityHash64('b7', 'e3')").result_rows[0]
    assert (rows["e1"], rows["e3"]) == hashed  # computed apart from the DDL


@pytest.mark.parametrize(("url", "dsn", "database", "cluster"), [
    ("http://u:p@ch:8123/tally?cluster=prod_1", "http://u:p@ch:8123/tally", "tally", "prod_1"),
    ("https://ch.example:8443/analytics?cluster=eu-west&compress=lz4",
     "https://ch.example:8443/analytics?compress=lz4", "analytics", "eu-west"),
    ("http://ch:8123", "http://ch:8123", "default", None),
    ("http://ch:8123/?secure=false", "http://ch:8123/?secure=false", "default", None),
])
def test_parse_store(url: str, dsn: str, database: str, cluster: str | None) -> None:
    parsed = parse_store(url)
    assert (parsed.dsn, parsed.database, parsed.cluster) == (dsn, database, cluster)


@pytest.mark.parametrize("url", [
    "http://u:secret@ch:8123/tally?cluster=",
    "http://u:secret@ch:8123/tally?cluster=a%27b",
    "http://u:secret@ch:8123/tally?cluster=1abc",
    "http://u:secret@ch:8123/tally?cluster=-abc",
    "http://u:secret@ch:8123/tally?cluster=a%20b",
    "http://u:secret@ch:8123/tally?cluster=" + "a" * 64,
    "http://u:secret@ch:8123/tally?cluster=a&cluster=b",
    "http://u:secret@ch:8123/ta;lly?cluster=prod",
    "ftp://u:secret@ch/tally?cluster=prod",
    "http:///tally?cluster=prod",
])
def test_a_malformed_cluster_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(StoreUnavailable) as raised:
        parse_store(url)
    message = str(raised.value)
    assert message.startswith("TALLY_STORE: ") and "\n" not in message
    assert "secret" not in message


def test_cluster_ddl_refuses_a_malformed_name() -> None:
    for cluster, database in (("a'b", "tally"), ("prod", "x y"), ("", "tally")):
        with pytest.raises(ValueError, match="not a ClickHouse"):
            cluster_ddl(cluster, database)


DERIVED = derived_tables("clickhouse")
DERIVED_STATEMENTS = [s for t in DERIVED for s in on_cluster(derived_ddl(t), CLUSTER, DATABASE)]


def test_derived_tables_cluster_ddl_snapshot() -> None:
    """The tables kept from the events on a cluster: each a shard table and its Distributed
    table like the base tables; a Least table's view created on every server, reading the
    Distributed table of its states (so it merges the states of every shard)."""
    text = ";\n\n".join(DERIVED_STATEMENTS) + ";\n"
    path = SNAPSHOTS / "cluster_derived_ddl.clickhouse.sql"
    if os.environ.get("TALLY_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.read_text() == text
    views = 0
    for statement in DERIVED_STATEMENTS:
        create = sqlglot.parse_one(statement, read="clickhouse",
                                   error_level=sqlglot.ErrorLevel.RAISE)
        assert isinstance(create, exp.Create)
        on = create.find(exp.OnCluster)
        assert on is not None and on.this.name == CLUSTER, statement
        if create.kind == "VIEW":
            views += 1
            source = create.expression.find(exp.Table)
            assert source is not None and source.name == f"{create.this.name}{STATE}"
    assert views == sum(1 for t in DERIVED if t.least is not None) == 2
    assert len(DERIVED_STATEMENTS) == 2 * len(DERIVED) + views

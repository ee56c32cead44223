"""The ClickHouse store's tables on a cluster: ``TALLY_STORE=http(s)://…?cluster=NAME``.

Derived from the one definition of each table, the single-node DDL the ClickHouse backend
creates (:data:`tally.storage.clickhouse.DDL`): every table ``T`` becomes

- ``T_local ON CLUSTER 'NAME'``: the same columns, ORDER BY and settings, in the replicated
  twin of its engine (``MergeTree`` → ``ReplicatedMergeTree``, ``ReplacingMergeTree(version)``
  → ``ReplicatedReplacingMergeTree(…, version)``) kept at
  ``/clickhouse/tables/{shard}/<db>.T`` by replica ``{replica}`` (the server's macros, as
  ClickHouse documents them: one path per shard, each replica of it a name of its own);
  the insert-deduplication window is the replicated one
  (``replicated_deduplication_window``, same size, replacing
  ``non_replicated_deduplication_window``; unused: every insert's token is its own);
- ``T ON CLUSTER 'NAME'``: the same columns in a ``Distributed('NAME', '<db>', 'T_local',
  key)`` table, so every query and insert of the backend names the tables it names today.

The sharding key (:func:`sharding_key`) is deterministic, never ``rand()``: one key's rows
are on one shard. Events are sharded by ``cityHash64(tenant_id, coalesce(player_id,
event_id))``: all of one player's events are on one shard (first deposit, sessions,
retention cohorts, LTV are computed per shard, with no player split across shards), a
duplicate of an event (same tenant, event id, player) reaches the shard its original did, and
one large tenant spreads over every shard instead of filling one; an event of no player is
placed by its id. Every other table is sharded by a hash of its sort key, which is its
replacing key (idempotency: ``(client_id, key)``; store_settings: ``name``), so every version
of a key is on one shard and ``FINAL`` keeps the last one there.

A view (the merged states of a ``Least`` derived table) is created ``ON CLUSTER`` as it is: it
reads the ``Distributed`` table of its states, so it answers over every shard.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlglot
from sqlglot import exp

from tally.errors import StoreUnavailable
from tally.storage.clickhouse_schema import DDL

LOCAL = "_local"  # the suffix of a shard's table
REPLICA_PATH = "/clickhouse/tables/{{shard}}/{database}.{table}"  # {shard}: the server's macro
REPLICA_NAME = "{replica}"  # the server's macro
DEDUP_WINDOW = {"non_replicated_deduplication_window": "replicated_deduplication_window"}
# a table's sharding key where its sort key is not the right one (module doc)
SHARDING: dict[str, str] = {
    "events": "cityHash64(tenant_id, coalesce(player_id, event_id))",
}
# a cluster's or database's name: what a ClickHouse config names and DDL can carry unquoted
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,62}")


@dataclass(frozen=True)
class StoreUrl:
    """A ClickHouse server's ``TALLY_STORE``: the DSN for the driver (without ``cluster``),
    the database Tally's tables are in, and the cluster they span (``None``: one server)."""

    dsn: str
    database: str
    cluster: str | None


def parse_store(url: str) -> StoreUrl:
    """``http(s)://user:pass@host:8123/db?cluster=NAME`` → :class:`StoreUrl`; a malformed
    cluster or database name is ``StoreUnavailable`` with one line (the URL is not shown:
    it may hold a password)."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise StoreUnavailable("TALLY_STORE: a ClickHouse server URL must be "
                               "http(s)://[user:pass@]host[:port][/database][?cluster=NAME]")
    query = parse_qsl(parts.query, keep_blank_values=True)
    clusters = [value for name, value in query if name == "cluster"]
    if len(clusters) > 1:
        raise StoreUnavailable("TALLY_STORE: the ClickHouse URL names more than one cluster")
    cluster = clusters[0] if clusters else None
    if cluster is not None and not _NAME.fullmatch(cluster):
        raise StoreUnavailable(f"TALLY_STORE: cluster={cluster[:64]!r} is not a cluster name "
                               "(letters, digits, '_' or '-', at most 63, not starting "
                               "with a digit or '-')")
    database = parts.path.strip("/") or "default"
    if not _NAME.fullmatch(database):
        raise StoreUnavailable(f"TALLY_STORE: {database[:64]!r} is not a database name "
                               "(letters, digits, '_' or '-', at most 63)")
    rest = urlencode([(name, value) for name, value in query if name != "cluster"])
    return StoreUrl(urlunsplit(parts._replace(query=rest)), database, cluster)


def _create(statement: str) -> exp.Create:
    create = sqlglot.parse_one(statement, read="clickhouse")
    assert isinstance(create, exp.Create) and isinstance(create.this, exp.Schema)
    return create


def _sort_key(create: exp.Create) -> list[exp.Expr]:
    order = create.find(exp.Order)
    assert order is not None and len(order.expressions) == 1
    key = order.expressions[0].this
    return list(key.expressions) if isinstance(key, exp.Tuple) else [key.unnest()]


def sharding_key(statement: str) -> exp.Expr:
    """The sharding key of the table ``statement`` creates (module doc)."""
    create = _create(statement)
    name = create.this.this.name
    if name in SHARDING:
        return sqlglot.parse_one(SHARDING[name], read="clickhouse")
    return exp.Anonymous(this="cityHash64", expressions=[e.copy() for e in _sort_key(create)])


def _on_cluster(cluster: str) -> exp.OnCluster:
    return exp.OnCluster(this=exp.Literal.string(cluster))


def local_table(statement: str, cluster: str, database: str) -> str:
    """A shard's table of one single-node ``CREATE TABLE``: ``<table>_local ON CLUSTER``,
    its engine's replicated twin, the replicated deduplication window."""
    create = _create(statement)
    name = create.this.this.name
    create.this.set("this", exp.to_table(name + LOCAL))
    properties = create.args["properties"]
    for prop in properties.expressions:
        if isinstance(prop, exp.EngineProperty):
            engine = prop.this
            args = list(engine.expressions) if isinstance(engine, exp.Anonymous) else []
            engine_name = engine.name if not isinstance(engine, exp.Anonymous) \
                else str(engine.this)
            assert engine_name.endswith("MergeTree"), engine_name
            prop.set("this", exp.Anonymous(this=f"Replicated{engine_name}", expressions=[
                exp.Literal.string(REPLICA_PATH.format(database=database, table=name)),
                exp.Literal.string(REPLICA_NAME), *args]))
        elif isinstance(prop, exp.SettingsProperty):
            for setting in prop.expressions:
                column = setting.this
                if column.name in DEDUP_WINDOW:
                    setting.set("this", exp.column(DEDUP_WINDOW[column.name]))
    properties.set("expressions", [_on_cluster(cluster), *properties.expressions])
    return create.sql("clickhouse")


def distributed_table(statement: str, cluster: str, database: str) -> str:
    """The table the backend names, over the shards' tables: the same columns, a
    ``Distributed`` engine sharding by :func:`sharding_key`."""
    create = _create(statement)
    name = create.this.this.name
    columns = [c for c in create.this.expressions if isinstance(c, exp.ColumnDef)]
    engine = exp.Anonymous(this="Distributed", expressions=[
        exp.Literal.string(cluster), exp.Literal.string(database),
        exp.Literal.string(name + LOCAL), sharding_key(statement)])
    distributed = exp.Create(
        this=exp.Schema(this=exp.to_table(name), expressions=columns), kind="TABLE",
        exists=True, properties=exp.Properties(expressions=[
            _on_cluster(cluster), exp.EngineProperty(this=engine)]))
    return distributed.sql("clickhouse")


def cluster_ddl(cluster: str, database: str, statements: Sequence[str] = DDL) -> list[str]:
    """The DDL of the ClickHouse store's tables on ``cluster`` (in ``database`` on every
    server): each table's shard table, then its ``Distributed`` table."""
    for value in (cluster, database):
        if not _NAME.fullmatch(value):
            raise ValueError(f"not a ClickHouse cluster or database name: {value!r}")
    out: list[str] = []
    for statement in statements:
        out += [local_table(statement, cluster, database),
                distributed_table(statement, cluster, database)]
    return out


def on_cluster(statements: Sequence[str], cluster: str, database: str) -> list[str]:
    """A derived table's DDL (``clickhouse_schema.derived_ddl``) on ``cluster``: each table
    as :func:`cluster_ddl` makes it, each view created on every server."""
    out: list[str] = []
    for statement in statements:
        create = sqlglot.parse_one(statement, read="clickhouse")
        if isinstance(create, exp.Create) and create.kind == "VIEW":
            properties = create.args.get("properties") or exp.Properties(expressions=[])
            properties.append("expressions", _on_cluster(cluster))
            create.set("properties", properties)
            out.append(create.sql("clickhouse"))
        else:
            out += cluster_ddl(cluster, database, [statement])
    return out

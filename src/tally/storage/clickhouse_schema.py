"""The ClickHouse form of Tally's tables, derived from the one definition of each.

The events' columns are the Arrow schema of ``storage/schema.py`` and every derived table's
are its ``DerivedTable.ddl``; both are read here as the DuckDB DDL they render to and written
again as ClickHouse DDL: the same columns, in the same order, of the ClickHouse type of each
(:data:`TYPES`), ``Nullable`` unless ``NOT NULL``, in a ``MergeTree`` sorted by the table's
primary key (else its first column when that is ``NOT NULL``: the bucket, the ingest
sequence; else unsorted).

A ``MergeTree`` keeps every row it is given, and the readers of a derived table aggregate its
rows; the tables Tally keeps by upsert on DuckDB (``player_firsts``, ``player_attributes``:
``ON CONFLICT … DO UPDATE``, declared :class:`~tally.storage.base.Least`) are a view of
``argMin`` states here (:func:`derived_ddl`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.expressions.datatypes import DType as _T

from tally.storage.base import DerivedTable, Least
from tally.storage.schema import EVENTS_SCHEMA, QUARANTINE_SCHEMA, duckdb_columns

TYPES: dict[_T, str] = {
    _T.BIGINT: "Int64",
    _T.INT: "Int32",
    _T.INT128: "Int128",  # DuckDB's HUGEINT
    _T.TEXT: "String",
    _T.VARCHAR: "String",
    _T.BOOLEAN: "Bool",
    _T.TIMESTAMP: "DateTime64(6)",  # naive, always UTC (microseconds, as DuckDB's)
    _T.TIMESTAMPNTZ: "DateTime64(6)",
    _T.DATE: "Date",
}


DEDUP_WINDOW = 10_000  # inserts a table remembers the token of (``storage/clickhouse.py``)
DEDUP = f" SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}"
STATE = "_state"  # the suffix of the table holding a Least table's argMin states
# beside each argMin state, the least row as a plain minimum of (``by``…, the other
# columns…): the view reads every column from it, so a filter on any of them (a cohort's
# first instant, its region) merges no argMin state (a month's first depositors at 100M: 91
# against 496 ms; with the region a caller is confined to, LTV's statements 0.16 against
# 0.9 s: docs/benchmarks.md). Rows whose ``by`` tie keep the least of the others (an
# ``argMin`` keeps any one of them).
LEAST = "_least_row"
# the seventeenth session's column, the least ``by`` alone: dropped where found
OLD_LEAST = "_least"
# the journal record (the last of its write's group) a row of an appended table came from
# and the insert that wrote it among its table's: record * PLACES + place (0: a row of no
# record), what the store checks for after a write failed or was cut
# (``ClickHouseBackend._find_unapplied``). MATERIALIZED: not in ``SELECT *`` nor in an
# insert's columns unless named (with ``insert_allow_materialized_columns``), so no query
# and no statement that fills a table from the events sees it
SEQ = "_seq"
PLACES = 16  # the inserts a table may have in one write
SEQ_COLUMN = f"{SEQ} UInt64 MATERIALIZED 0"
SEQ_PARAM = f"{{{SEQ}:UInt64}}"  # its value, bound by the server at each insert
# the partition of each appended table that has more than one (one insert: a part each)
PARTITIONS = {"events": "toYYYYMM(occurred_at)"}


def _type(kind: exp.DataType) -> str:
    """The ClickHouse type of a DuckDB column type (a list: an ``Array``, never ``Nullable``)."""
    if kind.this == _T.ARRAY:
        return f"Array({_type(kind.expressions[0])})"
    return TYPES[kind.this]


@dataclass(frozen=True)
class Columns:
    """One DuckDB ``CREATE TABLE``'s table: its name, its columns with their ClickHouse
    types, and its sort key (the primary key, else the first ``NOT NULL`` column)."""

    name: str
    types: dict[str, str]
    order: list[str]


def parse_table(duckdb_ddl: str) -> Columns:
    create = sqlglot.parse_one(duckdb_ddl, read="duckdb")
    assert isinstance(create, exp.Create) and isinstance(create.this, exp.Schema)
    types: dict[str, str] = {}
    not_null: list[str] = []
    key: list[str] = []
    for item in create.this.expressions:
        if isinstance(item, exp.PrimaryKey):
            key = [e.name for e in item.expressions]
            continue
        assert isinstance(item, exp.ColumnDef) and item.kind is not None
        kind = _type(item.kind)
        if any(isinstance(c.kind, exp.NotNullColumnConstraint) for c in item.constraints):
            not_null.append(item.name)
        elif item.kind.this != _T.ARRAY:  # an array cannot be Nullable: empty stands for none
            kind = f"Nullable({kind})"
        types[item.name] = kind
    return Columns(create.this.this.name, types, key or not_null[:1])


def _sort(order: Sequence[str]) -> str:
    return f"({', '.join(order)})" if order else "tuple()"


def clickhouse_table(duckdb_ddl: str, *, order: Sequence[str] | None = None,
                     partition: str | None = None, seq: bool = False) -> str:
    """The ClickHouse ``CREATE TABLE`` of one DuckDB ``CREATE TABLE`` statement (sorted by
    ``order`` and partitioned by ``partition`` when given; ``seq``: an appended table, with
    :data:`SEQ` last)."""
    table = parse_table(duckdb_ddl)
    columns = ", ".join([f"{name} {kind}" for name, kind in table.types.items()]
                        + ([SEQ_COLUMN] if seq else []))
    parts = f" PARTITION BY {partition}" if partition else ""
    return (f"CREATE TABLE IF NOT EXISTS {table.name} ({columns}) "
            f"ENGINE = MergeTree{parts} ORDER BY {_sort(order or table.order)}")


def _row(table: Columns, least: Least) -> tuple[list[str], str, str]:
    """A Least table's other columns (not keys), and the types of their tuple and of ``by``
    (a tuple)."""
    rest = [c for c in table.types if c not in least.keys]
    row = f"Tuple({', '.join(table.types[c] for c in rest)})"
    return rest, row, f"Tuple({', '.join(table.types[c] for c in least.by)})"


def _least_order(table: Columns, least: Least) -> list[str]:
    """The columns of :data:`LEAST`'s tuple: ``by``, then the other non-key columns."""
    rest, _, _ = _row(table, least)
    return [*least.by, *(c for c in rest if c not in least.by)]


def derived_ddl(table: DerivedTable) -> list[str]:
    """The ClickHouse DDL of a derived table. A :class:`Least` table ``T`` is ``T_state``, an
    ``AggregatingMergeTree`` of one ``argMin`` state per key (the row of least ``by``, kept
    whole as one tuple: ``argMin`` of a column alone would skip its NULLs), and the view ``T``
    of the merged states, with ``T``'s columns."""
    if table.least is None:
        return [clickhouse_table(table.ddl, order=table.order or None, seq=True) + DEDUP]
    columns, least = parse_table(table.ddl), table.least
    _, row, by = _row(columns, least)
    keys = ", ".join(f"{k} {columns.types[k]}" for k in least.keys)
    return [f"CREATE TABLE IF NOT EXISTS {columns.name}{STATE} ({keys}, "
            f"_row AggregateFunction(argMin, {row}, {by}), {least_column(table)}) "
            f"ENGINE = AggregatingMergeTree ORDER BY {_sort(least.keys)}" + DEDUP,
            least_view(table)]


def least_column(table: DerivedTable) -> str:
    """The :data:`LEAST` column of a Least table's state table; for a state table made
    before it, its value in the rows already stored is their state's row (the ``DEFAULT``,
    which ``ALTER TABLE … ADD COLUMN`` gives them)."""
    assert table.least is not None
    columns = parse_table(table.ddl)
    rest, _, _ = _row(columns, table.least)
    order = _least_order(columns, table.least)
    kind = f"Tuple({', '.join(columns.types[c] for c in order)})"
    stored = ", ".join(f"tupleElement(finalizeAggregation(_row), {rest.index(c) + 1})"
                       for c in order)
    return f"{LEAST} SimpleAggregateFunction(min, {kind}) DEFAULT tuple({stored})"


def least_view(table: DerivedTable) -> str:
    """A Least table's view: its keys and every other column from :data:`LEAST`."""
    assert table.least is not None
    columns, least = parse_table(table.ddl), table.least
    rest, _, _ = _row(columns, least)
    order = _least_order(columns, least)
    merged = ", ".join(f"tupleElement(min({LEAST}), {order.index(name) + 1}) AS {name}"
                       for name in rest)
    return (f"CREATE OR REPLACE VIEW {columns.name} AS SELECT "  # noqa: S608 - our names
            f"{', '.join(least.keys)}, {merged} FROM {columns.name}{STATE} "
            f"GROUP BY {', '.join(least.keys)}")


@cache  # parsed and generated once a process (sqlglot: milliseconds a statement)
def derived_statement(sql: str, table: DerivedTable, *, batch: bool = False) -> str:
    """A derived table's statement (ClickHouse SQL) as the ClickHouse store runs it: a
    Least table's ``INSERT INTO T SELECT …`` (its rows, in ``T``'s column order) becomes the
    insert of their ``argMin`` states into ``T_state``; another table's batch insert
    (``batch``) also fills :data:`SEQ` with the parameter :data:`SEQ_PARAM`; any other
    statement is unchanged."""
    if table.least is None:
        return _numbered(sql, table) if batch and sql.lstrip().upper().startswith("INSERT") \
            else sql
    insert = sqlglot.parse_one(sql, read="clickhouse")
    assert isinstance(insert, exp.Insert) and isinstance(insert.expression, exp.Query)
    columns, least = parse_table(table.ddl), table.least
    rest, _, _ = _row(columns, least)
    rows = insert.expression
    assert isinstance(rows, exp.Select)
    names = list(columns.types)
    rows.set("expressions", [exp.alias_(e.unalias(), names[i])
                             for i, e in enumerate(rows.expressions)])
    def typed(names: Sequence[str]) -> str:  # as the state's type says, not the rows'
        return ", ".join(f"CAST({n} AS {columns.types[n]})" for n in names)

    state = f"argMinState(tuple({typed(rest)}), tuple({typed(least.by)}))"
    keys = ", ".join(least.keys)
    return (f"INSERT INTO {columns.name}{STATE} ({keys}, _row, {LEAST}) "  # noqa: S608
            f"SELECT {keys}, {state}, min(tuple({typed(_least_order(columns, least))})) "
            f"FROM ({rows.sql(dialect='clickhouse')}) GROUP BY {keys}")


def _numbered(sql: str, table: DerivedTable) -> str:
    """An appended table's ``INSERT INTO T SELECT …`` naming T's declared columns and
    :data:`SEQ`, the value of :data:`SEQ_PARAM` (run with ``insert_allow_materialized_columns``)."""
    insert = sqlglot.parse_one(sql, read="clickhouse")
    assert isinstance(insert, exp.Insert) and isinstance(insert.expression, exp.Query)
    target = insert.this
    assert isinstance(target, exp.Table), f"{table.name}: a batch's insert names its columns"
    rows = insert.expression
    if not isinstance(rows, exp.Select):
        rows = exp.select("*").from_(rows.subquery())
    names = [*parse_table(table.ddl).types, SEQ]
    insert.set("this", exp.Schema(this=target, expressions=[exp.to_identifier(n)
                                                             for n in names]))
    insert.set("expression", rows.select(
        exp.alias_(sqlglot.parse_one(SEQ_PARAM, read="clickhouse"), SEQ)))
    return insert.sql(dialect="clickhouse")


def seq_tables(derived: Iterable[DerivedTable]) -> list[str]:
    """The tables a row of which came from one journal record (:data:`SEQ`): the events,
    the quarantine, every derived table but a Least one (its states are the same however
    often a record is applied)."""
    return ["events", "quarantine", *(t.name for t in derived if t.least is None)]


def _arrow_table(name: str, schema: pa.Schema) -> str:
    return clickhouse_table(f"CREATE TABLE {name} ({duckdb_columns(schema)})", seq=True)


# the base tables (the derived ones: derived_ddl)
DDL = (
    # time first: every query names event types and a range of occurred_at, most a brand (row-
    # level security), so parts and granules outside them are skipped (ingest_seq order made
    # every range query read the whole table); a month a partition
    clickhouse_table(f"CREATE TABLE events ({duckdb_columns(EVENTS_SCHEMA)})",
                     order=("event_type", "tenant_id", "occurred_at"),
                     partition=PARTITIONS["events"], seq=True) + DEDUP,
    clickhouse_table(f"CREATE TABLE quarantine (id BIGINT NOT NULL, "
                     f"{duckdb_columns(QUARANTINE_SCHEMA)}, PRIMARY KEY (id))",
                     seq=True) + DEDUP,
    # the last record of a (client_id, key) is the one kept (DuckDB: INSERT OR REPLACE)
    "CREATE TABLE IF NOT EXISTS idempotency (client_id String, key String, "
    "body_sha256 String, response String, created_at DateTime64(6)) "
    "ENGINE = ReplacingMergeTree ORDER BY (client_id, key)" + DEDUP,
    "CREATE TABLE IF NOT EXISTS fx_rates (day Date32, currency String, rate String, "
    "created_at DateTime64(6) DEFAULT now64(6)) ENGINE = MergeTree ORDER BY (day, currency)",
    # the greatest version of a name is its value: the journal's sequence for
    # journal_applied_seq (replaying an older record never lowers it), 0 for the others
    "CREATE TABLE IF NOT EXISTS store_settings (name String, value String, version UInt64) "
    "ENGINE = ReplacingMergeTree(version) ORDER BY name" + DEDUP,
)



def ddl(derived: Iterable[DerivedTable]) -> list[str]:
    """The ClickHouse DDL of the events, the quarantine's columns and every derived table."""
    return [_arrow_table("events", EVENTS_SCHEMA),
            _arrow_table("quarantine", QUARANTINE_SCHEMA),
            *(sql for table in derived for sql in derived_ddl(table))]

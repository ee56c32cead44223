"""The ClickHouse form of Tally's tables, derived from the one definition of each.

The events' columns are the Arrow schema of ``storage/schema.py`` and every derived table's
are its ``DerivedTable.ddl``; both are read here as the DuckDB DDL they render to and written
again as ClickHouse DDL: the same columns, in the same order, of the ClickHouse type of each
(:data:`TYPES`), ``Nullable`` unless ``NOT NULL``, in a ``MergeTree`` sorted by the table's
primary key (else its first column when that is ``NOT NULL``: the bucket, the ingest
sequence; else unsorted).

A ``MergeTree`` keeps every row it is given: the tables Tally keeps by upsert on DuckDB
(``player_firsts``, ``player_attributes``: ``ON CONFLICT … DO UPDATE``) hold exactly what DuckDB
holds only when loaded with DuckDB's rows, as the ClickHouse snapshot test does; the ClickHouse
store will keep them with engines of its own (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.expressions.datatypes import DType as _T

from tally.storage.base import DerivedTable
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


def clickhouse_table(duckdb_ddl: str) -> str:
    """The ClickHouse ``CREATE TABLE`` of one DuckDB ``CREATE TABLE`` statement."""
    create = sqlglot.parse_one(duckdb_ddl, read="duckdb")
    assert isinstance(create, exp.Create) and isinstance(create.this, exp.Schema)
    name = create.this.this.name
    columns: list[str] = []
    not_null: list[str] = []
    key: list[str] = []
    for item in create.this.expressions:
        if isinstance(item, exp.PrimaryKey):
            key = [e.name for e in item.expressions]
            continue
        assert isinstance(item, exp.ColumnDef) and item.kind is not None
        kind = TYPES[item.kind.this]
        if any(isinstance(c.kind, exp.NotNullColumnConstraint) for c in item.constraints):
            not_null.append(item.name)
        else:
            kind = f"Nullable({kind})"
        columns.append(f"{item.name} {kind}")
    order = key or not_null[:1]
    sort = f"({', '.join(order)})" if order else "tuple()"
    return (f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(columns)}) "
            f"ENGINE = MergeTree ORDER BY {sort}")


def _arrow_table(name: str, schema: pa.Schema) -> str:
    return clickhouse_table(f"CREATE TABLE {name} ({duckdb_columns(schema)})")


def ddl(derived: Iterable[DerivedTable]) -> list[str]:
    """The ClickHouse DDL of the events, the quarantine's columns and every derived table."""
    return [_arrow_table("events", EVENTS_SCHEMA),
            _arrow_table("quarantine", QUARANTINE_SCHEMA),
            *(clickhouse_table(table.ddl) for table in derived)]

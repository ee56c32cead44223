"""The SQL dialect of each store: every difference between the engines is written here.

The query modules build typed sqlglot nodes (``exp.LogicalOr``, ``exp.IntDiv``,
:class:`Hash64`, …) and never a function name as a string; each store renders a tree with
:func:`render` in its own dialect, a sqlglot ``Dialect`` subclass whose generator maps the
nodes its engine spells differently (as sqlglot's own dialects and ibis do).

ClickHouse also needs session settings for the SQL to mean what it means on DuckDB:
:data:`CLICKHOUSE_SETTINGS`, set on every connection of a ClickHouse store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlglot import exp
from sqlglot.dialects.clickhouse import ClickHouse
from sqlglot.dialects.dialect import Dialect, rename_func
from sqlglot.dialects.duckdb import DuckDB
from sqlglot.generators.clickhouse import ClickHouseGenerator
from sqlglot.generators.duckdb import DuckDBGenerator


class Hash64(exp.Expression, exp.Func):
    """A 64-bit hash of its arguments: equal arguments, equal hashes (different ones may
    collide, so a join on it checks the values it stands for)."""

    arg_types = {"expressions": True}
    is_var_len_args = True


def hash64(*args: exp.Expr) -> Hash64:
    return Hash64(expressions=list(args))


class TallyDuckDB(DuckDB):
    """DuckDB as sqlglot writes it, and :class:`Hash64` as ``HASH``."""

    class Generator(DuckDBGenerator):
        TRANSFORMS = {**DuckDBGenerator.TRANSFORMS, Hash64: rename_func("HASH")}


def _array_min(generator: ClickHouseGenerator, expression: exp.ArrayMin) -> str:
    """The least element, NULL for an empty list (as DuckDB's ``list_min``; ClickHouse's
    ``arrayMin`` gives the type's default, the epoch for an instant). The list is written
    twice and computed once (ClickHouse merges equal expressions)."""
    items = generator.sql(expression, "this")
    return f"if(empty({items}), NULL, arrayMin({items}))"


class TallyClickHouse(ClickHouse):
    """ClickHouse (26.x, the engine chDB embeds) where sqlglot's rendering differs from it."""

    class Generator(ClickHouseGenerator):
        TRANSFORMS = {
            **ClickHouseGenerator.TRANSFORMS,
            Hash64: rename_func("cityHash64"),
            # no LOGICAL_OR / BOOL_OR: the greatest of the Bool values is their OR
            exp.LogicalOr: rename_func("max"),
            # sqlglot's `CAST(a / b AS Int64)` divides in Float64: exact integers instead
            exp.IntDiv: rename_func("intDiv"),
            exp.ArrayMin: _array_min,
        }

        def generateseries_sql(self, expression: exp.GenerateSeries) -> str:
            """The list of integers from ``start`` to ``end`` inclusive (DuckDB's
            ``generate_series``): ``range`` stops before its end."""
            end = exp.Add(this=expression.args["end"].copy(), expression=exp.Literal.number(1))
            return self.func("range", expression.args["start"], end)

        def onconflict_sql(self, expression: exp.OnConflict) -> str:
            """No upsert: the insert appends its rows, and the ClickHouse store answers the
            least row per key of the table (``storage.base.Least``)."""
            return ""


DIALECTS: dict[str, type[Dialect]] = {"duckdb": TallyDuckDB, "clickhouse": TallyClickHouse}

# ClickHouse session settings the rendered SQL relies on:
# - join_use_nulls: a LEFT (or ASOF LEFT) join's row without a match has NULL columns of the
#   other side, as in SQL and DuckDB (by default ClickHouse fills in the type's default value:
#   an empty string, the epoch), so `r.t IS NULL` finds "not found" and a player without a
#   registration has NULL attributes
CLICKHOUSE_SETTINGS: dict[str, Any] = {"join_use_nulls": 1}


def upsert(insert: exp.Insert, keys: tuple[str, ...], updates: Mapping[str, exp.Expr],
           where: exp.Expr | None = None) -> exp.Insert:
    """``insert`` where a row whose ``keys`` are already stored updates the stored row
    (``ON CONFLICT (keys) DO UPDATE SET column = value, … [WHERE where]``; the new row's
    columns are :func:`excluded`'s). DuckDB's: ClickHouse renders the plain insert, and its
    store keeps one row per key by the table's ``Least`` declaration."""
    conflict = exp.OnConflict(
        conflict_keys=[exp.column(key) for key in keys], action=exp.var("DO UPDATE"),
        expressions=[exp.column(name).eq(value) for name, value in updates.items()])
    if where is not None:
        conflict.set("where", exp.Where(this=where))
    insert.set("conflict", conflict)
    return insert


def excluded(name: str) -> exp.Column:
    """Column ``name`` of the row an :func:`upsert` did not insert."""
    return exp.column(name, "excluded")


def render(tree: exp.Expr, dialect: str) -> str:
    """``tree`` as SQL text of the store ``dialect`` (``duckdb`` or ``clickhouse``)."""
    return tree.sql(dialect=DIALECTS[dialect])

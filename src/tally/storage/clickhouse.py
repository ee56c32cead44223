"""The ClickHouse backend: an embedded chDB under ``--data-dir`` or a ClickHouse server, one
driver (clickhouse-connect) and one code path for both.

``ClickHouseBackend(dsn)`` opens ``chdb:///<dir>`` (the engine in this process: one engine a
process, one writer thread, concurrent readers each with a client of their own on the same
path) or ``http(s)://…`` (a server): events, quarantine, idempotency records, FX rates, the
store's settings, and the tables derived from the events (rollups, activity, cohorts' tables:
``DerivedTable``), kept by the same statements as on DuckDB, run after the events' insert over
the batch (:meth:`ClickHouseBackend._append_derived`).

ClickHouse has no multi-table transaction, so a write is made checkable instead of atomic:
each table of a :class:`WriteSet` is one ``INSERT`` in one block (one part a partition, which
is on disk whole or not at all), every row of a table that is appended to (the events, the
quarantine, the derived tables but ``Least`` ones) names the journal record it came from
(``_seq``: the last of its write's group), and the ``journal_applied_seq`` setting is written
last, after the engine's files are synced. A write that failed, or was cut by a crash or a
``kill -9``, may have left some of its parts; the store finds them when it opens and after
a failed write (:meth:`ClickHouseBackend._find_unapplied`: which tables and partitions hold
rows of a record after the applied one), the applier's first write is that group again
(``pending_group``), and the store inserts only what had not landed. Insert deduplication
tokens are not trusted with this: a non-replicated table's token log and its parts reach
the disk in no set order, so after a power loss or an I/O error a token can outlive its part
(the replay was dropped: an acknowledged record lost) or a part its token (counted twice);
both measured (``tests/test_faults.py``). Every insert carries a token of its own, so no
insert is ever taken for another. Nothing is deleted on that path: a lightweight ``DELETE``
is a mutation whose file the engine does not sync, and one cut by the failing disk left the
table unloadable (measured: the disk-full scenario could not restart).

Quarantine ids: ClickHouse has no sequence, so an entry's id is ``journal_seq * 2**20 + i``
(``i`` its row in the record: at most :data:`QUARANTINE_ROWS` a record), which grows with the
journal like DuckDB's sequence and is the same when a record is replayed. A write without a
journal record (not one the applier makes) numbers its entries after the greatest stored id.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import clickhouse_connect
import numpy as np
import pyarrow as pa
import sqlglot
from clickhouse_connect.driver.binding import bind_query
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import (
    DatabaseError,
    DataError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)
from sqlglot import exp

from tally.errors import StoreUnavailable, WriteRejected
from tally.storage.base import (
    Backend,
    DerivedTable,
    IdempotencyRecord,
    QuarantineItem,
    WriteSet,
    declared_columns,
)
from tally.storage.clickhouse_cluster import LOCAL, cluster_ddl, on_cluster
from tally.storage.clickhouse_schema import (
    DDL,
    DEDUP_WINDOW,
    LEAST,
    OLD_LEAST,
    PARTITIONS,
    PLACES,
    SEQ,
    SEQ_COLUMN,
    SEQ_PARAM,
    STATE,
    derived_ddl,
    derived_statement,
    least_column,
    seq_tables,
)
from tally.storage.dialects import CLICKHOUSE_SETTINGS, render
from tally.storage.limits import QueryLimits, out_of_memory, timed_out
from tally.storage.metering import current_meter
from tally.storage.schema import QUARANTINE_SCHEMA

log = logging.getLogger(__name__)
JOURNAL_APPLIED = "journal_applied_seq"
__all__ = ["DDL", "DEDUP_WINDOW", "ClickHouseBackend"]
QUARANTINE_BITS = 20
QUARANTINE_ROWS = 2 ** QUARANTINE_BITS  # quarantine entries one journal record may hold
# a delete returns once every part holds it (the replay's rows are inserted after it)
DELETE_SYNC: dict[str, Any] = {"lightweight_deletes_sync": 2, "mutations_sync": 2}
# an insert naming _seq, in one block (so one part a partition: a part is on disk whole or
# not at all, so a record's rows are in a table's partition all or none); one thread (a
# batch's few rows cost more spread over threads: 13% more CPU a 1,000-event write)
NUMBERED: dict[str, Any] = {"insert_allow_materialized_columns": 1, "max_threads": 1,
                            "max_insert_threads": 1, "min_insert_block_size_rows": 1 << 40,
                            "min_insert_block_size_bytes": 1 << 40}

# every client's session: the SQL's meaning (dialects.py) and naive timestamps read as UTC
SETTINGS: dict[str, Any] = {**CLICKHOUSE_SETTINGS, "session_timezone": "UTC"}
TIMEOUT_EXCEEDED, MEMORY_LIMIT_EXCEEDED = 159, 241  # ClickHouse's error codes

# ClickHouse error codes of the store failing (as opposed to the rows or the SQL): I/O and
# the file system (a full or read-only disk included), memory, threads, time, the network, a
# server refusing load or credentials. A write refused with one of these is retried, never
# set aside: the same rows go in once the store recovers (``ingest/setaside.py``).
STORE_CODES = frozenset({
    3, 74, 75, 76, 77, 83, 87, 88, 107, 159, 160, 164, 172, 173, 194, 202, 203, 204, 209,
    210, 226, 227, 228, 236, 241, 242, 243, 252, 272, 273, 274, 275, 279, 294, 319, 363, 384,
    394, 402, 411, 425, 439, 458, 459, 461, 468, 473, 521, 516, 999, 1000, 1001, 1002,
})
# what the operating system says when the disk, not the rows, fails (in an error of no code)
OS_FAILURES = ("read-only file system", "no space left", "input/output error",
               "too many open files", "cannot allocate memory", "disk quota exceeded")


_LIBC = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write back every file of the file system ``fd`` is on (Linux)."""
    if _LIBC.syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"syncfs: {os.strerror(errno)}")


def chdb_dsn(data_dir: Path) -> str:
    """The DSN of the embedded engine whose files are under ``data_dir``."""
    return f"chdb://{data_dir.resolve()}"


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def is_store_error(exc: BaseException) -> bool:
    """Does ``exc`` say the store cannot be used now (rather than that a statement or its
    rows are at fault)?"""
    if isinstance(exc, OperationalError | InterfaceError | OSError | ConnectionError):
        return True
    if isinstance(exc, ProgrammingError) and "closed" in str(exc):
        return True
    if not isinstance(exc, DatabaseError):
        return isinstance(exc, MemoryError)
    code = getattr(exc, "code", None)
    # an error of no code is the engine failing, not a verdict on the rows (unless the
    # driver says the data or the statement is at fault)
    return (code is None and not isinstance(exc, DataError | ProgrammingError)) \
        or code in STORE_CODES \
        or any(failure in str(exc).lower() for failure in OS_FAILURES)


def _insert_settings(name: str) -> str:
    """The ``SETTINGS`` clause of an insert naming :data:`SEQ` (:data:`NUMBERED` and a
    deduplication token of its own, so it is never taken for another: a table with a
    deduplication window drops a block whose content's hash it holds, and ClickHouse 26.9
    ignores ``insert_deduplicate = 0`` there, measured). In the statement, not the driver's
    settings: on chDB those are a ``SET`` before and after each statement (6.6 vs 2.4 ms an
    insert, measured)."""
    token = f"{uuid.uuid4().hex}:{name}"
    return " SETTINGS " + ", ".join(
        [f"{key} = {value}" for key, value in NUMBERED.items()]
        + [f"insert_deduplication_token = '{token}'"])


def _place(table: str, place: int) -> str:
    """A table's insert of a write: ``"<table>:<place>"`` (its place among the table's)."""
    if not 0 <= place < PLACES:
        raise ValueError(f"{table}: more than {PLACES} inserts a write")
    return f"{table}:{place}"


@cache
def _split(sql: str) -> tuple[str | None, str]:
    """An ``INSERT … SELECT`` as its target (``INSERT INTO t (…)``) and its rows, so a
    ``SETTINGS`` clause goes between them; any other statement: (None, the statement)."""
    statement = sqlglot.parse_one(sql, read="clickhouse")
    if not isinstance(statement, exp.Insert):
        return None, sql
    return (f"INSERT INTO {statement.this.sql(dialect='clickhouse')}",
            statement.expression.sql(dialect="clickhouse"))


def _number(value: Any) -> str:
    """A numeric setting's value as SQL (a bound of :attr:`ClickHouseBackend.limits`)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    return repr(value)


def _utc_text(t: datetime) -> str:
    """A naive UTC timestamp as a ``DateTime64(6)`` parameter (to the microsecond)."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def bind(params: dict[str, Any]) -> dict[str, Any]:
    """Named parameters as ClickHouse binds them server-side (``{name:Type}``): timestamps
    as text to the microsecond."""
    return {k: _utc_text(v) if isinstance(v, datetime) else v for k, v in params.items()}


def _as_duckdb(table: pa.Table) -> pa.Table:
    """ClickHouse's Arrow output in the types DuckDB answers with: ``Int128`` values (money
    sums) come back as 16 little-endian bytes (Arrow has no 128-bit integer) and become a
    ``decimal128(38, 0)`` as DuckDB's ``HUGEINT`` (read as signed: no query of Tally's returns
    a ``UInt128``); timestamps in the session's time zone (UTC) become naive."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.tz is not None:
            table = table.set_column(i, pa.field(f.name, pa.timestamp(f.type.unit)),
                                     table.column(i).cast(pa.timestamp(f.type.unit)))
        elif pa.types.is_fixed_size_binary(f.type) and f.type.byte_width == 16:
            # the same 16 bytes, little-endian two's complement, as Arrow's decimal128
            column = table.column(i).combine_chunks()
            table = table.set_column(i, pa.field(f.name, pa.decimal128(38, 0)),
                                     pa.Array.from_buffers(
                                         pa.decimal128(38, 0), len(column),
                                         column.buffers()[:2], null_count=column.null_count,
                                         offset=column.offset))
    return table


class ClickHouseBackend:
    """Tally's base tables in ClickHouse. Writes come from one thread (the ingest writer);
    each reading thread has a client of its own."""

    dialect = "clickhouse"

    def __init__(self, dsn: str, *, idempotency_ttl: timedelta = timedelta(hours=24),
                 derived: Sequence[DerivedTable] = (), retired: Sequence[str] = (),
                 database: str = "default", cluster: str | None = None,
                 limits: QueryLimits | None = None, owner: int | None = None) -> None:
        """``derived``: the tables kept from the events; ``retired``: tables of earlier
        versions, dropped; ``cluster``: the tables are ``Distributed`` over it (in
        ``database``, ``storage/clickhouse_cluster.py``); ``limits``: bounds on every read
        statement; ``owner``: the descriptor holding the embedded store's folder lock, closed
        with the store."""
        self.dsn = dsn
        self._cluster = cluster
        # on a cluster an insert returns once the shards hold its rows (and its token)
        self._settings = {**SETTINGS, **({"distributed_foreground_insert": 1} if cluster else {})}
        self.idempotency_ttl = idempotency_ttl
        self.limits = limits or QueryLimits()
        self._owner = owner
        self._clients: list[Client] = []
        self._clients_lock = threading.Lock()
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._dry_tables = False
        self._staged: set[str] = set()  # the writer's temporary tables of a batch (_insert)
        self._closed = False
        self._rows_scanned = 0
        self._sync_failed: str | None = None  # why the engine's files could not be synced
        # (the statement's table and place among its table's, the statement (an insert: its
        # target and its rows), whether its rows name their record) of each batch's derived
        # rows, in order
        self._derived = [(_place(table.name, place), _split(derived_statement(
                              sql, table, batch=True)), table.least is None)
                         for table in derived for place, sql in enumerate(table.from_batch)]
        self._seq_tables = seq_tables(derived)
        # the applied record (None: not known since a write failed) and the rows of later
        # records the store holds: {record: {"table:place": {partition: rows}}}
        # (_find_unapplied)
        self._applied: int | None = None
        self._landed: dict[int, dict[str, dict[str, int]]] = {}
        self._writer = self._connect()
        try:
            for statement in DDL if cluster is None else cluster_ddl(cluster, database, DDL):
                self._writer.command(statement)
            for name in retired:
                self._writer.command(f"DROP TABLE IF EXISTS {name}")
            fill = self._create_derived(derived, cluster, database)
            self._find_unapplied()
            # a new table is filled from the events of applied records only; the embedded
            # store's process is its writer (a server's reader must not delete what its
            # writer is writing: there a cut write's rows are also in the new table)
            if fill and self._landed and dsn.startswith("chdb:"):
                self._delete_unapplied(list(self._landed))
            # (a new store's tables have no events to be filled from)
            empty = bool(fill) and not self._writer.query(
                "SELECT 1 FROM events LIMIT 1").result_rows
            for table, rebuild in fill:
                if rebuild or not empty:
                    self._fill(table, rebuild)
        except Exception as exc:
            self.close()
            raise StoreUnavailable(f"cannot create the store's tables: {first_line(exc)}") \
                from None

    def _create_derived(self, derived: Sequence[DerivedTable], cluster: str | None,
                        database: str) -> list[tuple[DerivedTable, bool]]:
        """Each derived table created, and :data:`SEQ` added to every appending table of an
        older version (all of them exist by then); the tables to be filled from the stored
        events (new ones: False) or made again (a table lacking columns: True), which the
        caller does once the unapplied records' rows are gone."""
        fill: list[tuple[DerivedTable, bool]] = []
        for table in derived:
            stored = table.name + (STATE if table.least else "")
            existed = bool(self._writer.command(f"EXISTS TABLE {stored}"))
            if existed and table.least is None and self._lacks_columns(table):
                if cluster is not None:  # not rebuilt on a cluster behind the operator's back
                    raise StoreUnavailable(
                        f"{table.name} was made by an older version of Tally and lacks "
                        "columns: rebuild it from the events (docs/alerts.md#rtp-drift)")
                fill.append((table, True))
                continue
            present = self._columns(stored) if existed and table.least is not None else set()
            if present and LEAST not in present:
                # a state table made before LEAST: the column added (the stored rows' value
                # computed from each state when read), then stored by one merge of its parts
                self._add_column([stored], least_column(table), cluster)
                self._writer.command(f"OPTIMIZE TABLE {stored} FINAL" if cluster is None else
                                     f"OPTIMIZE TABLE {stored}{LOCAL} ON CLUSTER '{cluster}' "
                                     "FINAL")
            if OLD_LEAST in present:  # the least ``by`` alone, of the version before LEAST
                self._drop_column([stored], OLD_LEAST, cluster)
            statements = derived_ddl(table)
            if cluster is not None:
                statements = on_cluster(statements, cluster, database)
            for statement in statements:
                self._writer.command(statement)
            if not existed:
                fill.append((table, False))
        numbered = {row[0] for row in self._writer.query(
            "SELECT table FROM system.columns WHERE database = currentDatabase() "
            "AND name = {seq:String}", parameters={"seq": SEQ}).result_rows}
        # made before rows named their record
        self._add_column(sorted(set(self._seq_tables) - numbered), SEQ_COLUMN, cluster)
        return fill

    def _add_column(self, tables: Sequence[str], column: str, cluster: str | None) -> None:
        """``column`` (its definition) added to ``tables`` where missing (on a cluster: to
        each shard's table and to the ``Distributed`` one)."""
        self._alter(tables, f"ADD COLUMN IF NOT EXISTS {column}", cluster)

    def _drop_column(self, tables: Sequence[str], name: str, cluster: str | None) -> None:
        """The column ``name`` dropped from ``tables`` where present (as :meth:`_add_column`)."""
        self._alter(tables, f"DROP COLUMN IF EXISTS {name}", cluster)

    def _alter(self, tables: Sequence[str], change: str, cluster: str | None) -> None:
        for table in tables:
            names = [table] if cluster is None else [f"{table}{LOCAL} ON CLUSTER '{cluster}'",
                                                     f"{table} ON CLUSTER '{cluster}'"]
            for name in names:
                self._writer.command(f"ALTER TABLE {name} {change}")

    def _fill(self, table: DerivedTable, rebuild: bool) -> None:
        if rebuild:
            self._rebuild(table)
        else:
            for sql in table.from_all:
                self._writer.command(derived_statement(sql, table))

    def _find_unapplied(self) -> None:
        """The applied record, and which rows of later records the store holds (a write that
        failed or was cut left them: module doc), by record, table and partition."""
        applied = self.journal_applied_seq()
        landed: dict[int, dict[str, dict[str, int]]] = {}
        for table in self._seq_tables:  # each has SEQ since the store opened
            for seq, partition, rows in self._writer.query(
                    f"SELECT {SEQ}, _partition_id, count() FROM {table} "  # noqa: S608
                    f"WHERE {SEQ} >= {{a:UInt64}} GROUP BY {SEQ}, _partition_id",
                    parameters={"a": (applied + 1) * PLACES}).result_rows:
                record, place = divmod(int(seq), PLACES)
                landed.setdefault(record, {}).setdefault(_place(table, place), {})[
                    partition] = rows
        self._applied, self._landed = applied, landed

    def pending_group(self) -> int | None:
        """The last record of the write a failure cut, if any of its rows are stored: the
        applier's first write ends there, so it holds the records of those rows."""
        return max(self._landed) if self._landed else None

    def _delete_unapplied(self, records: Sequence[int]) -> None:
        """Delete the rows of ``records`` (unapplied): only where a write holds other records
        than a cut one did (never the applier's, which replays the cut group as it was), or
        a new derived table is to be filled from the events. A lightweight ``DELETE`` is a
        mutation, whose file the engine writes without a sync: a crash right after it can
        leave the table unloadable, so it is never the path of a failing disk's retries."""
        log.warning("clickhouse: deleting the stored rows of unapplied records",
                    extra={"records": sorted(records)})
        for table in {t.split(":")[0] for record in records
                      for t in self._landed.get(record, {})}:
            target = table if self._cluster is None \
                else f"{table}{LOCAL} ON CLUSTER '{self._cluster}'"
            self._writer.command(f"DELETE FROM {target} "  # noqa: S608 - our names
                                 f"WHERE has({{r:Array(UInt64)}}, intDiv({SEQ}, {PLACES}))",
                                 parameters={"r": list(records)}, settings=DELETE_SYNC)
        self.make_durable()
        for record in records:
            self._landed.pop(record, None)

    def _lacks_columns(self, table: DerivedTable) -> bool:
        return not set(declared_columns(table.ddl)) <= self._columns(table.name)

    def _columns(self, table: str) -> set[str]:
        return {row[0] for row in self._writer.query(f"DESCRIBE TABLE {table}").result_rows}

    def _rebuild(self, table: DerivedTable) -> None:
        """A derived table made again from the stored events beside the old one, then
        swapped in (``EXCHANGE TABLES``, atomic): a crash leaves the old table, rebuilt again
        at the next open. How a store made before a measure was added gets it, exactly."""
        fresh = f"{table.name}_rebuild"
        self._writer.command(f"DROP TABLE IF EXISTS {fresh}")
        for statement in derived_ddl(table):
            self._writer.command(_renamed(statement, table.name, fresh))
        for sql in table.from_all:
            self._writer.command(_renamed(derived_statement(sql, table), table.name, fresh))
        self._writer.command(f"EXCHANGE TABLES {fresh} AND {table.name}")
        self._writer.command(f"DROP TABLE {fresh}")

    def _connect(self) -> Client:
        """A new client of the store (a session of its own), remembered to be closed."""
        if self._closed:
            raise StoreUnavailable("the ClickHouse store is closed")
        try:
            client = clickhouse_connect.get_client(dsn=self.dsn, settings=self._settings)
        except Exception as exc:  # the URL is not shown: it may hold a password
            raise StoreUnavailable(f"cannot open the ClickHouse store: {first_line(exc)}") \
                from None
        _storage_read_rows(client)
        with self._clients_lock:
            self._clients.append(client)
        return client

    def _bounds(self) -> dict[str, Any]:
        """The settings of :attr:`limits`, on every statement :meth:`execute` runs (the
        queries of requests)."""
        bounds: dict[str, Any] = {}
        if self.limits.timeout_seconds is not None:
            bounds["max_execution_time"] = self.limits.timeout_seconds
        if self.limits.memory_bytes is not None:
            bounds["max_memory_usage"] = self.limits.memory_bytes
        if self.limits.threads is not None:
            bounds["max_threads"] = self.limits.threads
        return bounds

    def _forget(self, client: Client) -> None:
        with self._clients_lock:
            if client in self._clients:
                self._clients.remove(client)
        client.close()

    # -- reads: one client per thread (a client runs one statement at a time) --------------
    def _client(self) -> Client:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._connect()
        return client

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A read that fails because the store does raises ``StoreUnavailable`` (a 503); one
        stopped by a bound of :attr:`limits`, the 503 naming the bound."""
        try:
            yield
        except Exception as exc:
            # a chDB client keeps what a failed query had written of its answer and puts it
            # before the next query's (an error, or an empty Arrow stream: measured): the
            # thread's next query gets a client of its own
            client = getattr(self._local, "client", None)
            if client is not None:
                self._local.client = None
                self._forget(client)
            code = getattr(exc, "code", None)
            if code == TIMEOUT_EXCEEDED and self.limits.timeout_seconds is not None:
                raise timed_out(self.limits) from None
            if code == MEMORY_LIMIT_EXCEEDED and self.limits.memory_bytes is not None:
                raise out_of_memory(self.limits, spills=False) from None
            if is_store_error(exc):
                raise StoreUnavailable(
                    f"the store cannot be used now: {first_line(exc)}") from exc
            raise

    @property
    def rows_scanned(self) -> int:
        return self._rows_scanned

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> pa.Table:
        """SQL text in ClickHouse's dialect; ``params`` named (``{name:Type}``, bound by the
        server) or positional (``%s``, bound by the driver)."""
        bound: Any = bind(params) if isinstance(params, dict) else (list(params) or None)
        with self._reading():
            return _as_duckdb(self._client().query_arrow(sql, parameters=bound))

    def execute(self, tree: exp.Expr, params: dict[str, Any]) -> pa.Table:
        """A sqlglot tree rendered in ClickHouse's dialect, its parameters bound by the
        server; the rows it reads (the query's summary, ``read_rows``) are charged to the
        current request's scan meter."""
        sql = render(tree, self.dialect)
        meter = current_meter.get()
        if meter is not None:
            meter.before_scan(lambda: self.estimate_rows(sql, params))
        with self._reading():
            table, rows = self._answer(sql, params)
        if not table.num_columns and isinstance(tree, exp.Query):
            # chDB says nothing of an empty result, not even its columns: the tree names them
            table = pa.table({name: pa.array([], pa.null()) for name in tree.named_selects})
        with self._scan_lock:
            self._rows_scanned += rows
        if meter is not None:
            meter.after_scan(rows)
        return table

    def _answer(self, sql: str, params: dict[str, Any]) -> tuple[pa.Table, int]:
        """A query's answer and the rows it read from storage, with :meth:`_bounds`. chDB:
        in Arrow, straight from the engine (its result holds both; the driver's Arrow call
        drops the summary, and its Native one builds Python objects of every value: 160 vs
        40 ms for 282K rows, measured); a server: the driver's Native answer and summary."""
        client = self._client()
        backend: Any = getattr(client, "_backend", None)
        if type(backend).__name__ != "ChdbBackend":
            result = client.query(sql, parameters=bind(params), settings=self._bounds())
            return _result_table(result), int(result.summary.get("read_rows", 0) or 0)
        final, bound = bind_query(sql, bind(params), client.server_tz)
        assert isinstance(final, str)
        settings = {**self._bounds(), "output_format_arrow_string_as_string": 1}
        clause = ", ".join(f"{name} = {_number(value)}" for name, value in settings.items())
        result = backend._run(f"{final}\n SETTINGS {clause}\n FORMAT Arrow", "Arrow",
                              params={k.removeprefix("param_"): v for k, v in bound.items()},
                              database=client.database)
        data = result.bytes()
        table = pa.ipc.open_file(pa.BufferReader(data)).read_all() if data else pa.table({})
        return _as_duckdb(table), int(result.storage_rows_read())

    def rows(self, tree: exp.Expr, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.execute(tree, params).to_pylist()
        return rows

    def estimate_rows(self, sql: str, params: dict[str, Any]) -> int:
        """The rows ``sql`` will read by ``EXPLAIN ESTIMATE`` (the parts and marks its
        MergeTree reads select, before running); where the engine cannot estimate a
        statement, every stored event (an upper bound of what a query of events reads)."""
        try:
            with self._reading():
                rows = self._client().query(f"EXPLAIN ESTIMATE {sql}",
                                            parameters=bind(params)).result_rows
            return sum(int(row[3]) for row in rows)
        except StoreUnavailable:
            raise
        except Exception:
            return self.count_events()

    def _scalar(self, sql: str, params: dict[str, Any] | None = None) -> Any:
        with self._reading():
            rows = self._client().query(sql, parameters=bind(params or {})).result_rows
        return rows[0][0] if rows else None

    def count_events(self) -> int:
        return int(self._scalar("SELECT count() FROM events"))

    def max_ingest_seq(self) -> int:
        return int(self._scalar("SELECT max(ingest_seq) FROM events"))

    def data_versions(self) -> pa.Table:
        table = self.query(
            "SELECT tenant_id, toDate32(occurred_at) AS day, max(ingest_seq) AS seq, "
            "max(occurred_at) AS latest FROM events GROUP BY tenant_id, day")
        return table.cast(pa.schema([
            pa.field("tenant_id", pa.string()), pa.field("day", pa.date32()),
            pa.field("seq", pa.int64()), pa.field("latest", pa.timestamp("us"))]))

    def event_keys(self, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
        """The keys through a client of their own (a stream holds its client)."""
        client = self._connect()
        try:
            with self._reading(), client.query_arrow_stream(
                    "SELECT id_hi, id_lo FROM events",
                    settings={"max_block_size": chunk_rows}) as stream:
                for block in stream:
                    for start in range(0, block.num_rows, chunk_rows):
                        part = block.slice(start, chunk_rows)
                        yield (np.asarray(part.column(0).to_numpy(zero_copy_only=False),
                                          dtype=np.int64),
                               np.asarray(part.column(1).to_numpy(zero_copy_only=False),
                                          dtype=np.int64))
        finally:
            self._forget(client)

    def idempotency(self, client_id: str, key: str) -> IdempotencyRecord | None:
        rows = self.query(
            "SELECT body_sha256, response, created_at FROM idempotency FINAL "
            "WHERE client_id = {c:String} AND key = {k:String} "
            "AND created_at >= {t:DateTime64(6)}",
            {"c": client_id, "k": key, "t": _now() - self.idempotency_ttl}).to_pylist()
        if not rows:
            return None
        row = rows[0]
        return IdempotencyRecord(client_id, key, row["body_sha256"], row["response"],
                                 row["created_at"])

    def quarantine(self, after_id: int, limit: int, brands: Sequence[str] | None = None,
                   regions: Sequence[str] | None = None) -> list[QuarantineItem]:
        # the scope is in the WHERE clause, so LIMIT counts only rows the caller may see; a
        # NULL brand or region is in no list
        where = ["id > {after:Int64}"]
        params: dict[str, Any] = {"after": after_id, "limit": limit}
        for column, values in (("tenant_id", brands), ("region", regions)):
            if values is not None:
                where.append(f"has({{{column}:Array(String)}}, {column})")
                params[column] = list(values)
        rows = self.query(
            f"SELECT id, {', '.join(QUARANTINE_SCHEMA.names)} FROM quarantine "  # noqa: S608
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT {{limit:UInt64}}", params)
        return [QuarantineItem(**row) for row in rows.to_pylist()]

    def setting(self, name: str) -> str | None:
        value = self._scalar("SELECT value FROM store_settings FINAL WHERE name = {n:String}",
                             {"n": name})
        return None if value is None else str(value)

    def put_setting(self, name: str, value: str) -> None:
        """Set ``name`` unless it is set (DuckDB: ``ON CONFLICT DO NOTHING``): checked under
        the write lock, so within the one process that writes."""
        with self._writing():
            if self.setting(name) is None:
                self._writer.insert("store_settings", [[name, value, 0]],
                                    column_names=["name", "value", "version"])

    def journal_applied_seq(self) -> int:
        return int(self.setting(JOURNAL_APPLIED) or 0)

    def defer_derived(self, defer: bool) -> None:
        """Nothing to defer: a batch's derived rows are inserted with it (``write``)."""

    def _synced(self) -> None:
        """The embedded engine's writes so far on disk, before a record is said applied: the
        kernel writes files back in no particular order, so after a power loss or an I/O
        error the setting that says a record is applied could survive the parts of that
        record or an earlier one, and a restart would not replay them (measured:
        tests/test_faults.py). A server keeps its own writes (nothing to do). Once a sync
        has failed, none is trusted again until the store is opened anew: the kernel reports
        a write-back error once, and what it dropped is not known (the journal keeps the
        records, replayed at the next start)."""
        if self._sync_failed is not None:
            raise StoreUnavailable(f"the store's files could not be synced ({self._sync_failed})"
                                   ": restart Tally once the disk is repaired")
        try:
            self.make_durable()
        except OSError as exc:
            self._sync_failed = str(exc)
            raise StoreUnavailable(f"the store's files cannot be synced: {exc}") from exc

    def make_durable(self) -> None:
        """The embedded engine's files synced (``syncfs`` of its folder's file system: an
        insert returns before its part is on disk). A server's writes are its own to keep
        (its replicas, its ``fsync_after_insert``): nothing to do from here."""
        if self._owner is not None:
            syncfs(self._owner)

    def drop_cached_blocks(self) -> None:
        """ClickHouse bounds its caches itself (mark and uncompressed caches)."""

    def fx_rates(self) -> list[tuple[date, str, str]]:
        rows = self.query(
            "SELECT toDate32(day) AS day, currency, rate FROM fx_rates").to_pylist()
        return [(row["day"], row["currency"], row["rate"]) for row in rows]

    def add_fx_rates(self, rows: list[tuple[date, str, str]]) -> None:
        """Insert new rates (the caller checked they are new); a duplicate key is refused
        (``WriteRejected``), as DuckDB's primary key refuses it."""
        if not rows:
            return
        with self._writing():
            stored = {(d, c) for d, c, _ in self.fx_rates()}
            keys = [(d, c) for d, c, _ in rows]
            if len(set(keys)) < len(keys) or stored & set(keys):
                raise WriteRejected("fx_rates: a rate of that day and currency is stored")
            self._writer.insert("fx_rates", [list(row) for row in rows],
                                column_names=["day", "currency", "rate"])

    def expire_idempotency(self) -> None:
        with self._writing():
            # a Distributed table takes no DELETE: its shards' tables do
            table = ("idempotency" if self._cluster is None
                     else f"idempotency{LOCAL} ON CLUSTER '{self._cluster}'")
            self._writer.command(
                f"DELETE FROM {table} WHERE created_at < {{t:DateTime64(6)}}",  # noqa: S608
                parameters={"t": _utc_text(_now() - self.idempotency_ttl)})

    # -- writes: one thread; each table one insert with the record's token ----------------
    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The write lock, and errors told apart: the store's (``StoreUnavailable``) or the
        rows' (``WriteRejected``)."""
        with self._write_lock:
            try:
                yield
            except (WriteRejected, StoreUnavailable):
                raise
            except Exception as exc:
                if is_store_error(exc):
                    raise StoreUnavailable(
                        f"the store cannot be used now: {first_line(exc)}") from exc
                raise WriteRejected(first_line(exc)) from exc

    def write(self, writes: WriteSet, journal_seq: int | None = None, *,
              dry_run: bool = False) -> None:
        """The one write path of ingestion (see ``Backend.write``), checked per journal
        record (module doc): what a cut try of this record left is not written again, rows
        of other unapplied records are deleted first (a caller that did not follow
        :meth:`pending_group`), and a record at or below the applied one is applied (nothing
        is written).
        ``dry_run``: the rows are inserted into temporary ``Memory`` tables of the same
        structure (this session's), which are emptied again."""
        with self._writing():
            if dry_run:
                self._dry_run(writes)
                return
            landed: dict[str, dict[str, int]] = {}
            if journal_seq is not None:
                if self._applied is None:
                    self._find_unapplied()
                assert self._applied is not None
                if journal_seq <= self._applied:
                    return
                others = [record for record in self._landed if record != journal_seq]
                if others:
                    self._delete_unapplied(others)
                landed = self._landed.get(journal_seq, {})
            applied, self._applied = self._applied, None  # until this write is whole
            self._append(writes, journal_seq, "", landed)
            if journal_seq is not None:
                self._applied, self._landed = journal_seq, {}
            else:
                self._applied = applied

    def _dry_run(self, writes: WriteSet) -> None:
        if not self._dry_tables:
            for name in ("events", "quarantine", "idempotency", "store_settings"):
                self._writer.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS _dry_{name} "
                                     f"AS {name} ENGINE = Memory")
            self._dry_tables = True
        try:
            self._append(writes, None, "_dry_")
        finally:
            for name in ("events", "quarantine", "idempotency", "store_settings"):
                self._writer.command(f"TRUNCATE TABLE _dry_{name}")

    def _append(self, writes: WriteSet, journal_seq: int | None, prefix: str,
                landed: dict[str, dict[str, int]] | None = None) -> None:
        """The write's inserts; ``landed``: the record's rows stored by a try a failure
        cut (by table and partition), not inserted again."""
        client, landed = self._writer, landed or {}
        if writes.events:
            batch = pa.concat_tables(writes.events)
            if prefix:
                client.insert_arrow(prefix + "events", batch)
            else:
                self._insert("events", batch, journal_seq, landed)
                self._append_derived(journal_seq, landed)
        if writes.quarantine:
            # by name: a journal record written before a column was added replays with that
            # column NULL
            table = pa.concat_tables(writes.quarantine, promote_options="default")
            if table.num_rows > QUARANTINE_ROWS:
                raise WriteRejected(f"more than {QUARANTINE_ROWS} quarantine entries in one "
                                    "journal record")
            first = (journal_seq * QUARANTINE_ROWS if journal_seq is not None
                     else self._next_quarantine_id())
            ids = pa.array(np.arange(first, first + table.num_rows, dtype=np.int64))
            table = table.add_column(0, "id", ids)
            if prefix:
                client.insert_arrow(prefix + "quarantine", table)
            else:
                self._insert("quarantine", table, journal_seq, landed)
        if writes.idempotency:
            records = pa.table({
                "client_id": [r.client_id for r in writes.idempotency],
                "key": [r.key for r in writes.idempotency],
                "body_sha256": [r.body_sha256 for r in writes.idempotency],
                "response": [r.response for r in writes.idempotency],
                "created_at": pa.array([r.created_at.replace(tzinfo=None)
                                        for r in writes.idempotency], pa.timestamp("us")),
            })
            # no token of its own: a block of the same rows again is the same records
            client.insert_arrow(prefix + "idempotency", records)
        if journal_seq is not None:  # last: the record is applied when all of it is
            if not prefix:
                self._synced()
            client.insert(prefix + "store_settings",  # (the same row again is the same)
                          [[JOURNAL_APPLIED, str(journal_seq), journal_seq]],
                          column_names=["name", "value", "version"])

    def _insert(self, table: str, rows: pa.Table, journal_seq: int | None,
                landed: dict[str, dict[str, int]]) -> None:
        """Append ``rows`` to ``table``, each naming record ``journal_seq`` (:data:`SEQ`, 0:
        none), but for the partitions where a cut try's rows landed (``landed``): through
        the writer's temporary ``_new_<table>`` (the events' is also what the derived
        tables' statements read)."""
        client, staged = self._writer, f"_new_{table}"
        if staged not in self._staged:
            client.command(f"CREATE TEMPORARY TABLE IF NOT EXISTS {staged} AS {table} "
                           "ENGINE = Memory")
            self._staged.add(staged)
        client.command(f"TRUNCATE TABLE {staged}")
        client.insert_arrow(staged, rows)
        where = ""
        params: dict[str, Any] = {SEQ: (journal_seq or 0) * PLACES}
        place = _place(table, 0)
        if place in landed:
            partition = PARTITIONS.get(table)
            if partition is None:  # one part: it landed whole
                return
            mine = {str(p): int(n) for p, n in client.query(
                f"SELECT toString({partition}), count() FROM {staged} "  # noqa: S608
                "GROUP BY 1").result_rows}
            if all(mine.get(p) == n for p, n in landed[place].items()):
                where = f" WHERE toString({partition}) NOT IN {{landed:Array(String)}}"
                params["landed"] = list(landed[place])
            else:  # a partition's rows landed in part (never: one part a partition)
                assert journal_seq is not None
                self._delete_unapplied([journal_seq])
                landed.clear()  # so every table of the record is written
        names = ", ".join(rows.column_names)
        client.command(f"INSERT INTO {table} ({names}, {SEQ}){_insert_settings(table)} "  # noqa: S608
                       f"SELECT {names}, {SEQ_PARAM} FROM {staged}{where}", parameters=params)

    def _append_derived(self, journal_seq: int | None,
                        landed: dict[str, dict[str, int]]) -> None:
        """The derived tables' rows of a batch, by the statements DuckDB runs in the events'
        transaction, over the batch in the writer's temporary ``_new_events``, each row
        naming the batch's record (:data:`SEQ`); a table a cut try's rows landed in (one
        part: whole) is not inserted into again."""
        for place, (target, rows), numbered in self._derived:
            if target is None:
                self._writer.command(rows)
            elif place not in landed:
                number = int(place.rsplit(":", 1)[1])
                self._writer.command(f"{target}{_insert_settings(place)} {rows}",
                                     parameters={SEQ: (journal_seq or 0) * PLACES + number}
                                     if numbered else None)

    def _next_quarantine_id(self) -> int:
        rows = self._writer.query("SELECT max(id) FROM quarantine").result_rows
        return int(rows[0][0] or 0) + 1

    def close(self) -> None:
        """Close every client (chDB lets a process open another path only then), then give
        up the folder."""
        self._closed = True
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: S110 - closing a failed client: nothing to flush
                pass
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None


def as_backend(store: ClickHouseBackend) -> Backend:
    """The store as the protocol (and mypy's proof that it implements it)."""
    return store


def _storage_read_rows(client: Client) -> None:
    """Have a chDB client's query summary say, as a server's does, the rows the query read
    from storage (``read_rows``). clickhouse-connect 1.12 fills it from chDB's
    ``rows_read()``, which counts the rows of the result; chDB's ``storage_rows_read()`` is the
    server's ``read_rows``. Done on the client's engine handle, so only while it says so."""
    backend = getattr(client, "_backend", None)
    summary = getattr(backend, "_summary", None)
    if type(backend).__name__ != "ChdbBackend" or summary is None:
        return  # a server: its X-ClickHouse-Summary is the storage's already

    def storage_summary(result: Any) -> dict[str, Any]:
        found: dict[str, Any] = summary(result)
        try:
            found["read_rows"] = str(result.storage_rows_read())
        except Exception:  # noqa: S110 - an older chDB: the driver's count stands
            pass
        return found

    backend._summary = storage_summary  # type: ignore[union-attr]


def _renamed(statement: str, name: str, to: str) -> str:
    """A table's statement (its ``CREATE`` or ``INSERT INTO``) naming table ``to`` instead:
    the first mention of ``name`` is the table's own."""
    return re.sub(rf"\b{re.escape(name)}\b", to, statement, count=1)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# the Arrow type of each ClickHouse type a query of Tally's returns
_ARROW_TYPES: dict[str, pa.DataType] = {
    "Int8": pa.int8(), "Int16": pa.int16(), "Int32": pa.int32(), "Int64": pa.int64(),
    "UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(),
    "Int128": pa.decimal128(38, 0), "UInt128": pa.decimal128(38, 0),
    "Float32": pa.float32(), "Float64": pa.float64(), "String": pa.string(),
    "Bool": pa.bool_(), "Date": pa.date32(), "Date32": pa.date32(),
    "DateTime": pa.timestamp("s"), "DateTime64(6)": pa.timestamp("us"),
    "DateTime64(3)": pa.timestamp("ms"),
}


def _result_table(result: Any) -> pa.Table:
    """A query's result (the driver's columns, read with its summary) as an Arrow table of
    the types DuckDB answers with: an ``Int128`` a ``decimal128(38, 0)``, timestamps naive."""
    columns = result.result_columns if result.column_names else []
    arrays = []
    for i, ch_type in enumerate(result.column_types):
        name = ch_type.name
        if name.startswith("Nullable(") or name.startswith("LowCardinality("):
            name = name[name.index("(") + 1:-1]
            if name.startswith("Nullable("):
                name = name[len("Nullable("):-1]
        if name.startswith("DateTime64(6"):  # with or without a time zone
            name = "DateTime64(6)"
        elif name.startswith("DateTime("):
            name = "DateTime"
        kind = _ARROW_TYPES.get(name)
        values = list(columns[i]) if columns else []
        if kind is not None and pa.types.is_decimal(kind):
            values = [None if v is None else Decimal(v) for v in values]
        if kind is not None and pa.types.is_timestamp(kind):
            values = [v.astimezone(UTC).replace(tzinfo=None)
                      if isinstance(v, datetime) and v.tzinfo else v for v in values]
        arrays.append(pa.array(values, kind))
    return pa.Table.from_arrays(arrays, names=list(result.column_names))

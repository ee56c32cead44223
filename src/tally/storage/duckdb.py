"""The embedded DuckDB backend: one file, one writing process, many reading threads."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from tally.errors import StoreUnavailable, WriteRejected
from tally.storage.base import (
    DERIVED_PENDING,
    Compaction,
    DerivedTable,
    IdempotencyRecord,
    QuarantineItem,
    WriteSet,
    declared_columns,
)
from tally.storage.dialects import render
from tally.storage.limits import QueryLimits, bounded
from tally.storage.metering import current_meter
from tally.storage.schema import EVENTS_SCHEMA, QUARANTINE_SCHEMA, duckdb_columns

DDL = f"""
CREATE TABLE IF NOT EXISTS events (
  {duckdb_columns(EVENTS_SCHEMA)}
);
CREATE SEQUENCE IF NOT EXISTS quarantine_seq;
CREATE TABLE IF NOT EXISTS quarantine (
  id BIGINT PRIMARY KEY DEFAULT nextval('quarantine_seq'),
  {duckdb_columns(QUARANTINE_SCHEMA)}
);
CREATE TABLE IF NOT EXISTS idempotency (
  client_id VARCHAR NOT NULL,
  key VARCHAR NOT NULL,
  body_sha256 VARCHAR NOT NULL,
  response VARCHAR NOT NULL,
  created_at TIMESTAMP NOT NULL,
  PRIMARY KEY (client_id, key)
);
CREATE TABLE IF NOT EXISTS fx_rates (
  day DATE NOT NULL,
  currency VARCHAR NOT NULL,
  rate VARCHAR NOT NULL,
  created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
  PRIMARY KEY (day, currency)
);
CREATE TABLE IF NOT EXISTS store_settings (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
"""

QUARANTINE_COLUMNS = ", ".join(QUARANTINE_SCHEMA.names)
# Columns the quarantine gained after its first release, each with how to back-fill it from
# the stored event: the JSON string at that path, NULL when the text is not JSON or the member
# is absent or not a string (as ``ingest.batch.quarantine_table`` decides for new rows).
QUARANTINE_ADDED = ("tenant_id", "region")
_STRING_MEMBER = ("try(CASE WHEN json_type(event, '$.{0}') = 'VARCHAR' "
                  "THEN json_extract_string(event, '$.{0}') END)")
T = TypeVar("T")
ROWS_SCANNED_METRIC = "query.total_rows_scanned"
JOURNAL_APPLIED = "journal_applied_seq"
CATCH_UP_ROWS = 5_000_000  # events a catch-up transaction derives
# the store setting of a compacted table: the end (exclusive) of the buckets rewritten so far
COMPACTED = "compacted:"
MERGED = "merged:"  # Compaction.merge_every: the bucket up to which compactions were merged
EPOCH = datetime(1970, 1, 1)
log = logging.getLogger(__name__)
# The WAL size that triggers an automatic checkpoint (DuckDB's default: 16 MB). A checkpoint
# rewrites the row groups every derived table's merge touched since the last one; at 16 MB the
# applier checkpointed at nearly every 100k-row group, and commits were ~60% of its time. At
# 256 MB writes are 1.7-1.9x faster, with 35-40% less CPU per row, final checkpoint included
# (docs/benchmarks.md, bulk load); the cost is a longer WAL to replay after a crash (seconds).
CHECKPOINT_THRESHOLD = "256MB"
EVICTION_LIMIT = "64MB"  # the buffer pool's size for a moment, to drop what a scan cached
# errors of the store itself (I/O, a full or read-only disk, memory, a database invalidated by
# a failed checkpoint, an interrupt), as opposed to errors of the rows being written
STORE_ERRORS = (duckdb.OperationalError, duckdb.FatalException, duckdb.PermissionException,
                duckdb.InterruptException, OSError)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class DuckDBBackend:
    """Events in ``DIR/events.duckdb``. Writes come from one thread (the ingest writer)."""

    dialect = "duckdb"

    def __init__(self, data_dir: Path, *, read_only: bool = False,
                 idempotency_ttl: timedelta = timedelta(hours=24),
                 derived: Sequence[DerivedTable] = (), retired: Sequence[str] = (),
                 limits: QueryLimits | None = None, spill_dir: Path | None = None) -> None:
        """``derived``: tables kept from the events (the rollups); ``retired``: derived tables
        of earlier versions, dropped when found; ``limits``: bounds on every read statement
        (memory and spill are the whole engine's), spilling into ``spill_dir``."""
        self.path = data_dir / "events.duckdb"
        self.idempotency_ttl = idempotency_ttl
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise StoreUnavailable(f"no Tally store at {self.path}")
        self.limits = limits or QueryLimits()
        self._spill_dir = spill_dir
        self._con = self._connect()
        # a failed checkpoint (a full disk) invalidates a DuckDB database until it is opened
        # again: _invalid marks that, and every cursor of an older generation is replaced
        self._invalid = False
        self._generation = 0
        self._derived = [sql for table in derived for sql in table.from_batch]
        # (table, compaction, [events written since, newest bucket written, compactions since
        # the last merge]) of each table rewritten now and then (DerivedTable.compaction)
        self._compactions = [(table.name, table.compaction, [0, 0, 0]) for table in derived
                             if table.compaction is not None]
        if not read_only:
            self._con.execute(DDL)
            self._migrate_quarantine()
            for name in retired:
                self._con.execute(f"DROP TABLE IF EXISTS {name}")
            self._create_derived(derived)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self.rows_scanned = 0  # by execute(), since the store was opened
        self._defer = False
        self._pending: tuple[int, int] | None = None
        if not read_only:
            for name, compaction, _ in self._compactions:
                # a store without the mark: its rows so far count as compacted (a new table
                # is filled from the events in a few large statements)
                if self.setting(COMPACTED + name) is None:
                    newest = self._scalar(f"SELECT max({compaction.column}) FROM {name}")  # noqa: S608
                    self.put_setting(COMPACTED + name, str(0 if newest is None else int(newest)))
                if self.setting(MERGED + name) is None:  # merges start from here (no store's
                    # whole table rewritten in one write)
                    self.put_setting(MERGED + name, self.setting(COMPACTED + name) or "0")
            pending = self.setting(DERIVED_PENDING)
            if pending is not None:  # a bulk load stopped before its catch-up: finish it
                first, last = pending.split(",")
                self._pending = (int(first), int(last))
                self.catch_up_derived()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A connection to the store with the engine's bounds set (again after a reopen)."""
        try:
            con = duckdb.connect(str(self.path), read_only=self.read_only)
            self._apply_limits(con)
            return con
        except duckdb.Error as exc:
            if "lock" in str(exc).lower():
                raise StoreUnavailable(
                    f"store {self.path} is in use by another process (is `tally serve` "
                    f"running on this data dir?): {first_line(exc)}"
                ) from None
            raise StoreUnavailable(f"cannot open store {self.path}: {first_line(exc)}") from None

    def _migrate_quarantine(self) -> None:
        """The additive migration of a store made before :data:`QUARANTINE_ADDED`: add the
        columns and back-fill them from the stored events, in one transaction (a crash leaves
        the old table, and the next open migrates again)."""
        present = {row[0] for row in self._con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'quarantine'"
        ).fetchall()}
        missing = [name for name in QUARANTINE_ADDED if name not in present]
        if not missing:
            return
        self._con.execute("BEGIN TRANSACTION")
        try:
            for name in missing:
                self._con.execute(f"ALTER TABLE quarantine ADD COLUMN {name} VARCHAR")
                self._con.execute(f"UPDATE quarantine SET {name} = "  # noqa: S608 - constants
                                  + _STRING_MEMBER.format(name))
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    def _create_derived(self, derived: Sequence[DerivedTable]) -> None:
        stored: dict[str, dict[str, str]] = defaultdict(dict)  # table → column → type
        for name, column, kind in self._con.execute(
                "SELECT table_name, column_name, data_type FROM duckdb_columns() "
                "WHERE NOT internal").fetchall():
            stored[name][column] = kind
        empty = not self._con.execute("SELECT 1 FROM events LIMIT 1").fetchall()
        for table in derived:
            present = stored.get(table.name, {})
            if present and not set(declared_columns(table.ddl)) <= present.keys():
                self._rebuild(table)  # a newer version declares more columns (measures)
                continue
            self._con.execute(table.ddl)
            if not present and not empty:  # a new derived table over stored events: filled
                for sql in table.from_all:
                    self._con.execute(sql)
            self._widen(table, present)

    def _rebuild(self, table: DerivedTable) -> None:
        """A derived table made again from the stored events, in one transaction (a crash
        leaves the old table, and the next open rebuilds again): how a store made before a
        measure was added gets it, exactly (a sum of squares cannot be derived from sums)."""
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute(f"DROP TABLE {table.name}")
            self._con.execute(table.ddl)
            for sql in table.from_all:
                self._con.execute(sql)
            self._con.execute("COMMIT")
        except BaseException:
            self._con.execute("ROLLBACK")
            raise

    def _widen(self, table: DerivedTable, stored: dict[str, str]) -> None:
        """Columns an older version created narrower (money sums were BIGINT before they
        were HUGEINT) get their declared type; once, since the type is checked first
        (``stored``: the table's column types as found, empty for a table just made)."""
        for column, kind in table.column_types:
            if column in stored and stored[column] != kind:
                self._con.execute(
                    f"ALTER TABLE {table.name} ALTER {column} SET DATA TYPE {kind}")

    def _live(self) -> duckdb.DuckDBPyConnection:
        """The connection, opened again first if a fatal error invalidated the database."""
        if self._invalid:
            with self._write_lock:
                if self._invalid:
                    try:
                        self._con.close()
                    except duckdb.Error:
                        pass
                    self._con = self._connect()
                    self._generation += 1
                    self._invalid = False
        return self._con

    def _failed(self, exc: BaseException, generation: int) -> BaseException:
        """What a DuckDB error means to callers: the store failing (``StoreUnavailable``;
        a fatal one on the current connection is remembered, so the next use opens the
        database again) or the rows (``WriteRejected``)."""
        if isinstance(exc, duckdb.FatalException | duckdb.ConnectionException) \
                and generation == self._generation:
            self._invalid = True
        if isinstance(exc, STORE_ERRORS):
            return StoreUnavailable(f"the store cannot be used now: {first_line(exc)}")
        return WriteRejected(first_line(exc))

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A read that fails because the store does (I/O, an invalidated database) raises
        ``StoreUnavailable`` (a 503), and a fatal error has the next use reopen the store."""
        generation = self._generation
        try:
            yield
        except STORE_ERRORS as exc:
            raise self._failed(exc, generation) from exc

    def _apply_limits(self, con: duckdb.DuckDBPyConnection) -> None:
        """The engine's memory and spill bounds and its checkpoint threshold (settings of the
        database: every cursor), and no progress bar: a long statement (a derived table
        filled when a store is opened) would draw one on stderr, among the JSON log lines."""
        con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_THRESHOLD}'")
        con.execute("SET enable_progress_bar = false")
        if self.limits.memory_bytes is not None:
            con.execute(f"SET memory_limit = '{int(self.limits.memory_bytes)}B'")
        if self._spill_dir is not None:
            con.execute("SET temp_directory = ?", [str(self._spill_dir)])
        if self.limits.spill_bytes is not None:
            con.execute(f"SET max_temp_directory_size = '{int(self.limits.spill_bytes)}B'")
        if self.limits.threads is not None:
            con.execute(f"SET threads = {int(self.limits.threads)}")

    # -- reads: one cursor per thread, so readers never share a connection -----------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        con = self._live()
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None or self._local.generation != self._generation:
            cur = con.cursor()
            self._local.cursor, self._local.generation = cur, self._generation
            self._local.profiled = None
        return cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """The store's own reads (the data versions at start-up): no statement timeout, which
        bounds the queries of requests (:meth:`execute`), not start-up on a large store."""
        with self._reading():
            rel = self._cursor().sql(sql, params=list(params))
            assert rel is not None, "query() is for statements that return rows"
            return rel.to_arrow_table()

    def execute(self, tree: exp.Expr, params: dict[str, Any]) -> pa.Table:
        """A sqlglot tree rendered in DuckDB's dialect, with named bound parameters. The rows
        it scans (DuckDB's profiler) are charged to the current request's scan meter."""
        def arrow(cur: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
            rel = cur.sql(sql, params=params)
            assert rel is not None, "execute() is for queries that return rows"
            return rel.to_arrow_table()

        return self._metered(tree, params, arrow)

    def rows(self, tree: exp.Expr, params: dict[str, Any]) -> list[dict[str, Any]]:
        """:meth:`execute` as Python rows, by the DB-API cursor: no Arrow table, and not
        DuckDB's relation layer, which parses and binds again in Python (~1 ms of a 3 ms
        small answer, measured)."""
        def fetched(cur: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
            cur.execute(sql, params)
            names = [column[0] for column in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

        return self._metered(tree, params, fetched)

    def _metered(self, tree: exp.Expr, params: dict[str, Any],
                 fetch: Callable[[duckdb.DuckDBPyConnection, str], T]) -> T:
        sql = render(tree, self.dialect)
        meter = current_meter.get()
        if meter is not None:
            meter.before_scan(lambda: self.estimate_rows(sql, params))
        with self._reading():
            cur = self._profiled_cursor()
            with bounded(cur, self.limits):  # TALLY_QUERY_TIMEOUT_SECONDS, memory: a 503
                answer = fetch(cur, sql)
            rows = profiled_rows_scanned(cur.get_profiling_information(format="json"))
        with self._scan_lock:
            self.rows_scanned += rows
        if meter is not None:
            meter.after_scan(rows)
        return answer

    def _profiled_cursor(self) -> duckdb.DuckDBPyConnection:
        """The thread's cursor for :meth:`execute`: profiled, tracking only the rows scanned
        (a few microseconds a statement), so each statement's count can be read back."""
        self._cursor()  # the thread's generation is current
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "profiled", None)
        if cur is None:
            cur = self._con.cursor()
            cur.execute("PRAGMA enable_profiling = 'no_output'")
            cur.execute(f"SET tracked_metrics = ['{ROWS_SCANNED_METRIC}']")
            self._local.profiled = cur
        return cur

    def estimate_rows(self, sql: str, params: dict[str, Any]) -> int:
        """The planner's estimate, before running, of the rows ``sql`` will read: the sum of
        the estimated cardinality of its table scans (``EXPLAIN``; one planning pass)."""
        rel = self._cursor().sql(f"EXPLAIN (FORMAT json) {sql}", params=params)
        assert rel is not None
        return sum(estimated_scan_rows(json.loads(plan)) for _, plan in rel.fetchall())

    def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._reading():
            rows = self._cursor().execute(sql, list(params)).fetchall()
        return rows[0][0] if rows else None

    def count_events(self) -> int:
        return int(self._scalar("SELECT count(*) FROM events"))

    def max_ingest_seq(self) -> int:
        return int(self._scalar("SELECT coalesce(max(ingest_seq), 0) FROM events"))

    def data_versions(self) -> pa.Table:
        return self.query(
            "SELECT tenant_id, CAST(occurred_at AS DATE) AS day, max(ingest_seq) AS seq, "
            "max(occurred_at) AS latest FROM events GROUP BY ALL")

    def event_keys(self, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
        cur = self._con.cursor()
        rel = cur.sql("SELECT id_hi, id_lo FROM events")
        assert rel is not None
        reader = rel.to_arrow_reader(chunk_rows)
        for batch in reader:
            yield (batch.column(0).to_numpy(zero_copy_only=False),
                   batch.column(1).to_numpy(zero_copy_only=False))

    def drop_cached_blocks(self) -> None:
        """DuckDB keeps every block it read until its memory limit; the start-up scans
        (every event's key, the data versions) cached 2.3 GB of a server's 4.4 GB after start
        at 100M events. Evicted by lowering the limit for a moment, then putting it back (the
        settings' bytes, or the engine's default); nothing is lost if it cannot get that low:
        the blocks are a cache."""
        cur = self._con.cursor()
        try:
            try:
                cur.execute(f"SET memory_limit = '{EVICTION_LIMIT}'")
            except duckdb.Error:
                pass
            finally:
                cur.execute("RESET memory_limit" if self.limits.memory_bytes is None
                            else f"SET memory_limit = '{int(self.limits.memory_bytes)}B'")
        finally:
            cur.close()

    def idempotency(self, client_id: str, key: str) -> IdempotencyRecord | None:
        rows = self._cursor().execute(
            "SELECT body_sha256, response, created_at FROM idempotency "
            "WHERE client_id = ? AND key = ? AND created_at >= ?",
            [client_id, key, datetime.now(UTC).replace(tzinfo=None) - self.idempotency_ttl],
        ).fetchall()
        if not rows:
            return None
        row = rows[0]
        return IdempotencyRecord(client_id, key, row[0], row[1], row[2])

    def quarantine(self, after_id: int, limit: int, brands: Sequence[str] | None = None,
                   regions: Sequence[str] | None = None) -> list[QuarantineItem]:
        # the scope is in the WHERE clause, so LIMIT counts only rows the caller may see and
        # a page is full whenever more such rows exist; a NULL brand or region never matches
        where: list[str] = ["id > ?"]
        params: list[Any] = [after_id]
        for column, values in (("tenant_id", brands), ("region", regions)):
            if values is not None:
                where.append(f"list_contains(?, {column})")
                params.append(list(values))
        rows = self._cursor().execute(
            f"SELECT id, {QUARANTINE_COLUMNS} FROM quarantine "  # noqa: S608 - constant names
            f"WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            [*params, limit],
        ).fetchall()
        return [QuarantineItem(*row) for row in rows]

    def setting(self, name: str) -> str | None:
        value = self._scalar("SELECT value FROM store_settings WHERE name = ?", [name])
        return None if value is None else str(value)

    def put_setting(self, name: str, value: str) -> None:
        self._transaction(lambda con: con.execute(
            "INSERT INTO store_settings VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            [name, value]))

    # -- writes: one transaction each, errors told apart (the store's or the rows') --------
    def _transaction(self, body: Callable[[duckdb.DuckDBPyConnection], object],
                     dry_run: bool = False) -> None:
        con = self._live()
        with self._write_lock:
            generation = self._generation if con is self._con else -1
            try:
                con.execute("BEGIN TRANSACTION")
                body(con)
                con.execute("ROLLBACK" if dry_run else "COMMIT")
            except Exception as exc:
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass  # a failed COMMIT already ended the transaction
                raise self._failed(exc, generation) from exc

    def write(self, writes: WriteSet, journal_seq: int | None = None, *,
              dry_run: bool = False) -> None:
        """The one write path of ingestion (see ``Backend.write``); every table of a kind is
        appended by one statement, so many small batches cost what one large one does."""
        if self._pending is not None and not self._defer and not dry_run:
            self.catch_up_derived()  # derived rows are made in ingest_seq order
        pending: list[tuple[int, int]] = []
        self._transaction(lambda con: self._append(con, writes, journal_seq, dry_run, pending),
                          dry_run)
        if pending and not dry_run:
            self._pending = pending[-1]

    def _compact(self, con: duckdb.DuckDBPyConnection, events: pa.Table) -> None:
        """Rewrite the buckets of each compacted table from the last mark up to the newest
        bucket written, once enough events were written since, and every ``merge_every``
        times those since the last merge (DerivedTable.compaction), in the write's
        transaction."""
        newest_at = pc.max(events.column("occurred_at")).as_py()
        for name, compaction, state in self._compactions:
            state[0] += events.num_rows
            if newest_at is not None:
                seconds = int((newest_at - EPOCH).total_seconds())
                state[1] = max(state[1], seconds // compaction.bucket_seconds)
            if state[0] < compaction.events:
                continue
            first, end = self._mark(con, COMPACTED + name), state[1]
            if end <= first:
                continue
            self._rewrite(con, compaction, COMPACTED + name, first, end)
            state[0] = 0
            state[2] += 1
            if state[2] >= compaction.merge_every:
                merged = self._mark(con, MERGED + name)
                if merged < end:
                    self._rewrite(con, compaction, MERGED + name, merged, end)
                state[2] = 0

    @staticmethod
    def _mark(con: duckdb.DuckDBPyConnection, name: str) -> int:
        rows = con.execute("SELECT value FROM store_settings WHERE name = ?", [name]).fetchall()
        return int(rows[0][0]) if rows else 0

    @staticmethod
    def _rewrite(con: duckdb.DuckDBPyConnection, compaction: Compaction, mark: str,
                 first: int, end: int) -> None:
        """The buckets ``[first, end)`` rewritten by the compaction's statements; ``mark``
        (a setting) moved to ``end``."""
        for sql in compaction.statements:
            con.execute(sql, {"first": first, "end": end} if "$first" in sql else None)
        con.execute("INSERT OR REPLACE INTO store_settings VALUES (?, ?)", [mark, str(end)])

    def defer_derived(self, defer: bool) -> None:
        """While deferred (a bulk load), a write appends its events and leaves their derived
        rows for :meth:`catch_up_derived`, which makes them in a few large transactions: a
        derived table's merge costs per write, and a checkpoint rewrites what it touched.
        The range left is recorded in each write's transaction, so a load killed before its
        catch-up is caught up when the store is opened next; ending the deferral catches up."""
        self._defer = defer
        if not defer:
            self.catch_up_derived()

    def catch_up_derived(self) -> None:
        """Make the derived rows of the events written while deferred, in ingest_seq order,
        :data:`CATCH_UP_ROWS` events a transaction (each records how far it got)."""
        if self._pending is None:
            return
        first, last = self._pending
        counts = self._cursor().execute(
            "SELECT ingest_seq, count(*) FROM events WHERE ingest_seq BETWEEN ? AND ? "
            "GROUP BY ingest_seq ORDER BY ingest_seq", [first, last]).fetchall()
        chunks: list[tuple[int, int]] = []
        start, rows = None, 0
        for seq, n in counts:
            start = seq if start is None else start
            rows += n
            if rows >= CATCH_UP_ROWS:
                chunks.append((start, seq))
                start, rows = None, 0
        if start is not None:
            chunks.append((start, counts[-1][0]))
        started = time.perf_counter()
        log.info("deriving the rollups of a bulk load",
                 extra={"events": sum(n for _, n in counts), "transactions": len(chunks)})
        for a, b in chunks:
            def derive(con: duckdb.DuckDBPyConnection, a: int = a, b: int = b) -> None:
                con.execute(  # a view cannot take parameters; a and b are ints
                    "CREATE OR REPLACE TEMPORARY VIEW _new_events AS SELECT * FROM events "  # noqa: S608
                    f"WHERE ingest_seq BETWEEN {int(a)} AND {int(b)}")
                for sql in self._derived:
                    con.execute(sql)
                con.execute("DROP VIEW _new_events")
                if b >= last:
                    con.execute("DELETE FROM store_settings WHERE name = ?", [DERIVED_PENDING])
                else:
                    con.execute("INSERT OR REPLACE INTO store_settings VALUES (?, ?)",
                                [DERIVED_PENDING, f"{b + 1},{last}"])
            self._transaction(derive)
            self._pending = None if b >= last else (b + 1, last)
        self._pending = None
        for name, compaction, state in self._compactions:
            # a bulk load's rows come a few large statements apiece: counted as compacted
            def mark(con: duckdb.DuckDBPyConnection, name: str = name,
                     column: str = compaction.column) -> None:
                for setting in (COMPACTED + name, MERGED + name):
                    con.execute(
                        "INSERT OR REPLACE INTO store_settings SELECT ?, "  # noqa: S608 - ours
                        f"CAST(coalesce(max({column}), 0) AS VARCHAR) FROM {name}",
                        [setting])
            self._transaction(mark)
            state[0] = state[2] = 0
        log.info("derived the rollups of a bulk load",
                 extra={"seconds": round(time.perf_counter() - started, 1)})

    def _append(self, con: duckdb.DuckDBPyConnection, writes: WriteSet,
                journal_seq: int | None, dry_run: bool = False,
                pending: list[tuple[int, int]] | None = None) -> None:
        if journal_seq is not None and not dry_run and journal_seq <= int(con.execute(
                "SELECT coalesce(max(value::BIGINT), 0) FROM store_settings WHERE name = ?",
                [JOURNAL_APPLIED]).fetchall()[0][0]):
            return  # applied: nothing is written again (Backend.write)
        if writes.events:
            events = pa.concat_tables(writes.events)
            con.register("_new_events", events)
            con.execute("INSERT INTO events SELECT * FROM _new_events")
            if self._defer and not dry_run:  # derived later: say which rows are left
                seq = pc.min_max(events.column("ingest_seq")).as_py()
                first, last = self._pending or (seq["min"], seq["max"])
                left = (min(first, seq["min"]), max(last, seq["max"]))
                con.execute("INSERT OR REPLACE INTO store_settings VALUES (?, ?)",
                            [DERIVED_PENDING, f"{left[0]},{left[1]}"])
                if pending is not None:
                    pending.append(left)
            else:
                for sql in self._derived:  # rollups, in the same transaction
                    con.execute(sql)
                if not dry_run:
                    self._compact(con, events)
            con.unregister("_new_events")
        if writes.quarantine:
            con.register("_new_quarantine",
                         pa.concat_tables(writes.quarantine, promote_options="default"))
            con.execute(
                # by name: a journal record written before a column was added replays with
                # that column NULL instead of failing to apply
                "INSERT INTO quarantine BY NAME SELECT * FROM _new_quarantine"
            )
            con.unregister("_new_quarantine")
        if writes.idempotency:
            con.executemany(
                "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                [[r.client_id, r.key, r.body_sha256, r.response, r.created_at]
                 for r in writes.idempotency],
            )
        if journal_seq is not None:
            con.execute("INSERT OR REPLACE INTO store_settings VALUES (?, ?)",
                        [JOURNAL_APPLIED, str(journal_seq)])

    def expire_idempotency(self) -> None:
        self._transaction(lambda con: con.execute(
            "DELETE FROM idempotency WHERE created_at < ?",
            [datetime.now(UTC).replace(tzinfo=None) - self.idempotency_ttl]))

    def fx_rates(self) -> list[tuple[date, str, str]]:
        rows = self._cursor().execute("SELECT day, currency, rate FROM fx_rates").fetchall()
        return [(day, currency, rate) for day, currency, rate in rows]

    def add_fx_rates(self, rows: list[tuple[date, str, str]]) -> None:
        """Insert new rates (the caller checked they are new); a duplicate key fails."""
        if rows:
            self._transaction(lambda con: con.executemany(
                "INSERT INTO fx_rates (day, currency, rate) VALUES (?, ?, ?)",
                [list(row) for row in rows]))

    def journal_applied_seq(self) -> int:
        return int(self.setting(JOURNAL_APPLIED) or 0)

    def pending_group(self) -> int | None:
        """None: a write is one transaction, whatever records it holds."""
        return None

    def make_durable(self) -> None:
        """Nothing to do: DuckDB syncs its write-ahead log at each commit."""

    def close(self) -> None:
        with self._write_lock:
            try:
                self._con.close()
            except duckdb.Error:
                pass  # an invalidated database: nothing left to flush


def profiled_rows_scanned(profile: str) -> int:
    """``total_rows_scanned`` of DuckDB's JSON profile of the last statement: the rows its
    table scans read (after zone-map pruning, before filters; a table read twice counts
    twice)."""
    return int(json.loads(profile).get("query", {}).get("total_rows_scanned", 0))


def estimated_scan_rows(node: Any) -> int:
    """The sum of ``Estimated Cardinality`` over the table scans of an ``EXPLAIN (FORMAT
    json)`` plan (a node or a list of nodes)."""
    if isinstance(node, list):
        return sum(estimated_scan_rows(child) for child in node)
    info = node.get("extra_info", {})
    own = 0
    if isinstance(info, dict) and "Table" in info:
        own = int(re.sub(r"\D", "", str(info.get("Estimated Cardinality", ""))) or 0)
    return own + estimated_scan_rows(node.get("children", []))

"""The embedded DuckDB backend: one file, one writing process, many reading threads."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from sqlglot import exp

from tally.errors import StoreUnavailable
from tally.storage.base import DerivedTable, IdempotencyRecord, QuarantineItem, WriteSet
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
ROWS_SCANNED_METRIC = "query.total_rows_scanned"
JOURNAL_APPLIED = "journal_applied_seq"


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
        if read_only and not self.path.exists():
            raise StoreUnavailable(f"no Tally store at {self.path}")
        try:
            self._con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreUnavailable(
                    f"store {self.path} is in use by another process (is `tally serve` "
                    f"running on this data dir?): {exc}"
                ) from None
            raise StoreUnavailable(f"cannot open store {self.path}: {exc}") from None
        self.limits = limits or QueryLimits()
        self._apply_limits(spill_dir)
        self._derived = [sql for table in derived for sql in table.from_batch]
        if not read_only:
            self._con.execute(DDL)
            for name in retired:
                self._con.execute(f"DROP TABLE IF EXISTS {name}")
            self._create_derived(derived)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self.rows_scanned = 0  # by execute(), since the store was opened

    def _create_derived(self, derived: Sequence[DerivedTable]) -> None:
        for table in derived:
            existed = bool(self._con.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table.name]
            ).fetchall()[0][0])
            self._con.execute(table.ddl)
            if not existed:  # a new derived table over an existing store: fill it once
                for sql in table.from_all:
                    self._con.execute(sql)

    def _apply_limits(self, spill_dir: Path | None) -> None:
        """The engine's memory and spill bounds (settings of the database: every cursor)."""
        if self.limits.memory_bytes is not None:
            self._con.execute(f"SET memory_limit = '{int(self.limits.memory_bytes)}B'")
        if spill_dir is not None:
            self._con.execute("SET temp_directory = ?", [str(spill_dir)])
        if self.limits.spill_bytes is not None:
            self._con.execute(
                f"SET max_temp_directory_size = '{int(self.limits.spill_bytes)}B'")

    # -- reads: one cursor per thread, so readers never share a connection -----------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self._con.cursor()
            self._local.cursor = cur
        return cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """The store's own reads (the data versions at start-up): no statement timeout, which
        bounds the queries of requests (:meth:`execute`), not start-up on a large store."""
        rel = self._cursor().sql(sql, params=list(params))
        assert rel is not None, "query() is for statements that return rows"
        return rel.to_arrow_table()

    def execute(self, tree: exp.Expr, params: dict[str, Any]) -> pa.Table:
        """A sqlglot tree rendered in DuckDB's dialect, with named bound parameters. The rows
        it scans (DuckDB's profiler) are charged to the current request's scan meter."""
        sql = tree.sql(dialect=self.dialect)
        meter = current_meter.get()
        if meter is not None:
            meter.before_scan(lambda: self.estimate_rows(sql, params))
        cur = self._profiled_cursor()
        with bounded(cur, self.limits):  # TALLY_QUERY_TIMEOUT_SECONDS, memory: a 503
            rel = cur.sql(sql, params=params)
            assert rel is not None, "execute() is for queries that return rows"
            table = rel.to_arrow_table()
        rows = profiled_rows_scanned(cur.get_profiling_information(format="json"))
        with self._scan_lock:
            self.rows_scanned += rows
        if meter is not None:
            meter.after_scan(rows)
        return table

    def _profiled_cursor(self) -> duckdb.DuckDBPyConnection:
        """The thread's cursor for :meth:`execute`: profiled, tracking only the rows scanned
        (a few microseconds a statement), so each statement's count can be read back."""
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
        rows = self._cursor().execute(sql, list(params)).fetchall()
        return rows[0][0] if rows else None

    def count_events(self) -> int:
        return int(self._scalar("SELECT count(*) FROM events"))

    def max_ingest_seq(self) -> int:
        return int(self._scalar("SELECT coalesce(max(ingest_seq), 0) FROM events"))

    def event_keys(self, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
        cur = self._con.cursor()
        rel = cur.sql("SELECT id_hi, id_lo FROM events")
        assert rel is not None
        reader = rel.to_arrow_reader(chunk_rows)
        for batch in reader:
            yield (batch.column(0).to_numpy(zero_copy_only=False),
                   batch.column(1).to_numpy(zero_copy_only=False))

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

    def quarantine(self, after_id: int, limit: int) -> list[QuarantineItem]:
        rows = self._cursor().execute(
            f"SELECT id, {QUARANTINE_COLUMNS} FROM quarantine "  # noqa: S608 - constant names
            "WHERE id > ? ORDER BY id LIMIT ?",
            [after_id, limit],
        ).fetchall()
        return [QuarantineItem(*row) for row in rows]

    def setting(self, name: str) -> str | None:
        value = self._scalar("SELECT value FROM store_settings WHERE name = ?", [name])
        return None if value is None else str(value)

    def put_setting(self, name: str, value: str) -> None:
        with self._write_lock:
            self._con.execute(
                "INSERT INTO store_settings VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                [name, value],
            )

    # -- the one write path -----------------------------------------------------------------
    def write(self, writes: WriteSet, journal_seq: int | None = None) -> None:
        with self._write_lock:
            con = self._con
            con.execute("BEGIN TRANSACTION")
            try:
                for table in writes.events:
                    con.register("_new_events", table)
                    con.execute("INSERT INTO events SELECT * FROM _new_events")
                    for sql in self._derived:  # rollups, in the same transaction
                        con.execute(sql)
                    con.unregister("_new_events")
                for table in writes.quarantine:
                    con.register("_new_quarantine", table)
                    con.execute(
                        f"INSERT INTO quarantine ({QUARANTINE_COLUMNS}) "  # noqa: S608
                        "SELECT * FROM _new_quarantine"
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
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def expire_idempotency(self) -> None:
        with self._write_lock:
            self._con.execute(
                "DELETE FROM idempotency WHERE created_at < ?",
                [datetime.now(UTC).replace(tzinfo=None) - self.idempotency_ttl],
            )

    def fx_rates(self) -> list[tuple[date, str, str]]:
        rows = self._cursor().execute("SELECT day, currency, rate FROM fx_rates").fetchall()
        return [(day, currency, rate) for day, currency, rate in rows]

    def add_fx_rates(self, rows: list[tuple[date, str, str]]) -> None:
        """Insert new rates (the caller checked they are new); a duplicate key fails."""
        if not rows:
            return
        with self._write_lock:
            self._con.execute("BEGIN TRANSACTION")
            try:
                self._con.executemany(
                    "INSERT INTO fx_rates (day, currency, rate) VALUES (?, ?, ?)",
                    [list(row) for row in rows])
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise

    def journal_applied_seq(self) -> int:
        return int(self.setting(JOURNAL_APPLIED) or 0)

    def close(self) -> None:
        with self._write_lock:
            self._con.close()


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

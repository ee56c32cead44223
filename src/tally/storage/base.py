"""The Backend protocol: what the rest of Tally may ask of a store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

import pyarrow as pa
import sqlglot
from sqlglot import exp


@dataclass(frozen=True)
class IdempotencyRecord:
    client_id: str
    key: str
    body_sha256: str
    response: str  # JSON text of the first response
    created_at: datetime


@dataclass(frozen=True)
class Least:
    """A derived table that holds one row per ``keys``: of the rows its statements give, the
    one whose ``by`` columns are least. DuckDB keeps it by upsert (``dialects.upsert``); a
    store without one keeps every row given and answers the least per key (ClickHouse:
    ``argMin`` states, ``storage/clickhouse_schema.py``)."""

    keys: tuple[str, ...]
    by: tuple[str, ...]


@dataclass(frozen=True)
class Compaction:
    """How a derived table kept by appending rows is rewritten with one row per key: its
    ``statements`` (DuckDB SQL, in order, in the write's transaction, with the bucket range
    as ``$first`` and ``$end``) replace the rows whose ``column`` is in ``[first, end)``,
    sorted so that a scan can skip the row groups of other keys. The store runs them once
    ``events`` events were written since the last time, up to the newest bucket written
    (that one is still filling); rows of a bucket already compacted that arrive later (late
    events) stay as they are, which readers aggregate anyway.

    Every ``merge_every`` compactions, the buckets since the last merge are rewritten once
    more as one span, as an LSM's second tier: a compaction's few row groups hold every key's
    rows of its buckets, so a scan for one key (a funnel step's event type) reads most of
    them; sorted as a whole, a merged span's row groups hold few keys each (measured at 100M
    events written in group commits, docs/benchmarks.md)."""

    column: str
    bucket_seconds: int
    statements: tuple[str, ...]
    events: int = 2_000_000
    merge_every: int = 8


@dataclass(frozen=True)
class DerivedTable:
    """A table the store keeps from the events (a rollup): created with ``ddl``, appended to
    from each batch by ``from_batch`` (statements over ``_new_events``, in order, in the events'
    transaction) and filled once by ``from_all`` (over ``events``) when new to an existing store.

    Every table is kept by appending rows, which its readers aggregate (sums, distinct
    players), except a :class:`Least` one. A statement may also create the temporary table a
    later statement of the batch reads (``CREATE OR REPLACE TEMPORARY TABLE``)."""

    name: str
    ddl: str
    from_batch: tuple[str, ...]
    from_all: tuple[str, ...]
    # (column, type) that older stores may hold narrower: changed to this type when opened
    column_types: tuple[tuple[str, str], ...] = ()
    least: Least | None = None
    compaction: Compaction | None = None
    # the sort key of a ClickHouse store's table (else its primary key, else its first
    # NOT NULL column): what its readers' ranges name first
    order: tuple[str, ...] = ()


def declared_columns(ddl: str) -> tuple[str, ...]:
    """The columns a derived table's ``CREATE TABLE`` (DuckDB SQL) declares, in order: a
    stored table lacking one of them was made by an older version and is rebuilt from the
    events when the store is opened (each backend's ``_create_derived``)."""
    create = sqlglot.parse_one(ddl, read="duckdb")
    assert isinstance(create, exp.Create) and isinstance(create.this, exp.Schema)
    return tuple(item.name for item in create.this.expressions
                 if isinstance(item, exp.ColumnDef))


@dataclass
class WriteSet:
    """Everything one group commit writes, atomically: all of it or none of it."""

    events: list[pa.Table] = field(default_factory=list)
    quarantine: list[pa.Table] = field(default_factory=list)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Rows this write adds (events and quarantine entries)."""
        return sum(int(t.num_rows) for t in [*self.events, *self.quarantine])

    @property
    def empty(self) -> bool:
        return not (self.rows or self.idempotency)


@dataclass(frozen=True)
class QuarantineItem:
    id: int
    received_at: datetime
    client_id: str
    batch_index: int
    event_id: str | None
    reason: str
    event: str
    tenant_id: str | None  # the brand the event names, if it names one as a string
    region: str | None


# "first,last": the ingest_seq range of events a bulk load wrote without their derived rows
# yet (Backend.defer_derived); a store setting, read by `tally status --data-dir` too
DERIVED_PENDING = "derived_pending"


class Backend(Protocol):
    """A store. ``dialect`` names the SQL dialect its trees render in
    (``storage/dialects.py``); everything the rest of Tally asks of a store is here."""

    dialect: str

    @property
    def rows_scanned(self) -> int:
        """Rows read by :meth:`execute` since the store was opened (the Prometheus counter
        ``tally_rows_scanned_total``, read at scrape time)."""

    def write(self, writes: WriteSet, journal_seq: int | None = None, *,
              dry_run: bool = False) -> None:
        """Append events, quarantine entries and idempotency records in one durable commit,
        recording ``journal_seq`` as the last journal record applied; a record at or below the
        applied one is applied (nothing is written again). ``dry_run``: do all of it, then
        roll back (does the store accept these rows?). Raises ``WriteRejected`` when
        the rows are at fault, ``StoreUnavailable`` when the store is."""

    def journal_applied_seq(self) -> int: ...

    def defer_derived(self, defer: bool) -> None:
        """A bulk load's writes may leave their derived rows (rollups, activity, cohort
        tables) to be made together when the deferral ends (or at the next open, after a
        crash), in a few large transactions. A store that derives on insert by itself
        (ClickHouse's materialized views) ignores it."""

    def pending_group(self) -> int | None:
        """The last journal record of a write a failure cut before it was applied, if the
        store holds some of its rows (a store whose write is one transaction never does):
        the applier's first write ends exactly there, so it holds the records those rows
        came from, and the store writes only what had not landed."""

    def make_durable(self) -> None:
        """Make every write so far survive a power loss or a kernel crash: the journal
        forgets its records only after this returned (``Journal.release``). Raises
        ``OSError`` if the store's files cannot be synced (the records are kept)."""

    def fx_rates(self) -> list[tuple[date, str, str]]: ...

    def add_fx_rates(self, rows: list[tuple[date, str, str]]) -> None: ...

    def event_keys(self, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
        """Stored dedup keys (id_hi, id_lo) as numpy int64 arrays, chunk by chunk."""

    def drop_cached_blocks(self) -> None:
        """Give back the memory of blocks the store cached for the start-up scans (the dedup
        keys, the data versions), which the queries do not read. A store with no such cache
        of its own ignores it."""

    def max_ingest_seq(self) -> int: ...

    def data_versions(self) -> pa.Table:
        """Per (brand, UTC day of ``occurred_at``) of the stored events: ``tenant_id``,
        ``day`` (a date), ``seq`` (the greatest ingest_seq) and ``latest`` (the greatest
        occurred_at) — what ``ingest/versions.py`` loads at start."""

    def count_events(self) -> int: ...

    def idempotency(self, client_id: str, key: str) -> IdempotencyRecord | None: ...

    def expire_idempotency(self) -> None:
        """Delete the idempotency records older than the store's time to live."""

    def quarantine(self, after_id: int, limit: int, brands: Sequence[str] | None = None,
                   regions: Sequence[str] | None = None) -> list[QuarantineItem]:
        """Up to ``limit`` entries with id > ``after_id``, oldest first; with ``brands`` (or
        ``regions``) only entries naming one of them — never one naming none."""

    def setting(self, name: str) -> str | None: ...

    def put_setting(self, name: str, value: str) -> None: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> pa.Table:
        """SQL text in this store's dialect, unmetered (for tests and the store's own
        reads; the query modules build trees and call :meth:`execute`)."""

    def execute(self, tree: exp.Expr, params: dict[str, Any]) -> pa.Table:
        """Render ``tree`` in this backend's dialect and run it with named parameters,
        asking the current request's scan meter first and charging it the rows scanned
        afterwards (``storage/metering.py``)."""

    def rows(self, tree: exp.Expr, params: dict[str, Any]) -> list[dict[str, Any]]:
        """What :meth:`execute` answers, as Python rows (``execute(...).to_pylist()``, but an
        engine may skip Arrow: the small answers' path); metered and bounded the same."""

    def estimate_rows(self, sql: str, params: dict[str, Any]) -> int:
        """The planner's estimate, before running, of the rows ``sql`` (rendered in this
        store's dialect) will read: what the scan meter checks first."""

    def close(self) -> None: ...

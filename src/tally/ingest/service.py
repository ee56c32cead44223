"""The ingestion service: the one path every event takes, from HTTP or from ``tally demo``."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pyarrow as pa

from tally.events.envelope import ValidationContext
from tally.ingest.applier import Applier
from tally.ingest.batch import PreparedBatch, prepare
from tally.ingest.columnar import prepare_table
from tally.ingest.dedup import DedupIndex, KeyIndex, key_hasher
from tally.ingest.dedup_disk import DEFAULT_MEMORY_MB, PartitionedDedupIndex
from tally.ingest.journal import Journal
from tally.ingest.versions import DataVersions
from tally.ingest.writer import IdempotencyKey, IngestWriter
from tally.security.admission import admit_batch
from tally.security.pseudonym import Pseudonymiser
from tally.storage.base import Backend

log = logging.getLogger(__name__)


class IngestService:
    def __init__(self, backend: Backend, journal_dir: Path, max_batch_events: int,
                 pseudonymiser: Pseudonymiser | None = None, *,
                 max_backlog_rows: int = 1_000_000, max_backlog_seconds: float = 60.0,
                 apply_linger_seconds: float = 0.0,
                 dedup_memory_mb: int = DEFAULT_MEMORY_MB,
                 dedup_index: str = "memory") -> None:
        self.backend = backend
        self.max_batch_events = max_batch_events
        self.pseudonymiser = pseudonymiser  # TALLY_PSEUDONYMISE_KEY: player ids keyed at ingest
        self.journal = Journal(journal_dir)
        applied = backend.journal_applied_seq()
        unapplied = [r for r in self.journal.records() if r.seq > applied]
        secret = backend.setting("dedup_key")
        if secret is None:
            backend.put_setting("dedup_key", secrets.token_hex(32))
            secret = backend.setting("dedup_key")
        assert secret is not None
        self._hash = key_hasher(bytes.fromhex(secret))
        started = time.perf_counter()
        self.index: KeyIndex
        if dedup_index == "disk":  # beside the journal; reused if current, else rebuilt
            self.index = PartitionedDedupIndex.open(
                journal_dir.parent / "dedup", backend, memory_mb=dedup_memory_mb,
                journal_last_seq=unapplied[-1].seq if unapplied else applied)
        else:  # in memory, loaded from the store: fastest, ~13 bytes of RAM per stored event
            memory = DedupIndex(compact=True)
            memory.load(backend.event_keys(1 << 20))
            self.index = memory
        for record in unapplied:  # acknowledged before the last stop: stored as far as dedup goes
            for table in record.writes.events:
                self.index.add(table.column("id_hi").to_numpy(), table.column("id_lo").to_numpy(),
                               record.seq)
        log.info("dedup index loaded", extra={"keys": len(self.index),
                                              "seconds": round(time.perf_counter() - started, 3)})
        self.versions = DataVersions()
        self.versions.load(backend)
        backend.drop_cached_blocks()  # the blocks the two scans above read: not the queries'
        self.applier = Applier(backend, self.journal, self.versions, applied,
                               parked_dir=journal_dir.parent / "parked",
                               max_backlog_rows=max_backlog_rows,
                               max_backlog_seconds=max_backlog_seconds,
                               linger_seconds=apply_linger_seconds,
                               on_set_aside=self._forget)
        try:
            self.journal.release(applied, backend.make_durable)
        except OSError as exc:  # kept: replayed harmlessly (the store's tokens or keys)
            log.warning("journal: could not release segments", extra={"error": str(exc)})
        for record in unapplied:  # applied by the applier like any new group, poison and all
            self.applier.enqueue(record.seq, record.writes, block=False)
        if unapplied:
            log.info("journal: records to apply from before the last stop",
                     extra={"records": len(unapplied), "last_seq": unapplied[-1].seq})
        last_seq = max(unapplied[-1].seq if unapplied else 0, applied,
                       backend.max_ingest_seq())
        self.writer = IngestWriter(backend, self.index, self.journal, self.applier, last_seq,
                                   [(r.seq, r.writes.idempotency) for r in unapplied])

    def _forget(self, events: pa.Table) -> None:
        """Events set aside when applied are not stored: a resend is not a duplicate."""
        self.index.discard(events.column("id_hi").to_numpy(), events.column("id_lo").to_numpy())

    def start(self) -> None:
        self.applier.start()
        self.writer.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the groups being committed, then apply what waits for at most ``timeout``
        seconds (None: all of it); what is left stays in the journal for the next start.
        True when everything acknowledged is in the store."""
        self.writer.stop()
        drained = self.applier.stop(timeout)
        if isinstance(self.index, PartitionedDedupIndex):
            self.index.close()
        self.journal.close()
        if drained:
            try:
                self.journal.clear(self.backend.make_durable)
            except OSError as exc:  # the store's files not synced: replayed at the next start
                log.warning("shutdown: the journal is kept (the store could not be synced)",
                            extra={"error": str(exc)})
        else:
            log.warning("shutdown: acknowledged rows left in the journal for the next start",
                        extra={"rows": self.applier.lag_rows()})
        return drained

    def caught_up(self) -> bool:
        """Whether every acknowledged write is already visible (no need to :meth:`flush`)."""
        return self.applier.caught_up()

    def flush(self, timeout: float | None = 30) -> bool:
        """Wait until every acknowledged write is visible in the store."""
        return self.applier.flush(timeout)

    def read_your_writes(self, bound: float) -> None:
        """Before a read: wait for what was acknowledged before it, for at most ``bound``
        seconds, and not at all when the applier is far behind (it would not make it: the
        answer's watermark tells what it holds instead)."""
        if not self.applier.caught_up() and self.applier.drain_seconds() <= bound:
            self.applier.flush(bound)

    def prepare(self, body: bytes, ctx: ValidationContext, client_id: str,
                max_events: int | None = None) -> PreparedBatch:
        """``max_events``: the batch's event limit (default: the requests', 413 past it)."""
        return prepare(body, ctx, client_id, max_events or self.max_batch_events, self._hash,
                       self.pseudonymiser)

    def prepare_columns(self, table: pa.Table, ctx: ValidationContext,
                        client_id: str) -> PreparedBatch:
        """A columnar batch (``tally.ingest.columnar``): the same rules, vectorised."""
        return prepare_table(table, ctx, client_id, self._hash, self.pseudonymiser)

    async def ingest(self, body: bytes, ctx: ValidationContext, client_id: str, trace_id: str,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Validate and durably store one batch; the receipt of CONTRACT §3."""
        idem = None
        if idempotency_key is not None:
            digest = hashlib.sha256(body).hexdigest()
            idem = IdempotencyKey(client_id, idempotency_key, digest)
        self.applier.refuse_if_behind()  # 503 before any work while the backlog is too long
        prepared = self.prepare(body, ctx, client_id)
        admit_batch(prepared.table)  # rate limits of the batch's brands and regions
        future = self.writer.submit(prepared, trace_id, idem)
        return await asyncio.wrap_future(future)

    def submit(self, body: bytes, ctx: ValidationContext, client_id: str,
               trace_id: str) -> Future[dict[str, Any]]:
        """The same path without waiting for the commit (needs :meth:`start`): a bulk loader
        prepares the next batch while the writer thread commits this one."""
        return self.submit_prepared(self.prepare(body, ctx, client_id), trace_id)

    def submit_prepared(self, batch: PreparedBatch, trace_id: str) -> Future[dict[str, Any]]:
        """A prepared batch to the writer (dedup, durable commit); its receipt once durable.
        A journal that cannot take it fails the future with ``ServiceUnavailable``."""
        return self.writer.submit(batch, trace_id, None)


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

from tally.events.envelope import ValidationContext
from tally.ingest.applier import Applier, merge
from tally.ingest.batch import PreparedBatch, prepare
from tally.ingest.dedup import DedupIndex, key_hasher
from tally.ingest.journal import Journal
from tally.ingest.versions import DataVersions
from tally.ingest.writer import IdempotencyKey, IngestWriter
from tally.security.admission import admit_batch
from tally.security.pseudonym import Pseudonymiser
from tally.storage.base import Backend

log = logging.getLogger(__name__)


class IngestService:
    def __init__(self, backend: Backend, journal_dir: Path, max_batch_events: int,
                 pseudonymiser: Pseudonymiser | None = None) -> None:
        self.backend = backend
        self.max_batch_events = max_batch_events
        self.pseudonymiser = pseudonymiser  # TALLY_PSEUDONYMISE_KEY: player ids keyed at ingest
        self.journal = Journal(journal_dir)
        last_seq = self._recover()
        secret = backend.setting("dedup_key")
        if secret is None:
            backend.put_setting("dedup_key", secrets.token_hex(32))
            secret = backend.setting("dedup_key")
        assert secret is not None
        self._hash = key_hasher(bytes.fromhex(secret))
        started = time.perf_counter()
        self.index = DedupIndex()
        self.index.load(backend.event_keys(1 << 20))
        log.info("dedup index loaded", extra={"keys": len(self.index),
                                              "seconds": round(time.perf_counter() - started, 3)})
        self.versions = DataVersions()
        self.versions.load(backend)
        self.applier = Applier(backend, self.journal, self.versions, last_seq)
        self.writer = IngestWriter(backend, self.index, self.journal, self.applier, last_seq)

    def _recover(self) -> int:
        """Apply journal records a crash left unapplied; returns the last sequence used."""
        applied = self.backend.journal_applied_seq()
        pending = [r for r in self.journal.records() if r.seq > applied]
        if pending:
            self.backend.write(merge([r.writes for r in pending]), journal_seq=pending[-1].seq)
            log.info("journal replayed", extra={"records": len(pending),
                                                "last_seq": pending[-1].seq})
        self.journal.clear()
        last = pending[-1].seq if pending else applied
        return max(last, self.backend.max_ingest_seq())

    def start(self) -> None:
        self.applier.start()
        self.writer.start()

    def stop(self) -> None:
        """Drain: every acknowledged group reaches the store, then the journal is emptied."""
        self.writer.stop()
        self.applier.stop()
        self.journal.close()
        if self.applier.error is None:
            self.journal.clear()

    def caught_up(self) -> bool:
        """Whether every acknowledged write is already visible (no need to :meth:`flush`)."""
        return self.applier.caught_up()

    def flush(self, timeout: float | None = 30) -> bool:
        """Wait until every acknowledged write is visible in the store."""
        return self.applier.flush(timeout)

    def prepare(self, body: bytes, ctx: ValidationContext, client_id: str) -> PreparedBatch:
        return prepare(body, ctx, client_id, self.max_batch_events, self._hash,
                       self.pseudonymiser)

    async def ingest(self, body: bytes, ctx: ValidationContext, client_id: str, trace_id: str,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """Validate and durably store one batch; the receipt of CONTRACT §3."""
        idem = None
        if idempotency_key is not None:
            digest = hashlib.sha256(body).hexdigest()
            idem = IdempotencyKey(client_id, idempotency_key, digest)
        prepared = self.prepare(body, ctx, client_id)
        admit_batch(prepared.table)  # rate limits of the batch's brands and regions
        future = self.writer.submit(prepared, trace_id, idem)
        return await asyncio.wrap_future(future)

    def submit(self, body: bytes, ctx: ValidationContext, client_id: str,
               trace_id: str) -> Future[dict[str, Any]]:
        """The same path without waiting for the commit (needs :meth:`start`): a bulk loader
        prepares the next batch while the writer thread commits this one."""
        return self.writer.submit(self.prepare(body, ctx, client_id), trace_id, None)


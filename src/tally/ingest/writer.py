"""The single writer: dedup and a durable group commit for every accepted batch.

Requests prepare their batch (decode, validate, columns) concurrently and hand it here. One
thread takes whatever batches are waiting, dedups them in arrival order against the index and
each other, and appends all of them as one journal record, so one fsync covers many requests.
A receipt is released only after that fsync returned: 202 means durable. If the journal cannot
take the record (a full or read-only disk), every request of the group gets ``503`` with
``Retry-After`` and nothing of it is remembered — not its keys in the dedup index, not its
idempotency keys — so the producer's retry is a first attempt. The applier then moves the
record into the store (``applier.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa

from tally.errors import IdempotencyKeyReused, ServiceUnavailable
from tally.ingest.applier import Applier
from tally.ingest.batch import PreparedBatch, quarantine_table
from tally.ingest.dedup import DedupIndex, KeyIndex, first_unseen
from tally.ingest.journal import Journal, JournalUnavailable
from tally.storage.base import Backend, IdempotencyRecord, WriteSet

log = logging.getLogger(__name__)
MAX_GROUP_EVENTS = 50_000
JOURNAL_RETRY_AFTER = 5  # seconds: a disk is not freed in less


@dataclass(frozen=True)
class IdempotencyKey:
    client_id: str
    key: str
    body_sha256: str


@dataclass
class Submission:
    batch: PreparedBatch
    trace_id: str
    idempotency: IdempotencyKey | None
    future: Future[dict[str, Any]]


FirstResponse = tuple[str, dict[str, Any]]  # (body SHA-256, receipt)


class IngestWriter:
    def __init__(self, backend: Backend, index: KeyIndex, journal: Journal, applier: Applier,
                 last_seq: int,
                 unapplied: Sequence[tuple[int, list[IdempotencyRecord]]] = ()) -> None:
        self._backend = backend
        self._index = index
        self._journal = journal
        self._applier = applier
        self._seq = last_seq
        # idempotency records journalled but maybe not yet in the store: (response, seq)
        self._recent: dict[tuple[str, str], tuple[FirstResponse, int]] = {
            (r.client_id, r.key): ((r.body_sha256, msgspec.json.decode(r.response)), seq)
            for seq, records in unapplied for r in records}
        self._queue: queue.Queue[Submission | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tally-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # never started (a command that failed at start): done
            self._queue.put(None)
            self._thread.join()

    def submit(self, batch: PreparedBatch, trace_id: str,
               idempotency: IdempotencyKey | None) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        self._queue.put(Submission(batch, trace_id, idempotency, future))
        return future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            events = first.batch.table.num_rows
            stop = False
            while events < MAX_GROUP_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                group.append(nxt)
                events += nxt.batch.table.num_rows
            try:
                self._commit(group)
            except Exception as exc:  # a bug: fail these requests, never the thread
                log.exception("group commit failed")
                for sub in group:
                    if not sub.future.done():
                        sub.future.set_exception(exc)
            if stop:
                return

    def _commit(self, group: list[Submission]) -> None:
        self._seq += 1  # given back if the journal refuses the record: seqs have no gaps
        writes = WriteSet()
        staged_keys = DedupIndex()  # keys staged by earlier batches of this group
        done: list[tuple[Submission, dict[str, Any]]] = []
        staged: dict[tuple[str, str], FirstResponse] = {}
        for sub in group:
            try:
                replay = self._replay(sub, staged)
            except IdempotencyKeyReused as exc:
                sub.future.set_exception(exc)
                continue
            if replay is not None:
                done.append((sub, replay))
                continue
            receipt = self._stage(sub, writes, staged_keys)
            if sub.idempotency is not None:
                staged[sub.idempotency.client_id, sub.idempotency.key] = (
                    sub.idempotency.body_sha256, receipt)
            done.append((sub, receipt))
        has_writes = not writes.empty
        try:
            if has_writes:
                self._journal.append(self._seq, writes)
            else:
                self._seq -= 1
        except JournalUnavailable as exc:  # nothing was made durable: every waiter learns it
            self._seq -= 1
            log.error("group commit refused: the journal cannot be written",
                      extra={"error": str(exc), "requests": len(done)})
            refusal = ServiceUnavailable(f"{exc}; nothing of this batch was stored",
                                         retry_after=JOURNAL_RETRY_AFTER)
            for sub, _ in done:
                sub.future.set_exception(refusal)
            return
        self._remember(staged)
        if writes.events:
            self._index.add(
                np.concatenate([t.column("id_hi").to_numpy() for t in writes.events]),
                np.concatenate([t.column("id_lo").to_numpy() for t in writes.events]),
                self._seq,
            )
        if has_writes:  # before the receipts, so a flush() after a 202 waits for this group
            self._applier.enqueue(self._seq, writes)  # may wait: backpressure
        for sub, receipt in done:
            sub.future.set_result(receipt)

    def _remember(self, staged: dict[tuple[str, str], FirstResponse]) -> None:
        applied = self._applier.applied_seq
        if len(self._recent) > 1024:
            self._recent = {k: v for k, v in self._recent.items() if v[1] > applied}
        for ident, first in staged.items():
            self._recent[ident] = (first, self._seq)

    def _replay(self, sub: Submission, staged: dict[tuple[str, str], FirstResponse]
                ) -> dict[str, Any] | None:
        """The first response for a known idempotency key, or None if the key is new: from
        this group, else from the journal not yet applied, else from the store."""
        idem = sub.idempotency
        if idem is None:
            return None
        ident = (idem.client_id, idem.key)
        first = staged.get(ident)
        if first is None and ident in self._recent:
            first = self._recent[ident][0]
        if first is None:
            stored = self._backend.idempotency(*ident)
            if stored is None:
                return None
            first = (stored.body_sha256, msgspec.json.decode(stored.response))
        if first[0] != idem.body_sha256:
            raise IdempotencyKeyReused(
                "X-Idempotency-Key was already used with a different body",
                idempotency_key=idem.key,
            )
        return first[1]

    def _stage(self, sub: Submission, writes: WriteSet, staged_keys: DedupIndex
               ) -> dict[str, Any]:
        """Queue one batch's new events; its receipt counts what the commit will store."""
        batch, table = sub.batch, sub.batch.table
        hi = table.column("id_hi").to_numpy()
        lo = table.column("id_lo").to_numpy()
        keep = first_unseen(hi, lo, self._index, staged_keys)
        staged_keys.add(hi[keep], lo[keep])
        kept = table.filter(pa.array(keep)) if not keep.all() else table
        if kept.num_rows:
            seq = pa.array(np.full(kept.num_rows, self._seq, dtype=np.int64))
            writes.events.append(kept.set_column(0, "ingest_seq", seq))
        if batch.rejections:
            writes.quarantine.append(
                quarantine_table(batch.rejections, batch.received_at, batch.client_id)
            )
        receipt = {
            "accepted": int(kept.num_rows),
            "duplicates": int(len(keep) - kept.num_rows),
            "rejected": len(batch.rejections),
            "errors": [r.error() for r in batch.rejections],
            "trace_id": sub.trace_id,
        }
        if sub.idempotency is not None:
            writes.idempotency.append(
                IdempotencyRecord(
                    sub.idempotency.client_id, sub.idempotency.key, sub.idempotency.body_sha256,
                    msgspec.json.encode(receipt).decode(),
                    datetime.now(UTC).replace(tzinfo=None),
                )
            )
        return receipt

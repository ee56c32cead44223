"""Moves journalled groups into the store in large transactions, off the acknowledgement path.

The writer hands over each group after its journal record is fsynced; this thread merges
whatever is waiting (up to ``max_rows``) into one store transaction that also records the last
applied journal sequence, then releases journal segments. Readers that must see every
acknowledged write (the quarantine route, tests) wait on :meth:`flush`. If the store falls
behind by more than ``max_pending_rows``, :meth:`enqueue` blocks: backpressure reaches the
producers as slower acknowledgements instead of unbounded memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from tally.ingest.journal import Journal
from tally.ingest.versions import DataVersions
from tally.storage.base import Backend, WriteSet

log = logging.getLogger(__name__)


def merge(groups: list[WriteSet]) -> WriteSet:
    merged = WriteSet()
    for writes in groups:
        merged.events += writes.events
        merged.quarantine += writes.quarantine
        merged.idempotency += writes.idempotency
    return merged


def rows(writes: WriteSet) -> int:
    return sum(int(t.num_rows) for t in [*writes.events, *writes.quarantine])


class Applier:
    def __init__(self, backend: Backend, journal: Journal, versions: DataVersions,
                 applied_seq: int, max_rows: int = 200_000,
                 max_pending_rows: int = 2_000_000) -> None:
        self._backend, self._journal, self._versions = backend, journal, versions
        self.applied_seq = applied_seq
        self._max_rows, self._max_pending = max_rows, max_pending_rows
        self._pending: deque[tuple[int, WriteSet, float]] = deque()  # (seq, writes, since)
        self._pending_rows = 0
        self._enqueued_seq = applied_seq
        self._cond = threading.Condition()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tally-applier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enqueue(self, seq: int, writes: WriteSet) -> None:
        with self._cond:
            while self._pending_rows > self._max_pending and self.error is None:
                self._cond.wait()
            self._pending.append((seq, writes, time.monotonic()))
            self._pending_rows += rows(writes)
            self._enqueued_seq = seq
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far is in the store."""
        with self._cond:
            target = self._enqueued_seq
            return self._cond.wait_for(
                lambda: self.applied_seq >= target or self.error is not None, timeout)

    def caught_up(self) -> bool:
        with self._cond:
            return self.applied_seq >= self._enqueued_seq or self.error is not None

    def lag_rows(self) -> int:
        return self._pending_rows

    def lag_seconds(self) -> float:
        """How long the oldest acknowledged group has waited for the store (0: caught up)."""
        with self._cond:
            return time.monotonic() - self._pending[0][2] if self._pending else 0.0

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()

    def _take(self) -> tuple[int, list[WriteSet]] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._stopping)
            if not self._pending:
                return None
            groups: list[WriteSet] = []
            taken = 0
            seq = self.applied_seq
            while self._pending and (not groups or taken < self._max_rows):
                seq, writes, _ = self._pending.popleft()
                groups.append(writes)
                taken += rows(writes)
            self._pending_rows -= taken
            self._cond.notify_all()
            return seq, groups

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            seq, groups = item
            merged = merge(groups)
            try:
                self._backend.write(merged, journal_seq=seq)
            except BaseException as exc:  # the journal still has it; a restart replays it
                log.exception("applying the journal to the store failed")
                with self._cond:
                    self.error = exc
                    self._cond.notify_all()
                return
            self._versions.bump(merged.events, seq)  # before flush() waiters see it applied
            with self._cond:
                self.applied_seq = seq
                self._cond.notify_all()
            self._journal.release(seq)

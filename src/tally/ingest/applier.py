"""Moves journalled groups into the store in large transactions, off the acknowledgement path.

The writer hands over each group after its journal record is fsynced (and at start-up every
record a crash or a bounded shutdown left unapplied is handed over again); this thread merges
whatever is waiting (up to ``max_rows``) into one store transaction — every table of a kind in
one statement, so a thousand 100-event batches cost what one 100,000-event batch does — that
also records the last applied journal sequence, then releases journal segments.

What it guarantees, whatever the store does:

- **Nothing acknowledged is lost or applied twice.** A write that fails is retried; before a
  retry the store's recorded sequence is read, since a commit may land and still report an
  error (a checkpoint failing after it).
- **A full or failing store stops nothing for good.** Store errors (``StoreUnavailable``) are
  retried with exponential backoff; :attr:`Applier.store_failure` says why meanwhile (the
  server turns not-ready), and the backlog bound (:meth:`Applier.refuse_if_behind`) pushes back
  on producers with ``503`` + ``Retry-After`` before it grows past the freshness objective.
- **A poison row cannot freeze ingestion.** Rows the store refuses (``WriteRejected``) are set
  aside (``setaside.py``): quarantined or parked with their reason, the rest applied.
- **Shutdown is bounded.** :meth:`Applier.stop` applies what it can before its deadline and
  leaves the rest in the journal for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from tally.errors import ServiceUnavailable, StoreUnavailable, WriteRejected
from tally.ingest.journal import Journal
from tally.ingest.setaside import Isolated, isolate, park_all
from tally.ingest.versions import DataVersions
from tally.storage.base import Backend, WriteSet

log = logging.getLogger(__name__)
BACKOFF_FIRST, BACKOFF_MAX = 0.05, 5.0  # seconds between retries of a failing store
# a write refused again once its rows at fault are set aside is tried this many more times
# (seconds apart, doubling) before the record is parked: a refusal that passes (the store's,
# in words that do not say so) must not send acknowledged rows out of the store
RETRIES_BEFORE_PARKING, PARKING_BACKOFF = 3, 0.5


def merge(groups: list[WriteSet]) -> WriteSet:
    merged = WriteSet()
    for writes in groups:
        merged.events += writes.events
        merged.quarantine += writes.quarantine
        merged.idempotency += writes.idempotency
    return merged


class Applier:
    def __init__(self, backend: Backend, journal: Journal, versions: DataVersions,
                 applied_seq: int, *, parked_dir: Path, max_rows: int = 200_000,
                 max_backlog_rows: int = 1_000_000, max_backlog_seconds: float = 60.0,
                 linger_seconds: float = 0.0,
                 on_set_aside: Callable[[pa.Table], None] = lambda table: None) -> None:
        self._backend, self._journal, self._versions = backend, journal, versions
        self._parked_dir = parked_dir
        self.applied_seq = applied_seq
        self._max_rows = max_rows
        # how long a group may wait for more to be merged into it (unless a reader waits, the
        # backlog reaches max_rows or the applier stops): a store write has a large fixed cost
        # (DuckDB: ~0.15 s of CPU for its statements whatever its size), so fewer, larger
        # writes leave the request path the CPU
        self._linger = linger_seconds
        self._flushing = 0  # readers in flush(): apply at once for them
        self.max_backlog_rows, self.max_backlog_seconds = max_backlog_rows, max_backlog_seconds
        self._on_set_aside = on_set_aside
        # called (no argument) after each group is applied and its data versions bumped: the
        # alert evaluator's wake-up (alerts/service.py); each must return at once
        self.after_apply: list[Callable[[], None]] = []
        self._pending: deque[tuple[int, WriteSet, float]] = deque()  # (seq, writes, since)
        self._pending_rows = 0  # acknowledged rows not in the store yet (taken ones included)
        self._oldest: float | None = None  # when the oldest unapplied group was acknowledged
        self._enqueued_seq = applied_seq
        self._cond = threading.Condition()
        self._stopping = False
        # the last record of a write a failure cut, some of whose rows the store holds: the
        # first write ends there (Backend.pending_group)
        begun = backend.pending_group()
        self._replay_until = begun if begun is not None and begun > applied_seq else None
        self._deadline: float | None = None  # stop(): give up applying after this
        self.store_failure: str | None = None  # why the store refuses writes now, if it does
        self.set_aside_rows = 0
        self.applied_rows = 0
        self._rate = 0.0  # rows per second applied, smoothed (for Retry-After)
        self._thread = threading.Thread(target=self._run, name="tally-applier", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the writer's side ------------------------------------------------------------------
    def enqueue(self, seq: int, writes: WriteSet, block: bool = True) -> None:
        """Hand over a durable group. Blocks only past twice the backlog bound (the memory cap
        for a bulk loader, which has no ``503`` to receive); never at start-up (``block``
        False: the records a stop left must all be handed over before the thread starts)."""
        rows = writes.rows
        self._versions.add_pending(seq, writes.events)
        with self._cond:
            while block and self._pending_rows > 2 * self.max_backlog_rows \
                    and not self._stopping:
                self._cond.wait()
            now = time.monotonic()
            self._pending.append((seq, writes, now))
            if self._oldest is None:
                self._oldest = now
            self._pending_rows += rows
            self._enqueued_seq = seq
            self._cond.notify_all()

    def refuse_if_behind(self) -> None:
        """``503`` + ``Retry-After`` while the backlog is over its bound in rows or in age, so
        producers slow down before freshness breaks instead of the server's memory."""
        rows, lag = self.lag_rows(), self.lag_seconds()
        if rows <= self.max_backlog_rows and lag <= self.max_backlog_seconds:
            return
        retry = max(1, min(60, round(self.drain_seconds() if self._rate > 0 else BACKOFF_MAX)))
        why = (f"the store is not accepting writes ({self.store_failure})" if self.store_failure
               else f"{rows} acknowledged rows ({lag:.0f} s) are waiting to be applied")
        raise ServiceUnavailable(f"ingestion is paused: {why}; retry in {retry} s",
                                 retry_after=retry, backlog_rows=rows,
                                 backlog_seconds=round(lag, 1))

    # -- readers' side ------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything enqueued so far is in the store (or set aside)."""
        with self._cond:
            target = self._enqueued_seq
            if self.applied_seq >= target:
                return True
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self.applied_seq >= target, timeout)
            finally:
                self._flushing -= 1

    def caught_up(self) -> bool:
        with self._cond:
            return self.applied_seq >= self._enqueued_seq

    def lag_rows(self) -> int:
        return self._pending_rows

    def drain_seconds(self) -> float:
        """About how long the applier needs to apply what waits now (0: caught up; unknown
        rate: assumed quick)."""
        rows = self._pending_rows
        return rows / self._rate if rows and self._rate > 0 else 0.0

    def lag_seconds(self) -> float:
        """How long the oldest acknowledged group has waited for the store (0: caught up)."""
        oldest = self._oldest
        return 0.0 if oldest is None else time.monotonic() - oldest

    # -- lifecycle ----------------------------------------------------------------------------
    def stop(self, timeout: float | None = None) -> bool:
        """Apply what is waiting for at most ``timeout`` seconds (None: all of it), then stop;
        True when nothing is left unapplied (what is left stays in the journal)."""
        with self._cond:
            self._stopping = True
            self._deadline = None if timeout is None else time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            return self.applied_seq >= self._enqueued_seq

    def _given_up(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _lingering(self) -> float:
        """How much longer the waiting groups may wait for more (0: apply now)."""
        if not self._pending or self._stopping or self._flushing \
                or self._replay_until is not None or self._pending_rows >= self._max_rows:
            return 0.0
        return self._linger - (time.monotonic() - self._pending[0][2])

    def _take(self) -> tuple[int, WriteSet, int] | None:
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                wait = self._lingering()
                if wait <= 0:
                    break
                self._cond.wait(wait)
            if not self._pending or self._given_up():
                return None
            groups: list[WriteSet] = []
            taken = 0
            seq = self.applied_seq
            until, self._replay_until = self._replay_until, None
            while self._pending and (not groups or (
                    seq < until if until is not None else taken < self._max_rows)):
                seq, writes, _ = self._pending.popleft()
                groups.append(writes)
                taken += writes.rows
            return seq, merge(groups), taken

    def _run(self) -> None:
        while True:
            item = self._take()
            if item is None:
                return
            seq, writes, rows = item
            started = time.monotonic()
            try:
                applied = self._apply(seq, writes)
            except Exception:  # a bug: never let the thread die with the backlog in it
                log.exception("applier: unexpected error; retrying", extra={"seq": seq})
                applied = None
            if applied is None:  # gave up (stop deadline) or a bug: retried at the next start
                if self._given_up() or self._stopping:
                    return
                time.sleep(BACKOFF_MAX)
                self._requeue(seq, writes)
                continue
            self._done(seq, applied, rows, time.monotonic() - started)

    def _requeue(self, seq: int, writes: WriteSet) -> None:
        with self._cond:
            self._pending.appendleft((seq, writes, time.monotonic()))
            self._replay_until = seq  # the same group again, nothing merged into it

    def _apply(self, seq: int, writes: WriteSet) -> Isolated | None:
        """Write ``writes`` as record ``seq``; the write as applied, or None if stopped."""
        result = Isolated(writes)
        delay, attempt, isolated, refused = BACKOFF_FIRST, 0, False, 0
        while True:
            try:
                if attempt and self._backend.journal_applied_seq() >= seq:
                    return result  # an earlier attempt's commit landed despite its error
                attempt += 1
                try:
                    self._backend.write(result.writes, journal_seq=seq)
                except WriteRejected as exc:
                    if not isolated:
                        result = isolate(self._backend, result.writes, self._parked_dir, seq)
                        isolated = True
                    elif refused < RETRIES_BEFORE_PARKING:  # the rows passed their dry runs
                        refused += 1
                        log.warning("applier: a write without its rows at fault was refused; "
                                    "retrying", extra={"seq": seq, "error": str(exc),
                                                       "retry": refused})
                        with self._cond:  # stop() wakes this early
                            self._cond.wait(PARKING_BACKOFF * 2 ** (refused - 1))
                        if self._given_up():
                            return None
                    else:  # refused every time: park the whole record, the rest goes on
                        result = park_all(result, self._parked_dir, seq, str(exc))
                    continue
                self.store_failure = None
                return result
            except StoreUnavailable as exc:
                if self.store_failure != str(exc):
                    log.error("applier: the store cannot be written; retrying",
                              extra={"seq": seq, "error": str(exc)})
                self.store_failure = str(exc)
                with self._cond:  # stop() wakes this early
                    self._cond.wait(delay)
                if self._given_up():
                    return None
                delay = min(delay * 2, BACKOFF_MAX)

    def _done(self, seq: int, applied: Isolated, rows: int, seconds: float) -> None:
        if applied.set_aside is not None and applied.set_aside.num_rows:
            self.set_aside_rows += int(applied.set_aside.num_rows)
            self._on_set_aside(applied.set_aside)
        self._versions.applied(applied.writes.events, seq)  # before flush() waiters wake
        with self._cond:
            self.applied_seq = seq
            self._pending_rows -= rows
            self.applied_rows += rows
            self._oldest = self._pending[0][2] if self._pending else None
            if seconds > 0 and rows:
                self._rate = 0.7 * self._rate + 0.3 * rows / seconds if self._rate else \
                    rows / seconds
            self._cond.notify_all()
        for hook in self.after_apply:
            try:
                hook()
            except Exception:  # a listener's bug never stops the applier
                log.exception("applier: an after-apply hook failed")
        try:
            self._journal.release(seq, self._backend.make_durable)
        except OSError as exc:  # a segment left behind is replayed harmlessly
            log.warning("journal: could not release segments", extra={"error": str(exc)})

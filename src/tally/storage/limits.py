"""Bounds on one read statement: a wall-clock timeout and the engine's memory (and spill).

A statement stopped by a bound is answered ``503`` with ``Retry-After`` naming the bound
(:class:`~tally.errors.QueryTimeout`, :class:`~tally.errors.QueryMemoryExceeded`), never a
``500``, and the cursor it ran on stays usable: DuckDB cancels an interrupted statement
cleanly and frees what it held. DuckDB has no statement timeout, so a timer interrupts the
statement's cursor (again and again until it stops); the interrupt can only reach the
statement it was armed for, because the timer fires under a lock that the statement takes
back (disarming it) as soon as it ends.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import duckdb

from tally.errors import QueryMemoryExceeded, QueryTimeout

RETRY_AFTER = 10  # seconds: a stopped query is heavy; an immediate retry would likely repeat it


@dataclass(frozen=True)
class QueryLimits:
    """``timeout_seconds`` bounds each read statement; ``memory_bytes`` is the engine's buffer
    memory (DuckDB's limit is per database: readers and the writer share it) and
    ``spill_bytes`` the disk it may spill to beyond it, in ``spill_dir``; ``threads`` the
    threads one statement may use (DuckDB's pool, ClickHouse's ``max_threads``). None: the
    engine's own default (no timeout, 80% of RAM, 90% of the free disk, one thread a core)."""

    timeout_seconds: float | None = None
    memory_bytes: int | None = None
    spill_bytes: int | None = None
    threads: int | None = None


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class _Timer:
    """Interrupts ``cursor`` from ``seconds`` on, every ``REPEAT`` seconds, until disarmed:
    DuckDB drops an interrupt that arrives while a statement is still being planned (measured:
    a 0.4 s funnel interrupted 1 ms or 5 ms in ran to completion), so one is not enough.
    Timers are kept by one :class:`_Watchdog` thread (a thread per statement cost more than
    a small answer's query)."""

    REPEAT = 0.01

    def __init__(self, cursor: Interruptible, seconds: float) -> None:
        self._cursor = cursor
        self._lock = threading.Lock()
        self._armed = True
        self.fired = False
        _WATCHDOG.arm(self, time.monotonic() + seconds)

    def fire(self) -> bool:
        """Interrupt the statement if still armed; whether to fire again after REPEAT."""
        with self._lock:
            if not self._armed:
                return False
            self.fired = True
            self._cursor.interrupt()
            return True

    def disarm(self) -> None:
        with self._lock:
            if self._armed:
                _WATCHDOG.disarmed()
            self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed


class _Watchdog:
    """One daemon thread firing the timers that are due (a heap by deadline), started on
    first use; a disarmed timer is dropped when its deadline comes, or when disarmed ones
    outnumber the armed ones (the heap stays a few times the statements running)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Timer]] = []
        self._wake = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._armed = 0

    def disarmed(self) -> None:
        with self._wake:
            self._armed -= 1

    def arm(self, timer: _Timer, deadline: float) -> None:
        with self._wake:
            self._armed += 1
            if len(self._heap) > 1024 and len(self._heap) > 4 * self._armed:
                self._heap = [entry for entry in self._heap if entry[2].armed]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (deadline, next(self._seq), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="query-timeout")
                self._thread.start()
            elif self._heap[0][2] is timer:  # the earliest deadline now: wait less
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap
                                    else None)
                _, _, timer = heapq.heappop(self._heap)
            if timer.fire():  # outside the heap's lock: an interrupt may take a while
                with self._wake:
                    heapq.heappush(self._heap, (time.monotonic() + timer.REPEAT,
                                                next(self._seq), timer))


_WATCHDOG = _Watchdog()


@contextmanager
def bounded(cursor: Interruptible, limits: QueryLimits) -> Iterator[None]:
    """Run the block (one statement on ``cursor``) within ``limits``; a bound that stops it
    raises the ``503`` naming that bound."""
    timer = None if limits.timeout_seconds is None else _Timer(cursor, limits.timeout_seconds)
    try:
        yield
    except duckdb.InterruptException:
        if timer is None or not timer.fired:
            raise  # not ours (a shutdown): an internal error, not the client's query
        raise timed_out(limits) from None
    except duckdb.OutOfMemoryException:
        raise out_of_memory(limits) from None
    finally:
        if timer is not None:
            timer.disarm()


def _size(n: int | None) -> str:
    if n is None:
        return "DuckDB's default"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def timed_out(limits: QueryLimits) -> QueryTimeout:
    """The 503 of a statement stopped by ``limits.timeout_seconds``."""
    return QueryTimeout(
        f"the query ran longer than the {limits.timeout_seconds:g} s limit "
        "(TALLY_QUERY_TIMEOUT_SECONDS) and was stopped; narrow its range, filters or "
        "groups", retry_after=RETRY_AFTER, limit="query_timeout_seconds")


def out_of_memory(limits: QueryLimits, *, spills: bool = True) -> QueryMemoryExceeded:
    """The 503 of a statement that needed more than the engine's memory (and spill, on an
    engine that spills: DuckDB; ClickHouse's per-query bound is memory alone)."""
    spill = (f" and its spill space ({_size(limits.spill_bytes)}, TALLY_QUERY_SPILL_LIMIT)"
             if spills else "")
    return QueryMemoryExceeded(
        "the query needed more than the engine's memory "
        f"({_size(limits.memory_bytes)}, TALLY_QUERY_MEMORY_LIMIT){spill} and was stopped; "
        "narrow its range, filters or groups", retry_after=RETRY_AFTER,
        limit="query_memory_limit")

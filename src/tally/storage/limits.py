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

import threading
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
    ``spill_bytes`` the disk it may spill to beyond it, in ``spill_dir``. None: DuckDB's own
    default (no timeout, 80% of RAM, 90% of the free disk)."""

    timeout_seconds: float | None = None
    memory_bytes: int | None = None
    spill_bytes: int | None = None


class Interruptible(Protocol):
    def interrupt(self) -> None: ...


class _Timer:
    """Interrupts ``cursor`` from ``seconds`` on, every ``REPEAT`` seconds, until disarmed:
    DuckDB drops an interrupt that arrives while a statement is still being planned (measured:
    a 0.4 s funnel interrupted 1 ms or 5 ms in ran to completion), so one is not enough."""

    REPEAT = 0.01

    def __init__(self, cursor: Interruptible, seconds: float) -> None:
        self._cursor = cursor
        self._lock = threading.Lock()
        self._armed = True
        self._done = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True,
                                        name="query-timeout")
        self._thread.start()

    def _run(self, seconds: float) -> None:
        wait = seconds
        while not self._done.wait(wait):
            with self._lock:
                if not self._armed:
                    return
                self.fired = True
                self._cursor.interrupt()
            wait = self.REPEAT

    def disarm(self) -> None:
        with self._lock:
            self._armed = False
        self._done.set()


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

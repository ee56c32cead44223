"""Rows scanned per client and UTC day: the ledger behind ``TALLY_ROWS_PER_DAY``.

The rows are what DuckDB's profiler counts as scanned for each statement a request runs
(``storage/duckdb.py``); ``security/admission.py`` checks the day's total before a request's
first statement and adds each statement's rows after it. In-process by default; in Redis
(``TALLY_REDIS_URL``) the replicas share one ledger (``INCRBY`` on a key per client and day,
expiring two days later). The UTC day is this host's clock: servers are expected to be NTP
synchronised, and a second's disagreement at midnight moves at most one request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

import redis

log = logging.getLogger(__name__)
DAY = 86_400


def utc_day(now: float) -> int:
    """Days since 1970-01-01 (UTC) of the epoch time ``now``."""
    return int(now // DAY)


def seconds_to_midnight(now: float) -> int:
    """Whole seconds (1..86400) until the next UTC midnight: when the day's quota resets."""
    return DAY - int(now) % DAY


class RowsLedger(Protocol):
    def used(self, client_id: str, day: int) -> int: ...

    def add(self, client_id: str, day: int, rows: int) -> None: ...

    def close(self) -> None: ...


class LocalRowsLedger:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, int], int] = {}

    def used(self, client_id: str, day: int) -> int:
        with self._lock:
            return self._rows.get((client_id, day), 0)

    def add(self, client_id: str, day: int, rows: int) -> None:
        with self._lock:
            if any(d < day - 1 for _, d in self._rows):  # yesterday's is kept for the day turn
                self._rows = {k: v for k, v in self._rows.items() if k[1] >= day - 1}
            self._rows[(client_id, day)] = self._rows.get((client_id, day), 0) + rows

    def close(self) -> None:
        pass


class RedisRowsLedger:
    """If Redis stops answering, the check lets the request through and its rows go
    uncounted (logged); see :class:`tally.security.limits.RedisRateLimiter` for why."""

    def __init__(self, client: redis.Redis, prefix: str,
                 warn: Callable[[Exception], None]) -> None:
        self.client, self.prefix, self._warn = client, prefix, warn

    def _key(self, client_id: str, day: int) -> str:
        return f"{self.prefix}rows:{client_id}:{day}"

    def used(self, client_id: str, day: int) -> int:
        try:
            value = self.client.get(self._key(client_id, day))
        except redis.RedisError as exc:
            self._warn(exc)
            return 0
        return int(value) if value is not None else 0

    def add(self, client_id: str, day: int, rows: int) -> None:
        key = self._key(client_id, day)
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.incrby(key, rows)
                pipe.expire(key, 2 * DAY)
                pipe.execute()
        except redis.RedisError as exc:
            self._warn(exc)

    def close(self) -> None:
        pass  # the client is the rate limiter's, closed there

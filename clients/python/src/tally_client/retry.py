"""When a request is tried again, and after how long.

Retried: a connection that failed or broke (the request may or may not have reached the
server), and the answers that mean "not now": ``429`` and ``503`` (and ``502``/``504`` from a
proxy in front of Tally), after their ``Retry-After`` when they send one, else after an
exponential backoff with jitter. Never retried: any other answer — a ``4xx`` other than 429
will fail the same way again. Every Tally request this client sends is safe to repeat:
queries read, FX rates are append-only (the same rate again is a no-op), and a batch of
events carries the same ``X-Idempotency-Key`` on every try, so the server answers a repeat
with the first receipt instead of storing it twice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from tally_client.problems import retry_after

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# failures where trying again can help: refused or broken connections, timeouts, a server
# that closed the connection without answering (killed mid-request)
RETRY_ERRORS: tuple[type[Exception], ...] = (httpx.NetworkError, httpx.TimeoutException,
                                             httpx.RemoteProtocolError)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts``: tries in all (1 = no retry). Backoff before retry n (1-based) is
    ``backoff × 2^(n-1)``, capped at ``max_backoff``, of which a random half is jitter.
    A ``Retry-After`` longer than ``max_retry_after`` is not waited for: the problem is raised
    at once (a daily quota says "tomorrow")."""

    attempts: int = 5
    backoff: float = 0.25
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.backoff, self.max_backoff, self.max_retry_after) < 0:
            raise ValueError("backoff, max_backoff and max_retry_after must not be negative")

    def delay(self, tries: int, outcome: httpx.Response | Exception) -> float | None:
        """Seconds to wait before trying again after ``tries`` tries ended with ``outcome``,
        or ``None`` when the outcome is final (a success, an error not worth repeating, or
        no tries left)."""
        if tries >= self.attempts:
            return None
        if isinstance(outcome, Exception):
            return self._backoff(tries) if isinstance(outcome, RETRY_ERRORS) else None
        if outcome.status_code not in RETRY_STATUSES:
            return None
        advised = retry_after(outcome)
        if advised is None:
            return self._backoff(tries)
        return advised if advised <= self.max_retry_after else None

    def _backoff(self, tries: int) -> float:
        ceiling = min(self.max_backoff, self.backoff * 2 ** (tries - 1))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter


NO_RETRY = RetryPolicy(attempts=1)

"""The objectives of CONTRACT §7 as this process sees them over the last hour (``/status``).

The rules in ``deploy/prometheus/tally.rules.yml`` are the source of truth for alerting; this
is the same arithmetic over one process's own requests, for the on-call person who has no
Prometheus at hand. It counts exactly what the rules count:

- a latency objective: the answers of its route (any method, any status), and the bad ones:
  slower than the bound (``seconds > bound``: the histogram bucket ``le=bound`` holds the good);
- ``errors``: every answer but those of ``/metrics``, ``/healthz`` and ``/readyz``, and the bad
  ones: status ``5xx``;
- ``freshness``: samples of the worst rollup's lag, taken every :data:`FRESHNESS_SAMPLE_SECONDS`
  by the server, and the bad ones: a lag over 300 s (the fraction of time the lag is over).

**The window** is a sliding hour kept in memory in one-minute slots: the current minute (so
far) and the 59 before it, so between 59 and 60 minutes of requests. A process younger than
that reports everything since its start, which is then exactly what ``/metrics`` counts.
Nothing survives a restart, and each replica reports its own requests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SLOT_SECONDS = 60
WINDOW_SLOTS = 60  # the current minute and the 59 before it
FRESHNESS_SAMPLE_SECONDS = 10.0
FRESHNESS_BOUND_SECONDS = 300.0
NOT_COUNTED_AS_ERRORS = frozenset({"/metrics", "/healthz", "/readyz"})  # as the rules


@dataclass(frozen=True)
class Objective:
    slo: str  # the rules' `slo` label
    objective: str  # CONTRACT §7's words
    budget: float  # the bad ratio allowed
    route: str | None = None  # latency objectives: the route template
    bound_seconds: float | None = None  # latency: slower than this is bad; freshness: lag


OBJECTIVES = (
    Objective("timeseries-latency", "timeseries p95 ≤ 800 ms", 0.05,
              "/v1/analytics/timeseries", 0.8),
    Objective("slice-latency", "slice p95 ≤ 2 s", 0.05, "/v1/analytics/slice", 2.0),
    Objective("retention-latency", "retention p95 ≤ 5 s", 0.05, "/v1/analytics/retention", 5.0),
    Objective("errors", "5xx ratio ≤ 0.1 %", 0.001),
    Objective("freshness", "freshness p95 ≤ 5 min", 0.05, None, FRESHNESS_BOUND_SECONDS),
)
_LATENCY = {o.route: (i, o.bound_seconds) for i, o in enumerate(OBJECTIVES) if o.route}
_ERRORS = next(i for i, o in enumerate(OBJECTIVES) if o.slo == "errors")
_FRESHNESS = next(i for i, o in enumerate(OBJECTIVES) if o.slo == "freshness")


@dataclass(frozen=True)
class Compliance:
    """One objective over the window: ``bad`` of ``total``; ``met`` is None with no data."""

    slo: str
    objective: str
    budget: float
    bad: int
    total: int

    @property
    def bad_ratio(self) -> float | None:
        return self.bad / self.total if self.total else None

    @property
    def burn_rate(self) -> float | None:  # 1: the budget lasts exactly its 30 days
        ratio = self.bad_ratio
        return None if ratio is None else ratio / self.budget

    @property
    def met(self) -> bool | None:
        ratio = self.bad_ratio
        return None if ratio is None else ratio <= self.budget

    def public(self) -> dict[str, object]:
        return {"slo": self.slo, "objective": self.objective, "budget": self.budget,
                "bad": self.bad, "total": self.total, "bad_ratio": self.bad_ratio,
                "burn_rate": self.burn_rate, "met": self.met}


class SloWindow:
    """Counts of good and bad per objective, in one-minute slots over the last hour."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        # (slot number, [bad, total] per objective), oldest first
        self._slots: deque[tuple[int, list[list[int]]]] = deque()

    def _counts(self, now: float) -> list[list[int]]:
        slot = int(now // SLOT_SECONDS)
        if not self._slots or self._slots[-1][0] != slot:
            self._slots.append((slot, [[0, 0] for _ in OBJECTIVES]))
            while self._slots[0][0] <= slot - WINDOW_SLOTS:
                self._slots.popleft()
        return self._slots[-1][1]

    def observe(self, route: str, status: int, seconds: float) -> None:
        """One answered request (the trace middleware's, as it feeds the histogram)."""
        latency = _LATENCY.get(route)
        counted = route not in NOT_COUNTED_AS_ERRORS
        if latency is None and not counted:
            return
        with self._lock:
            counts = self._counts(self._clock())
            if latency is not None:
                index, bound = latency
                counts[index][1] += 1
                counts[index][0] += int(bound is not None and seconds > bound)
            if counted:
                counts[_ERRORS][1] += 1
                counts[_ERRORS][0] += int(status >= 500)

    def sample_freshness(self, lag_seconds: float) -> None:
        with self._lock:
            counts = self._counts(self._clock())[_FRESHNESS]
            counts[1] += 1
            counts[0] += int(lag_seconds > FRESHNESS_BOUND_SECONDS)

    def report(self) -> tuple[float, list[Compliance]]:
        """The seconds the window covers now, and each objective over it."""
        with self._lock:
            now = self._clock()
            self._counts(now)  # drops slots that left the window
            opened = (int(now // SLOT_SECONDS) - WINDOW_SLOTS + 1) * SLOT_SECONDS
            totals = [[sum(s[1][i][k] for s in self._slots) for k in (0, 1)]
                      for i in range(len(OBJECTIVES))]
        covered = now - max(opened, self.started)
        return covered, [Compliance(o.slo, o.objective, o.budget, bad, total)
                         for o, (bad, total) in zip(OBJECTIVES, totals, strict=True)]

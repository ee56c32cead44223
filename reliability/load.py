"""An open-model load generator: requests leave on a fixed schedule, whatever the answers do.

Request ``i`` is *intended* to leave at ``start + i / rate``. A closed-loop generator (send,
wait for the answer, send the next) slows down exactly when the server stalls, so the stall
never shows in its latencies (coordinated omission). Here each request is scheduled
independently and its latency is measured from its intended send time: a request that had to
wait for a free connection, or for the generator itself, carries that wait. ``lag`` (sent −
intended) says how much of a latency was the generator's own queueing.

It runs on its own event loop in a thread, so a scenario can break things while it runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx

from bench.common import percentile


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    tag: Any = None  # what the scenario needs to judge the answer (e.g. the event ids)


@dataclass(frozen=True)
class Outcome:
    request: Request
    index: int  # its place in the schedule (-1: sent outside one)
    intended: float  # time.monotonic() the schedule set for it
    sent: float
    done: float
    status: int  # 0: no answer (connection refused or reset, timeout)
    headers: Mapping[str, str]
    body: bytes
    error: str = ""

    @property
    def latency(self) -> float:
        return self.done - self.intended


class OpenLoad:
    """``rate`` requests per second for ``duration`` seconds (or until :meth:`stop`)."""

    def __init__(self, base_url: str, rate: float, duration: float,
                 make: Callable[[int], Request], max_connections: int = 64,
                 timeout: float = 30.0, prebuild: bool = False) -> None:
        """``prebuild``: make every request before the first leaves, so that building bodies
        cannot make the generator itself fall behind its schedule (on a busy machine)."""
        self.base_url, self.rate, self.duration = base_url, rate, duration
        self.max_connections, self.timeout = max_connections, timeout
        if prebuild:
            built = [make(i) for i in range(int(rate * duration))]
            self.make: Callable[[int], Request] = built.__getitem__
        else:
            self.make = make
        self.outcomes: list[Outcome] = []
        self.started = self.stopped = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()),
                                        name="open-load", daemon=True)

    def start(self) -> OpenLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Schedule nothing more; requests in flight still finish (see :meth:`join`)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> list[Outcome]:
        self._thread.join(timeout)
        return self.outcomes

    def run(self) -> list[Outcome]:
        return self.start().join()

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.max_connections,
                              max_keepalive_connections=self.max_connections)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits,
                                     timeout=self.timeout) as client:
            tasks: list[asyncio.Task[None]] = []
            self.started = time.monotonic()
            i = 0
            while not self._stop.is_set():
                # by the offset itself: (started + offset) - started may round below duration
                # and send one request more than the scenario made
                if i / self.rate >= self.duration:
                    break
                intended = self.started + i / self.rate
                delay = intended - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self._send(client, i, intended)))
                i += 1
            self.stopped = time.monotonic()
            await asyncio.gather(*tasks)

    async def _send(self, client: httpx.AsyncClient, i: int, intended: float) -> None:
        request = self.make(i)
        sent = time.monotonic()
        try:
            r = await client.request(request.method, request.path, content=request.body,
                                     headers=dict(request.headers))
            outcome = Outcome(request, i, intended, sent, time.monotonic(), r.status_code,
                              dict(r.headers), r.content)
        except httpx.HTTPError as exc:
            outcome = Outcome(request, i, intended, sent, time.monotonic(), 0, {}, b"",
                              f"{type(exc).__name__}: {exc}")
        self.outcomes.append(outcome)


def send_once(base_url: str, request: Request, timeout: float = 30.0) -> Outcome:
    """One request outside any schedule (its intended time is when it left)."""
    sent = time.monotonic()
    try:
        r = httpx.request(request.method, base_url + request.path, content=request.body,
                          headers=dict(request.headers), timeout=timeout)
    except httpx.HTTPError as exc:
        return Outcome(request, -1, sent, sent, time.monotonic(), 0, {}, b"",
                       f"{type(exc).__name__}: {exc}")
    return Outcome(request, -1, sent, sent, time.monotonic(), r.status_code, dict(r.headers),
                   r.content)


@dataclass(frozen=True)
class LoadSummary:
    requests: int
    statuses: Counter[int]
    seconds: float  # from the first intended send to the last scheduled one
    p50: float
    p99: float
    max: float
    max_lag: float  # the generator's own worst delay behind the schedule

    @classmethod
    def of(cls, outcomes: list[Outcome], seconds: float,
           statuses: tuple[int, ...] = (202,)) -> LoadSummary:
        """Latency percentiles of the answers with ``statuses`` (from intended send time)."""
        latencies = [o.latency for o in outcomes if o.status in statuses] or [0.0]
        return cls(len(outcomes), Counter(o.status for o in outcomes), seconds,
                   percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies),
                   max((o.sent - o.intended for o in outcomes), default=0.0))

    def describe(self) -> str:
        counts = ", ".join(f"{s or 'no answer'}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"{self.requests} requests in {self.seconds:.1f} s ({counts}); "
                f"p50 {self.p50 * 1000:.0f} ms, p99 {self.p99 * 1000:.0f} ms, "
                f"max {self.max * 1000:.0f} ms")

"""SIGKILL cycles with concurrent writers: nothing acknowledged is lost or doubled.

2-4 producer threads post batches of varied size — some repeating events already acknowledged,
some repeating events inside the batch, some under an ``X-Idempotency-Key`` — while the server
is SIGKILLed at a random moment and restarted, cycle after cycle. A batch whose answer never
came is retried first after the restart (same body, same key), as an at-least-once producer
does. At the end the store is read back: every acknowledged event exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx

from reliability.events import bet, body, recent_hour
from reliability.findings import Findings
from reliability.server import Deployment
from reliability.setcheck import EventSet

BATCH_SIZES = (1, 3, 40, 250, 1000, 2500)
ACCEPTABLE_REFUSALS = (429, 503)  # push-back: retried later, with Retry-After
DRAIN_SECONDS = 120  # the last round: retries of batches in doubt must get through by then


@dataclass(frozen=True)
class Size:
    cycles: int
    writers: int
    kill_after: tuple[float, float]  # seconds after the writers start, drawn uniformly


SIZES = {"test": Size(2, 3, (0.5, 2.5)), "quick": Size(6, 3, (0.3, 3.0)),
         "full": Size(30, 4, (0.2, 4.0))}


@dataclass
class Batch:
    events: list[dict[str, Any]]
    key: str | None

    def keys(self) -> list[tuple[str, str]]:
        return [(e["tenant_id"], e["event_id"]) for e in self.events]


@dataclass
class Producer:
    name: str
    rng: random.Random
    events: EventSet
    findings: Findings
    pending: list[Batch] = field(default_factory=list)  # sent, answer never came: retry
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("batches", "acknowledged", "retried", "repeats sent", "refused"), 0))
    _n: int = 0

    def next_batch(self) -> Batch:
        if self.pending:
            self.counts["retried"] += 1
            return self.pending.pop(0)
        self._n += 1
        hour = recent_hour()
        events = [bet(f"{self.name}-{self._n}-{i}",
                      hour + timedelta(seconds=self.rng.uniform(0, 3599)))
                  for i in range(self.rng.choice(BATCH_SIZES))]
        if self.recent and self.rng.random() < 0.2:  # events already acknowledged, again
            events += self.rng.sample(list(self.recent), min(len(self.recent), 30))
        if self.rng.random() < 0.1:  # the same event twice in one batch
            events += self.rng.sample(events, min(len(events), 5))
        self.counts["repeats sent"] += len(events) - len({e["event_id"] for e in events})
        key = f"{self.name}-{self._n}" if self.rng.random() < 0.3 else None
        return Batch(events, key)

    def produce(self, url: str, headers: dict[str, str], stop: threading.Event,
                drain: bool = False) -> None:
        """Post batches until ``stop``; with ``drain``, until nothing is pending and one new
        batch went through (the restarted server takes writes)."""
        fresh, deadline = 0, time.monotonic() + DRAIN_SECONDS
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            while ((self.pending or fresh < 1) and time.monotonic() < deadline if drain
                   else not stop.is_set()):
                fresh += not self.pending
                batch = self.next_batch()
                self.events.record_sent(batch.keys())
                extra = {"X-Idempotency-Key": batch.key} if batch.key else {}
                try:
                    r = http.post("/v1/events:batch", content=body(batch.events), headers=extra)
                except httpx.TransportError:
                    self.pending.insert(0, batch)  # in doubt: maybe stored, never acknowledged
                    return
                if not self._judge(batch, r):
                    return

    def _judge(self, batch: Batch, r: httpx.Response) -> bool:
        self.counts["batches"] += 1
        if r.status_code == 202:
            receipt = r.json()
            total = receipt["accepted"] + receipt["duplicates"] + receipt["rejected"]
            self.findings.expect(total == len(batch.events) and receipt["rejected"] == 0,
                                 f"{self.name}: receipt {receipt} for {len(batch.events)} "
                                 "valid events")
            self.events.record_acknowledged(batch.keys())
            self.counts["acknowledged"] += 1
            self.recent.extend(batch.events)
            return True
        if r.status_code in ACCEPTABLE_REFUSALS and "retry-after" in r.headers:
            self.counts["refused"] += 1
            self.pending.insert(0, batch)
            time.sleep(min(float(r.headers["retry-after"]), 2.0))
            return True
        self.findings.expect(False, f"{self.name}: {r.status_code} {r.text[:200]}")
        self.pending.insert(0, batch)
        return False


def _round(deployment: Deployment, producers: list[Producer], kill_after: float | None) -> None:
    """Run every producer against the running server; SIGKILL it after ``kill_after`` s
    (None: let each producer drain what it has pending, then stop)."""
    server, headers, stop = deployment.running, deployment.headers(), threading.Event()
    threads = [threading.Thread(target=p.produce, args=(server.url, headers, stop,
                                                        kill_after is None))
               for p in producers]
    for t in threads:
        t.start()
    if kill_after is not None:
        time.sleep(kill_after)
        deployment.kill()
    stop.set()  # after a kill the producers see the connection die; else they drain
    for t in threads:
        t.join(timeout=120)


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("SIGKILL cycles with concurrent writers")
    rng = random.Random(20260109)
    events = EventSet()
    deployment = Deployment.create(workdir / "data")
    producers = [Producer(f"w{n}", random.Random(rng.random()), events, findings)
                 for n in range(size.writers)]
    try:
        for _ in range(size.cycles):
            deployment.start()
            _round(deployment, producers, rng.uniform(*size.kill_after))
        deployment.start()  # the last restart replays the journal; producers retry and drain
        _round(deployment, producers, None)
        stopped = deployment.stop()
        findings.expect(stopped is not None, "the final SIGTERM did not stop the server")
        if stopped is None:
            deployment.replay(findings)
    finally:
        deployment.kill()
    events.check(deployment.data, findings)
    findings.figure("kill cycles", size.cycles)
    findings.figure("writers", size.writers)
    for name in producers[0].counts:
        findings.figure(f"batches {name}" if name != "repeats sent" else "repeated events sent",
                        sum(p.counts[name] for p in producers))
    return findings.finish()

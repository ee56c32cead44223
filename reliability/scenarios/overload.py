"""Overload: more events than the store applies, at a fixed rate, from several clients.

An open-model load (``load.py``) posts small batches (100 events, the issue's case) at a fixed
rate for a while, each batch's events spread over two hours of ``occurred_at`` (``Clock``), so
the answers' ``X-Data-Watermark`` has something to claim. Promised (issue 9, defect 3):

- every answer is ``202``, or ``503``/``429`` with ``Retry-After`` (push-back), none is lost
  in the network (no timeout), none is a ``500``;
- an answer never claims events it lacks: in every minute bucket that ends at or before the
  answer's watermark, the count of bets is at least the events acknowledged before the query
  left, and at most the events sent;
- once the load stops, every acknowledged event is in the answers within ``VISIBLE_WITHIN``.

Reported: acknowledgement p50/p99 from the intended send time, the applied rate, and the
largest freshness lag the server published (``tally_rollup_freshness_lag_seconds``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reliability.batches import BatchSource
from reliability.findings import Findings
from reliability.load import LoadSummary, OpenLoad, Outcome, Request
from reliability.promises import judge_ingestion
from reliability.queries import Answer, bets
from reliability.server import Deployment, RealServer, register_client
from reliability.setcheck import EventSet

VISIBLE_WITHIN = 15.0
SPAN = timedelta(hours=2)  # occurred_at of the whole run spreads over this (120 buckets of 1m)
BATCH = 100


@dataclass(frozen=True)
class Size:
    rate: float  # batches per second
    seconds: float
    clients: int


SIZES = {"test": Size(50, 10, 3), "quick": Size(100, 20, 4), "full": Size(150, 30, 4)}


@dataclass
class Clock:
    """Where each event of the run falls in ``[start, start + SPAN)``: request ``i`` spreads
    its events over the whole span (event ``j`` at slot ``j × requests + i``), as producers'
    clocks, retries and late events do; so a watermark taken from the latest event applied
    would claim minutes whose events are still waiting (the issue's lie)."""

    start: datetime
    requests: int

    @property
    def step(self) -> timedelta:
        return SPAN / (self.requests * BATCH)

    def at(self, request: int, j: int) -> datetime:
        return self.start + ((j * self.requests + request) % (self.requests * BATCH)) * self.step

    def buckets(self, request: int) -> Counter[datetime]:
        return Counter(self.at(request, j).replace(second=0, microsecond=0)
                       for j in range(BATCH))


class Watcher(threading.Thread):
    """Queries and scrapes once a second while the load runs."""

    def __init__(self, server: RealServer, headers: dict[str, str], clock: Clock) -> None:
        super().__init__(name="watcher", daemon=True)
        self.server, self.headers, self.clock = server, headers, clock
        self.answers: list[Answer] = []
        self.max_lag = 0.0
        self.stop = threading.Event()

    def ask(self) -> Answer:
        sent = time.monotonic()
        answer = bets(self.server.url, self.headers, self.clock.start, self.clock.start + SPAN)
        answer = Answer(answer.status, answer.points, answer.watermark, sent, answer.retry_after)
        self.answers.append(answer)
        return answer

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.ask()
            lag = self.server.metric("tally_rollup_freshness_lag_seconds")
            self.max_lag = max(self.max_lag, lag or 0.0)


def untruthful(answers: list[Answer], outcomes: list[Outcome], clock: Clock) -> list[str]:
    """Every answer whose watermark claims a bucket it does not fully include."""
    buckets = {o.index: clock.buckets(o.index) for o in outcomes}
    sent: Counter[datetime] = Counter()
    for counts in buckets.values():
        sent.update(counts)
    acked = sorted((o.done, o.index) for o in outcomes if o.status == 202)
    before: Counter[datetime] = Counter()  # acknowledged before the current answer's query
    taken, broken = 0, []
    for answer in sorted(answers, key=lambda a: a.sent):
        while taken < len(acked) and acked[taken][0] < answer.sent:
            before.update(buckets[acked[taken][1]])
            taken += 1
        if answer.status != 200 or answer.watermark is None:
            continue
        for bucket, n in sorted(before.items()):
            got = answer.points.get(bucket, 0)
            if bucket + timedelta(minutes=1) <= answer.watermark and not n <= got <= sent[bucket]:
                broken.append(f"watermark {answer.watermark:%H:%M:%S} claims bucket "
                              f"{bucket:%H:%M}: {got} bets answered, {n} acknowledged before "
                              f"the query, {sent[bucket]} sent")
                break
    return broken


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("overload with an open-model load")
    deployment = Deployment.create(workdir / "data")
    creds = [deployment.creds] + [register_client(deployment.data)
                                  for _ in range(size.clients - 1)]
    clock = Clock((datetime.now(UTC) - SPAN - timedelta(hours=1)).replace(
        minute=0, second=0, microsecond=0), int(size.rate * size.seconds))
    events = EventSet()
    try:
        deployment.start()
        sources = [BatchSource("ol", BATCH, deployment.headers(c), events, clock.at)
                   for c in creds]
        _load(deployment, lambda i: sources[i % len(sources)](i), size, clock, events,
              findings)
        seconds = deployment.stop()
        findings.figure("shutdown s", seconds if seconds is not None else -1)
        deployment.replay(findings)
    finally:
        deployment.kill()
    events.check(deployment.data, findings)
    return findings.finish()


def _load(deployment: Deployment, make: Callable[[int], Request], size: Size, clock: Clock,
          events: EventSet, findings: Findings) -> None:
    server = deployment.running
    watcher = Watcher(server, deployment.headers(), clock)
    load = OpenLoad(server.url, size.rate, size.seconds, make, max_connections=256,
                    prebuild=True)
    watcher.start()
    outcomes = load.run()
    watcher.stop.set()
    watcher.join()
    ended = time.monotonic()
    counts = judge_ingestion(outcomes, events, findings, "overload")
    acked = len(events.acknowledged)
    visible_after = None
    while time.monotonic() - ended < VISIBLE_WITHIN:
        answer = watcher.ask()
        if answer.status == 200 and answer.total >= acked:
            visible_after = time.monotonic() - ended
            break
        time.sleep(0.5)
    last = watcher.answers[-1]
    findings.expect(visible_after is not None,
                    f"{VISIBLE_WITHIN:.0f} s after the load, {last.total} of {acked} "
                    "acknowledged events are in the answers")
    lies = untruthful(watcher.answers, outcomes, clock)
    findings.expect(not lies, f"{len(lies)} of {len(watcher.answers)} answers claimed events "
                              f"they did not include, e.g. {lies[:2]}")
    summary = LoadSummary.of(outcomes, load.stopped - load.started)
    findings.figure("offered batches/s", size.rate)
    findings.figure("offered events/s", size.rate * BATCH)
    findings.figure("seconds", size.seconds)
    findings.figure("batches", summary.requests)
    for name, n in counts.items():
        findings.figure(f"batches {name}", n)
    findings.figure("acknowledged events/s", acked / max(summary.seconds, 1e-9))
    findings.figure("ack p50 ms", summary.p50 * 1000)
    findings.figure("ack p99 ms", summary.p99 * 1000)
    findings.figure("ack max ms", summary.max * 1000)
    findings.figure("generator max lag ms", summary.max_lag * 1000)
    findings.figure("max freshness lag s", watcher.max_lag)
    findings.figure("all visible after load s", visible_after if visible_after is not None
                    else -1)
    findings.figure("applied events/s", acked / (ended - load.started + (visible_after or 0))
                    if visible_after is not None else -1)
    findings.figure("answers checked", len(watcher.answers))
    findings.figure("queries unanswered in 30 s", sum(a.status == 0 for a in watcher.answers))

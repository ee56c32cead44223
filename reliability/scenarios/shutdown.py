"""Graceful shutdown under a backlog: SIGTERM ends the process in bounded time and loses
nothing acknowledged (issue 9, defect 3: it was still draining after 400 s).

An open-model load of small batches builds an applier backlog; SIGTERM arrives while batches
still come in. The process must exit within ``SHUTDOWN_BOUND`` seconds whatever the backlog
(what it has not applied stays in the journal for the next start), and after a restart every
acknowledged event is stored exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from reliability.batches import BatchSource
from reliability.findings import Findings
from reliability.load import LoadSummary, OpenLoad
from reliability.promises import judge_ingestion
from reliability.server import Deployment
from reliability.setcheck import EventSet

SHUTDOWN_BOUND = 30.0
BATCH = 100


@dataclass(frozen=True)
class Size:
    rate: float  # batches per second
    seconds: float  # of load before the SIGTERM


SIZES = {"test": Size(80, 8), "quick": Size(100, 15), "full": Size(150, 30)}


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("SIGTERM under an applier backlog")
    deployment = Deployment.create(workdir / "data")
    events = EventSet()
    try:
        server = deployment.start()
        load = OpenLoad(server.url, size.rate, size.seconds + 2,
                        BatchSource("sd", BATCH, deployment.headers(), events),
                        max_connections=256, prebuild=True).start()
        time.sleep(size.seconds)
        backlog = server.metric("tally_applier_pending_rows")  # None: no answer within 5 s
        findings.figure("backlog rows at SIGTERM", backlog if backlog is not None else -1)
        seconds = deployment.stop(SHUTDOWN_BOUND)
        load.stop()
        outcomes = load.join()
        findings.expect(seconds is not None, f"SIGTERM: still running after "
                                             f"{SHUTDOWN_BOUND:.0f} s (then SIGKILLed)")
        findings.figure("shutdown s", seconds if seconds is not None else -1)
        counts = judge_ingestion(outcomes, events, findings, "load across the SIGTERM",
                                 answers_required=False)  # the process went away under them
        for name, n in counts.items():
            findings.figure(f"batches {name}", n)
        summary = LoadSummary.of(outcomes, load.stopped - load.started)
        findings.figure("ack p99 ms", summary.p99 * 1000)
        deployment.replay(findings)  # what the journal kept reaches the store
    finally:
        deployment.kill()
    events.check(deployment.data, findings)
    return findings.finish()

"""Disk full and read-only filesystems under the journal, the store and the audit log.

Three ext4 filesystems (``volumes.py`` says why ext4): one at ``DATA`` (the store and the
metadata), one at ``DATA/journal`` and one at ``DATA/audit``, so each can fail alone. Batches
arrive throughout from an open-model load. The promises (issue 9, defect 2):

- every batch is ``202`` and durable, or refused with ``503``/``429`` and ``Retry-After``;
  never a ``500``, never a ``202`` that a restart then lacks;
- ``/readyz`` answers ``503`` while the journal or the store cannot be written, and ``200``
  again once space is freed, without a restart; acknowledged events then reach the store;
- a query that the audit log cannot record is ``503`` with ``Retry-After``, and queries work
  again once the log can be written;
- a read-only filesystem (ext4 ``errors=remount-ro``) gives the same refusals; SIGTERM still
  stops the server in bounded time, and after the operator repairs the filesystem the
  restarted server has every acknowledged event and an intact audit log.

A batch of 9,000 events into a journal with less free space than its record (the issue's
reproduction: a short ``write`` acknowledged) is part of the journal-full phase.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from reliability.batches import BatchSource, batch_request
from reliability.events import bet, recent_hour
from reliability.findings import Findings
from reliability.load import OpenLoad, send_once
from reliability.promises import is_push_back, judge_ingestion
from reliability.queries import bets
from reliability.server import Deployment
from reliability.setcheck import EventSet
from reliability.volumes import Ext4Volume, ext4
from tally.audit.verify import verify_data_dir

MIB = 1 << 20
DATA_BYTES, JOURNAL_BYTES, AUDIT_BYTES = 96 * MIB, 160 * MIB, 16 * MIB  # journal: a 64 MiB
BIG_BATCH = 9_000  # events: a ~3.3 MB journal record                      # segment and more
SHORT_OF_A_RECORD = 3 * MIB // 2  # free space left in the journal before the big batches
REFUSAL_WITHIN = 3  # batches into a full journal: one may still fit in space it reserved
READY_WITHIN = 10.0  # seconds for /readyz to follow the disk
VISIBLE_WITHIN = 15.0  # seconds for an acknowledged event to reach answers after recovery
SHUTDOWN_BOUND = 30.0


AUDIT_SLACK_QUERIES = 40  # an entry is ~0.4 KiB: a 4 KiB block's slack is ~10


@dataclass(frozen=True)
class Size:
    rate: float  # background batches per second
    batch: int  # events per background batch
    big_batches: int  # 9,000-event batches sent into the nearly full journal
    settle: float  # seconds each fault is left under load before it is judged


SIZES = {"test": Size(4, 200, 2, 1.5), "quick": Size(6, 300, 3, 3.0),
         "full": Size(10, 500, 4, 6.0)}


@dataclass
class Volumes:
    data: Ext4Volume
    journal: Ext4Volume
    audit: Ext4Volume

    def repair(self) -> None:
        """fsck all three; the inner ones come off first and go back last."""
        for inner in (self.journal, self.audit):
            inner.unmount()
        self.data.repair()
        for inner in (self.journal, self.audit):
            inner.check()
            inner.mount()


class Run:
    """One deployment on the three volumes, with the state the phases share."""

    def __init__(self, deployment: Deployment, volumes: Volumes, size: Size,
                 findings: Findings) -> None:
        self.d, self.v, self.size, self.f = deployment, volumes, size, findings
        self.events = EventSet()
        self.headers = deployment.headers()
        self.hour = recent_hour()
        self.markers = 0

    def readiness_follows(self, status: int, what: str) -> None:
        took = self.d.running.await_readiness(status, READY_WITHIN)
        self.f.expect(took is not None,
                      f"{what}: /readyz did not answer {status} within {READY_WITHIN:.0f} s")
        if took is not None:
            self.f.figure(f"{what}: /readyz {status} after s", took)

    def post(self, n: int, what: str, expect_refusal: bool = False) -> bool:
        """One batch of ``n`` fresh events (brand ``mark-<k>``); True if acknowledged."""
        self.markers += 1
        brand = f"mark-{self.markers}"
        events = [bet(f"{brand}-{j}", self.hour + timedelta(seconds=j % 3600), brand)
                  for j in range(n)]
        outcome = send_once(self.d.running.url, batch_request(self.headers, events, self.events))
        judge_ingestion([outcome], self.events, self.f, what)
        if expect_refusal:
            self.f.expect(is_push_back(outcome.status, outcome.headers),
                          f"{what}: a batch got {outcome.status}, not 503 with Retry-After")
        return outcome.status == 202

    def visible(self, brand: str, n: int, what: str) -> None:
        deadline = time.monotonic() + VISIBLE_WITHIN
        seen = -1
        while time.monotonic() < deadline and seen != n:
            answer = bets(self.d.running.url, self.headers, self.hour, self.hour
                          + timedelta(hours=1), "1h", brand)
            seen = answer.total if answer.status == 200 else -1
            time.sleep(0.2)
        self.f.expect(seen == n, f"{what}: {n} acknowledged events, {seen} visible after "
                                 f"{VISIBLE_WITHIN:.0f} s")

    def query_status(self) -> tuple[int, bool]:
        answer = bets(self.d.running.url, self.headers, self.hour,
                      self.hour + timedelta(hours=1), "1h")
        return answer.status, answer.retry_after is not None

    # -- the phases, in order: full (reversible), then read-only (needs the operator) -------
    def journal_full(self) -> None:
        self.v.journal.fill(leave=SHORT_OF_A_RECORD)
        for _ in range(self.size.big_batches):
            self.post(BIG_BATCH, "journal full: 9,000-event batch")
        self.v.journal.fill()  # whatever the batches left
        refused = any(not self.post(2_000, "journal full") for _ in range(REFUSAL_WITHIN))
        self.f.expect(refused, f"journal full: {REFUSAL_WITHIN} batches of 2,000 events in a "
                               "row were all acknowledged")
        self.readiness_follows(503, "journal full")
        self.v.journal.free()
        self.readiness_follows(200, "journal freed")
        self.f.expect(self.post(10, "journal freed"), "journal freed: a batch was refused")

    def store_full(self) -> None:
        self.v.data.fill()
        time.sleep(self.size.settle)  # the background batches make the applier write
        self.readiness_follows(503, "store full")
        self.v.data.free()
        self.readiness_follows(200, "store freed")
        if self.post(10, "store freed"):
            self.visible(f"mark-{self.markers}", 10, "store freed")

    def audit_full(self) -> None:
        self.v.audit.fill()
        # the log's last block may still hold a few entries (a full file system still lets a
        # file grow inside a block it has): those queries are answered, and recorded; once
        # an entry cannot be written, the query is refused
        for _ in range(AUDIT_SLACK_QUERIES):
            status, retry = self.query_status()
            if status != 200:
                break
        self.f.expect(status == 503 and retry, f"audit log full: a query got {status}"
                                               f"{'' if retry else ' without Retry-After'}")
        self.v.audit.free()
        deadline = time.monotonic() + READY_WITHIN
        while self.query_status()[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        self.f.expect(self.query_status()[0] == 200,
                      f"audit log freed: queries still refused after {READY_WITHIN:.0f} s")

    def read_only(self) -> None:
        """Audit, then store, then journal turn read-only; each adds its refusal."""
        self.v.audit.trip_read_only()
        status, retry = self.query_status()
        self.f.expect(status == 503 and retry, f"audit log read-only: a query got {status}")
        self.v.data.trip_read_only()
        time.sleep(self.size.settle)
        self.readiness_follows(503, "store read-only")
        self.v.journal.trip_read_only()
        self.post(10, "journal read-only", expect_refusal=True)
        self.readiness_follows(503, "journal read-only")


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("disk full and read-only: journal, store, audit log")
    data, images = workdir / "data", workdir / "images"
    with contextlib.ExitStack() as mounts:
        volumes = Volumes(mounts.enter_context(ext4(data, DATA_BYTES, images / "data.img")),
                          mounts.enter_context(ext4(data / "journal", JOURNAL_BYTES,
                                                    images / "journal.img")),
                          mounts.enter_context(ext4(data / "audit", AUDIT_BYTES,
                                                    images / "audit.img")))
        deployment = Deployment.create(data)
        try:
            deployment.start()
            _faults(Run(deployment, volumes, size, findings), findings)
        finally:
            deployment.kill()
    return findings.finish()


def _faults(run: Run, findings: Findings) -> None:
    load = OpenLoad(run.d.running.url, run.size.rate, 3600,
                    BatchSource("bg", run.size.batch, run.headers, run.events)).start()
    try:
        for phase in (run.journal_full, run.store_full, run.audit_full, run.read_only):
            phase()
    finally:
        load.stop()
        outcomes = load.join(60)
    counts = judge_ingestion(outcomes, run.events, findings, "background load")
    for name, n in counts.items():
        findings.figure(f"background batches {name}", n)
    seconds = run.d.stop(SHUTDOWN_BOUND)
    findings.expect(seconds is not None, f"SIGTERM on read-only disks: still running after "
                                         f"{SHUTDOWN_BOUND:.0f} s")
    findings.figure("shutdown on read-only disks s", seconds if seconds is not None else -1)
    run.v.repair()
    run.d.replay(findings)  # the operator's restart: the journal reaches the repaired store
    run.events.check(run.d.data, findings)
    verdict = verify_data_dir(run.d.data)
    findings.expect(verdict.intact, f"audit log after repair: {verdict.summary()}")

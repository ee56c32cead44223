"""Slow and idle clients cannot take the server from well-behaved ones (issue 9, defect 9).

Thousands of connections that send nothing, slowloris connections that trickle header lines
and never finish them, and authenticated uploads that trickle their body: meanwhile a
well-behaved client opens a new connection every 100 ms for ``GET /healthz`` and posts a small
batch every 500 ms. Promised: the well-behaved requests are answered within a second each
(measured from their scheduled time), and a connection that has not sent its headers within
the header timeout (``TALLY_HEADER_TIMEOUT_SECONDS``, set here) is closed by the server within
twice that timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx2 as httpx

from bench.common import percentile
from reliability.events import bet, body, recent_hour
from reliability.findings import Findings
from reliability.server import Deployment

HEADER_TIMEOUT_ENV = "TALLY_HEADER_TIMEOUT_SECONDS"
PROBE_BOUND = 1.0  # seconds: a well-behaved request under attack


@dataclass(frozen=True)
class Size:
    idle: int
    slowloris: int
    slow_bodies: int
    header_timeout: float
    seconds: float  # how long the well-behaved client keeps probing (at least 2 × timeout)


SIZES = {"test": Size(2000, 50, 20, 2.0, 6.0), "quick": Size(2000, 100, 50, 2.0, 8.0),
         "full": Size(5000, 300, 100, 3.0, 15.0)}


@dataclass
class Attack:
    host: str
    port: int
    token: str
    opened: int = 0
    refused: int = 0  # connections the server would not even accept
    held: dict[str, list[float]] = field(default_factory=dict)  # kind → seconds until closed

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            pair = await asyncio.open_connection(self.host, self.port)
        except OSError:
            self.refused += 1
            return None
        self.opened += 1
        return pair

    async def hold(self, kind: str, trickle: list[bytes], every: float, until: float) -> None:
        """Connect, send ``trickle`` one piece every ``every`` s; record when the server
        closed the connection (or ``until`` if it never did)."""
        pair = await self.connect()
        if pair is None:
            return
        reader, writer = pair
        opened = time.monotonic()
        closed = asyncio.ensure_future(reader.read())  # EOF (b"") or a response then EOF
        pieces = iter(trickle)
        while not closed.done() and time.monotonic() < until:
            piece = next(pieces, None)
            if piece is not None:
                with contextlib.suppress(OSError):
                    writer.write(piece)
            await asyncio.wait([closed], timeout=every)
        self.held.setdefault(kind, []).append(
            (time.monotonic() if closed.done() else until) - opened)
        if not closed.done():
            closed.cancel()
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await closed  # a reset is a close too
        writer.close()


async def _healthz(host: str, port: int) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
        status = await reader.readline()
        await reader.read()
        return int(status.split()[1])
    finally:
        writer.close()


async def _probe(url: str, headers: dict[str, str], until: float,
                 latencies: list[float], failures: list[str]) -> None:
    """Scheduled, not closed-loop: each request's latency counts from its slot."""
    host, port = urlsplit(url).hostname or "", urlsplit(url).port or 0
    batch = body([bet(f"probe-{i}", recent_hour()) for i in range(10)])

    async def one(slot: float, kind: str, client: httpx.AsyncClient) -> None:
        try:
            status = (await _healthz(host, port) if kind == "healthz" else
                      (await client.post("/v1/events:batch", content=batch)).status_code)
        except (OSError, httpx.HTTPError, ValueError, IndexError) as exc:
            failures.append(f"{kind}: {type(exc).__name__} {exc}")
            return
        latencies.append(time.monotonic() - slot)
        if status not in (200, 202):
            failures.append(f"{kind}: {status}")

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        tasks, start, n = [], time.monotonic(), 0
        while (slot := start + n * 0.1) < until:
            await asyncio.sleep(max(0.0, slot - time.monotonic()))
            tasks.append(asyncio.create_task(one(slot, "batch" if n % 5 == 4 else "healthz",
                                                 client)))
            n += 1
        await asyncio.gather(*tasks)


async def _attack(url: str, headers: dict[str, str], size: Size, findings: Findings) -> Attack:
    split = urlsplit(url)
    attack = Attack(split.hostname or "", split.port or 0, headers["Authorization"])
    until = time.monotonic() + max(size.seconds, 2 * size.header_timeout + 2)
    head = b"GET /healthz HTTP/1.1\r\nHost: slow\r\n"
    upload = (b"POST /v1/events:batch HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json"
              b"\r\nAuthorization: " + headers["Authorization"].encode()
              + b"\r\nContent-Length: 1000000\r\n\r\n[")
    holders = [attack.hold("idle", [], 0.5, until) for _ in range(size.idle)]
    holders += [attack.hold("slowloris", [head] + [b"X-a: b\r\n"] * 10_000, 0.5, until)
                for _ in range(size.slowloris)]
    holders += [attack.hold("slow body", [upload] + [b" "] * 100_000, 0.5, until)
                for _ in range(size.slow_bodies)]
    tasks = [asyncio.create_task(h) for h in holders]
    await asyncio.sleep(0.5)  # most attackers are connected before the probing starts
    latencies: list[float] = []
    failures: list[str] = []
    await _probe(url, headers, until, latencies, failures)
    await asyncio.gather(*tasks)
    findings.expect(not failures, f"{len(failures)} well-behaved requests failed under attack, "
                                  f"e.g. {failures[:3]}")
    worst = max(latencies, default=0.0)
    findings.figure("well-behaved requests", len(latencies) + len(failures))
    findings.figure("well-behaved p99 ms", percentile(latencies or [0.0], 0.99) * 1000)
    findings.figure("well-behaved max ms", worst * 1000)
    findings.expect(worst <= PROBE_BOUND, f"a well-behaved request took {worst:.2f} s under "
                                          f"attack (bound {PROBE_BOUND:.0f} s)")
    return attack


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("slow and idle clients")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of sockets, here
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    deployment = Deployment.create(workdir / "data",
                                   {HEADER_TIMEOUT_ENV: str(size.header_timeout)})
    try:
        deployment.start()
        attack = asyncio.run(_attack(deployment.running.url, deployment.headers(), size,
                                     findings))
        findings.expect(deployment.running.readiness() == 200, "not ready after the attack")
        deployment.stop()
    finally:
        deployment.kill()
    bound = 2 * size.header_timeout
    findings.figure("header timeout s", size.header_timeout)
    findings.figure("attacking connections", attack.opened)
    findings.figure("attacking connections refused", attack.refused)
    for kind, held in attack.held.items():
        findings.figure(f"{kind}: longest held s", max(held))
        if kind != "slow body":  # the body timeout is another setting; its figure is reported
            late = sum(1 for s in held if s > bound)
            findings.expect(late == 0, f"{late} of {len(held)} {kind} connections were still "
                                       f"open after {bound:.0f} s (2 × the header timeout)")
    return findings.finish()

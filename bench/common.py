"""Helpers shared by the benchmarks: stores, server processes, percentiles, machine facts."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
TALLY = str(Path(sys.executable).with_name("tally"))


def machine() -> dict[str, Any]:
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory": mem.split(":", 1)[1].strip(),
            "python": platform.python_version()}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 1)))
    return ordered[min(rank, len(ordered)) - 1]


JSON_MAX = 1_000_000  # above this, a demo store is built with `tally demo --bulk`


def ensure_store(stored: int, days: int) -> Path:
    """A data dir holding ``stored`` demo events, built once and reused: through `tally demo`
    (JSON batches, the HTTP path's code) up to JSON_MAX events, through `tally demo --bulk`
    (the vectorised stream and the columnar path: the same operator, a realistic stream of
    distinct players and sessions at any size) above it. The summary, with the stream's shape
    for bulk stores, is kept in ``demo.json``."""
    data = OUT / f"store-{stored}"
    marker = data / "demo.json"
    if not marker.exists():
        data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        run = subprocess.run([TALLY, "demo", "--events", str(stored), "--days", str(days),
                              "--data-dir", str(data), "--json",
                              *(["--bulk"] if stored > JSON_MAX else [])],
                             capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - started
        summary = json.loads(run.stdout)
        marker.write_text(json.dumps({**summary, "wall_seconds": seconds}))
    return data


def count_rows(con: Any) -> int:
    return int(con.execute("SELECT count(*) FROM events").fetchone()[0])


def stored_events(data: Path) -> int:
    """Events in the store at ``data``, read while no server holds it (``/readyz`` does not
    disclose counts)."""
    import duckdb

    if not (data / "events.duckdb").exists():
        return 0
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:
        return count_rows(con)
    finally:
        con.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, data: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        with (data / f"serve-{self.port}.log").open("wb") as log:
            self.proc = subprocess.Popen([TALLY, "serve", "--port", str(self.port),
                                          "--data-dir", str(data)], stdout=log, stderr=log,
                                         env={**os.environ, **(env or {})})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        self.startup_seconds = time.perf_counter() - started

    def gauge(self, name: str) -> float:
        """A label-less sample of /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return float(next(line.split()[-1] for line in text.splitlines()
                          if line.startswith(f"{name} ")))

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        return int(hwm.split()[1]) / 1024

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        rss = next(line for line in status.splitlines() if line.startswith("VmRSS"))
        return int(rss.split()[1]) / 1024

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def client_headers(url: str, data: Path, scopes: str) -> dict[str, str]:
    out = subprocess.run([TALLY, "client", "create", "--name", "bench", "--scopes", scopes,
                          "--data-dir", str(data)], capture_output=True, text=True, check=True)
    creds = json.loads(out.stdout)
    token = httpx.post(f"{url}/oauth/token", data={"grant_type": "client_credentials"},
                       auth=(creds["client_id"], creds["client_secret"])).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


async def _post_all(host: str, port: int, path: str, headers: dict[str, str],
                    bodies: list[bytes], clients: int
                    ) -> tuple[list[float], list[bytes], int]:
    """POST every body over ``clients`` keep-alive connections with pre-built request bytes:
    a load generator that costs the shared CPU almost nothing, unlike a full HTTP client."""
    import asyncio

    pending = list(reversed(bodies))
    latencies: list[float] = []
    replies: list[bytes] = []
    refusals: list[float] = []
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        while pending:
            body = pending.pop()
            request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}"
                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
            sent = time.perf_counter()
            while True:  # a producer that honours 503 + Retry-After (push-back)
                writer.write(request.encode() + body)
                await writer.drain()
                header = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                reply = await reader.readexactly(length)
                if not header.startswith(b"HTTP/1.1 503"):
                    break
                refusals.append(time.perf_counter())
                retry = next((float(line.split(b":")[1]) for line in header.split(b"\r\n")
                              if line.lower().startswith(b"retry-after")), 1.0)
                await asyncio.sleep(retry)
            latencies.append(time.perf_counter() - sent)
            if not header.startswith(b"HTTP/1.1 2"):
                raise RuntimeError(f"{header!r} {reply!r}")
            replies.append(reply)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, replies, len(refusals)


def post_all(url: str, path: str, headers: dict[str, str], bodies: list[bytes],
             clients: int) -> tuple[list[float], list[bytes], float, int]:
    """(latencies, replies, wall seconds, 503 refusals retried) of POSTing every body."""
    import asyncio

    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    latencies, replies, refused = asyncio.run(
        _post_all(host, int(port), path, headers, bodies, clients))
    return latencies, replies, time.perf_counter() - started, refused

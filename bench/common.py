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


def ensure_store(stored: int, days: int, engine: str = "duckdb") -> Path:
    """A data dir holding ``stored`` demo events, built once and reused: through `tally demo`
    (JSON batches, the HTTP path's code) up to JSON_MAX events, through `tally demo --bulk`
    (the vectorised stream and the columnar path: the same operator, a realistic stream of
    distinct players and sessions at any size) above it. The summary, with the stream's shape
    for bulk stores, is kept in ``demo.json``. ``engine``: the store ``TALLY_STORE`` names
    (``chdb``: its own data dir, ``store-chdb-<N>``)."""
    data = OUT / (f"store-{stored}" if engine == "duckdb" else f"store-{engine}-{stored}")
    marker = data / "demo.json"
    if not marker.exists():
        data.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        run = subprocess.run([TALLY, "demo", "--events", str(stored), "--days", str(days),
                              "--data-dir", str(data), "--json",
                              *(["--bulk"] if stored > JSON_MAX else [])],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "TALLY_STORE": engine})
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


# the rate limits off: a benchmark measures the server's ceiling, not its admission policy
UNLIMITED = {"TALLY_RATE_CLIENT": "off", "TALLY_RATE_BRAND": "off", "TALLY_RATE_REGION": "off",
             "TALLY_RATE_TOKEN": "off"}


class Server:
    def __init__(self, data: Path, env: dict[str, str] | None = None,
                 command: tuple[str, ...] = (TALLY, "serve")) -> None:
        """``command``: what serves ``data``, given ``--port P --data-dir D`` (``tally serve``,
        or bench/server_ab.py's other ASGI servers)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        started = time.perf_counter()
        with (data / f"serve-{self.port}.log").open("wb") as log:
            self.proc = subprocess.Popen([*command, "--port", str(self.port),
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

    def cpu_seconds(self) -> float:
        """CPU the server process has used (all its threads, DuckDB's included)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


def _response(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response off a keep-alive socket (its status; the bytes after it)."""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("the server closed the connection")
        buf += got
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head.split(b" ", 2)[1], rest[length:]


def _client(port: int, requests: list[bytes], out: Any) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf, latencies = b"", []
    for request in requests:
        started = time.perf_counter()
        sock.sendall(request)
        status, buf = _response(sock, buf)
        latencies.append(time.perf_counter() - started)
        if status not in (b"200", b"304"):
            out.put(RuntimeError(f"HTTP {status.decode()}"))
            return
    sock.close()
    out.put(latencies)


def lean_load(url: str, headers: dict[str, str], path: str, items: list[Any], method: str,
              clients: int) -> list[float]:
    """``items`` (query parameters for GET, JSON bodies for POST) sent by ``clients``
    processes, each on one keep-alive connection with requests built beforehand: the
    latencies of the server, not of a Python HTTP client's work and its threads' GIL (three
    httpx clients in one process added ~1–2 ms to a 1 ms answer)."""
    import multiprocessing
    from urllib.parse import urlencode, urlsplit

    port = urlsplit(url).port
    assert port is not None
    fixed = {**headers, "Host": f"127.0.0.1:{port}"}

    def built(item: Any) -> bytes:
        if method == "GET":
            head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
            return f"GET {path}?{urlencode(item)} HTTP/1.1\r\n{head}\r\n".encode()
        body = json.dumps(item).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in {**fixed, "Content-Type": "application/json",
                                                      "Content-Length": len(body)}.items())
        return f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body

    requests = [built(item) for item in items]
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    procs = [context.Process(target=_client, args=(port, requests[i::clients], out))
             for i in range(clients) if requests[i::clients]]
    for proc in procs:
        proc.start()
    found = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    failed = [f for f in found if isinstance(f, Exception)]
    if failed:
        raise failed[0]
    return [latency for part in found for latency in part]

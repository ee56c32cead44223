"""The ASGI server under the app, measured (issue 14 item 3: "if the framework itself is the
bound, measure the alternatives"): the same app on the same store served by uvicorn (as
``tally serve`` does) and by granian (its embedded server, one worker), alternated in rounds.

For a cached answer (a timeseries asked again: the answer cache serves it) and for a 304
revalidation, at 1 and 3 clients on raw keep-alive sockets (bench.common.lean_load): the
latency p50/p95 and the server process's CPU per request (``/proc``, all its threads). These
are the requests where the server's own work is the whole cost; a query's work is the same
under either server.

    python -m bench.server_ab [--events 100000] [--rounds 2] [--requests 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.common import OUT, lean_load
from tests.server import TALLY, VERIFY, free_port, new_client, token

PATH = "/v1/analytics/timeseries"
QUERY = {"metric": "ggr", "granularity": "1h", "from": "2025-10-01T00:00:00Z",
         "to": "2025-10-02T00:00:00Z"}
SERVERS = ("uvicorn", "granian")
# limits off: the bench asks faster than a client's default rate
ENV = {"TALLY_RATE_CLIENT": "off", "TALLY_RATE_BRAND": "off", "TALLY_RATE_REGION": "off",
       "TALLY_LOG_LEVEL": "WARNING"}


def serve(kind: str, data: Path, port: int) -> None:
    """What ``tally serve`` does (store opened first, GC tuned), under the server ``kind``."""
    import asyncio

    from tally.api.app import create_app
    from tally.api.connections import server_options
    from tally.commands.common import settings_for
    from tally.observability.logs import configure_logging
    from tally.runtime import Runtime, serving, tune_gc

    settings = serving(settings_for(data))
    configure_logging(settings.log_level)
    app = create_app(settings, Runtime.open(settings))
    tune_gc()
    if kind == "uvicorn":
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=5, **server_options(settings))
        return
    from granian.constants import Interfaces
    from granian.server.embed import Server

    asyncio.run(Server(app, address="127.0.0.1", port=port,
                       interface=Interfaces.ASGI).serve())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, data: Path, client: tuple[str, str], requests: int,
            log: Path) -> list[dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "bench.server_ab", "--serve", kind,
                                 str(data), str(port)], env={**os.environ, **ENV},
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1, verify=VERIFY).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{kind} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        headers = token(url, *client)
        first = httpx.get(f"{url}{PATH}", params=QUERY, headers=headers, verify=VERIFY)
        first.raise_for_status()
        rows = []
        for what, sent in (("cached 200", headers),
                           ("304", {**headers, "If-None-Match": first.headers["etag"]})):
            for clients in (1, 3):
                lean_load(url, sent, PATH, [QUERY] * 200, "GET", clients)  # warm-up
                before = cpu_seconds(proc.pid)
                latencies = sorted(lean_load(url, sent, PATH, [QUERY] * requests, "GET",
                                             clients))
                spent = cpu_seconds(proc.pid) - before
                rows.append({"server": kind, "what": what, "clients": clients,
                             "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
                             "p95_ms": round(latencies[int(len(latencies) * 0.95)] * 1000, 2),
                             "cpu_ms": round(spent / requests * 1000, 3)})
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([TALLY, "demo", "--events", str(args.events), "--days", "30",
                        "--data-dir", str(data)], check=True, capture_output=True)
        client = new_client(data, "analytics:read")
        rows = []
        for round_ in range(args.rounds):
            for kind in SERVERS:  # alternated: the machine's noise falls on both
                for row in measure(kind, data, client, args.requests, Path(tmp) / "serve.log"):
                    row["round"] = round_
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "server_ab.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

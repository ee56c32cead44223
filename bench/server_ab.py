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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.common import OUT, TALLY, UNLIMITED, Server, client_headers, lean_load, percentile

PATH = "/v1/analytics/timeseries"
QUERY = {"metric": "ggr", "granularity": "1h", "from": "2025-10-01T00:00:00Z",
         "to": "2025-10-02T00:00:00Z"}
SERVERS = ("uvicorn", "granian")


def serve(kind: str, port: int, data: Path) -> None:
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
    from granian.server.embed import Server as Granian

    asyncio.run(Granian(app, address="127.0.0.1", port=port,
                        interface=Interfaces.ASGI).serve())


def measure(kind: str, data: Path, requests: int) -> list[dict[str, Any]]:
    server = Server(data, env={**UNLIMITED, "TALLY_LOG_LEVEL": "WARNING"},
                    command=(sys.executable, "-m", "bench.server_ab", "--serve", kind))
    try:
        headers = client_headers(server.url, data, "analytics:read")
        first = httpx.get(f"{server.url}{PATH}", params=QUERY, headers=headers)
        first.raise_for_status()
        rows = []
        for what, sent in (("cached 200", headers),
                           ("304", {**headers, "If-None-Match": first.headers["etag"]})):
            for clients in (1, 3):
                lean_load(server.url, sent, PATH, [QUERY] * 200, "GET", clients)  # warm-up
                before = server.cpu_seconds()
                latencies = lean_load(server.url, sent, PATH, [QUERY] * requests, "GET",
                                      clients)
                spent = server.cpu_seconds() - before
                rows.append({"server": kind, "what": what, "clients": clients,
                             "p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
                             "p95_ms": round(percentile(latencies, 0.95) * 1000, 2),
                             "cpu_ms": round(spent / requests * 1000, 3)})
        return rows
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=3000)
    # the server process itself (bench.common.Server gives the port and data dir)
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.data_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([TALLY, "demo", "--events", str(args.events), "--days", "30",
                        "--data-dir", str(data)], check=True, capture_output=True)
        rows = []
        for round_ in range(args.rounds):
            for kind in SERVERS:  # alternated: the machine's noise falls on both
                for row in measure(kind, data, args.requests):
                    row["round"] = round_
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "server_ab.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Query bounds benchmark (issue 9 item 5): the two reported heavy reads, over HTTP, each in a
fresh server process so its peak RSS is its own.

    python -m bench.bounds_bench --data /tmp/store [--src /tmp/base/src] [--label before]
    python -m bench.bounds_bench --data /tmp/store --typical --src /tmp/base/src \
        --baseline-data /tmp/store-copy --label typical

``--data``: a store filled by ``tally demo --events 2000000 --days 34``. ``--src``: run the
server from another source tree (the baseline: the code before the change, exported with
``git archive``), so both figures come from the same store and machine in one session.
Reported per heavy case: HTTP status, wall seconds, RSS before the request and peak RSS after
it. ``--typical``: instead, everyday queries on this code and the old code side by side (two
servers, requests alternating, answers checked equal): the price of the extra group query.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx2 as httpx

from bench.common import OUT, free_port, machine

FUNNEL_10 = ["session.started", "bet.placed", "bet.settled", "bet.placed", "bet.settled",
             "wallet.credit", "bet.placed", "bet.settled", "bet.placed", "bet.settled"]


class Proc:
    """``tally serve`` from ``src`` (or the installed package) on ``data``."""

    def __init__(self, data: Path, src: Path | None, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, **env}
        if src is not None:
            environ["PYTHONPATH"] = str(src)
        with (data / f"serve-{self.port}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from tally.cli import app; app()", "serve", "--port",
                 str(self.port), "--data-dir", str(data)], stdout=log, stderr=log, env=environ)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited during start-up")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)

    def memory_mb(self, field: str) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith(field))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)


def headers(data: Path, url: str, src: Path | None) -> dict[str, str]:
    env = {**os.environ, **({"PYTHONPATH": str(src)} if src else {})}
    out = subprocess.run([sys.executable, "-c", "from tally.cli import app; app()", "client",
                          "create", "--name", "bench", "--scopes", "analytics:read",
                          "--data-dir", str(data)], capture_output=True, text=True, check=True,
                         env=env)
    creds = json.loads(out.stdout)
    token = httpx.post(f"{url}/oauth/token", data={"grant_type": "client_credentials"},
                       auth=(creds["client_id"], creds["client_secret"])).json()["access_token"]
    return {"Authorization": f"Bearer {token}"}


def cases(first: datetime, end: datetime) -> list[dict[str, Any]]:
    days = (end - first).days
    ts = {"metric": "bets", "granularity": "1m", "from": first.strftime("%Y-%m-%d"),
          "to": end.strftime("%Y-%m-%d"), "group_by": "game_id"}
    funnel = {"steps": FUNNEL_10, "window_sec": 90 * 86_400,
              "from": (end - timedelta(days=366)).strftime("%Y-%m-%d"),
              "to": end.strftime("%Y-%m-%d")}
    return [
        {"name": f"timeseries bets 1m, {days} days, by game_id, limit=1", "method": "GET",
         "path": "/v1/analytics/timeseries", "params": {**ts, "limit": "1"}},
        {"name": f"timeseries bets 1m, {days} days, by game_id, limit=10000 (a full page)",
         "method": "GET", "path": "/v1/analytics/timeseries",
         "params": {**ts, "limit": "10000"}},
        {"name": "funnel, 10 steps, 366 days, window 90 days", "method": "POST",
         "path": "/v1/analytics/funnel", "json": funnel},
    ]


def typical(end: datetime) -> list[dict[str, Any]]:
    """Everyday queries (issue 3's shapes), each asked over 5 ranges shifted by whole days so
    no answer comes from the cache: the price of the group query, if any."""
    def rng(days: int, k: int) -> dict[str, str]:
        return {"from": (end - timedelta(days=days + k)).strftime("%Y-%m-%d"),
                "to": (end - timedelta(days=k)).strftime("%Y-%m-%d")}

    ts = "/v1/analytics/timeseries"
    return [
        {"name": "ggr 5m, 1 day, 1 brand", "path": ts, "params": lambda k: {
            "metric": "ggr", "granularity": "5m", "filters": "brand_id:brand-1", **rng(1, k)}},
        {"name": "ggr 1h, 20 days, by brand", "path": ts, "params": lambda k: {
            "metric": "ggr", "granularity": "1h", "group_by": "brand_id", "limit": "10000",
            **rng(20, k)}},
        {"name": "bets 1h, 7 days, by game_id, first 100", "path": ts, "params": lambda k: {
            "metric": "bets", "granularity": "1h", "group_by": "game_id", "limit": "100",
            **rng(7, k)}},
        {"name": "dau 1d, 20 days", "path": ts, "params": lambda k: {
            "metric": "dau", "granularity": "1d", **rng(20, k)}},
        {"name": "slice ggr by game_id, 20 days", "path": "/v1/analytics/slice",
         "params": lambda k: {"metric": "ggr", "dim": "game_id", **rng(20, k)}},
    ]


def measure_typical(data: Path, baseline: tuple[Path, Path] | None, end: datetime,
                    env: dict[str, str]) -> list[dict[str, Any]]:
    """The everyday queries on this code and, with ``baseline`` (a copy of the store, the
    old source tree), on the old code at the same time: requests alternate between the two
    servers, so both see the same load on the shared machine."""
    servers = {"after": (Proc(data, None, env), data, None)}
    if baseline is not None:
        servers["before"] = (Proc(baseline[0], baseline[1], env), baseline[0], baseline[1])
    try:
        auth = {name: headers(d, p.url, src) for name, (p, d, src) in servers.items()}
        out = []
        for case in typical(end):
            times: dict[str, list[float]] = {name: [] for name in servers}
            answers: dict[str, list[str]] = {name: [] for name in servers}
            for k in range(12):
                for name, (proc, _, _) in servers.items():
                    started = time.perf_counter()
                    r = httpx.get(proc.url + case["path"], params=case["params"](k),
                                  headers=auth[name], timeout=600)
                    times[name].append(time.perf_counter() - started)
                    assert r.status_code == 200, r.text
                    answers[name].append(r.text)
            if baseline is not None:
                assert answers["after"] == answers["before"], case["name"]
            out.append({"case": case["name"], **{
                f"{name}_median_ms": round(sorted(t)[len(t) // 2] * 1000, 1)
                for name, t in times.items()}})
        return out
    finally:
        for proc, _, _ in servers.values():
            proc.stop()


def measure(data: Path, src: Path | None, case: dict[str, Any],
            env: dict[str, str]) -> dict[str, Any]:
    server = Proc(data, src, env)
    try:
        auth = headers(data, server.url, src)
        before = server.memory_mb("VmRSS")
        started = time.perf_counter()
        r = httpx.request(case["method"], server.url + case["path"], params=case.get("params"),
                          json=case.get("json"), headers=auth, timeout=600)
        seconds = time.perf_counter() - started
        return {"case": case["name"], "status": r.status_code, "seconds": round(seconds, 2),
                "rss_before_mb": round(before), "peak_rss_mb": round(server.memory_mb("VmHWM")),
                "answer": r.text[:300]}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--src", type=Path, default=None)
    parser.add_argument("--label", default="after")
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the server")
    parser.add_argument("--only", default="", help="only the heavy cases whose name has this")
    parser.add_argument("--typical", action="store_true", help="also the everyday queries")
    parser.add_argument("--baseline-data", type=Path, default=None,
                        help="with --typical and --src: a copy of the store for the old code")
    args = parser.parse_args()
    con = duckdb.connect(str(args.data / "events.duckdb"), read_only=True)
    first, last = con.execute("SELECT min(occurred_at), max(occurred_at) FROM events").fetchone()
    con.close()
    start = datetime(first.year, first.month, first.day)
    end = datetime(last.year, last.month, last.day)
    env = dict(item.split("=", 1) for item in args.env)
    chosen = [c for c in cases(start, end) if not args.only or args.only in c["name"]]
    results = [measure(args.data, args.src, case, env) for case in chosen
               if not args.typical]
    if args.typical:
        baseline = (args.baseline_data, args.src) if args.baseline_data and args.src else None
        results += measure_typical(args.data, baseline, end, env)
    OUT.mkdir(parents=True, exist_ok=True)
    report = {"label": args.label, "machine": machine(), "env": env, "results": results}
    (OUT / f"bounds-{args.label}.json").write_text(json.dumps(report, indent=2))
    for row in results:
        print(json.dumps({k: v for k, v in row.items() if k != "answer"}))


if __name__ == "__main__":
    main()

"""Regression guard (issue 14 item 5): the main queries at 1M events over HTTP, each beside the
same answer by raw SQL on the same engine in the same run, as ratios — in about 3 minutes.

    python -m bench.quick_bench                 # make bench-quick
    python -m bench.quick_bench --compare A.json B.json
    python -m bench.quick_bench --stored 100000000 --requests 12   # the goals at 100M
    python -m bench.quick_bench --stored 100000000 --requests 86 --only "ggr 5m"  # one query
    python -m bench.quick_bench --engine chdb    # the same on a chDB store (TALLY_STORE=chdb)
    python -m bench.quick_bench --stored 100000000 --data bench/out/engine-100000000/duckdb
                                                 # a store written in group commits

The store is `tally demo`'s (distinct players, sessions and payments over 90 days), built once
into bench/out/store-1000000 and reused. Each query is asked REQUESTS times from CLIENTS client
processes (``common.lean_load``: a keep-alive socket each, requests built beforehand, so the
figures are the server's) with ranges shifted by whole buckets or days (so the answer cache
cannot serve them), after warm-ups on one more such range that is not measured, then the raw
SQL the same number of times from as many cursors. The funnel is asked twice: a new funnel
each request (its window a second longer: every day computed) and one funnel slid a day a
request (the days it kept from earlier answers reused); each HTTP
answer is checked against its raw SQL first. The figure to watch is the **ratio** of HTTP p50
to raw SQL p50 (machines are noisy; a ratio measured in one run is not). Results go to
bench/out/quick-<commit>.json; ``--compare`` prints two such files side by side, so two commits
compare as: check out A, ``make bench-quick``; check out B, ``make bench-quick``; ``python -m
bench.quick_bench --compare bench/out/quick-A.json bench/out/quick-B.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx2 as httpx
import sqlglot

from bench.cohort_bench import (
    funnel_body,
    ltv_params,
    raw_funnel,
    raw_ltv,
    raw_retention,
    retention_body,
)
from bench.common import OUT, ROOT, Server, ensure_store, lean_load, machine, percentile
from bench.query_bench import CLIENTS, cases, prepare, same_answer, timed_concurrently

STORED, DAYS, REQUESTS, WARM = 1_000_000, 90, 40, 6


def _p(latencies: list[float], q: float) -> float:
    return round(percentile(latencies, q) * 1000, 2)


class RawSQL:
    """The baseline: the raw SQL on the store the server used, opened once the server has
    stopped — DuckDB's file read-only, or the chDB store in this process. The SQL is written
    in DuckDB's dialect and, for ClickHouse, transpiled by sqlglot (every answer that has a
    check is checked against the route's)."""

    def __init__(self, engine: str, data: Path) -> None:
        self.engine = engine
        self.con: duckdb.DuckDBPyConnection | None = None
        self.store: Any = None
        if engine == "duckdb":
            self.con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
        else:
            from bench.engine_bench import open_store

            self.store = open_store(engine, data)

    def sql(self, text: str) -> str:
        return text if self.con is not None else \
            sqlglot.transpile(text, read="duckdb", write="clickhouse")[0]

    def rows(self, text: str) -> list[tuple[Any, ...]]:
        if self.con is not None:
            return self.con.execute(text).fetchall()
        table = self.store.query(self.sql(text))
        return list(zip(*(c.to_pylist() for c in table.columns), strict=True))

    def timed(self, texts: list[str]) -> list[float]:
        """Each statement's latency, from CLIENTS threads (a cursor or a client each)."""
        sqls = [self.sql(t) for t in texts]

        def make_worker() -> tuple[Callable[[str], Any], Callable[[], None]]:
            if self.con is None:
                return (lambda sql: self.store.query(sql)), lambda: None
            cur = self.con.cursor()
            return (lambda sql: cur.execute(sql).fetchall()), cur.close

        return timed_concurrently(sqls, make_worker)

    def close(self) -> None:
        if self.con is not None:
            self.con.close()
        else:
            self.store.close()


def _cpu_seconds(pid: int) -> float:
    """The server process's CPU time so far (all its threads, DuckDB's included): steadier
    than latency on a shared machine, where the clients and neighbours take turns."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def run(stored: int = STORED, requests: int = REQUESTS, only: str | None = None,
        engine: str = "duckdb", data: Path | None = None) -> dict[str, Any]:
    """``data``: a data dir of ``engine`` to measure instead of the demo store of ``stored``
    events (e.g. an engine bench's store: the same stream on both engines)."""
    started = time.perf_counter()
    if data is None:
        data = ensure_store(stored, DAYS, engine)
    marker = data / "demo.json"
    built = json.loads(marker.read_text()) if marker.exists() else {}
    server = Server(data, env={"TALLY_STORE": engine})
    rss = {"after_start_mb": round(server.rss_mb())}
    queries: list[dict[str, Any]] = []
    try:
        headers, end = prepare(server, data)
        for case in cases(end):
            queries.append({"name": case["name"], "method": "GET", "path": case["path"],
                            "items": [case["params"](k) for k in range(requests)],
                            "warm": case["params"](requests),
                            "raw": [case["raw"](k) for k in range(requests)],
                            "check": same_answer})
        queries += [
            # every request a funnel not asked before (its window a second longer): each
            # computes all its 30 days
            {"name": "funnel 4 steps, 30 days, new each time", "method": "POST",
             "path": "/v1/analytics/funnel",
             "items": [funnel_body(end, k, 3601 + k) for k in range(requests)],
             "warm": funnel_body(end, requests, 3601 + requests),
             "raw": [raw_funnel(end, k, 3601 + k) for k in range(requests)],
             "check": _same_funnel},
            # one funnel, its 30 days slid a day a request: the days kept from earlier
            # answers (the warm-up's, the other clients') are reused, the others computed
            {"name": "funnel 4 steps, 30 days, 1 h, sliding", "method": "POST",
             "path": "/v1/analytics/funnel",
             "items": [funnel_body(end, k) for k in range(requests)],
             "warm": funnel_body(end, requests),
             "raw": [raw_funnel(end, k) for k in range(requests)], "check": _same_funnel},
            {"name": "retention, a month of first-deposit cohorts", "method": "POST",
             "path": "/v1/analytics/retention",
             "items": [retention_body(end, k) for k in range(requests)],
             "warm": retention_body(end, requests),
             "raw": [raw_retention(end, k) for k in range(requests)], "check": None},
            {"name": "ltv ggr 90 days, a month of cohorts", "method": "GET",
             "path": "/v1/analytics/ltv", "items": [ltv_params(end, k) for k in range(requests)],
             "warm": ltv_params(end, requests),
             "raw": [raw_ltv(end, k) for k in range(requests)], "check": None},
        ]
        revalidated = queries[0]  # a GET: the 5-minute day
        queries = [q for q in queries if only is None or q["name"].startswith(only)]
        for q in queries:
            # warm-up: the engine's caches, the code paths (an item not measured: the answer
            # cache would hold it)
            warm = [q["warm"]] * WARM
            lean_load(server.url, headers, q["path"], warm, q["method"], CLIENTS)
            spent = _cpu_seconds(server.proc.pid)
            q["http"] = lean_load(server.url, headers, q["path"], q["items"], q["method"],
                                  CLIENTS)
            q["cpu_ms"] = (_cpu_seconds(server.proc.pid) - spent) / len(q["items"]) * 1000
            first = httpx.request(q["method"], f"{server.url}{q['path']}", headers=headers,
                                  timeout=300, **({"json": q["items"][0]} if q["method"] ==
                                                  "POST" else {"params": q["items"][0]}))
            q["answer"] = first.json()
        same = revalidated["items"][0]
        tag = httpx.get(f"{server.url}{revalidated['path']}", params=same,
                        headers=headers).headers["etag"]
        revalidation = lean_load(server.url, {**headers, "If-None-Match": tag},
                                 revalidated["path"], [same] * requests * 4, "GET", CLIENTS)
        rss.update(at_end_mb=round(server.rss_mb()), peak_mb=round(server.peak_rss_mb()))
    finally:
        server.stop()
    base = RawSQL(engine, data)
    events, players, sessions, days, first, last = base.rows(
        "SELECT count(*), count(DISTINCT player_id), count(DISTINCT session_id), "
        "count(DISTINCT CAST(occurred_at AS DATE)), min(occurred_at), max(occurred_at) "
        "FROM events")[0]
    shape = {"events": built.get("accepted", events), "players": players,
             "sessions": sessions, "days": days, "from": str(first)[:10], "to": str(last)[:10],
             "by_type": dict(base.rows("SELECT event_type, count(*) FROM events GROUP BY 1 "
                                       "ORDER BY 2 DESC"))}
    rows: list[dict[str, Any]] = []
    for q in queries:
        if q["check"] is not None:
            q["check"](q["answer"], base.rows(q["raw"][0]))
        raw = base.timed(q["raw"])
        rows.append({"query": q["name"], "http_p50_ms": _p(q["http"], 0.5),
                     "http_p95_ms": _p(q["http"], 0.95), "raw_p50_ms": _p(raw, 0.5),
                     "raw_p95_ms": _p(raw, 0.95),
                     "ratio_p50": round(percentile(q["http"], 0.5) / percentile(raw, 0.5), 2),
                     "server_cpu_ms": round(q["cpu_ms"], 2)})
    base.close()
    rows.append({"query": "304 revalidation (no raw SQL)", "http_p50_ms": _p(revalidation, 0.5),
                 "http_p95_ms": _p(revalidation, 0.95), "raw_p50_ms": None, "raw_p95_ms": None,
                 "ratio_p50": None, "server_cpu_ms": None})
    return {"commit": _commit(), "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "engine": engine, "stored": stored, "store": shape, "data": str(data),
            "server_rss": rss, "startup_s": round(server.startup_seconds, 1),
            "requests": requests, "machine": machine(), "rows": rows,
            "wall_seconds": round(time.perf_counter() - started, 1)}


def _same_funnel(answer: dict[str, Any], raw: list[tuple[Any, ...]]) -> None:
    depth = dict(raw)
    counts = [s["count"] for s in answer["steps"]]
    assert counts == [sum(v for d, v in depth.items() if d >= i + 1) for i in range(4)], \
        (counts, depth)


def table(result: dict[str, Any]) -> str:
    store = result["store"]
    lines = [f"commit {result['commit']} on {result.get('engine', 'duckdb')}: "
             f"{store['events']:,} events of {store['players']:,} "
             f"players, {store['sessions']:,} sessions, {store['days']} days; "
             f"{result['requests']} requests × 3 clients; {result['wall_seconds']} s; server "
             f"RSS after start / at end / peak {result.get('server_rss', {})} MB",
             f"{'query':<44} {'HTTP p50':>9} {'p95':>8} {'raw p50':>9} {'p95':>8} {'ratio':>6}"
             f" {'CPU/req':>8}"]
    for r in result["rows"]:
        raw = (f"{r['raw_p50_ms']:>9.1f} {r['raw_p95_ms']:>8.1f} {r['ratio_p50']:>6.2f} "
               f"{r['server_cpu_ms']:>8.2f}"
               if r["raw_p50_ms"] is not None else f"{'—':>9} {'—':>8} {'—':>6} {'—':>8}")
        lines.append(f"{r['query'][:44]:<44} {r['http_p50_ms']:>9.1f} {r['http_p95_ms']:>8.1f} "
                     + raw)
    return "\n".join(lines)


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two runs' ratios (and the 304's p50, which has none) side by side."""
    lines = [f"{'query (ratio to raw SQL; CPU ms/request)':<44} {a['commit']:>14} "
             f"{b['commit']:>14} {'change':>8}"]
    theirs = {r["query"]: r for r in b["rows"]}
    for r in a["rows"]:
        other = theirs.get(r["query"])
        if other is None:
            continue
        keys = ("ratio_p50", "server_cpu_ms") if r["ratio_p50"] is not None \
            else ("http_p50_ms",)
        for key in keys:
            x, y = r.get(key), other.get(key)
            if x is None or y is None:  # an older run, without the column
                continue
            change = f"{(y - x) / x:+.0%}" if x else "—"
            label = {"ratio_p50": "", "server_cpu_ms": " (CPU)", "http_p50_ms": " (p50)"}[key]
            lines.append(f"{(r['query'][:36] + label):<44} {x:>14} {y:>14} {change:>8}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    parser.add_argument("--stored", type=int, default=STORED,
                        help="events in the store (above 1M built with `tally demo --bulk`)")
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help="requests per query (fewer for big stores)")
    parser.add_argument("--only", metavar="NAME",
                        help="only the queries whose name starts with NAME (and the 304), "
                             "e.g. 'ggr 5m' with --requests 86 for a steadier p95")
    parser.add_argument("--engine", choices=("duckdb", "chdb"), default="duckdb",
                        help="the store the server runs on (TALLY_STORE); the raw SQL runs on "
                             "the same engine")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="measure this data dir (of --engine) instead of a demo store of "
                             "--stored events, e.g. an engine bench's store")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        print(compare(a, b))
        return
    result = run(args.stored, args.requests, args.only, args.engine, args.data)
    OUT.mkdir(parents=True, exist_ok=True)
    size = ("" if args.engine == "duckdb" else f"-{args.engine}") + \
        ("" if args.stored == STORED else f"-{args.stored}") + \
        ("" if args.only is None else "-" + args.only.replace(" ", "_"))
    path = OUT / f"quick-{result['commit']}{size}.json"
    path.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"(saved {path.relative_to(ROOT)})")


if __name__ == "__main__":
    main()

"""Export benchmark (issue 13): a large timeseries export — one-minute buckets × many brands —
as a CSV and a Parquet job of a real ``tally serve``, beside the same rows fetched page by
page from the route by a client (the baseline: what a client without exports would do), in
the same run. Reports rows/s and the server's RSS before and at peak (the bound: one page in
memory, whatever the export's size).

    python -m bench.export_bench --brands 100 --days 34

``brands`` × ``days`` × 1,440 rows (100 × 34: 4,896,000, near TALLY_EXPORT_MAX_ROWS); every
brand has events in the range (one bet per brand per hour), so every group is present.
Results: bench/out/export-<rows>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2 as httpx

from bench.common import OUT, UNLIMITED, Server, client_headers, machine, post_all

START = datetime(2025, 9, 1, tzinfo=UTC)


def events(brands: int, days: int) -> list[bytes]:
    """One bet a brand an hour over the range, as request bodies of 1,000 events."""
    out: list[dict[str, Any]] = []
    for hour in range(days * 24):
        for b in range(brands):
            n = len(out)
            out.append({"event_id": f"x-{n}", "event_type": "bet.settled",
                        "occurred_at": (START + timedelta(hours=hour, minutes=b % 60))
                        .strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "tenant_id": f"brand-{b:03d}", "region": "EU",
                        "player_id": f"p-{n % 5000}", "schema_version": "1.3.0",
                        "payload": {"bet_id": f"b-{n}", "stake_minor": 100 + n % 900,
                                    "win_minor": n % 700, "currency": "EUR",
                                    "game_id": f"g_{n % 40}", "provider_id": "studio_x"}})
    return [json.dumps(out[i:i + 1000]).encode() for i in range(0, len(out), 1000)]


class PeakRss:
    """The server's RSS sampled every 50 ms while a block runs."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()

    def __enter__(self) -> PeakRss:
        self.peak = self.server.rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.server.rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--brands", type=int, default=100)
    parser.add_argument("--days", type=int, default=34)
    args = parser.parse_args()
    rows = args.brands * args.days * 1440
    query = {"metric": "ggr", "granularity": "1m",
             "from": START.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "to": (START + timedelta(days=args.days)).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "group_by": "brand_id"}
    with tempfile.TemporaryDirectory(prefix="tally-export-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        server = Server(data, UNLIMITED)
        try:
            headers = client_headers(server.url, data, "events:write analytics:read "
                                                       "exports:write")
            post_all(server.url, "/v1/events:batch", headers, events(args.brands, args.days), 2)
            http = httpx.Client(base_url=server.url, headers=headers, timeout=600)
            report: dict[str, Any] = {"machine": machine(), "rows": rows,
                                      "brands": args.brands, "days": args.days,
                                      "rss_idle_mb": round(server.rss_mb())}
            # baseline: the route, page by page (10,000 points), as a client would
            with PeakRss(server) as rss:
                started, got, cursor = time.perf_counter(), 0, None
                while True:
                    page = http.get("/v1/analytics/timeseries", params={
                        **query, "limit": "10000", **({"cursor": cursor} if cursor else {})},
                        headers={"Accept": "text/csv"})
                    got += page.text.count("\n") - 1
                    link = page.headers.get("link")
                    if not link:
                        break
                    cursor = link.split("cursor=")[1].split(">")[0]
                report["route_pages"] = {"rows": got,
                                         "seconds": round(time.perf_counter() - started, 1),
                                         "peak_rss_mb": round(rss.peak)}
            for fmt in ("csv", "parquet"):
                with PeakRss(server) as rss:
                    started = time.perf_counter()
                    job = http.post("/v1/exports", json={"query": {"kind": "timeseries",
                                                                   **query},
                                                         "format": fmt}).json()
                    while True:
                        state = http.get(f"/v1/exports/{job['id']}").json()
                        if state["status"] in ("succeeded", "failed"):
                            break
                        time.sleep(0.2)
                    seconds = time.perf_counter() - started
                report[fmt] = {"status": state["status"], "rows": state["rows"],
                               "bytes": state["bytes"], "seconds": round(seconds, 1),
                               "peak_rss_mb": round(rss.peak), "error": state.get("error")}
        finally:
            server.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"export-{rows}.json").write_text(json.dumps(report, indent=2))
    base = report["route_pages"]
    print(f"{rows:,} rows ({args.brands} brands × {args.days} days × 1,440 minutes); "
          f"server RSS idle {report['rss_idle_mb']} MB")
    print("| path | rows | seconds | rows/s | peak RSS MB | file MB |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline: the route's CSV, page by page | {base['rows']:,} | {base['seconds']} | "
          f"{base['rows'] / base['seconds']:,.0f} | {base['peak_rss_mb']} | — |")
    for fmt in ("csv", "parquet"):
        r = report[fmt]
        print(f"| export job, {fmt} | {r['rows'] or 0:,} | {r['seconds']} | "
              f"{(r['rows'] or 0) / r['seconds']:,.0f} | {r['peak_rss_mb']} | "
              f"{(r['bytes'] or 0) / 1e6:,.1f} |")


if __name__ == "__main__":
    main()

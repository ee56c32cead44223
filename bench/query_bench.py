"""Query benchmark (issue 3): HTTP latency of timeseries and slice with concurrent clients,
beside the same answer computed by raw SQL on the events table in the same run.

    python -m bench.query_bench --stored 10000000

Every measured request asks a different range (shifted by whole buckets), so the answer cache
cannot serve it; a separate row measures the cache and 304 revalidation. Money queries filter
currency:EUR so the raw SQL needs no FX and both compute the same numbers (checked).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import httpx2 as httpx

from bench.common import OUT, Server, client_headers, ensure_store, machine, percentile
from tally.demo.catalog import MARKETS

CLIENTS, REQUESTS = 3, 24


def day(d: datetime) -> str:
    return d.strftime("%Y-%m-%d")


def cases(end: datetime) -> list[dict[str, Any]]:
    """(name, HTTP params per request k, raw SQL per k) for the five queries of issue 3."""
    def r30(k: int) -> tuple[datetime, datetime]:
        return end - timedelta(days=30 + k), end - timedelta(days=k)

    def raw_ggr_5m(k: int) -> str:
        s = end - timedelta(days=1 + k)
        return (f"SELECT date_diff('second', TIMESTAMP '1970-01-01', occurred_at)//300*300 b, "
                f"sum(stake_minor - win_minor) FROM events WHERE event_type='bet.settled' "
                f"AND tenant_id='brand-1' AND currency='EUR' AND occurred_at >= '{s}' "
                f"AND occurred_at < '{s + timedelta(days=1)}' GROUP BY b")

    def raw_ggr_1h(k: int) -> str:
        s, e = r30(k)
        return (f"SELECT date_diff('second', TIMESTAMP '1970-01-01', occurred_at)//3600*3600 b,"
                f" tenant_id, sum(stake_minor - win_minor) FROM events WHERE "
                f"event_type='bet.settled' AND currency='EUR' AND occurred_at >= '{s}' AND "
                f"occurred_at < '{e}' GROUP BY ALL")

    def raw_dau(k: int) -> str:
        s, e = r30(k)
        return (f"SELECT CAST(occurred_at AS DATE), count(DISTINCT player_id) FROM events WHERE "
                f"occurred_at >= '{s}' AND occurred_at < '{e}' AND (event_type='bet.placed' OR "
                f"(event_type='wallet.credit' AND reason='deposit') OR "
                f"(event_type='session.started' AND tenant_id || chr(31) || session_id IN "
                f"(SELECT tenant_id || chr(31) || session_id FROM events WHERE "
                f"event_type='session.ended' AND duration_sec >= 60))) GROUP BY 1")

    def raw_rtp(k: int) -> str:
        s, e = r30(k)
        return (f"SELECT game_id, sum(win_minor)/sum(stake_minor) v FROM events WHERE "
                f"event_type='bet.settled' AND currency='EUR' AND occurred_at >= '{s}' AND "
                f"occurred_at < '{e}' GROUP BY 1 ORDER BY v DESC LIMIT 50")

    return [
        {"name": "ggr 5m, 1 day, 1 brand", "path": "/v1/analytics/timeseries", "raw": raw_ggr_5m,
         "params": lambda k: {"metric": "ggr", "granularity": "5m",
                              "from": day(end - timedelta(days=1 + k)),
                              "to": day(end - timedelta(days=k)),
                              "filters": "brand_id:brand-1,currency:EUR"}},
        {"name": "ggr 1h, 30 days, by brand", "path": "/v1/analytics/timeseries",
         "raw": raw_ggr_1h,
         "params": lambda k: {"metric": "ggr", "granularity": "1h", "from": day(r30(k)[0]),
                              "to": day(r30(k)[1]), "group_by": "brand_id",
                              "filters": "currency:EUR", "limit": "10000"}},
        {"name": "dau 1d, 30 days", "path": "/v1/analytics/timeseries", "raw": raw_dau,
         "params": lambda k: {"metric": "dau", "granularity": "1d", "from": day(r30(k)[0]),
                              "to": day(r30(k)[1])}},
        {"name": "slice rtp by game_id, top 50, 30 days", "path": "/v1/analytics/slice",
         "raw": raw_rtp,
         "params": lambda k: {"metric": "rtp", "dim": "game_id", "from": day(r30(k)[0]),
                              "to": day(r30(k)[1]), "filters": "currency:EUR",
                              "limit": "50"}},
    ]


def timed_concurrently(items: list[Any], make_worker: Any) -> list[float]:
    """Run ``work(item)`` for every item from CLIENTS threads; each thread gets its own
    ``work`` from ``make_worker()`` (its own connection). Returns the latencies."""
    todo = list(reversed(items))
    latencies: list[float] = []
    lock = threading.Lock()

    def thread() -> None:
        work, close = make_worker()
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    item = todo.pop()
                started = time.perf_counter()
                work(item)
                with lock:
                    latencies.append(time.perf_counter() - started)
        finally:
            close()

    threads = [threading.Thread(target=thread) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def load(url: str, headers: dict[str, str], path: str, requests: list[Any],
         method: str = "GET") -> list[float]:
    """``requests`` (query parameters for GET, JSON bodies for POST) from CLIENTS clients."""
    def make_worker() -> tuple[Any, Any]:
        http = httpx.Client(base_url=url, headers=headers, timeout=300)

        def work(item: Any) -> None:
            r = http.post(path, json=item) if method == "POST" else http.get(path, params=item)
            assert r.status_code in (200, 304), r.text

        return work, http.close

    return timed_concurrently(requests, make_worker)


def raw_load(con: duckdb.DuckDBPyConnection, raw: Any) -> list[float]:
    """The raw SQL from as many concurrent clients as the HTTP run, one cursor each."""
    def make_worker() -> tuple[Any, Any]:
        cur = con.cursor()
        return (lambda k: cur.execute(raw(k)).fetchall()), cur.close

    return timed_concurrently(list(range(REQUESTS)), make_worker)


def stats(latencies: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": round(percentile(latencies, q / 100) * 1000, 1) for q in (50, 95, 99)}


def fx_rates() -> list[dict[str, str]]:
    rates = {m[3]: m[4] for m in MARKETS if m[3] != "EUR"}
    return [{"date": "2000-01-01", "currency": c, "rate": f"{1 / f:.6f}"} for c, f in rates.items()]


def prepare(server: Server, data: Any) -> tuple[dict[str, str], datetime]:
    """A client's headers, the FX rates set, and the day the data ends (its watermark)."""
    headers = client_headers(server.url, data, "analytics:read admin events:write")
    httpx.post(f"{server.url}/v1/admin/fx-rates", json=fx_rates(), headers=headers)
    latest = httpx.get(f"{server.url}/v1/analytics/timeseries", headers=headers, params={
        "metric": "bets", "granularity": "1d", "from": "2000-01-01", "to": "2100-01-01"})
    return headers, datetime.strptime(latest.headers["x-data-watermark"][:10], "%Y-%m-%d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, default=10_000_000)
    args = parser.parse_args()
    data = ensure_store(args.stored, 90)
    server = Server(data)
    results: dict[str, Any] = {"stored": args.stored, "clients": CLIENTS,
                               "requests": REQUESTS, "startup_s": server.startup_seconds}
    try:
        headers, end = prepare(server, data)
        results["end"] = day(end)
        answers: list[dict[str, Any]] = []
        for case in cases(end):
            warm = [case["params"](k) for k in range(REQUESTS)]
            load(server.url, headers, case["path"], warm[:2])  # warm-up
            results[case["name"]] = {"http_cold": stats(load(server.url, headers, case["path"],
                                                             warm))}
            answers.append(httpx.get(f"{server.url}{case['path']}", params=warm[0],
                                     headers=headers).json())
        cached = [cases(end)[0]["params"](0)] * REQUESTS
        results["cached answer (same request)"] = stats(
            load(server.url, headers, "/v1/analytics/timeseries", cached))
        etag = httpx.get(f"{server.url}/v1/analytics/timeseries", params=cached[0],
                         headers=headers).headers["etag"]
        results["304 revalidation"] = stats(load(server.url, {**headers, "If-None-Match": etag},
                                                 "/v1/analytics/timeseries", cached))
        results["freshness"] = freshness(server.url, headers, end)
    finally:
        server.stop()
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    for case, answered in zip(cases(end), answers, strict=True):
        same_answer(answered, con.execute(case["raw"](0)).fetchall())
        results[case["name"]]["raw_sql_events"] = stats(raw_load(con, case["raw"]))
    con.close()
    results["machine"] = machine()
    results["at"] = datetime.now(UTC).isoformat(timespec="seconds")
    (OUT / f"query-{args.stored}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def same_answer(answer: dict[str, Any], raw: list[tuple[Any, ...]]) -> None:
    """The HTTP answer and the raw SQL agree: same total, or same values per key (slice)."""
    if "items" in answer:
        got = {item["game_id"]: item["value"] for item in answer["items"]}
        want = {row[0]: float(row[1]) for row in raw}
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-9 for k in got)
        return
    field = "value_minor" if "value_minor" in answer["series"][0] else "value"
    assert sum(p[field] for p in answer["series"]) == sum(int(row[-1]) for row in raw)


def freshness(url: str, headers: dict[str, str], end: datetime) -> dict[str, float]:
    """Time from the 202 of a one-event batch to an answer that includes it."""
    waits = []
    for i in range(20):
        at = end + timedelta(hours=2, minutes=i)
        event = {"event_id": f"fresh-{time.time_ns()}", "event_type": "bet.settled",
                 "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "tenant_id": "brand-1",
                 "region": "EU", "player_id": "p_fresh", "schema_version": "1.3.0",
                 "payload": {"bet_id": f"fb{i}-{time.time_ns()}", "stake_minor": 100,
                             "win_minor": 0, "currency": "EUR", "game_id": "g",
                             "provider_id": "p"}}
        params = {"metric": "bets", "granularity": "1m", "filters": "brand_id:brand-1",
                  "from": at.replace(second=0).strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "to": (at.replace(second=0) + timedelta(minutes=1)).strftime(
                      "%Y-%m-%dT%H:%M:%SZ")}
        before = httpx.get(f"{url}/v1/analytics/timeseries", params=params,
                           headers=headers).json()["series"]
        base = before[0]["value"] if before else 0
        r = httpx.post(f"{url}/v1/events:batch", json=[event], headers=headers)
        acked = time.perf_counter()
        assert r.status_code == 202
        while True:
            series = httpx.get(f"{url}/v1/analytics/timeseries", params=params,
                               headers=headers).json()["series"]
            if series and series[0]["value"] == base + 1:
                waits.append(time.perf_counter() - acked)
                break
    return stats(waits)


if __name__ == "__main__":
    main()

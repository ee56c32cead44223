"""Ingestion benchmark: HTTP batches of 1,000 events from concurrent clients into a store that
already holds N events, beside the raw DuckDB append of the same rows (the engine's ceiling).

    python bench/ingest_bench.py --stored 10000000 --batches 600 --clients 4
    python -m bench.ingest_bench --stored 1000000 --trickle 300   # CPU of a steady producer

Results: bench/out/ingest-<stored>.json; figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx2 as httpx
import msgspec

from bench.common import (
    OUT,
    UNLIMITED,
    Server,
    client_headers,
    ensure_store,
    machine,
    percentile,
    post_all,
    stored_events,
)
from tally.config import Settings
from tally.demo.generator import generate
from tally.events.envelope import ValidationContext
from tally.ingest.batch import prepare
from tally.ingest.dedup import key_hasher

LATENCY_BATCHES = 100  # sent afterwards by one client: ack latency when not saturated


def make_bodies(batches: int, batch_size: int) -> list[bytes]:
    """Realistic batches from the demo generator, with ids no store has seen."""
    run = uuid.uuid4().hex[:8]
    bodies: list[bytes] = []
    stream = generate(batches * batch_size, 3, 99, datetime.now(UTC), batch_size)
    for n, batch in enumerate(stream):
        for i, event in enumerate(batch):
            event["event_id"] = f"bench-{run}-{n}-{i}"
        bodies.append(msgspec.json.encode(batch))
    return bodies


def http_run(url: str, headers: dict[str, str], bodies: list[bytes],
             clients: int) -> dict[str, Any]:
    started_cpu = time.process_time()
    latencies, replies, wall, refused = post_all(url, "/v1/events:batch", headers, bodies,
                                                 clients)
    accepted = sum(json.loads(reply)["accepted"] for reply in replies)
    return {"events_per_s": accepted / wall, "accepted": accepted, "wall_s": wall,
            "ack_p50_ms": percentile(latencies, 0.5) * 1000,
            "ack_p99_ms": percentile(latencies, 0.99) * 1000, "refused_503": refused,
            "load_generator_cpu_s": time.process_time() - started_cpu}


def burst(server: Server, headers: dict[str, str], bodies: list[bytes],
          clients: int) -> dict[str, Any]:
    """A burst of batches, then what a reader sees: the rate the store applies them at (not
    only the rate they are acknowledged at), the largest backlog, and how long an event sent
    right after the burst takes to show in a query (freshness). The server runs with
    TALLY_READ_YOUR_WRITES_MS=0, so a query answers at once with what is applied."""
    backlog: list[tuple[float, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            backlog.append((time.perf_counter(), server.gauge("tally_applier_pending_rows")))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    started = time.perf_counter()
    watcher.start()
    acks = http_run(server.url, headers, bodies, clients)
    brand = f"marker-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC).replace(microsecond=0)
    marker = make_event_like(brand, now)
    sent = time.perf_counter()
    post_all(server.url, "/v1/events:batch", headers, [msgspec.json.encode([marker])], 1)
    minute = now.replace(second=0)
    params = {"metric": "bets", "granularity": "1m", "filters": f"brand_id:{brand}",
              "from": minute.strftime("%Y-%m-%dT%H:%M:%SZ"),
              "to": (minute + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    visible = None
    while time.perf_counter() - sent < 600:
        series = httpx.get(f"{server.url}/v1/analytics/timeseries", params=params,
                           headers=headers, timeout=60).json()["series"]
        if sum(point["value"] for point in series) == 1:
            visible = time.perf_counter() - sent
            break
        time.sleep(0.05)
    while server.gauge("tally_applier_pending_rows") > 0:
        time.sleep(0.05)
    drained = time.perf_counter()
    done.set()
    watcher.join()
    return {**acks, "applied_events_per_s": acks["accepted"] / (drained - started),
            "max_backlog_rows": max((rows for _, rows in backlog), default=0),
            "freshness_after_burst_s": visible}


def make_event_like(brand: str, at: datetime) -> dict[str, Any]:
    return {"event_id": f"{brand}-1", "event_type": "bet.settled",
            "occurred_at": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "tenant_id": brand,
            "region": "EU", "player_id": "p_marker", "schema_version": "1.2.0",
            "payload": {"bet_id": f"{brand}-b", "stake_minor": 100, "win_minor": 0,
                        "currency": "EUR", "game_id": "g", "provider_id": "p"}}


def trickle(data: Path, linger_ms: int, bodies: list[bytes], rate: float) -> dict[str, Any]:
    """Batches posted one at a time at ``rate`` batches a second (a steady producer, far below
    the server's ceiling), with ``TALLY_APPLY_LINGER_MS`` at ``linger_ms``: the server's CPU
    (cores, all its threads) while it keeps up, and the ack latency."""
    server = Server(data, {"TALLY_APPLY_LINGER_MS": str(linger_ms), **UNLIMITED})
    try:
        headers = {**client_headers(server.url, data, "events:write analytics:read"),
                   "content-type": "application/json"}
        latencies: list[float] = []
        with httpx.Client(headers=headers, timeout=60) as client:
            url = f"{server.url}/v1/events:batch"
            client.post(url, content=bodies[0]).raise_for_status()
            time.sleep(1)
            cpu, started = server.cpu_seconds(), time.perf_counter()
            for i, body in enumerate(bodies[1:]):
                time.sleep(max(0.0, started + i / rate - time.perf_counter()))
                sent = time.perf_counter()
                client.post(url, content=body).raise_for_status()
                latencies.append(time.perf_counter() - sent)
            while server.gauge("tally_applier_pending_rows") > 0:
                time.sleep(0.01)
            wall = time.perf_counter() - started
            cores = (server.cpu_seconds() - cpu) / wall
        events = sum(len(msgspec.json.decode(body)) for body in bodies[1:])
        return {"linger_ms": linger_ms, "events_per_s": events / wall,
                "server_cores": cores, "cpu_us_per_event": cores * wall / events * 1e6,
                "ack_p50_ms": percentile(latencies, 0.5) * 1000,
                "ack_p99_ms": percentile(latencies, 0.99) * 1000}
    finally:
        server.stop()


def raw_append(data: Path, bodies: list[bytes]) -> dict[str, Any]:
    """The same rows appended straight into DuckDB, one transaction per batch (durable like a
    202), into a scratch table of the same store file: the ceiling of the engine."""
    ctx = ValidationContext(datetime.now(UTC), frozenset({"EU", "UK", "LATAM", "NA", "APAC"}))
    hasher = key_hasher(b"bench")
    tables = [prepare(body, ctx, "bench", 10_000, hasher).table for body in bodies]
    con = duckdb.connect(str(data / "events.duckdb"))
    con.execute("CREATE OR REPLACE TABLE bench_append AS SELECT * FROM events LIMIT 0")
    started = time.perf_counter()
    rows = 0
    for rows_table in tables:
        con.execute("BEGIN")
        con.register("rows_table", rows_table)
        con.execute("INSERT INTO bench_append SELECT * FROM rows_table")
        con.unregister("rows_table")
        con.execute("COMMIT")
        rows += rows_table.num_rows
    wall = time.perf_counter() - started
    con.execute("DROP TABLE bench_append")
    con.execute("CHECKPOINT")
    con.close()
    return {"events_per_s": rows / wall, "rows": rows, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, action="append")
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--small-batches", type=int, default=3000,
                        help="batches of 100 events in the small-batch burst")
    parser.add_argument("--trickle", type=int, default=0, metavar="N",
                        help="only the steady-producer run: N batches of 100 events at 20 a "
                             "second, with the apply linger off and at its default, alternated")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="ingest into this DuckDB data dir (it grows) instead of a demo "
                             "store of --stored events, e.g. an engine bench's store")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.trickle:
        data = ensure_store((args.stored or [1_000_000])[0], args.days)
        default = Settings.model_fields["apply_linger_ms"].default
        runs = [trickle(data, linger, make_bodies(args.trickle, 100), 20.0)
                for _ in range(2) for linger in (0, default)]
        report = {"stored_at_start": stored_events(data), "runs": runs, "machine": machine(),
                  "at": datetime.now(UTC).isoformat(timespec="seconds")}
        (OUT / "ingest-trickle.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    for stored in args.stored or [10_000_000]:
        data = args.data or ensure_store(stored, args.days)
        bodies = make_bodies(args.batches + LATENCY_BATCHES, args.batch_size)
        bodies, latency_bodies = bodies[:args.batches], bodies[args.batches:]
        stored_actual = stored_events(data)
        # no rate limits: the bench measures the server's ceiling (at 100M the 100-event
        # batches ack faster than a client's default 100 requests a second)
        server = Server(data, {"TALLY_READ_YOUR_WRITES_MS": "0", **UNLIMITED})
        try:
            rss_start = server.rss_mb()
            headers = client_headers(server.url, data, "events:write analytics:read")
            http_run(server.url, headers, bodies[:20], args.clients)  # warm-up
            result = burst(server, headers, bodies[20:], args.clients)
            one = http_run(server.url, headers, latency_bodies, 1)
            small = burst(server, headers, make_bodies(args.small_batches, 100), args.clients)
            result.update(startup_s=server.startup_seconds, rss_after_start_mb=rss_start,
                          peak_rss_mb=server.peak_rss_mb(), one_client=one,
                          small_batches_of_100=small)
        finally:
            server.stop()
        baseline = raw_append(data, bodies[20:])
        report = {"stored": stored, "stored_at_start": stored_actual,
                  "batch_size": args.batch_size, "clients": args.clients,
                  "batches": len(bodies) - 20, "http": result, "raw_duckdb_append": baseline,
                  "demo_load": json.loads((data / "demo.json").read_text())
                  if (data / "demo.json").exists() else None, "data": str(data),
                  "machine": machine(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
        (OUT / f"ingest-{stored}.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

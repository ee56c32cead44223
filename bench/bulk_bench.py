"""Bulk-load benchmark (issue 14 item 1): the vectorised columnar path beside the JSON path
``tally demo`` takes, in one run.

    python -m bench.bulk_bench --events 1000000

1. CPU stages alone, no store: generating the stream and preparing it into stored rows
   (validation, dedup keys, columns) — the per-event generator and ``batch.prepare`` on JSON
   bodies of 10,000 events (the baseline), then ``tally.demo.columnar`` and
   ``columnar.prepare_table`` on tables of 50,000 — events/s and CPU seconds per million.
2. End to end into an empty DuckDB store: ``tally demo`` (JSON) and ``tally demo --bulk``
   (columnar), each through the writer, journal and applier with every derived table; and the
   store's own ceiling in the same run: the stored rows written by ``backend.write()`` alone.

Results: bench/out/bulk-<N>.json and a Markdown table on stdout (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from bench.common import OUT, machine
from tally.config import Settings
from tally.demo.columnar import tables
from tally.demo.generator import generate
from tally.demo.load import load_demo
from tally.events.envelope import ValidationContext
from tally.ingest.batch import prepare
from tally.ingest.columnar import prepare_table
from tally.ingest.dedup import key_hasher
from tally.storage.base import WriteSet

DAYS, SEED = 30, 7
SERVED = frozenset({"EU", "UK", "LATAM", "NA", "APAC"})


def _stages(batches: Iterator[Any], prep: Callable[[Any], pa.Table]) -> dict[str, Any]:
    """Generation and preparation timed apart (wall and CPU); the prepared tables kept."""
    gen = prep_s = gen_cpu = prep_cpu = 0.0
    rows = 0
    prepared: list[pa.Table] = []
    while True:
        w, c = time.perf_counter(), time.process_time()
        batch = next(batches, None)
        gen += time.perf_counter() - w
        gen_cpu += time.process_time() - c
        if batch is None:
            break
        w, c = time.perf_counter(), time.process_time()
        table = prep(batch)
        prep_s += time.perf_counter() - w
        prep_cpu += time.process_time() - c
        rows += table.num_rows
        prepared.append(table)
    return {"events": rows, "generate_s": round(gen, 2), "prepare_s": round(prep_s, 2),
            "events_per_s": round(rows / (gen + prep_s)),
            "prepare_events_per_s": round(rows / prep_s),
            "cpu_s_per_million": round((gen_cpu + prep_cpu) / rows * 1e6, 2),
            "prepare_cpu_s_per_million": round(prep_cpu / rows * 1e6, 2),
            "tables": prepared}


def cpu_stages(events: int) -> dict[str, Any]:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    ctx = ValidationContext(end, SERVED)
    hasher = key_hasher(b"bench")
    json_batches = (msgspec.json.encode(b) for b in generate(events, DAYS, SEED, end, 10_000))
    json_path = _stages(json_batches,
                        lambda body: prepare(body, ctx, "b", 10_000, hasher).table)
    _, col_batches = tables(events, DAYS, SEED, end, 50_000)
    col_path = _stages(col_batches, lambda t: prepare_table(t, ctx, "b", hasher).table)
    store_ceiling = _store_write(col_path["tables"])
    for path in (json_path, col_path):
        del path["tables"]
    return {"json": json_path, "columnar": col_path, "store_write": store_ceiling}


def _store_write(prepared: list[pa.Table]) -> dict[str, Any]:
    """The stored rows written by ``backend.write()`` alone, 50,000 a write (every derived
    table maintained): the store's ceiling for any ingestion path."""
    from tally.ingest.dedup import DedupIndex, first_unseen
    from tally.rollups import activity
    from tally.rollups.spec import derived_tables
    from tally.storage.factory import open_backend

    folder = OUT / "bulk-store-write"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    store = open_backend("duckdb", folder, derived=derived_tables, retired=activity.RETIRED)
    seen = DedupIndex()
    rows = 0
    took = 0.0
    for seq, table in enumerate(prepared, 1):
        hi, lo = table.column("id_hi").to_numpy(), table.column("id_lo").to_numpy()
        keep = first_unseen(hi, lo, seen)
        seen.add(hi[keep], lo[keep])
        fresh = table.filter(keep)
        fresh = fresh.set_column(0, "ingest_seq", pa.array([seq] * fresh.num_rows, pa.int64()))
        started = time.perf_counter()
        store.write(WriteSet(events=[fresh]), journal_seq=seq)
        took += time.perf_counter() - started
        rows += fresh.num_rows
    store.close()
    shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows, "write_s": round(took, 1), "rows_per_s": round(rows / took)}


def end_to_end(events: int) -> dict[str, Any]:
    out = {}
    for name, bulk in (("json", False), ("columnar", True)):
        folder = OUT / f"bulk-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        cpu = time.process_time()
        summary = load_demo(Settings(data_dir=folder), events=events, days=DAYS, seed=SEED,
                            bulk=bulk)
        summary.pop("shape", None)
        out[name] = {**summary, "events_per_s": round(summary["events_generated"]
                                                      / summary["seconds"]),
                     "cpu_s": round(time.process_time() - cpu, 1)}
        shutil.rmtree(folder, ignore_errors=True)
    return out


def table(report: dict[str, Any]) -> str:
    s, e = report["stages"], report["end_to_end"]
    lines = [
        f"| {report['events']:,} events, {DAYS} days | JSON path (`tally demo`) | "
        "columnar path (`tally demo --bulk`) |",
        "|---|---|---|",
        f"| generate + prepare, events/s | {s['json']['events_per_s']:,} | "
        f"**{s['columnar']['events_per_s']:,}** |",
        f"| prepare alone, events/s | {s['json']['prepare_events_per_s']:,} | "
        f"{s['columnar']['prepare_events_per_s']:,} |",
        f"| CPU s per million (generate + prepare) | {s['json']['cpu_s_per_million']} | "
        f"{s['columnar']['cpu_s_per_million']} |",
        f"| end to end into DuckDB, events/s | {e['json']['events_per_s']:,} | "
        f"{e['columnar']['events_per_s']:,} |",
        f"| store ceiling: `backend.write()` alone, rows/s | "
        f"{s['store_write']['rows_per_s']:,} | (same store, same run) |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {"events": args.events, "machine": machine(),
                              "stages": cpu_stages(args.events),
                              "end_to_end": end_to_end(args.events)}
    report["wall_s"] = round(time.perf_counter() - started)
    report["at"] = (datetime.now(UTC) - timedelta(microseconds=0)).isoformat(timespec="seconds")
    OUT.mkdir(parents=True, exist_ok=True)
    Path(OUT / f"bulk-{args.events}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(table(report))


if __name__ == "__main__":
    main()

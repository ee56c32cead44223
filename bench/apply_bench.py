"""What derived tables cost ingestion: the same 1,000-event batches applied alternately to two
copies of one store, in one process — one keeping every derived table, the other without the
tables named by ``--without`` (default: the narrow rollups) — CPU per batch (the process's,
DuckDB's threads included) and wall.

    python -m bench.apply_bench [--stored 1000000] [--batches 200] [--without T1,T2]
    python -m bench.apply_bench --engine chdb [--batches 200] [--rounds 4] [--without T1,T2]

The store is the quick bench's (``tally demo``'s 1M events over 90 days, built once); the
batches are a fresh day of the demo stream after it. The acknowledgement never waits for this
work (the journal); the applied rate does. Results: bench/out/apply-<N>.json.

chDB runs one engine a process: there each copy is an empty store in a process of its own,
given the same batches, the two alternated ``--rounds`` times (bench/out/apply-chdb.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from bench.common import OUT, ROOT, ensure_store, machine
from tally.demo.columnar import tables
from tally.events.envelope import ValidationContext
from tally.ingest.columnar import prepare_table
from tally.ingest.dedup import key_hasher
from tally.rollups import activity
from tally.rollups.spec import GRAINS, derived_tables, table
from tally.storage.base import Backend, DerivedTable, WriteSet
from tally.storage.factory import open_backend

SERVED = frozenset({"EU", "UK", "LATAM", "NA", "APAC"})
NARROW = tuple(table(grain, narrow=True) for grain in GRAINS)


def _batches(count: int, end: datetime, seq: int) -> Iterator[pa.Table]:
    """``count`` batches of 1,000 demo events in the day before ``end``, validated as the
    applier receives them, their ingest sequence numbers following ``seq``."""
    ctx = ValidationContext(end, SERVED)
    hasher = key_hasher(b"apply-bench")
    _, made = tables(count * 1_000, 1, 99, end, 1_000)
    for seq_of, raw in enumerate(made, seq + 1):
        prepared = prepare_table(raw, ctx, "bench", hasher).table
        yield prepared.set_column(0, "ingest_seq",
                                  pa.array([seq_of] * prepared.num_rows, pa.int64()))


def run(stored: int, batches: int, without: tuple[str, ...]) -> dict[str, Any]:
    base = ensure_store(stored, 90)
    stores: dict[str, Backend] = {}
    for name in ("all", "without"):
        folder = OUT / f"apply-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy(base / "events.duckdb", folder / "events.duckdb")

        def derived(dialect: str, name: str = name) -> list[DerivedTable]:
            return [t for t in derived_tables(dialect)
                    if name == "all" or t.name not in without]
        stores[name] = open_backend("duckdb", folder, derived=derived,
                                    retired=activity.RETIRED)
    first = stores["all"]
    seq = first.max_ingest_seq()
    end = first.query("SELECT max(occurred_at) AS m FROM events").column(0)[0].as_py()
    end = end.replace(minute=0, second=0, microsecond=0, tzinfo=UTC) + timedelta(days=1)
    spent: dict[str, list[tuple[float, float]]] = {name: [] for name in stores}
    for i, prepared in enumerate(_batches(batches, end, seq)):
        order = list(stores) if i % 2 == 0 else list(reversed(stores))
        for name in order:  # alternated: neither copy always goes first
            cpu, wall = time.process_time(), time.perf_counter()
            stores[name].write(WriteSet(events=[prepared]))
            spent[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    for store in stores.values():
        store.close()
    result: dict[str, Any] = {"stored": stored, "batches": len(spent["all"]),
                              "without_tables": list(without), "machine": machine()}
    for name, runs in spent.items():
        result[name] = {"cpu_ms": round(statistics.mean(c for c, _ in runs) * 1000, 1),
                        "wall_p50_ms": round(statistics.median(w for _, w in runs) * 1000, 1)}
    result["cpu_ratio"] = round(result["all"]["cpu_ms"] / result["without"]["cpu_ms"], 3)
    return result


def _chdb_worker(name: str, batches: int, without: tuple[str, ...]) -> list[float]:
    """One chDB process (one engine a process): an empty store keeping every derived table
    (``all``) or all but ``without``, the batches applied one by one; CPU seconds a batch."""
    folder = OUT / f"apply-chdb-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def derived(dialect: str) -> list[DerivedTable]:
        return [t for t in derived_tables(dialect) if name == "all" or t.name not in without]

    store = open_backend("chdb", folder, derived=derived, retired=activity.RETIRED)
    spent = []
    for prepared in _batches(batches, datetime(2026, 11, 1, tzinfo=UTC), 0):
        cpu = time.process_time()
        store.write(WriteSet(events=[prepared]))
        spent.append(time.process_time() - cpu)
    store.close()
    shutil.rmtree(folder, ignore_errors=True)
    return spent


def run_chdb(batches: int, without: tuple[str, ...], rounds: int) -> dict[str, Any]:
    """:func:`run` on chDB: each copy a process of its own on an empty store, the same
    batches, the two alternated ``rounds`` times (ABBA…), CPU a batch per copy."""
    spent: dict[str, list[float]] = {"all": [], "without": []}
    for i in range(rounds):
        for name in ("all", "without") if i % 2 == 0 else ("without", "all"):
            out = subprocess.run(
                [sys.executable, "-m", "bench.apply_bench", "--engine", "chdb", "--batches",
                 str(batches), "--without", ",".join(without), "--worker", name],
                capture_output=True, text=True, check=True, cwd=ROOT)
            spent[name] += json.loads(out.stdout.strip().splitlines()[-1])
    result: dict[str, Any] = {"engine": "chdb", "batches": batches, "rounds": rounds,
                              "without_tables": list(without), "machine": machine()}
    for name, runs in spent.items():
        result[name] = {"cpu_ms": round(statistics.mean(runs) * 1000, 1)}
    result["cpu_ratio"] = round(result["all"]["cpu_ms"] / result["without"]["cpu_ms"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--without", default=",".join(NARROW),
                        help="derived tables the second copy does not keep")
    parser.add_argument("--engine", choices=("duckdb", "chdb"), default="duckdb",
                        help="chdb: each copy an empty store in a process of its own")
    parser.add_argument("--rounds", type=int, default=4, help="chdb: alternations")
    parser.add_argument("--worker", choices=("all", "without"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    without = tuple(args.without.split(","))
    if args.worker:
        print(json.dumps(_chdb_worker(args.worker, args.batches, without)))
        return
    if args.engine == "chdb":
        result = run_chdb(args.batches, without, args.rounds)
        (OUT / "apply-chdb.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
        return
    result = run(args.stored, args.batches, without)
    (OUT / f"apply-{args.stored}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()

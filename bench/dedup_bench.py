"""Dedup design benchmark: the in-memory sorted-run index against the two DuckDB ways of
checking keys, at N stored keys, per 1,000-key batch (10 of them already stored).

    python -m bench.dedup_bench --keys 10000000 --keys 100000000 --baseline-max 10000000

- ``index``: tally.ingest.dedup.DedupIndex, all keys in memory (load, lookup, add the new keys);
  ``compact_index`` the same keeping 96 bits a key (the server's)
- ``partitioned``: tally.ingest.dedup_disk.PartitionedDedupIndex, keys on disk, resident memory
  bounded by ``--memory-mb``; built, then measured in a fresh process (lookups/s, RSS)
- ``anti_join``: keys in a DuckDB table; each batch joined against it (a scan of the key columns)
- ``primary_key``: keys in a DuckDB table with PRIMARY KEY (ART index);
  each batch inserted with ON CONFLICT DO NOTHING
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench.common import OUT, machine, percentile
from tally.ingest.dedup import DedupIndex
from tally.ingest.dedup_disk import PartitionedDedupIndex

BATCHES = 200
I64 = (-(2**63), 2**63 - 1)


def batches(rng: np.random.Generator, stored_hi: np.ndarray, stored_lo: np.ndarray,
            n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        hi = rng.integers(*I64, 1000, dtype=np.int64)
        lo = rng.integers(*I64, 1000, dtype=np.int64)
        pick = rng.integers(0, len(stored_hi), 10)
        hi[:10], lo[:10] = stored_hi[pick], stored_lo[pick]
        out.append((hi, lo))
    return out


def bench_index(hi: np.ndarray, lo: np.ndarray, probes: list[Any],
                compact: bool = False) -> dict[str, Any]:
    index = DedupIndex(compact=compact)
    started = time.perf_counter()
    chunk = 1 << 20
    index.load((hi[i:i + chunk], lo[i:i + chunk]) for i in range(0, len(hi), chunk))
    load_s = time.perf_counter() - started
    times = []
    for qhi, qlo in probes:
        t = time.perf_counter()
        found = index.contains(qhi, qlo)
        index.add(qhi[~found], qlo[~found])
        times.append(time.perf_counter() - t)
        assert found[:10].all() and not found[10:].any()
    return {"load_s": load_s, "batch_p50_ms": percentile(times, 0.5) * 1000,
            "batch_p99_ms": percentile(times, 0.99) * 1000, "runs": index.run_count,
            "lookups_per_s": 1000 * len(times) / sum(times),
            "index_mb": index.nbytes / 2**20}


def bench_index_rss(n: int, compact: bool = False) -> dict[str, Any]:
    """The in-memory index alone in a fresh process: its RSS at ``n`` keys."""
    code = ("import json, sys, numpy as np, psutil; from tally.ingest.dedup import DedupIndex\n"
            "n = int(sys.argv[1]); rng = np.random.default_rng(n)\n"
            "index = DedupIndex(compact=sys.argv[2] == 'compact')\n"
            "c = 1 << 20\n"
            "index.load((rng.integers(-2**63, 2**63 - 1, min(c, n - i), dtype=np.int64),"
            " rng.integers(-2**63, 2**63 - 1, min(c, n - i), dtype=np.int64))"
            " for i in range(0, n, c))\n"
            "print(json.dumps({'rss_mb': psutil.Process().memory_info().rss / 2**20}))")
    out = subprocess.run([sys.executable, "-c", code, str(n), "compact" if compact else "whole"],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


class _Keys:
    """The benchmark's keys as the store the partitioned index is built from."""

    def __init__(self, hi: np.ndarray, lo: np.ndarray) -> None:
        self.hi, self.lo, self.values = hi, lo, {"dedup_index_id": "bench"}

    def event_keys(self, chunk_rows: int) -> Any:
        for i in range(0, len(self.hi), chunk_rows):
            yield self.hi[i:i + chunk_rows], self.lo[i:i + chunk_rows]

    def max_ingest_seq(self) -> int:
        return 1

    def setting(self, name: str) -> str | None:
        return self.values.get(name)

    def put_setting(self, name: str, value: str) -> None:
        self.values[name] = value


PROBE = """
import json, sys, time, numpy as np, psutil
from pathlib import Path
from tally.ingest.dedup_disk import PartitionedDedupIndex
from bench.dedup_bench import _Keys
folder, mb, n = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
probes = np.load(folder.parent / "probes.npy")
rss0 = psutil.Process().memory_info().rss
t = time.perf_counter()
index = PartitionedDedupIndex.open(folder, _Keys(np.empty(0, np.int64), np.empty(0, np.int64)),
                                   memory_mb=mb, journal_last_seq=1)
open_s = time.perf_counter() - t
assert not index.rebuilt, index.rebuilt
times, seq = [], 1
for qhi, qlo in probes:
    t = time.perf_counter()
    found = index.contains(qhi, qlo)
    seq += 1
    index.add(qhi[~found], qlo[~found], seq)
    times.append(time.perf_counter() - t)
    assert found[:10].all() and not found[10:].any()
print(json.dumps({"open_verify_s": open_s, "times": times, "runs": index.run_count,
                  "rss_start_mb": rss0 / 2**20,
                  "rss_mb": psutil.Process().memory_info().rss / 2**20,
                  "peak_rss_mb": __import__("resource").getrusage(0).ru_maxrss / 1024}))
"""


def bench_partitioned(hi: np.ndarray, lo: np.ndarray, probes: list[Any], memory_mb: int,
                      tmp: Path) -> dict[str, Any]:
    folder = tmp / "dedup"
    started = time.perf_counter()
    index = PartitionedDedupIndex.open(folder, _Keys(hi, lo), memory_mb=memory_mb)
    index.close()
    build_s = time.perf_counter() - started
    np.save(tmp / "probes.npy", np.stack([np.stack(p) for p in probes]))
    out = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(memory_mb),
                          str(len(hi))], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    times = got.pop("times")
    disk = sum(p.stat().st_size for p in folder.iterdir())
    return {"build_s": build_s, "memory_mb": memory_mb, "disk_mb": disk / 2**20,
            "batch_p50_ms": percentile(times, 0.5) * 1000,
            "batch_p99_ms": percentile(times, 0.99) * 1000,
            "lookups_per_s": 1000 * len(times) / sum(times), **got}


def bench_duckdb(hi: np.ndarray, lo: np.ndarray, probes: list[Any], primary_key: bool,
                 tmp: Path) -> dict[str, Any]:
    con = duckdb.connect(str(tmp / f"keys-{primary_key}.duckdb"))
    ddl = ", PRIMARY KEY (id_hi, id_lo)" if primary_key else ""
    con.execute(f"CREATE TABLE keys (id_hi BIGINT, id_lo BIGINT{ddl})")
    started = time.perf_counter()
    chunk = 1 << 20
    for i in range(0, len(hi), chunk):
        con.register("part", pa.table({"id_hi": hi[i:i + chunk], "id_lo": lo[i:i + chunk]}))
        con.execute("INSERT INTO keys SELECT * FROM part")
        con.unregister("part")
    con.execute("CHECKPOINT")
    load_s = time.perf_counter() - started
    times = []
    for qhi, qlo in probes:
        con.register("batch", pa.table({"id_hi": qhi, "id_lo": qlo}))
        t = time.perf_counter()
        if primary_key:
            con.execute("BEGIN")
            con.execute("INSERT INTO keys SELECT * FROM batch ON CONFLICT DO NOTHING")
            con.execute("COMMIT")
        else:
            con.execute("BEGIN")
            con.execute("INSERT INTO keys SELECT b.* FROM batch b ANTI JOIN keys k "
                        "ON k.id_hi = b.id_hi AND k.id_lo = b.id_lo")
            con.execute("COMMIT")
        times.append(time.perf_counter() - t)
    con.close()
    return {"load_s": load_s, "batch_p50_ms": percentile(times, 0.5) * 1000,
            "batch_p99_ms": percentile(times, 0.99) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, action="append")
    parser.add_argument("--baseline-max", type=int, default=10_000_000)
    parser.add_argument("--memory-mb", type=int, default=256)
    parser.add_argument("--skip-in-memory-above", type=int, default=200_000_000)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "results": []}
    for n in args.keys or [10_000_000]:
        rng = np.random.default_rng(n)
        hi = rng.integers(*I64, n, dtype=np.int64)
        lo = rng.integers(*I64, n, dtype=np.int64)
        probes = batches(rng, hi, lo, BATCHES)
        row: dict[str, Any] = {"keys": n}
        if n <= args.skip_in_memory_above:
            for name, compact in (("index", False), ("compact_index", True)):
                row[name] = bench_index(hi, lo, probes, compact)
                row[name].update(bench_index_rss(n, compact))
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            row["partitioned"] = bench_partitioned(hi, lo, probes, args.memory_mb, Path(tmp))
        if n <= args.baseline_max:
            with tempfile.TemporaryDirectory(dir=OUT) as tmp:
                row["anti_join"] = bench_duckdb(hi, lo, probes, False, Path(tmp))
                row["primary_key"] = bench_duckdb(hi, lo, probes, True, Path(tmp))
        row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report["results"].append(row)
        print(json.dumps(row), flush=True)
    (OUT / "dedup.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

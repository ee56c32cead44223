"""Dedup design benchmark: the in-memory sorted-run index against the two DuckDB ways of
checking keys, at N stored keys, per 1,000-key batch (10 of them already stored).

    python -m bench.dedup_bench --keys 10000000 --keys 100000000 --baseline-max 10000000

- ``index``: tally.ingest.dedup.DedupIndex (load from arrays, lookup, add the new keys)
- ``anti_join``: keys in a DuckDB table; each batch joined against it (a scan of the key columns)
- ``primary_key``: keys in a DuckDB table with PRIMARY KEY (ART index);
  each batch inserted with ON CONFLICT DO NOTHING
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench.common import OUT, machine, percentile
from tally.ingest.dedup import DedupIndex

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


def bench_index(hi: np.ndarray, lo: np.ndarray, probes: list[Any]) -> dict[str, Any]:
    index = DedupIndex()
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
            "index_mb": len(index) * 16 / 2**20}


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
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "results": []}
    for n in args.keys or [10_000_000]:
        rng = np.random.default_rng(n)
        hi = rng.integers(*I64, n, dtype=np.int64)
        lo = rng.integers(*I64, n, dtype=np.int64)
        probes = batches(rng, hi, lo, BATCHES)
        row: dict[str, Any] = {"keys": n, "index": bench_index(hi, lo, probes)}
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

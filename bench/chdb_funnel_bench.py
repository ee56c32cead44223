"""The funnel on chDB at the quick bench's store sizes: the route's plan (the kept rows,
``step_times``) against the raw SQL of the same answer, on the same engine, one query at a
time, in-process.

    python -m bench.chdb_funnel_bench [--stored 100000000] [--runs 5]

The chDB store holds the same stream as the quick bench's DuckDB store (``tally demo
--bulk``, built once by ``ensure_store``): an empty store made by ``open_backend`` gets that
store's events as Arrow batches, then ``step_times`` is filled by the store's own back-fill
statements (``from_all``: what a store opened by a version that adds the table runs). Only
``step_times`` is filled: the funnel reads nothing else. Each run moves the 30 days back by
one day; each answer's units per depth are checked equal to the raw SQL's. Then the route's
answer by kept days (``funnel.answer`` with a ``PartCache``): cold (a cache of its own: all
30 days computed, then combined) and sliding (one cache across the runs: the first run
computes its 30 days, each later one the day it slid onto). Results:
bench/out/chdb-funnel-<N>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from bench.cohort_bench import funnel_body, raw_funnel_sql
from bench.common import OUT, ensure_store, machine
from bench.engine_bench import _ts, open_store
from tally.cohorts import funnel
from tally.cohorts.tables import STEP_TIMES
from tally.insights.cache import PartCache
from tally.rollups.spec import derived_tables
from tally.storage.clickhouse_schema import derived_statement


def build(source: Path, folder: Path) -> dict[str, Any]:
    """The chDB copy of the DuckDB store at ``source``: its events, then ``step_times``."""
    folder.mkdir(parents=True)
    store = open_store("chdb", folder)
    try:
        started = time.perf_counter()
        con = duckdb.connect(str(source / "events.duckdb"), read_only=True)
        rows = 0
        for batch in con.sql("SELECT * FROM events").to_arrow_reader(1_000_000):
            store._writer.insert_arrow("events", pa.Table.from_batches([batch]))
            rows += batch.num_rows
        con.close()
        copied = time.perf_counter() - started
        started = time.perf_counter()
        steps = next(t for t in derived_tables("clickhouse") if t.name == STEP_TIMES)
        for sql in steps.from_all:
            store._writer.command(derived_statement(sql, steps))
        kept = store.query(f"SELECT count() AS n FROM {STEP_TIMES}").column("n")[0].as_py()  # noqa: S608
        return {"events": rows, "copy_seconds": round(copied, 1), "step_times_rows": kept,
                "step_times_seconds": round(time.perf_counter() - started, 1)}
    finally:
        store.close()


def _per_depth(rows: list[tuple[int, int]]) -> dict[int, int]:
    return {int(d): int(n) for d, n in sorted(rows)}


def run(stored: int, runs: int) -> dict[str, Any]:
    source = ensure_store(stored, 90)
    folder = OUT / f"chdb-{stored}"
    marker = folder / "copy.json"
    if not marker.exists():
        if folder.exists():
            raise SystemExit(f"{folder} holds an unfinished copy: remove it and run again")
        folder.parent.mkdir(parents=True, exist_ok=True)
        summary = build(source, folder)
        marker.write_text(json.dumps(summary))
    store = open_store("chdb", folder)
    try:
        last = store.query("SELECT max(occurred_at) AS m FROM events").column("m")[0].as_py()
        end = datetime(last.year, last.month, last.day)
        out = []
        days = PartCache()  # the route's kept whole days (a static store: one data version)
        for k in range(runs):
            f = funnel.parse(funnel_body(end, k))
            compiled = funnel.compile_kept(f, "clickhouse")
            started = time.perf_counter()
            kept = store.execute(compiled.tree, compiled.params)
            kept_s = time.perf_counter() - started
            start, stop = end - timedelta(days=30 + k), end - timedelta(days=k)
            started = time.perf_counter()
            raw = store.query(raw_funnel_sql(start, stop, lambda t: _ts(t, "clickhouse")))
            raw_s = time.perf_counter() - started
            depths: dict[int, int] = {}
            for d in kept.column("depth").to_pylist():
                depths[d] = depths.get(d, 0) + 1
            expected = _per_depth([tuple(r.values()) for r in raw.to_pylist()])
            if _per_depth(list(depths.items())) != expected:
                raise SystemExit(f"run {k}: kept rows {depths} != raw SQL {expected}")
            want = [sum(n for d, n in expected.items() if d >= i + 1) for i in range(4)]
            timed: dict[str, float] = {}
            for name, cache in (("cold", PartCache()), ("sliding", days)):
                started = time.perf_counter()
                by_day = funnel.answer(store, f, days=cache, version=lambda brands, reads: 0)
                timed[name] = time.perf_counter() - started
                counts = [s["count"] for s in by_day["steps"]]
                if counts != want:
                    raise SystemExit(f"run {k}: kept days ({name}) {counts} != raw SQL "
                                     f"{expected}")
            days_s = timed["sliding"]
            out.append({"end_days_back": k, "kept_s": round(kept_s, 3),
                        "raw_s": round(raw_s, 3), "ratio": round(raw_s / kept_s, 2),
                        "kept_days_cold_s": round(timed["cold"], 3),
                        "kept_days_s": round(days_s, 3),
                        "ratio_kept_days": round(raw_s / days_s, 2),
                        "units_per_depth": expected})
            print(json.dumps(out[-1]), flush=True)
    finally:
        store.close()
    return {"stored": stored, "copy": json.loads(marker.read_text()), "runs": out,
            "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result = run(args.stored, args.runs)
    (OUT / f"chdb-funnel-{args.stored}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

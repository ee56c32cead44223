"""Engine benchmark (issue 11): DuckDB and embedded ClickHouse (chDB) side by side, each a
whole Tally store (events and every derived table: rollups, activity, cohort tables), in one
run.

    python -m bench.engine_bench --events 10000000

1. A realistic stream from the vectorised demo generator (``tally demo --bulk``'s: distinct
   players, sessions, payment flows, late events; its ~1% re-sent duplicates dropped by the
   real dedup index), turned into stored rows by the columnar ingestion path
   (``tally.ingest.columnar.prepare_table``) in requests of 10,000 events, written once to
   ``bench/out/engine-<N>/events-<shard>.parquet`` (reused by later runs); its shape (players,
   sessions, events per type) in ``dataset.json``.
2. Per engine, a subprocess of its own (so its RSS is the engine's): an empty store opened as
   ``tally serve`` opens it (``TALLY_STORE``, ``storage/factory.py``), the rows written through
   ``backend.write()`` in group commits of ``--group`` requests (one journal record each, as
   the applier writes them; the derived tables kept by each engine's own path): rows/s, RSS,
   size on disk.
3. Then the same compiled queries (``tally.semantic.compiler``, the rollup and activity-table
   plans the routes choose, ``tally.cohorts.funnel``) through
   ``backend.execute(tree, params)``, and beside each the same answer written by hand in that
   engine's SQL through ``backend.query`` (the baseline), ``--runs`` times each, one at a time.
   Every answer is checked: compiled = hand-written on each engine, and DuckDB = ClickHouse.

Results: bench/out/engine-<N>.json and a Markdown table on stdout (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.common import OUT, machine, percentile

END = datetime(2026, 11, 1, tzinfo=UTC)  # the stream covers [END - days, END)
REQUEST = 1000  # events per ingestion request
ENGINES = ("duckdb", "chdb")


# -- the dataset ----------------------------------------------------------------------------
# The stream is generated in shards that run in parallel, one per group of regions: a player
# lives in one market, so the shards hold disjoint players, sessions and event ids (the
# generator's tag covers its markets) and their union is one operator's stream.
SHARDS = (("EU", "UK"), ("LATAM", "NA", "APAC"))
ROW_GROUP = 10  # requests per Parquet row group


def _shard_share(regions: tuple[str, ...]) -> float:
    from tally.demo.catalog import MARKETS

    return (sum(m[6] for m in MARKETS if m[1] in regions)
            / sum(m[6] for m in MARKETS))


def _generate_shard(args: tuple[int, int, int, tuple[str, ...], Path]) -> dict[str, Any]:
    """One shard's stored rows: the vectorised demo stream (``tally.demo.columnar``) through
    the columnar ingestion path (``tally.ingest.columnar.prepare_table``) and the real dedup
    index (``tally.ingest.dedup``), in requests of 10,000 events."""
    import pyarrow.parquet as pq

    from tally.demo.columnar import tables
    from tally.events.envelope import ValidationContext
    from tally.ingest.columnar import prepare_table
    from tally.ingest.dedup import DedupIndex, first_unseen, key_hasher

    events, days, index, regions, path = args
    ctx = ValidationContext(datetime.now(UTC), frozenset({"EU", "UK", "LATAM", "NA", "APAC"}))
    hasher = key_hasher(b"bench")
    seen = DedupIndex()
    rows = rejected = duplicates = 0
    writer: pq.ParquetWriter | None = None
    stream, batches = tables(events, days, 7 + index, END, REQUEST * ROW_GROUP, regions)
    for batch in batches:
        prepared = prepare_table(batch, ctx, "bench", hasher)
        rejected += len(prepared.rejections)
        table = prepared.table
        hi, lo = table.column("id_hi").to_numpy(), table.column("id_lo").to_numpy()
        keep = first_unseen(hi, lo, seen)
        seen.add(hi[keep], lo[keep])
        duplicates += int(len(keep) - keep.sum())
        table = table.filter(keep)
        rows += table.num_rows
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    return {"generated": stream.emitted, "stored_rows": rows, "duplicates_dropped": duplicates,
            "rejected": rejected, "shape": stream.shape()}


def ensure_dataset(events: int, days: int) -> list[Path]:
    """The stored rows of ``events`` generated events, built once (one file per shard)."""
    from concurrent.futures import ProcessPoolExecutor

    folder = OUT / f"engine-{events}"
    marker = folder / "dataset.json"
    paths = [folder / f"events-{i}.parquet" for i in range(len(SHARDS))]
    if marker.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sizes = [round(events * _shard_share(r)) for r in SHARDS]
    sizes[-1] = events - sum(sizes[:-1])
    jobs = [(n, days, i, r, p) for i, (n, r, p) in enumerate(zip(sizes, SHARDS, paths,
                                                                  strict=True))]
    with ProcessPoolExecutor(len(jobs)) as pool:
        shards = list(pool.map(_generate_shard, jobs))
    marker.write_text(json.dumps({
        "generator": "tally.demo.columnar", "shapes": [s.pop("shape") for s in shards],
        "generated": events, "days": days, "shards": [list(r) for r in SHARDS],
        **{k: sum(s[k] for s in shards) for k in ("stored_rows", "duplicates_dropped",
                                                 "rejected")},
        "seconds": round(time.perf_counter() - started, 1)}))
    return paths


def _requests(paths: list[Path], group: int) -> Iterator[list[Any]]:
    """The shards' rows interleaved in proportion (the stream's order across regions), in
    writes of ``group`` requests, each row given its ``ingest_seq``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # pre_buffer off: a pre-buffering reader keeps every buffer it has read until it is
    # closed (~64 MB per million rows here), which the engine's RSS would wrongly include
    files = [pq.ParquetFile(p, pre_buffer=False) for p in paths]
    readers = [f.iter_batches(batch_size=group * REQUEST) for f in files]
    totals = [f.metadata.num_rows for f in files]
    done = [0] * len(files)
    seq = 0
    while any(d < t for d, t in zip(done, totals, strict=True)):
        i = min((k for k in range(len(files)) if done[k] < totals[k]),
                key=lambda k: done[k] / totals[k])
        batch = next(readers[i])
        done[i] += batch.num_rows
        table = pa.Table.from_batches([batch])
        table = table.set_column(table.schema.get_field_index("ingest_seq"), "ingest_seq",
                                 pa.array(range(seq + 1, seq + 1 + table.num_rows), pa.int64()))
        seq += table.num_rows
        yield [table]


# -- the queries ----------------------------------------------------------------------------
def _ts(t: datetime, engine: str) -> str:
    text = t.strftime("%Y-%m-%d %H:%M:%S")
    return f"TIMESTAMP '{text}'" if engine == "duckdb" else f"toDateTime64('{text}', 6)"


def _bucket(step: int, engine: str) -> str:
    if engine == "duckdb":
        return f"date_diff('second', TIMESTAMP '1970-01-01', occurred_at) // {step} * {step}"
    return f"intDiv(toUnixTimestamp(occurred_at), {step}) * {step}"


def _range(s: datetime, e: datetime, engine: str) -> str:
    return f"occurred_at >= {_ts(s, engine)} AND occurred_at < {_ts(e, engine)}"


def _top(rows: list[list[Any]], n: int) -> list[list[Any]]:
    """The slice's ranking (insights/series.py): per game, wins / stake over the range, the
    greatest first, ties by key; the first ``n``."""
    totals: dict[Any, list[int]] = {}
    for _, game, _, win, stake in rows:
        acc = totals.setdefault(game, [0, 0])
        acc[0] += int(win)
        acc[1] += int(stake)
    ratios = [(g, w / s) for g, (w, s) in totals.items() if s]
    return [[g, v] for g, v in sorted(ratios, key=lambda kv: (-kv[1], kv[0]))[:n]]


def cases(days: int) -> list[dict[str, Any]]:
    """name → the compiled query, how its rows become the answer, and the hand-written SQL of
    the same answer on each engine (``raw(engine)``)."""
    from bench.cohort_bench import raw_funnel_sql
    from tally.cohorts import funnel
    from tally.rollups.activity import compile_active_from_rollup
    from tally.rollups.spec import compile_from_rollup
    from tally.semantic.catalog import METRICS
    from tally.semantic.compiler import Scope, compile_active, compile_measures

    end = END.replace(tzinfo=None)
    s30, s1 = end - timedelta(days=min(30, days)), end - timedelta(days=1)
    s7 = end - timedelta(days=min(7, days))

    def ggr_1h(engine: str) -> str:
        return (f"SELECT {_bucket(3600, engine)} AS b, tenant_id, currency, "
                f"sum(coalesce(stake_minor, 0)), sum(coalesce(win_minor, 0)) FROM events "
                f"WHERE event_type = 'bet.settled' AND {_range(s30, end, engine)} "
                f"GROUP BY b, tenant_id, currency")

    def ggr_5m(engine: str) -> str:
        return (f"SELECT {_bucket(300, engine)} AS b, currency, sum(coalesce(stake_minor, 0)), "
                f"sum(coalesce(win_minor, 0)) FROM events WHERE event_type = 'bet.settled' "
                f"AND tenant_id = 'brand-1' AND {_range(s1, end, engine)} GROUP BY b, currency")

    def dau(engine: str) -> str:
        # each engine's natural spelling of "the session ended after a minute or more"
        pair = ("tenant_id || chr(31) || session_id" if engine == "duckdb"
                else "(tenant_id, session_id)")
        sessions = (f"{pair} IN (SELECT {pair} FROM events "
                    "WHERE event_type = 'session.ended' AND duration_sec >= 60)")
        distinct = ("count(DISTINCT player_id)" if engine == "duckdb"
                    else "uniqExact(player_id)")
        return (f"SELECT {_bucket(86400, engine)} AS b, {distinct} FROM events WHERE "
                f"{_range(s30, end, engine)} AND player_id IS NOT NULL AND ("
                f"event_type = 'bet.placed' OR (event_type = 'wallet.credit' AND "
                f"reason = 'deposit') OR (event_type = 'session.started' AND {sessions})) "
                f"GROUP BY b")

    def deposits_success(engine: str) -> str:
        count = "count_if" if engine == "duckdb" else "countIf"
        return (f"SELECT {_bucket(3600, engine)} AS b, "
                f"{count}(event_type = 'payment.captured'), "
                f"{count}(event_type = 'payment.intent') FROM events WHERE "
                f"{_range(s30, end, engine)} AND "
                f"event_type IN ('payment.captured', 'payment.intent') GROUP BY b")

    def rtp(engine: str) -> str:
        return (f"SELECT game_id, sum(win_minor) / sum(stake_minor) AS v FROM events "
                f"WHERE event_type = 'bet.settled' AND currency = 'EUR' AND "
                f"{_range(s30, end, engine)} GROUP BY game_id HAVING sum(stake_minor) <> 0 "
                f"ORDER BY v DESC, game_id LIMIT 50")

    deposit_funnel = funnel.parse({
        "steps": [{"event": "payment.intent"},
                  {"event": "payment.captured", "within_sec": 600},
                  {"event": "wallet.credit", "reason": "deposit"}],
        "window_sec": 3600, "from": s7.strftime("%Y-%m-%d"), "to": end.strftime("%Y-%m-%d"),
        "filters": {"brand_id": "brand-1"}})
    four_steps = funnel.parse({
        "steps": [{"event": "payment.intent"}, {"event": "payment.captured"},
                  {"event": "wallet.credit", "reason": "deposit"}, {"event": "bet.placed"}],
        "window_sec": 3600, "from": s30.strftime("%Y-%m-%d"), "to": end.strftime("%Y-%m-%d")})

    def route_funnel(dialect: str) -> Any:
        """The plan the route chooses on this engine (the kept rows where they can answer)."""
        return funnel.compile_kept(four_steps, dialect) \
            if funnel.kept(four_steps) else funnel.compile_funnel(four_steps)

    def funnel_raw(engine: str) -> str:
        """Units per depth reached, as inequality joins with min() on the events."""
        return raw_funnel_sql(s30, end, lambda t: _ts(t, engine))

    def per_depth(rows: list[list[Any]]) -> list[list[Any]]:
        """The funnel's rows (one a unit: depth, gaps, collided) as units per depth."""
        counts: dict[int, int] = {}
        for row in rows:
            counts[row[0]] = counts.get(row[0], 0) + 1
        return sorted([d, n] for d, n in counts.items())

    return [
        {"name": "funnel 4 steps, 30 days, 1 h window (the route's plan)",
         "compiled": route_funnel, "finish": per_depth, "raw": funnel_raw},
        {"name": "ggr 1h, 30 days, by brand",
         "compiled": compile_measures(METRICS["ggr"], Scope(s30, end, 3600, {}, ("brand_id",)),
                                      by_currency=True), "raw": ggr_1h},
        {"name": "ggr 1h, 30 days, by brand, from rollup_1h (the route's plan)",
         "compiled": compile_from_rollup(METRICS["ggr"],
                                         Scope(s30, end, 3600, {}, ("brand_id",)),
                                         by_currency=True), "raw": ggr_1h},
        {"name": "ggr 5m, 1 day, 1 brand",
         "compiled": compile_measures(METRICS["ggr"],
                                      Scope(s1, end, 300, {"brand_id": ("brand-1",)}, ()),
                                      by_currency=True), "raw": ggr_5m},
        {"name": "dau 1d, 30 days",
         "compiled": compile_active(Scope(s30, end, 86400, {}, ()), 60, distinct=True),
         "raw": dau},
        {"name": "ggr 5m, 1 day, 1 brand, from rollup_1m (the route's plan)",
         "compiled": compile_from_rollup(METRICS["ggr"],
                                         Scope(s1, end, 300, {"brand_id": ("brand-1",)}, ()),
                                         by_currency=True), "raw": ggr_5m},
        {"name": "dau 1d, 30 days, from active_1d (the route's plan)",
         "compiled": compile_active_from_rollup(Scope(s30, end, 86400, {}, ()), 60,
                                                distinct=True), "raw": dau},
        {"name": "deposits_success 1h, 30 days",
         "compiled": compile_measures(METRICS["deposits_success"],
                                      Scope(s30, end, 3600, {}, ()), by_currency=False),
         "raw": deposits_success},
        {"name": "slice rtp by game_id, EUR, top 50, 30 days",
         "compiled": compile_measures(METRICS["rtp"],
                                      Scope(s30, end, 86400, {"currency": ("EUR",)},
                                            ("game_id",)), by_currency=True),
         "finish": lambda rows: _top(rows, 50), "raw": rtp},
        {"name": "funnel intent → captured → deposit, 7 days, 1 brand",
         "compiled": funnel.compile_funnel(deposit_funnel), "raw": None},
    ]


# -- one engine (a subprocess) ----------------------------------------------------------------
def _value(v: Any) -> Any:
    if isinstance(v, Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float):
        return float(f"{v:.12g}")
    if isinstance(v, datetime):
        return v.isoformat()
    return v


def normal(rows: list[dict[str, Any]] | list[list[Any]]) -> list[list[Any]]:
    out = [[_value(v) for v in (r.values() if isinstance(r, dict) else r)] for r in rows]
    return sorted(out, key=repr)


def _proc(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines()
                if x.startswith(field))
    return int(line.split()[1]) / 1024


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2 ** 20


# The engine's memory, as TALLY_QUERY_MEMORY_LIMIT gives it (DuckDB: the database's buffer
# memory, readers and writer together; ClickHouse: each statement's): 4 GiB, the RSS goal of
# issue 14 at 100M, and with --together two engines share the machine within its 23 GB.
MEMORY_LIMIT = 4 * 2**30


def open_store(engine: str, folder: Path) -> Any:
    """The store as ``tally serve`` opens it, with every derived table."""
    from tally.rollups import activity
    from tally.rollups.spec import derived_tables
    from tally.storage.factory import open_backend
    from tally.storage.limits import QueryLimits

    return open_backend(engine, folder, derived=derived_tables, retired=activity.RETIRED,
                        limits=QueryLimits(memory_bytes=MEMORY_LIMIT))


def _queries_alone(folder: Path, engine: str, engines: Sequence[str]) -> Any:
    """With ``--together`` the engines ingest at the same time, then query one at a time:
    wait until every engine has ingested, then hold the lock of the query phase."""
    import fcntl

    (folder / f"{engine}.ingested").touch()
    while not all((folder / f"{e}.ingested").exists() for e in engines):
        time.sleep(1)
    lock = (folder / "queries.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def worker(engine: str, events: int, days: int, group: int, runs: int,
           together: bool = False, engines: Sequence[str] = ENGINES) -> dict[str, Any]:
    from tally.storage.base import WriteSet

    folder = OUT / f"engine-{events}" / engine
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rss_before = _proc("VmRSS")
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    store = open_store(engine, folder)
    written = seq = 0
    write_s = 0.0
    for tables in _requests(ensure_dataset(events, days), group):
        seq += 1
        started = time.perf_counter()
        store.write(WriteSet(events=tables), journal_seq=seq)
        write_s += time.perf_counter() - started
        written += sum(t.num_rows for t in tables)
        if seq % 50 == 0:  # progress of a long run, on stderr
            print(f"{engine}: {written:,} rows in {write_s:.0f} s of writes "
                  f"({written / write_s:,.0f} rows/s), RSS {_proc('VmRSS'):,.0f} MB",
                  file=sys.stderr, flush=True)
    assert store.count_events() == written
    result: dict[str, Any] = {
        "engine": engine, "rows": written, "writes": seq, "write_s": round(write_s, 1),
        "rows_per_s": round(written / write_s), "rss_before_store_mb": round(rss_before),
        "rss_after_ingest_mb": round(_proc("VmRSS")),
        "peak_rss_ingest_mb": round(_proc("VmHWM")), "disk_after_ingest_mb": round(
            _size_mb(folder)), "load_avg_1m_ingest": [load_before, os.getloadavg()[0]]}
    if engine == "chdb":
        result["active_parts_after_ingest"] = int(store.query(
            "SELECT count() FROM system.parts WHERE table = 'events' AND active").column(0)[0]
            .as_py())
    # the ingest figures kept before the queries (a long run stopped there keeps them)
    (folder.parent / f"{engine}-ingest.json").write_text(json.dumps(result))
    lock = _queries_alone(folder.parent, engine, engines) if together else None
    result["load_avg_1m_queries_start"] = os.getloadavg()[0]
    result["queries"] = {}
    for case in cases(days):
        compiled, finish = case["compiled"], case.get("finish", lambda rows: rows)
        if callable(compiled):  # a plan the engine chooses
            compiled = compiled(store.dialect)

        def run_compiled(c: Any = compiled, f: Callable[[Any], Any] = finish) -> Any:
            return f(normal(store.execute(c.tree, c.params).to_pylist()))

        timings: dict[str, Any] = {}
        answer = run_compiled()  # warm-up, and the answer
        timings["compiled"] = _timed(run_compiled, runs)
        if case["raw"] is not None:
            sql = case["raw"]("duckdb" if engine == "duckdb" else "clickhouse")

            def run_raw(q: str = sql) -> Any:
                return normal(store.query(q).to_pylist())

            baseline = run_raw()
            timings["raw_sql"] = _timed(run_raw, runs)
            timings["same_as_raw_sql"] = _close(normal(answer), baseline)
            assert timings["same_as_raw_sql"], (case["name"], answer[:3], baseline[:3])
        timings["answer_rows"] = len(answer)
        timings["answer"] = normal(answer)
        result["queries"][case["name"]] = timings
    result["load_avg_1m_queries_end"] = os.getloadavg()[0]
    result["peak_rss_mb"] = round(_proc("VmHWM"))
    result["rss_after_queries_mb"] = round(_proc("VmRSS"))
    store.close()
    result["disk_mb"] = round(_size_mb(folder))
    if lock is not None:
        lock.close()
    return result


def _timed(run: Callable[[], Any], runs: int) -> dict[str, float]:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        took.append(time.perf_counter() - started)
    return {"p50_ms": round(percentile(took, 0.5) * 1000, 1),
            "p95_ms": round(percentile(took, 0.95) * 1000, 1), "runs": runs}


def _close(a: list[list[Any]], b: list[list[Any]]) -> bool:
    """Same rows; floats to 1e-9 relative (a ratio computed in another order)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if len(x) != len(y):
            return False
        for u, v in zip(x, y, strict=True):
            if isinstance(u, float) or isinstance(v, float):
                if u is None or v is None or abs(float(u) - float(v)) > 1e-9 * max(
                        1.0, abs(float(u))):
                    return False
            elif u != v:
                return False
    return True


# -- the run ----------------------------------------------------------------------------------
NAMES = {"duckdb": "DuckDB", "chdb": "chDB"}


def table(report: dict[str, Any], engines: list[str]) -> str:
    runs = [report[e] for e in engines]
    names = [NAMES[e] for e in engines]
    same = report.get("same_answers")

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | {' | '.join(cells)} |"

    def cell(t: dict[str, Any] | None) -> str:
        return "—" if t is None else f"{t['p50_ms']:,} / {t['p95_ms']:,}"

    lines = [
        row("", names), "|---" * (len(engines) + 1) + "|",
        row("ingest, `write()` per group commit", [f"{r['rows_per_s']:,} rows/s" for r in runs]),
        row("RSS after ingest / peak (ingest + queries)",
            [f"{r['rss_after_ingest_mb']:,} / {r['peak_rss_mb']:,} MB" for r in runs]),
        row("on disk", [f"{r['disk_mb']:,} MB" for r in runs]), "",
        row("query (p50 / p95 ms)", [f"{n} {kind}" for n in names
                                     for kind in ("compiled", "raw SQL")]
            + ["rows"] + (["same answer"] if same else [])),
        "|---" * (2 * len(engines) + 2 + bool(same)) + "|"]
    for name, first in runs[0]["queries"].items():
        cells = [cell(r["queries"][name][kind]) if kind == "compiled"
                 else cell(r["queries"][name].get("raw_sql"))
                 for r in runs for kind in ("compiled", "raw")]
        cells.append(str(first["answer_rows"]))
        if same:
            cells.append("yes" if same[name] else "NO")
        lines.append(row(name, cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--group", type=int, default=10,
                        help="requests of 1,000 events per group commit (one write)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--together", action="store_true",
                        help="the engines ingest at the same time (each a process), then "
                        "query one after the other")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="the engines to run, comma-separated (default: both)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if not engines or set(engines) - set(ENGINES):
        parser.error(f"--engines: a comma-separated subset of {','.join(ENGINES)}")
    if args.worker:
        result = worker(args.worker, args.events, args.days, args.group, args.runs,
                        args.together, engines)
        (OUT / f"engine-{args.events}" / f"{args.worker}.json").write_text(json.dumps(result))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ensure_dataset(args.events, args.days)
    dataset = json.loads((OUT / f"engine-{args.events}" / "dataset.json").read_text())
    report: dict[str, Any] = {"dataset": dataset, "group_rows": args.group * REQUEST,
                              "runs": args.runs, "together": args.together}
    for marker in (OUT / f"engine-{args.events}").glob("*.ingested"):
        marker.unlink()
    argv = ["--events", str(args.events), "--days", str(args.days), "--group",
            str(args.group), "--runs", str(args.runs)] + (["--together"] if args.together
                                                          else [])
    argv += ["--engines", ",".join(engines)]
    runs = [[sys.executable, "-m", "bench.engine_bench", "--worker", e, *argv] for e in engines]
    if args.together:
        procs = [subprocess.Popen(cmd) for cmd in runs]
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs):  # the others would wait for it forever
                for p in procs:
                    p.kill()
                sys.exit("an engine's worker failed")
            time.sleep(1)
        if any(p.returncode for p in procs):
            sys.exit("an engine's worker failed")
    else:
        for cmd in runs:
            subprocess.run(cmd, check=True)
    for engine in engines:
        report[engine] = json.loads(
            (OUT / f"engine-{args.events}" / f"{engine}.json").read_text())
    if len(engines) == len(ENGINES):
        report["same_answers"] = {
            name: _close(q["answer"], report["chdb"]["queries"][name]["answer"])
            for name, q in report["duckdb"]["queries"].items()}
    for engine in engines:
        for q in report[engine]["queries"].values():
            q.pop("answer")
    report.update(machine=machine(), wall_s=round(time.perf_counter() - started),
                  at=datetime.now(UTC).isoformat(timespec="seconds"))
    (OUT / f"engine-{args.events}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(table(report, engines))
    if not all(report.get("same_answers", {}).values()):
        sys.exit("the engines answered differently")


if __name__ == "__main__":
    main()

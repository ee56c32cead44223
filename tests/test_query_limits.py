"""Engine bounds on query statements (issue 9 item 5): a statement timeout and a memory limit
(with spilling to disk under the data dir). A statement stopped by either is a ``503``
problem with ``Retry-After`` naming the limit, never a ``500``, and the store answers the next
query. Real DuckDB stores in temp dirs, real heavy statements; the API through the real app.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from fastapi.testclient import TestClient
from sqlglot import exp

from tally.api.app import create_app
from tally.cohorts.request import MAX_COHORT_CELLS, MAX_EXCLUSIONS, MAX_STEPS
from tally.config import Settings, parse_size
from tally.errors import QueryMemoryExceeded, QueryTimeout
from tally.runtime import SERVING_QUERY_THREADS, SPILL_DIR, open_store, serving
from tally.storage.duckdb import DuckDBBackend
from tally.storage.limits import QueryLimits
from tests.conftest import bearer, make_event, on_duckdb_only

# ~10^11 rows: minutes of work unless stopped
ENDLESS = sqlglot.parse_one("SELECT count(*) AS n FROM range(100000000000) AS t(i) "
                            "WHERE i % 7 = 3", dialect="duckdb")
# a hash aggregate over 4M distinct keys: more state than 64 MiB
HUNGRY = sqlglot.parse_one("SELECT i, count(*) AS n FROM range(4000000) AS t(i) GROUP BY i "
                           "ORDER BY n DESC, i LIMIT 1", dialect="duckdb")
SMALL = sqlglot.parse_one("SELECT sum(i) AS n FROM range(1000) AS t(i)", dialect="duckdb")


def store(tmp_path: Path, limits: QueryLimits) -> DuckDBBackend:
    return DuckDBBackend(tmp_path, limits=limits, spill_dir=tmp_path / "spill")


def test_a_statement_past_the_timeout_is_stopped_and_the_cursor_answers_the_next(tmp_path):
    backend = store(tmp_path, QueryLimits(timeout_seconds=0.3))
    started = time.monotonic()
    with pytest.raises(QueryTimeout) as stopped:
        backend.execute(ENDLESS, {})
    assert time.monotonic() - started < 5
    err = stopped.value
    assert (err.status, err.code, err.headers) == (503, "query-timeout", {"Retry-After": "10"})
    assert "0.3 s" in err.detail and "TALLY_QUERY_TIMEOUT_SECONDS" in err.detail
    # the same thread's cursor, right after
    assert backend.execute(SMALL, {}).to_pylist() == [{"n": 499500}]
    backend.close()


def test_the_timer_of_a_finished_statement_never_stops_a_later_one(tmp_path):
    """Each statement disarms its timer when it ends: statements shorter than the timeout,
    run back to back for several timeouts, are never interrupted by an earlier one's timer."""
    backend = store(tmp_path, QueryLimits(timeout_seconds=0.05))
    until = time.monotonic() + 0.5
    runs = 0
    while time.monotonic() < until:
        assert backend.execute(SMALL, {}).to_pylist() == [{"n": 499500}]
        runs += 1
    assert runs > 20
    time.sleep(0.1)  # every timer armed so far is past its time
    assert backend.execute(SMALL, {}).to_pylist() == [{"n": 499500}]
    backend.close()


def test_timeouts_on_concurrent_readers_stop_only_their_own_statement(tmp_path):
    backend = store(tmp_path, QueryLimits(timeout_seconds=0.3))
    outcomes: dict[str, Any] = {}

    def heavy() -> None:
        try:
            backend.execute(ENDLESS, {})
        except QueryTimeout as exc:
            outcomes["heavy"] = exc.code

    def light() -> None:
        results = [backend.execute(SMALL, {}).to_pylist() for _ in range(50)]
        outcomes["light"] = all(r == [{"n": 499500}] for r in results)

    threads = [threading.Thread(target=heavy), threading.Thread(target=light)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes == {"heavy": "query-timeout", "light": True}
    backend.close()


def test_a_statement_over_the_memory_limit_is_503_and_the_store_answers_the_next(tmp_path):
    backend = store(tmp_path, QueryLimits(memory_bytes=64 * 2**20, spill_bytes=0))
    with pytest.raises(QueryMemoryExceeded) as stopped:
        backend.execute(HUNGRY, {})
    err = stopped.value
    assert (err.status, err.code, err.headers) == (503, "query-memory-exceeded",
                                                   {"Retry-After": "10"})
    assert "64.0 MiB" in err.detail and "TALLY_QUERY_MEMORY_LIMIT" in err.detail
    assert backend.execute(SMALL, {}).to_pylist() == [{"n": 499500}]
    backend.close()


def test_with_spill_space_the_same_statement_completes_under_the_memory_limit(tmp_path):
    backend = store(tmp_path, QueryLimits(memory_bytes=64 * 2**20, spill_bytes=4 * 2**30))
    assert backend.execute(HUNGRY, {}).to_pylist() == [{"i": 0, "n": 1}]
    settings = backend.query("SELECT current_setting('memory_limit') AS m, "
                             "current_setting('temp_directory') AS t").to_pylist()
    assert settings == [{"m": "64.0 MiB", "t": str(tmp_path / "spill")}]
    backend.close()


def test_the_store_draws_no_progress_bar(tmp_path):
    """DuckDB draws a progress bar on stderr for a statement over two seconds (also when
    stderr is no terminal): among a server's JSON log lines it would be garbage."""
    backend = store(tmp_path, QueryLimits())
    assert backend.query("SELECT current_setting('enable_progress_bar') AS p").to_pylist() \
        == [{"p": False}]
    backend.close()


@pytest.mark.parametrize(("text", "expected"), [
    ("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("0", 0),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


def test_a_share_of_memory_is_of_the_machine_or_its_cgroup():
    pages = Path("/proc/meminfo").read_text().splitlines()
    total = int(next(p for p in pages if p.startswith("MemTotal")).split()[1]) * 1024
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.exists() and cgroup.read_text().strip().isdigit():
        total = min(total, int(cgroup.read_text()))
    assert abs(parse_size("50%") - total // 2) < total * 0.01


@pytest.mark.parametrize("settings", [
    {"query_memory_limit": "lots"}, {"query_memory_limit": "0"},
    {"query_memory_limit": "120%"}, {"query_memory_limit": "1MB"},
    {"query_spill_limit": "a bit"}, {"query_timeout_seconds": 0}, {"query_threads": -1},
])
def test_bad_limits_are_refused_at_start(settings):
    with pytest.raises(ValueError, match="query_"):
        Settings(**settings)


# --------------------------------------------------------------------------- over HTTP


# ten steps, the same event types repeated (so ordered by event_id too): the heaviest shape
FUNNEL = {"steps": ["session.started"] + ["bet.placed", "bet.settled"] * 4 + ["bet.placed"],
          "window_sec": 86_400, "from": "2025-10-22", "to": "2025-10-25"}


def events(players: int) -> list[dict[str, Any]]:
    """A session, then 5 bets placed and settled at the same instant: their order is the
    event ids' (``-a`` before ``-b``), fixed here — not the test session's id counter, whose
    value when this runs (``ev-9999`` after ``ev-10000`` as text) once lost a player."""
    start = datetime(2025, 10, 22, tzinfo=UTC)
    out = []
    for p in range(players):
        t = start + timedelta(minutes=2 * p)
        out.append(make_event(event_type="session.started", occurred_at=t.isoformat(),
                              event_id=f"q{p:05d}-s", player_id=f"p{p}",
                              payload={"session_id": f"s{p}"}))
        for k in range(5):
            payload = {"bet_id": f"b{p}-{k}", "stake_minor": 100, "currency": "EUR",
                       "game_id": "g_01", "provider_id": "studio_x"}
            at = (t + timedelta(seconds=10 + k)).isoformat()
            out.append(make_event(event_type="bet.placed", occurred_at=at, player_id=f"p{p}",
                                  event_id=f"q{p:05d}-{k}-a", payload=payload))
            out.append(make_event(event_type="bet.settled", occurred_at=at, player_id=f"p{p}",
                                  event_id=f"q{p:05d}-{k}-b",
                                  payload={**payload, "win_minor": 0}))
    return out


def test_a_query_stopped_by_the_timeout_is_503_and_the_next_query_is_answered(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK",
                        query_timeout_seconds=0.001)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        sent = events(1800)  # 19,800 events: the funnel takes ~0.3 s here
        for batch in (sent[:9900], sent[9900:]):
            r = client.post("/v1/events:batch", json=batch, headers=headers)
            assert r.status_code == 202 and r.json()["accepted"] == 9900, r.text
        # all applied first: read-your-writes waits a bounded time only, and a loaded machine
        # may need longer (the answer would then rightly hold fewer, its watermark says so)
        assert client.app.state.runtime.ingest.flush(60)
        r = client.post("/v1/analytics/funnel", json=FUNNEL, headers=headers)
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["retry-after"] == "10"
        body = r.json()
        assert body["type"].endswith("/query-timeout")
        assert "TALLY_QUERY_TIMEOUT_SECONDS" in body["detail"]
        assert body["limit"] == "query_timeout_seconds"
        backend = client.app.state.runtime.backend  # the operator raises the limit
        backend.limits = replace(backend.limits, timeout_seconds=30.0)
        r = client.post("/v1/analytics/funnel", json=FUNNEL, headers=headers)
        assert r.status_code == 200, r.text
        assert [s["count"] for s in r.json()["steps"]] == [1800] * 10


@on_duckdb_only("DuckDB's spill settings (ClickHouse spills in its own folder)")
def test_the_store_spills_under_the_data_dir_within_the_configured_bounds(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU", query_memory_limit="256MB",
                        query_spill_limit="1GB")
    opened = open_store(settings)
    try:
        assert opened.limits == QueryLimits(30.0, 256 * 10**6, 10**9)
        got = opened.query("SELECT current_setting('memory_limit') AS m, "
                           "current_setting('temp_directory') AS t, "
                           "current_setting('max_temp_directory_size') AS s").to_pylist()
        assert got == [{"m": "244.1 MiB", "t": str(settings.data_dir / SPILL_DIR),
                        "s": "953.6 MiB"}]
    finally:
        opened.close()


def test_a_server_runs_a_statement_on_one_thread_unless_told(tmp_path, monkeypatch):
    """Unset, TALLY_QUERY_THREADS is 1 for ``tally serve`` and one a core elsewhere (a bulk
    load); set, it is what it says, 0 included."""
    monkeypatch.delenv("TALLY_QUERY_THREADS", raising=False)
    unset = Settings(data_dir=tmp_path, regions="EU")
    assert unset.query_threads is None and SERVING_QUERY_THREADS == 1
    assert serving(unset).query_threads == (1 if unset.store == "duckdb" else None)
    # measured on DuckDB only: a ClickHouse store keeps ClickHouse's default
    assert serving(unset.model_copy(update={"store": "duckdb"})).query_threads == 1
    assert serving(unset.model_copy(update={"store": "chdb"})).query_threads is None
    for given in ("0", "4"):
        monkeypatch.setenv("TALLY_QUERY_THREADS", given)
        assert serving(Settings(data_dir=tmp_path, regions="EU")).query_threads == int(given)
    monkeypatch.delenv("TALLY_QUERY_THREADS")
    opened = open_store(serving(unset))
    try:
        assert int(opened.rows(exp.select(exp.alias_(exp.Anonymous(
            this="current_setting" if opened.dialect == "duckdb" else "getSetting",
            expressions=[exp.Literal.string("threads" if opened.dialect == "duckdb"
                                            else "max_threads")]), "t")), {})[0]["t"]) == \
            (1 if opened.dialect == "duckdb" else os.cpu_count())
    finally:
        opened.close()


def test_query_threads_bounds_the_threads_of_a_query(tmp_path):
    """TALLY_QUERY_THREADS: DuckDB's thread pool, ClickHouse's max_threads of each query
    statement (0: the engine's default, one a core)."""
    for threads in (1, 0):
        settings = Settings(data_dir=tmp_path / f"data{threads}", regions="EU",
                            query_threads=threads)
        opened = open_store(settings)
        try:
            assert opened.limits.threads == (threads or None)
            name, setting = (("current_setting", "threads") if opened.dialect == "duckdb"
                             else ("getSetting", "max_threads"))
            tree = exp.select(exp.alias_(exp.Anonymous(
                this=name, expressions=[exp.Literal.string(setting)]), "t"))
            got = int(opened.rows(tree, {})[0]["t"])
            assert got == (threads or os.cpu_count())
        finally:
            opened.close()


# --------------------------------------------------------------------------- size limits


@pytest.fixture
def empty_api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(data_dir=tmp_path / "data", regions="EU")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, bearer(client, settings.data_dir)


def problem(r: Any, status: int, *named: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    for name in named:
        assert name in body["detail"], (name, body["detail"])
    return body


EXCLUDE = {"event": "payment.failed"}


@pytest.mark.parametrize(("change", "status", "named"), [
    ({"exclusions": [EXCLUDE] * (MAX_EXCLUSIONS + 1)}, 400, ("exclusions", "10")),
    ({"from": "2025-01-01", "to": "2026-01-02T00:00:01Z"}, 400, ("366 days",)),
], ids=["11-exclusions", "range-over-366-days"])
def test_funnel_size_limits(empty_api, change, status, named):
    client, headers = empty_api
    body = {"steps": ["payment.intent", "payment.captured"], "window_sec": 60,
            "from": "2025-01-01", "to": "2025-01-02", **change}
    problem(client.post("/v1/analytics/funnel", json=body, headers=headers), status, *named)


def test_funnel_size_limits_are_inclusive(empty_api):
    client, headers = empty_api
    body = {"steps": ["payment.intent"] * MAX_STEPS, "window_sec": 90 * 86_400,
            "exclusions": [EXCLUDE] * MAX_EXCLUSIONS, "from": "2025-01-01",
            "to": "2026-01-02"}  # 366 days
    r = client.post("/v1/analytics/funnel", json=body, headers=headers)
    assert r.status_code == 200 and r.json()["total"] == 0, r.text


@pytest.mark.parametrize(("first", "last", "horizon", "ok"), [
    ("2025-01-01", "2026-01-01", "100d", True),  # 366 × 100 = 36,600
    ("2025-01-01", "2026-01-01", "101d", False),
    ("2025-01-01", "2025-04-10", "365d", True),  # 100 × 365
    ("2025-01-01", "2025-04-11", "365d", False),
])
def test_ltv_cohort_days_times_horizon_is_limited(empty_api, first, last, horizon, ok):
    client, headers = empty_api
    r = client.get("/v1/analytics/ltv", headers=headers, params={
        "start_date": first, "end_date": last, "horizon": horizon})
    if ok:
        assert r.status_code == 200, r.text
    else:
        body = problem(r, 422, str(MAX_COHORT_CELLS), "horizon")
        assert (body["limit"], body["max_cohort_cells"]) == ("max_cohort_cells",
                                                              MAX_COHORT_CELLS)


def test_timeseries_bucket_limit_names_it(empty_api):
    client, headers = empty_api
    r = client.get("/v1/analytics/timeseries", headers=headers, params={
        "metric": "bets", "granularity": "1m", "from": "2025-01-01", "to": "2025-02-05"})
    assert problem(r, 400, "50000 buckets")["limit"] == "max_buckets"


def test_one_watchdog_keeps_every_statement_timer_and_stays_small():
    """Statement timers share one thread (storage/limits._Watchdog): a due timer interrupts
    its statement again and again until disarmed, a disarmed one never does, and timers
    disarmed long before their deadline do not pile up."""
    import threading

    from tally.storage import limits

    class Statement:
        def __init__(self) -> None:
            self.interrupts = 0

        def interrupt(self) -> None:
            self.interrupts += 1

    before = threading.active_count()
    for _ in range(3000):  # short statements under a long timeout
        limits._Timer(Statement(), 60).disarm()
    assert len(limits._WATCHDOG._heap) <= 1024 + 1
    slow, quick = Statement(), Statement()
    due = limits._Timer(slow, 0.05)
    limits._Timer(quick, 0.05).disarm()
    time.sleep(0.3)
    due.disarm()
    fired = slow.interrupts
    assert due.fired and fired >= 5 and quick.interrupts == 0  # every 10 ms once due
    time.sleep(0.1)
    assert slow.interrupts == fired  # disarmed: no more
    assert threading.active_count() <= before + 1  # one watchdog thread, at most


@pytest.mark.parametrize("memory", [1 << 30, None])
def test_the_start_up_scans_blocks_are_given_back(tmp_path, memory):
    """DuckDB keeps every block it read up to its memory limit: after the start-up scans
    (``drop_cached_blocks``) the blocks are evicted, and the limit is what it was."""
    store = DuckDBBackend(tmp_path, limits=QueryLimits(None, memory, None))
    try:
        cur = store._con.cursor()
        cur.execute("CREATE TABLE wide AS SELECT range AS a, hash(range) AS b "
                    "FROM range(16000000)")
        cur.execute("CHECKPOINT")
        limit = cur.execute("SELECT current_setting('memory_limit')").fetchone()

        def cached_mb() -> float:
            return cur.execute("SELECT memory_usage_bytes / 1048576 FROM duckdb_memory() "
                               "WHERE tag = 'BASE_TABLE'").fetchone()[0]

        assert cur.execute("SELECT sum(a), sum(b) FROM wide").fetchone()[0] == \
            16000000 * 15999999 // 2
        before = cached_mb()
        assert before > 100  # 16M rows of two 64-bit columns, read once
        store.drop_cached_blocks()
        assert cached_mb() <= 64  # storage/duckdb.EVICTION_LIMIT
        assert cur.execute("SELECT current_setting('memory_limit')").fetchone() == limit
        assert cur.execute("SELECT count(*) FROM wide").fetchone()[0] == 16000000  # re-read
    finally:
        store.close()

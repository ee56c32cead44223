"""The ClickHouse backend (storage/clickhouse.py) on a real embedded chDB, no mocks: every
protocol method, the same answers as DuckDB for the same writes, idempotent replays of a
journal record (its deduplication tokens), and a ``kill -9`` of a writing process.

chDB allows one engine path per process: each test closes its store before the next opens
another (the ``chstore`` fixture), and the killed writer is a process of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import numpy as np
import pyarrow as pa
import pytest
import sqlglot
from clickhouse_connect.driver.exceptions import DatabaseError, DataError
from sqlglot import exp

from tally.errors import QueryMemoryExceeded, QueryTimeout, StoreUnavailable, WriteRejected
from tally.rollups import activity
from tally.rollups.spec import derived_tables
from tally.storage.base import DerivedTable, IdempotencyRecord, WriteSet
from tally.storage.clickhouse import (
    QUARANTINE_ROWS,
    ClickHouseBackend,
    chdb_dsn,
    is_store_error,
)
from tally.storage.duckdb import DuckDBBackend
from tally.storage.limits import QueryLimits
from tally.storage.metering import current_meter
from tally.storage.schema import (
    EVENTS_SCHEMA,
    PAYLOAD_BOOL_FIELDS,
    PAYLOAD_INT_FIELDS,
    PAYLOAD_TEXT_FIELDS,
    QUARANTINE_SCHEMA,
)
from tests.test_clickhouse_sql import MATCHING, event_set, rows
from tests.test_compiler import CASES

ROOT = Path(__file__).parent.parent
# the compiled queries that read the events table only (no derived table: not in this slice)
EVENT_QUERIES = ("ggr_5m_by_brand", "ngr_5m_by_brand", "deposits_success", "settle_lag",
                 "webhook_lag", "dau", "active_players_daily", "funnel",
                 "funnel_repeated_step")


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.rstrip("Z"))


def events_table(events: list[dict[str, Any]], first_seq: int) -> pa.Table:
    """Stored rows (EVENTS_SCHEMA) of API-shaped events, ``ingest_seq`` from ``first_seq``."""
    cols: dict[str, list[Any]] = {f.name: [] for f in EVENTS_SCHEMA}
    for i, e in enumerate(events):
        payload = e["payload"]
        key = hash((e["tenant_id"], e["event_id"]))
        row = {"ingest_seq": first_seq + i, "id_hi": key >> 1, "id_lo": i - 2 ** 40,
               "event_id": e["event_id"], "event_type": e["event_type"],
               "occurred_at": _ts(e["occurred_at"]), "ingested_at": _ts(e["occurred_at"]),
               "received_at": datetime(2025, 11, 9), "tenant_id": e["tenant_id"],
               "region": e["region"], "player_id": e.get("player_id"), "trace_id": None,
               "schema_version": e["schema_version"], "payload": json.dumps(payload)}
        for name in (*PAYLOAD_TEXT_FIELDS, *PAYLOAD_INT_FIELDS, *PAYLOAD_BOOL_FIELDS):
            row[name] = payload.get(name)
        for name, values in cols.items():
            values.append(row[name])
    return pa.Table.from_pydict(cols, schema=EVENTS_SCHEMA)


def quarantine_table(n: int, seq: int, brand: str | None = "brand-7",
                     region: str | None = "EU") -> pa.Table:
    return pa.Table.from_pydict({
        "received_at": [datetime(2025, 11, 9, 12, 0, 0, 123456)] * n,
        "client_id": ["c1"] * n, "batch_index": list(range(n)),
        "event_id": [f"q{seq}-{i}" for i in range(n)], "reason": ["bad"] * n,
        "event": ["{}"] * n, "tenant_id": [brand] * n, "region": [region] * n,
    }, schema=QUARANTINE_SCHEMA)


def record(seq: int, rows_per_record: int = 50) -> WriteSet:
    """Journal record ``seq`` as a test writer writes it (the same every time)."""
    events = [{"event_id": f"r{seq}-{i}", "event_type": "bet.placed",
               "occurred_at": f"2025-10-22T10:{i % 60:02d}:00Z", "tenant_id": "brand-7",
               "region": "EU", "player_id": f"p{i % 7}", "schema_version": "1.3.0",
               "payload": {"bet_id": f"b{seq}-{i}", "stake_minor": 100 + i,
                           "currency": "EUR"}} for i in range(rows_per_record)]
    return WriteSet(
        events=[events_table(events, seq * 1000)],
        quarantine=[quarantine_table(2, seq)],
        idempotency=[IdempotencyRecord("c1", f"k{seq}", "sha", f'{{"seq": {seq}}}',
                                       datetime.now(UTC).replace(tzinfo=None))])


@pytest.fixture
def chstore(tmp_path: Path) -> Iterator[ClickHouseBackend]:
    store = ClickHouseBackend(chdb_dsn(tmp_path / "ch"))
    yield store
    store.close()


def _count(store: ClickHouseBackend, table: str) -> int:
    return int(store.query(f"SELECT count() AS n FROM {table}").column(0)[0].as_py())


# -- writes -------------------------------------------------------------------------------
def test_write_then_read_the_base_tables(chstore: ClickHouseBackend) -> None:
    assert chstore.journal_applied_seq() == 0
    assert chstore.count_events() == 0 and chstore.max_ingest_seq() == 0
    chstore.write(record(1), journal_seq=1)
    chstore.write(record(2), journal_seq=2)
    assert chstore.journal_applied_seq() == 2
    assert chstore.count_events() == 100
    assert chstore.max_ingest_seq() == 2049
    assert _count(chstore, "quarantine") == 4
    found = chstore.idempotency("c1", "k2")
    assert found is not None and found.response == '{"seq": 2}' and found.body_sha256 == "sha"
    assert chstore.idempotency("c1", "nope") is None
    versions = chstore.data_versions().to_pylist()
    assert versions == [{"tenant_id": "brand-7", "day": date(2025, 10, 22), "seq": 2049,
                         "latest": datetime(2025, 10, 22, 10, 49)}]


def test_events_are_stored_as_written(chstore: ClickHouseBackend) -> None:
    """Every column of every event comes back as written (types, NULLs, microseconds)."""
    table = events_table(event_set()[:400], 1)
    chstore.write(WriteSet(events=[table]), journal_seq=1)
    stored = chstore.query("SELECT * FROM events ORDER BY ingest_seq")
    assert stored.column_names == EVENTS_SCHEMA.names
    assert stored.to_pylist() == table.to_pylist()


def test_an_unreachable_server_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="cannot open"):
        ClickHouseBackend("http://127.0.0.1:9/")


def test_a_replayed_record_is_counted_once(chstore: ClickHouseBackend) -> None:
    """The same record written twice (a retried apply, a replay after a crash) is written
    once; a record whose write failed midway is written whole by the next write, what had
    landed removed first (by the record its rows name, not by deduplication tokens)."""
    chstore.write(record(7), journal_seq=7)
    chstore.write(record(7), journal_seq=7)
    assert chstore.count_events() == 50
    assert _count(chstore, "quarantine") == 2
    assert _count(chstore, "idempotency") == 1
    assert chstore.journal_applied_seq() == 7
    # a record applied in part (its events landed, then its quarantine's insert failed),
    # then replayed whole
    chstore._writer.command("RENAME TABLE quarantine TO quarantine_away")
    with pytest.raises(WriteRejected):
        chstore.write(record(8), journal_seq=8)
    chstore._writer.command("RENAME TABLE quarantine_away TO quarantine")
    assert chstore.count_events() == 100 and chstore.journal_applied_seq() == 7
    chstore.write(record(8), journal_seq=8)
    assert chstore.count_events() == 100
    assert _count(chstore, "quarantine") == 4
    ids = chstore.query("SELECT event_id, count() AS n FROM events GROUP BY event_id")
    assert set(ids.column("n").to_pylist()) == {1}
    # an older record replayed never lowers the applied sequence, nor adds a row
    chstore.write(record(7), journal_seq=7)
    assert chstore.journal_applied_seq() == 8 and chstore.count_events() == 100
    # by the record, not by the content: the same rows as another record are kept
    chstore.write(WriteSet(events=record(7).events), journal_seq=9)
    assert chstore.count_events() == 150


def test_a_write_without_a_record_is_not_deduplicated(chstore: ClickHouseBackend) -> None:
    chstore.write(WriteSet(quarantine=[quarantine_table(3, 0)]))
    chstore.write(WriteSet(quarantine=[quarantine_table(3, 0)]))
    ids = [item.id for item in chstore.quarantine(0, 100)]
    assert ids == [1, 2, 3, 4, 5, 6]
    same = record(1)  # the same rows twice, not by hash either
    chstore.write(WriteSet(events=same.events))
    chstore.write(WriteSet(events=same.events))
    assert chstore.count_events() == 100
    assert chstore.journal_applied_seq() == 0


def test_dry_run_validates_and_keeps_nothing(chstore: ClickHouseBackend) -> None:
    chstore.write(record(1), journal_seq=1, dry_run=True)
    assert chstore.count_events() == 0 and _count(chstore, "quarantine") == 0
    assert chstore.journal_applied_seq() == 0
    bad = pa.table({"ingest_seq": pa.array(["not a number"])})  # rows at fault
    with pytest.raises(WriteRejected):
        chstore.write(WriteSet(events=[bad]), journal_seq=2, dry_run=True)
    with pytest.raises(WriteRejected):
        chstore.write(WriteSet(events=[bad]), journal_seq=2)
    chstore.write(record(1), journal_seq=1)  # a dry run does not spend the record's tokens
    assert chstore.count_events() == 50


def test_a_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = ClickHouseBackend(chdb_dsn(tmp_path / "ch"))
    store.close()
    with pytest.raises(StoreUnavailable):
        store.write(record(1), journal_seq=1)
    with pytest.raises(StoreUnavailable):
        store.count_events()



def test_the_engine_failing_is_told_from_the_rows_at_fault(chstore: ClickHouseBackend) -> None:
    """A write the store refuses for its own reasons is retried, never set aside: only an
    error that is a verdict on the rows or the statement blames them."""
    with pytest.raises(DatabaseError) as rows_fault:  # real errors of the engine, rows' first
        chstore.query("SELECT throwIf(number = 3) FROM numbers(10)")
    assert not is_store_error(rows_fault.value)
    with pytest.raises(DatabaseError) as conversion:
        chstore.query("SELECT toUInt8('x')")
    assert not is_store_error(conversion.value)
    with pytest.raises(StoreUnavailable, match="MEMORY_LIMIT_EXCEEDED"):
        chstore.query("SELECT groupArray(number) FROM numbers(10000000) "
                      "SETTINGS max_memory_usage = 1000000")
    # what the engine says when threads, files or the disk fail (as chDB words them)
    for code, text in ((439, "Cannot schedule a task: failed to start the thread"),
                       (1001, 'filesystem error: in create_directories: Read-only file system'),
                       (243, "Cannot reserve 1.00 MiB, not enough space"),
                       (75, "Cannot write to file descriptor"),
                       (6000, "Cannot open file: No space left on device")):
        assert is_store_error(DatabaseError(f"Code: {code}. DB::Exception: {text}", code=code))
    assert is_store_error(DatabaseError("the engine stopped"))  # no code: not the rows' verdict
    assert is_store_error(MemoryError())
    assert not is_store_error(DataError("Invalid value for UInt8 column"))  # the driver's verdict
    assert not is_store_error(ValueError("a bug"))

# -- reads --------------------------------------------------------------------------------
def test_quarantine_ids_and_pages(chstore: ClickHouseBackend) -> None:
    chstore.write(WriteSet(quarantine=[quarantine_table(3, 1)]), journal_seq=1)
    chstore.write(WriteSet(quarantine=[quarantine_table(2, 2, brand="brand-8", region=None),
                                       quarantine_table(1, 2, brand=None, region="UK")]),
                  journal_seq=2)
    items = chstore.quarantine(0, 100)
    assert [i.id for i in items] == [QUARANTINE_ROWS, QUARANTINE_ROWS + 1,
                                     QUARANTINE_ROWS + 2, 2 * QUARANTINE_ROWS,
                                     2 * QUARANTINE_ROWS + 1, 2 * QUARANTINE_ROWS + 2]
    assert items[0].received_at == datetime(2025, 11, 9, 12, 0, 0, 123456)
    assert items[0].client_id == "c1" and items[0].event_id == "q1-0"
    assert [i.id for i in chstore.quarantine(items[1].id, 2)] == [items[2].id, items[3].id]
    assert [i.event_id for i in chstore.quarantine(0, 100, brands=["brand-8"])] == \
        ["q2-0", "q2-1"]
    assert [i.event_id for i in chstore.quarantine(0, 100, regions=["UK"])] == ["q2-0"]
    assert chstore.quarantine(0, 100, brands=[]) == []
    # a brand and a region: only entries naming both
    assert [i.id for i in chstore.quarantine(0, 100, brands=["brand-7"], regions=["EU"])] \
        == [i.id for i in items[:3]]


def test_settings_fx_rates_and_idempotency_expiry(chstore: ClickHouseBackend) -> None:
    assert chstore.setting("dedup_key") is None
    chstore.put_setting("dedup_key", "a")
    chstore.put_setting("dedup_key", "b")  # set once, as DuckDB's ON CONFLICT DO NOTHING
    assert chstore.setting("dedup_key") == "a"
    rates = [(date(2025, 10, 1), "GBP", "1.15"), (date(2025, 10, 2), "USD", "0.92")]
    chstore.add_fx_rates(rates)
    chstore.add_fx_rates([])
    assert sorted(chstore.fx_rates()) == rates
    with pytest.raises(WriteRejected):
        chstore.add_fx_rates([(date(2025, 10, 1), "GBP", "1.2")])
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=30)
    chstore.write(WriteSet(idempotency=[IdempotencyRecord("c1", "old", "s", "{}", old)]),
                  journal_seq=1)
    chstore.write(record(2), journal_seq=2)
    assert chstore.idempotency("c1", "old") is None  # older than the time to live
    assert _count(chstore, "idempotency") == 2
    chstore.expire_idempotency()
    assert _count(chstore, "idempotency") == 1
    assert chstore.idempotency("c1", "k2") is not None
    # a later record of the same key replaces the first (DuckDB: INSERT OR REPLACE)
    now = datetime.now(UTC).replace(tzinfo=None)
    chstore.write(WriteSet(idempotency=[IdempotencyRecord("c1", "k2", "s2", "{}", now)]),
                  journal_seq=3)
    found = chstore.idempotency("c1", "k2")
    assert found is not None and found.body_sha256 == "s2"


def test_event_keys_in_chunks(chstore: ClickHouseBackend) -> None:
    chstore.write(record(1), journal_seq=1)
    chstore.write(record(2), journal_seq=2)
    chunks = list(chstore.event_keys(30))
    assert all(len(hi) <= 30 and hi.dtype == np.int64 and lo.dtype == np.int64
               for hi, lo in chunks)
    keys = sorted(zip(np.concatenate([c[0] for c in chunks]).tolist(),
                      np.concatenate([c[1] for c in chunks]).tolist(), strict=True))
    expected = chstore.query("SELECT id_hi, id_lo FROM events")
    assert keys == sorted(zip(expected.column(0).to_pylist(), expected.column(1).to_pylist(),
                              strict=True))
    assert len(keys) == 100


def test_query_binds_named_and_positional_parameters(chstore: ClickHouseBackend) -> None:
    chstore.write(record(1), journal_seq=1)
    named = chstore.query("SELECT count() AS n FROM events WHERE stake_minor > {s:Int64} "
                          "AND occurred_at >= {t:DateTime64(6)}",
                          {"s": 140, "t": datetime(2025, 10, 22, 10, 41, 0, 1)})
    assert named.column(0).to_pylist() == [8]  # 10:41:00 is before the bound's microsecond
    positional = chstore.query("SELECT count() AS n FROM events WHERE player_id = %s", ["p0"])
    assert positional.column(0).to_pylist() == [8]
    wide = chstore.query("SELECT sum(toInt128(stake_minor)) * 1000000000000 AS s FROM events")
    assert wide.column(0).to_pylist() == [sum(100 + i for i in range(50)) * 10 ** 12]


class Meter:
    def __init__(self) -> None:
        self.estimates: list[int] = []
        self.scanned: list[int] = []

    def before_scan(self, estimate: Any) -> None:
        self.estimates.append(estimate())

    def after_scan(self, rows: int) -> None:
        self.scanned.append(rows)


def test_execute_meters_the_rows_scanned(chstore: ClickHouseBackend) -> None:
    for seq in range(1, 5):
        chstore.write(record(seq), journal_seq=seq)
    tree = exp.select(exp.Count(this=exp.Star()).as_("n")).from_("events").where(
        exp.column("stake_minor").eq(exp.Placeholder(
            this="p0", kind=exp.DataType.build("Int64", dialect="clickhouse"))))
    meter = Meter()
    token = current_meter.set(meter)
    try:
        answer = chstore.execute(tree, {"p0": 101})
    finally:
        current_meter.reset(token)
    assert answer.to_pylist() == [{"n": 4}]
    assert meter.scanned == [200] and chstore.rows_scanned == 200
    assert meter.estimates == [200]  # EXPLAIN ESTIMATE: every row of the parts it reads
    chstore.execute(tree, {"p0": 101})
    assert chstore.rows_scanned == 400


def test_concurrent_readers_while_writing(chstore: ClickHouseBackend) -> None:
    """Readers each on a client of their own, while the writer thread writes: every answer
    is a whole number of records (each table's insert is atomic)."""
    chstore.write(record(1), journal_seq=1)
    done = threading.Event()

    def writer() -> None:
        for seq in range(2, 12):
            chstore.write(record(seq), journal_seq=seq)
        done.set()

    def reader(_: int) -> list[int]:
        seen = []
        while not done.is_set():
            seen.append(chstore.count_events())
        return seen

    thread = threading.Thread(target=writer)
    thread.start()
    with ThreadPoolExecutor(4) as pool:
        seen = [n for counts in pool.map(reader, range(4)) for n in counts]
    thread.join()
    assert seen and all(n % 50 == 0 and 50 <= n <= 550 for n in seen)
    assert chstore.count_events() == 550


# -- the same answers as DuckDB -----------------------------------------------------------
def test_compiled_queries_answer_what_duckdb_answers(tmp_path: Path) -> None:
    events = event_set()
    third = len(events) // 3
    writes = [WriteSet(events=[events_table(part, 1 + n * third)])
              for n, part in enumerate((events[:third], events[third:2 * third],
                                        events[2 * third:]))]
    (tmp_path / "duck").mkdir()
    duck = DuckDBBackend(tmp_path / "duck")
    ch = ClickHouseBackend(chdb_dsn(tmp_path / "ch"))
    try:
        for seq, write in enumerate(writes, 1):
            duck.write(write, journal_seq=seq)
            ch.write(write, journal_seq=seq)
        assert ch.count_events() == duck.count_events() == len(events)
        assert ch.max_ingest_seq() == duck.max_ingest_seq()
        assert ch.data_versions().schema == duck.data_versions().schema
        assert rows(ch.data_versions()) == rows(duck.data_versions())
        answers = 0
        for name in EVENT_QUERIES:
            case = CASES[name]
            for values in (case.params, {k: MATCHING.get(v, v) if isinstance(v, str) else v
                                         for k, v in case.params.items()}):
                expected = duck.execute(case.tree, values)
                answer = ch.execute(case.tree, values)
                assert answer.column_names == expected.column_names, name
                assert rows(answer) == rows(expected), name
                answers += len(expected)
        assert answers > 100
        assert ch.rows_scanned > 0
    finally:
        duck.close()
        ch.close()


def test_protocol_reads_answer_what_duckdb_answers(tmp_path: Path) -> None:
    """The same journal records through both stores: every read of the protocol agrees
    (quarantine ids aside: a sequence on DuckDB, the record's on ClickHouse)."""
    (tmp_path / "duck").mkdir()
    duck = DuckDBBackend(tmp_path / "duck")
    ch = ClickHouseBackend(chdb_dsn(tmp_path / "ch"))
    try:
        rates = [(date(2025, 10, 1), "GBP", "1.15")]
        records = {seq: record(seq) for seq in range(1, 4)}
        for store in (duck, ch):
            for seq, write in records.items():
                store.write(write, journal_seq=seq)
            store.add_fx_rates(rates)
            store.put_setting("dedup_key", "k")
        assert ch.journal_applied_seq() == duck.journal_applied_seq() == 3
        assert ch.count_events() == duck.count_events()
        assert ch.max_ingest_seq() == duck.max_ingest_seq()
        assert rows(ch.data_versions()) == rows(duck.data_versions())
        assert ch.fx_rates() == duck.fx_rates()
        assert ch.setting("dedup_key") == duck.setting("dedup_key") == "k"
        for key in ("k1", "k3", "k9"):
            assert ch.idempotency("c1", key) == duck.idempotency("c1", key)

        def keys(store: Any) -> list[tuple[int, int]]:
            return sorted((h, lo) for hi, low in store.event_keys(64)
                          for h, lo in zip(hi.tolist(), low.tolist(), strict=True))

        assert keys(ch) == keys(duck)

        def entries(store: Any, **scope: Any) -> list[tuple[Any, ...]]:
            return [dataclasses.astuple(item)[1:] for item in store.quarantine(0, 100, **scope)]

        for scope in ({}, {"brands": ["brand-7"]}, {"regions": ["UK"]}):
            assert entries(ch, **scope) == entries(duck, **scope)
        assert len(entries(ch)) == 6
    finally:
        duck.close()
        ch.close()


# -- kill -9 of a writing process ---------------------------------------------------------
WRITER = """
import sys
from pathlib import Path
from tally.storage.clickhouse import ClickHouseBackend, chdb_dsn
from tests.test_clickhouse_backend import record
store = ClickHouseBackend(chdb_dsn(Path(sys.argv[1])))
for seq in range(1, 10_000):
    store.write(record(seq), journal_seq=seq)
    print(seq, flush=True)
"""


def test_kill_9_while_writing_then_replay_counts_once(tmp_path: Path) -> None:
    data = tmp_path / "ch"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(data)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    written = 0
    for line in child.stdout:  # let it write a few records, then kill it mid-stream
        written = int(line)
        if written >= 15:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert written >= 15
    store = ClickHouseBackend(chdb_dsn(data))
    try:
        applied = store.journal_applied_seq()
        assert applied >= written
        events = store.count_events()
        # the record after the applied one may have landed in part, never twice
        assert applied * 50 <= events <= (applied + 1) * 50
        # the journal replays from the applied record on (the first may be applied twice)
        last = applied + 3
        for seq in range(applied, last + 1):
            store.write(record(seq), journal_seq=seq)
        assert store.journal_applied_seq() == last
        assert store.count_events() == last * 50
        assert _count(store, "quarantine") == last * 2
        assert _count(store, "idempotency") == last
        ids = [i.id for i in store.quarantine(0, 10_000)]
        assert len(ids) == len(set(ids)) == last * 2
    finally:
        store.close()


# -- derived tables ------------------------------------------------------------------------
def _derived_rows(store: ClickHouseBackend) -> dict[str, list[tuple[Any, ...]]]:
    """Every derived table's rows (a Least table through its view), comparable: a kept list
    (``step_times``' instants) sorted, since the order ``groupArray`` gathers in is not
    part of its meaning and may differ between two stores."""
    def column(name: str, type_: str) -> str:
        return f"arraySort({name}) AS {name}" if type_.startswith("Array(") else name

    tables = {}
    for t in derived_tables("clickhouse"):
        types = store.query(f"SELECT name, type FROM system.columns WHERE table = '{t.name}' "
                            "AND database = currentDatabase() ORDER BY position").to_pylist()
        select = ", ".join(column(c["name"], c["type"]) for c in types) or "*"
        tables[t.name] = rows(store.query(f"SELECT {select} FROM {t.name}"))
    return tables


def _records() -> list[WriteSet]:
    """The reference event set in three journal records, starts and ends of sessions and first
    deposits spread over them (a later record holds earlier events)."""
    events = event_set()
    thirds = [events[i::3] for i in range(3)]
    return [WriteSet(events=[events_table(part, 1000 * (k + 1))]) for k, part in
            enumerate(thirds)]


def _open(path: Path) -> ClickHouseBackend:
    return ClickHouseBackend(chdb_dsn(path), derived=derived_tables("clickhouse"),
                             retired=activity.RETIRED)


def _never_failed(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The derived rows of a store that wrote the three records without a failure."""
    clean = _open(path)
    try:
        for seq, writes in enumerate(_records(), 1):
            clean.write(writes, journal_seq=seq)
        return _derived_rows(clean)
    finally:
        clean.close()


def test_derived_tables_of_a_record_replayed_after_failing_midway_count_once(
        tmp_path: Path) -> None:
    """A record whose write fails between two derived tables (a real engine error: one table
    is missing), then is replayed whole once the table is back: every derived table holds what
    a store that never failed holds — the inserts that had landed are dropped by their
    tokens, the others land — and replaying it again changes nothing."""
    expected = _never_failed(tmp_path / "clean")
    assert all(expected[name] for name in ("rollup_1m", "active_1d", "player_firsts",
                                           "player_attributes", "player_days"))
    store = _open(tmp_path / "faulty")
    try:
        first, second, third = _records()
        store.write(first, journal_seq=1)
        admin = clickhouse_connect.get_client(dsn=chdb_dsn(tmp_path / "faulty"))
        admin.command("RENAME TABLE player_days TO player_days_away")
        with pytest.raises(WriteRejected):
            store.write(second, journal_seq=2)  # the events and earlier tables land
        assert store.journal_applied_seq() == 1
        admin.command("RENAME TABLE player_days_away TO player_days")
        admin.close()
        store.write(second, journal_seq=2)  # the replay
        store.write(third, journal_seq=3)
        store.write(second, journal_seq=2)  # once more: nothing changes
        assert store.count_events() == len(event_set())
        assert _derived_rows(store) == expected
    finally:
        store.close()


def test_a_record_applied_in_part_by_an_older_version_is_replayed_once_by_a_newer_one(
        tmp_path: Path) -> None:
    """A record's derived inserts carry tokens naming their table and their place among that
    table's statements, not among all: an upgrade that adds a table (here `rollup_1m_narrow`,
    in the middle of the list) keeps the other tables' tokens, so a record an older version
    applied in part (it failed at `player_days`) and the new one replays counts once in every
    table both versions keep."""
    def older(dialect: str) -> list[DerivedTable]:
        return [t for t in derived_tables(dialect) if t.name != "rollup_1m_narrow"]

    expected = _never_failed(tmp_path / "clean")
    first, second, third = _records()
    store = ClickHouseBackend(chdb_dsn(tmp_path / "faulty"), derived=older("clickhouse"),
                              retired=activity.RETIRED)
    try:
        store.write(first, journal_seq=1)
        store._writer.command("RENAME TABLE player_days TO player_days_away")
        with pytest.raises(WriteRejected):
            store.write(second, journal_seq=2)  # the events and the tables before land
        store._writer.command("RENAME TABLE player_days_away TO player_days")
    finally:
        store.close()
    store = _open(tmp_path / "faulty")  # the newer version: fills its new table first
    try:
        store.write(second, journal_seq=2)  # the replay
        store.write(third, journal_seq=3)
        got = _derived_rows(store)
        kept = [t.name for t in older("clickhouse")]
        assert {name: got[name] for name in kept} == {name: expected[name] for name in kept}
        assert store.count_events() == len(event_set())
        # the new table was filled from the applied record's events only (the cut one's,
        # stored, were deleted first), then the replay added its rows: the sums of a store
        # that never failed (its rows fall in other groups: a fill is one statement)
        sums = ", ".join(f"sum({c}) AS {c}" for c in ("stake_sum", "win_sum", "bet_count",
                                                        "deposit_sum", "deposit_count"))
        narrow = store.query(f"SELECT {sums} FROM rollup_1m_narrow").to_pylist()
    finally:
        store.close()
    clean = _open(tmp_path / "clean")
    try:
        assert narrow == clean.query(f"SELECT {sums} FROM rollup_1m_narrow").to_pylist()
        assert narrow[0]["bet_count"] > 0
    finally:
        clean.close()


def test_a_least_table_of_an_older_version_gets_its_plain_minimum(tmp_path: Path) -> None:
    """A Least table's state made before ``_least_row`` (the least row beside each
    ``argMin`` state, as a plain minimum) and its view then, reading every column from the
    merged states, with the column of the version between (``_least``, the least ``by``
    alone): opened by this version, the column is added (its value in the stored rows: their
    state's row) and the older one dropped, the view reads every column from it, and after
    more writes both Least tables hold what a store that never was older holds — as does a
    cohort's member filter on ``first_at`` and ``region``."""
    from tally.storage.clickhouse_schema import LEAST, OLD_LEAST, STATE, _row, parse_table

    members = ("SELECT tenant_id, player_id FROM player_firsts WHERE kind = "
               "'first_deposit' AND first_at < (SELECT max(first_at) FROM player_firsts) "
               "AND region IN ('EU', 'UK') ORDER BY 1, 2")
    expected = _never_failed(tmp_path / "clean")
    clean = _open(tmp_path / "clean")  # (chDB: one store open in a process at a time)
    try:
        want = clean.query(members).to_pylist()
    finally:
        clean.close()
    first, second, third = _records()
    store = _open(tmp_path / "older")
    try:
        store.write(first, journal_seq=1)
        for table in derived_tables("clickhouse"):
            if table.least is None:
                continue
            columns = parse_table(table.ddl)
            rest, _, _ = _row(columns, table.least)
            merged = ", ".join(f"tupleElement(argMinMerge(_row), {i}) AS {name}"
                               for i, name in enumerate(rest, 1))
            keys = ", ".join(table.least.keys)
            store._writer.command(f"CREATE OR REPLACE VIEW {table.name} AS SELECT {keys}, "
                                  f"{merged} FROM {table.name}{STATE} GROUP BY {keys}")
            store._writer.command(f"ALTER TABLE {table.name}{STATE} DROP COLUMN {LEAST}")
            first = rest.index(table.least.by[0]) + 1
            store._writer.command(
                f"ALTER TABLE {table.name}{STATE} ADD COLUMN {OLD_LEAST} "
                f"SimpleAggregateFunction(min, Tuple(DateTime64(6))) DEFAULT "
                f"tuple(tupleElement(finalizeAggregation(_row), {first}))")
        before = _derived_rows(store)
    finally:
        store.close()
    store = _open(tmp_path / "older")  # this version
    try:
        assert _derived_rows(store) == before  # the stored rows read the same
        # and every part of the state tables holds the column on disk (merged at open)
        for table in ("player_firsts_state", "player_attributes_state"):
            parts = store.query(
                f"SELECT countDistinct(name) AS parts, countIf(column = '{LEAST}') AS least, "
                f"countIf(column = '{OLD_LEAST}') AS old FROM system.parts_columns "
                f"WHERE active AND table = '{table}' AND database = currentDatabase()"
            ).to_pylist()
            assert parts[0]["parts"] == parts[0]["least"] > 0 == parts[0]["old"], (table, parts)
        store.write(second, journal_seq=2)
        store.write(third, journal_seq=3)
        got = _derived_rows(store)
        assert got["player_firsts"] == expected["player_firsts"] != []
        assert got["player_attributes"] == expected["player_attributes"] != []
        assert store.query(members).to_pylist() == want != []
    finally:
        store.close()


def test_an_upgrade_cut_after_its_new_column_drops_the_old_one_at_the_next_open(
        tmp_path: Path) -> None:
    """An open that added ``_least_row`` and stopped before dropping the older ``_least``
    leaves both: the next open drops ``_least`` (its own step, not only part of adding the
    new column), and the rows read the same."""
    from tally.storage.clickhouse_schema import OLD_LEAST, STATE

    first, _, _ = _records()
    store = _open(tmp_path / "cut")
    try:
        store.write(first, journal_seq=1)
        for name in ("player_firsts", "player_attributes"):
            store._writer.command(f"ALTER TABLE {name}{STATE} ADD COLUMN {OLD_LEAST} "
                                  "SimpleAggregateFunction(min, Tuple(DateTime64(6)))")
        before = _derived_rows(store)
    finally:
        store.close()
    store = _open(tmp_path / "cut")
    try:
        for name in ("player_firsts", "player_attributes"):
            assert OLD_LEAST not in store._columns(f"{name}{STATE}")
        assert _derived_rows(store) == before
        assert before["player_firsts"] != []
    finally:
        store.close()


def test_a_group_cut_mid_write_is_replayed_as_the_same_group(tmp_path: Path) -> None:
    """The applier merges journal records into one write; a write cut by a crash left some
    of its rows (here records 1–3's events, naming record 3, the group's last). After the
    restart records 1–5 wait: the store says the cut group ends at 3 (``pending_group``,
    from the rows it holds), the applier's first write is 1–3 again, which writes only what
    had not landed (the derived tables, the quarantine), then 4–5: every record once."""
    from tally.ingest.applier import Applier, merge
    from tally.ingest.journal import Journal
    from tally.ingest.versions import DataVersions

    records = {seq: record(seq, rows_per_record=20) for seq in range(1, 6)}
    store = _open(tmp_path / "ch")
    try:
        group = pa.concat_tables([t for seq in (1, 2, 3) for t in records[seq].events])
        store._insert("events", group, 3, {})  # the write's first table, then the crash
        assert store.count_events() == 60 and store.journal_applied_seq() == 0
    finally:
        store.close()
    store = _open(tmp_path / "ch")
    try:
        assert store.pending_group() == 3
        applier = Applier(store, Journal(tmp_path / "journal"), DataVersions(), 0,
                          parked_dir=tmp_path / "parked")
        for seq, writes in records.items():  # the journal's records, handed over at start
            applier.enqueue(seq, writes, block=False)
        applier.start()
        assert applier.flush(timeout=60)
        applier.stop(timeout=10)
        ids = store.query("SELECT event_id, count() AS n FROM events GROUP BY event_id")
        assert store.count_events() == 100 and set(ids.column("n").to_pylist()) == {1}
        assert _count(store, "quarantine") == 10 and store.journal_applied_seq() == 5
        assert store.pending_group() is None
        got = _derived_rows(store)
    finally:
        store.close()
    clean = _open(tmp_path / "clean")  # the same two writes, never cut
    try:
        clean.write(merge([records[1], records[2], records[3]]), journal_seq=3)
        clean.write(merge([records[4], records[5]]), journal_seq=5)
        assert got == _derived_rows(clean) and got["active_1d"]
    finally:
        clean.close()


def test_a_cut_group_written_as_other_records_has_its_rows_deleted_first(
        tmp_path: Path) -> None:
    """A write of other records than the cut one (a caller that does not follow
    ``pending_group``) may not keep the cut rows: they name records it does not hold, so
    they are deleted before it writes, and every record is stored once."""
    records = {seq: record(seq, rows_per_record=20) for seq in range(1, 4)}
    store = _open(tmp_path / "ch")
    try:
        group = pa.concat_tables([t for seq in (1, 2) for t in records[seq].events])
        store._insert("events", group, 2, {})
    finally:
        store.close()
    store = _open(tmp_path / "ch")
    try:
        for seq in (1, 2, 3):  # one record a write
            store.write(records[seq], journal_seq=seq)
        ids = store.query("SELECT event_id, count() AS n FROM events GROUP BY event_id")
        assert store.count_events() == 60 and set(ids.column("n").to_pylist()) == {1}
        got = _derived_rows(store)
    finally:
        store.close()
    clean = _open(tmp_path / "clean")
    try:
        for seq, writes in records.items():
            clean.write(writes, journal_seq=seq)
        assert got == _derived_rows(clean) and got["active_1d"]
    finally:
        clean.close()


def test_a_write_cut_between_two_inserts_of_one_table_adds_only_the_missing_one(
        tmp_path: Path) -> None:
    """A table may have more than one insert a write (``active_1d``: bets, then sessions);
    a write whose second insert failed has the first's rows stored, and its retry must add
    the second's and not the first's again: a row names its insert as well as its record."""
    two = DerivedTable(
        "two_inserts", "CREATE TABLE two_inserts (event_id VARCHAR NOT NULL, "
        "kind VARCHAR NOT NULL)",
        from_batch=("INSERT INTO two_inserts SELECT event_id, 'first' FROM _new_events",
                    "INSERT INTO two_inserts SELECT event_id, 'second' FROM _new_events "
                    "WHERE event_id NOT IN (SELECT event_id FROM gate)"),
        from_all=())
    store = ClickHouseBackend(chdb_dsn(tmp_path / "ch"), derived=[two])
    try:
        store._writer.command("CREATE TABLE gate_away (event_id String) ENGINE = Memory")
        with pytest.raises(WriteRejected):  # the second insert finds no `gate`
            store.write(record(1), journal_seq=1)
        assert _count(store, "two_inserts") == 50 and store.journal_applied_seq() == 0
        store._writer.command("RENAME TABLE gate_away TO gate")
        store.write(record(1), journal_seq=1)
        kinds = store.query("SELECT kind, count() AS n FROM two_inserts GROUP BY kind "
                            "ORDER BY kind").to_pylist()
        assert kinds == [{"kind": "first", "n": 50}, {"kind": "second", "n": 50}]
        assert store.count_events() == 50 and store.journal_applied_seq() == 1
    finally:
        store.close()


@pytest.mark.parametrize("engine", ["duckdb", "chdb"])
def test_a_record_at_or_below_the_applied_one_is_not_written_again(
        tmp_path: Path, engine: str) -> None:
    """Both engines: writing an applied record again (a replay that starts one record early,
    a retried write whose commit had landed) adds nothing and never lowers the sequence."""
    (tmp_path / "duck").mkdir()
    store: Any = DuckDBBackend(tmp_path / "duck") if engine == "duckdb" \
        else ClickHouseBackend(chdb_dsn(tmp_path / "ch"))
    try:
        for seq in (1, 2, 1, 2, 3, 2):
            store.write(record(seq), journal_seq=seq)
        counts = store.query("SELECT count(*) AS n FROM events").column("n")[0].as_py()
        quarantined = store.query("SELECT count(*) AS n FROM quarantine").column("n")[0]
        assert (counts, quarantined.as_py()) == (150, 6)
        assert store.journal_applied_seq() == 3
    finally:
        store.close()


def test_a_store_made_before_rows_named_their_record_gets_the_column(tmp_path: Path) -> None:
    """An older store's appending tables lack ``_seq``: it is added when the store opens,
    the old rows read as 0 (no record), and a write cut after that is found and completed."""
    store = _open(tmp_path / "ch")
    try:
        store.write(record(1, rows_per_record=20), journal_seq=1)
        for table in ("events", "quarantine", "rollup_1m", "active_1d"):
            store._writer.command(f"ALTER TABLE {table} DROP COLUMN _seq")
    finally:
        store.close()
    store = _open(tmp_path / "ch")
    try:
        seq = store.query("SELECT _seq AS s FROM events").column("s").to_pylist()
        assert seq == [0] * 20
        cut = record(2, rows_per_record=20)
        store._insert("events", pa.concat_tables(cut.events), 2, {})  # then the crash
    finally:
        store.close()
    store = _open(tmp_path / "ch")
    try:
        assert store.pending_group() == 2
        store.write(cut, journal_seq=2)
        ids = store.query("SELECT event_id, count() AS n FROM events GROUP BY event_id")
        assert store.count_events() == 40 and set(ids.column("n").to_pylist()) == {1}
    finally:
        store.close()


def test_a_partition_whose_rows_landed_in_part_is_written_again_whole(tmp_path: Path) -> None:
    """One insert is one part a partition, so a cut write's partition holds all its rows or
    none; if it held some (never seen), the store deletes the record's rows and writes the
    record whole rather than guess which rows are missing."""
    whole = record(1, rows_per_record=20)
    store = _open(tmp_path / "ch")
    try:
        part = pa.concat_tables(whole.events).slice(0, 7)  # 7 of the partition's 20 rows
        store._insert("events", part, 1, {})
    finally:
        store.close()
    store = _open(tmp_path / "ch")
    try:
        store.write(whole, journal_seq=1)
        ids = store.query("SELECT event_id, count() AS n FROM events GROUP BY event_id")
        assert store.count_events() == 20 and set(ids.column("n").to_pylist()) == {1}
        assert _count(store, "quarantine") == 2 and store.journal_applied_seq() == 1
    finally:
        store.close()


def test_a_query_past_a_bound_is_the_503_naming_it_and_the_next_query_is_answered(
        tmp_path: Path) -> None:
    """``TALLY_QUERY_TIMEOUT_SECONDS`` and ``TALLY_QUERY_MEMORY_LIMIT`` on ClickHouse: the
    statements ``execute`` runs carry them, a statement stopped by one is the 503 of that
    bound (not a store failure), the reader's client answers the next query, and the store's
    own statements (its tables, writes) are not bounded by them."""
    limits = QueryLimits(timeout_seconds=0.2, memory_bytes=50 * 2**20)
    store = ClickHouseBackend(chdb_dsn(tmp_path / "ch"), limits=limits,
                              derived=derived_tables("clickhouse"))
    try:
        store.write(record(1), journal_seq=1)
        endless = sqlglot.parse_one("SELECT count() FROM numbers(100000000000)",
                                    read="clickhouse")
        with pytest.raises(QueryTimeout) as timed_out:
            store.execute(endless, {})
        assert timed_out.value.status == 503 and "0.2 s" in str(timed_out.value)
        # the thread's next query is answered right (a chDB client that ran a failed
        # query puts what it had written of it before the next answer: it is replaced)
        assert store.query("SELECT 2 AS n").to_pylist() == [{"n": 2}]
        with pytest.raises(QueryTimeout):
            store.execute(sqlglot.parse_one(
                "SELECT toString(number) AS s FROM numbers(100000000000)", read="clickhouse"),
                {})
        assert store.execute(sqlglot.parse_one("SELECT 3 AS n", read="clickhouse"),
                             {}).to_pylist() == [{"n": 3}]
        hungry = sqlglot.parse_one("SELECT length(groupArray(number)) AS n "
                                   "FROM numbers(100000000)", read="clickhouse")
        with pytest.raises(QueryMemoryExceeded) as too_big:
            store.execute(hungry, {})
        assert too_big.value.status == 503 and "50.0 MiB" in str(too_big.value)
        assert "spill" not in str(too_big.value)  # ClickHouse's per-query bound is memory
        assert store.execute(sqlglot.parse_one("SELECT count() AS n FROM events",
                                               read="clickhouse"), {}).to_pylist() == [
            {"n": 50}]
    finally:
        store.close()


MEMORY_PROBE = """
import json, sys, time
from pathlib import Path
from tally.storage.factory import open_backend

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) // 1024 for line in status
                    if line.startswith("VmRSS"))

store = open_backend("chdb", Path(sys.argv[1]), derived=lambda dialect: [])
store.query("SELECT 1")
before = rss()
store.query("SELECT sum(length(a)), max(a[1]) FROM (SELECT number % 2000000 AS k, "
            "groupArray(number) AS a FROM numbers(30000000) GROUP BY k)")
after = rss()
time.sleep(4)
store.query("SELECT 1")
print(json.dumps({"before": before, "after": after, "later": rss()}))
store.close()
"""


def _memory_after_a_large_statement(data: Path, malloc_conf: str | None) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "JE_MALLOC_CONF"}
    if malloc_conf is not None:
        env["JE_MALLOC_CONF"] = malloc_conf
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(data)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_chdb_store_gives_back_the_memory_a_statement_freed(tmp_path: Path) -> None:
    """chDB's allocator keeps freed pages unless told otherwise: a store opened by Tally
    returns them within seconds (``CHDB_MALLOC_CONF``), so the server's RSS follows what its
    statements hold now, not the most they ever held; an operator's ``JE_MALLOC_CONF`` wins
    (here: never return them, and the RSS stays up)."""
    ours = _memory_after_a_large_statement(tmp_path / "ours", None)
    kept = _memory_after_a_large_statement(tmp_path / "kept", "dirty_decay_ms:-1")
    for probe in (ours, kept):
        assert probe["after"] - probe["before"] > 250, probe  # the statement used memory
    assert ours["later"] - ours["before"] < (ours["after"] - ours["before"]) / 3, ours
    assert kept["later"] - kept["before"] > (kept["after"] - kept["before"]) * 2 / 3, kept

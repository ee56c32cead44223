"""Issue 9's durability defects, each reproduced through the real app on a real store:
poison rows, money sums past 64 bits, an honest watermark, push-back, bounded shutdown, and a
store whose disk fills up. Real DuckDB, real journal, real file systems (tmpfs)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tally.errors import WriteRejected
from tally.events.payloads import MAX_MINOR
from tally.ingest.journal import Journal
from tally.storage.base import WriteSet
from tests.conftest import bearer, make_event, on_duckdb_only
from tests.fs import fill, tmpfs

BATCH = "/v1/events:batch"
TS = "/v1/analytics/timeseries"
JSON = {"Content-Type": "application/json"}


def post(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> Any:
    return client.post(BATCH, content=json.dumps(events), headers={**headers, **JSON})


def runtime_of(client: TestClient) -> Any:
    return client.app.state.runtime  # type: ignore[attr-defined]


def stored_ids(client: TestClient) -> dict[str, int]:
    runtime = runtime_of(client)
    assert runtime.ingest.flush(30)
    rows = runtime.backend.query("SELECT event_id, count(*) AS n FROM events GROUP BY 1")
    return {r["event_id"]: r["n"] for r in rows.to_pylist()}


def quarantined(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/admin/quarantine", params=params, headers=headers).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def session_end(duration: int, **fields: Any) -> dict[str, Any]:
    event = make_event(event_type="session.ended", payload={
        "session_id": f"s-{duration}-{time.monotonic_ns()}", "duration_sec": duration})
    event.update(fields)
    return event


@contextmanager
def app(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, bearer(client, settings.data_dir)


def sabotage(data_dir: Path, ddl: str) -> None:
    """Create a derived table the way a different schema would have it, before Tally opens
    the store (``CREATE TABLE IF NOT EXISTS`` keeps it): the store then refuses some rows."""
    data_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(data_dir / "events.duckdb"))
    con.execute(ddl)
    con.close()


# -- 1. money: a documented per-event range, and sums that cannot overflow ----------------

def test_amounts_past_the_documented_range_are_rejected_one_by_one(client, headers):
    """The freeze of issue 9: two stakes of 2^63 − 1 in one minute overflowed the rollup's
    64-bit sum in the applier. An amount above 2^53 − 1 is now rejected with its reason."""
    huge = [make_event(payload={"bet_id": f"b{i}", "stake_minor": 2**63 - 1, "win_minor": 0,
                                "currency": "EUR", "game_id": "g", "provider_id": "p"})
            for i in range(2)]
    edge = make_event(payload={"bet_id": "edge", "stake_minor": MAX_MINOR, "win_minor": 0,
                               "currency": "EUR", "game_id": "g", "provider_id": "p"})
    receipt = post(client, headers, [*huge, edge]).json()
    assert (receipt["accepted"], receipt["rejected"]) == (1, 2)
    assert all(str(MAX_MINOR) in e["detail"] and "stake_minor" in e["detail"]
               for e in receipt["errors"])
    assert post(client, headers, [make_event()]).json()["accepted"] == 1  # not frozen
    assert stored_ids(client)[edge["event_id"]] == 1


@pytest.mark.parametrize("granularity", ["1m", "1h", "1d"])
def test_sums_beyond_64_bits_are_exact_at_every_grain(client, headers, granularity):
    n = 1100  # 1,100 × (2^53 − 1) ≈ 9.9e18 > 2^63 − 1 ≈ 9.2e18
    events = [make_event(occurred_at="2025-10-23T16:21:05Z",
                         payload={"bet_id": f"b{i}", "stake_minor": MAX_MINOR,
                                  "win_minor": MAX_MINOR - 1, "currency": "EUR",
                                  "game_id": "g_big", "provider_id": "p"})
              for i in range(n)]
    assert post(client, headers, events).json()["accepted"] == n
    start = {"1m": "2025-10-23T16:21:00Z", "1h": "2025-10-23T16:00:00Z", "1d": "2025-10-23"}
    end = {"1m": "2025-10-23T16:22:00Z", "1h": "2025-10-23T17:00:00Z", "1d": "2025-10-24"}
    answers = {}
    for metric in ("stake", "wins", "ggr", "rtp"):
        r = client.get(TS, headers=headers, params={
            "metric": metric, "granularity": granularity, "from": start[granularity],
            "to": end[granularity], "filters": "brand_id:brand-7"})
        assert r.status_code == 200, r.text
        point = r.json()["series"][0]
        answers[metric] = point.get("value_minor", point.get("value"))
    assert answers["stake"] == n * MAX_MINOR > 2**63
    assert answers["wins"] == n * (MAX_MINOR - 1)
    assert answers["ggr"] == n
    assert answers["rtp"] == pytest.approx((MAX_MINOR - 1) / MAX_MINOR, rel=1e-15)
    top = client.get("/v1/analytics/slice", headers=headers, params={
        "metric": "stake", "dim": "game_id", "from": "2025-10-23", "to": "2025-10-24",
        "filters": "brand_id:brand-7"}).json()["items"]
    assert {"game_id": "g_big", "value_minor": n * MAX_MINOR} in top


@on_duckdb_only("an older DuckDB store's 64-bit rollup columns: DuckDB's migration")
def test_an_older_store_with_64_bit_rollups_is_widened_when_opened(settings):
    with app(settings) as (client, headers):
        assert post(client, headers, [make_event()]).status_code == 202
        assert runtime_of(client).ingest.flush(30)
    con = duckdb.connect(str(settings.data_dir / "events.duckdb"))
    narrowed = ("rollup_1m", "rollup_1h", "rollup_1d", "player_days")
    for table in narrowed:
        con.execute(f"ALTER TABLE {table} ALTER stake_sum SET DATA TYPE BIGINT")
    con.close()
    with app(settings) as (client, headers):
        types = runtime_of(client).backend.query(
            "SELECT table_name, data_type FROM duckdb_columns() "
            "WHERE column_name = 'stake_sum'").to_pylist()
        assert {t["data_type"] for t in types} == {"HUGEINT"}
        assert set(narrowed) <= {t["table_name"] for t in types}


# -- 2. poison: a row the store refuses never blocks the rows behind it -------------------

@on_duckdb_only("sabotages the schema through DuckDB's file (tests/test_durability.py sabotage)")
def test_rows_the_store_refuses_are_quarantined_and_the_rest_applied(settings):
    # a store-level rule some valid events break: sessions ending over a million seconds
    sabotage(settings.data_dir, "CREATE TABLE session_ends (tenant_id VARCHAR, session_id "
             "VARCHAR, duration_sec BIGINT CHECK (duration_sec < 1000000))")
    with app(settings) as (client, headers):
        good = [make_event() for _ in range(20)] + [session_end(60) for _ in range(5)]
        poison = [session_end(5_000_000), session_end(7_000_000)]
        first = post(client, headers, good[:10] + poison[:1] + good[10:])
        assert first.status_code == 202 and first.json()["accepted"] == 26  # durable, valid
        later = [make_event() for _ in range(5)]
        assert post(client, headers, poison[1:] + later).json()["accepted"] == 6
        ids = stored_ids(client)
        assert {e["event_id"] for e in good + later} == set(ids) and set(ids.values()) == {1}
        entries = {q["event_id"]: q for q in quarantined(client, headers)}
        assert set(entries) == {p["event_id"] for p in poison}
        for p in poison:
            entry = entries[p["event_id"]]
            assert entry["reason"].startswith("not applied:") and "CHECK" in entry["reason"]
            assert entry["event"]["payload"] == p["payload"]  # the event as sent
            assert entry["event"]["occurred_at"] == p["occurred_at"]
        runtime = runtime_of(client)
        assert runtime.ingest.applier.set_aside_rows == 2
        assert client.get("/readyz").status_code == 200
        # a set-aside event was not stored, so sending it again is not a duplicate
        assert post(client, headers, poison[:1]).json()["accepted"] == 1


@on_duckdb_only("sabotages the schema through DuckDB's file")
def test_rows_that_only_fail_together_set_aside_the_later_one(settings):
    sabotage(settings.data_dir, "CREATE TABLE session_ends (tenant_id VARCHAR, session_id "
             "VARCHAR PRIMARY KEY, duration_sec BIGINT)")
    with app(settings) as (client, headers):
        a = session_end(60)
        b = session_end(61, payload={"session_id": a["payload"]["session_id"],
                                     "duration_sec": 61})
        others = [make_event() for _ in range(6)]
        assert post(client, headers, [others[0], a, *others[1:4], b, *others[4:]]) \
            .json()["accepted"] == 8
        ids = stored_ids(client)
        assert b["event_id"] not in ids and ids[a["event_id"]] == 1
        assert all(ids[e["event_id"]] == 1 for e in others)
        assert [q["event_id"] for q in quarantined(client, headers)] == [b["event_id"]]


@on_duckdb_only("sabotages the schema through DuckDB's file")
def test_a_record_refused_even_without_its_poison_is_parked_whole(settings):
    """The last resort: the isolated write is refused too (here the quarantine itself refuses
    the entries of set-aside rows), so the whole record goes to DATA/parked/ and the records
    behind it are applied."""
    sabotage(settings.data_dir, "CREATE TABLE session_ends (tenant_id VARCHAR, session_id "
             "VARCHAR, duration_sec BIGINT CHECK (duration_sec < 1000000)); "
             "CREATE SEQUENCE quarantine_seq; CREATE TABLE quarantine (id BIGINT PRIMARY KEY "
             "DEFAULT nextval('quarantine_seq'), received_at TIMESTAMP NOT NULL, client_id "
             "VARCHAR NOT NULL, batch_index INTEGER NOT NULL, event_id VARCHAR, reason VARCHAR "
             "NOT NULL CHECK (reason NOT LIKE 'not applied%'), event VARCHAR NOT NULL)")
    with app(settings) as (client, headers):
        runtime = runtime_of(client)
        first = [make_event(), session_end(5_000_000), make_event()]
        assert post(client, headers, first).json()["accepted"] == 3
        assert runtime.ingest.flush(30)
        later = [make_event() for _ in range(3)]
        assert post(client, headers, later).json()["accepted"] == 3
        ids = stored_ids(client)
        assert set(ids) == {e["event_id"] for e in later}
        lines = [json.loads(line) for f in sorted((settings.data_dir / "parked").iterdir())
                 for line in f.read_text().splitlines()]
        parked = {line["item"]["event_id"]: line for line in lines}
        assert set(parked) == {e["event_id"] for e in first}
        assert {line["kind"] for line in lines} == {"event", "quarantine"}
        assert all("CHECK" in line["reason"] for line in lines)
        assert runtime.ingest.applier.set_aside_rows == 3
        assert post(client, headers, first[:1]).json()["accepted"] == 1  # not a duplicate


def test_a_refusal_that_passes_is_retried_not_parked(settings):
    """The store refuses a write as if its rows were at fault, then refuses it again once
    every row has passed its dry run, then takes it (a passing engine failure worded as the
    rows'): the write is retried and stored whole — nothing parked, nothing quarantined."""
    with app(settings) as (client, headers):
        runtime = runtime_of(client)
        store, refusals = runtime.backend, [2]
        real = store.write

        def refusing(writes: WriteSet, journal_seq: int | None = None, *,
                     dry_run: bool = False) -> None:
            if not dry_run and refusals[0]:
                refusals[0] -= 1
                raise WriteRejected("Code: 1002. DB::Exception: a failure that passes")
            real(writes, journal_seq, dry_run=dry_run)

        store.write = refusing  # the real store, refusing its first two writes
        events = [make_event() for _ in range(5)]
        assert post(client, headers, events).json()["accepted"] == 5
        assert runtime.ingest.flush(30)
        assert refusals == [0]  # both refusals happened
        ids = stored_ids(client)
        assert [ids.get(e["event_id"]) for e in events] == [1] * 5
        assert list((settings.data_dir / "parked").glob("*")) == []
        assert quarantined(client, headers) == []
        assert runtime.ingest.applier.set_aside_rows == 0


@on_duckdb_only("sabotages the schema through DuckDB's file")
def test_a_poison_record_left_in_the_journal_does_not_stop_the_restart(settings):
    """The restart freeze of issue 9: start-up replayed the same failing record and died."""
    with app(settings) as (client, headers):
        assert post(client, headers, [make_event()]).status_code == 202
        runtime = runtime_of(client)
        assert runtime.ingest.flush(30)
        good, poison = [make_event() for _ in range(4)], session_end(5_000_000)
        prepared = runtime.ingest.prepare(json.dumps([*good[:2], poison, *good[2:]]).encode(),
                                          _ctx(), "crash-test")
    con = duckdb.connect(str(settings.data_dir / "events.duckdb"))
    con.execute("DROP TABLE session_ends")
    con.execute("CREATE TABLE session_ends (tenant_id VARCHAR, session_id VARCHAR, "
                "duration_sec BIGINT CHECK (duration_sec < 1000000))")
    applied = int(con.execute("SELECT value FROM store_settings "
                              "WHERE name = 'journal_applied_seq'").fetchall()[0][0])
    con.close()
    journal = Journal(settings.data_dir / "journal")  # what a crash after the 202 leaves
    journal.append(applied + 1, WriteSet(events=[prepared.table]))
    journal.close()
    with app(settings) as (client, headers):
        ids = stored_ids(client)
        assert all(ids.get(e["event_id"]) == 1 for e in good)
        assert [q["event_id"] for q in quarantined(client, headers)] == [poison["event_id"]]
        assert post(client, headers, [make_event()]).json()["accepted"] == 1


@on_duckdb_only("sabotages the schema through DuckDB's file")
def test_a_store_that_refuses_even_an_empty_write_sets_nothing_aside(settings):
    """A fault of the store or of the code (here a table of the wrong shape), not of the
    rows: nothing is quarantined, the applier retries, the server says it is not ready, and
    shutdown gives up after TALLY_SHUTDOWN_SECONDS, leaving the rows in the journal."""
    sabotage(settings.data_dir, "CREATE TABLE session_ends (tenant_id VARCHAR, session_id "
             "VARCHAR, duration_sec BIGINT, shape_of_another_version VARCHAR NOT NULL)")
    settings = settings.model_copy(update={"shutdown_seconds": 1.0})
    with app(settings) as (client, headers):
        events = [make_event() for _ in range(3)]
        assert post(client, headers, events).json()["accepted"] == 3  # durable in the journal
        runtime = runtime_of(client)
        assert not runtime.ingest.flush(1.0)
        assert runtime.ingest.applier.store_failure is not None
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "store cannot be written" in ready.text
        assert runtime.backend.query("SELECT count(*) AS n FROM quarantine") \
            .to_pylist() == [{"n": 0}]
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 8  # the applier gave up after about a second
    con = duckdb.connect(str(settings.data_dir / "events.duckdb"))
    con.execute("DROP TABLE session_ends")  # the operator fixes the store
    con.close()
    with app(settings) as (client, headers):
        ids = stored_ids(client)
        assert all(ids.get(e["event_id"]) == 1 for e in events)
        assert quarantined(client, headers) == []


def _ctx() -> Any:
    from tally.events.envelope import ValidationContext

    return ValidationContext(received_at=datetime.now(UTC),
                             served_regions=frozenset({"EU", "UK", "LATAM"}))


# -- 3. an honest watermark, push-back, bounded waits -------------------------------------

@contextmanager
def applier_blocked(client: TestClient) -> Iterator[None]:
    """Hold the store's write lock: the applier waits, acknowledged events pile up."""
    lock = runtime_of(client).backend._write_lock
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def test_the_watermark_never_claims_events_the_answer_does_not_hold(settings):
    settings = settings.model_copy(update={"read_your_writes_ms": 0})
    with app(settings) as (client, headers):
        base = datetime(2025, 10, 23, 10, 0, tzinfo=UTC)
        on_time = [make_event(occurred_at=(base + timedelta(minutes=m)).isoformat())
                   for m in range(0, 60, 2)]
        assert post(client, headers, on_time).status_code == 202
        assert runtime_of(client).ingest.flush(30)
        params = {"metric": "bets", "granularity": "1m", "from": "2025-10-23T10:00:00Z",
                  "to": "2025-10-23T11:00:00Z", "filters": "brand_id:brand-7"}
        with applier_blocked(client):
            late = make_event(occurred_at="2025-10-23T10:31:00Z")
            assert post(client, headers, [late]).status_code == 202
            r = client.get(TS, params=params, headers=headers)
        mark = datetime.fromisoformat(r.headers["x-data-watermark"])
        assert mark == datetime(2025, 10, 23, 10, 31, tzinfo=UTC)  # the late event's instant
        acked = on_time + [late]
        for point in r.json()["series"]:  # every minute wholly before the watermark is whole
            ts = datetime.fromisoformat(point["ts"])
            if ts + timedelta(minutes=1) <= mark:
                assert point["value"] == sum(
                    1 for e in acked
                    if ts <= datetime.fromisoformat(e["occurred_at"]) < ts + timedelta(minutes=1))
        late_minute = next(p for p in r.json()["series"] if p["ts"].startswith("2025-10-23T10:31"))
        assert late_minute["value"] == 0  # not in yet, and the watermark does not claim it
        assert runtime_of(client).ingest.flush(30)
        after = client.get(TS, params=params, headers=headers)
        assert sum(p["value"] for p in after.json()["series"]) == len(acked)
        assert datetime.fromisoformat(after.headers["x-data-watermark"]) == \
            datetime(2025, 10, 23, 10, 58, tzinfo=UTC)


def test_queries_wait_for_the_applier_no_longer_than_the_setting(settings):
    settings = settings.model_copy(update={"read_your_writes_ms": 200})
    with app(settings) as (client, headers):
        params = {"metric": "bets", "granularity": "1d", "from": "2025-10-23",
                  "to": "2025-10-24"}
        with applier_blocked(client):
            assert post(client, headers, [make_event()]).status_code == 202
            started = time.monotonic()
            r = client.get(TS, params=params, headers=headers)
            waited = time.monotonic() - started
        assert r.status_code == 200 and sum(p["value"] for p in r.json()["series"]) == 0
        assert 0.2 <= waited < 5  # not the 2 s of old, nor forever


def test_ingestion_pushes_back_before_the_backlog_grows_without_bound(settings):
    settings = settings.model_copy(update={"max_backlog_rows": 1000})
    with app(settings) as (client, headers):
        acked: list[str] = []
        with applier_blocked(client):
            refused = None
            for _ in range(20):
                batch = [make_event() for _ in range(300)]
                r = post(client, headers, batch)
                if r.status_code != 202:
                    refused = r
                    break
                acked += [e["event_id"] for e in batch]
            assert refused is not None and refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["backlog_rows"] > 1000
            assert 1000 < len(acked) <= 1500
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "backlog" in ready.text
        assert runtime_of(client).ingest.flush(30)
        assert client.get("/readyz").status_code == 200
        assert post(client, headers, [make_event()]).status_code == 202
        ids = stored_ids(client)
        assert all(ids[e] == 1 for e in acked)


# -- 4. a store on a full disk ---------------------------------------------------------------

def test_a_full_store_disk_is_retried_and_nothing_acknowledged_is_lost(tmp_path: Path):
    """The store's disk fills up (DuckDB's commit, or a checkpoint that invalidates the
    database, fails): acknowledgements go on from the journal on its own disk, the server is
    not ready, and once space is freed every acknowledged event is applied exactly once."""
    data = tmp_path / "data"
    with tmpfs(data, "24m"), tmpfs(data / "journal", "256m"):
        settings = Settings(data_dir=data, regions="EU,UK,LATAM")
        with app(settings) as (client, headers):
            runtime = runtime_of(client)
            filler = fill(data, leave=256 * 1024)
            acked: list[str] = []
            failing = False
            for _ in range(40):
                batch = [make_event(player_id=f"p{i}") for i in range(2000)]
                r = post(client, headers, batch)
                assert r.status_code in (202, 503), r.text
                if r.status_code == 202:
                    acked += [e["event_id"] for e in batch]
                if runtime.ingest.applier.store_failure is not None:
                    failing = True
                    break
            assert failing, "the store never filled up"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "store cannot be written" in ready.text
            more = [make_event() for _ in range(100)]
            assert post(client, headers, more).status_code == 202  # the journal still takes
            acked += [e["event_id"] for e in more]
            filler.unlink()
            deadline = time.monotonic() + 60
            while runtime.ingest.applier.store_failure is not None \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            ids = stored_ids(client)
            assert [e for e in acked if ids.get(e) != 1] == []
            assert client.get("/readyz").status_code == 200


@on_duckdb_only("DuckDB's checkpoint on a full disk")
def test_a_checkpoint_that_fails_on_a_full_disk_reopens_the_store(tmp_path: Path):
    """DuckDB invalidates a database whose checkpoint fails (every later statement is a
    FATAL error until it is opened again): the backend reports the store unavailable, reads
    included, and opens it again by itself once it can, losing nothing committed."""
    from tally.errors import StoreUnavailable
    from tally.runtime import open_store

    data = tmp_path / "data"
    with tmpfs(data, "20m"):
        settings = Settings(data_dir=data, regions="EU")
        backend = open_store(settings)
        try:
            backend._con.execute("SET checkpoint_threshold = '1KB'")  # every commit checkpoints
            runtime_free = _writes(backend)
            for seq in (1, 2, 3):
                backend.write(runtime_free(2000), journal_seq=seq)
            filler = fill(data, leave=100 * 1024)
            with pytest.raises(StoreUnavailable, match="FATAL|checkpoint"):
                backend.write(runtime_free(2000), journal_seq=4)
            with pytest.raises(StoreUnavailable):
                backend.write(runtime_free(10), journal_seq=4)
            filler.unlink()
            assert backend.query("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 6000}]
            backend.write(runtime_free(10), journal_seq=4)
            assert backend.query("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 6010}]
            assert backend.journal_applied_seq() == 4
        finally:  # on another store the first line fails: its store closed all the same
            backend.close()


def _writes(backend: Any) -> Any:
    from tally.ingest.batch import prepare
    from tally.ingest.dedup import key_hasher

    hasher = key_hasher(b"k" * 32)

    def batch(n: int) -> WriteSet:
        body = json.dumps([make_event() for _ in range(n)]).encode()
        return WriteSet(events=[prepare(body, _ctx(), "c", 100_000, hasher).table])

    return batch

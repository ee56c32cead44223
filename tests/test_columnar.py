"""The columnar (bulk) ingestion path: the same rules as JSON, vectorised (tally.ingest.columnar),
the vectorised demo stream (tally.demo.columnar) and ``tally load``.

The differential tests build each event twice — as JSON for ``batch.prepare`` and as a row of
the columnar format for ``columnar.prepare_table`` — break one rule per event, and require the
two paths to accept the same events as the same stored rows and to reject the others with the
same reason.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tally.config import Settings
from tally.demo.columnar import Stream, tables
from tally.demo.generator import generate
from tally.demo.load import load_batches
from tally.errors import InvalidBody
from tally.events.envelope import ValidationContext
from tally.ingest.batch import prepare
from tally.ingest.columnar import INPUT_SCHEMA, conform, prepare_table, typed_payload
from tally.ingest.dedup import key_hasher
from tally.ingest.setaside import event_json
from tally.security.pseudonym import Pseudonymiser
from tests.server import TALLY
from tests.stores import stored

NOW = datetime(2025, 10, 23, 12, tzinfo=UTC)
SERVED = frozenset({"EU", "UK", "LATAM", "NA", "APAC"})
HASHER = key_hasher(b"test-key")


def ctx(**limits: Any) -> ValidationContext:
    return ValidationContext(received_at=NOW, served_regions=limits.pop("served", SERVED),
                             **limits)


def columns_of(events: list[dict[str, Any]]) -> pa.Table:
    """The columnar form of JSON events, built independently of the code under test: the
    envelope's members and the payload's as columns, instants parsed."""
    rows = []
    for e in events:
        row: dict[str, Any] = {k: v for k, v in e.items() if k != "payload"}
        for name in ("occurred_at", "ingested_at"):
            if row.get(name) is not None:
                row[name] = datetime.fromisoformat(row[name].replace("Z", "+00:00"))
        row.update(e.get("payload") or {})
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INPUT_SCHEMA)


@functools.cache
def _sample() -> bytes:
    seen: dict[str, dict[str, Any]] = {}
    for batch in generate(20_000, 2, 3, NOW - timedelta(hours=1), 5_000):
        for e in batch:
            seen.setdefault(e["event_id"], e)
    return msgspec.json.encode(list(seen.values()))


def sample_events() -> list[dict[str, Any]]:
    """Two days of the demo stream (every event type), made unique by event id; a copy."""
    events: list[dict[str, Any]] = msgspec.json.decode(_sample())
    return events


def _set(path: str, value: Any) -> Any:
    def apply(e: dict[str, Any]) -> None:
        where = e
        *parents, last = path.split(".")
        for p in parents:
            where = where[p]
        if value is _DROP:
            where.pop(last, None)
        else:
            where[last] = value
    return apply


_DROP = object()
FAULTS: list[tuple[str, str, Any]] = [
    # (the type of the event to break, the member, its new value or _DROP)
    ("bet.placed", "event_id", ""),
    ("bet.placed", "event_id", "x" * 129),
    ("bet.placed", "tenant_id", _DROP),
    ("bet.placed", "tenant_id", "t" * 129),
    ("bet.placed", "region", "MARS"),  # residency
    ("bet.placed", "schema_version", "2.0.0"),
    ("bet.placed", "schema_version", "one"),
    ("bet.placed", "schema_version", _DROP),
    ("bet.placed", "occurred_at", "1999-12-31T23:59:59Z"),
    ("bet.placed", "occurred_at", "2025-10-23T13:30:00Z"),  # 90 min ahead of the receive time
    ("bet.settled", "ingested_at", "2025-10-23T14:00:00Z"),
    ("bet.placed", "player_id", _DROP),
    ("payment.intent", "player_id", _DROP),  # allowed: payments may lack a player
    ("bet.placed", "player_id", ""),
    ("bet.placed", "payload.currency", "ABC"),  # a pattern match, not ISO 4217
    ("bet.placed", "payload.currency", "eur"),
    ("bet.placed", "payload.stake_minor", -1),
    ("bet.settled", "payload.win_minor", 2**53),
    ("bet.placed", "payload.bet_id", _DROP),
    ("wallet.debit", "payload.reason", "refund"),
    ("session.started", "payload.device", ""),
    ("session.ended", "payload.duration_sec", -5),
    ("rg.limit.hit", "payload.limit_type", "l" * 65),
    ("player.registered", "payload.country", "DEU"),
    ("bet.placed", "payload.in_bonus", True),  # valid
    ("bet.placed", "event_type", "bet.voided"),
    ("payment.failed", "payload.method", _DROP),
]


def broken_events() -> tuple[list[dict[str, Any]], list[int]]:
    events = sample_events()
    by_type: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_type.setdefault(e["event_type"], []).append(i)
    touched = []
    used: Counter[str] = Counter()
    for etype, path, value in FAULTS:
        i = by_type[etype][used[etype]]  # a different event for each fault
        used[etype] += 1
        _set(path, value)(events[i])
        touched.append(i)
    return events, touched


def test_both_paths_accept_the_same_rows_and_reject_with_the_same_reasons() -> None:
    events, touched = broken_events()
    json_batch = prepare(msgspec.json.encode(events), ctx(), "c", 100_000, HASHER)
    col_batch = prepare_table(columns_of(events), ctx(), "c", HASHER)
    json_reasons = {r.index: r.reason for r in json_batch.rejections}
    col_reasons = {r.index: r.reason for r in col_batch.rejections}
    assert col_reasons == json_reasons
    assert len(json_reasons) == len(FAULTS) - 2  # all but the two valid changes
    assert set(json_reasons) <= set(touched)
    assert {r.index: r.residency for r in col_batch.rejections} == {
        r.index: r.residency for r in json_batch.rejections}
    assert sum(r.residency for r in col_batch.rejections) == 1
    key = ["id_hi", "id_lo"]
    a = json_batch.table.drop_columns(["payload"]).sort_by([(k, "ascending") for k in key])
    b = col_batch.table.drop_columns(["payload"]).sort_by([(k, "ascending") for k in key])
    assert a.num_rows == b.num_rows == len(events) - len(json_reasons)
    assert a.equals(b)


def test_the_quarantine_keeps_the_rejected_event_as_json() -> None:
    events, _ = broken_events()
    col_batch = prepare_table(columns_of(events), ctx(), "c", HASHER)
    for rejection in col_batch.rejections:
        kept = msgspec.json.decode(rejection.raw)
        sent = events[rejection.index]
        assert kept["event_id"] == sent.get("event_id")
        assert kept.get("payload", {}) == {k: v for k, v in sent["payload"].items()
                                           if v is not None}


def test_limits_of_the_sender_apply() -> None:
    events = sample_events()
    brands = frozenset({"brand-1"})
    json_batch = prepare(msgspec.json.encode(events), ctx(allowed_brands=brands), "c", 100_000,
                         HASHER)
    col_batch = prepare_table(columns_of(events), ctx(allowed_brands=brands), "c", HASHER)
    assert {r.index: r.reason for r in col_batch.rejections} == {
        r.index: r.reason for r in json_batch.rejections}
    assert set(pc.unique(col_batch.table.column("tenant_id")).to_pylist()) == {"brand-1"}
    providers = frozenset({"nova"})
    json_batch = prepare(msgspec.json.encode(events), ctx(allowed_providers=providers), "c",
                         100_000, HASHER)
    col_batch = prepare_table(columns_of(events), ctx(allowed_providers=providers), "c", HASHER)
    assert {r.index: r.reason for r in col_batch.rejections} == {
        r.index: r.reason for r in json_batch.rejections}
    assert set(col_batch.table.column("provider_id").to_pylist()) == {"nova"}


def test_pseudonymised_player_ids_are_the_same_on_both_paths() -> None:
    events = sample_events()[:500]
    pseudo = Pseudonymiser(b"k" * 32, per_brand=True)
    a = prepare(msgspec.json.encode(events), ctx(), "c", 100_000, HASHER, pseudo).table
    b = prepare_table(columns_of(events), ctx(), "c", HASHER, pseudo).table
    order = [("id_hi", "ascending"), ("id_lo", "ascending")]
    assert a.sort_by(order).column("player_id").equals(b.sort_by(order).column("player_id"))
    raw = {e["player_id"] for e in events if e.get("player_id")}
    assert not raw & set(b.column("player_id").to_pylist())


def test_dedup_keys_are_the_documented_digest() -> None:
    hi, lo = HASHER.columns(["brand-1", "brand-2"], ["e-1", "e-1"])
    for tenant, event_id, h, low in zip(["brand-1", "brand-2"], ["e-1", "e-1"], hi, lo,
                                        strict=True):
        digest = hashlib.blake2b(f"{tenant}\x1f{event_id}".encode(), digest_size=16,
                                 key=b"test-key").digest()
        assert h == int.from_bytes(digest[:8], "little", signed=True)
        assert low == int.from_bytes(digest[8:], "little", signed=True)
    assert HASHER("brand-1", "e-1") == (hi[0], lo[0])


def test_a_field_of_another_type_is_refused_not_lost() -> None:
    event = next(e for e in sample_events() if e["event_type"] == "bet.placed")
    event["payload"]["win_minor"] = 5
    batch = prepare_table(columns_of([event]), ctx(), "c", HASHER)
    assert batch.table.num_rows == 0
    assert batch.rejections[0].reason.startswith("payload.win_minor is not a field of bet.placed")
    assert msgspec.json.decode(batch.rejections[0].raw)["payload"]["win_minor"] == 5


@pytest.mark.parametrize("change, message", [
    (lambda t: t.append_column("colour", pa.array(["red"] * t.num_rows)), "unknown column"),
    (lambda t: t.drop_columns(["event_id"]), "'event_id' is required"),
    (lambda t: t.set_column(t.schema.get_field_index("stake_minor"), "stake_minor",
                            pc.cast(t.column("stake_minor"), pa.string())), "'stake_minor' is"),
    (lambda t: t.set_column(t.schema.get_field_index("occurred_at"), "occurred_at",
                            t.column("occurred_at").cast(pa.timestamp("us"))),
     "with a time zone"),
    (lambda t: t.set_column(t.schema.get_field_index("in_bonus"), "in_bonus",
                            pa.array([1] * t.num_rows)), "'in_bonus' is"),
])
def test_a_table_not_in_the_format_is_refused_whole(change: Any, message: str) -> None:
    table = columns_of(sample_events()[:50])
    with pytest.raises(InvalidBody, match=message):
        prepare_table(change(table), ctx(), "c", HASHER)


def test_a_string_column_that_is_not_utf8_is_refused() -> None:
    table = columns_of(sample_events()[:3])
    raw = pa.array([b"ok", b"\xff\xfe", b"ok"], pa.binary())
    bad = raw.view(pa.string())  # the bytes as they would arrive in a file's string column
    with pytest.raises(InvalidBody, match="'device'.*UTF-8|'device'.*utf8|'device'"):
        prepare_table(table.set_column(table.schema.get_field_index("device"), "device", bad),
                      ctx(), "c", HASHER)


def test_a_huge_value_refuses_the_batch_before_anything_is_kept() -> None:
    table = columns_of(sample_events()[:3])
    huge = pa.array(["x", "y" * (64 * 1024 + 1), None])
    with pytest.raises(InvalidBody, match="'trace_id' holds a value of 65,537 bytes"):
        prepare_table(table.set_column(table.schema.get_field_index("trace_id"), "trace_id",
                                       huge), ctx(), "c", HASHER)


def test_equivalent_encodings_are_accepted() -> None:
    events = sample_events()[:300]
    table = columns_of(events)
    other = pa.table({
        **{name: table.column(name) for name in table.column_names},
        "tenant_id": pc.dictionary_encode(table.column("tenant_id")),
        "event_id": table.column("event_id").cast(pa.large_string()),
        "duration_sec": table.column("duration_sec").cast(pa.int32()),
        "occurred_at": table.column("occurred_at").cast(pa.timestamp("ms", tz="+02:00")),
    }).drop_columns(["trace_id"])  # an absent optional column
    a = prepare_table(table, ctx(), "c", HASHER).table
    b = prepare_table(other, ctx(), "c", HASHER).table
    assert a.drop_columns(["trace_id"]).equals(b.drop_columns(["trace_id"]))
    assert b.column("trace_id").null_count == b.num_rows
    assert conform(other).schema == INPUT_SCHEMA


def test_a_row_loaded_from_columns_rebuilds_its_payload() -> None:
    events = sample_events()[:400]
    table = prepare_table(columns_of(events), ctx(), "c", HASHER).table
    assert set(table.column("payload").to_pylist()) == {""}
    for row, sent in zip(table.to_pylist(), events, strict=True):
        assert typed_payload(row) == {k: v for k, v in sent["payload"].items() if v is not None}
        # a set-aside row is resent as this JSON: it must pass again
        again = prepare(b"[" + event_json(row) + b"]", ctx(), "c", 10, HASHER)
        assert not again.rejections and again.table.num_rows == 1


# -- the vectorised demo stream ------------------------------------------------------------------
END = datetime(2025, 10, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def stream() -> tuple[Stream, pa.Table]:
    s, batches = tables(150_000, 10, 4, END, batch=20_000)
    return s, pa.concat_tables(list(batches))


def test_the_stream_is_valid_and_realistic(stream: tuple[Stream, pa.Table]) -> None:
    s, table = stream
    assert 0.9 * 150_000 <= table.num_rows <= 150_000
    assert s.shape()["events"] == table.num_rows
    batch = prepare_table(table, ValidationContext(END, SERVED), "c", HASHER)
    assert batch.rejections == []
    ids = table.column("event_id").to_pylist()
    resent = len(ids) - len(set(ids))
    assert 0.005 * len(ids) < resent < 0.015 * len(ids)  # ~1% re-sent
    rows = table.to_pylist()
    start = END - timedelta(days=10)
    assert all(start <= r["occurred_at"] < END for r in rows)
    assert all(r["ingested_at"] >= r["occurred_at"] for r in rows)
    types = Counter(r["event_type"] for r in rows)
    assert set(types) == {"player.registered", "session.started", "session.ended", "bet.placed",
                          "bet.settled", "wallet.debit", "wallet.credit", "payment.intent",
                          "payment.authorized", "payment.captured", "payment.failed",
                          "bonus.issued", "bonus.consumed", "rg.limit.hit", "rg.reality_check"}
    assert types["bet.placed"] > 0.3 * len(rows)
    placed = {r["bet_id"]: r for r in rows if r["event_type"] == "bet.placed"}
    settled = [r for r in rows if r["event_type"] == "bet.settled"]
    assert all(r["bet_id"] in placed and placed[r["bet_id"]]["occurred_at"] <= r["occurred_at"]
               and placed[r["bet_id"]]["stake_minor"] == r["stake_minor"] for r in settled)
    stake = sum(r["stake_minor"] for r in settled if r["currency"] == "EUR")
    win = sum(r["win_minor"] for r in settled if r["currency"] == "EUR")
    assert 0.85 < win / stake < 1.0  # a casino's RTP
    players = {r["player_id"] for r in rows}
    assert s.shape()["players"] >= len(players) > 500
    captured = {r["payment_id"] for r in rows if r["event_type"] == "payment.captured"}
    deposits = [r for r in rows if r["event_type"] == "wallet.credit" and r["reason"] == "deposit"]
    assert deposits and all(r["reference_id"] in captured for r in deposits)


def test_same_seed_same_stream() -> None:
    def first(seed: int) -> pa.Table:
        return next(tables(20_000, 2, seed, END, batch=5_000)[1])

    assert first(3).equals(first(3))
    assert not first(3).equals(first(4))


def test_bulk_load_stores_each_event_once(tmp_path: Path,
                                          stream: tuple[Stream, pa.Table]) -> None:
    _, table = stream
    settings = Settings(data_dir=tmp_path / "data")
    parts = [table.slice(i, 25_000) for i in range(0, table.num_rows, 25_000)]
    summary = load_batches(settings, ((p.num_rows, p) for p in parts), "t", table.num_rows)
    distinct = len(set(table.column("event_id").to_pylist()))
    assert summary["accepted"] == distinct
    assert summary["duplicates"] == table.num_rows - distinct
    settled = table.filter(pc.equal(table.column("event_type"), "bet.settled"))
    by_id = {r["event_id"]: r for r in settled.to_pylist()}
    expected = Counter[str]()
    for r in by_id.values():
        expected[r["currency"]] += r["stake_minor"] - r["win_minor"]
    with stored(settings.data_dir) as store:
        assert store.count_events() == distinct
        got = store.query("SELECT currency, sum(stake_minor - win_minor) AS ggr FROM events "
                          "WHERE event_type = 'bet.settled' GROUP BY currency").to_pylist()
        rollup = store.query("SELECT currency, sum(stake_sum) - sum(win_sum) AS ggr "
                             "FROM rollup_1d WHERE event_type = 'bet.settled' "
                             "GROUP BY currency").to_pylist()
    assert {r["currency"]: int(r["ggr"]) for r in got} == dict(expected)
    assert {r["currency"]: int(r["ggr"]) for r in rollup} == dict(expected)
    again = load_batches(settings, ((p.num_rows, p) for p in parts[:2]), "t", None)
    assert again["accepted"] == 0
    assert again["duplicates"] == sum(p.num_rows for p in parts[:2])


def test_an_event_sent_as_json_is_a_duplicate_in_columns(tmp_path: Path) -> None:
    events = sample_events()[:1_000]
    settings = Settings(data_dir=tmp_path / "data")
    first = load_batches(settings, [(len(events), msgspec.json.encode(events))], "t", None)
    assert first["accepted"] == len(events)
    second = load_batches(settings, [(len(events), columns_of(events))], "t", None)
    assert second["accepted"] == 0 and second["duplicates"] == len(events)


# -- tally load -----------------------------------------------------------------------------------
def tally(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TALLY, *args], capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.slow
def test_tally_load_files(tmp_path: Path) -> None:
    events, _ = broken_events()
    table = columns_of(events)
    pq.write_table(table.slice(0, 2_000), tmp_path / "a.parquet")
    pq.write_table(table.slice(2_000), tmp_path / "b.parquet")
    data = tmp_path / "data"
    run = tally("load", str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet"),
                "--data-dir", str(data), "--json")
    assert run.returncode == 0, run.stderr
    summary = msgspec.json.decode(run.stdout)
    now = ValidationContext(received_at=datetime.now(UTC), served_regions=SERVED)
    expected = prepare(msgspec.json.encode(events), now, "c", 100_000, HASHER)
    assert summary["rejected"] == len(expected.rejections)
    assert summary["accepted"] == expected.table.num_rows
    with stored(data) as store:
        assert store.count_events() == summary["accepted"]
        reasons = store.query("SELECT reason FROM quarantine").column("reason").to_pylist()
    assert Counter(reasons) == Counter(r.reason for r in expected.rejections)
    again = tally("load", str(tmp_path / "a.parquet"), "--data-dir", str(data), "--json")
    assert msgspec.json.decode(again.stdout)["accepted"] == 0


@pytest.mark.slow
def test_tally_load_refuses_a_bad_file_before_loading_anything(tmp_path: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(columns_of(sample_events()[:100]), good)
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"event_id": ["e"], "event_type": ["bet.placed"],
                             "stake": [1]}), bad)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    data = tmp_path / "data"
    for path, message in ((bad, "unknown column(s) ['stake']"),
                          (junk, "not a readable Parquet file")):
        run = tally("load", str(good), str(path), "--data-dir", str(data))
        assert run.returncode == 2
        assert message in run.stderr and str(path) in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
    assert not data.exists()  # checked before the store was even opened


@pytest.mark.slow
def test_tally_load_stops_at_a_batch_with_a_huge_value_and_resumes(tmp_path: Path) -> None:
    from tally.demo.load import BULK_EVENTS

    _, table = tables(BULK_EVENTS + 5_000, 3, 9, datetime.now(UTC), batch=BULK_EVENTS + 5_000)
    table = pa.concat_tables(list(table))
    first = table.slice(0, BULK_EVENTS)
    traces = table.column("trace_id").to_pylist()
    traces[-1] = "t" * (64 * 1024 + 1)  # in the second batch only
    path = tmp_path / "events.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("trace_id"), "trace_id",
                                    pa.array(traces, pa.string())), path)
    data = tmp_path / "data"
    run = tally("load", str(path), "--data-dir", str(data))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "tally: column 'trace_id' holds a value of 65,537 bytes; the limit is 65,536")
    with stored(data) as store:  # the first batch stayed, its rollups derived
        loaded = store.count_events()
        settled = store.query("SELECT sum(stake_sum) AS s FROM rollup_1d "
                              "WHERE event_type = 'bet.settled'").column("s")[0].as_py()
    assert loaded == len(set(first.column("event_id").to_pylist()))
    bets = {r["event_id"]: r["stake_minor"] for r in first.to_pylist()
            if r["event_type"] == "bet.settled"}
    assert int(settled) == sum(bets.values())
    pq.write_table(table, path)  # fixed: the rest loads, the first batch is duplicates
    again = tally("load", str(path), "--data-dir", str(data), "--json")
    assert again.returncode == 0, again.stderr
    summary = msgspec.json.decode(again.stdout)
    assert summary["accepted"] + loaded == len(set(table.column("event_id").to_pylist()))


@pytest.mark.slow
def test_tally_demo_bulk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run = tally("demo", "--bulk", "--events", "30000", "--days", "3", "--data-dir", str(data),
                "--json")
    assert run.returncode == 0, run.stderr
    summary = msgspec.json.decode(run.stdout)
    assert summary["rejected"] == 0
    assert summary["accepted"] + summary["duplicates"] == summary["events_generated"]
    assert summary["shape"]["events"] == summary["events_generated"] <= 30_000
    assert summary["shape"]["players"] > 0 and summary["shape"]["by_type"]["bet.settled"] > 0
    with stored(data) as store:
        assert store.count_events() == summary["accepted"]
        rates = store.query("SELECT count(*) AS n FROM fx_rates").column("n")[0].as_py()
    assert rates > 0  # money answers convert out of the box, as with the JSON demo
    refused = tally("demo", "--bulk", "--url", "http://127.0.0.1:9", "--data-dir", str(data))
    assert refused.returncode != 0 and "--bulk" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# -- derived rows of a bulk load, made once at the end ----------------------------------------
def _derived_snapshot(data: Path) -> dict[str, list[dict[str, Any]]]:
    from tally.rollups.spec import derived_tables

    with stored(data) as store:  # every table's rows as its readers aggregate them
        out = {}
        for table in derived_tables(store.dialect):
            schema = store.query(f"SELECT * FROM {table.name} LIMIT 0").schema  # noqa: S608
            columns = schema.names
            # sums add up over rows; lists (step_times' instants) are their elements together
            sums = [f"sum({c}) AS {c}" for c in columns if c.endswith(("_sum", "_count"))]
            together = "arraySort(arrayFlatten(groupArray({})))" \
                if store.dialect == "clickhouse" else "list_sort(flatten(list({})))"
            sums += [f"{together.format(c)} AS {c}" for c in columns
                     if pa.types.is_list(schema.field(c).type)]
            keys = [c for c in columns if not any(f"({c})" in s for s in sums)]
            sql = (f"SELECT {', '.join(keys)}, {', '.join(sums)} "
                   f"FROM {table.name} GROUP BY {', '.join(keys)}" if sums
                   else f"SELECT DISTINCT * FROM {table.name}")  # noqa: S608
            rows = store.query(sql).to_pylist()
            out[table.name] = sorted(rows, key=lambda r: repr(sorted(r.items())))
        return out


def _write_groups(data: Path, groups: list[pa.Table], defer: bool, stop_after: int | None = None,
                  catch_up: bool = True) -> None:
    from tally.storage.base import WriteSet
    from tests.stores import open_test_store

    store = open_test_store(data)
    try:
        store.defer_derived(defer)
        for seq, table in enumerate(groups[:stop_after], 1):
            stamped = table.set_column(0, "ingest_seq", pa.array([seq] * table.num_rows,
                                                                  pa.int64()))
            store.write(WriteSet(events=[stamped]), journal_seq=seq)
        if catch_up:
            store.defer_derived(False)
    finally:
        store.close()


@pytest.fixture(scope="module")
def groups(stream: tuple[Stream, pa.Table]) -> list[pa.Table]:
    from tally.ingest.dedup import DedupIndex, first_unseen

    _, table = stream
    prepared = prepare_table(table, ValidationContext(END, SERVED), "c", HASHER).table
    seen = DedupIndex()
    out = []
    for offset in range(0, prepared.num_rows, 10_000):
        part = prepared.slice(offset, 10_000)
        hi, lo = part.column("id_hi").to_numpy(), part.column("id_lo").to_numpy()
        keep = first_unseen(hi, lo, seen)
        seen.add(hi[keep], lo[keep])
        out.append(part.filter(keep))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory,
              groups: list[pa.Table]) -> dict[str, list[dict[str, Any]]]:
    """Every derived table as the applier makes it: in each write's transaction."""
    data = tmp_path_factory.mktemp("reference")
    _write_groups(data, groups, defer=False)
    return _derived_snapshot(data)


def test_derived_rows_made_at_the_end_equal_those_made_per_write(
        tmp_path: Path, groups: list[pa.Table],
        reference: dict[str, list[dict[str, Any]]]) -> None:
    _write_groups(tmp_path, groups, defer=True)
    assert _derived_snapshot(tmp_path) == reference
    with stored(tmp_path) as store:
        assert store.setting("derived_pending") is None


def test_a_bulk_load_stopped_before_its_catch_up_is_caught_up_at_the_next_open(
        tmp_path: Path, groups: list[pa.Table],
        reference: dict[str, list[dict[str, Any]]]) -> None:
    _write_groups(tmp_path, groups, defer=True, stop_after=7, catch_up=False)  # killed here
    with stored(tmp_path) as store:  # the next open derives what was left
        assert store.setting("derived_pending") is None
    rest = groups[7:]
    from tally.storage.base import WriteSet
    from tests.stores import open_test_store

    store = open_test_store(tmp_path)
    try:  # the load resumed without deferring: the rest derived per write
        for seq, table in enumerate(rest, 8):
            stamped = table.set_column(0, "ingest_seq", pa.array([seq] * table.num_rows,
                                                                  pa.int64()))
            store.write(WriteSet(events=[stamped]), journal_seq=seq)
    finally:
        store.close()
    assert _derived_snapshot(tmp_path) == reference

"""The fault suite (``reliability/``) at a bounded size: real server processes under SIGKILL,
full and read-only filesystems, a poison journal record, slow clients, overload, hostile
input and SIGTERM under backlog. Each test asserts that the scenario saw no broken promise;
the assertion message lists every one it saw, with its figures. ``make reliability`` runs
the same scenarios larger and writes docs/reliability.md. Needs root (mounts), as CI has."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2 as httpx
import pytest

from reliability.events import bet, body, recent_hour
from reliability.findings import Findings
from reliability.scenarios import (
    crash,
    hostile,
    overload,
    poison,
    shutdown,
    slow,
    startup,
    storage,
)
from reliability.server import Deployment
from reliability.setcheck import EventSet
from reliability.volumes import Ext4Volume, ext4
from tally.events.envelope import ValidationContext
from tally.ingest.batch import prepare
from tally.ingest.dedup import key_hasher
from tally.rollups import activity
from tally.rollups.spec import derived_tables
from tally.storage.base import Backend, WriteSet
from tally.storage.factory import open_backend

pytestmark = pytest.mark.slow


def check(findings: Findings) -> None:
    print(findings.summary())  # the figures, in the output of a passing run too (-rA, -s)
    assert not findings.violations, findings.summary()


def test_sigkill_cycles_with_concurrent_writers_lose_and_double_nothing(tmp_path: Path):
    findings = crash.run(tmp_path, crash.SIZES["test"])
    check(findings)
    assert findings.figures["events acknowledged"] > 0  # the writers did get through


def test_full_and_read_only_journal_store_and_audit_log(tmp_path: Path):
    findings = storage.run(tmp_path, storage.SIZES["test"])
    check(findings)


def test_start_up_on_read_only_storage_is_a_clear_refusal(tmp_path: Path):
    findings = startup.run(tmp_path, startup.SIZES["test"])
    check(findings)


def test_a_poison_record_blocks_neither_later_records_nor_the_restart(tmp_path: Path):
    findings = poison.run(tmp_path, poison.SIZES["test"])
    check(findings)


def test_slow_and_idle_clients_do_not_starve_well_behaved_ones(tmp_path: Path):
    findings = slow.run(tmp_path, slow.SIZES["test"])
    check(findings)


def test_overload_is_pushed_back_and_answers_never_overclaim(tmp_path: Path):
    findings = overload.run(tmp_path, overload.SIZES["test"])
    check(findings)


def test_hostile_and_oversized_input_never_gets_a_5xx(tmp_path: Path):
    findings = hostile.run(tmp_path, hostile.SIZES["test"])
    check(findings)
    assert findings.figures["inputs tried"] > 300


def test_sigterm_under_backlog_is_bounded_and_loses_nothing(tmp_path: Path):
    findings = shutdown.run(tmp_path, shutdown.SIZES["test"])
    check(findings)


MIB = 1 << 20


@pytest.mark.parametrize("store", ["duckdb", "chdb"])
def test_a_power_loss_after_a_clean_stop_loses_nothing(tmp_path: Path, store: str,
                                                       monkeypatch: pytest.MonkeyPatch):
    """The server stops cleanly, emptying its journal, and the kernel then loses what it had
    not yet written of the store's disk (ext4 aborting its journal on an I/O error drops what
    it had not committed, as a power loss does; commits every 5 minutes here, so all of it):
    every acknowledged event is still stored, since the journal forgets nothing before the
    store's files are synced."""
    monkeypatch.setenv("TALLY_STORE", store)  # the server's, and the read-back's
    data, images = tmp_path / "data", tmp_path / "images"
    findings, events = Findings(f"power loss after a clean stop ({store})"), EventSet()
    with ext4(data, 128 * MIB, images / "data.img", commit=300) as store_disk, \
            ext4(data / "journal", 64 * MIB, images / "journal.img") as journal_disk:
        deployment = Deployment.create(data, {"TALLY_STORE": store})
        try:
            deployment.start()
            hour = recent_hour()
            for n in range(12):
                batch = [bet(f"pl-{n}-{i}", hour + timedelta(seconds=i)) for i in range(400)]
                keys = [(e["tenant_id"], e["event_id"]) for e in batch]
                events.record_sent(keys)
                r = httpx.post(f"{deployment.running.url}/v1/events:batch", content=body(batch),
                               headers=deployment.headers(), timeout=30)
                assert r.status_code == 202, r.text
                events.record_acknowledged(keys)
            assert deployment.stop() is not None, "the clean stop needed SIGKILL"
        finally:
            deployment.kill()
        assert list((data / "journal").glob("seg-*")) == []  # all applied: the journal emptied
        store_disk.trip_read_only()  # what the store's disk had not committed is gone
        journal_disk.unmount()
        store_disk.repair()
        journal_disk.mount()
        events.check(data, findings)
    check(findings)
    assert findings.figures["events acknowledged"] == 12 * 400


def _record(name: str, rows: int = 300) -> WriteSet:
    """A journal record's writes: ``rows`` valid bets of this hour."""
    hour = recent_hour()
    sent = [bet(f"{name}-{i}", hour + timedelta(seconds=i)) for i in range(rows)]
    return WriteSet(events=[prepare(body(sent), ValidationContext(datetime.now(UTC),
                                                                  frozenset({"EU"})),
                                    "t", 10_000, key_hasher(b"test")).table])


def _store(store: str, data: Path) -> Backend:
    return open_backend(store, data, derived=derived_tables, retired=activity.RETIRED)


def _closed_and_repaired(disk: Ext4Volume, backend: Backend) -> None:
    """The store on a disk gone read-only closed as it can be; the operator repairs the
    disk (what ext4 had not committed is gone)."""
    try:
        backend.close()
    except Exception:  # noqa: BLE001, S110 - a store on a read-only disk may not close
        pass
    disk.repair()


def _fsync(path: Path) -> None:
    """What the kernel's write-back may do for one file (or folder) before the others."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stored(backend: Backend) -> int:
    try:
        return int(backend.query("SELECT count(*) AS n FROM events").column("n")[0].as_py())
    finally:
        backend.close()


@pytest.mark.parametrize("store", ["duckdb", "chdb"])
def test_a_write_is_never_called_durable_on_a_disk_gone_read_only(tmp_path: Path, store: str):
    """The journal lets a record go once the store says the write is on disk
    (``Backend.make_durable``). An insert into the embedded ClickHouse returns before its part
    is written back; if the disk then goes read-only (ext4's ``errors=remount-ro`` on an I/O
    error) what it had not written back is gone. So ``make_durable`` either fails (the
    journal keeps the record, to replay after the repair: here chDB's sync reports the
    error) or the rows are there after the repair (DuckDB: its WAL was synced at commit)."""
    data = tmp_path / "data"
    with ext4(data, 128 * MIB, tmp_path / "images" / "data.img", commit=300) as disk:
        backend = _store(store, data)
        backend.write(_record("ro"), 1)
        disk.trip_read_only()  # before the write is synced: an I/O error at that moment
        try:
            backend.make_durable()
            durable = True
        except OSError:
            durable = False
        _closed_and_repaired(disk, backend)
        stored = _stored(_store(store, data))
    assert not durable or stored == 300, \
        f"make_durable returned, then {stored} of 300 rows were on the disk"


def test_the_store_never_says_a_record_is_applied_before_its_rows_are_on_disk(tmp_path: Path):
    """(chDB: DuckDB writes a record and its sequence in one synced transaction.) The kernel
    writes files back in no set order: here the part holding the "applied up to record 2"
    setting reaches the disk and the parts of records 1 and 2 do not (``fsync`` of that part
    alone, as the write-back could have done), then ext4 turns read-only, dropping the rest.
    After the repair the store must not say a record is applied whose rows it lacks: a
    restart replays only the records after it, so those rows would be lost."""
    data = tmp_path / "data"
    with ext4(data, 128 * MIB, tmp_path / "images" / "data.img", commit=300) as disk:
        backend = _store("chdb", data)
        backend.make_durable()  # the empty tables on disk
        for seq in (1, 2):
            backend.write(_record(f"r{seq}"), seq)
        assert backend.journal_applied_seq() == 2
        newest = Path(backend.query(
            "SELECT path FROM system.parts WHERE table = 'store_settings' AND active "
            "ORDER BY modification_time DESC, name DESC LIMIT 1").column("path")[0].as_py())
        for part_file in newest.iterdir():
            _fsync(part_file)
        _fsync(newest)
        disk.trip_read_only()
        _closed_and_repaired(disk, backend)
        backend = _store("chdb", data)
        applied = backend.journal_applied_seq()
        stored = _stored(backend)
    assert stored == 300 * applied, f"applied up to record {applied}, {stored} rows stored"


@pytest.mark.parametrize("on_disk", ["token log", "part", "part and token log"])
def test_the_record_being_written_when_the_disk_fails_is_replayed_whole(tmp_path: Path,
                                                                         on_disk: str):
    """(chDB.) Record 1 is applied (synced); record 2's first try is cut by the disk: its
    events' insert has landed in the engine (part and deduplication token log in the page
    cache) when the rest fails. The kernel writes files back in no set order: here the
    events table's token log alone reaches the disk, or the part alone, or both (an
    ``fsync`` of those files), then ext4 turns read-only. After the repair the restart
    replays the records after the store's applied sequence from the journal: all 600
    events must be stored, once (a token outliving its part dropped the replay: 300; a part
    outliving its token would be counted twice: 900)."""
    import pyarrow as pa

    data = tmp_path / "data"
    with ext4(data, 128 * MIB, tmp_path / "images" / "data.img", commit=300) as disk:
        backend = _store("chdb", data)
        backend.make_durable()
        records = {1: _record("r1"), 2: _record("r2")}
        backend.write(records[1], 1)
        backend._insert("events", pa.concat_tables(records[2].events),  # type: ignore[attr-defined]
                        2, {})  # the write's first insert, then the disk fails
        events = Path(backend.query(
            "SELECT data_paths FROM system.tables WHERE database = currentDatabase() AND "
            "name = 'events'").column("data_paths")[0].as_py()[0])
        if "token" in on_disk:
            for log in (events / "deduplication_logs").iterdir():
                _fsync(log)
        if "part" in on_disk:
            for part in backend.query(
                    "SELECT path FROM system.parts WHERE table = 'events' AND active "
                    "AND modification_time >= (SELECT max(modification_time) FROM system.parts "
                    "WHERE table = 'events' AND active)").column("path").to_pylist():
                for part_file in Path(part).iterdir():
                    _fsync(part_file)
                _fsync(Path(part))
            _fsync(events)
        disk.trip_read_only()
        _closed_and_repaired(disk, backend)
        backend = _store("chdb", data)
        for seq in range(backend.journal_applied_seq() + 1, 3):  # the restart's replay
            backend.write(records[seq], seq)
        stored = _stored(backend)
    assert stored == 600, f"{stored} of 600 events stored after the replay"

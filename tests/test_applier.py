"""The applier's linger (``TALLY_APPLY_LINGER_MS``): acknowledged groups wait to be merged into
one store write, unless a reader waits for them, the backlog reaches the write's size bound or
the applier stops — over a real store and journal."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from tally.events.envelope import ValidationContext
from tally.ingest.applier import Applier
from tally.ingest.batch import prepare
from tally.ingest.dedup import key_hasher
from tally.ingest.journal import Journal
from tally.ingest.versions import DataVersions
from tally.storage.base import Backend, WriteSet
from tests.conftest import make_event
from tests.stores import open_test_store


class Recorded:
    """The store, with the journal sequence of each write it is asked to make."""

    def __init__(self, store: Backend) -> None:
        self.store, self.writes = store, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def write(self, writes: WriteSet, journal_seq: int | None = None, **kw: Any) -> None:
        self.writes.append(journal_seq)
        self.store.write(writes, journal_seq=journal_seq, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Recorded]:
    (tmp_path / "data").mkdir()
    backend = open_test_store(tmp_path / "data")
    yield Recorded(backend)
    backend.close()


def group(seq: int, events: int = 5) -> WriteSet:
    """Journal record ``seq``: ``events`` valid events, as the writer hands them over."""
    ctx = ValidationContext(datetime.now(UTC), frozenset({"EU"}))
    body = json.dumps([make_event() for _ in range(events)]).encode()
    table = prepare(body, ctx, "c", 100, key_hasher(b"k")).table
    seqs = pa.array(range(seq * 1000, seq * 1000 + table.num_rows), pa.int64())
    return WriteSet(events=[table.set_column(0, "ingest_seq", seqs)])


def applier(store: Recorded, tmp_path: Path, linger: float, **kw: Any) -> Applier:
    a = Applier(store, Journal(tmp_path / "journal"), DataVersions(), 0,  # type: ignore[arg-type]
                parked_dir=tmp_path / "parked", linger_seconds=linger, **kw)
    a.start()
    return a


@contextmanager
def running(store: Recorded, tmp_path: Path, linger: float, **kw: Any) -> Iterator[Applier]:
    a = applier(store, tmp_path, linger, **kw)
    try:
        yield a
    finally:
        a.stop(10)


def wait_until(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_groups_acknowledged_within_the_linger_are_one_write(store, tmp_path):
    with running(store, tmp_path, linger=0.6) as a:
        started = time.monotonic()
        a.enqueue(1, group(1))
        time.sleep(0.1)
        a.enqueue(2, group(2))
        a.enqueue(3, group(3))
        assert wait_until(a.caught_up, 30)
        waited = time.monotonic() - started
        assert store.writes == [3]  # one write, recording the last record applied
        assert waited >= 0.6 and a.applied_seq == 3
        assert store.count_events() == 15


def test_without_a_linger_each_waiting_group_is_written_at_once(store, tmp_path):
    with running(store, tmp_path, linger=0.0) as a:
        a.enqueue(1, group(1))
        assert wait_until(a.caught_up, 30)
        a.enqueue(2, group(2))
        assert wait_until(a.caught_up, 30)
        assert store.writes == [1, 2]


def test_a_reader_waiting_cuts_the_linger_short(store, tmp_path):
    with running(store, tmp_path, linger=60.0) as a:
        a.enqueue(1, group(1))
        started = time.monotonic()
        assert a.flush(timeout=30)  # read-your-writes: applied for the reader, not in 60 s
        assert time.monotonic() - started < 30 and store.count_events() == 5
        a.enqueue(2, group(2))
        time.sleep(0.2)
        assert not a.caught_up() and store.writes == [1]  # no reader: it lingers again


def test_a_backlog_at_the_write_bound_is_applied_without_lingering(store, tmp_path):
    with running(store, tmp_path, linger=60.0, max_rows=10) as a:
        a.enqueue(1, group(1))
        time.sleep(0.2)
        assert store.writes == []
        a.enqueue(2, group(2))  # 10 rows waiting: a full write
        assert wait_until(a.caught_up, 30) and store.writes == [2]


def test_stop_applies_what_lingers(store, tmp_path):
    a = applier(store, tmp_path, linger=60.0)
    a.enqueue(1, group(1))
    started = time.monotonic()
    assert a.stop(timeout=30) is True
    assert time.monotonic() - started < 30
    assert store.writes == [1] and store.count_events() == 5


def test_data_versions_are_the_latest_change_to_the_brands_on_the_days_read():
    """``DataVersions.version`` (every ETag, and a funnel's kept days once a day of its
    range) against the plain definition over random brand-days: the greatest sequence of the
    brands (all, some, unknown ones) on the days of ``[start, end)``, whether the range is
    shorter or longer than a brand's history."""
    import random
    from datetime import date, timedelta

    rng = random.Random(9)
    versions = DataVersions()
    changes: list[tuple[str, date, int]] = []
    for seq in range(1, 400):
        brand, day = rng.choice(["b1", "b2", "b3"]), date(2025, 1, 1) + timedelta(
            days=rng.randrange(40))
        changes.append((brand, day, seq))
        versions.bump([pa.table({"tenant_id": [brand], "occurred_at": [
            datetime(day.year, day.month, day.day, rng.randrange(24))]})], seq)
    for _ in range(300):
        brands = rng.choice([None, ("b1",), ("b2", "b3"), ("b1", "nobody")])
        start = datetime(2025, 1, 1) + timedelta(hours=rng.randrange(45 * 24))
        reads = None if rng.random() < 0.1 else \
            (start, start + timedelta(hours=rng.randrange(1, 60 * 24)))
        want = max((seq for brand, day, seq in changes
                    if (brands is None or brand in brands) and (
                        reads is None or reads[0].date() <= day
                        <= (reads[1] - timedelta(microseconds=1)).date())), default=0)
        assert versions.version(brands, reads) == want, (brands, reads)

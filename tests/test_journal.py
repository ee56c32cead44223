"""The write-ahead journal: framing, torn tails, corruption, segment release, replay."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from tally.errors import StoreUnavailable
from tally.ingest.journal import Journal
from tally.storage.base import IdempotencyRecord, WriteSet


def writes(n: int) -> WriteSet:
    return WriteSet(
        events=[pa.table({"x": list(range(n))})],
        idempotency=[IdempotencyRecord("c", f"k{n}", "h", '{"accepted":1}',
                                       datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None))],
    )


def test_round_trip(tmp_path: Path):
    journal = Journal(tmp_path)
    for seq in (1, 2, 3):
        journal.append(seq, writes(seq))
    journal.close()
    records = list(Journal(tmp_path).records())
    assert [r.seq for r in records] == [1, 2, 3]
    assert records[2].writes.events[0].column("x").to_pylist() == [0, 1, 2]
    assert records[2].writes.idempotency[0].key == "k3"


@pytest.mark.parametrize("cut", [1, 8, 15, 17, 40])
def test_a_torn_tail_is_cut_off(tmp_path: Path, cut: int):
    journal = Journal(tmp_path)
    journal.append(1, writes(1))
    first_record = journal.segments()[0].stat().st_size
    journal.append(2, writes(2))
    journal.close()
    segment = journal.segments()[0]
    data = segment.read_bytes()
    segment.write_bytes(data[:-cut])  # the crash hit the second append mid-write
    assert [r.seq for r in Journal(tmp_path).records()] == [1]
    assert segment.stat().st_size == first_record  # cut back to the last whole record
    assert [r.seq for r in Journal(tmp_path).records()] == [1]  # stable once cut


def test_a_flipped_byte_in_the_last_record_drops_only_it(tmp_path: Path):
    journal = Journal(tmp_path)
    journal.append(1, writes(1))
    journal.append(2, writes(2))
    journal.close()
    segment = journal.segments()[0]
    data = bytearray(segment.read_bytes())
    data[-3] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert [r.seq for r in Journal(tmp_path).records()] == [1]


def test_corruption_in_a_closed_segment_is_refused(tmp_path: Path):
    journal = Journal(tmp_path, segment_bytes=1)  # every append opens a new segment
    for seq in (1, 2, 3):
        journal.append(seq, writes(seq))
    journal.close()
    first = journal.segments()[0]
    data = bytearray(first.read_bytes())
    data[20] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(StoreUnavailable, match="corrupt"):
        list(Journal(tmp_path).records())


def test_release_deletes_only_fully_applied_closed_segments(tmp_path: Path):
    journal = Journal(tmp_path, segment_bytes=1)
    for seq in (1, 2, 3):
        journal.append(seq, writes(seq))
    assert len(journal.segments()) == 3
    journal.release(1)
    assert [r.seq for r in journal.records()] == [2, 3]
    journal.release(3)  # the open segment stays until clear()
    assert [r.seq for r in journal.records()] == [3]
    journal.clear()
    assert journal.segments() == []

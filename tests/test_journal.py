"""The write-ahead journal: framing, torn tails, corruption, segment release, replay."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from tally.errors import StoreUnavailable
from tally.ingest.journal import Journal, JournalUnavailable, frame
from tally.storage.base import IdempotencyRecord, WriteSet
from tests.fs import fill, tmpfs


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
    synced: list[list[Path]] = []  # the segments there when the store was made durable

    def durable() -> None:
        synced.append(journal.segments())

    journal.release(0, durable)
    assert synced == []  # nothing to forget: the store is not synced for nothing
    journal.release(1, durable)
    assert [r.seq for r in journal.records()] == [2, 3]
    assert len(synced) == 1 and len(synced[0]) == 3  # synced before a segment went
    journal.release(3, durable)  # the open segment stays until clear()
    assert [r.seq for r in journal.records()] == [3]

    def failing() -> None:
        raise OSError(5, "syncfs: Input/output error")

    with pytest.raises(OSError):
        journal.clear(failing)
    assert [r.seq for r in journal.records()] == [3]  # not synced: nothing forgotten
    # a sync that fails may have lost writes that a later one does not report (Linux tells
    # a write-back error once): this process forgets nothing more, even if one succeeds
    journal.append(4, writes(4))
    with pytest.raises(OSError, match="could not be synced earlier"):
        journal.release(4, durable)
    with pytest.raises(OSError, match="could not be synced earlier"):
        journal.clear(durable)
    assert [r.seq for r in journal.records()] == [3, 4] and len(synced) == 2
    restarted = Journal(tmp_path, segment_bytes=1)  # a restart replays them, then forgets
    assert [r.seq for r in restarted.records()] == [3, 4]
    restarted.clear(durable)
    assert restarted.segments() == [] and len(synced) == 3


def big_writes(rows: int) -> WriteSet:
    """A record of about ``rows`` × 1 KiB that does not compress away."""
    return WriteSet(events=[pa.table({"x": [os.urandom(512).hex() for _ in range(rows)]})])


def test_a_full_disk_refuses_the_append_and_leaves_no_trace(tmp_path: Path):
    """The 202-for-a-cut-record defect: a short write on a full disk was ignored. Now the
    append raises and the segment is cut back to its last whole record."""
    with tmpfs(tmp_path / "j", "2m") as directory:
        journal = Journal(directory)
        journal.append(1, big_writes(100))
        size = journal.segments()[0].stat().st_size
        with pytest.raises(JournalUnavailable, match="No space left"):
            journal.append(2, big_writes(3000))  # ~3 MB into ~1.8 MB left: a short write
        assert journal.segments()[0].stat().st_size == size
        assert not journal.writable() or journal.failure is not None
        journal.append(2, big_writes(100))  # fits: the same seq, right after record 1
        journal.close()
        records = list(Journal(directory).records())
        assert [r.seq for r in records] == [1, 2]
        assert all(r.writes.events[0].num_rows == 100 for r in records)


def test_the_journal_is_writable_again_once_space_is_freed(tmp_path: Path):
    with tmpfs(tmp_path / "j", "2m") as directory:
        journal = Journal(directory)
        filler = fill(directory, leave=64 * 1024)
        with pytest.raises(JournalUnavailable):
            journal.append(1, big_writes(500))
        assert journal.failure is not None and not journal.writable()
        filler.unlink()
        assert journal.writable()  # a probe write succeeds: ready again without a restart
        journal.append(1, big_writes(500))
        assert journal.failure is None
        journal.close()
        assert [r.seq for r in Journal(directory).records()] == [1]


def test_an_abandoned_segment_keeps_its_torn_tail_only_until_start_up(tmp_path: Path):
    """When even the undo fails, the segment is abandoned with a torn record whose seq the
    next segment retries: start-up cuts the tear and keeps both segments' whole records."""
    journal = Journal(tmp_path)
    journal.append(1, writes(1))
    good = journal.segments()[0].stat().st_size
    torn = frame(2, writes(2))
    with journal.segments()[0].open("ab") as segment:
        segment.write(torn[: len(torn) // 2])  # the failed append of seq 2, never undone
    journal.close()
    journal._open_segment(2)  # the writer retried seq 2 in a new segment
    journal.append(2, writes(2))
    journal.append(3, writes(3))
    journal.close()
    assert [r.seq for r in Journal(tmp_path).records()] == [1, 2, 3]
    assert journal.segments()[0].stat().st_size == good


def test_a_damaged_record_in_the_middle_of_a_segment_is_refused(tmp_path: Path):
    journal = Journal(tmp_path)
    for seq in (1, 2, 3):
        journal.append(seq, writes(seq))
    journal.close()
    segment = journal.segments()[0]
    data = bytearray(segment.read_bytes())
    second = len(frame(1, writes(1)))
    data[second + 20] ^= 0xFF  # record 2's body, with record 3 intact after it
    segment.write_bytes(bytes(data))
    with pytest.raises(StoreUnavailable, match="corrupt"):
        list(Journal(tmp_path).records())

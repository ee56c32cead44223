"""The write-ahead journal: a group of batches is durable once its record is fsynced here.

DuckDB commits cost a WAL flush each and stall for its automatic checkpoints (measured: over a
second at 10M stored events), so acknowledging after a DuckDB commit put those stalls in every
producer's latency. The writer instead appends one framed record per group here (Arrow IPC,
CRC-32 checked), fsyncs and acknowledges; the applier (``applier.py``) moves records into the
store in large transactions off the ack path, and at start-up every record not yet applied is
handed to it again.

A record is ``seq u64 | length u32 | crc32 u32 | msgpack{events, quarantine, idempotency}``.
Segments rotate at ``segment_bytes`` and are deleted once every record in them is applied.

The invariant that makes recovery safe: **a segment holds whole, acknowledged records followed
by at most one torn record, and nothing after it.** :meth:`Journal.append` writes every byte
(a short ``write`` is continued, never ignored) and fsyncs; if anything fails, the append is
undone (truncated back) before the error goes up — a full disk becomes a refusal, never a
``202`` for a cut record — and if even the undo fails the segment is abandoned, so the next
append starts a fresh one. A torn tail is therefore never followed by an acknowledged record,
and cutting it off at start-up loses nothing that was acknowledged.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import pyarrow as pa

from tally.errors import StoreUnavailable
from tally.storage.base import IdempotencyRecord, WriteSet

log = logging.getLogger(__name__)
FRAME = struct.Struct("<QII")
SEGMENT_BYTES = 64 * 1024 * 1024


class JournalUnavailable(StoreUnavailable):
    """An append could not be made durable; nothing of it remains in the journal."""


class _Body(msgspec.Struct, array_like=True):
    events: bytes
    quarantine: bytes
    idempotency: list[tuple[str, str, str, str, datetime]]


@dataclass(frozen=True)
class Record:
    seq: int
    writes: WriteSet


def _ipc(tables: list[pa.Table]) -> bytes:
    if not tables:
        return b""
    table = pa.concat_tables(tables)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return bytes(sink.getvalue())


def _tables(data: bytes) -> list[pa.Table]:
    return [pa.ipc.open_stream(data).read_all()] if data else []


def encode(writes: WriteSet) -> bytes:
    idem = [(r.client_id, r.key, r.body_sha256, r.response, r.created_at)
            for r in writes.idempotency]
    return msgspec.msgpack.encode(_Body(_ipc(writes.events), _ipc(writes.quarantine), idem))


def decode(data: bytes) -> WriteSet:
    body = msgspec.msgpack.decode(data, type=_Body)
    return WriteSet(_tables(body.events), _tables(body.quarantine),
                    [IdempotencyRecord(*r) for r in body.idempotency])


def frame(seq: int, writes: WriteSet) -> bytes:
    body = encode(writes)
    return FRAME.pack(seq, len(body), zlib.crc32(body)) + body


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a short write (a filling disk, a signal) is
    continued, and a write that makes no progress is an error, never a silent cut."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"write made no progress ({len(view)} bytes left)")
        view = view[written:]


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._file: int | None = None
        self._size = 0
        self.failure: str | None = None  # why the last append failed (None: it succeeded)
        self._failed_bytes = 0  # the size of that append
        # why the store could not be synced once (then never again in this process, below)
        self.unsynced: str | None = None
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._probe(0)  # a journal that cannot be written refuses to start, not to ack
        except OSError as exc:
            raise StoreUnavailable(
                f"journal {directory} is unusable: {exc.strerror or exc}") from None

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("seg-*.log"))

    @staticmethod
    def _first_seq(segment: Path) -> int:
        return int(segment.stem.removeprefix("seg-"))

    def append(self, seq: int, writes: WriteSet) -> None:
        """Write one record and fsync it; when this returns, the group survives a crash.
        Raises :class:`JournalUnavailable` with nothing of the record left behind."""
        data = frame(seq, writes)
        try:
            if self._file is None or self._size >= self.segment_bytes:
                self._open_segment(seq)
            assert self._file is not None
            write_all(self._file, data)
            os.fdatasync(self._file)
        except OSError as exc:
            self._undo()
            self.failure, self._failed_bytes = exc.strerror or str(exc), len(data)
            raise JournalUnavailable(f"the journal cannot be written: {self.failure}") from exc
        self._size += len(data)
        self.failure = None

    def _undo(self) -> None:
        """Cut the segment back to its last whole record; if that fails too, abandon the
        segment (its torn tail is cut at start-up) so no later record can follow the tear."""
        if self._file is None:
            return
        try:
            os.ftruncate(self._file, self._size)
            os.fdatasync(self._file)
        except OSError:
            log.warning("journal: could not cut a failed append; starting a new segment")
            self.close()

    def _open_segment(self, seq: int) -> None:
        self.close()
        path = self.directory / f"seg-{seq:020d}.log"
        # a segment named for this seq can only hold the remains of a failed first append of
        # it (seq is reused only after a failure): start it empty
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self._size = 0
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new file's name is durable too
        finally:
            os.close(directory)

    def writable(self) -> bool:
        """Whether appends work (for readiness): true unless the last one failed and the
        journal's file system still has no room for it or cannot take a probe write."""
        if self.failure is None:
            return True
        try:
            stat = os.statvfs(self.directory)
            if stat.f_bavail * stat.f_frsize < self._failed_bytes:
                return False
            self._probe(65536)
        except OSError:
            return False
        return True

    def _probe(self, size: int) -> None:
        """Write ``size`` bytes to a scratch file, fsync, remove it; OSError if it cannot."""
        probe = self.directory / ".probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_all(fd, b"\0" * size)
            os.fdatasync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    def records(self) -> Iterator[Record]:
        """Every intact record, oldest first; a torn tail of a segment is cut off. A bad
        record followed by a good one is corruption, not a tear: refused."""
        segments = self.segments()
        for number, segment in enumerate(segments):
            data = segment.read_bytes()
            offset = 0
            while offset < len(data):
                record = _record_at(data, offset)
                if record is None:
                    retried_as = (self._first_seq(segments[number + 1])
                                  if number + 1 < len(segments) else None)
                    _cut_torn_tail(segment, data, offset, retried_as)
                    break
                yield record
                offset += FRAME.size + FRAME.unpack_from(data, offset)[1]

    def release(self, applied_seq: int, durable: Callable[[], None]) -> None:
        """Delete closed segments whose records are all applied (seq ≤ ``applied_seq``),
        after ``durable()`` (the store's :meth:`~tally.storage.base.Backend.make_durable`)
        returned: a record is forgotten only once what it wrote survives a power loss."""
        segments = self.segments()
        done = [segment for segment, following in zip(segments, segments[1:], strict=False)
                if self._first_seq(following) - 1 <= applied_seq]
        if done:
            self._durable(durable)
        for segment in done:
            segment.unlink()

    def _durable(self, durable: Callable[[], None]) -> None:
        """``durable()``, once it has failed never again in this process: a failed sync
        leaves writes that may never reach the disk, and a later sync does not say so (Linux
        reports a write-back error once; the engine holds the lost rows as written, so they
        are not written again), so only a restart, replaying what the journal kept, makes
        them durable."""
        if self.unsynced is not None:
            raise OSError(f"the store could not be synced earlier ({self.unsynced}): the "
                          "journal keeps every record until a restart replays it")
        try:
            durable()
        except OSError as exc:
            self.unsynced = str(exc)
            raise

    def clear(self, durable: Callable[[], None]) -> None:
        """Delete every segment (all applied: after a clean stop with nothing pending), after
        ``durable()`` returned (as :meth:`release`)."""
        self.close()
        segments = self.segments()
        if segments:
            self._durable(durable)
        for segment in segments:
            segment.unlink()

    def close(self) -> None:
        if self._file is not None:
            try:
                os.close(self._file)
            except OSError:
                pass
            self._file = None
            self._size = 0


def _record_at(data: bytes, offset: int) -> Record | None:
    end = offset + FRAME.size
    if end > len(data):
        return None
    seq, length, crc = FRAME.unpack_from(data, offset)
    body = data[end:end + length]
    if len(body) != length or zlib.crc32(body) != crc:
        return None
    try:
        return Record(seq, decode(body))
    except (msgspec.DecodeError, pa.ArrowInvalid):
        return None


def _cut_torn_tail(segment: Path, data: bytes, offset: int, retried_as: int | None) -> None:
    """Truncate ``segment`` at ``offset`` if it is a torn append, else refuse: corruption.

    A torn append is the last thing in its segment. In a closed segment (``retried_as``: the
    first seq of the next one) it is also the append the writer retried there under the same
    seq, so a bad record whose intact header names another seq is damage to an acknowledged
    record, not a tear."""
    if retried_as is not None and offset + FRAME.size <= len(data):
        seq = FRAME.unpack_from(data, offset)[0]
        if seq != retried_as:
            raise StoreUnavailable(
                f"journal segment {segment} is corrupt at byte {offset} (record {seq} is "
                "damaged): restore it from a backup or move it aside to start")
    for start in range(offset + 1, len(data) - FRAME.size + 1):
        seq, length, crc = FRAME.unpack_from(data, start)
        body = data[start + FRAME.size:start + FRAME.size + length]
        if length and len(body) == length and zlib.crc32(body) == crc:
            raise StoreUnavailable(
                f"journal segment {segment} is corrupt at byte {offset} (record {seq} follows "
                "it intact): restore it from a backup or move it aside to start")
    log.warning("journal: cut a torn tail (an append that never completed)",
                extra={"segment": str(segment), "bytes": len(data) - offset})
    os.truncate(segment, offset)

"""The write-ahead journal: a group of batches is durable once its record is fsynced here.

DuckDB commits cost a WAL flush each and stall for its automatic checkpoints (measured: over a
second at 10M stored events), so acknowledging after a DuckDB commit put those stalls in every
producer's latency. The writer instead appends one framed record per group here (Arrow IPC,
CRC-32 checked), fsyncs and acknowledges; the applier (``applier.py``) moves records into DuckDB
in large transactions off the ack path, and at start-up every record not yet applied is replayed.

A record is ``seq u64 | length u32 | crc32 u32 | msgpack{events, quarantine, idempotency}``.
Segments rotate at ``segment_bytes`` and are deleted once every record in them is applied. A
torn record at the end of the last segment (a crash mid-append, never acknowledged) is cut off.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import pyarrow as pa

from tally.errors import StoreUnavailable
from tally.storage.base import IdempotencyRecord, WriteSet

FRAME = struct.Struct("<QII")
SEGMENT_BYTES = 64 * 1024 * 1024


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


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"journal {directory} is unusable: {exc}") from None
        self._file: int | None = None
        self._size = 0

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob("seg-*.log"))

    @staticmethod
    def _first_seq(segment: Path) -> int:
        return int(segment.stem.removeprefix("seg-"))

    def append(self, seq: int, writes: WriteSet) -> None:
        """Write one record and fsync it; when this returns, the group survives a crash."""
        body = encode(writes)
        if self._file is None or self._size >= self.segment_bytes:
            self._open_segment(seq)
        assert self._file is not None
        frame = FRAME.pack(seq, len(body), zlib.crc32(body)) + body
        os.write(self._file, frame)
        os.fdatasync(self._file)
        self._size += len(frame)

    def _open_segment(self, seq: int) -> None:
        if self._file is not None:
            os.close(self._file)
        path = self.directory / f"seg-{seq:020d}.log"
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = os.fstat(self._file).st_size
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)  # the new file's name is durable too
        finally:
            os.close(directory)

    def records(self) -> Iterator[Record]:
        """Every intact record, oldest first; a torn tail of the last segment is cut off."""
        segments = self.segments()
        for number, segment in enumerate(segments):
            data = segment.read_bytes()
            offset = 0
            while offset < len(data):
                end = offset + FRAME.size
                if end <= len(data):
                    seq, length, crc = FRAME.unpack_from(data, offset)
                    body = data[end:end + length]
                    if len(body) == length and zlib.crc32(body) == crc:
                        yield Record(seq, decode(body))
                        offset = end + length
                        continue
                if number != len(segments) - 1:
                    raise StoreUnavailable(f"journal segment {segment} is corrupt at {offset}")
                os.truncate(segment, offset)  # never acknowledged: the append did not finish
                break

    def release(self, applied_seq: int) -> None:
        """Delete closed segments whose records are all applied (seq ≤ ``applied_seq``)."""
        segments = self.segments()
        for segment, following in zip(segments, segments[1:], strict=False):
            if self._first_seq(following) - 1 <= applied_seq:
                segment.unlink()

    def clear(self) -> None:
        """Delete every segment (all applied: after start-up replay or a clean stop)."""
        self.close()
        for segment in self.segments():
            segment.unlink()

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

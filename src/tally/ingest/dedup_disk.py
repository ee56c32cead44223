"""Dedup past memory: the stored keys in sorted runs on disk, partitioned, mapped on demand.

The keys are the same 128-bit keyed hashes as :mod:`tally.ingest.dedup`. They are split into
``2**bits`` partitions by the top bits of ``id_hi`` (uniform: every partition holds ~1/P of the
keys). Each partition is a short list of sorted run files under ``<data-dir>/dedup/``::

    header page (magic, count, pages, CRC-32 of the rest) | hi[] | lo[] | fence[]

``hi`` and ``lo`` are padded to whole 4 KiB pages (512 keys); ``fence`` holds the first ``hi``
of each page. A lookup reads the fence (kept in RAM: 1/64 byte per key), then exactly one page
of ``hi`` through a read-only memory map, and one value of ``lo`` when ``hi`` matches. The
mapped pages a process touched count in its RSS until they are given back
(``MADV_DONTNEED``): the index tracks an estimate of them per run and gives back the least
recently used runs' pages once the estimate passes the budget. New keys go to a memtable (the
in-memory :class:`DedupIndex`) and to a write-ahead log (no fsync: it survives a ``kill -9``;
after a power loss the check below rebuilds); a full memtable is written as one run per
partition, and a partition's runs are merged while they are of similar size, up to a cap.

The index is derived data. ``manifest.json`` names the runs, the store it was built from (a
random id kept in the store's settings) and ``seq``, the last ingest seq whose keys are all in
the runs; the log carries the seq of each record after it. At open, the index is used only if
it belongs to this store and covers its ``max(ingest_seq)`` (and claims nothing past the
journal); every run file is read once and its CRC checked. Otherwise the index, or each
damaged partition, is rebuilt from the store (``Backend.event_keys``), in bounded memory.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tally.ingest.dedup import DedupIndex

log = logging.getLogger(__name__)
I64 = npt.NDArray[np.int64]
MAGIC = b"TALLYDD1"
HEADER = struct.Struct("<8sQQI")  # magic, count, pages, crc32 of everything after the page
PAGE = 4096
STRIDE = PAGE // 8  # keys per page of hi
WAL = struct.Struct("<4sBqI")  # magic, op, seq, count (then hi[], lo[], crc32)
WAL_MAGIC = b"TDW1"
ADD, DISCARD = 1, 2
_MAX = np.iinfo(np.int64).max
_SIGN = np.uint64(1 << 63)
STORE_ID_SETTING = "dedup_index_id"
DEFAULT_MEMORY_MB = 256
DEFAULT_BITS = 4  # 16 partitions


class KeyStore(Protocol):
    """What the index asks of a store: its keys, its last ingest seq, two settings."""

    def event_keys(self, chunk_rows: int) -> Iterator[tuple[Any, Any]]: ...
    def max_ingest_seq(self) -> int: ...
    def setting(self, name: str) -> str | None: ...
    def put_setting(self, name: str, value: str) -> None: ...


class Damaged(Exception):
    """A run file that is truncated, of another format, or whose checksum does not match."""


def partition_of(hi: I64, bits: int) -> npt.NDArray[np.int64]:
    """The partition of each key: the top ``bits`` of ``hi`` in unsigned order."""
    return ((np.asarray(hi, np.int64).view(np.uint64) ^ _SIGN)
            >> np.uint64(64 - bits)).astype(np.int64)


def write_run(path: Path, hi: I64, lo: I64) -> None:
    """Write sorted keys as a run file (atomically: temporary file, fsync, rename)."""
    n = len(hi)
    pages = -(-n // STRIDE)
    hi_p = np.full(pages * STRIDE, _MAX, dtype=np.int64)
    lo_p = np.zeros(pages * STRIDE, dtype=np.int64)
    hi_p[:n], lo_p[:n] = hi, lo
    fence = np.ascontiguousarray(hi_p[::STRIDE])
    crc = zlib.crc32(fence.data, zlib.crc32(lo_p.data, zlib.crc32(hi_p.data)))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, n, pages, crc).ljust(PAGE, b"\0"))
        for part in (hi_p, lo_p, fence):
            f.write(part.data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_run(path: Path) -> int:
    """The key count of a run file after reading all of it; :class:`Damaged` if it is not
    whole. Read through the page cache, not mapped: it costs no RSS."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGE)
            if len(head) < HEADER.size:
                raise Damaged(f"{path.name}: no header")
            magic, n, pages, crc = HEADER.unpack_from(head)
            if magic != MAGIC or pages != -(-n // STRIDE):
                raise Damaged(f"{path.name}: not a dedup run")
            if os.fstat(f.fileno()).st_size != PAGE + pages * (2 * PAGE + 8):
                raise Damaged(f"{path.name}: truncated or extended")
            got = 0
            while chunk := f.read(1 << 24):
                got = zlib.crc32(chunk, got)
    except OSError as exc:
        raise Damaged(f"{path.name}: {exc}") from None
    if got != crc:
        raise Damaged(f"{path.name}: checksum mismatch")
    return int(n)


class _MappedRun:
    """One run file, mapped read-only; its fence copied into RAM."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        _, n, pages, _ = HEADER.unpack_from(self.map)
        self.count, self.pages = int(n), int(pages)
        size = pages * STRIDE
        self.hi = np.frombuffer(self.map, np.int64, size, PAGE).reshape(pages, STRIDE)
        self.lo = np.frombuffer(self.map, np.int64, size, PAGE + size * 8)
        self.fence = np.frombuffer(self.map, np.int64, pages, PAGE + size * 16).copy()
        self.touched = 0  # estimated bytes of this map resident in the process

    def contains(self, hi: I64, lo: I64) -> npt.NDArray[np.bool_]:
        if not self.count:
            return np.zeros(len(hi), np.bool_)
        page = np.maximum(np.searchsorted(self.fence, hi, side="left") - 1, 0)
        rows = self.hi[page]  # one page of hi per query
        pos = page * STRIDE + (rows < hi[:, None]).sum(axis=1)
        flat = self.hi.reshape(-1)
        inside = pos < self.count
        cand = np.flatnonzero(inside & (flat[np.minimum(pos, self.count - 1)] == hi))
        self.touched += PAGE * (len(hi) + len(cand))
        found = np.zeros(len(hi), np.bool_)
        for i in cand:  # true duplicates (or a 64-bit half collision) only
            j = int(pos[i])
            while j < self.count and flat[j] == hi[i]:
                if self.lo[j] == lo[i]:
                    found[i] = True
                    break
                j += 1
        return found

    def release(self) -> None:
        """Give the mapped pages back (the kernel keeps them cached; our RSS drops)."""
        self.map.madvise(mmap.MADV_DONTNEED)
        self.touched = 0

    def keys(self) -> tuple[I64, I64]:
        return self.hi.reshape(-1)[:self.count].copy(), self.lo[:self.count].copy()

    def close(self) -> None:
        del self.hi, self.lo
        self.map.close()


class PartitionedDedupIndex:
    """The :class:`DedupIndex` interface (contains / add / discard / len) over disk runs,
    with resident memory bounded by ``memory_mb`` whatever the number of keys."""

    def __init__(self, folder: Path, memory_mb: int = DEFAULT_MEMORY_MB,
                 bits: int = DEFAULT_BITS) -> None:
        self.folder = folder
        self.bits = bits
        budget = max(memory_mb, 8) << 20
        self.memtable_keys = max(budget // 4 // 24, 1 << 14)  # sorted runs + argsort copies
        self.max_run = max(self.memtable_keys, budget // 4 // 48)  # a merge holds ~3 copies
        self.resident_budget = budget // 2
        self.store_id = ""
        self.seq = 0  # keys of every ingest seq ≤ this are in the runs
        self.wal_seq = 0  # and of every seq ≤ this in runs + memtable
        self._runs: list[list[tuple[str, int]]] = [[] for _ in range(1 << bits)]
        self._open: OrderedDict[str, _MappedRun] = OrderedDict()  # LRU: oldest first
        self._memtable = DedupIndex()
        self._tombstones: set[tuple[int, int]] = set()
        self._next_file = 0
        self._wal_gen = 0
        self._complete = True  # False while a rebuild fills the runs
        self._lock = threading.RLock()  # the writer adds, the applier discards
        self.rebuilt: list[str] = []  # why the last open rebuilt (tests, logs)

    # -- opening, checking, rebuilding -------------------------------------------------------

    @classmethod
    def open(cls, folder: Path, store: KeyStore, *, journal_last_seq: int = 0,
             memory_mb: int = DEFAULT_MEMORY_MB, bits: int = DEFAULT_BITS
             ) -> PartitionedDedupIndex:
        """The index of ``store``'s keys at ``folder``: reused when it is whole and current,
        else rebuilt (all of it, or the damaged partitions) from the store."""
        folder.mkdir(parents=True, exist_ok=True)
        index = cls(folder, memory_mb, bits)
        store_id = store.setting(STORE_ID_SETTING)
        if store_id is None:
            store.put_setting(STORE_ID_SETTING, secrets.token_hex(16))
            store_id = store.setting(STORE_ID_SETTING)
        assert store_id is not None
        store_seq = store.max_ingest_seq()
        why = index._load(store_id)
        if why is None:
            covered = max(index.seq, index.wal_seq)
            if covered < store_seq:
                why = f"index covers ingest seq {covered}, the store {store_seq}"
            elif covered > max(store_seq, journal_last_seq):
                why = f"index covers ingest seq {covered}, past the store and the journal"
        if why is not None:
            index._rebuild_all(store, store_id, store_seq, why)
            return index
        damaged = index._verify()
        if damaged:
            index._rebuild_partitions(store, damaged)
        index._remove_strays()
        return index

    def _load(self, store_id: str) -> str | None:
        """Read the manifest and replay the log; why the index cannot be used, or None."""
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except FileNotFoundError:
            return "no index yet"
        except (OSError, ValueError) as exc:
            return f"manifest unreadable: {exc}"
        if manifest.get("version") != 1 or manifest.get("bits") != self.bits:
            return "index of another format or partitioning"
        if manifest.get("store_id") != store_id:
            return "index of another store"
        if not manifest.get("complete"):
            return "a rebuild did not finish"
        self.store_id = store_id
        self.seq = self.wal_seq = int(manifest["seq"])
        self._runs = [[(str(name), int(n)) for name, n in part] for part in manifest["runs"]]
        self._tombstones = {(int(h), int(lo)) for h, lo in manifest["tombstones"]}
        self._next_file = int(manifest["next_file"])
        self._wal_gen = int(manifest["wal_gen"])
        self._replay_wal()
        return None

    def _replay_wal(self) -> None:
        path = self._wal_path()
        data = path.read_bytes() if path.exists() else b""
        offset = 0
        while offset + WAL.size <= len(data):
            magic, op, seq, n = WAL.unpack_from(data, offset)
            end = offset + WAL.size + 16 * n + 4
            if magic != WAL_MAGIC or end > len(data):
                break
            (crc,) = struct.unpack_from("<I", data, end - 4)
            if zlib.crc32(data[offset:end - 4]) != crc:
                break
            body = np.frombuffer(data, np.int64, 2 * n, offset + WAL.size)
            hi, lo = body[:n], body[n:]
            if op == ADD:
                self._add_memtable(hi, lo)
            else:
                self._discard_memory(hi, lo)
            self.wal_seq = max(self.wal_seq, seq)
            offset = end
        if offset < len(data):  # a torn tail (a power loss): cut; the seq check decides
            with open(path, "r+b") as f:
                f.truncate(offset)

    def _verify(self) -> set[int]:
        damaged: set[int] = set()
        for part, runs in enumerate(self._runs):
            for name, count in runs:
                try:
                    if verify_run(self.folder / name) != count:
                        raise Damaged(f"{name}: count differs from the manifest")
                except Damaged as exc:
                    log.warning("dedup index: damaged run", extra={"error": str(exc)})
                    damaged.add(part)
        return damaged

    def _rebuild_all(self, store: KeyStore, store_id: str, store_seq: int, why: str) -> None:
        log.info("dedup index: rebuilding from the store", extra={"reason": why})
        self.rebuilt.append(why)
        self.close()
        for path in self.folder.iterdir():
            if path.suffix in (".run", ".log", ".tmp"):
                path.unlink()
        self.store_id, self.seq, self.wal_seq = store_id, store_seq, store_seq
        self._runs = [[] for _ in range(1 << self.bits)]
        self._memtable, self._tombstones = DedupIndex(), set()
        self._complete = False
        self._fill(store, None)
        self._complete = True
        self.checkpoint()

    def _rebuild_partitions(self, store: KeyStore, parts: set[int]) -> None:
        why = f"damaged partitions {sorted(parts)}"
        log.warning("dedup index: rebuilding from the store", extra={"reason": why})
        self.rebuilt.append(why)
        for part in parts:
            self._runs[part] = []
        self._complete = False
        self._write_manifest()  # until the end, a crash means a full rebuild
        self._fill(store, parts)
        self._complete = True
        self.checkpoint()

    def _fill(self, store: KeyStore, parts: set[int] | None) -> None:
        """Stream the store's keys (of ``parts``, or all) into runs; memory stays bounded."""
        wanted = None if parts is None else np.array(sorted(parts), dtype=np.int64)
        for hi, lo in store.event_keys(1 << 20):
            hi, lo = np.asarray(hi, np.int64), np.asarray(lo, np.int64)
            if wanted is not None:
                keep = np.isin(partition_of(hi, self.bits), wanted)
                hi, lo = hi[keep], lo[keep]
            self._add_memtable(hi, lo)
            if len(self._memtable) >= self.memtable_keys:
                self._flush_memtable()

    def _remove_strays(self) -> None:
        named = {name for runs in self._runs for name, _ in runs}
        for path in self.folder.glob("*.run"):
            if path.name not in named:
                path.unlink()
        for path in self.folder.glob("*.tmp"):
            path.unlink()
        for path in self.folder.glob("wal-*.log"):
            if path != self._wal_path():
                path.unlink()

    # -- the interface the writer uses --------------------------------------------------------

    def __len__(self) -> int:
        stored = sum(n for runs in self._runs for _, n in runs)
        return stored + len(self._memtable) - len(self._tombstones)

    @property
    def run_count(self) -> int:
        return sum(len(runs) for runs in self._runs)

    def contains(self, hi: I64, lo: I64) -> npt.NDArray[np.bool_]:
        with self._lock:
            hi, lo = np.asarray(hi, np.int64), np.asarray(lo, np.int64)
            found = self._memtable.contains(hi, lo)
            parts = partition_of(hi, self.bits)
            order = np.argsort(parts, kind="stable")
            bounds = np.searchsorted(parts[order], np.arange((1 << self.bits) + 1))
            for part in np.flatnonzero(np.diff(bounds)):
                idx = order[bounds[part]:bounds[part + 1]]
                for name, _ in self._runs[part]:
                    todo = idx[~found[idx]]
                    if not len(todo):
                        break
                    found[todo] |= self._run(name).contains(hi[todo], lo[todo])
            if self._tombstones:
                for i in np.flatnonzero(found):
                    if (int(hi[i]), int(lo[i])) in self._tombstones:
                        found[i] = False
            self._bound_resident()
            return found

    def add(self, hi: Sequence[int] | I64, lo: Sequence[int] | I64, seq: int = 0) -> None:
        """Keys of journal record ``seq`` (journalled, so they will be stored)."""
        with self._lock:
            hi, lo = np.asarray(hi, np.int64), np.asarray(lo, np.int64)
            self._log(ADD, seq, hi, lo)
            self.wal_seq = max(self.wal_seq, seq)
            self._add_memtable(hi, lo)
            if len(self._memtable) >= self.memtable_keys:
                self.checkpoint()

    def discard(self, hi: Sequence[int] | I64, lo: Sequence[int] | I64) -> None:
        """Take keys back (events set aside when applied): a later event with one is new."""
        with self._lock:
            hi, lo = np.asarray(hi, np.int64), np.asarray(lo, np.int64)
            self._log(DISCARD, self.wal_seq, hi, lo)
            self._discard_memory(hi, lo)

    def load(self, chunks: Iterable[tuple[I64, I64]]) -> None:
        """Bulk-add keys that are already stored (tests, benchmarks): straight into runs."""
        for hi, lo in chunks:
            self._add_memtable(np.asarray(hi, np.int64), np.asarray(lo, np.int64))
            if len(self._memtable) >= self.memtable_keys:
                self._flush_memtable()
        self.checkpoint()

    def checkpoint(self) -> None:
        """Write the memtable as runs, then a manifest that covers them and a fresh log."""
        with self._lock:
            self._flush_memtable()
            self.seq = self.wal_seq
            old = self._wal_path()
            self._wal_gen += 1
            self._write_manifest()
            old.unlink(missing_ok=True)

    def close(self) -> None:
        """Checkpoint if anything is unwritten, and unmap every run."""
        with self._lock:
            if self.store_id and (len(self._memtable) or self.wal_seq != self.seq):
                self.checkpoint()
            for run in self._open.values():
                run.close()
            self._open.clear()

    def resident_estimate(self) -> int:
        """Bytes this index holds in the process: fences, touched mapped pages, memtable."""
        maps = sum(run.touched + run.fence.nbytes for run in self._open.values())
        return maps + 17 * len(self._memtable)

    # -- internals ----------------------------------------------------------------------------

    def _wal_path(self) -> Path:
        return self.folder / f"wal-{self._wal_gen}.log"

    def _log(self, op: int, seq: int, hi: I64, lo: I64) -> None:
        if not len(hi):
            return
        frame = WAL.pack(WAL_MAGIC, op, seq, len(hi)) + hi.tobytes() + lo.tobytes()
        fd = os.open(self._wal_path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:  # in the kernel once written: a kill -9 loses nothing (no fsync: see above)
            os.write(fd, frame + struct.pack("<I", zlib.crc32(frame)))
        finally:
            os.close(fd)

    def _add_memtable(self, hi: I64, lo: I64) -> None:
        if self._tombstones:
            self._tombstones.difference_update(zip(hi.tolist(), lo.tolist(), strict=True))
        self._memtable.add(hi, lo)

    def _discard_memory(self, hi: I64, lo: I64) -> None:
        self._tombstones.update(zip(hi.tolist(), lo.tolist(), strict=True))

    def _run(self, name: str) -> _MappedRun:
        run = self._open.get(name)
        if run is None:
            run = self._open[name] = _MappedRun(self.folder / name)
        else:
            self._open.move_to_end(name)
        return run

    def _bound_resident(self) -> None:
        if sum(run.touched for run in self._open.values()) <= self.resident_budget:
            return
        for run in self._open.values():  # oldest first, down to half the budget
            run.release()
            if sum(r.touched for r in self._open.values()) <= self.resident_budget // 2:
                break

    def _flush_memtable(self) -> None:
        if not len(self._memtable):
            return
        hi, lo = self._memtable.arrays()
        self._memtable = DedupIndex()
        parts = partition_of(hi, self.bits)
        order = np.lexsort((hi, parts))
        hi, lo, parts = hi[order], lo[order], parts[order]
        bounds = np.searchsorted(parts, np.arange((1 << self.bits) + 1))
        for part in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[part], bounds[part + 1]
            self._runs[part].append((self._new_run(int(part), hi[a:b], lo[a:b]), int(b - a)))
            self._merge(int(part))

    def _new_run(self, part: int, hi: I64, lo: I64) -> str:
        name = f"p{part:03x}-{self._next_file}.run"
        self._next_file += 1
        write_run(self.folder / name, hi, lo)
        return name

    def _merge(self, part: int) -> None:
        runs = self._runs[part]
        while len(runs) >= 2:
            (a, na), (b, nb) = runs[-2], runs[-1]
            if na > 2 * nb or na + nb > self.max_run:
                break
            (ahi, alo), (bhi, blo) = self._run(a).keys(), self._run(b).keys()
            cat_hi = np.concatenate((ahi, bhi))
            order = np.argsort(cat_hi, kind="stable")  # linear on two sorted runs
            merged = self._new_run(part, cat_hi[order], np.concatenate((alo, blo))[order])
            runs[-2:] = [(merged, na + nb)]
            for name in (a, b):  # unlinked after the manifest stops naming them
                self._open.pop(name).close()
            self._write_manifest()
            for name in (a, b):
                (self.folder / name).unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        manifest = {"version": 1, "bits": self.bits, "store_id": self.store_id,
                    "seq": self.seq, "runs": self._runs, "next_file": self._next_file,
                    "wal_gen": self._wal_gen, "complete": self._complete,
                    "tombstones": sorted(self._tombstones)}
        tmp = self.folder / "manifest.json.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / "manifest.json")
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

"""Server-side caches: encoded answers keyed by their ETag (which changes with the data an
answer reads, so ingestion invalidates entries without any bookkeeping), and partial results
keyed by the data version they were computed from (a funnel's whole days)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import datetime

import pyarrow as pa


class AnswerCache:
    """Answers by ETag for ``max_age`` seconds, least recently used out first."""

    def __init__(self, entries: int = 512) -> None:
        self._entries = entries
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, etag: str) -> bytes | None:
        with self._lock:
            item = self._items.get(etag)
            if item is None or item[0] < time.monotonic():
                self.misses += 1
                return None
            self._items.move_to_end(etag)
            self.hits += 1
            return item[1]

    def put(self, etag: str, content: bytes, max_age: int) -> None:
        with self._lock:
            self._items[etag] = (time.monotonic() + max_age, content)
            self._items.move_to_end(etag)
            while len(self._items) > self._entries:
                self._items.popitem(last=False)


# the data version of some brands (None: all) on the days of a range (None: any day): what a
# partial result is kept under (DataVersions.version)
DataVersion = Callable[[tuple[str, ...] | None, tuple[datetime, datetime] | None], int]


class PartCache:
    """Partial results (Arrow tables) kept by key, least recently used out first, at most
    ``max_bytes`` of them: a key names the data it was computed from (its data version), so a
    change to that data makes a new key and the old entry ages out."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[Hashable, pa.Table] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> pa.Table | None:
        with self._lock:
            table = self._items.get(key)
            if table is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return table

    def put(self, key: Hashable, table: pa.Table) -> None:
        size = table.get_total_buffer_size()
        with self._lock:
            if size > self._max_bytes:
                return
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.get_total_buffer_size()
            self._items[key] = table
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.get_total_buffer_size()

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

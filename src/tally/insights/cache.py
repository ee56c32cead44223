"""A small server-side cache of encoded answers, keyed by their ETag (which changes with the
data an answer reads, so ingestion invalidates entries without any bookkeeping)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


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

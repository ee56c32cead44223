"""Splitting a list of events into request bodies the server accepts.

A body holds at most ``max_events`` events and ``max_bytes`` bytes of JSON (the server's
``TALLY_MAX_BATCH_EVENTS`` and ``TALLY_MAX_BATCH_BYTES``, 10,000 and 10 MiB by default);
events keep their order, and each body remembers the index of its first event so that a
receipt's per-event errors can be given as indices into the caller's list. Every event is
encoded once: the bytes of a body are the bytes sent on every retry of it (the server compares
a repeated ``X-Idempotency-Key`` with a hash of the body).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

DEFAULT_MAX_EVENTS = 10_000
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Body:
    """One request body: ``count`` events starting at index ``first`` of the input."""

    first: int
    count: int
    content: bytes


def split(events: Iterable[Any], max_events: int = DEFAULT_MAX_EVENTS,
          max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Body]:
    """Bodies of at most ``max_events`` events and ``max_bytes`` bytes, in order (lazily: a
    generator of events is read as the bodies are sent). An event that alone is larger than
    ``max_bytes`` is a ``ValueError`` naming its index: no body could carry it."""
    if max_events < 1 or max_bytes < 3:
        raise ValueError("max_events must be at least 1 and max_bytes at least 3")
    parts: list[bytes] = []
    size = 2  # the brackets
    first = 0
    for index, event in enumerate(events):
        encoded = _encoder.encode(event)
        if len(encoded) + 2 > max_bytes:
            raise ValueError(f"event {index} is {len(encoded):,} bytes of JSON: over the "
                             f"{max_bytes:,}-byte batch limit on its own")
        if parts and (len(parts) == max_events or size + 1 + len(encoded) > max_bytes):
            yield Body(first, len(parts), _join(parts))
            first, parts, size = index, [], 2
        size += len(encoded) + (1 if parts else 0)
        parts.append(encoded)
    if parts:
        yield Body(first, len(parts), _join(parts))


def _join(parts: list[bytes]) -> bytes:
    return b"[" + b",".join(parts) + b"]"

"""Sending a list of events as batches: one idempotency key per batch, kept on its retries.

Each batch (:mod:`tally_client.batching`) gets its own ``X-Idempotency-Key`` — random, or
``<prefix>-<n>`` from a caller's prefix so that re-running the same ingestion after the
producer itself crashed replays the same keys — and keeps it, with the same bytes, on every
retry: a batch the server stored before the connection broke is answered with its first
receipt, never stored twice. Batches go one after another, in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from tally_client._exchange import Auth, Exchange, call
from tally_client._routes import batch
from tally_client.batching import Body, split
from tally_client.models import IngestResult, Receipt, RejectedEvent
from tally_client.retry import RetryPolicy

MAX_KEY = 255  # characters of X-Idempotency-Key the server takes


def batch_keys(prefix: str | None) -> Callable[[int], str]:
    if prefix is None:
        return lambda _: uuid.uuid4().hex
    if not prefix or len(prefix) > MAX_KEY - 11:
        raise ValueError(f"idempotency_key prefix must be 1..{MAX_KEY - 11} characters")
    return lambda n: f"{prefix}-{n}"


def send_one(events: Sequence[Any], key: str | None, auth: Auth,
             policy: RetryPolicy) -> Exchange[Receipt]:
    """``events`` as exactly one batch, not split (over the limits, the server's ``413``)."""
    body = Body(0, len(events), msgspec.json.encode(list(events)))
    receipt = yield from send_body(body, key or uuid.uuid4().hex, auth, policy)
    return receipt


def send_body(body: Body, key: str, auth: Auth, policy: RetryPolicy) -> Exchange[Receipt]:
    route = batch(body.content, key)
    receipt = yield from call(route.send, route.parse, auth, policy)
    return receipt


def ingest(events: Iterable[Any], max_events: int, max_bytes: int, key_prefix: str | None,
           auth: Auth, policy: RetryPolicy) -> Exchange[IngestResult]:
    key_for = batch_keys(key_prefix)
    receipts: list[Receipt] = []
    errors: list[RejectedEvent] = []
    for n, body in enumerate(split(events, max_events, max_bytes)):
        receipt = yield from send_body(body, key_for(n), auth, policy)
        receipts.append(receipt)
        errors += [RejectedEvent(index=body.first + e.index, detail=e.detail,
                                 event_id=e.event_id) for e in receipt.errors]
    return IngestResult(accepted=sum(r.accepted for r in receipts),
                        duplicates=sum(r.duplicates for r in receipts),
                        rejected=sum(r.rejected for r in receipts),
                        errors=errors, receipts=receipts)

"""Property: any interleaving of batches, retries, duplicates and restarts stores each event
exactly once, and the receipts add up. Real DuckDB, the real ingest service and writer."""

from __future__ import annotations

import asyncio
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.events.envelope import ValidationContext
from tally.ingest.service import IngestService
from tests.conftest import ON_CHDB, make_event
from tests.stores import open_test_store

POOL = [make_event(event_id=f"e{i % 12}", tenant_id=f"brand-{i % 2}") for i in range(24)]
# 24 events: 12 ids × 2 tenants, so equal event_ids under different tenants are distinct


def ctx() -> ValidationContext:
    return ValidationContext(received_at=datetime.now(UTC), served_regions=frozenset({"EU"}))


batch = st.lists(st.integers(0, len(POOL) - 1), min_size=0, max_size=10)
request = st.tuples(batch, st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])))
wave = st.lists(request, min_size=1, max_size=4)  # requests of a wave run concurrently
plan = st.lists(st.tuples(wave, st.booleans()), min_size=1, max_size=6)  # bool: restart after


async def run_wave(service: IngestService, wave_requests, replies) -> None:
    async def one(indices, key):
        body = json.dumps([POOL[i] for i in indices]).encode()
        try:
            receipt = await service.ingest(body, ctx(), "client-a", "trace", key)
        except Exception as exc:  # 422: same key, different body
            replies.append((indices, key, type(exc).__name__))
            return
        replies.append((indices, key, receipt))

    await asyncio.gather(*(one(indices, key) for indices, key in wave_requests))


# chDB opens and closes its engine at every restart of a plan: fewer plans there
@settings(max_examples=10 if ON_CHDB else 40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(plan)
def test_each_event_is_stored_exactly_once(steps):
    with tempfile.TemporaryDirectory() as tmp:
        backend = open_test_store(Path(tmp))
        service = IngestService(backend, Path(tmp) / "journal", 10_000)
        service.start()
        replies: list = []
        first_body_for_key: dict[str, list[int]] = {}
        for wave_requests, restart in steps:
            asyncio.run(run_wave(service, wave_requests, replies))
            if restart:
                service.stop()
                backend.close()
                backend = open_test_store(Path(tmp))
                service = IngestService(backend, Path(tmp) / "journal", 10_000)
                service.start()
        assert service.flush()
        rows = backend.query("SELECT tenant_id, event_id, count(*) AS n FROM events "
                             "GROUP BY ALL").to_pylist()
        service.stop()
        backend.close()

    # independent reference: what should be stored, and what each key's first body was
    sent = set()
    fresh_accepts = 0
    for indices, key, outcome in replies:
        body_ids = [(POOL[i]["tenant_id"], POOL[i]["event_id"]) for i in indices]
        if key is not None and key not in first_body_for_key and isinstance(outcome, dict):
            first_body_for_key[key] = indices
        if isinstance(outcome, str):  # refused: must be a key reused with another body
            assert outcome == "IdempotencyKeyReused" and key is not None
            continue
        if key is not None and first_body_for_key[key] is not indices:
            assert json.dumps(first_body_for_key[key]) == json.dumps(indices)
            continue  # a replay: its receipt is the first one's
        sent.update(body_ids)
        fresh_accepts += outcome["accepted"]
        assert outcome["accepted"] + outcome["duplicates"] == len(indices)
    assert all(row["n"] == 1 for row in rows)
    assert {(row["tenant_id"], row["event_id"]) for row in rows} == sent
    assert fresh_accepts == len(sent)

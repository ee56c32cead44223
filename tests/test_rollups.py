"""Rollups answer exactly what the events answer, are kept in the events' transaction, and are
back-filled for a store that predates them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tally.config import Settings
from tally.rollups.spec import GRAINS, compile_from_rollup
from tally.runtime import open_store
from tally.semantic.catalog import METRICS, Kind
from tally.semantic.compiler import Scope, compile_measures
from tally.storage.base import Backend
from tally.storage.factory import open_backend
from tests.conftest import bearer, make_event

ADDITIVE = [m for m in METRICS.values() if m.kind in (Kind.ADDITIVE, Kind.RATIO)]


def events(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        at = f"2025-10-{22 + rng.randrange(2)}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:07Z"
        brand, currency = rng.choice(["brand-1", "brand-2"]), rng.choice(["EUR", "GBP"])
        kind = rng.randrange(4)
        if kind == 0:
            payload = {"bet_id": f"b{i}", "stake_minor": rng.randrange(0, 900),
                       "win_minor": rng.randrange(0, 900), "currency": currency,
                       "game_id": rng.choice("gh"), "provider_id": rng.choice("pq"),
                       "commission_minor": rng.randrange(5)}
            out.append(make_event(occurred_at=at, tenant_id=brand, payload=payload))
        elif kind == 1:
            out.append(make_event(event_type="wallet.credit", occurred_at=at, tenant_id=brand,
                                  payload={"amount_minor": rng.randrange(1, 5000),
                                           "currency": currency,
                                           "reason": rng.choice(["deposit", "win"])}))
        elif kind == 2:
            out.append(make_event(event_type=rng.choice(["payment.intent", "payment.captured"]),
                                  occurred_at=at, tenant_id=brand,
                                  payload={"payment_id": f"p{i}", "amount_minor": 10,
                                           "currency": currency, "method": rng.choice("xy")}))
        else:
            out.append(make_event(event_type="bonus.consumed", occurred_at=at, tenant_id=brand,
                                  payload={"bonus_id": f"o{i}", "amount_minor": 7,
                                           "currency": currency}))
    return out


def sorted_rows(backend: Backend, compiled) -> list[tuple]:
    table = backend.execute(compiled.tree, compiled.params)
    return sorted(tuple(str(v) for v in row.values()) for row in table.to_pylist())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Backend]:
    from fastapi.testclient import TestClient

    from tally.api.app import create_app

    settings = Settings(data_dir=tmp_path_factory.mktemp("rollups"), regions="EU")
    with TestClient(create_app(settings)) as client:
        headers = bearer(client, settings.data_dir, "events:write")
        batch = events(3000, 1)
        for part in (batch[:1500], batch[1000:], batch[2500:]):  # overlaps: duplicates
            r = client.post("/v1/events:batch", json=part, headers=headers)
            assert r.status_code == 202
    store = open_store(settings)
    yield store
    store.close()


@pytest.mark.parametrize("metric", ADDITIVE, ids=lambda m: m.name)
@pytest.mark.parametrize("step", [300, 3600, 86400])
@pytest.mark.parametrize("group_by", [(), ("brand_id",), ("currency",), ("game_id",),
                                      ("provider_id", "brand_id")])
@pytest.mark.parametrize("filters", [{"region": ("EU",)}, {"game_id": ("g",)}],
                         ids=["region", "game"])
def test_rollup_answers_equal_event_answers(store, metric, step, group_by, filters):
    """Queries naming a game or provider read the full rollup, the others the narrow one;
    either answers what the events answer."""
    group_by = tuple(g for g in group_by if g in metric.dimensions)
    if any(k not in metric.dimensions for k in filters):
        filters = {}
    scope = Scope(datetime(2025, 10, 22), datetime(2025, 10, 24), step, filters, group_by)
    from_rollup = compile_from_rollup(metric, scope, by_currency=True)
    assert from_rollup is not None
    names_game = bool({"game_id", "provider_id"} & set(scope.keys))
    assert ("_narrow" in from_rollup.sql("duckdb")) is not names_game
    assert sorted_rows(store, from_rollup) == sorted_rows(
        store, compile_measures(metric, scope, by_currency=True))


def test_unaligned_ranges_fall_back_to_events():
    scope = Scope(datetime(2025, 10, 22, 0, 0, 30), datetime(2025, 10, 23), 300, {}, ())
    assert compile_from_rollup(METRICS["ggr"], scope, by_currency=True) is None


def test_rollups_are_much_smaller_than_the_events(store):
    events_rows = store.query("SELECT count(*) FROM events").column(0)[0].as_py()
    day_rows = store.query("SELECT count(*) FROM rollup_1d").column(0)[0].as_py()
    assert events_rows == 3000 and day_rows < events_rows / 10
    for grain in GRAINS:  # bets of 2 games × 2 providers summed in one row
        full, narrow = (store.query(f"SELECT count(*) FROM {t} WHERE event_type = "
                                    f"'bet.settled'").column(0)[0].as_py()
                        for t in (f"rollup_{grain}", f"rollup_{grain}_narrow"))
        assert 0 < narrow < full


def test_a_store_without_rollups_is_back_filled(tmp_path: Path):
    settings = Settings(data_dir=tmp_path, regions="EU")
    # a store from before rollups existed
    old = open_backend(settings.store, tmp_path, derived=lambda dialect: [])
    from tally.ingest.service import IngestService

    service = IngestService(old, tmp_path / "journal", 10_000)
    service.start()
    from concurrent.futures import wait
    from datetime import UTC

    from tally.events.envelope import ValidationContext

    ctx = ValidationContext(datetime.now(UTC), frozenset({"EU"}))
    wait([service.submit(json.dumps(events(500, 2)).encode(), ctx, "c", "t")])
    service.stop()
    old.close()
    store = open_store(settings)
    for grain in GRAINS:
        total = store.query(f"SELECT sum(stake_sum), sum(bet_count) FROM rollup_{grain}")
        raw = store.query("SELECT sum(stake_minor), count(*) FROM events "
                          "WHERE event_type = 'bet.settled'")
        assert list(total.to_pylist()[0].values()) == list(raw.to_pylist()[0].values())
    from tally.rollups.activity import compile_active_from_rollup
    from tally.semantic.compiler import compile_active

    scope = Scope(datetime(2025, 10, 22), datetime(2025, 10, 24), 86400, {}, ("brand_id",))
    backfilled = sorted_rows(store, compile_active_from_rollup(scope, 60, True))
    assert backfilled and backfilled == sorted_rows(store, compile_active(scope, 60, True))
    store.close()


def session_events(seed: int) -> list[list[dict]]:
    """Sessions whose start and end arrive in different batches, in either order."""
    rng = random.Random(seed)
    first, second = [], []
    for i in range(300):
        day = 22 + rng.randrange(2)
        start = make_event(event_type="session.started", tenant_id=rng.choice(["b1", "b2"]),
                           player_id=f"p{rng.randrange(80)}",
                           occurred_at=f"2025-10-{day}T{rng.randrange(24):02d}:00:00Z",
                           payload={"session_id": f"s{i}"})
        end = make_event(event_type="session.ended", tenant_id=start["tenant_id"],
                         player_id=start["player_id"],
                         occurred_at=f"2025-10-{day}T23:59:00Z",
                         payload={"session_id": f"s{i}", "duration_sec": rng.randrange(0, 400)})
        order = rng.randrange(3)  # together, start first, or end first
        if order == 0:
            first += [start, end]
        elif order == 1:
            first.append(start)
            second.append(end)
        else:
            first.append(end)
            second.append(start)
        if rng.random() < 0.2:  # some players also bet
            second.append(make_event(event_type="bet.placed", tenant_id=start["tenant_id"],
                                     player_id=f"q{rng.randrange(40)}",
                                     occurred_at=f"2025-10-{day}T12:00:00Z",
                                     payload={"bet_id": f"x{i}", "stake_minor": 1,
                                              "currency": "EUR", "game_id": "g",
                                              "provider_id": "p"}))
    return [first, second]


@pytest.mark.parametrize(("threshold", "step"), [(0, 86400), (60, 3600), (120, 300),
                                                 (399, 60), (400, 86400), (60, 7200)])
@pytest.mark.parametrize("distinct", [True, False])
def test_activity_rollup_equals_events_for_any_threshold(tmp_path: Path, threshold, step,
                                                         distinct):
    from concurrent.futures import wait
    from datetime import UTC

    from tally.events.envelope import ValidationContext
    from tally.ingest.service import IngestService
    from tally.rollups.activity import compile_active_from_rollup
    from tally.semantic.compiler import compile_active

    store = open_store(Settings(data_dir=tmp_path, regions="EU"))
    service = IngestService(store, tmp_path / "journal", 10_000)
    service.start()
    try:
        ctx = ValidationContext(datetime.now(UTC), frozenset({"EU"}))
        for batch in session_events(threshold):
            wait([service.submit(json.dumps(batch).encode(), ctx, "c", "t")])
        assert service.flush()
        scope = Scope(datetime(2025, 10, 22), datetime(2025, 10, 24), step, {},
                      ("brand_id",))
        rollup = compile_active_from_rollup(scope, threshold, distinct)
        assert rollup is not None
        got = sorted_rows(store, rollup)
        assert got == sorted_rows(store, compile_active(scope, threshold, distinct))
        assert len(got) > 1
    finally:
        service.stop()
        store.close()

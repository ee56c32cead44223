"""Timeseries paging reads only the page's buckets (issue 9 item 5), and the group limits.

A page of ``limit`` points at offset ``o`` over ``G`` groups lies in buckets ``o // G …
(o + limit − 1) // G``; the API queries only those. Every page walk here is checked against
the single-page answer, which is checked against the plain-Python reference
(``tests/reference.py``), for every kind of metric: sums, money converted per bucket, ratios,
percentiles, distinct players and the trailing wau window (whose buckets read days before
the page). A 1m series over many groups with ``limit=1`` builds a handful of points, not the
whole series (measured with ``tracemalloc``).
"""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tally.insights.request import MAX_GROUPS
from tests import reference as ref
from tests.conftest import bearer

TS = "/v1/analytics/timeseries"
SLICE = "/v1/analytics/slice"
BATCH = "/v1/events:batch"
DAY0 = datetime(2025, 11, 1, tzinfo=UTC)
PROVIDERS = ("studio_x", "reelworks", "luckyjack")
GAMES = {f"g_{i:02d}": PROVIDERS[i % 3] for i in range(15)}
RATES = [{"date": "2025-10-31", "currency": "GBP", "rate": "1.1412"},
         {"date": "2025-11-04", "currency": "GBP", "rate": "1.1538"}]
APPROX = {"rtp", "deposits_success", "settle_lag_p95", "webhook_lag_p95"}


def stamp(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class Events:
    """Nine days of two brands in two regions, 15 games, two currencies."""

    def __init__(self, seed: int = 9) -> None:
        self.rng = random.Random(seed)
        self.out: list[dict[str, Any]] = []

    def emit(self, kind: str, t: datetime, player: tuple[str, str, str, str],
             payload: dict[str, Any]) -> None:
        pid, brand, region, _ = player
        lag = timedelta(milliseconds=self.rng.randint(20, 4000))
        self.out.append({
            "event_id": f"e{len(self.out)}", "event_type": kind, "occurred_at": stamp(t),
            "ingested_at": stamp(t + lag), "tenant_id": brand, "region": region,
            "player_id": pid, "trace_id": "t", "schema_version": "1.3.0", "payload": payload})

    def session(self, player: tuple[str, str, str, str], start: datetime) -> None:
        rng, currency = self.rng, player[3]
        sid = f"s{len(self.out)}"
        duration = rng.choice([30, 90, 600, 1800])
        self.emit("session.started", start, player, {"session_id": sid, "device": "mobile"})
        if rng.random() < 0.3:
            pay = {"payment_id": f"pay{len(self.out)}", "amount_minor": rng.randint(500, 5000),
                   "currency": currency, "method": rng.choice(["card", "paypal", "trustly"])}
            self.emit("payment.intent", start + timedelta(seconds=5), player, pay)
            if rng.random() < 0.8:
                self.emit("payment.captured", start + timedelta(seconds=9), player, pay)
                self.emit("wallet.credit", start + timedelta(seconds=10), player,
                          {"amount_minor": pay["amount_minor"], "currency": currency,
                           "reason": "deposit"})
        for _ in range(rng.randint(0, 4)):
            game = rng.choice(sorted(GAMES))
            stake = rng.choice([0, 50, 100, 250])
            bet = {"bet_id": f"b{len(self.out)}", "stake_minor": stake, "currency": currency,
                   "game_id": game, "provider_id": GAMES[game]}
            placed = start + timedelta(seconds=rng.randint(1, duration))
            self.emit("bet.placed", placed, player, bet)
            win = rng.choice([0, 0, stake, stake * 3])
            self.emit("bet.settled", placed + timedelta(seconds=rng.randint(1, 400)), player,
                      {**bet, "win_minor": win})
        self.emit("session.ended", start + timedelta(seconds=duration), player,
                  {"session_id": sid, "duration_sec": duration})


def dataset() -> list[dict[str, Any]]:
    events = Events()
    players = [(f"p{i}", f"brand-{i % 2 + 1}", "UK" if i % 3 == 0 else "EU",
                "GBP" if i % 3 == 0 else "EUR") for i in range(24)]
    for day in range(9):
        for player in players:
            for _ in range(events.rng.choice([0, 1, 1, 2])):
                events.session(player, DAY0 + timedelta(days=day,
                                                        seconds=events.rng.randint(0, 86_000)))
    return events.out


SENT = dataset()


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params=params, headers=self.headers)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("paging") / "data", regions="EU,UK")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        assert client.post("/v1/admin/fx-rates", json=RATES, headers=headers).status_code == 200
        for i in range(0, len(SENT), 5000):
            r = client.post(BATCH, json=SENT[i:i + 5000], headers=headers)
            assert r.status_code == 202 and r.json()["rejected"] == 0, r.text
        yield Api(client, headers)


def walk(api: Api, params: dict[str, Any], limit: int, pages: int | None = None) \
        -> list[dict[str, Any]]:
    """The points of the first ``pages`` pages (all: None), following ``next_cursor``."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(pages or 10_000):
        r = api.get(TS, **params, limit=limit, **({"cursor": cursor} if cursor else {}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["series"]) == limit or body["next_cursor"] is None
        out += body["series"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    return out


def same(actual: list[dict[str, Any]], expected: list[dict[str, Any]], metric: str) -> None:
    field = ref.answer_field(metric)
    assert [{k: v for k, v in p.items() if k != field} for p in actual] == \
        [{k: v for k, v in p.items() if k != field} for p in expected]
    for got, want in zip(actual, expected, strict=True):
        if metric in APPROX and want[field] is not None:
            assert got[field] == pytest.approx(want[field], rel=1e-9), (got, want)
        else:
            assert got[field] == want[field], (got, want)


CASES = [  # metric, granularity, from, to, group_by, currency
    ("bets", "1h", "2025-11-03", "2025-11-05", "game_id", None),
    ("ggr", "1h", "2025-11-03", "2025-11-05", "game_id,currency", "GBP"),
    ("rtp", "5m", "2025-11-04T08:00:00Z", "2025-11-04T14:00:00Z", "provider_id,brand_id",
     None),
    ("settle_lag_p95", "1h", "2025-11-02", "2025-11-03", "game_id", None),
    ("webhook_lag_p95", "1h", "2025-11-02", "2025-11-04", "brand_id,region", None),
    ("deposits_success", "1h", "2025-11-02", "2025-11-04", "method,brand_id", None),
    ("dau", "1h", "2025-11-05", "2025-11-07", "brand_id,region", None),
    ("wau", "1d", "2025-11-06", "2025-11-10", "brand_id,region", None),
    ("bets", "1m", "2025-11-04T10:00:00Z", "2025-11-04T16:00:00Z", "game_id", None),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-by-{c[4]}" for c in CASES])
def test_pages_over_many_groups_concatenate_to_the_single_page_answer(api, case):
    metric, granularity, start, end, group_by, currency = case
    params = {"metric": metric, "granularity": granularity, "from": start, "to": end,
              "group_by": group_by, **({"currency": currency} if currency else {})}
    whole = walk(api, params, 10_000)
    expected = ref.timeseries(SENT, RATES, metric, granularity, start, end, None,
                              group_by.split(","), currency or ref.BASE)
    groups = {tuple(p[k] for k in group_by.split(",")) for p in expected}
    assert len(groups) >= 4 and len(expected) < 10_000, (len(groups), len(expected))
    same(whole, expected, metric)
    size = len(groups)
    wide = len(whole) // 9 + 1
    wide += wide % size == 0  # never a whole number of buckets
    # pages inside one bucket, straddling two (the first 20), then ~9 pages to the end
    for limit, pages in ((size // 2 - 1, 7), (size + 1, 20), (wide, None)):
        got = walk(api, params, limit, pages)
        assert got == whole[:len(got)], limit
        assert pages is not None or len(got) == len(whole)


def test_a_page_past_the_end_is_empty_without_a_cursor(api):
    params = {"metric": "bets", "granularity": "1h", "from": "2025-11-03", "to": "2025-11-04",
              "group_by": "game_id"}
    total = len(walk(api, params, 10_000))
    first = api.get(TS, **params, limit=total - 1).json()
    last = api.get(TS, **params, limit=total - 1, cursor=first["next_cursor"]).json()
    assert len(last["series"]) == 1 and last["next_cursor"] is None


def test_a_range_without_data_has_no_points(api):
    for group_by in ({}, {"group_by": "game_id"}):
        r = api.get(TS, metric="bets", granularity="1h", **{"from": "2025-12-01",
                                                             "to": "2025-12-02"}, **group_by)
        assert r.status_code == 200 and r.json()["series"] == [] and \
            r.json()["next_cursor"] is None


# --------------------------------------------------------------------------- size


def test_one_point_of_a_1m_series_over_many_groups_is_built_alone(tmp_path):
    """7 days at 1m × 40 games is 403,200 points: ``limit=1`` must not build them all."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU")
    games = [f"g{i:02d}" for i in range(40)]
    sent = [{"event_id": f"e{i}", "event_type": "bet.settled",
             "occurred_at": stamp(DAY0 + timedelta(minutes=251 * i)), "tenant_id": "brand-1",
             "region": "EU", "player_id": "p1", "trace_id": "t", "schema_version": "1.3.0",
             "payload": {"bet_id": f"b{i}", "stake_minor": 100, "win_minor": 0,
                         "currency": "EUR", "game_id": games[i % 40], "provider_id": "x"}}
            for i in range(80)]
    params = {"metric": "bets", "granularity": "1m", "from": "2025-11-01",
              "to": "2025-11-08", "group_by": "game_id"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        assert client.post(BATCH, json=sent, headers=headers).status_code == 202
        api = Api(client, headers)
        tracemalloc.start()
        try:
            r = api.get(TS, **params, limit=1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 200, r.text
        assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB for one point"
        first_page = api.get(TS, **params, limit=10_000).json()
        assert walk(api, params, 1, pages=60) == first_page["series"][:60]
        # the first 25 minutes, every game in each: only the first bet falls in them
        minute = {(e["payload"]["game_id"], e["occurred_at"][:16]) for e in sent}
        expected = [{"ts": f"2025-11-01T00:{m:02d}:00Z", "game_id": g,
                     "value": int((g, f"2025-11-01T00:{m:02d}") in minute)}
                    for m in range(25) for g in games]
        assert first_page["series"][:1000] == expected


# --------------------------------------------------------------------------- group limits


def test_more_groups_than_the_limit_is_422_naming_it_and_a_filter_answers(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU")
    sent = [{"event_id": f"e{i}", "event_type": "bet.settled",
             "occurred_at": stamp(DAY0 + timedelta(seconds=7 * i)), "tenant_id": "brand-1",
             "region": "EU", "player_id": f"p{i % 50}", "trace_id": "t",
             "schema_version": "1.3.0",
             "payload": {"bet_id": f"b{i}", "stake_minor": 100, "win_minor": 0,
                         "currency": "EUR", "game_id": f"g{i:05d}", "provider_id": "x"}}
            for i in range(MAX_GROUPS + 1)]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        for batch in (sent[:6000], sent[6000:]):
            assert client.post(BATCH, json=batch, headers=headers).status_code == 202
        api = Api(client, headers)
        day = {"from": "2025-11-01", "to": "2025-11-02"}
        for path, params in ((TS, {"metric": "bets", "granularity": "1d",
                                   "group_by": "game_id"}),
                             (SLICE, {"metric": "bets", "dim": "game_id"})):
            r = api.get(path, **params, **day)
            assert r.status_code == 422, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            body = r.json()
            assert (body["limit"], body["max_groups"]) == ("max_groups", MAX_GROUPS)
            assert f"{MAX_GROUPS} groups" in body["detail"] and "filter" in body["detail"]
            narrowed = api.get(path, **params, **day, filters="game_id:g00001,game_id:g00002")
            assert narrowed.status_code == 200, narrowed.text
        r = api.get(TS, metric="bets", granularity="1d", **day)
        assert r.json()["series"] == [{"ts": "2025-11-01T00:00:00Z", "value": MAX_GROUPS + 1}]
        # a range with at most MAX_GROUPS of them present is answered
        r = api.get(SLICE, metric="bets", dim="game_id", limit=3,
                    **{"from": "2025-11-01", "to": "2025-11-01T12:00:00Z"})
        assert r.status_code == 200 and len(r.json()["items"]) == 3

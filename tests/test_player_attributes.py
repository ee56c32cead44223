"""``device`` and ``geo`` as player attributes (CONTRACT §4): the ``device`` and ``country`` of
the player's first ``player.registered`` by ``occurred_at``, joined per (brand, player) to
whatever event a metric counts, in timeseries, slice, funnel, retention and LTV.

A small store of hand-made players; every expected number is worked out by hand in the
comments and also compared with the plain-Python references (``tests/reference.py``,
``tests/cohort_reference.py``), which read the contract's words, not the code.

    pa  registered 10-01 09:00 mobile/GB, again 10-02 desktop/FR (a later one: ignored)
    pb  registered 10-01 10:00 desktop/DE; a late batch brings 09-30 tablet/AT (moves back)
    pc  two registrations at 10-01 11:00: r-c2 mobile/IT sent first, r-c1 tv/ES sent later
        (equal instants: the smaller event_id, r-c1, wins)
    pd  no registration: neither attribute
    pe  registered 10-01 12:00 with a country only (GB): no device
    pa of brand b-other: registered tv/US — another player (units are per brand)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import duckdb
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.cohorts import funnel as funnel_
from tally.config import Settings
from tests import cohort_reference as cref
from tests import reference as ref
from tests.conftest import bearer, on_duckdb_only
from tests.test_cohorts import assert_answer, ev

TS, SLICE = "/v1/analytics/timeseries", "/v1/analytics/slice"
FUNNEL, RETENTION, LTV = "/v1/analytics/funnel", "/v1/analytics/retention", "/v1/analytics/ltv"
B, OTHER = "b-attr", "b-other"


def registered(at: str, player: str, brand: str = B, eid: str | None = None,
               **payload: str) -> dict[str, Any]:
    return ev("player.registered", at, player, brand, eid=eid, **payload)


def bet(at: str, player: str, stake: int, win: int, brand: str = B) -> list[dict[str, Any]]:
    """A placement one minute before ``at`` and its settlement at ``at``."""
    before = ref.parse_time(at) - timedelta(minutes=1)
    placed = ev("bet.placed", before.strftime("%Y-%m-%dT%H:%M:%SZ"), player, brand,
                stake_minor=stake)
    bet_id = placed["payload"]["bet_id"]
    return [placed, ev("bet.settled", at, player, brand, bet_id=bet_id, stake_minor=stake,
                       win_minor=win)]


FIRST = [
    registered("2025-10-01T09:00:00Z", "pa", device="mobile", country="GB"),
    registered("2025-10-02T09:00:00Z", "pa", device="desktop", country="FR"),
    registered("2025-10-01T10:00:00Z", "pb", device="desktop", country="DE"),
    registered("2025-10-01T11:00:00Z", "pc", eid="r-c2", device="mobile", country="IT"),
    registered("2025-10-01T12:00:00Z", "pe", country="GB"),
    registered("2025-10-01T09:00:00Z", "pa", OTHER, device="tv", country="US"),
    *bet("2025-10-02T12:00:00Z", "pa", 100, 50), *bet("2025-10-02T12:10:00Z", "pa", 100, 50),
    *bet("2025-10-02T12:20:00Z", "pb", 300, 0), *bet("2025-10-02T12:30:00Z", "pc", 200, 400),
    *bet("2025-10-02T12:40:00Z", "pd", 50, 0), *bet("2025-10-02T12:50:00Z", "pe", 70, 70),
    *bet("2025-10-02T12:00:00Z", "pa", 1000, 0, OTHER),
    # payments: one of pa, one without a player (it has no attributes)
    ev("payment.intent", "2025-10-02T13:00:00Z", "pa", B, payment_id="P1"),
    ev("payment.captured", "2025-10-02T13:00:05Z", "pa", B, payment_id="P1"),
    ev("payment.intent", "2025-10-02T13:10:00Z", None, B, payment_id="P2"),
    ev("payment.captured", "2025-10-02T13:10:05Z", None, B, payment_id="P2"),
    # the watermark: days up to 10-04 are finished
    *bet("2025-10-05T12:00:00Z", "pd", 10, 0),
]
LATE = [registered("2025-10-01T11:00:00Z", "pc", eid="r-c1", device="tv", country="ES"),
        registered("2025-09-30T10:00:00Z", "pb", device="tablet", country="AT")]
SENT = FIRST + LATE
DAY2 = {"from": "2025-10-02", "to": "2025-10-03"}


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]

    def get(self, path: str, **params: str) -> Any:
        r = self.client.get(path, params=params, headers=self.headers)
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(path, json=body, headers=self.headers)

    def send(self, events: list[dict[str, Any]]) -> None:
        r = self.client.post("/v1/events:batch", json=events, headers=self.headers)
        assert r.status_code == 202 and r.json()["rejected"] == 0, r.text


def bets_by_device(api: Api, brand: str = B) -> dict[Any, int]:
    series = api.get(TS, metric="bets", granularity="1d", group_by="device",
                     filters=f"brand_id:{brand}", **DAY2)["series"]
    return {p["device"]: p["value"] for p in series}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("attributes") / "data", regions="EU")


@pytest.fixture(scope="module")
def api(store: Settings) -> Iterator[Api]:
    with TestClient(create_app(store), raise_server_exceptions=False) as client:
        api = Api(client, bearer(client, store.data_dir))
        api.send(FIRST)
        # before the late batch: pb is desktop (10-01 10:00), pc mobile (r-c2, the only one).
        # This answer is cached: the late registrations lie outside its range, and must
        # still change it (regression: its ETag followed only the range's days)
        assert bets_by_device(api) == {"desktop": 1, "mobile": 3, None: 2}
        api.send(LATE)
        yield api


def test_a_late_earlier_registration_moves_the_attributes_back_and_ties_go_by_event_id(api):
    # pa mobile (2 bets; its 10-02 re-registration changes nothing), pb tablet (the late
    # 09-30 one), pc tv (r-c1 < r-c2), pd and pe have no device; sorted, null last
    assert list(bets_by_device(api).items()) == \
        [("mobile", 2), ("tablet", 1), ("tv", 1), (None, 2)]
    assert bets_by_device(api) == {
        p["device"]: p["value"] for p in ref.timeseries(
            SENT, [], "bets", "1d", DAY2["from"], DAY2["to"], {"brand_id": [B]}, ["device"])}
    assert bets_by_device(api, OTHER) == {"tv": 1}  # b-other's pa is another player


def test_slice_and_filters_by_geo(api):
    # ggr: GB = pa (50 + 50) + pe (0) = 100; AT = pb 300; ES = pc −200; no geo = pd 50
    items = api.get(SLICE, metric="ggr", dim="geo", filters=f"brand_id:{B}", **DAY2)["items"]
    assert items == [{"geo": "AT", "value_minor": 300}, {"geo": "GB", "value_minor": 100},
                     {"geo": None, "value_minor": 50}, {"geo": "ES", "value_minor": -200}]
    assert items == ref.slice_(SENT, [], "ggr", "geo", DAY2["from"], DAY2["to"],
                               {"brand_id": [B]})
    # rtp of GB and ES together: wins (100 + 70 + 400) / stake (200 + 70 + 200)
    value = api.get(TS, metric="rtp", granularity="1d", filters="geo:GB,geo:ES", **DAY2)
    assert [p["value"] for p in value["series"]] == [570 / 470]


@pytest.mark.parametrize(("metric", "filters", "expected"), [
    ("dau", "brand_id:b-attr,device:mobile", 1),  # pa
    ("dau", "brand_id:b-attr,geo:GB", 2),  # pa, pe
    ("dau", "geo:US", 1),  # b-other's pa
    ("deposits_success", "brand_id:b-attr,device:mobile", 1.0),  # P1 only: P2 has no player
    ("settle_lag_p95", "brand_id:b-attr,device:tv,device:tablet", 60.0),
    ("stake", "device:tablet,geo:AT", 300),
    ("bets", "device:mobile", 2),  # pa (its later desktop registration counts for nothing)
])
def test_every_metric_filters_by_the_players_attributes(api, metric, filters, expected):
    filter_dict: dict[str, list[str]] = {}
    for part in filters.split(","):
        key, _, value = part.partition(":")
        filter_dict.setdefault(key, []).append(value)
    want = ref.timeseries(SENT, [], metric, "1d", DAY2["from"], DAY2["to"], filter_dict)
    got = api.get(TS, metric=metric, granularity="1d", filters=filters, **DAY2)["series"]
    field = ref.answer_field(metric)
    assert [p[field] for p in want] == [expected]
    assert got == want


def test_funnel_filters_each_events_player(api):
    bets = {"steps": [{"event": "bet.placed"}, {"event": "bet.settled"}], "window_sec": 3600,
            **DAY2}
    for filters, total in (({"device": "mobile"}, 1), ({"geo": ["AT", "ES"]}, 2),
                           ({"brand_id": B, "device": "none-such"}, 0)):
        body = {**bets, "filters": filters}
        # answered from the kept rows (step_times joined to the attributes)
        assert funnel_.kept(funnel_.parse(body))
        answer = assert_answer(api.post(FUNNEL, body), cref.funnel(SENT, body))
        assert answer["total"] == total
    # by payment: the payment without a player has no device, so a device filter drops it
    payments = {"steps": [{"event": "payment.intent"}, {"event": "payment.captured"}],
                "window_sec": 60, "correlate_by": "payment_id", **DAY2,
                "filters": {"brand_id": B}}
    assert assert_answer(api.post(FUNNEL, payments), cref.funnel(SENT, payments))["total"] == 2
    payments["filters"] = {"brand_id": B, "device": ["mobile", "tv"]}
    assert assert_answer(api.post(FUNNEL, payments), cref.funnel(SENT, payments))["total"] == 1


def test_retention_and_ltv_choose_their_players_by_attributes(api):
    wm = cref.watermark(SENT)
    # registrations of 09-30..10-01 on tv or tablet: pb (09-30, bets 10-02 → d2),
    # pc (10-01, bets 10-02 → d1)
    body = {"cohort": "registration", "start_date": "2025-09-30", "end_date": "2025-10-01",
            "days": [1, 2], "filters": {"brand_id": B, "device": ["tv", "tablet"]}}
    answer = assert_answer(api.post(RETENTION, body), cref.retention(SENT, body, wm))
    assert answer["rows"] == [{"cohort_date": "2025-09-30", "size": 1, "d1": 0.0, "d2": 1.0},
                              {"cohort_date": "2025-10-01", "size": 1, "d1": 1.0, "d2": 0.0}]
    # LTV of the GB players registered 10-01 (pa, pe): ggr 0 on 10-01, 100 on 10-02 → 50
    r = api.client.get(LTV, headers=api.headers, params={
        "cohort": "registration", "metric": "ggr", "horizon": "3d", "start_date": "2025-10-01",
        "end_date": "2025-10-01", "filters": f"brand_id:{B},geo:GB"})
    expected = cref.ltv(SENT, [], cohort="registration", metric="ggr", horizon=3,
                        start_date="2025-10-01", end_date="2025-10-01", wm=wm,
                        filters={"brand_id": [B], "geo": ["GB"]})
    assert assert_answer(r, expected)["cohorts"] == [
        {"date": "2025-10-01", "size": 2, "ltv_minor": [0, 50, 50]}]


def test_metrics_endpoint_lists_the_attributes_for_every_metric(api):
    body = api.get("/v1/metrics")
    assert all({"device", "geo"} <= set(m["dimensions"]) for m in body["metrics"])
    described = {d["name"]: d["description"] for d in body["dimensions"]}
    assert "player.registered" in described["device"] and "registration" in described["geo"]


@on_duckdb_only("drops a table through DuckDB's file (ClickHouse's: tests/test_rollups.py)")
def test_an_existing_store_is_back_filled_when_opened(tmp_path):
    """A store made before player_attributes existed gets it filled from its events."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, bearer(client, settings.data_dir))
        api.send(SENT)
        before = bets_by_device(api)
    con = duckdb.connect(str(settings.data_dir / "events.duckdb"))
    con.execute("DROP TABLE player_attributes")
    con.close()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        api = Api(client, bearer(client, settings.data_dir))
        assert bets_by_device(api) == before == {"mobile": 2, "tablet": 1, "tv": 1, None: 2}


def test_the_reference_reads_attributes_from_the_first_registration():
    firsts = ref.first_registrations(ref.dedup(SENT))
    assert firsts[B, "pb"] == {"country": "AT", "device": "tablet"}
    assert firsts[B, "pc"] == {"country": "ES", "device": "tv"}
    assert firsts[B, "pa"] == {"country": "GB", "device": "mobile"}
    assert (B, "pd") not in firsts

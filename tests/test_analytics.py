"""``GET /v1/analytics/timeseries`` and ``/slice`` (CONTRACT §4, §5) against a plain-Python
reference (``tests/reference.py``) over a generated event stream.

Expected answers are computed from the raw event dicts as sent; nothing of ``tally`` is called
to compute them. The data set (2 brands, EU and UK, EUR and GBP, three UTC days, duplicates
re-sent, late events, GBP rates on some days only) is ingested once per module through the API.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tests import reference as ref
from tests.conftest import bearer, make_event

TS = "/v1/analytics/timeseries"
SLICE = "/v1/analytics/slice"
BATCH = "/v1/events:batch"
FX = "/v1/admin/fx-rates"

FROM, TO = "2025-10-22", "2025-10-25"
DAYS = [date(2025, 10, 22), date(2025, 10, 23), date(2025, 10, 24)]
BRANDS = ("brand-1", "brand-2")
GAMES = {"g_01": "studio_x", "g_02": "studio_x", "g_03": "reelworks", "g_04": "reelworks",
         "g_05": "luckyjack"}
METHODS = ("card", "paypal", "trustly")
# GBP has a rate the day before the data and on its second day: 22 Oct uses 21 Oct's rate,
# 24 Oct uses 23 Oct's (the latest earlier rate).
RATES = [{"date": "2025-10-21", "currency": "GBP", "rate": "1.1412"},
         {"date": "2025-10-23", "currency": "GBP", "rate": "1.1538"}]
# A reporting currency needs its own rate: EUR → GBP uses 1 / rate(GBP).

ATTRIBUTES = ("device", "geo")  # the player's registration attributes: every metric has them
BET = ("brand_id", "region", "provider_id", "game_id", "currency", *ATTRIBUTES)
WALLET = ("brand_id", "region", "currency", *ATTRIBUTES)
PLAYER = ("brand_id", "region", *ATTRIBUTES)
DIMENSIONS = {  # docs/metrics.md
    "stake": BET, "wins": BET, "ggr": BET, "ngr": WALLET, "rtp": BET, "bets": BET,
    "deposits": WALLET, "deposits_count": WALLET,
    "deposits_success": ("brand_id", "region", "method", "currency", *ATTRIBUTES),
    "settle_lag_p95": BET, "webhook_lag_p95": PLAYER, "dau": PLAYER, "wau": PLAYER,
}
APPROX = {"rtp", "deposits_success", "settle_lag_p95", "webhook_lag_p95"}


# --------------------------------------------------------------------------- the data set


def rfc3339(t: datetime, offset_hours: int = 0) -> str:
    """``2025-10-22T08:15:03.250Z`` (milliseconds only when there are some), or with an
    offset (``+02:00``) when ``offset_hours`` is given."""
    if offset_hours:
        local = t.astimezone(timezone(timedelta(hours=offset_hours)))
        return local.isoformat(timespec="milliseconds" if t.microsecond else "seconds")
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        text += f".{t.microsecond // 1000:03d}"
    return text + "Z"


@dataclass
class Player:
    pid: str
    brand: str
    region: str
    currency: str


class Stream:
    """A deterministic casino day: sessions with bets, deposits via payments, bonuses."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.events: list[dict[str, Any]] = []

    def emit(self, event_type: str, t: datetime, player: Player, payload: dict[str, Any],
             *, lag: float | None = None, offset_hours: int = 0,
             player_id: bool = True) -> dict[str, Any]:
        self.n += 1
        rng = self.rng
        if lag is None:
            lag = rng.choice([0.05, 0.2, 0.5, 1.0, 1.5, 3.0]) + rng.randint(0, 999) / 1000
            if rng.random() < 0.05:
                lag += rng.randint(60, 3600)
        ingested = t + timedelta(seconds=lag)
        fields: dict[str, Any] = {
            "event_id": f"ev-{self.n:05d}-{rng.randrange(16**8):08x}",
            "event_type": event_type, "occurred_at": rfc3339(t, offset_hours),
            "ingested_at": rfc3339(ingested), "tenant_id": player.brand,
            "region": player.region, "player_id": player.pid, "payload": payload,
            "trace_id": f"tr-{self.n}",
        }
        event = make_event(**fields)
        if not player_id:
            del event["player_id"]
        self.events.append(event)
        return event

    def ms(self, low: float, high: float) -> timedelta:
        return timedelta(milliseconds=self.rng.randint(int(low * 1000), int(high * 1000)))

    def bet(self, player: Player, placed: datetime, *, stake: int | None = None,
            win: int | None = None, lag: timedelta | None = None, game: str | None = None,
            settle_offset: int = 0, placed_too: bool = True) -> None:
        rng = self.rng
        bet_id = f"bet-{self.n}-{rng.randrange(10**6)}"
        game = game or rng.choice(sorted(GAMES))
        if stake is None:
            stake = 0 if rng.random() < 0.04 else rng.choice([10, 50, 100, 250, 500, 2500]) \
                + rng.randint(0, 99)
        if win is None:
            win = 0 if rng.random() < 0.55 else \
                int(max(stake, 20) * rng.choice([0.5, 1, 1.5, 2, 5, 10])) + rng.randint(0, 3)
        common = {"bet_id": bet_id, "stake_minor": stake, "currency": player.currency,
                  "game_id": game, "provider_id": GAMES[game]}
        if stake == 0:
            common["in_bonus"] = True
        if placed_too:
            self.emit("bet.placed", placed, player, dict(common))
        settled = {**common, "win_minor": win}
        if rng.random() < 0.3:
            settled["jackpot_contribution_minor"] = stake // 100 + 1
        if rng.random() < 0.4:
            settled["commission_minor"] = stake * 3 // 100
        self.emit("bet.settled", placed + (lag if lag is not None else self.ms(0.2, 95)),
                  player, settled, offset_hours=settle_offset)
        if win:
            self.emit("wallet.credit", placed + timedelta(seconds=100), player,
                      {"amount_minor": win, "currency": player.currency, "reason": "win"})

    def deposit(self, player: Player, t: datetime) -> None:
        rng = self.rng
        pay = {"payment_id": f"pay-{self.n}", "amount_minor": rng.choice(
            [1000, 2000, 2500, 5000]) + rng.randint(0, 99), "currency": player.currency,
               "method": rng.choice(METHODS)}
        self.emit("payment.intent", t - timedelta(seconds=60), player, pay,
                  player_id=rng.random() < 0.8)
        if rng.random() < 0.2:
            self.emit("payment.failed", t - timedelta(seconds=45), player, pay)
            return
        self.emit("payment.authorized", t - timedelta(seconds=50), player, pay)
        if rng.random() < 0.1:
            return  # authorized, never captured
        self.emit("payment.captured", t - self.ms(0, 40), player, pay)
        self.emit("wallet.credit", t, player, {"amount_minor": pay["amount_minor"],
                                               "currency": player.currency,
                                               "reason": "deposit",
                                               "reference_id": pay["payment_id"]})

    def session(self, player: Player, start: datetime) -> None:
        rng = self.rng
        sid = f"s-{self.n}-{rng.randrange(10**6)}"
        roll = rng.random()
        duration = rng.randint(5, 59) if roll < 0.25 else 60 if roll < 0.32 \
            else rng.randint(61, 2400)
        self.emit("session.started", start, player,
                  {"session_id": sid, "device": rng.choice(["mobile", "desktop"])})
        quiet = duration <= 60 and rng.random() < 0.6  # a short look, nothing else
        if not quiet:
            if rng.random() < 0.35:
                self.deposit(player, start + self.ms(1, 30))
            if rng.random() < 0.2:
                bonus = {"bonus_id": f"bo-{self.n}", "amount_minor": rng.randint(100, 999),
                         "currency": player.currency}
                self.emit("bonus.issued", start + self.ms(1, 5), player, bonus)
                self.emit("bonus.consumed", start + self.ms(5, max(6, duration)), player,
                          {**bonus, "amount_minor": bonus["amount_minor"] - rng.randint(0, 99)})
            for _ in range(rng.randint(1, 5)):
                self.bet(player, start + self.ms(0, duration))
            if rng.random() < 0.1:
                self.emit("rg.reality_check", start + self.ms(0, duration), player,
                          {"session_id": sid})
            if rng.random() < 0.1:
                self.emit("wallet.debit", start + self.ms(0, duration), player,
                          {"amount_minor": 1500, "currency": player.currency,
                           "reason": "withdrawal"})
        self.emit("session.ended", start + timedelta(seconds=duration), player,
                  {"session_id": sid, "duration_sec": duration})


def players() -> list[Player]:
    out = []
    for i in range(40):
        brand = BRANDS[i % 2]
        region = "UK" if i % 3 == 0 else "EU"
        currency = "GBP" if region == "UK" else "EUR"
        if i % 7 == 1:  # a few players pay in the other currency
            currency = "EUR" if currency == "GBP" else "GBP"
        out.append(Player(f"p_{i:03d}", brand, region, currency))
    return out


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def build_dataset(seed: int = 20251022) -> tuple[list[list[dict[str, Any]]], Stream]:
    """The batches to send, in order: the bulk, then late events with re-sent duplicates."""
    s = Stream(seed)
    people = players()
    rng = s.rng
    # registrations (device and geo are the player's, CONTRACT §4): a quarter of the players
    # with both, some with a country only, the rest none; edge cases below
    for i, p in enumerate(people):
        if i % 4 == 0:
            s.emit("player.registered", midnight(DAYS[0]) + s.ms(3600, 7 * 3600), p,
                   {"country": "GB" if p.region == "UK" else "DE",
                    "device": "mobile" if i % 8 == 0 else "desktop"})
        elif i % 4 == 1 and i < 20:
            s.emit("player.registered", midnight(DAYS[0]) + s.ms(3600, 7 * 3600), p,
                   {"country": "FR"})
    # a later registration changes nothing
    s.emit("player.registered", midnight(DAYS[1]), people[0], {"country": "AT",
                                                               "device": "tablet"})
    # a late, earlier registration (sent in the last batch) moves the attributes back
    earlier = s.emit("player.registered", midnight(DAYS[0]) - timedelta(days=3), people[4],
                     {"country": "AT", "device": "tablet"})
    # two registrations at one instant: the smaller event_id wins, though sent last
    tie_at = midnight(DAYS[0]) - timedelta(hours=1)
    smaller = s.emit("player.registered", tie_at, people[8], {"country": "IT",
                                                              "device": "tv"})
    s.emit("player.registered", tie_at, people[8], {"country": "ES", "device": "mobile"})
    for day in DAYS:
        for p in people:
            for _ in range(rng.choice([0, 1, 2, 2])):
                s.session(p, midnight(day) + s.ms(8 * 3600, 23 * 3600))
    p_eu, p_uk = people[1], people[3]  # brand-2 EU (GBP payer), brand-2 UK
    # Edges of [from, to): just before, on, and after the range.
    s.bet(p_eu, datetime(2025, 10, 21, 23, 59, 0, tzinfo=UTC),
          lag=timedelta(seconds=59, milliseconds=999))  # settles 23:59:59.999 on 21 Oct
    s.bet(p_uk, datetime(2025, 10, 21, 23, 59, 30, tzinfo=UTC),
          lag=timedelta(seconds=30))  # placed 21 Oct, settled 00:00:00 on 22 Oct (in range)
    # A settlement stamped in +02:00 that is 22 Oct 23:30 UTC (23 Oct in local time).
    s.bet(p_eu, datetime(2025, 10, 22, 23, 29, tzinfo=UTC), lag=timedelta(seconds=60),
          settle_offset=2, stake=777, win=0)
    # A zero-stake free spin alone in a quiet hour: rtp null there, bets 1.
    s.bet(people[5], datetime(2025, 10, 22, 3, 20, tzinfo=UTC), stake=0, win=40)
    # A settlement whose placement was never sent: counts in stake, not in settle lag.
    s.bet(people[7], datetime(2025, 10, 23, 4, 10, tzinfo=UTC), placed_too=False)
    # A bet that settles two hours later, across midnight.
    s.bet(people[9], datetime(2025, 10, 23, 23, 10, tzinfo=UTC), lag=timedelta(hours=2))
    # Payment intents and captures in different hours; an intent-only hour.
    s.deposit(people[11], datetime(2025, 10, 24, 5, 0, 20, tzinfo=UTC))
    s.emit("payment.intent", datetime(2025, 10, 24, 6, 30, tzinfo=UTC), people[11],
           {"payment_id": "pay-lonely", "amount_minor": 999, "currency": "EUR",
            "method": "card"})
    # The greatest occurred_at of all: exactly `to`, so outside [from, to).
    last = s.emit("bet.settled", datetime(2025, 10, 25, tzinfo=UTC), people[2],
                  {"bet_id": "bet-last", "stake_minor": 1000, "win_minor": 0, "currency": "EUR",
                   "game_id": "g_01", "provider_id": "studio_x"})
    events = s.events
    # The same event_id under the other brand is another event.
    twin_source = next(e for e in events if e["event_type"] == "bet.settled"
                       and e["tenant_id"] == "brand-1")
    twin_player = next(p for p in people if p.brand == "brand-2")
    twin = json.loads(json.dumps(twin_source))
    twin.update(tenant_id="brand-2", player_id=twin_player.pid, region=twin_player.region)
    twin["payload"]["currency"] = twin_player.currency
    events.append(twin)

    order = list(events)
    rng.shuffle(order)
    cut = int(len(order) * 0.85)
    first, late = order[:cut], order[cut:]
    first.sort(key=lambda e: ref.parse_time(e["occurred_at"]))
    if last in late:  # keep the watermark's event in the first batch
        late.remove(last)
        first.append(last)
    for sent_late in (earlier, smaller):  # these two arrive after the others
        if sent_late in first:
            first.remove(sent_late)
            late.append(sent_late)
    resent = rng.sample(first, 30)  # exact duplicates, at a delay
    second = late + [json.loads(json.dumps(e)) for e in resent]
    rng.shuffle(second)
    second.append(json.loads(json.dumps(second[0])))  # and one repeated inside the batch
    half = len(first) // 2
    return [first[:half], first[half:], second], s


BATCHES, _STREAM = build_dataset()
SENT = [e for batch in BATCHES for e in batch]  # in sending order


def expected_counts() -> tuple[int, int]:
    unique = len(ref.dedup(SENT))
    return unique, len(SENT) - unique


# --------------------------------------------------------------------------- the API


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params=params, headers=self.headers)


def token(client: TestClient, settings: Settings) -> dict[str, str]:
    return bearer(client, settings.data_dir)


def post_batches(client: TestClient, headers: dict[str, str],
                 batches: list[list[dict[str, Any]]]) -> tuple[int, int]:
    accepted = duplicates = 0
    for batch in batches:
        r = client.post(BATCH, json=batch, headers=headers)
        assert r.status_code == 202, r.text
        receipt = r.json()
        assert receipt["rejected"] == 0, receipt["errors"][:3]
        accepted += receipt["accepted"]
        duplicates += receipt["duplicates"]
    return accepted, duplicates


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The data set ingested once for the module (the conftest fixtures are per test; this
    builds the same app the same way, only once)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("analytics") / "data",
                        regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = token(client, settings)
        r = client.post(FX, json=RATES, headers=headers)
        assert r.status_code == 200, r.text
        assert post_batches(client, headers, BATCHES) == expected_counts()
        yield Api(client, headers)


def encode_filters(filters: dict[str, list[str]]) -> str:
    return ",".join(f"{key}:{value}" for key, values in filters.items() for value in values)


def query(filters: dict[str, list[str]] | None, group_by: list[str] | None, currency: str | None,
          **params: Any) -> dict[str, Any]:
    if filters:
        params["filters"] = encode_filters(filters)
    if group_by:
        params["group_by"] = ",".join(group_by)
    if currency:
        params["currency"] = currency
    return params


def fetch_all(api: Api, path: str, params: dict[str, Any], items: str, limit: int) \
        -> list[dict[str, Any]]:
    """Every page, following ``next_cursor`` until it is null."""
    out: list[dict[str, Any]] = []
    cursor = None
    for _ in range(2000):
        page_params = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        r = api.get(path, **page_params)
        assert r.status_code == 200, (page_params, r.text)
        body = r.json()
        assert body["metric"] == params["metric"]
        assert len(body[items]) <= limit, (len(body[items]), limit)
        out += body[items]
        cursor = body["next_cursor"]
        if cursor is None:
            return out
        assert body[items], "an empty page with a next_cursor"
    raise AssertionError("pagination does not end")


def assert_same(actual: list[dict[str, Any]], expected: list[dict[str, Any]], metric: str) \
        -> None:
    field = ref.answer_field(metric)
    keys = [tuple(k for k in point if k != field) for point in expected[:1]]
    label = keys[0] if keys else ("ts",)

    def where(point: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(point.get(k) for k in label)

    assert [where(p) for p in actual] == [where(p) for p in expected], \
        "buckets/groups differ (ts, then group keys, in order)"
    mismatches = []
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want), (got, want)
        value, wanted = got[field], want[field]
        if wanted is None or metric not in APPROX:
            same = value == wanted and (wanted is None or field != "value_minor"
                                        or isinstance(value, int))
        else:
            same = value is not None and value == pytest.approx(wanted, rel=1e-9)
        if not same:
            mismatches.append((where(want), value, wanted))
    assert not mismatches, f"{len(mismatches)} of {len(expected)} differ " \
        f"(where, got, expected): {mismatches[:8]}"


# --------------------------------------------------------------------------- timeseries cases


@dataclass(frozen=True)
class Case:
    metric: str
    granularity: str
    start: str = FROM
    end: str = TO
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    group_by: tuple[str, ...] = ()
    currency: str | None = None
    limit: int = 7

    @property
    def id(self) -> str:
        parts = [self.metric, self.granularity]
        if self.group_by:
            parts.append("by_" + "+".join(self.group_by))
        if self.filters:
            parts.append("where_" + "&".join(f"{k}={'|'.join(v)}" for k, v in self.filters))
        if self.currency:
            parts.append("in_" + self.currency)
        if (self.start, self.end) != (FROM, TO):
            parts.append(f"{self.start}..{self.end}")
        return "-".join(parts)

    def filter_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.filters}


def cases() -> list[Case]:
    out = []
    for metric, dims in DIMENSIONS.items():
        for granularity in ("1d",) if metric == "wau" else ("1h", "1d"):
            out.append(Case(metric, granularity))
            out.append(Case(metric, granularity, group_by=("brand_id",)))
            if "currency" in dims:
                out.append(Case(metric, granularity, group_by=("currency",)))
        filters = [(("region", ("EU",)),),
                   (("brand_id", ("brand-1", "brand-2")),),
                   (("brand_id", ("brand-2",)), ("region", ("UK",)))]
        if "currency" in dims:
            filters.append((("region", ("EU",)), ("currency", ("GBP",))))
        if "game_id" in dims:
            filters.append((("game_id", ("g_01", "g_03")), ("brand_id", ("brand-1",))))
        if "method" in dims:
            filters.append((("method", ("card", "trustly")),))
        # player attributes: a value, values OR-ed, with another key, and a group
        filters += [(("device", ("mobile",)),), (("geo", ("GB", "FR")),),
                    (("device", ("desktop", "tablet")), ("brand_id", ("brand-1",)))]
        for f in filters:
            out.append(Case(metric, "1d", filters=f))
        out.append(Case(metric, "1d", group_by=("device",)))
    out.append(Case("ggr", "1h", group_by=("geo", "device"), filters=(("region", ("EU",)),)))
    out.append(Case("rtp", "1d", group_by=("geo",), currency="GBP"))
    out.append(Case("dau", "1h", "2025-10-22T06:00:00Z", "2025-10-23T18:00:00Z",
                    group_by=("geo",)))
    out.append(Case("dau", "5m", "2025-10-22T18:00:00Z", "2025-10-22T21:00:00Z",
                    filters=(("device", ("mobile", "tv")),)))
    out.append(Case("mau", "1d", group_by=("device",)))
    out.append(Case("bets", "1m", "2025-10-22T14:00:00Z", "2025-10-22T15:00:00Z",
                    filters=(("geo", ("DE",)),), limit=25))
    out.append(Case("deposits_success", "1d", group_by=("method",)))
    out.append(Case("rtp", "1h", filters=(("region", ("UK",)),), group_by=("provider_id",)))
    out.append(Case("settle_lag_p95", "1d", group_by=("game_id", "brand_id")))
    for metric in ("stake", "ggr", "ngr", "deposits", "rtp"):
        out.append(Case(metric, "1d", currency="GBP"))
    out.append(Case("ngr", "1h", currency="GBP", group_by=("currency",)))
    out.append(Case("ggr", "1d", currency="EUR"))  # explicit base currency
    out.append(Case("ggr", "1d", group_by=("brand_id", "currency")))
    out.append(Case("ggr", "5m", "2025-10-22T18:00:00Z", "2025-10-22T21:00:00Z",
                    group_by=("brand_id",)))
    out.append(Case("stake", "1h", "2025-10-22T06:00:00Z", "2025-10-23T18:00:00Z"))
    out.append(Case("bets", "1m", "2025-10-22T03:00:00Z", "2025-10-22T04:00:00Z", limit=25))
    # sub-day activity: the 1m and 1h activity tables, and 5m regrouping 1m
    out.append(Case("dau", "5m", "2025-10-22T18:00:00Z", "2025-10-22T21:00:00Z",
                    group_by=("brand_id",)))
    out.append(Case("dau", "1m", "2025-10-22T03:00:00Z", "2025-10-22T05:00:00Z",
                    filters=(("region", ("EU",)),), limit=40))
    out.append(Case("dau", "1h", "2025-10-22T06:00:00Z", "2025-10-23T18:00:00Z",
                    group_by=("region",)))
    return out


CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_timeseries_matches_the_reference(api, case):
    params = query(case.filter_dict(), list(case.group_by), case.currency, metric=case.metric,
                   granularity=case.granularity, **{"from": case.start, "to": case.end})
    actual = fetch_all(api, TS, params, "series", case.limit)
    expected = ref.timeseries(SENT, RATES, case.metric, case.granularity, case.start, case.end,
                              case.filter_dict(), list(case.group_by),
                              case.currency or ref.BASE)
    assert expected, "the reference series is empty: the case tests nothing"
    assert_same(actual, expected, case.metric)


def test_timeseries_answer_shape(api):
    r = api.get(TS, metric="ggr", granularity="1d", **{"from": FROM, "to": TO})
    assert r.status_code == 200, r.text
    body = r.json()
    # the contract's members (an extra one, such as the reporting currency, is no breach)
    assert {"metric", "granularity", "series", "next_cursor"} <= set(body)
    assert (body["metric"], body["granularity"], body["next_cursor"]) == ("ggr", "1d", None)
    assert [p["ts"] for p in body["series"]] == \
        ["2025-10-22T00:00:00Z", "2025-10-23T00:00:00Z", "2025-10-24T00:00:00Z"]
    assert all(set(p) == {"ts", "value_minor"} for p in body["series"])
    r = api.get(TS, metric="rtp", granularity="1d", **{"from": FROM, "to": TO})
    assert all(set(p) == {"ts", "value"} for p in r.json()["series"])


def test_the_data_set_exercises_what_it_should():
    """Guards the generator: the edge cases the API tests rely on are in the data."""
    events = ref.dedup(SENT)
    assert 1000 <= len(events) <= 5000
    assert len(SENT) - len(events) == 31
    rtp_hourly = ref.timeseries(SENT, RATES, "rtp", "1h", FROM, TO)
    bets_hourly = ref.timeseries(SENT, RATES, "bets", "1h", FROM, TO)
    quiet = [(r["value"], b["value"]) for r, b in zip(rtp_hourly, bets_hourly, strict=True)
             if r["ts"] == "2025-10-22T03:00:00Z"]
    assert quiet == [(None, 1)]  # a bucket with bets but no stake
    by_currency = ref.timeseries(SENT, RATES, "stake", "1d", FROM, TO, group_by=["currency"])
    assert {p["currency"] for p in by_currency} == {"EUR", "GBP"}
    sessions = [e for e in events if e["event_type"] == "session.ended"]
    assert any(e["payload"]["duration_sec"] < 60 for e in sessions)
    assert any(e["payload"]["duration_sec"] == 60 for e in sessions)
    firsts = {e["event_id"] for e in BATCHES[0] + BATCHES[1]}
    first_max = max(ref.parse_time(e["occurred_at"]) for e in BATCHES[0] + BATCHES[1])
    late = [e for e in BATCHES[2] if e["event_id"] not in firsts]
    assert sum(ref.parse_time(e["occurred_at"]) < first_max for e in late) > 50
    assert any("+02:00" in e["occurred_at"] for e in events)


# --------------------------------------------------------------------------- slice


SLICES = [
    ("ggr", "game_id", "-value", None, None),
    ("ggr", "game_id", "value", None, None),
    ("ggr", "game_id", "-value", None, "GBP"),
    ("ggr", "game_id", "-value", {"region": ["UK"]}, None),
    ("ggr", "brand_id", "-value", None, None),
    ("rtp", "provider_id", "-value", None, None),
    ("rtp", "provider_id", "value", None, None),
    ("rtp", "game_id", "value", {"currency": ["GBP"]}, None),
    ("ngr", "currency", "-value", None, None),
    ("bets", "game_id", "-value", None, None),
    ("deposits", "region", "value", None, "GBP"),
    ("deposits_success", "method", "-value", None, None),
    ("settle_lag_p95", "provider_id", "-value", None, None),
    ("dau", "brand_id", "-value", None, None),
    ("ggr", "device", "-value", None, None),
    ("rtp", "geo", "value", None, None),
    ("deposits", "geo", "-value", {"device": ["mobile", "desktop"]}, "GBP"),
    ("dau", "device", "-value", None, None),
    ("settle_lag_p95", "geo", "-value", {"brand_id": ["brand-1"]}, None),
    ("ggr", "game_id", "-value", {"geo": ["DE"]}, None),
]


@pytest.mark.parametrize(("metric", "dim", "order", "filters", "currency"), SLICES,
                         ids=[f"{m}-by_{d}-{o}" + (f"-{f}" if f else "") + (f"-in_{c}" if c
                              else "") for m, d, o, f, c in SLICES])
def test_slice_matches_the_reference(api, metric, dim, order, filters, currency):
    params = query(filters, None, currency, metric=metric, dim=dim, order=order,
                   **{"from": FROM, "to": TO})
    actual = fetch_all(api, SLICE, params, "items", 2)
    expected = ref.slice_(SENT, RATES, metric, dim, FROM, TO, filters, order,
                          currency or ref.BASE)
    assert len(expected) >= 2
    assert_same(actual, expected, metric)


def test_slice_defaults(api):
    r = api.get(SLICE, metric="ggr", dim="game_id", **{"from": FROM, "to": TO})
    assert r.status_code == 200, r.text
    body = r.json()
    assert {"metric", "dim", "items", "next_cursor"} <= set(body)
    assert (body["metric"], body["dim"], body["next_cursor"]) == ("ggr", "game_id", None)
    assert body["items"] == ref.slice_(SENT, RATES, "ggr", "game_id", FROM, TO)  # -value


def test_slice_on_part_of_a_day_converts_per_day(api):
    start, end = "2025-10-22T12:00:00Z", "2025-10-23T12:00:00Z"
    params = {"metric": "stake", "dim": "brand_id", "from": start, "to": end}
    actual = fetch_all(api, SLICE, params, "items", 50)
    assert_same(actual, ref.slice_(SENT, RATES, "stake", "brand_id", start, end), "stake")


# --------------------------------------------------------------------------- ratios


def post_events(client: TestClient, headers: dict[str, str], rates: list[dict[str, str]],
                events: list[dict[str, Any]]) -> None:
    if rates:
        assert client.post(FX, json=rates, headers=headers).status_code == 200
    post_batches(client, headers, [events])


def values_of(client: TestClient, headers: dict[str, str], path: str,
              **params: str) -> list[Any]:
    r = client.get(path, params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    return [p["value"] for p in body["series" if path == TS else "items"]]


def test_rtp_of_a_one_currency_brand_is_its_ratio_in_that_currency(client, headers):
    """CONTRACT §5: a ratio is computed from the exact converted sums. Regression: a GBP-only
    brand's day of 2,525 won on 4,670 staked answered 0.540814 (2,882 / 5,329, the EUR sums
    rounded first) instead of 2,525 / 4,670 = 0.540685."""
    rates = [rate(D1, "GBP", "1.1412"), rate(D2, "GBP", "1.1538"), rate(D1, "USD", "0.9213")]
    events = [bet(f"{D1}T10:00:00Z", 4000, 2000, "GBP", brand="brand-g"),
              bet(f"{D1}T11:30:00Z", 670, 525, "GBP", brand="brand-g"),
              bet(f"{D2}T09:00:00Z", 333, 1000, "GBP", brand="brand-g")]
    post_events(client, headers, rates, events)
    brand = {"metric": "rtp", "filters": "brand_id:brand-g"}
    for currency in ("EUR", "GBP", "USD"):  # USD: the cross rate 1.1412 / 0.9213
        assert values_of(client, headers, TS, **brand, granularity="1d", currency=currency,
                         **{"from": D1, "to": D3}) == [2525 / 4670, 1000 / 333]
        assert values_of(client, headers, TS, **brand, granularity="1h", currency=currency,
                         **{"from": f"{D1}T10:00:00Z", "to": f"{D1}T12:00:00Z"}) \
            == [2000 / 4000, 525 / 670]
    # a slice adds each day's exact converted sums: in GBP the brand's own ratio; in EUR the
    # two days weigh by their rates (nothing rounded)
    assert values_of(client, headers, SLICE, **brand, dim="brand_id", currency="GBP",
                     **{"from": D1, "to": D3}) == [3525 / 5003]
    wins = Decimal(2525) * Decimal("1.1412") + Decimal(1000) * Decimal("1.1538")
    stake = Decimal(4670) * Decimal("1.1412") + Decimal(333) * Decimal("1.1538")
    assert (wins, stake) == (Decimal("4035.33"), Decimal("5713.6194"))
    assert values_of(client, headers, SLICE, **brand, dim="brand_id",
                     **{"from": D1, "to": D3}) == [float(Fraction(wins) / Fraction(stake))]


def test_rtp_of_mixed_currencies_adds_unrounded_converted_sums(client, headers):
    """EUR 500 won on 1,000 and GBP 1,001 on 1,001 at 1.15 in one bucket: the GBP sums are
    1,151.15 EUR cents each, so rtp = 1,651.15 / 2,151.15 (not 1,651 / 2,151)."""
    events = [bet(f"{D1}T10:00:00Z", 1000, 500, brand="brand-m"),
              bet(f"{D1}T10:20:00Z", 1001, 1001, "GBP", brand="brand-m")]
    post_events(client, headers, [rate(D1, "GBP", "1.15")], events)
    wins = Decimal(500) + Decimal(1001) * Decimal("1.15")
    stake = Decimal(1000) + Decimal(1001) * Decimal("1.15")
    expected = float(Fraction(wins) / Fraction(stake))
    assert expected != 1651 / 2151
    params = {"metric": "rtp", "filters": "brand_id:brand-m", "from": D1, "to": D2}
    assert values_of(client, headers, TS, **params, granularity="1d") == [expected]
    assert values_of(client, headers, TS, **params, granularity="1h") == \
        [None] * 10 + [expected] + [None] * 13
    assert values_of(client, headers, SLICE, **params, dim="game_id") == [expected]
    assert values_of(client, headers, SLICE, **params, dim="currency") == [1.0, 0.5]
    # money answers still round each (bucket, source currency) sum half-to-even
    ggr = client.get(TS, params={**params, "metric": "ggr", "granularity": "1d"},
                     headers=headers).json()["series"]
    assert [p["value_minor"] for p in ggr] == [500]  # 500 + round(0.0)


def test_a_group_is_present_only_where_an_event_the_metric_counts_is(client, headers):
    """A brand whose only wallet.credit is a win has no deposits: no group of its own in
    deposits (it used to appear with 0), from the rollups and from the events alike."""
    def credit(brand: str, reason: str) -> dict[str, Any]:
        return make_event(event_type="wallet.credit", occurred_at=f"{D1}T10:00:00Z",
                          tenant_id=brand, payload={"amount_minor": 700, "currency": "EUR",
                                                    "reason": reason})

    events = [credit("brand-d", "deposit"), credit("brand-w", "win")]
    post_events(client, headers, [], events)
    for metric in ("deposits", "deposits_count"):
        expected = ref.timeseries(events, [], metric, "1d", D1, D2, group_by=["brand_id"])
        assert [p["brand_id"] for p in expected] == ["brand-d"]
        r = client.get(TS, headers=headers, params={"metric": metric, "granularity": "1d",
                                                    "group_by": "brand_id", "from": D1,
                                                    "to": D2})
        assert r.json()["series"] == expected  # the 1d rollup
        # a range not aligned to any rollup grain: the events
        r = client.get(SLICE, headers=headers, params={
            "metric": metric, "dim": "brand_id", "from": f"{D1}T09:59:30Z",
            "to": f"{D1}T10:00:30Z"})
        assert [i["brand_id"] for i in r.json()["items"]] == ["brand-d"]


# --------------------------------------------------------------------------- headers


def max_occurred() -> datetime:
    return max(ref.parse_time(e["occurred_at"]) for e in SENT)


@pytest.mark.parametrize("path", [TS, SLICE])
def test_headers_etag_and_watermark(api, path):
    params = {"metric": "ggr", "granularity": "1h", "dim": "game_id", "from": FROM, "to": TO}
    if path == SLICE:
        del params["granularity"]
    else:
        del params["dim"]
    r = api.get(path, **params)
    assert r.status_code == 200, r.text
    assert r.headers.get("Cache-Control")
    etag = r.headers["ETag"]
    watermark = r.headers["X-Data-Watermark"]
    assert ref.parse_time(watermark) == max_occurred() == datetime(2025, 10, 25, tzinfo=UTC)
    again = api.client.get(path, params=params, headers={**api.headers, "If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers.get("ETag") == etag
    other = api.get(path, **{**params, "metric": "stake"})
    assert other.status_code == 200 and other.headers["ETag"] != etag


def test_late_event_changes_its_bucket_by_its_amount_and_the_etag(client, headers):
    """A small stream of its own (the module's data must not change under the other tests)."""
    s = Stream(7)
    p = Player("p_late", "brand-1", "EU", "EUR")
    gbp = Player("p_gbp", "brand-2", "UK", "GBP")
    for hour in range(0, 24, 3):
        s.bet(p, datetime(2025, 10, 22, hour, 15, tzinfo=UTC), stake=1000 + hour, win=300)
        s.bet(gbp, datetime(2025, 10, 22, hour, 20, tzinfo=UTC), stake=2000 + hour, win=0)
    sent = list(s.events)
    assert client.post(FX, json=RATES, headers=headers).status_code == 200
    post_batches(client, headers, [sent])
    params = {"metric": "ggr", "granularity": "1h", "from": "2025-10-22", "to": "2025-10-23"}
    before = client.get(TS, params=params, headers=headers)
    assert before.status_code == 200, before.text
    assert before.json()["series"] == ref.timeseries(sent, RATES, "ggr", "1h", "2025-10-22",
                                                     "2025-10-23")
    etag, watermark = before.headers["ETag"], before.headers["X-Data-Watermark"]
    assert ref.parse_time(watermark) == max(ref.parse_time(e["occurred_at"]) for e in sent)
    assert client.get(TS, params=params,
                      headers={**headers, "If-None-Match": etag}).status_code == 304

    late = make_event(event_id="late-1", tenant_id="brand-1", region="EU", player_id="p_late",
                      occurred_at="2025-10-22T03:40:00Z", ingested_at="2025-10-22T09:00:00Z",
                      payload={"bet_id": "late-bet", "stake_minor": 700, "win_minor": 200,
                               "currency": "EUR", "game_id": "g_01",
                               "provider_id": "studio_x"})
    assert post_batches(client, headers, [[late]]) == (1, 0)
    after = client.get(TS, params=params, headers={**headers, "If-None-Match": etag})
    assert after.status_code == 200, after.text
    assert after.headers["ETag"] != etag
    assert after.headers["X-Data-Watermark"] == watermark  # an earlier event: same watermark
    old = {p["ts"]: p["value_minor"] for p in before.json()["series"]}
    new = {p["ts"]: p["value_minor"] for p in after.json()["series"]}
    assert new.pop("2025-10-22T03:00:00Z") == old.pop("2025-10-22T03:00:00Z") + 500
    assert new == old
    assert after.json()["series"] == ref.timeseries(sent + [late], RATES, "ggr", "1h",
                                                    "2025-10-22", "2025-10-23")
    # sending it again changes nothing
    assert post_batches(client, headers, [[late]]) == (0, 1)
    again = client.get(TS, params=params, headers=headers)
    assert again.json() == after.json() and again.headers["ETag"] == after.headers["ETag"]


# --------------------------------------------------------------------------- errors


def assert_problem(response: Any, status: int, *names: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    for name in names:
        assert name in body["detail"], (name, body["detail"])
    return body  # type: ignore[no-any-return]


RANGE = {"from": FROM, "to": TO}


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        (TS, {"metric": "bogus_metric", "granularity": "1d"}, "bogus_metric"),
        (TS, {"metric": "ggr", "granularity": "2h"}, "2h"),
        (TS, {"metric": "ggr", "granularity": "1d", "filters": "colour:red"}, "colour"),
        (TS, {"metric": "ggr", "granularity": "1d", "filters": "region:EU,planet:mars"},
         "planet"),
        (TS, {"metric": "ggr", "granularity": "1d", "group_by": "shoe_size"}, "shoe_size"),
        (TS, {"metric": "wau", "granularity": "1h"}, "wau"),
        (TS, {"metric": "mau", "granularity": "5m"}, "mau"),
        (SLICE, {"metric": "bogus_metric", "dim": "game_id"}, "bogus_metric"),
        (SLICE, {"metric": "ggr", "dim": "bogus_dim"}, "bogus_dim"),
        (SLICE, {"metric": "ggr", "dim": "game_id", "filters": "colour:red"}, "colour"),
        (SLICE, {"metric": "ggr", "dim": "game_id", "order": "sideways"}, "order"),
    ],
    ids=["ts-metric", "ts-granularity", "ts-filter-key", "ts-second-filter-key",
         "ts-group-by", "ts-wau-1h", "ts-mau-5m", "slice-metric", "slice-dim",
         "slice-filter-key", "slice-order"],
)
def test_bad_parameters_are_400_naming_them(api, path, params, named):
    assert_problem(api.get(path, **{**RANGE, **params}), 400, named)


@pytest.mark.parametrize(("start", "end"), [
    ("2025-10-23", "2025-10-23"),
    ("2025-10-24", "2025-10-23"),
    ("2025-10-23T00:00:00Z", "2025-10-22T23:00:00Z"),
])
@pytest.mark.parametrize("path", [TS, SLICE])
def test_from_not_before_to_is_400(api, path, start, end):
    params = {"metric": "ggr", "from": start, "to": end,
              **({"granularity": "1d"} if path == TS else {"dim": "game_id"})}
    assert_problem(api.get(path, **params), 400)


@pytest.mark.parametrize("path", [TS, SLICE])
def test_reporting_currency_without_a_rate_is_422_naming_it(api, path):
    params = {"metric": "ggr", "currency": "USD", **RANGE,
              **({"granularity": "1d"} if path == TS else {"dim": "game_id"})}
    assert_problem(api.get(path, **params), 422, "USD")


def test_the_reference_raises_for_a_currency_without_a_rate():
    with pytest.raises(ref.MissingRate, match="USD"):
        ref.timeseries(SENT, RATES, "ggr", "1d", FROM, TO, currency="USD")


# --------------------------------------------------------------------------- the reference


D1, D2, D3 = "2025-09-01", "2025-09-02", "2025-09-03"
_REF_IDS = itertools.count()


def bet(t: str, stake: int, win: int, currency: str = "EUR", brand: str = "brand-1",
        event_id: str | None = None, **payload: Any) -> dict[str, Any]:
    return make_event(event_id=event_id or f"r-{next(_REF_IDS)}",
                      occurred_at=t, tenant_id=brand,
                      payload={"bet_id": f"b-{t}-{stake}", "stake_minor": stake,
                               "win_minor": win, "currency": currency, "game_id": "g",
                               "provider_id": "p", **payload})


def rate(day: str, currency: str, value: str) -> dict[str, str]:
    return {"date": day, "currency": currency, "rate": value}


def one(series: list[dict[str, Any]], field: str = "value_minor") -> Any:
    assert len(series) == 1, series
    return series[0][field]


def test_reference_rounds_half_to_even_once_per_bucket_and_currency():
    rates = [rate(D1, "USD", "0.5")]
    at = f"{D1}T10:00:00Z"
    assert one(ref.timeseries([bet(at, 5, 0, "USD")], rates, "stake", "1d", D1, D2)) == 2
    assert one(ref.timeseries([bet(at, 15, 0, "USD")], rates, "stake", "1d", D1, D2)) == 8
    assert one(ref.timeseries([bet(at, 0, 5, "USD")], rates, "ggr", "1d", D1, D2)) == -2
    # 5 + 5 = 10 USD minor → 5.0; rounding each event (2 + 2) would give 4
    two = [bet(at, 5, 0, "USD"), bet(f"{D1}T11:00:00Z", 5, 0, "USD")]
    assert one(ref.timeseries(two, rates, "stake", "1d", D1, D2)) == 5
    assert [p["value_minor"] for p in ref.timeseries(two, rates, "stake", "1h",
                                                     f"{D1}T10:00:00Z",
                                                     f"{D1}T12:00:00Z")] == [2, 2]


def test_reference_minor_exponents_and_cross_rates():
    rates = [rate(D1, "JPY", "0.0061"), rate(D1, "GBP", "1.15"), rate(D1, "USD", "0.92")]
    at = f"{D1}T10:00:00Z"
    assert one(ref.timeseries([bet(at, 12345, 0, "JPY")], rates, "stake", "1d", D1, D2)) \
        == 7530  # ¥12,345 = €75.3045
    assert one(ref.timeseries([bet(at, 100, 0)], rates, "stake", "1d", D1, D2,
                              currency="JPY")) == 164  # €1 = ¥163.93…
    assert one(ref.timeseries([bet(at, 10_000, 0, "GBP")], rates, "stake", "1d", D1, D2,
                              currency="USD")) == 12_500  # 10000 × 1.15 / 0.92
    assert one(ref.timeseries([bet(at, 777, 0, "GBP")], rates, "stake", "1d", D1, D2,
                              currency="GBP")) == 777  # no conversion, no rounding


def test_reference_missing_day_uses_the_latest_earlier_rate():
    rates = [rate(D1, "GBP", "1.15"), rate(D3, "GBP", "1.20")]
    events = [bet(f"{day}T10:00:00Z", 100, 0, "GBP") for day in (D1, D2, D3, "2025-09-09")]
    series = ref.timeseries(events, rates, "stake", "1d", D1, "2025-09-10")
    assert [p["value_minor"] for p in series] == [115, 115, 120, 0, 0, 0, 0, 0, 120]
    with pytest.raises(ref.MissingRate, match="GBP on or before 2025-08-31"):
        ref.timeseries([bet("2025-08-31T10:00:00Z", 100, 0, "GBP")], rates, "stake", "1d",
                       "2025-08-31", D1)
    # a day without any event needs no rate
    assert one(ref.timeseries([], rates, "stake", "1d", "2025-08-31", D1)) == 0


def test_reference_ngr_converts_one_signed_sum_per_bucket_and_currency():
    rates = [rate(D1, "GBP", "1.15")]
    at = f"{D1}T10:00:00Z"
    events = [bet(at, 10, 3, "GBP"),
              make_event(event_type="bonus.consumed", occurred_at=at,
                         payload={"bonus_id": "bo", "amount_minor": 3, "currency": "GBP"})]
    # (10 − 3 − 3) × 1.15 = 4.6 → 5; converting each part (12 − 3 − 3) would give 6
    assert one(ref.timeseries(events, rates, "ngr", "1d", D1, D2)) == 5
    assert one(ref.timeseries(events, rates, "ggr", "1d", D1, D2)) == 8  # 8.05
    with_deductions = [bet(at, 1000, 100, jackpot_contribution_minor=11, commission_minor=30)]
    assert one(ref.timeseries(with_deductions, [], "ngr", "1d", D1, D2)) == 859


def test_reference_rtp_uses_exact_converted_sums_and_is_null_without_stake():
    rates = [rate(D1, "GBP", "1.15")]
    at = f"{D1}T10:00:00Z"
    # stake 1000 + 1151.15, wins 500 + 1151.15 (EUR cents, unrounded); rounding each
    # converted sum first would give 1651 / 2151
    events = [bet(at, 1000, 500), bet(at, 1001, 1001, "GBP")]
    assert one(ref.timeseries(events, rates, "rtp", "1d", D1, D2), "value") \
        == float(Fraction(165115, 215115))
    gbp_only = [bet(at, 4670, 2525, "GBP")]  # 5329.404 and 2881.53 in EUR cents
    assert one(ref.timeseries(gbp_only, [rate(D1, "GBP", "1.1412")], "rtp", "1d", D1, D2),
               "value") == 2525 / 4670
    assert one(ref.timeseries([bet(at, 0, 40)], rates, "rtp", "1d", D1, D2), "value") is None
    assert [p["value"] for p in ref.timeseries(events, rates, "rtp", "1h", f"{D1}T09:00:00Z",
                                               f"{D1}T11:00:00Z")][0] is None  # empty bucket


def test_reference_nearest_rank_p95():
    assert ref.nearest_rank_p95([float(v) for v in range(20, 0, -1)]) == 19
    assert ref.nearest_rank_p95([float(v) for v in range(1, 22)]) == 20  # ceil(19.95)
    assert ref.nearest_rank_p95([3.5]) == 3.5
    assert ref.nearest_rank_p95([float(v) for v in range(1, 101)]) == 95
    assert ref.nearest_rank_p95([]) is None


def placed(t: str, bet_id: str, brand: str = "brand-1") -> dict[str, Any]:
    return make_event(event_type="bet.placed", occurred_at=t, tenant_id=brand,
                      payload={"bet_id": bet_id, "stake_minor": 1, "currency": "EUR",
                               "game_id": "g", "provider_id": "p"})


def settled(t: str, bet_id: str, brand: str = "brand-1") -> dict[str, Any]:
    return make_event(occurred_at=t, tenant_id=brand,
                      payload={"bet_id": bet_id, "stake_minor": 1, "win_minor": 0,
                               "currency": "EUR", "game_id": "g", "provider_id": "p"})


def test_reference_settle_lag_pairs_by_brand_and_bet_and_buckets_by_settle_time():
    events = [placed(f"{D1}T23:59:58.500Z", "a"), settled(f"{D2}T00:00:01Z", "a"),
              placed(f"{D2}T00:00:00Z", "a", "brand-2"), settled(f"{D2}T00:00:10Z", "a",
                                                                 "brand-2"),
              settled(f"{D2}T05:00:00Z", "orphan")]
    series = ref.timeseries(events, [], "settle_lag_p95", "1d", D1, D3, group_by=["brand_id"])
    assert series == [
        {"ts": f"{D1}T00:00:00Z", "brand_id": "brand-1", "value": None},
        {"ts": f"{D1}T00:00:00Z", "brand_id": "brand-2", "value": None},
        {"ts": f"{D2}T00:00:00Z", "brand_id": "brand-1", "value": 2.5},
        {"ts": f"{D2}T00:00:00Z", "brand_id": "brand-2", "value": 10.0},
    ]


# one bet story per hour of D1 (the lag each settlement must have, by hand)
SETTLE_STORIES = [
    placed(f"{D1}T10:00:00Z", "a"), settled(f"{D1}T10:00:05Z", "a"),  # 10h: 5
    placed(f"{D1}T11:00:00Z", "a"), settled(f"{D1}T11:00:02Z", "a"),  # 11h: re-placed, 2
    # the same bet id in another brand, placed in between: never paired with brand-1's
    placed(f"{D1}T11:00:01Z", "a", "brand-2"), settled(f"{D1}T17:00:00Z", "a", "brand-2"),
    settled(f"{D1}T12:30:00Z", "b"),  # 12h: no placement at or before it: left out
    placed(f"{D1}T13:00:10Z", "b"), settled(f"{D1}T13:00:30Z", "b"),  # 13h: 20
    placed(f"{D1}T14:00:00.250Z", "c"), settled(f"{D1}T14:00:00.250Z", "c"),  # 14h: equal, 0
    placed(f"{D1}T15:00:00Z", "d"), settled(f"{D1}T15:10:00Z", "d"),  # 15h: 600
    settled(f"{D1}T16:00:00Z", "d"),  # 16h: settled again, the same placement: 3600
    placed(f"{D1}T16:30:00Z", "d"),  # after every settle of d: pairs with none
]
SETTLE_LAGS = {"brand-1": [5.0, 2.0, None, 20.0, 0.0, 600.0, 3600.0, None],
               "brand-2": [None, None, None, None, None, None, None, 21599.0]}


def test_reference_settle_lag_pairs_each_settle_with_the_latest_placement_before_it():
    series = ref.timeseries(SETTLE_STORIES, [], "settle_lag_p95", "1h", f"{D1}T10:00:00Z",
                            f"{D1}T18:00:00Z", group_by=["brand_id"])
    for brand, lags in SETTLE_LAGS.items():
        assert [p["value"] for p in series if p["brand_id"] == brand] == lags
    # several settles of one bet in one bucket: the p95 of both lags (nearest rank: the 2nd)
    assert one(ref.timeseries(SETTLE_STORIES, [], "settle_lag_p95", "1d", D1, D2,
                              filters={"brand_id": ["brand-1"]}), "value") == 3600.0


def test_settle_lag_pairs_each_settle_with_the_latest_placement_before_it(client, headers):
    """CONTRACT §5. Regression: each settlement was paired with the bet's first placement
    over all time (a re-placed bet's lag counted from its first placement, 3,602 s instead
    of 2 s; a settlement before any placement had a negative lag, -1,810 s)."""
    post_events(client, headers, [], SETTLE_STORIES)
    r = client.get(TS, headers=headers, params={
        "metric": "settle_lag_p95", "granularity": "1h", "group_by": "brand_id",
        "from": f"{D1}T10:00:00Z", "to": f"{D1}T18:00:00Z"})
    assert r.status_code == 200, r.text
    series = r.json()["series"]
    for brand, lags in SETTLE_LAGS.items():
        assert [p["value"] for p in series if p["brand_id"] == brand] == lags
    assert series == ref.timeseries(SETTLE_STORIES, [], "settle_lag_p95", "1h",
                                    f"{D1}T10:00:00Z", f"{D1}T18:00:00Z",
                                    group_by=["brand_id"])
    assert values_of(client, headers, SLICE, metric="settle_lag_p95", dim="brand_id",
                     **{"from": D1, "to": D2}) == [21599.0, 3600.0]


def test_reference_dedup_first_wins_per_brand():
    at = f"{D1}T10:00:00Z"
    first = bet(at, 100, 0, event_id="same")
    later = bet(at, 999, 0, event_id="same")  # same (tenant, event_id): ignored
    other_brand = bet(at, 50, 0, brand="brand-2", event_id="same")
    assert one(ref.timeseries([first, later, other_brand], [], "stake", "1d", D1, D2)) == 150
    assert one(ref.timeseries([first, later, other_brand], [], "bets", "1d", D1, D2),
               "value") == 2


def test_reference_dau_counts_bets_deposits_and_long_sessions_at_their_start():
    def ev(event_type: str, t: str, player: str, **payload: Any) -> dict[str, Any]:
        return make_event(event_type=event_type, occurred_at=t, player_id=player,
                          payload=payload)

    events = [
        ev("session.started", f"{D1}T23:59:30Z", "long", session_id="s1"),
        ev("session.ended", f"{D2}T00:00:30Z", "long", session_id="s1", duration_sec=60),
        ev("session.started", f"{D1}T10:00:00Z", "short", session_id="s2"),
        ev("session.ended", f"{D1}T10:00:59Z", "short", session_id="s2", duration_sec=59),
        ev("wallet.credit", f"{D1}T11:00:00Z", "depositor", amount_minor=1, currency="EUR",
           reason="deposit"),
        ev("wallet.credit", f"{D1}T11:00:00Z", "winner", amount_minor=1, currency="EUR",
           reason="win"),
        ev("bet.placed", f"{D2}T11:00:00Z", "bettor", bet_id="b", stake_minor=1,
           currency="EUR", game_id="g", provider_id="p"),
        ev("bet.placed", f"{D2}T12:00:00Z", "bettor", bet_id="c", stake_minor=1,
           currency="EUR", game_id="g", provider_id="p"),
        ev("bet.settled", f"{D2}T12:00:00Z", "settler", bet_id="d", stake_minor=1,
           win_minor=0, currency="EUR", game_id="g", provider_id="p"),
    ]
    assert [p["value"] for p in ref.timeseries(events, [], "dau", "1d", D1, D3)] == [2, 1]
    assert [p["value"] for p in ref.timeseries(events, [], "wau", "1d", D1, D3)] == [2, 3]


def test_reference_fills_empty_buckets_and_keeps_only_present_groups():
    at = f"{D1}T10:05:00Z"
    events = [bet(at, 100, 40, brand="brand-1"), bet(f"{D2}T10:00:00Z", 7, 0, brand="brand-2")]
    series = ref.timeseries(events, [], "ggr", "1h", f"{D1}T09:00:00Z", f"{D1}T12:00:00Z",
                            group_by=["brand_id"])
    assert series == [{"ts": f"{D1}T{h}:00:00Z", "brand_id": "brand-1", "value_minor": v}
                      for h, v in (("09", 0), ("10", 60), ("11", 0))]
    assert [p["value_minor"] for p in ref.timeseries(events, [], "ggr", "5m",
                                                     f"{D1}T10:00:00Z",
                                                     f"{D1}T10:15:00Z")] == [0, 60, 0]
    assert ref.timeseries(events, [], "ggr", "1h", f"{D1}T09:00:00Z", f"{D1}T10:00:00Z",
                          filters={"brand_id": ["brand-2"]}, group_by=["brand_id"]) == []


def test_reference_buckets_by_utc_occurred_at():
    events = [bet("2025-09-02T01:30:00+02:00", 10, 0), bet("2025-09-01T22:00:00-02:00", 20, 0)]
    series = ref.timeseries(events, [], "stake", "1d", D1, D3)
    assert [p["value_minor"] for p in series] == [10, 20]


def test_reference_filters_or_within_a_key_and_across_keys():
    at = f"{D1}T10:00:00Z"
    events = [bet(at, 1, 0, brand="brand-1"), bet(at, 10, 0, brand="brand-2"),
              bet(at, 100, 0, "GBP", brand="brand-2")]
    rates = [rate(D1, "GBP", "1")]

    def total(filters: dict[str, list[str]]) -> int:
        return one(ref.timeseries(events, rates, "stake", "1d", D1, D2, filters))

    assert total({"brand_id": ["brand-1", "brand-2"]}) == 111
    assert total({"brand_id": ["brand-2"], "currency": ["EUR"]}) == 10
    assert total({"brand_id": ["brand-1"], "currency": ["GBP"]}) == 0


def test_reference_slice_orders_by_value_then_key_with_nulls_last():
    at = f"{D1}T10:00:00Z"
    events = [bet(at, 100, 50, game_id="a"), bet(at, 100, 50, game_id="b"),
              bet(at, 100, 90, game_id="c"), bet(at, 0, 5, game_id="z")]
    desc = ref.slice_(events, [], "rtp", "game_id", D1, D2)
    assert desc == [{"game_id": "c", "value": 0.9}, {"game_id": "a", "value": 0.5},
                    {"game_id": "b", "value": 0.5}, {"game_id": "z", "value": None}]
    asc = ref.slice_(events, [], "rtp", "game_id", D1, D2, order="value")
    assert [i["game_id"] for i in asc] == ["a", "b", "c", "z"]
    money = ref.slice_(events, [], "ggr", "game_id", D1, D2, order="value")
    assert money == [{"game_id": "z", "value_minor": -5}, {"game_id": "c", "value_minor": 10},
                     {"game_id": "a", "value_minor": 50}, {"game_id": "b", "value_minor": 50}]


def test_reference_slice_converts_per_day_not_per_range():
    rates = [rate(D1, "USD", "0.5")]
    events = [bet(f"{D1}T10:00:00Z", 5, 0, "USD"), bet(f"{D2}T10:00:00Z", 5, 0, "USD")]
    # 2.5 → 2 on each day: 4, where converting the range's 10 at once would give 5
    assert ref.slice_(events, rates, "stake", "currency", D1, D3) == \
        [{"currency": "USD", "value_minor": 4}]
    assert Decimal("2.5").quantize(Decimal(1)) == 2  # the default context is half-even too

"""Funnels, retention and LTV (docs/cohorts.md, CONTRACT §4/§5) through the API, against the
plain-Python reference ``tests/cohort_reference.py``.

The module's data set is ingested once: hand-made scenarios, each in a brand of its own (the
test filters on that brand and checks both the reference and the API against numbers worked
out by hand in its comments), plus generated streams that many seeded random queries compare
against the reference. Tests that add late events use a store of their own.

Readings of docs/cohorts.md where it leaves a choice are listed at the top of
``tests/cohort_reference.py`` and repeated in the comments of the tests that depend on them.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.cohorts import funnel as funnel_
from tally.cohorts import retention as retention_
from tally.config import Settings
from tally.semantic.catalog import METRICS
from tests import cohort_reference as cref
from tests import reference as ref
from tests.conftest import bearer, make_event, on_duckdb_only

FUNNEL = "/v1/analytics/funnel"
RETENTION = "/v1/analytics/retention"
LTV = "/v1/analytics/ltv"
BATCH = "/v1/events:batch"
FX = "/v1/admin/fx-rates"

RATES = [
    {"date": "2025-10-01", "currency": "GBP", "rate": "1.1412"},
    {"date": "2025-10-20", "currency": "GBP", "rate": "1.15"},
    {"date": "2025-10-22", "currency": "GBP", "rate": "1.2"},
    {"date": "2025-10-01", "currency": "USD", "rate": "0.5"},
    {"date": "2025-10-24", "currency": "USD", "rate": "0.9231"},
]

# --------------------------------------------------------------------------- event builders

_DEFAULTS: dict[str, dict[str, Any]] = {
    "payment.intent": {"amount_minor": 1000, "currency": "EUR", "method": "card"},
    "payment.authorized": {"amount_minor": 1000, "currency": "EUR", "method": "card"},
    "payment.captured": {"amount_minor": 1000, "currency": "EUR", "method": "card"},
    "payment.failed": {"amount_minor": 1000, "currency": "EUR", "method": "card"},
    "wallet.credit": {"amount_minor": 2000, "currency": "EUR", "reason": "deposit"},
    "bet.placed": {"stake_minor": 100, "currency": "EUR", "game_id": "g_01",
                   "provider_id": "studio_x"},
    "bet.settled": {"stake_minor": 100, "win_minor": 0, "currency": "EUR", "game_id": "g_01",
                    "provider_id": "studio_x"},
    "bonus.consumed": {"amount_minor": 100, "currency": "EUR"},
}
_AUTO_IDS = {"bet.placed": "bet_id", "bet.settled": "bet_id", "session.started": "session_id",
             "bonus.consumed": "bonus_id", "payment.intent": "payment_id",
             "payment.authorized": "payment_id", "payment.captured": "payment_id",
             "payment.failed": "payment_id"}
_serial = iter(range(10**9))


def ev(event_type: str, at: str, player: str | None, brand: str, *, region: str = "EU",
       eid: str | None = None, **payload: Any) -> dict[str, Any]:
    """An event of ``event_type`` at ``at`` (RFC 3339) with a valid payload; ``payload``
    overrides the defaults. ``player=None`` sends no player_id (allowed for payment.*)."""
    n = next(_serial)
    body = {**_DEFAULTS.get(event_type, {}), **payload}
    auto = _AUTO_IDS.get(event_type)
    if auto and auto not in body:
        body[auto] = f"{auto[:3]}-{n}"
    fields: dict[str, Any] = {"event_id": eid or f"c-{n:06d}", "event_type": event_type,
                              "occurred_at": at, "tenant_id": brand, "region": region,
                              "player_id": player, "payload": body}
    event = make_event(**fields)
    if player is None:
        del event["player_id"]
    return event


def iso(t: datetime) -> str:
    """RFC 3339 in UTC with microseconds when there are some."""
    text = t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return text + (f".{t.microsecond:06d}Z" if t.microsecond else "Z")


def at(text: str) -> datetime:
    return ref.parse_time(text)


# --------------------------------------------------------------------------- funnel scenarios
# Each scenario is one brand on 2025-10-01 (times are UTC).

D = "2025-10-01"


def scenario_ties() -> list[dict[str, Any]]:
    b = "f-ties"
    return [
        ev("wallet.credit", f"{D}T10:00:00Z", "pa", b, eid="t-a1"),
        ev("bet.placed", f"{D}T10:00:00Z", "pa", b, eid="t-a2"),
        ev("bet.placed", f"{D}T11:00:00Z", "pb", b, eid="t-b2"),
        ev("bet.placed", f"{D}T11:00:00Z", "pb", b, eid="t-b1"),
        ev("bet.placed", f"{D}T12:00:00Z", "pc", b, eid="t-c1"),
        ev("wallet.credit", f"{D}T13:00:00Z", "pd", b, eid="t-d2"),
        ev("bet.placed", f"{D}T13:00:00Z", "pd", b, eid="t-d1"),
        # three events at one instant; the ids decide the (occurred_at, event_id) order
        ev("bet.placed", f"{D}T14:00:00Z", "pe", b, eid="t-e1"),
        ev("wallet.credit", f"{D}T14:00:00Z", "pe", b, eid="t-e2"),
        ev("bet.placed", f"{D}T14:00:00Z", "pe", b, eid="t-e3"),
        ev("bet.placed", f"{D}T15:00:00Z", "pf", b, eid="t-f1"),
        ev("wallet.credit", f"{D}T15:00:00Z", "pf", b, eid="t-f4"),
        ev("bet.placed", f"{D}T15:00:00Z", "pf", b, eid="t-f3"),
    ]


def scenario_contradicting() -> list[dict[str, Any]]:
    b = "f-contra"  # a deposit and a win at one instant, the win with the smaller id
    return [ev("wallet.credit", f"{D}T10:00:00Z", "pj", b, eid="k-2"),
            ev("wallet.credit", f"{D}T10:00:00Z", "pj", b, eid="k-1", reason="win")]


def scenario_reentry() -> list[dict[str, Any]]:
    b = "f-reentry"
    return [
        # pa: the 10:00 attempt never captures within 600 s; the 10:30 one does after 480 s
        ev("payment.intent", f"{D}T10:00:00Z", "pa", b, payment_id="a1"),
        ev("payment.intent", f"{D}T10:30:00Z", "pa", b, payment_id="a2"),
        ev("payment.captured", f"{D}T10:38:00Z", "pa", b, payment_id="a2"),
        # pb: two complete attempts (300 s, then 60 s): the earliest start is the best
        ev("payment.intent", f"{D}T11:00:00Z", "pb", b, payment_id="b1"),
        ev("payment.captured", f"{D}T11:05:00Z", "pb", b, payment_id="b1"),
        ev("payment.intent", f"{D}T11:20:00Z", "pb", b, payment_id="b2"),
        ev("payment.captured", f"{D}T11:21:00Z", "pb", b, payment_id="b2"),
        ev("payment.intent", f"{D}T12:00:00Z", "pc", b, payment_id="c1"),
        ev("payment.captured", f"{D}T12:01:00Z", "pc", b, payment_id="c1"),
        ev("payment.intent", f"{D}T13:00:00Z", "pd", b, payment_id="d1"),
        ev("payment.captured", f"{D}T13:01:40Z", "pd", b, payment_id="d1"),
    ]


def scenario_window() -> list[dict[str, Any]]:
    b = "f-window"
    return [
        # pa: the deposit exactly 3600 s after the intent counts
        ev("payment.intent", f"{D}T10:00:00Z", "pa", b),
        ev("payment.captured", f"{D}T10:30:00Z", "pa", b),
        ev("wallet.credit", f"{D}T11:00:00Z", "pa", b),
        # pb: one microsecond later does not
        ev("payment.intent", f"{D}T12:00:00Z", "pb", b),
        ev("payment.captured", f"{D}T12:30:00Z", "pb", b),
        ev("wallet.credit", f"{D}T13:00:00.000001Z", "pb", b),
        # pc: starts before `to`, finishes after it, within the window
        ev("payment.intent", "2025-10-01T23:59:00Z", "pc", b),
        ev("payment.captured", "2025-10-02T00:10:00Z", "pc", b),
        ev("wallet.credit", "2025-10-02T00:20:00Z", "pc", b),
        # pd starts exactly at `to`; pe one microsecond before `from`: neither is a unit
        ev("payment.intent", "2025-10-02T00:00:00Z", "pd", b),
        ev("payment.captured", "2025-10-02T00:01:00Z", "pd", b),
        ev("payment.intent", "2025-09-30T23:59:59.999999Z", "pe", b),
        ev("payment.captured", "2025-10-01T00:01:00Z", "pe", b),
    ]


def scenario_within() -> list[dict[str, Any]]:
    b = "f-within"
    return [
        ev("payment.intent", f"{D}T10:00:00Z", "pa", b),  # 60 s, 120 s: both exactly allowed
        ev("payment.captured", f"{D}T10:01:00Z", "pa", b),
        ev("wallet.credit", f"{D}T10:03:00Z", "pa", b),
        ev("payment.intent", f"{D}T11:00:00Z", "pb", b),  # 61 s: stops at step 1
        ev("payment.captured", f"{D}T11:01:01Z", "pb", b),
        ev("wallet.credit", f"{D}T11:01:30Z", "pb", b),
        ev("payment.intent", f"{D}T12:00:00Z", "pc", b),  # 30 s, then 121 s: step 2
        ev("payment.captured", f"{D}T12:00:30Z", "pc", b),
        ev("wallet.credit", f"{D}T12:02:31Z", "pc", b),
        # pd: the earliest capture (13:00:10) is taken; the deposit is 125 s after it
        ev("payment.intent", f"{D}T13:00:00Z", "pd", b),
        ev("payment.captured", f"{D}T13:00:10Z", "pd", b),
        ev("payment.captured", f"{D}T13:00:20Z", "pd", b),
        ev("wallet.credit", f"{D}T13:02:15Z", "pd", b),
    ]


def scenario_payments() -> list[dict[str, Any]]:
    b = "f-pay"
    return [
        ev("payment.intent", f"{D}T10:00:00Z", "pa", b, payment_id="P1"),
        ev("payment.authorized", f"{D}T10:00:05Z", "pa", b, payment_id="P1"),
        ev("payment.captured", f"{D}T10:00:09Z", "pa", b, payment_id="P1"),
        ev("payment.intent", f"{D}T10:20:00Z", "pa", b, payment_id="P2"),
        ev("payment.failed", f"{D}T10:20:03Z", "pa", b, payment_id="P2"),
        # no player_id: a unit by payment_id, ignored by player_id
        ev("payment.intent", f"{D}T11:00:00Z", None, b, payment_id="P3"),
        ev("payment.authorized", f"{D}T11:00:02Z", None, b, payment_id="P3"),
        # a deposit has no payment_id: ignored by payment_id
        ev("wallet.credit", f"{D}T10:00:10Z", "pa", b, reference_id="P1"),
    ]


def scenario_exclusions() -> list[dict[str, Any]]:
    b = "f-excl"
    out = []
    for player, hour, times in [
        ("pa", 10, {"intent": 0, "failed": 1, "captured": 2, "credit": 3, "bet": 4}),
        ("pb", 11, {"intent": 0, "captured": 1, "failed": 2, "credit": 3, "bet": 4}),
        ("pc", 12, {"intent": 0, "captured": 1, "credit": 2, "bet": 3, "failed": 4}),
        ("pd", 13, {"intent": 0, "failed": 0, "captured": 1, "credit": 2, "bet": 3}),
        ("pe", 14, {"intent": 0, "captured": 1, "failed": 1, "credit": 2, "bet": 3}),
    ]:
        types = {"intent": "payment.intent", "captured": "payment.captured",
                 "failed": "payment.failed", "credit": "wallet.credit", "bet": "bet.placed"}
        for name, minute in times.items():
            extra = {"method": "paypal"} if (player, name) == ("pb", "failed") else {}
            out.append(ev(types[name], f"{D}T{hour}:{minute:02d}:00Z", player, b, **extra))
    return out


def scenario_conditions() -> list[dict[str, Any]]:
    b = "f-cond"
    return [
        ev("wallet.credit", f"{D}T10:00:00Z", "pa", b, reason="win"),
        ev("bet.placed", f"{D}T10:01:00Z", "pa", b, game_id="g_01"),
        ev("wallet.credit", f"{D}T11:00:00Z", "pb", b),
        ev("bet.placed", f"{D}T11:01:00Z", "pb", b, game_id="g_03"),
        ev("bet.placed", f"{D}T11:02:00Z", "pb", b, game_id="g_02"),
        ev("wallet.credit", f"{D}T12:00:00Z", "pc", b),
        ev("bet.placed", f"{D}T12:05:00Z", "pc", b, game_id="g_01"),
        ev("wallet.credit", f"{D}T13:00:00Z", "pd", b, currency="GBP", amount_minor=5000),
        ev("bet.placed", f"{D}T13:01:00Z", "pd", b, game_id="g_03"),
        ev("bet.placed", f"{D}T13:02:00Z", "pd", b, game_id="g_01", currency="GBP"),
    ]


def scenario_brands() -> list[dict[str, Any]]:
    one, two = "f-brand-1", "f-brand-2"
    return [
        ev("wallet.credit", f"{D}T10:00:00Z", "same", one),
        ev("bet.placed", f"{D}T10:01:00Z", "same", one),
        ev("wallet.credit", f"{D}T10:00:00Z", "same", two, region="UK"),
        ev("bet.placed", f"{D}T10:30:00Z", "same", two, region="UK"),
        ev("wallet.credit", f"{D}T11:00:00Z", "other", two, region="UK"),
        # x deposits in brand 1 and bets in brand 2: two units, neither reaches step 2
        ev("wallet.credit", f"{D}T12:00:00Z", "x", one),
        ev("bet.placed", f"{D}T12:05:00Z", "x", two, region="UK"),
    ]


SCENARIOS = (scenario_ties() + scenario_contradicting() + scenario_reentry() + scenario_window()
             + scenario_within() + scenario_payments() + scenario_exclusions()
             + scenario_conditions() + scenario_brands())


# --------------------------------------------------------------------------- retention / LTV
# scenarios


def scenario_dst() -> list[dict[str, Any]]:
    """Europe/London leaves BST at 2025-10-26T01:00Z: local 26 Oct has 25 hours."""
    b = "r-dst"
    return [
        ev("wallet.credit", "2025-10-25T23:30:00Z", "pa", b),  # London 26 Oct 00:30 BST
        ev("bet.placed", "2025-10-27T00:30:00Z", "pa", b),  # London 27 Oct 00:30 GMT
        ev("wallet.credit", "2025-10-26T23:30:00Z", "pb", b),  # London 26 Oct 23:30 GMT
        ev("bet.placed", "2025-10-26T23:45:00Z", "pb", b),  # London 26 Oct
        ev("wallet.credit", "2025-10-24T23:30:00Z", "pc", b),  # London 25 Oct 00:30 BST
        ev("bet.placed", "2025-10-25T22:59:00Z", "pc", b),  # London 25 Oct 23:59 BST
        ev("bet.placed", "2025-10-29T12:00:00Z", "pc", b),  # London 29 Oct
        ev("wallet.credit", "2025-10-29T12:00:00Z", "pc", b),  # a later deposit: not a cohort
        ev("player.registered", "2025-10-24T22:00:00Z", "pa", b),  # London 24 Oct 23:00
        ev("player.registered", "2025-10-24T23:30:00Z", "pb", b),  # London 25 Oct 00:30
        # the brand's latest event: watermark 2025-11-01T00:00Z = end of London 31 Oct
        ev("rg.reality_check", "2025-11-01T00:00:00Z", "wm", b),
    ]


def scenario_day_zero() -> list[dict[str, Any]]:
    b = "r-d0"
    return [
        ev("bet.placed", "2025-10-27T10:00:00Z", "pg", b),  # the same day, before the deposit
        ev("wallet.credit", "2025-10-27T12:00:00Z", "pg", b),
        ev("wallet.credit", "2025-10-27T13:00:00Z", "ph", b),
        ev("bet.placed", "2025-10-27T14:00:00Z", "ph", b),
        ev("wallet.credit", "2025-10-27T15:00:00Z", "pi", b),
        ev("bet.placed", "2025-10-26T15:00:00Z", "pi", b),  # the day before
        ev("rg.reality_check", "2025-10-29T00:00:00Z", "wm", b),
    ]


def scenario_ltv() -> list[dict[str, Any]]:
    """GBP 1.15 from 20 Oct, 1.2 from 22 Oct; USD 0.5. The brand's watermark is
    2025-10-25T10:00Z (its big bet): 25 Oct is not finished, so that bet never shows."""
    b = "l-fx"
    eur, gbp = {"currency": "EUR"}, {"currency": "GBP"}
    usd = {"currency": "USD"}
    return [
        ev("wallet.credit", "2025-10-21T08:00:00Z", "pa", b),
        ev("wallet.credit", "2025-10-21T09:00:00Z", "pb", b, **gbp),
        # a bet settled on 21 Oct before the deposit still counts on day 0
        ev("bet.settled", "2025-10-21T07:00:00Z", "pa", b, stake_minor=1002, **eur),
        ev("bet.settled", "2025-10-21T10:00:00Z", "pb", b, stake_minor=1001, **gbp),
        ev("bet.settled", "2025-10-22T10:00:00Z", "pb", b, stake_minor=100, win_minor=50,
           jackpot_contribution_minor=2, commission_minor=3, **gbp),
        ev("bonus.consumed", "2025-10-22T11:00:00Z", "pb", b, amount_minor=10, **gbp),
        ev("bet.settled", "2025-10-23T10:00:00Z", "pb", b, stake_minor=7, **gbp),
        ev("bet.settled", "2025-10-25T10:00:00Z", "pa", b, stake_minor=999_999, **eur),
        # cohort 22 Oct: three USD players, 5 USD minor each on day 0
        *[ev("wallet.credit", "2025-10-22T12:00:00Z", p, b, **usd) for p in ("pc", "pd", "pe")],
        *[ev("bet.settled", "2025-10-22T13:00:00Z", p, b, stake_minor=5, **usd)
          for p in ("pc", "pd", "pe")],
        ev("bet.settled", "2025-10-23T13:00:00Z", "pc", b, stake_minor=15, **usd),
        ev("rg.reality_check", "2025-10-25T00:00:00Z", "wm", b),
    ]


# --------------------------------------------------------------------------- generated streams


def random_funnel_stream(seed: int = 5) -> list[dict[str, Any]]:
    """Two brands with the same player ids, 09:00–12:00 UTC on 5 Oct: bursts that follow the
    usual path (session, payment intent, capture or failure, deposit, bets, a win) with parts
    missing, steps 0–300 s apart on a 15 s grid (many exact ties), a few sub-second times,
    some payments without a player id; plus stray events."""
    rng = random.Random(seed)
    out = []
    base = datetime(2025, 10, 5, 9, tzinfo=UTC)
    for brand in ("rf-1", "rf-2"):
        for i in range(14):
            player, region = f"u{i}", rng.choice(["EU", "UK"])
            currency = rng.choice(["EUR", "GBP"])
            common = {"region": region, "currency": currency}
            for burst in range(rng.randint(1, 4)):
                when = base + timedelta(seconds=15 * rng.randint(0, 720))
                pay = f"{brand}-{player}-{burst % 3}"
                method = rng.choice(["card", "paypal"])
                who = player if rng.random() < 0.85 else None
                path = [("session.started", {}),
                        ("payment.intent", {"payment_id": pay, "method": method}),
                        ("payment.captured" if rng.random() < 0.75 else "payment.failed",
                         {"payment_id": pay, "method": method}),
                        ("wallet.credit", {"reason": "deposit"})]
                path += [("bet.placed", {"game_id": rng.choice(["g_01", "g_02"])})
                         for _ in range(rng.randint(0, 3))]
                path.append(("wallet.credit", {"reason": "win"}))
                for event_type, payload in path:
                    if rng.random() < 0.2:
                        continue  # a missing part
                    when += timedelta(seconds=rng.choice([0, 0, 15, 15, 30, 60, 300]))
                    stamp = when + timedelta(microseconds=rng.randint(1, 999_999)) \
                        if rng.random() < 0.08 else when
                    out.append(ev(event_type, iso(stamp),
                                  who if event_type.startswith("payment.") else player,
                                  brand, **fields(event_type, common), **payload))
            for _ in range(rng.randint(0, 3)):  # strays
                when = base + timedelta(seconds=15 * rng.randint(0, 720))
                event_type = rng.choice(["payment.failed", "bet.placed", "session.started"])
                payload = {"payment_id": f"{brand}-{player}-0"} \
                    if event_type == "payment.failed" else {}
                out.append(ev(event_type, iso(when), player, brand,
                              **fields(event_type, common), **payload))
    return out


def fields(event_type: str, common: dict[str, Any]) -> dict[str, Any]:
    """A session has no currency (an extra payload field would be kept, but it is no typed
    field a filter reads)."""
    if event_type == "session.started":
        return {k: v for k, v in common.items() if k != "currency"}
    return common


COHORT_DAYS = [date(2025, 10, 20) + timedelta(days=k) for k in range(17)]  # 20 Oct – 5 Nov


def random_cohort_stream(seed: int = 11) -> list[dict[str, Any]]:
    """Players of two brands registering and depositing between 20 Oct and 5 Nov, often near
    midnight (so London, New York and Kolkata days differ from UTC ones, across both DST
    changes), then betting in EUR, GBP or USD. Brand rc-1's latest event is 2025-11-05T10:00Z,
    rc-2's 2025-11-03T22:30Z."""
    rng = random.Random(seed)
    out = []
    ends = {"rc-1": datetime(2025, 11, 5, 10, tzinfo=UTC),
            "rc-2": datetime(2025, 11, 3, 22, 30, tzinfo=UTC)}

    def moment(day: date) -> datetime:
        hour = rng.choice([0, 0, 1, 3, 4, 5, 12, 18, 22, 23, 23])
        return datetime(day.year, day.month, day.day, hour, rng.randint(0, 59),
                        rng.randint(0, 59), tzinfo=UTC)

    for brand, end in ends.items():
        for i in range(36):
            player = f"v{i}"
            region = "UK" if i % 3 == 0 else "EU"
            currency = rng.choice(["EUR", "EUR", "GBP", "USD"])
            days = [d for d in COHORT_DAYS if moment(d) < end - timedelta(hours=1)]
            first = moment(rng.choice(days))
            if first >= end:
                continue
            if rng.random() < 0.7:
                out.append(ev("player.registered", iso(first - timedelta(hours=rng.choice(
                    [0, 1, 5, 30]))), player, brand, region=region))
            if rng.random() < 0.85:
                out.append(ev("wallet.credit", iso(first), player, brand, region=region,
                              currency=currency, amount_minor=rng.randint(500, 5000)))
            for _ in range(rng.randint(0, 12)):
                when = first + timedelta(hours=rng.randint(-30, 24 * 12),
                                         seconds=rng.randint(0, 3599))
                if when >= end:
                    continue
                stake = rng.choice([0, 10, 100, 250, 1000]) + rng.randint(0, 99)
                win = 0 if rng.random() < 0.5 else rng.randint(0, 3 * stake + 5)
                settled: dict[str, Any] = {"currency": currency, "stake_minor": stake,
                                           "win_minor": win}
                if rng.random() < 0.3:
                    settled["jackpot_contribution_minor"] = stake // 100 + 1
                if rng.random() < 0.3:
                    settled["commission_minor"] = stake * 3 // 100
                out.append(ev("bet.placed", iso(when), player, brand, region=region,
                              currency=currency, stake_minor=stake))
                out.append(ev("bet.settled", iso(when + timedelta(seconds=40)), player, brand,
                              region=region, **settled))
                if rng.random() < 0.15:
                    out.append(ev("bonus.consumed", iso(when + timedelta(seconds=50)), player,
                                  brand, region=region, currency=currency,
                                  amount_minor=rng.randint(1, 300)))
                if rng.random() < 0.2:
                    out.append(ev("wallet.credit", iso(when + timedelta(seconds=5)), player,
                                  brand, region=region, currency=currency,
                                  reason=rng.choice(["deposit", "win"])))
        out.append(ev("rg.reality_check", iso(end), "wm", brand))
    return [e for e in out if at(e["occurred_at"]) <= ends[e["tenant_id"]]]


SENT = SCENARIOS + scenario_dst() + scenario_day_zero() + scenario_ltv() + random_funnel_stream() \
    + random_cohort_stream()


# --------------------------------------------------------------------------- the API


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]
    settings: Settings

    def funnel(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post(FUNNEL, json=body, headers=headers or self.headers)

    def retention(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        return self.client.post(RETENTION, json=body, headers=headers or self.headers)

    def ltv(self, headers: dict[str, str] | None = None, **params: Any) -> Any:
        return self.client.get(LTV, params=params, headers=headers or self.headers)

    def token(self, **limits: str) -> dict[str, str]:
        return bearer(self.client, self.settings.data_dir, **limits)


def send(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    for start in range(0, len(events), 2000):
        r = client.post(BATCH, json=events[start:start + 2000], headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["rejected"] == 0, r.json()["errors"][:3]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("cohorts") / "data",
                        regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        assert client.post(FX, json=RATES, headers=headers).status_code == 200
        shuffled = list(SENT)
        random.Random(3).shuffle(shuffled)  # arrival order is not occurred_at order
        send(client, headers, shuffled)
        yield Api(client, headers, settings)


def close(got: Any, want: Any, path: str = "") -> list[str]:
    """Differences between an answer and the reference: floats to 1e-9, the rest exactly
    (an int where an int is expected)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{path}: keys {sorted(got) if isinstance(got, dict) else got!r} "
                    f"!= {sorted(want)}"]
        return [d for k in want for d in close(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: {got!r} != {want!r}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                for d in close(g, w, f"{path}[{i}]")]
    if isinstance(want, float):
        ok = isinstance(got, int | float) and not isinstance(got, bool) \
            and got == pytest.approx(want, rel=1e-9, abs=1e-12)
    else:
        ok = got == want and type(got) is type(want)
    return [] if ok else [f"{path}: got {got!r}, expected {want!r}"]


def assert_answer(response: Any, expected: dict[str, Any]) -> dict[str, Any]:
    """The answer has every member of the reference's (an extra top-level member is no breach)
    with the same values."""
    assert response.status_code == 200, response.text
    body = response.json()
    missing = set(expected) - set(body)
    assert not missing, f"members missing: {missing}"
    diffs = close({k: body[k] for k in expected}, expected)
    assert not diffs, diffs[:10]
    return body  # type: ignore[no-any-return]


def counts(answer: dict[str, Any]) -> list[int]:
    return [s["count"] for s in answer["steps"]]


def funnel_check(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    expected = cref.funnel(SENT, body)
    assert_answer(api.funnel(body), expected)
    return expected


def retention_check(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    wm = cref.watermark(SENT, cref.scope_brands(body.get("filters")))
    expected = cref.retention(SENT, body, wm)
    r = api.retention(body)
    assert_answer(r, expected)
    assert ref.parse_time(r.headers["X-Data-Watermark"]) == wm
    return expected


def ltv_params(filters: dict[str, list[str]] | None = None, **params: Any) -> dict[str, Any]:
    if filters:
        params["filters"] = ",".join(f"{k}:{v}" for k, vs in filters.items() for v in vs)
    return params


def ltv_check(api: Api, horizon_days: int, filters: dict[str, list[str]] | None = None,
              **params: Any) -> dict[str, Any]:
    wm = cref.watermark(SENT, cref.scope_brands(filters))
    expected = cref.ltv(SENT, RATES, cohort=params["cohort"], metric=params["metric"],
                        horizon=horizon_days, start_date=params["start_date"],
                        end_date=params["end_date"], wm=wm,
                        currency=params.get("currency", ref.BASE), filters=filters)
    r = api.ltv(**ltv_params(filters, **params))
    assert_answer(r, expected)
    assert ref.parse_time(r.headers["X-Data-Watermark"]) == wm
    return expected


def assert_problem(response: Any, status: int, *names: str) -> dict[str, Any]:
    """An RFC 9457 problem whose detail names at least one of ``names``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    if names:
        assert any(n in body["detail"] for n in names), (names, body["detail"])
    return body  # type: ignore[no-any-return]


def brand(name: str) -> dict[str, list[str]]:
    return {"brand_id": [name]}


DAY = {"from": D, "to": "2025-10-02"}
INTENT, CAPTURED = {"event": "payment.intent"}, {"event": "payment.captured"}
DEPOSIT = {"event": "wallet.credit", "reason": "deposit"}
BET = {"event": "bet.placed"}


# --------------------------------------------------------------------------- funnel: scenarios


def test_funnel_same_instant_steps_count_and_one_event_fills_one_step(api):
    f = brand("f-ties")
    # deposit → bet: pa, pd, pe, pf have both at the same instant ("at or after")
    a = funnel_check(api, {"steps": [DEPOSIT, BET], "window_sec": 60, "filters": f, **DAY})
    assert (a["total"], counts(a), a["steps"][1]["median_sec"]) == (4, [4, 4], 0.0)
    # bet → bet: pb, pe, pf have two bets at one instant; pa, pc, pd one bet each, which
    # cannot fill both steps
    a = funnel_check(api, {"steps": [BET, BET], "window_sec": 60, "filters": f, **DAY})
    assert counts(a) == [6, 3]
    # bet → deposit → bet: step 3 could be step 1's event, so it needs an event after both
    # earlier ones in (occurred_at, event_id) order: pe's t-e3 follows (t-e1, t-e2); pf's
    # t-f3 comes before its deposit t-f4; pa and pd have no second bet
    a = funnel_check(api, {"steps": [BET, DEPOSIT, BET], "window_sec": 60, "filters": f, **DAY})
    assert counts(a) == [6, 4, 1]
    assert a["steps"][2] == {"name": "bet.placed", "count": 1, "rate": 1 / 6,
                             "median_sec": 0.0}


def test_funnel_same_type_steps_with_contradicting_conditions_tie_at_one_instant(api):
    body = {"window_sec": 60, "filters": brand("f-contra"), **DAY}
    win = {"event": "wallet.credit", "reason": "win"}
    # a win cannot be the deposit's event: plain "at or after", the instant tie counts
    assert counts(funnel_check(api, {**body, "steps": [DEPOSIT, win]})) == [1, 1]
    assert counts(funnel_check(api, {**body, "steps": [win, DEPOSIT]})) == [1, 1]
    # any credit could be the deposit's event: it must come after k-2 in (time, id) order,
    # and the win k-1 does not
    assert counts(funnel_check(api, {**body, "steps": [DEPOSIT, {"event": "wallet.credit"}]})) \
        == [1, 0]
    assert counts(funnel_check(api, {**body, "steps": [{"event": "wallet.credit"}, DEPOSIT]})) \
        == [1, 1]  # the first credit in (time, id) order is the win k-1, then k-2


def test_funnel_a_later_step_1_event_gives_a_better_attempt(api):
    a = funnel_check(api, {"steps": [INTENT, CAPTURED], "window_sec": 600,
                           "filters": brand("f-reentry"), **DAY})
    # pa's second attempt (480 s); pb's first of two complete ones (300 s, not 60 s); pc 60 s;
    # pd 100 s → nearest-rank median of [60, 100, 300, 480] is the 2nd: 100
    assert counts(a) == [4, 4]
    assert a["steps"][1]["median_sec"] == 100.0
    a = funnel_check(api, {"steps": [INTENT, CAPTURED], "window_sec": 479,
                           "filters": brand("f-reentry"), **DAY})
    assert counts(a) == [4, 3]  # pa's 480 s no longer fits; median of [60, 100, 300] = 100


def test_funnel_window_edges_and_steps_after_to(api):
    body = {"steps": [INTENT, CAPTURED, DEPOSIT], "window_sec": 3600,
            "filters": brand("f-window"), **DAY}
    a = funnel_check(api, body)
    # pa's deposit exactly 3600 s later counts, pb's 3600.000001 s does not; pc's steps after
    # `to` count; pd (at `to`) and pe (before `from`) are no units
    assert (a["total"], counts(a)) == (3, [3, 3, 2])
    # from as RFC 3339: pb's intent exactly at `from` is in
    a = funnel_check(api, {**body, "from": f"{D}T12:00:00Z"})
    assert counts(a) == [2, 2, 1]
    a = funnel_check(api, {**body, "from": f"{D}T12:00:00.000001Z"})
    assert counts(a) == [1, 1, 1]


def test_funnel_within_sec_per_step(api):
    a = funnel_check(api, {"steps": [INTENT, {**CAPTURED, "within_sec": 60},
                                     {**DEPOSIT, "within_sec": 120}],
                           "window_sec": 3600, "filters": brand("f-within"), **DAY})
    assert counts(a) == [4, 3, 1]
    assert (a["steps"][1]["median_sec"], a["steps"][2]["median_sec"]) == (30.0, 120.0)


def test_funnel_correlate_by_payment_id(api):
    steps = [INTENT, {"event": "payment.authorized"}, CAPTURED]
    body = {"steps": steps, "window_sec": 600, "filters": brand("f-pay"), **DAY}
    a = funnel_check(api, {**body, "correlate_by": "payment_id"})
    assert (a["total"], counts(a), a["correlate_by"]) == (3, [3, 2, 1], "payment_id")
    a = funnel_check(api, body)  # by player: P3 has none
    assert (a["total"], counts(a), a["correlate_by"]) == (1, [1, 1, 1], "player_id")
    # a deposit has no payment_id: with payment_id units nobody reaches it
    a = funnel_check(api, {**body, "steps": [INTENT, DEPOSIT], "correlate_by": "payment_id"})
    assert counts(a) == [3, 0]


def test_funnel_exclusions_default_and_explicit_between(api):
    steps = [INTENT, CAPTURED, DEPOSIT, BET]
    body = {"steps": steps, "window_sec": 3600, "filters": brand("f-excl"), **DAY}
    failed = {"event": "payment.failed"}
    # default [1, 4]: pa (failed before its capture) stops at 1, pb at 2, pe's failure at the
    # instant of its capture ("at or before step k") stops it at 1; pd's failure at the
    # instant of its intent is not "strictly after" it
    a = funnel_check(api, {**body, "exclusions": [failed]})
    assert counts(a) == [5, 3, 2, 2]
    assert counts(funnel_check(api, {**body, "exclusions": [{**failed, "between": [2, 3]}]})) \
        == [5, 5, 4, 4]
    assert counts(funnel_check(api, {**body, "exclusions": [{**failed, "between": [3, 4]}]})) \
        == [5, 5, 5, 5]
    assert counts(funnel_check(api, {**body, "exclusions": [{**failed, "between": [1, 2]}]})) \
        == [5, 3, 3, 3]
    # a condition on the exclusion: only pb's failure is by paypal
    assert counts(funnel_check(api, {**body, "exclusions": [{**failed, "method": "paypal"}]})) \
        == [5, 5, 4, 4]
    assert counts(funnel_check(api, body)) == [5, 5, 5, 5]


def test_funnel_conditions_on_payload_fields_and_lists(api):
    steps = [DEPOSIT, {"event": "bet.placed", "game_id": ["g_01", "g_02"]}]
    body = {"steps": steps, "window_sec": 600, "filters": brand("f-cond"), **DAY}
    a = funnel_check(api, body)
    # pa's credit is a win; pb's g_02 bet after 120 s (its g_03 one does not match); pc 300 s;
    # pd's g_01 bet after 120 s
    assert counts(a) == [3, 3]
    assert a["steps"][1]["median_sec"] == 120.0
    a = funnel_check(api, {**body, "steps": [DEPOSIT, {"event": "bet.placed",
                                                       "game_id": "g_03"}]})
    assert counts(a) == [3, 2]
    a = funnel_check(api, {**body, "steps": [{**DEPOSIT, "amount_minor": 5000,
                                              "name": "big deposit"}, BET]})
    assert counts(a) == [1, 1] and a["steps"][0]["name"] == "big deposit"
    # a filter applies to every step's events: only pd's GBP deposit and GBP bet
    a = funnel_check(api, {**body, "filters": {**brand("f-cond"), "currency": "GBP"}})
    assert counts(a) == [1, 1] and a["steps"][1]["median_sec"] == 120.0


def test_funnel_units_are_per_brand_and_filters(api):
    both = {"brand_id": ["f-brand-1", "f-brand-2"]}
    body = {"steps": [DEPOSIT, BET], "window_sec": 3600, "filters": both, **DAY}
    a = funnel_check(api, body)
    # "same" in each brand is two units (60 s and 1800 s); x of brand 1 never bets there
    assert (a["total"], counts(a), a["steps"][1]["median_sec"]) == (4, [4, 2], 60.0)
    assert counts(funnel_check(api, {**body, "filters": {**both, "region": "UK"}})) == [2, 1]
    assert counts(funnel_check(api, {**body, "filters": brand("f-brand-1")})) == [2, 1]
    assert counts(funnel_check(api, {**body, "filters": {"brand_id": "f-brand-2",
                                                         "region": ["EU", "LATAM"]}})) == [0, 0]


def test_funnel_answer_shape_and_empty_rates(api):
    body = {"steps": [DEPOSIT, {**BET, "name": "bet"}], "window_sec": 60,
            "filters": brand("f-ties"), "from": "2025-09-01", "to": "2025-09-02"}
    r = api.funnel(body)
    assert_answer(r, cref.funnel(SENT, body))
    assert r.json()["total"] == 0
    assert r.json()["steps"] == [
        {"name": "wallet.credit", "count": 0, "rate": None, "median_sec": None},
        {"name": "bet", "count": 0, "rate": None, "median_sec": None}]
    assert r.json()["window_sec"] == 60 and r.json()["correlate_by"] == "player_id"


# --------------------------------------------------------------------------- funnel: generated

STEP_POOL: list[dict[str, Any]] = [
    INTENT, {"event": "payment.intent", "method": "card"}, CAPTURED,
    {"event": "payment.captured", "method": ["card", "paypal"]}, DEPOSIT,
    {"event": "wallet.credit"}, {"event": "wallet.credit", "reason": ["deposit", "win"]},
    {"event": "wallet.credit", "reason": "win"}, BET, {"event": "bet.placed", "game_id": "g_01"},
    {"event": "session.started"},
]
PATH_POOL: list[dict[str, Any]] = [
    {"event": "session.started"}, INTENT, CAPTURED, DEPOSIT, BET,
    {"event": "bet.placed", "game_id": "g_01"}, {"event": "wallet.credit", "reason": "win"}]
PAYMENT_POOL = [INTENT, {"event": "payment.intent", "method": "card"}, CAPTURED,
                {"event": "payment.failed"}, {"event": "payment.captured", "method": "paypal"}]
EXCLUSION_POOL = [{"event": "payment.failed"}, {"event": "session.started"},
                  {"event": "payment.failed", "method": "card"},
                  {"event": "wallet.credit", "reason": "win"},
                  {"event": "bet.placed", "game_id": "g_02"}]
FILTER_POOL: list[dict[str, Any]] = [
    {}, {}, {"brand_id": "rf-1"}, {"brand_id": ["rf-1", "rf-2"]}, {"region": "UK"},
    {"currency": "EUR"}, {"brand_id": "rf-2", "currency": ["GBP"]},
    {"method": ["card", "paypal"]}]


def generated_funnels(count: int = 150, seed: int = 42) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        by_payment = rng.random() < 0.2
        pool = PAYMENT_POOL if by_payment else STEP_POOL
        if by_payment or rng.random() < 0.4:  # anything, in any order
            steps = [dict(rng.choice(pool)) for _ in range(rng.randint(1, 4))]
        else:  # along the usual path
            picks = sorted(rng.sample(range(len(PATH_POOL)), rng.randint(2, 4)))
            steps = [dict(PATH_POOL[i]) for i in picks]
        for step in steps[1:]:
            if rng.random() < 0.25:
                step["within_sec"] = rng.choice([15, 30, 120, 600])
        body: dict[str, Any] = {
            "steps": steps, "window_sec": rng.choice([15, 30, 60, 300, 900, 3600, 7200]),
            "from": rng.choice(["2025-10-05", "2025-10-05T09:30:00Z",
                                "2025-10-05T10:00:07.5Z"]),
            "to": rng.choice(["2025-10-06", "2025-10-05T11:00:00Z", "2025-10-05T10:30:00Z"])}
        if filters := rng.choice(FILTER_POOL):
            body["filters"] = filters
        else:
            body["filters"] = {"brand_id": ["rf-1", "rf-2"]}  # not the scenario brands
        if by_payment:
            body["correlate_by"] = "payment_id"
        kinds = {s["event"] for s in steps}
        exclusions = [e for e in EXCLUSION_POOL if e["event"] not in kinds]
        if len(steps) > 1 and exclusions and rng.random() < 0.5:
            ex = dict(rng.choice(exclusions))
            if rng.random() < 0.6:
                i = rng.randint(1, len(steps) - 1)
                ex["between"] = [i, rng.randint(i + 1, len(steps))]
            body["exclusions"] = [ex]
        out.append(body)
    return out


GENERATED = generated_funnels()


def test_generated_funnels_exercise_the_rules():
    """Guards the generator: the random cases reach deep steps, re-enter, exclude and tie."""
    answers = [cref.funnel(SENT, body) for body in GENERATED]
    assert sum(a["total"] > 0 for a in answers) > 100
    assert sum(len(a["steps"]) >= 3 and a["steps"][2]["count"] > 0 for a in answers) > 20
    assert sum("exclusions" in b for b in GENERATED) > 20
    assert sum(any(cref.could_share(s, t) for i, s in enumerate(b["steps"])
                   for t in b["steps"][i + 1:]) for b in GENERATED) > 20
    assert sum(a["steps"][-1]["median_sec"] == 0.0 for a in answers if len(a["steps"]) > 1) > 3
    ignoring_exclusions = [cref.funnel(SENT, {**b, "exclusions": []}) for b in GENERATED]
    assert sum(a != b for a, b in zip(answers, ignoring_exclusions, strict=True)) > 5


@pytest.mark.parametrize("index", range(len(GENERATED)))
def test_generated_funnel_matches_the_reference(api, index):
    body = GENERATED[index]
    assert_answer(api.funnel(body), cref.funnel(SENT, body))


def _both_plans(api: Api, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The funnel's answer from the kept rows (``step_times``, on either store) and from
    the events."""
    runtime = api.client.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.ingest.flush()  # every acknowledged event applied
    f = funnel_.parse(body)
    assert funnel_.kept(f)
    return [funnel_.answer(runtime.backend, f, kept_rows=kept) for kept in (True, False)]


KEPT_POOL: list[dict[str, Any]] = [
    {"event": "session.started"}, INTENT, CAPTURED, DEPOSIT, BET,
    {"event": "wallet.credit", "reason": "win"}, {"event": "payment.failed"}]
KEPT_FILTER_POOL: list[dict[str, Any]] = [
    {"brand_id": ["rf-1", "rf-2"]}, {"brand_id": "rf-1"}, {"region": "UK"},
    {"brand_id": "rf-2", "region": ["EU"]}]


def kept_funnels(count: int = 60, seed: int = 7) -> list[dict[str, Any]]:
    """Funnels the kept rows can answer (player units, conditions on ``reason``, filters on
    brand and region, no exclusions, no two steps able to share an event), over windows
    that cross hours up to a day."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        picks = rng.sample(range(len(KEPT_POOL)), rng.randint(2, 4))
        if rng.random() < 0.6:
            picks.sort()  # along the usual path
        steps = [dict(KEPT_POOL[i]) for i in picks]
        for step in steps[1:]:
            if rng.random() < 0.25:
                step["within_sec"] = rng.choice([15, 30, 120, 600, 4000])
        out.append({"steps": steps,
                    "window_sec": rng.choice([15, 60, 300, 3600, 3601, 7200, 10_800, 86_400]),
                    "from": rng.choice(["2025-10-05", "2025-10-05T09:30:00Z",
                                        "2025-10-05T10:00:07.5Z"]),
                    "to": rng.choice(["2025-10-06", "2025-10-05T11:00:00Z",
                                      "2025-10-05T10:30:00Z"]),
                    "filters": dict(rng.choice(KEPT_FILTER_POOL))})
    return out


KEPT_BODIES = [body for body in GENERATED if funnel_.kept(funnel_.parse(body))] \
    + kept_funnels()


def test_generated_funnels_exercise_the_kept_rows():
    """Guards the generator: enough random cases can be answered from the kept rows, and
    they reach deep steps across hours."""
    assert all(funnel_.kept(funnel_.parse(body)) for body in KEPT_BODIES)
    assert len(KEPT_BODIES) >= 60, len(KEPT_BODIES)
    answers = [cref.funnel(SENT, body) for body in KEPT_BODIES]
    assert sum(a["total"] > 0 for a in answers) > 40
    assert sum(len(a["steps"]) >= 3 and a["steps"][2]["count"] > 0 for a in answers) > 10
    assert sum(body["window_sec"] > 3600 for body in KEPT_BODIES) > 10


@pytest.mark.parametrize("index", range(len(KEPT_BODIES)))
def test_generated_funnel_from_kept_rows_and_events_match_the_reference(api, index):
    """The two plans, each asked directly, give the reference's answer; the API (which
    chooses the kept rows for these) too."""
    body = KEPT_BODIES[index]
    expected = cref.funnel(SENT, body)
    for got in _both_plans(api, body):
        diffs = close({k: got[k] for k in expected}, expected)
        assert not diffs, diffs[:10]
    assert_answer(api.funnel(body), expected)


@contextmanager
def applied(settings: Settings,
            sent: list[dict[str, Any]]) -> Iterator[tuple[TestClient, dict[str, str], Any]]:
    """An app on a store of its own holding ``sent`` (applied): client, headers, runtime."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        send(client, headers, sent)
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert runtime.ingest.flush()
        yield client, headers, runtime


@on_duckdb_only("the players' hashes are DuckDB's (a ClickHouse store joins on the strings)")
def test_funnel_kept_rows_hash_collision_is_answered_from_the_events(tmp_path):
    """A (brand, player) pair arriving under a hash that stands for another pair (made so
    here: a real collision of 64-bit hashes cannot be found on purpose) marks the hash
    collided; the kept rows, which tell players apart by the hash alone, are then not
    trusted and the answer comes from the events, exact."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    sent = [ev("payment.intent", "2025-10-05T10:00:00Z", "pa", "cb"),
            ev("payment.captured", "2025-10-05T10:00:30Z", "pb", "cb"),
            ev("payment.intent", "2025-10-05T10:00:00Z", "pb", "cb")]
    later = [ev("payment.captured", "2025-10-05T10:01:00Z", "pb", "cb")]
    body = {"steps": [INTENT, CAPTURED], "window_sec": 600, "from": "2025-10-05",
            "to": "2025-10-06", "filters": brand("cb")}
    with applied(settings, sent) as (client, headers, runtime):
        backend = runtime.backend
        f = funnel_.parse(body)
        c = funnel_.compile_kept(f)
        assert not backend.execute(c.tree, c.params).column("collided")[0].as_py()
        # pb's hash now stands for another pair: pb's next event meets it
        backend.query("UPDATE unit_hashes SET player_id = 'pz' WHERE player_id = 'pb'")
        send(client, headers, later)
        assert runtime.ingest.flush()
        assert backend.query("SELECT player_id, collided FROM unit_hashes WHERE "
                             "tenant_id = 'cb' ORDER BY player_id").to_pylist() == [
            {"player_id": "pa", "collided": False}, {"player_id": "pz", "collided": True}]
        assert backend.execute(c.tree, c.params).column("collided")[0].as_py()
        expected = cref.funnel(sent + later, body)
        assert counts(expected) == [2, 1]
        assert_answer(client.post(FUNNEL, json=body, headers=headers), expected)
        assert_answer(client.post(FUNNEL, json={**body, "window_sec": 10}, headers=headers),
                      cref.funnel(sent + later, {**body, "window_sec": 10}))


@on_duckdb_only("the players' hashes are DuckDB's (a ClickHouse store joins on the strings)")
def test_retention_and_ltv_join_on_the_strings_once_a_hash_has_collided(tmp_path):
    """Retention and LTV meet members and their rows on the players' hash alone while no
    hash has collided. A collision is made here (a real one of 64-bit hashes cannot be found
    on purpose): pc, no member, bets on day 1 under pa's hash — the hashed plans count it as
    pa's. Once `unit_hashes` says a hash collided, the answers are on the strings."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    b = "hr"
    sent = [ev("wallet.credit", "2025-10-10T12:00:00Z", "pa", b),
            ev("wallet.credit", "2025-10-10T13:00:00Z", "pb", b),
            ev("bet.placed", "2025-10-11T12:00:00Z", "pb", b),
            ev("bet.placed", "2025-10-11T14:00:00Z", "pc", b),
            ev("bet.settled", "2025-10-11T12:00:00Z", "pb", b, stake_minor=100),
            ev("bet.settled", "2025-10-11T14:00:00Z", "pc", b, stake_minor=500),
            ev("rg.reality_check", "2025-10-20T00:00:00Z", "wm", b)]
    body = {"cohort": "first_deposit", "start_date": "2025-10-10", "end_date": "2025-10-10",
            "days": [1], "filters": brand(b)}
    wm = cref.watermark(sent)
    expected = cref.retention(sent, body, wm)
    assert expected["rows"] == [{"cohort_date": "2025-10-10", "size": 2, "d1": 0.5}]
    r = retention_.parse_retention(body)
    value = cref.ltv(sent, [], cohort="first_deposit", metric="ggr", horizon=3,
                     start_date="2025-10-10", end_date="2025-10-10", wm=wm, currency="EUR",
                     filters=brand(b))["cohorts"]
    assert value[0]["ltv_minor"] == [0, 50, 50]  # pb's 100 over 2 members
    q = retention_.Ltv("first_deposit", METRICS["ggr"], date(2025, 10, 10),
                       date(2025, 10, 10), 3, {"brand_id": (b,)}, "EUR")
    with applied(settings, sent) as (client, headers, runtime):
        backend = runtime.backend
        assert retention_.hashed_players(backend)
        assert_answer(client.post(RETENTION, json=body, headers=headers), expected)
        naive = wm.astimezone(UTC).replace(tzinfo=None)  # the store's watermarks: naive UTC
        fx = runtime.fx
        assert retention_.answer_ltv(backend, fx, q, naive)["cohorts"] == value
        for table in ("active_1m", "active_1h", "active_1d", "player_days"):
            backend.query(f"UPDATE {table} SET k = (SELECT k FROM unit_hashes WHERE "  # noqa: S608
                          "player_id = 'pa') WHERE player_id = 'pc'")
        wrong = retention_.answer_retention(backend, r, naive)
        assert wrong["rows"][0]["d1"] == 1.0  # the made collision: pc's bet taken for pa's
        assert retention_.answer_ltv(backend, fx, q, naive)["cohorts"][0]["ltv_minor"] == \
            [0, 300, 300]  # and pc's 500 for pa's
        backend.query("UPDATE unit_hashes SET collided = true WHERE player_id = 'pa'")
        assert not retention_.hashed_players(backend)
        assert retention_.answer_retention(backend, r, naive) == expected
        assert retention_.answer_ltv(backend, fx, q, naive)["cohorts"] == value


# --------------------------------------------------------------------------- funnel: errors

OK_FUNNEL = {"steps": [INTENT, CAPTURED, DEPOSIT], "window_sec": 600, **DAY}


@pytest.mark.parametrize(("change", "named"), [
    ({"steps": [{"event": "bet.exploded"}]}, ("bet.exploded",)),
    ({"steps": [INTENT, {"event": "payment.captured", "colour": "red"}]}, ("colour",)),
    ({"steps": [{"reason": "deposit"}]}, ("event",)),
    ({"steps": []}, ("steps",)),
    ({"steps": [INTENT] * 11}, ("steps",)),
    ({"window_sec": 0}, ("window_sec",)),
    ({"window_sec": 90 * 86400 + 1}, ("window_sec",)),
    ({"window_sec": "an hour"}, ("window_sec",)),
    ({"window_sec": None}, ("window_sec",)),
    ({"exclusions": [{"event": "payment.failed", "between": [0, 2]}]}, ("between",)),
    ({"exclusions": [{"event": "payment.failed", "between": [2, 2]}]}, ("between",)),
    ({"exclusions": [{"event": "payment.failed", "between": [1, 4]}]}, ("between",)),
    ({"exclusions": [{"event": "payment.failed", "between": [2, 1]}]}, ("between",)),
    ({"exclusions": [{"event": "payment.nope"}]}, ("payment.nope",)),
    ({"correlate_by": "amount_minor"}, ("correlate_by", "amount_minor")),
    ({"correlate_by": "colour"}, ("correlate_by", "colour")),
    ({"filters": {"colour": "red"}}, ("colour",)),
    ({"from": "yesterday"}, ("from",)),
    ({"from": "2025-10-02", "to": "2025-10-01"}, ("from", "to")),
], ids=["event-type", "payload-field", "no-event", "no-steps", "11-steps", "window-0",
        "window-over-90d", "window-text", "window-missing", "between-0", "between-equal",
        "between-past-n", "between-reversed", "exclusion-type", "correlate-number",
        "correlate-unknown", "filter-key", "bad-from", "to-before-from"])
def test_funnel_bad_requests_are_400_naming_the_field(api, change, named):
    body = {**OK_FUNNEL, **change}
    if body.get("window_sec", 0) is None:
        del body["window_sec"]
    assert_problem(api.funnel(body), 400, *named)


def test_funnel_limits_are_inclusive(api):
    body = {"steps": [INTENT] + [CAPTURED] * 9, "window_sec": 90 * 86400,
            "filters": brand("f-reentry"), **DAY}  # 10 steps, a 90-day window
    a = funnel_check(api, body)
    assert counts(a)[:4] == [4, 4, 1, 0]  # only pb captures twice
    assert counts(funnel_check(api, {**body, "steps": [INTENT, CAPTURED], "window_sec": 1})) \
        == [4, 0]


def test_funnel_body_that_is_not_an_object_is_400(api):
    r = api.client.post(FUNNEL, content=b"[1, 2]", headers={**api.headers,
                                                           "Content-Type": "application/json"})
    assert_problem(r, 400)


def test_funnel_brand_outside_the_token_is_403_and_the_answer_is_confined(api):
    limited = api.token(brands="f-brand-1")
    body = {"steps": [DEPOSIT, BET], "window_sec": 3600, **DAY}
    assert_problem(api.funnel({**body, "filters": brand("f-brand-2")}, limited), 403,
                   "f-brand-2", "brand")
    assert_problem(api.funnel({**body, "filters": {"brand_id": ["f-brand-1", "f-brand-2"]}},
                              limited), 403)
    r = api.funnel(body, limited)  # no filter: only the token's brand
    assert_answer(r, cref.funnel(SENT, {**body, "filters": brand("f-brand-1")}))
    assert counts(r.json()) == [2, 1]
    uk_only = api.token(regions="UK")
    assert_problem(api.funnel({**body, "filters": {"region": "EU"}}, uk_only), 403)
    r = api.funnel({**body, "filters": brand("f-brand-2")}, uk_only)
    assert_answer(r, cref.funnel(SENT, {**body, "filters": {**brand("f-brand-2"),
                                                            "region": "UK"}}))
    assert_problem(api.funnel({**body, "filters": {"region": "NA"}}), 403)  # not served here
    no_read = api.token(scopes="events:write")
    assert api.funnel(body, no_read).status_code == 403
    assert api.client.post(FUNNEL, json=body).status_code == 401


# --------------------------------------------------------------------------- retention


def test_retention_days_follow_the_timezone_across_the_dst_change(api):
    body = {"cohort": "first_deposit", "start_date": "2025-10-25", "end_date": "2025-10-27",
            "days": [0, 1, 4], "filters": brand("r-dst"), "timezone": "Europe/London"}
    a = retention_check(api, body)
    # London: pc on 25 Oct (bets 25 Oct 23:59 BST and 29 Oct); pa (00:30 BST) and pb (23:30
    # GMT) both on the 25-hour 26 Oct; pb returns on 26 Oct, pa on 27 Oct
    assert a["rows"] == [
        {"cohort_date": "2025-10-25", "size": 1, "d0": 1.0, "d1": 0.0, "d4": 1.0},
        {"cohort_date": "2025-10-26", "size": 2, "d0": 0.5, "d1": 0.5, "d4": 0.0}]
    # UTC: pc on 24 Oct (out of range), pa on 25 Oct, pb on 26 Oct
    a = retention_check(api, {**body, "timezone": "UTC"})
    assert a["rows"] == [
        {"cohort_date": "2025-10-25", "size": 1, "d0": 0.0, "d1": 0.0, "d4": 0.0},
        {"cohort_date": "2025-10-26", "size": 1, "d0": 1.0, "d1": 0.0, "d4": 0.0}]
    assert a["timezone"] == "UTC" and a["cohort"] == "first_deposit" and a["mode"] == "on"


def test_retention_mode_on_or_after(api):
    body = {"cohort": "first_deposit", "start_date": "2025-10-25", "end_date": "2025-10-27",
            "days": [0, 1, 4], "filters": brand("r-dst"), "timezone": "Europe/London",
            "mode": "on_or_after"}
    a = retention_check(api, body)
    assert a["rows"] == [
        {"cohort_date": "2025-10-25", "size": 1, "d0": 1.0, "d1": 1.0, "d4": 1.0},
        {"cohort_date": "2025-10-26", "size": 2, "d0": 1.0, "d1": 0.5, "d4": 0.0}]
    assert a["mode"] == "on_or_after"


def test_retention_unfinished_days_are_null(api):
    # the brand's watermark is 2025-11-01T00:00Z, the end of London 31 Oct (GMT): 31 Oct is
    # finished (d6 of 25 Oct, d5 of 26 Oct), 1 Nov is not
    body = {"cohort": "first_deposit", "start_date": "2025-10-25", "end_date": "2025-10-26",
            "days": [5, 6, 7], "filters": brand("r-dst"), "timezone": "Europe/London"}
    a = retention_check(api, body)
    assert [[r[f"d{n}"] for n in (5, 6, 7)] for r in a["rows"]] == \
        [[0.0, 0.0, None], [0.0, None, None]]
    # in New York 31 Oct ends at 04:00Z on 1 Nov: not finished at 00:00Z
    a = retention_check(api, {**body, "timezone": "America/New_York", "days": [0, 5]})
    assert a["rows"][-1]["cohort_date"] == "2025-10-26" and a["rows"][-1]["d5"] is None


def test_retention_by_registration_and_a_return_step_object(api):
    body = {"cohort": "registration", "start_date": "2025-10-24", "end_date": "2025-10-31",
            "days": [0, 1, 2, 3], "filters": brand("r-dst"), "timezone": "Europe/London",
            "return_event": DEPOSIT}
    a = retention_check(api, body)
    # pa registered London 24 Oct 23:00 and deposits 26 Oct (d2); pb registered 25 Oct 00:30
    # and deposits 26 Oct (d1)
    assert a["rows"] == [
        {"cohort_date": "2025-10-24", "size": 1, "d0": 0.0, "d1": 0.0, "d2": 1.0, "d3": 0.0},
        {"cohort_date": "2025-10-25", "size": 1, "d0": 0.0, "d1": 1.0, "d2": 0.0, "d3": 0.0}]
    a = retention_check(api, {**body, "timezone": "UTC", "return_event": "bet.placed"})
    assert [r["cohort_date"] for r in a["rows"]] == ["2025-10-24"]
    assert a["rows"][0]["size"] == 2


def test_retention_day_zero_is_the_whole_cohort_day(api):
    # Reading: "a return event on day c+N" with N = 0 is any return event on day c, also one
    # before the cohort event (pg bets at 10:00, deposits at 12:00); pi's bet the day before
    # is no return
    body = {"cohort": "first_deposit", "start_date": "2025-10-27", "end_date": "2025-10-27",
            "days": [0, 1], "filters": brand("r-d0")}
    a = retention_check(api, body)
    assert a["rows"] == [{"cohort_date": "2025-10-27", "size": 3, "d0": 2 / 3, "d1": 0.0}]


def test_retention_range_and_day_limits_are_inclusive(api):
    body = {**OK_RETENTION, "start_date": "2025-01-01", "end_date": "2026-01-01",
            "days": [0, 365], "filters": brand("r-dst")}  # 366 days
    a = retention_check(api, body)
    assert a["rows"] and all(r["d365"] is None for r in a["rows"])


def test_retention_defaults(api):
    body = {"cohort": "first_deposit", "start_date": "2025-10-20", "end_date": "2025-11-05"}
    a = retention_check(api, body)
    assert a["timezone"] == "UTC" and a["mode"] == "on"
    assert all(set(r) == {"cohort_date", "size", "d1", "d7", "d14", "d30"} for r in a["rows"])
    assert all(r["d30"] is None for r in a["rows"])
    assert any(r["d1"] not in (None, 0.0) for r in a["rows"])


RET_TZ = ["UTC", "Europe/London", "America/New_York", "Asia/Kolkata", "Australia/Sydney"]
RET_RETURNS: list[Any] = ["bet.placed", "bet.settled", DEPOSIT, "wallet.credit",
                          {"event": "bet.placed", "currency": ["GBP", "USD"]}]
RET_FILTERS: list[dict[str, Any] | None] = [
    None, {"brand_id": "rc-1"}, {"brand_id": ["rc-2"]}, {"region": "UK"},
    {"brand_id": ["rc-1", "rc-2"], "region": ["EU"]}]


def generated_retention(count: int = 40, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        first = rng.randrange(len(COHORT_DAYS) - 1)
        last = rng.randrange(first, len(COHORT_DAYS))
        body: dict[str, Any] = {
            "cohort": rng.choice(["first_deposit", "first_deposit", "registration"]),
            "start_date": COHORT_DAYS[first].isoformat(),
            "end_date": COHORT_DAYS[last].isoformat(),
            "days": sorted(rng.sample(range(0, 16), rng.randint(1, 5)), key=lambda _: rng.random()),
            "timezone": rng.choice(RET_TZ), "mode": rng.choice(["on", "on_or_after"]),
            "return_event": rng.choice(RET_RETURNS)}
        if filters := rng.choice(RET_FILTERS):
            body["filters"] = filters
        out.append(body)
    return out


GENERATED_RETENTION = generated_retention()


def test_generated_retention_exercises_the_rules():
    answers = [cref.retention(SENT, b, cref.watermark(SENT, cref.scope_brands(b.get("filters"))))
               for b in GENERATED_RETENTION]
    rows = [r for a in answers for r in a["rows"]]
    values = [v for r in rows for k, v in r.items() if k.startswith("d")]
    assert len(rows) > 100
    assert sum(v is None for v in values) > 20 and sum(v not in (None, 0.0) for v in values) > 50
    # the zone changes cohorts: some UTC and local days differ for the same players
    firsts = cref.first_cohort_events(SENT, "first_deposit")
    assert sum(cref.t(e).date() != cref.t(e).astimezone(cref.ZoneInfo("America/New_York")).date()
               for e in firsts.values()) > 5


@pytest.mark.parametrize("index", range(len(GENERATED_RETENTION)))
def test_generated_retention_matches_the_reference(api, index):
    retention_check(api, GENERATED_RETENTION[index])


OK_RETENTION = {"cohort": "first_deposit", "start_date": "2025-10-20",
                "end_date": "2025-10-31"}


@pytest.mark.parametrize(("change", "named"), [
    ({"timezone": "Mars/Olympus_Mons"}, ("Mars/Olympus_Mons", "timezone")),
    ({"days": [366]}, ("days",)),
    ({"days": [-1]}, ("days",)),
    ({"days": [1, 1]}, ("days",)),
    ({"days": []}, ("days",)),
    ({"days": ["seven"]}, ("days",)),
    ({"cohort": "first_bet"}, ("cohort", "first_bet")),
    ({"start_date": "2025-10-31", "end_date": "2025-10-20"}, ("end_date", "start_date")),
    ({"start_date": "2025-01-01", "end_date": "2026-01-02"}, ("end_date", "start_date", "366")),
    ({"start_date": "20 Oct"}, ("start_date",)),
    ({"filters": {"game_id": "g_01"}}, ("game_id",)),
    ({"return_event": "bet.exploded"}, ("bet.exploded",)),
    ({"return_event": {"event": "bet.placed", "colour": "red"}}, ("colour",)),
    ({"mode": "sometimes"}, ("mode", "sometimes")),
], ids=["timezone", "day-366", "day-negative", "days-repeated", "days-empty", "days-text",
        "cohort", "end-before-start", "over-366-days", "bad-date", "filter-key",
        "return-type", "return-field", "mode"])
def test_retention_bad_requests_are_400_naming_the_field(api, change, named):
    assert_problem(api.retention({**OK_RETENTION, **change}), 400, *named)


def test_retention_brand_outside_the_token_is_403(api):
    limited = api.token(brands="r-dst")
    assert_problem(api.retention({**OK_RETENTION, "filters": brand("rc-1")}, limited), 403)
    body = {**OK_RETENTION, "days": [0, 1]}
    r = api.retention(body, limited)
    wm = cref.watermark(SENT, ["r-dst"])
    assert_answer(r, cref.retention(SENT, {**body, "filters": brand("r-dst")}, wm))
    assert ref.parse_time(r.headers["X-Data-Watermark"]) == wm


# --------------------------------------------------------------------------- LTV


def test_ltv_converts_per_day_and_currency_then_cumulates(api):
    f = brand("l-fx")
    a = ltv_check(api, 90, f, cohort="first_deposit", metric="ggr", horizon="90d",
                  start_date="2025-10-20", end_date="2025-10-31")
    # 21 Oct (pa EUR, pb GBP; watermark 25 Oct 00:00Z → days 21..24):
    #   day 0: 1002 + round(1001 × 1.15 = 1151.15) = 2153 → /2 = 1076.5 → 1076 (half-even)
    #   day 1: + round(50 × 1.2) = 60 → 2213 / 2 = 1106.5 → 1106
    #   day 2 (no rate of its own: 1.2): + round(7 × 1.2 = 8.4) = 8 → 2221 / 2 → 1110.5 → 1110
    #   day 3: nothing → 1110
    # 22 Oct (pc, pd, pe, USD 0.5): day 0: 15 USD minor of the cohort → 7.5 → 8 → 8/3 → 3
    #   (converting per player would give 2 + 2 + 2); day 1: + 15 × 0.5 = 7.5 → 8 → 16/3 → 5
    assert a["cohorts"] == [
        {"date": "2025-10-21", "size": 2, "ltv_minor": [1076, 1106, 1110, 1110]},
        {"date": "2025-10-22", "size": 3, "ltv_minor": [3, 5, 5]}]
    assert (a["metric"], a["currency"], a["horizon"]) == ("ggr", "EUR", 90)


def test_ltv_ngr_horizon_and_reporting_currency(api):
    f = brand("l-fx")
    a = ltv_check(api, 2, f, cohort="first_deposit", metric="ngr", horizon="2",
                  start_date="2025-10-21", end_date="2025-10-21")
    # day 1: (50 − 2 − 3 − 10) × 1.2 = 42 → 2153 + 42 = 2195 / 2 = 1097.5 → 1098
    assert a["cohorts"] == [{"date": "2025-10-21", "size": 2, "ltv_minor": [1076, 1098]}]
    a = ltv_check(api, 3, f, cohort="first_deposit", metric="ggr", horizon="3d",
                  start_date="2025-10-21", end_date="2025-10-22", currency="GBP")
    # GBP: 1002 EUR / 1.15 = 871.30 → 871, +1001 → 1872 / 2 = 936
    assert a["cohorts"][0]["ltv_minor"][0] == 936
    assert a["currency"] == "GBP" and a["horizon"] == 3


def test_ltv_registration_cohort_and_filters(api):
    for metric in ("ggr", "ngr"):
        ltv_check(api, 14, {"brand_id": ["rc-1", "rc-2"], "region": ["UK"]},
                  cohort="registration", metric=metric, horizon="14d",
                  start_date="2025-10-20", end_date="2025-11-05")


LTV_FILTERS: list[dict[str, list[str]] | None] = [
    None, {"brand_id": ["rc-1"]}, {"brand_id": ["rc-2"]}, {"region": ["EU"]},
    {"brand_id": ["rc-1", "l-fx"]}]


def generated_ltv(count: int = 30, seed: int = 13) -> list[tuple[int, dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        first = rng.randrange(len(COHORT_DAYS))
        last = rng.randrange(first, len(COHORT_DAYS))
        days = rng.choice([1, 2, 5, 7, 14, 30, 90, 365])
        params: dict[str, Any] = {
            "cohort": rng.choice(["first_deposit", "registration"]),
            "metric": rng.choice(["ggr", "ngr"]),
            "horizon": f"{days}d" if rng.random() < 0.5 else str(days),
            "start_date": COHORT_DAYS[first].isoformat(),
            "end_date": COHORT_DAYS[last].isoformat(),
            "filters": rng.choice(LTV_FILTERS)}
        if rng.random() < 0.5:
            params["currency"] = rng.choice(["EUR", "GBP", "USD"])
        out.append((days, params))
    return out


GENERATED_LTV = generated_ltv()


def test_generated_ltv_exercises_the_rules():
    lengths = []
    for days, params in GENERATED_LTV:
        f = params["filters"]
        a = cref.ltv(SENT, RATES, cohort=params["cohort"], metric=params["metric"],
                     horizon=days, start_date=params["start_date"],
                     end_date=params["end_date"], wm=cref.watermark(SENT, cref.scope_brands(f)),
                     currency=params.get("currency", ref.BASE), filters=f)
        lengths += [(len(c["ltv_minor"]), days) for c in a["cohorts"]]
    assert len(lengths) > 100
    assert sum(n < days for n, days in lengths) > 20  # young cohorts are cut by the watermark
    assert sum(n == days for n, days in lengths) > 20


@pytest.mark.parametrize("index", range(len(GENERATED_LTV)))
def test_generated_ltv_matches_the_reference(api, index):
    days, params = GENERATED_LTV[index]
    ltv_check(api, days, **params)


OK_LTV = {"cohort": "first_deposit", "metric": "ggr", "horizon": "30d",
          "start_date": "2025-10-20", "end_date": "2025-10-31"}


@pytest.mark.parametrize(("change", "named"), [
    ({"cohort": "first_bet"}, ("cohort", "first_bet")),
    ({"metric": "stake"}, ("metric", "stake")),
    ({"metric": "bogus"}, ("metric", "bogus")),
    ({"horizon": "0"}, ("horizon",)),
    ({"horizon": "366d"}, ("horizon",)),
    ({"horizon": "90h"}, ("horizon",)),
    ({"horizon": "ninety"}, ("horizon",)),
    ({"filters": "game_id:g_01"}, ("game_id",)),
    ({"start_date": "2025-10-31", "end_date": "2025-10-20"}, ("end_date", "start_date")),
    ({"start_date": "2025-13-01"}, ("start_date",)),
], ids=["cohort", "metric-not-money", "metric-unknown", "horizon-0", "horizon-366",
        "horizon-unit", "horizon-text", "filter-key", "end-before-start", "bad-date"])
def test_ltv_bad_requests_are_400_naming_the_field(api, change, named):
    assert_problem(api.ltv(**{**OK_LTV, **change}), 400, *named)


def test_ltv_reporting_currency_without_a_rate_is_422(api):
    assert_problem(api.ltv(**{**OK_LTV, "currency": "CHF"}), 422, "CHF")


def test_ltv_brand_or_metric_outside_the_token_is_403(api):
    limited = api.token(brands="l-fx", metrics="ggr,ltv")
    assert_problem(api.ltv(limited, **{**OK_LTV, "filters": "brand_id:rc-1"}), 403)
    assert_problem(api.ltv(limited, **{**OK_LTV, "metric": "ngr"}), 403, "ngr")
    r = api.ltv(limited, **OK_LTV)
    wm = cref.watermark(SENT, ["l-fx"])
    assert_answer(r, cref.ltv(SENT, RATES, cohort="first_deposit", metric="ggr", horizon=30,
                              start_date="2025-10-20", end_date="2025-10-31", wm=wm,
                              filters=brand("l-fx")))
    assert [c["size"] for c in r.json()["cohorts"]] == [2, 3]


# --------------------------------------------------------------------------- caching headers


@pytest.mark.parametrize("which", ["funnel", "retention", "ltv"])
def test_etag_304_and_headers(api, which):
    def call(extra: dict[str, str] | None = None, change: bool = False) -> Any:
        headers = {**api.headers, **(extra or {})}
        if which == "funnel":
            return api.funnel({"steps": [DEPOSIT, BET], "window_sec": 600 + change,
                               "filters": brand("f-cond"), **DAY}, headers)
        if which == "retention":
            return api.retention({**OK_RETENTION, "days": [1, 2 + change]}, headers)
        return api.ltv(headers, **{**OK_LTV, "horizon": f"{30 + change}d"})

    first = call()
    assert first.status_code == 200, first.text
    assert first.headers.get("Cache-Control")
    assert first.headers.get("X-Data-Watermark")
    etag = first.headers["ETag"]
    again = call({"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers.get("ETag") == etag
    other = call(change=True)
    assert other.status_code == 200 and other.headers["ETag"] != etag


# --------------------------------------------------------------------------- late events


def test_late_events_change_funnel_answer_and_etag(client, headers):
    b = "late-f"
    sent = [ev("payment.intent", f"{D}T10:00:00Z", "pa", b),
            ev("payment.intent", f"{D}T11:00:00Z", "pb", b),
            ev("payment.captured", f"{D}T11:00:30Z", "pb", b)]
    send(client, headers, sent)
    body = {"steps": [INTENT, CAPTURED], "window_sec": 600, "filters": brand(b), **DAY}
    before = client.post(FUNNEL, json=body, headers=headers)
    assert_answer(before, cref.funnel(sent, body))
    assert counts(before.json()) == [2, 1]
    etag = before.headers["ETag"]
    assert ref.parse_time(before.headers["X-Data-Watermark"]) == at(f"{D}T11:00:30Z")
    assert client.post(FUNNEL, json=body,
                       headers={**headers, "If-None-Match": etag}).status_code == 304
    late = ev("payment.captured", f"{D}T10:05:00Z", "pa", b)
    send(client, headers, [late])
    after = client.post(FUNNEL, json=body, headers={**headers, "If-None-Match": etag})
    assert_answer(after, cref.funnel(sent + [late], body))
    assert counts(after.json()) == [2, 2] and after.headers["ETag"] != etag
    # an event of another brand changes neither the answer nor (ideally) its meaning
    send(client, headers, [ev("payment.captured", f"{D}T10:06:00Z", "pa", "late-other")])
    assert client.post(FUNNEL, json=body, headers=headers).json() == after.json()


def test_late_earlier_first_deposit_moves_the_player_to_an_earlier_cohort(client, headers):
    b = "late-r"
    sent = [ev("wallet.credit", "2025-10-10T12:00:00Z", "pa", b),
            ev("bet.placed", "2025-10-11T12:00:00Z", "pa", b),
            ev("wallet.credit", "2025-10-10T13:00:00Z", "pb", b),
            ev("rg.reality_check", "2025-10-20T00:00:00Z", "wm", b)]
    send(client, headers, sent)
    body = {"cohort": "first_deposit", "start_date": "2025-10-10", "end_date": "2025-10-12",
            "days": [0, 1], "filters": brand(b)}
    wm = cref.watermark(sent)
    before = client.post(RETENTION, json=body, headers=headers)
    assert_answer(before, cref.retention(sent, body, wm))
    assert before.json()["rows"] == [
        {"cohort_date": "2025-10-10", "size": 2, "d0": 0.0, "d1": 0.5}]
    etag = before.headers["ETag"]
    # pa's real first deposit arrives late, a day before the range: pa leaves 10 Oct's cohort
    late = ev("wallet.credit", "2025-10-09T23:00:00Z", "pa", b)
    send(client, headers, [late])
    after = client.post(RETENTION, json=body, headers={**headers, "If-None-Match": etag})
    assert_answer(after, cref.retention(sent + [late], body, wm))
    assert after.json()["rows"] == [
        {"cohort_date": "2025-10-10", "size": 1, "d0": 0.0, "d1": 0.0}]
    assert after.headers["ETag"] != etag
    wider_body = {**body, "start_date": "2025-10-09", "days": [0, 1, 2]}
    wider = client.post(RETENTION, json=wider_body, headers=headers)
    assert_answer(wider, cref.retention(sent + [late], wider_body, wm))
    assert wider.json()["rows"][0] == {"cohort_date": "2025-10-09", "size": 1, "d0": 0.0,
                                       "d1": 0.0, "d2": 1.0}
    # the same for LTV: one more day, in the late deposit's cohort
    ltv_body = {"cohort": "first_deposit", "metric": "ggr", "horizon": "3",
                "start_date": "2025-10-09", "end_date": "2025-10-12", "filters": f"brand_id:{b}"}
    r = client.get(LTV, params=ltv_body, headers=headers)
    assert_answer(r, cref.ltv(sent + [late], [], cohort="first_deposit", metric="ggr",
                              horizon=3, start_date="2025-10-09", end_date="2025-10-12", wm=wm,
                              filters=brand(b)))
    assert [c["date"] for c in r.json()["cohorts"]] == ["2025-10-09", "2025-10-10"]


def test_late_bet_changes_ltv_and_its_etag_and_the_watermark_bounds_the_days(client, headers):
    b = "late-l"
    assert client.post(FX, json=RATES, headers=headers).status_code == 200
    sent = [ev("wallet.credit", "2025-10-21T08:00:00Z", "pa", b),
            ev("wallet.credit", "2025-10-21T09:00:00Z", "pb", b, currency="GBP"),
            ev("bet.settled", "2025-10-21T10:00:00Z", "pa", b, stake_minor=500, win_minor=100),
            ev("bet.settled", "2025-10-22T10:00:00Z", "pb", b, stake_minor=300,
               currency="GBP"),
            ev("rg.reality_check", "2025-10-23T23:59:59.999999Z", "wm", b)]
    send(client, headers, sent)
    params = {"cohort": "first_deposit", "metric": "ggr", "horizon": "90d",
              "start_date": "2025-10-21", "end_date": "2025-10-21", "filters": f"brand_id:{b}"}

    def expected(events: list[dict[str, Any]]) -> dict[str, Any]:
        return cref.ltv(events, RATES, cohort="first_deposit", metric="ggr", horizon=90,
                        start_date="2025-10-21", end_date="2025-10-21",
                        wm=cref.watermark(events), filters=brand(b))

    before = client.get(LTV, params=params, headers=headers)
    assert_answer(before, expected(sent))
    # the watermark is one microsecond short of the end of 23 Oct: days 21 and 22 only;
    # 400 / 2 = 200, then + round(300 × 1.2) = 360 → 760 / 2 = 380
    assert before.json()["cohorts"] == [{"date": "2025-10-21", "size": 2,
                                         "ltv_minor": [200, 380]}]
    etag = before.headers["ETag"]
    late = ev("bet.settled", "2025-10-21T11:00:00Z", "pb", b, stake_minor=1001,
              currency="GBP")  # 1001 × 1.15 = 1151.15 → 1151
    send(client, headers, [late])
    after = client.get(LTV, params=params, headers={**headers, "If-None-Match": etag})
    assert_answer(after, expected(sent + [late]))
    assert after.json()["cohorts"][0]["ltv_minor"] == [776, 956]  # 1551/2 = 775.5 → 776
    assert after.headers["ETag"] != etag
    # the watermark passes the end of 23 Oct: a third day appears
    tick = ev("rg.reality_check", "2025-10-24T00:00:00Z", "wm", b)
    send(client, headers, [tick])
    third = client.get(LTV, params=params, headers=headers)
    assert_answer(third, expected(sent + [late, tick]))
    assert third.json()["cohorts"][0]["ltv_minor"] == [776, 956, 956]


def test_allowed_lateness_moves_the_watermark_back(tmp_path):
    """With TALLY_ALLOWED_LATENESS = 1 h the watermark is an hour before the latest event: a
    day that ends within that hour is not finished (retention null, LTV day omitted)."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                        allowed_lateness=3600)
    b = "lateness"
    sent = [ev("wallet.credit", "2025-10-10T12:00:00Z", "pa", b),
            ev("bet.placed", "2025-10-11T12:00:00Z", "pa", b),
            ev("bet.settled", "2025-10-11T12:00:00Z", "pa", b, stake_minor=300),
            ev("rg.reality_check", "2025-10-12T00:30:00Z", "wm", b)]
    wm = cref.watermark(sent, lateness_sec=3600)
    assert wm == at("2025-10-11T23:30:00Z")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        send(client, headers, sent)
        body = {"cohort": "first_deposit", "start_date": "2025-10-10",
                "end_date": "2025-10-10", "days": [0, 1]}
        r = client.post(RETENTION, json=body, headers=headers)
        assert ref.parse_time(r.headers["X-Data-Watermark"]) == wm
        assert_answer(r, cref.retention(sent, body, wm))
        assert r.json()["rows"] == [{"cohort_date": "2025-10-10", "size": 1, "d0": 0.0,
                                     "d1": None}]
        r = client.get(LTV, params={"cohort": "first_deposit", "metric": "ggr",
                                    "horizon": "5", "start_date": "2025-10-10",
                                    "end_date": "2025-10-10"}, headers=headers)
        assert_answer(r, cref.ltv(sent, [], cohort="first_deposit", metric="ggr", horizon=5,
                                  start_date="2025-10-10", end_date="2025-10-10", wm=wm))
        assert r.json()["cohorts"] == [{"date": "2025-10-10", "size": 1, "ltv_minor": [0]}]


# --------------------------------------------------------------------------- the reference
# Hand-checked examples: the reference itself must agree with docs/cohorts.md.


def test_reference_nearest_rank_median():
    assert cref.nearest_rank_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert cref.nearest_rank_median([5.0, 1.0, 3.0]) == 3.0
    assert cref.nearest_rank_median([7.5]) == 7.5
    assert cref.nearest_rank_median([]) is None


@pytest.mark.parametrize("q", [0.5, 0.95])
def test_nearest_rank_of_an_array_is_the_definition(q):
    """The funnel's medians partition a NumPy array of gaps: the same value as the
    definition (the smallest value with at least q of the values at or below it)."""
    import numpy as np

    from tally.insights.evaluate import nearest_rank

    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101, 1000):
        values = [rng.randrange(-50, 50) * 1_000_003 for _ in range(n)]
        smallest = min(v for v in values if sum(x <= v for x in values) >= q * n)
        assert nearest_rank(np.array(values, dtype=np.int64), q) == smallest
        assert type(nearest_rank(np.array(values, dtype=np.int64), q)) is int
        assert nearest_rank(values, q) == smallest


def test_reference_could_share():
    assert cref.could_share(BET, {"event": "bet.placed", "game_id": "g_01"})
    assert cref.could_share(DEPOSIT, {"event": "wallet.credit", "reason": ["win", "deposit"]})
    assert not cref.could_share(DEPOSIT, {"event": "wallet.credit", "reason": "win"})
    assert not cref.could_share(BET, DEPOSIT)


def test_reference_half_even_ltv_rounding():
    events = [ev("wallet.credit", "2025-09-01T10:00:00Z", p, "b") for p in ("p1", "p2")]
    events += [ev("bet.settled", "2025-09-01T11:00:00Z", "p1", "b", stake_minor=3),
               ev("bet.settled", "2025-09-02T11:00:00Z", "p2", "b", stake_minor=2)]
    a = cref.ltv(events, [], cohort="first_deposit", metric="ggr", horizon=5,
                 start_date="2025-09-01", end_date="2025-09-01", wm=at("2025-09-03T00:00:00Z"))
    assert a["cohorts"] == [{"date": "2025-09-01", "size": 2, "ltv_minor": [2, 2]}]  # 1.5, 2.5


def test_reference_retention_day_end_is_dst_aware():
    london = cref.ZoneInfo("Europe/London")
    assert cref.day_end(date(2025, 10, 26), london) == at("2025-10-27T00:00:00Z")
    assert cref.day_end(date(2025, 10, 25), london) == at("2025-10-25T23:00:00Z")
    ny = cref.ZoneInfo("America/New_York")
    assert cref.day_end(date(2025, 11, 2), ny) == at("2025-11-03T05:00:00Z")
    assert cref.day_end(date(2025, 11, 1), ny) == at("2025-11-02T04:00:00Z")


def test_reference_dedup_and_best_attempt_tie_is_the_earliest():
    b = "x"
    events = [ev("payment.intent", "2025-09-01T10:00:00Z", "p", b),
              ev("payment.captured", "2025-09-01T10:00:50Z", "p", b),
              ev("payment.intent", "2025-09-01T10:01:00Z", "p", b),
              ev("payment.captured", "2025-09-01T10:01:10Z", "p", b)]
    body = {"steps": [INTENT, CAPTURED], "window_sec": 60, "from": "2025-09-01",
            "to": "2025-09-02"}
    assert cref.funnel(events, body)["steps"][1] == {"name": "payment.captured", "count": 1,
                                                     "rate": 1.0, "median_sec": 50.0}
    duplicate = {**events[1], "occurred_at": "2025-09-01T10:00:59Z"}  # same id: ignored
    assert cref.funnel(events + [duplicate], body) == cref.funnel(events, body)


# --------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_cohorts_through_the_real_server(tmp_path):
    """The same data set sent to a real `tally serve` over a socket: a sample of the generated
    funnels, retention and LTV requests all equal the reference, with ETag revalidation."""
    import httpx2 as httpx

    from tests.server import Server, new_client, token

    data = tmp_path / "data"
    creds = new_client(data, scopes="events:write analytics:read admin")
    server = Server(data, env={"TALLY_REGIONS": "EU,UK,LATAM"})
    try:
        headers = token(server.url, *creds)
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.post(FX, json=RATES, headers=headers).status_code == 200
            send(http, headers, SENT)
            real = Api(http, headers, Settings(data_dir=data))
            for body in GENERATED[::15]:
                funnel_check(real, body)
            for body in GENERATED_RETENTION[::8]:
                retention_check(real, body)
            for days, params in GENERATED_LTV[::6]:
                ltv_check(real, days, **params)
            first = real.funnel(GENERATED[0])
            again = http.post(FUNNEL, json=GENERATED[0],
                              headers={**headers, "If-None-Match": first.headers["ETag"]})
            assert again.status_code == 304
    finally:
        server.stop()

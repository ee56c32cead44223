"""RTP drift (CONTRACT §11, docs/alerts.md#rtp-drift): the statistics against simulated games
whose true RTP is known, the moments the rollups keep (exact, 128-bit, on every store, and
rebuilt into a store made before them), and a drift alert end to end."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from tally.alerts.drift import Moments, assess, critical, moments
from tally.api.app import create_app
from tally.config import Settings
from tally.rollups.spec import GRAINS
from tally.security.tokens import Principal
from tally.semantic.compiler import Scope
from tally.storage.factory import open_backend
from tests.conftest import bearer, make_event
from tests.test_webhooks import Receiver

# a slot's pay table: multipliers of the stake and their probabilities (RTP 0.96; the
# multiplier's standard deviation is about 2.12, 2.87 with the stakes below)
MULTIPLIERS = np.array([0.0, 0.5, 1.0, 2.0, 5.0, 10.0])
PROBABILITIES = np.array([0.571, 0.12, 0.15, 0.08, 0.04, 0.039])
STAKES = np.array([10, 20, 50, 100, 200])  # minor units, drawn uniformly per bet
THEORETICAL = float(MULTIPLIERS @ PROBABILITIES)


def drifted(rtp: float) -> np.ndarray:
    """The pay table paying ``rtp``: every win less likely by the same factor."""
    scaled = PROBABILITIES * rtp / THEORETICAL
    scaled[0] = 0
    scaled[0] = 1 - scaled.sum()
    return scaled


def play(rng: np.random.Generator, bets: int, probabilities: np.ndarray) -> Moments:
    stakes = rng.choice(STAKES, size=bets)
    wins = (stakes * rng.choice(MULTIPLIERS, size=bets, p=probabilities)).astype(np.int64)
    m = Moments()
    m.add(bets, int(stakes.sum()), int(wins.sum()), int((stakes * stakes).sum()),
          int((wins * wins).sum()), int((stakes * wins).sum()))
    return m


def sigma_per_unit_stake() -> float:
    """σ with σ² = E[(w − θ s)²] / E[s]²: n·Var(R̂) for bets of these stakes (with equal
    stakes, the multiplier's variance; varied stakes weigh it by E[s²] / E[s]²)."""
    variance = float(((MULTIPLIERS - THEORETICAL) ** 2) @ PROBABILITIES)
    return math.sqrt(variance * float(np.mean(STAKES ** 2.0)) / float(np.mean(STAKES)) ** 2)


def test_the_pay_table_pays_what_it_says():
    assert THEORETICAL == pytest.approx(0.96, abs=1e-12)
    assert float(MULTIPLIERS @ drifted(0.94)) == pytest.approx(0.94, abs=1e-12)


def test_the_variance_is_the_delta_method_of_the_ratio():
    """SE² = Σ(w − R̂ s)² / (Σs)², computed here bet by bet, in plain Python."""
    rnd = random.Random(3)
    bets = [(s, s * rnd.choice([0, 0, 1, 2, 5])) for s in (rnd.choice([10, 20, 50])
                                                            for _ in range(500))]
    m = Moments()
    for s, w in bets:
        m.add(1, s, w, s * s, w * w, s * w)
    ratio = Fraction(sum(w for _, w in bets), sum(s for s, _ in bets))
    expected = math.sqrt(float(sum((w - ratio * s) ** 2 for s, w in bets)
                               / Fraction(sum(s for s, _ in bets)) ** 2))
    judged = assess(m, 0.96, 0.99)
    assert judged is not None
    assert judged.rtp == float(ratio) and judged.standard_error == pytest.approx(expected)
    assert judged.interval == pytest.approx([0.96 - 2.5758 * expected, 0.96 + 2.5758 * expected],
                                            rel=1e-4)
    assert assess(Moments(), 0.96, 0.99) is None  # no stake: nothing to judge


@pytest.mark.parametrize("confidence", [0.95, 0.99])
def test_false_alarms_at_the_stated_confidence(confidence):
    """2,000 games playing true, 5,000 bets each: the share outside the interval is
    1 − confidence, within 4 binomial standard deviations."""
    rng = np.random.default_rng(20261102)
    games = 2000
    alarms = sum(bool(judged and judged.outside) for judged in (
        assess(play(rng, 5000, PROBABILITIES), THEORETICAL, confidence)
        for _ in range(games)))
    rate = 1 - confidence
    tolerance = 4 * math.sqrt(games * rate * (1 - rate))
    assert abs(alarms - games * rate) <= tolerance, (alarms, games * rate)


def test_a_two_point_drift_is_detected_after_the_stated_bets():
    """A game paying 0.94 instead of 0.96, judged at 0.999: after
    n = ((z + 1.2816)·σ / 0.02)² bets (90 % power, σ² = E[(w − θs)²]/E[s]²:
    docs/alerts.md), at least 85 of 100 such games fire; after a sixteenth of them, fewer
    than half."""
    rng = np.random.default_rng(7)
    sigma = sigma_per_unit_stake()
    needed = math.ceil(((critical(0.999) + 1.2816) * sigma / 0.02) ** 2)
    assert 400_000 < needed < 460_000  # σ ≈ 2.87: about 430,000 bets
    paying = drifted(0.94)
    detected = sum(bool(judged and judged.outside) for judged in (
        assess(play(rng, needed, paying), THEORETICAL, 0.999) for _ in range(100)))
    assert detected >= 85, detected
    early = sum(bool(judged and judged.outside) for judged in (
        assess(play(rng, needed // 16, paying), THEORETICAL, 0.999) for _ in range(100)))
    assert early < 50, early


# --------------------------------------------------------------------------- on the store

DAY = "2025-10-23"
BIG = 2**40  # a stake whose square (2^80) overflows 64 bits


def bets_of(stakes_wins: list[tuple[str, int, int, str]]) -> list[dict[str, Any]]:
    events = []
    for i, (game, stake, win, currency) in enumerate(stakes_wins):
        event = make_event(occurred_at=f"{DAY}T{10 + i % 10:02d}:{i % 60:02d}:05Z")
        event["payload"].update(game_id=game, stake_minor=stake, win_minor=win,
                                currency=currency)
        events.append(event)
    return events


SAMPLE = [("g1", 100, 250, "EUR"), ("g1", 40, 0, "EUR"), ("g1", BIG, BIG // 2, "EUR"),
          ("g2", 500, 450, "EUR"), ("g2", 300, 900, "GBP")]


def expected_moments(rows: list[tuple[str, int, int, str]], game: str,
                     gbp: Fraction) -> tuple[int, Fraction, Fraction, Fraction, Fraction, Fraction]:
    m = [0, Fraction(0), Fraction(0), Fraction(0), Fraction(0), Fraction(0)]
    for g, s, w, currency in rows:
        if g != game:
            continue
        rate = gbp if currency == "GBP" else Fraction(1)
        m[0] += 1
        for i, value in enumerate((s * rate, w * rate, (s * rate) ** 2, (w * rate) ** 2,
                                   s * w * rate * rate), 1):
            m[i] += value
    return (int(m[0]), *m[1:])  # type: ignore[return-value]


@pytest.fixture
def stored(client: TestClient, headers: dict[str, str]) -> TestClient:
    fx = client.post("/v1/admin/fx-rates", json=[{"date": DAY, "currency": "GBP",
                                                  "rate": "1.15"}], headers=headers)
    assert fx.status_code == 200, fx.text
    r = client.post("/v1/events:batch", content=json.dumps(bets_of(SAMPLE)),
                    headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["accepted"] == len(SAMPLE), r.text
    client.app.state.runtime.ingest.applier.flush(30)
    return client


def _moments(client: TestClient, start: str, end: str) -> dict[Any, Moments]:
    runtime = client.app.state.runtime
    who = Principal("cl_test", frozenset({"analytics:read"}), None, None, None, "t")
    scope = Scope(datetime.fromisoformat(start), datetime.fromisoformat(end), 86_400,
                  {"region": ("EU", "UK", "LATAM")}, ("game_id",))
    return moments(runtime.context_for(who), scope, "EUR")


@pytest.mark.parametrize(("start", "end"), [
    (f"{DAY}T00:00:00", "2025-10-24T00:00:00"),  # day-aligned: the 1d rollup
    (f"{DAY}T00:00:01", "2025-10-24T00:00:00"),  # not aligned: the events
])
def test_the_moments_are_exact_from_rollups_and_events(stored, start, end):
    found = _moments(stored, start, end)
    gbp = Fraction(115, 100)
    for game in ("g1", "g2"):
        m = found[game]
        assert (m.bets, m.stake, m.wins, m.stake_sq, m.win_sq, m.stake_win) == \
            expected_moments(SAMPLE, game, gbp)


def _drop_moment_columns(settings: Settings) -> None:
    """The store as a version before the moments made it: the rollups without them."""
    backend = open_backend(settings.store, settings.data_dir, derived=lambda dialect: [])
    try:
        for grain in GRAINS:
            for column in ("stake_sq_sum", "win_sq_sum", "stake_win_sum"):
                sql = f"ALTER TABLE rollup_{grain} DROP COLUMN {column}"
                if backend.dialect == "duckdb":
                    backend._con.execute(sql)  # type: ignore[attr-defined]
                else:
                    backend._writer.command(sql)  # type: ignore[attr-defined]
    finally:
        backend.close()


def test_a_store_made_before_the_moments_gets_them_on_open(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        rows = [r for r in SAMPLE if r[3] == "EUR"]
        r = client.post("/v1/events:batch", content=json.dumps(bets_of(rows)),
                        headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 202
        client.app.state.runtime.ingest.applier.flush(30)
    _drop_moment_columns(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        found = _moments(client, f"{DAY}T00:00:00", "2025-10-24T00:00:00")
        for game in ("g1", "g2"):
            m = found[game]
            assert (m.bets, m.stake, m.wins, m.stake_sq, m.win_sq, m.stake_win) == \
                expected_moments(rows, game, Fraction(1))
        slice_ = client.get("/v1/analytics/slice", params={
            "metric": "ggr", "dim": "game_id", "from": DAY, "to": "2025-10-24"},
            headers=bearer(client, settings.data_dir)).json()["items"]
        assert {i["game_id"]: i["value_minor"] for i in slice_} == {
            "g1": 140 - 250 + BIG - BIG // 2, "g2": 50}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_drift_alert_fires_for_the_drifting_game_only(tmp_path, receiver):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                        webhook_allow_loopback=True)
    rng = np.random.default_rng(11)
    events: list[dict[str, Any]] = []
    for game, paying in (("fair", PROBABILITIES), ("loose", drifted(1.30))):
        stakes = rng.choice(STAKES, size=3000)
        wins = stakes * rng.choice(MULTIPLIERS, size=3000, p=paying)
        for i, (stake, win) in enumerate(zip(stakes, wins, strict=True)):
            event = make_event(occurred_at=f"{DAY}T{i % 24:02d}:{i % 60:02d}:{i % 57:02d}Z")
            event["payload"].update(game_id=game, stake_minor=int(stake), win_minor=int(win))
            events.append(event)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        secret = client.get("/v1/webhook-secret", headers=headers).json()["secret"]
        query = {"kind": "slice", "metric": "rtp", "dim": "game_id", "from": DAY,
                 "to": "2030-01-01"}
        made = client.post("/v1/alerts", headers=headers, json={
            "name": "drift", "query": query, "every_seconds": 1, "webhook_url": receiver.url,
            "condition": {"rtp_drift": {"theoretical": 0.96, "confidence": 0.999}}})
        assert made.status_code == 201, made.text
        for start in range(0, len(events), 2000):
            r = client.post("/v1/events:batch", content=json.dumps(events[start:start + 2000]),
                            headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == 202, r.text
        deadline = time.monotonic() + 30
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        messages = [Webhook(secret).verify(body, h) for h, body in receiver.received]
        assert [(m["type"], m["data"]["subject"]) for m in messages] == [
            ("alert.firing", {"game_id": "loose"})]
        values = messages[0]["data"]["values"]
        assert values["bets"] == 3000 and values["theoretical"] == 0.96
        assert values["rtp"] > values["interval"][1] > 0.96 > values["interval"][0]
        alert = client.get(f"/v1/alerts/{made.json()['id']}", headers=headers).json()
        assert alert["breaching"] == 1 and alert["error"] is None

"""``tally demo``: a deterministic, valid and plausible stream, loaded through the real ingest
path into a real store. Plausibility is recomputed here from the raw events, independently of
the generator's own bookkeeping."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import msgspec
import pytest
import typer.main

from tally.cli import app as cli_app
from tally.config import Settings
from tally.demo.catalog import GAMES_TABLE, pay_table
from tally.demo.generator import generate
from tally.demo.load import load_demo
from tests.conftest import on_duckdb_only
from tests.stores import open_test_store

END = datetime(2025, 10, 23, tzinfo=UTC)
EVENTS, DAYS, SEED = 20_000, 7, 5


@pytest.fixture(scope="module")
def batches() -> list[list[dict[str, Any]]]:
    return list(generate(EVENTS, DAYS, SEED, END, batch_size=2_000))


@pytest.fixture(scope="module")
def events(batches: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [event for batch in batches for event in batch]


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == event_type]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def test_same_seed_same_events() -> None:
    def first(seed: int) -> bytes:
        return msgspec.json.encode(list(islice(generate(5_000, 3, seed, END, 1_000), 3)))

    assert first(3) == first(3)
    assert first(3) != first(4)


def test_exact_count_and_batch_sizes(batches: list[list[dict[str, Any]]]) -> None:
    assert sum(len(b) for b in batches) == EVENTS
    assert all(len(b) == 2_000 for b in batches)


def test_load_demo_goes_through_ingest_and_rejects_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    summary = load_demo(settings, events=EVENTS, days=DAYS, seed=SEED)
    assert summary["events_generated"] == EVENTS
    assert summary["rejected"] == 0
    assert summary["duplicates"] > 0
    assert summary["accepted"] + summary["duplicates"] == EVENTS
    assert summary["data_dir"] == str(settings.data_dir)
    backend = open_test_store(settings.data_dir)
    try:
        assert backend.count_events() == summary["accepted"]
        stored = backend.query("SELECT count(DISTINCT event_id) AS n FROM events")
        assert stored.column("n")[0].as_py() == summary["accepted"]
    finally:
        backend.close()


def test_only_served_regions(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", regions="UK,LATAM")
    summary = load_demo(settings, events=3_000, days=2, seed=1)
    assert summary["rejected"] == 0
    backend = open_test_store(settings.data_dir)
    try:
        rows = backend.query("SELECT DISTINCT region FROM events").column("region").to_pylist()
    finally:
        backend.close()
    assert sorted(rows) == ["LATAM", "UK"]


def test_batches_respect_the_deployment_limits(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_batch_events=700,
                        max_batch_bytes=64 * 1024)
    summary = load_demo(settings, events=4_000, days=2, seed=2)
    assert summary["rejected"] == 0
    assert summary["accepted"] + summary["duplicates"] == summary["events_generated"] == 4_000


def test_envelopes(events: list[dict[str, Any]]) -> None:
    start = END - timedelta(days=DAYS)
    for e in events:
        assert 1 <= len(e["event_id"]) <= 128
        assert e["occurred_at"].endswith("Z") and e["ingested_at"].endswith("Z")
        assert start <= ts(e["occurred_at"]) < END
        assert ts(e["ingested_at"]) >= ts(e["occurred_at"])
        assert e["player_id"].startswith("p_")
        assert e["schema_version"] in {"1.0.0", "1.2.0", "1.3.0"}
    versions = Counter(e["schema_version"] for e in events)
    assert versions.most_common(1)[0][0] == "1.3.0" and len(versions) == 3


def test_money_is_integer_and_nothing_is_a_float(events: list[dict[str, Any]]) -> None:
    def walk(value: Any) -> None:
        assert not isinstance(value, float)
        if isinstance(value, dict):
            for key, item in value.items():
                if key.endswith("_minor") or key == "duration_sec":
                    assert type(item) is int and item >= 0, (key, item)
                walk(item)

    for e in events:
        walk(e)


def test_markets_are_varied_and_consistent(events: list[dict[str, Any]]) -> None:
    assert len({e["tenant_id"] for e in events}) == 4
    assert {e["region"] for e in events} == {"EU", "UK", "LATAM", "NA", "APAC"}
    currencies = Counter(e["payload"]["currency"] for e in of_type(events, "bet.settled"))
    assert len(currencies) >= 5
    brand_currency = {(e["tenant_id"], e["region"], e["payload"]["currency"])
                      for e in events if "currency" in e["payload"]}
    for brand in {b for b, _, _ in brand_currency}:
        assert len({r for b, r, _ in brand_currency if b == brand}) <= 2


# Rough market rates, minor unit → EUR cent: summing raw minor units would let one peso whale
# (1 MXN cent is 1/20 of a EUR cent) outweigh thousands of euro bets.
FX = {"EUR": 1.0, "GBP": 1.15, "SEK": 0.087, "BRL": 0.16, "MXN": 0.05, "PEN": 0.25, "CAD": 0.66,
      "USD": 0.92, "NZD": 0.55, "JPY": 0.0062}
SLOTS = {"nova", "redstone", "bluefin"}  # the providers of slots
TABLES = {"blackjack-classic", "live-blackjack", "baccarat-pro", "live-baccarat"}


@pytest.fixture(scope="module")
def default_bets() -> list[dict[str, Any]]:
    """The settlements of the default ``tally demo`` (its CLI defaults: events, days, seed),
    first sends only, each with its stake and win in EUR cents and its week before END."""
    command = typer.main.get_command(cli_app).commands["demo"]
    defaults = {p.name: p.default for p in command.params}
    seen: set[str] = set()
    bets = []
    for batch in generate(defaults["events"], defaults["days"], defaults["seed"], END):
        for e in batch:
            if e["event_type"] != "bet.settled" or e["event_id"] in seen:
                continue
            seen.add(e["event_id"])
            p, rate = e["payload"], FX[e["payload"]["currency"]]
            bets.append({"game": p["game_id"], "provider": p["provider_id"],
                         "stake": p["stake_minor"] * rate, "win": p["win_minor"] * rate,
                         "multiple": p["win_minor"] / p["stake_minor"],
                         "week": (END - ts(e["occurred_at"])).days // 7})
    assert len(bets) > 50_000
    return bets


def test_overall_rtp_is_an_operators(default_bets: list[dict[str, Any]]) -> None:
    """Over the default month the house keeps 2-10% of the stakes, as an online casino does."""
    stake = sum(b["stake"] for b in default_bets)
    assert 0.90 <= sum(b["win"] for b in default_bets) / stake <= 0.98


def test_weekly_rtp_per_game_is_plausible(default_bets: list[dict[str, Any]]) -> None:
    """Every game-week with enough bets has an RTP in 80-110%.

    "Enough" comes from the statistics of the game's own outcomes: a week's RTP is a
    stake-weighted mean of independent multiples, so its standard error is
    sigma * sqrt(sum(s^2)) / sum(s), sigma the spread of the game's multiples over the month.
    A game-week counts once that error is at most 0.04 (for a blackjack table about 1,100 bets,
    a low-volatility slot 4,000, a high-volatility one 50,000: never in a demo week): then the
    band's edges are at least 2.75 errors from an RTP of 99% and 3.5 from one of 95%, so a
    plausible game leaves it in well under 1% of the weeks. A game-week with fewer bets may
    be anywhere: one bonus round on a quiet slot makes its week."""
    multiples: dict[str, list[float]] = {}
    weeks: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for b in default_bets:
        multiples.setdefault(b["game"], []).append(b["multiple"])
        if b["week"] < 4:  # the four complete weeks before END
            weeks.setdefault((b["game"], b["week"]), []).append(b)
    sigma = {game: statistics.pstdev(values) for game, values in multiples.items()}
    checked = {}
    for (game, week), bets in weeks.items():
        stake = sum(b["stake"] for b in bets)
        error = sigma[game] * math.sqrt(sum(b["stake"] ** 2 for b in bets)) / stake
        if error <= 0.04:
            checked[game, week] = sum(b["win"] for b in bets) / stake
    assert len(checked) >= 4, "too few game-weeks with enough bets to say anything"
    assert {game for game, _ in checked} & TABLES and {game for game, _ in checked} - TABLES
    outside = {key: round(rtp, 3) for key, rtp in checked.items() if not 0.80 <= rtp <= 1.10}
    assert outside == {}


def test_volatility_is_a_casinos(default_bets: list[dict[str, Any]]) -> None:
    """Most slot spins lose, small wins are common, a slot pays 100x now and then; table
    games win about half their hands and never pay like a slot."""
    slots = [b["multiple"] for b in default_bets if b["provider"] in SLOTS]
    tables = [b["multiple"] for b in default_bets if b["game"] in TABLES]
    assert 0.20 <= sum(m > 0 for m in slots) / len(slots) <= 0.45
    assert 0.15 <= sum(0 < m < 1 for m in slots) / sum(m > 0 for m in slots) <= 0.5
    assert max(slots) >= 100
    assert 0.40 <= sum(m > 1 for m in tables) / len(tables) <= 0.50
    assert max(tables) <= 9


def test_pay_tables_return_their_rtp() -> None:
    """Each game's pay table returns exactly its theoretical RTP (88-99.6%), and a slot's
    spread grows with its stated volatility."""
    spread: dict[str, list[float]] = {"l": [], "m": [], "h": []}
    for line in GAMES_TABLE.replace("\n  ", " ").split("\n"):
        for entry in line.split()[3:]:
            spec = entry.split(":")[1].rstrip("j")
            table = pay_table(spec)
            rtp = sum(m * p for m, p in table) / 100
            assert 0.88 - 1e-9 <= rtp <= 0.996 and sum(p for _, p in table) < 1
            if spec[:-1].isdigit():
                assert rtp == pytest.approx(int(spec[:-1]) / 1000, abs=1e-9), entry
            if spec[-1] in spread:
                second = sum(p * (m / 100) ** 2 for m, p in table)
                spread[spec[-1]].append(math.sqrt(second - rtp**2))
    assert max(spread["l"]) < min(spread["m"]) and max(spread["m"]) < min(spread["h"])
    assert 1.5 <= min(spread["l"]) and max(spread["h"]) <= 12


def test_bets(events: list[dict[str, Any]]) -> None:
    settled = of_type(events, "bet.settled")
    multipliers = [e["payload"]["win_minor"] / e["payload"]["stake_minor"] for e in settled]
    assert 0.25 <= sum(m > 0 for m in multipliers) / len(multipliers) <= 0.6
    assert max(multipliers) >= 20  # the occasional big win
    assert len({e["payload"]["game_id"] for e in settled}) >= 20
    assert len({e["payload"]["provider_id"] for e in settled}) == 6
    assert any(e["payload"].get("in_bonus") for e in settled)
    assert any("jackpot_contribution_minor" in e["payload"] for e in settled)
    assert any("commission_minor" in e["payload"] for e in settled)


def test_every_settlement_follows_its_bet(events: list[dict[str, Any]]) -> None:
    placed: dict[str, dict[str, Any]] = {}
    for e in events:  # stream order: a settlement never arrives before its bet
        if e["event_type"] == "bet.placed":
            placed[e["payload"]["bet_id"]] = e
        elif e["event_type"] == "bet.settled":
            bet = placed[e["payload"]["bet_id"]]
            assert bet["payload"]["stake_minor"] == e["payload"]["stake_minor"]
            assert bet["payload"]["currency"] == e["payload"]["currency"]
            assert bet["player_id"] == e["player_id"]
            assert ts(bet["occurred_at"]) <= ts(e["occurred_at"])


def test_deposits_reference_captured_payments(events: list[dict[str, Any]]) -> None:
    captured = {e["payload"]["payment_id"]: e for e in of_type(events, "payment.captured")}
    deposits = [e for e in of_type(events, "wallet.credit") if e["payload"]["reason"] == "deposit"]
    assert deposits
    for credit in deposits:
        payment = captured[credit["payload"]["reference_id"]]
        assert payment["payload"]["amount_minor"] == credit["payload"]["amount_minor"]
        assert payment["payload"]["currency"] == credit["payload"]["currency"]
    intents = len(of_type(events, "payment.intent"))
    failed = len({e["payload"]["payment_id"] for e in of_type(events, "payment.failed")})
    assert 0.04 <= failed / intents <= 0.25
    assert len({e["payload"]["method"] for e in of_type(events, "payment.intent")}) >= 5
    assert all(e.get("player_id") for e in events if e["event_type"].startswith("payment."))


def test_every_type_appears(events: list[dict[str, Any]]) -> None:
    types = Counter(e["event_type"] for e in events)
    assert set(types) >= {
        "player.registered", "session.started", "session.ended", "bet.placed", "bet.settled",
        "wallet.debit", "wallet.credit", "payment.intent", "payment.authorized",
        "payment.captured", "payment.failed", "bonus.issued", "bonus.consumed", "rg.limit.hit",
    }
    durations = [e["payload"]["duration_sec"] for e in of_type(events, "session.ended")]
    assert 0.05 <= sum(d < 60 for d in durations) / len(durations) <= 0.6
    reasons = Counter(e["payload"]["reason"] for e in of_type(events, "wallet.debit"))
    assert reasons["withdrawal"] > 0


def test_duplicates_are_exact_and_in_a_later_batch(batches: list[list[dict[str, Any]]]) -> None:
    first: dict[str, tuple[int, bytes]] = {}
    dups = 0
    for number, batch in enumerate(batches):
        for e in batch:
            body = msgspec.json.encode(e)
            if e["event_id"] in first:
                dups += 1
                assert first[e["event_id"]][1] == body
                assert first[e["event_id"]][0] < number
            else:
                first[e["event_id"]] = (number, body)
    assert 0.005 <= dups / EVENTS <= 0.02


def test_roughly_time_ordered_with_some_late_events(events: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    newest = events[0]["occurred_at"]
    late = 0
    for e in events:
        if e["event_id"] in seen:
            continue
        seen.add(e["event_id"])
        if ts(e["occurred_at"]) < ts(newest) - timedelta(hours=1):
            late += 1
        newest = max(newest, e["occurred_at"])
    assert 0.005 <= late / EVENTS <= 0.04


def test_seasonality_and_retention(events: list[dict[str, Any]]) -> None:
    by_hour = Counter(ts(e["occurred_at"]).hour for e in of_type(events, "session.started"))
    assert max(by_hour.values()) > 2 * min(by_hour.get(h, 0) for h in range(24))
    days = {e["occurred_at"][:10] for e in events}
    assert len(days) == DAYS
    first_day = min(days)
    new = {e["player_id"] for e in of_type(events, "player.registered")
           if e["occurred_at"][:10] == first_day}
    later = {e["player_id"] for e in of_type(events, "session.started")
             if e["occurred_at"][:10] > first_day}
    assert new and 0 < len(new & later) < len(new)  # some come back, not all


@on_duckdb_only("its reference reads DuckDB's file with DuckDB SQL")
def test_demo_money_answers_convert_out_of_the_box(tmp_path: Path) -> None:
    """`tally demo` sets rates for every demo currency, so ggr over all brands is not a 422,
    and it equals the per-currency sums converted at those rates (computed here)."""
    from decimal import ROUND_HALF_EVEN, Decimal

    import duckdb
    from fastapi.testclient import TestClient

    from tally.api.app import create_app
    from tests.conftest import bearer

    settings = Settings(data_dir=tmp_path, regions="EU,UK,LATAM,NA,APAC")
    load_demo(settings, events=6_000, days=2, seed=3)
    con = duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True)
    rates = {c: Decimal(r) for c, r in con.execute(
        "SELECT currency, rate FROM fx_rates").fetchall()} | {"EUR": Decimal(1)}
    exponent = {"JPY": 0}
    sums = con.execute(  # the slice rounds each (brand, UTC day, currency) sum
        "SELECT CAST(occurred_at AS DATE), currency, sum(stake_minor - win_minor), tenant_id "
        "FROM events WHERE event_type = 'bet.settled' GROUP BY ALL").fetchall()
    con.close()
    expected = sum(int((Decimal(s) * rates[c] * Decimal(10) ** (2 - exponent.get(c, 2)))
                       .quantize(Decimal(1), rounding=ROUND_HALF_EVEN)) for _, c, s, _ in sums)
    first = min(row[0] for row in sums)
    last = max(row[0] for row in sums)
    with TestClient(create_app(settings)) as client:
        r = client.get("/v1/analytics/slice", headers=bearer(client, tmp_path),
                       params={"metric": "ggr", "dim": "brand_id", "from": str(first),
                               "to": str(last + timedelta(days=1))})
    assert r.status_code == 200, r.text
    assert sum(item["value_minor"] for item in r.json()["items"]) == expected

"""The demo operator's catalog: markets, payment methods, games and their pay tables, clocks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from functools import cache
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from tally.demo import paytables
from tally.events.currencies import minor_exponent

Event = dict[str, Any]
Array = npt.NDArray[Any]
HOUR = 3_600_000  # ms
DAY = 24 * HOUR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DUP_RATE = 0.01
LATE_RATE = 0.048  # of the late-eligible events, about half the stream: ~2% overall
# Late arrivals are things that follow something else, never a bet.placed or payment.captured,
# so any prefix of the stream still has every settlement's bet and every credit's payment.
LATE_TYPES = frozenset({"bet.settled", "session.ended", "payment.authorized", "payment.failed",
                        "rg.reality_check", "bonus.consumed"})
MU0 = 14.0  # nominal mean bets per session, before the controller steers it
REALITY_CHECK_MS = 30 * 60_000
ONE_TIMER, LIFE_MEAN = 0.35, 90.0  # share of players never seen after day 0; mean lifetime (d)
BASE_RETURN = np.concatenate(([0.0], 0.5 * np.arange(1, 4000, dtype=float) ** -0.45))
DOW = (0.92, 0.90, 0.93, 0.97, 1.08, 1.13, 1.07)  # Monday first
LOCAL_HOURS = np.array([30, 18, 12, 8, 6, 6, 10, 18, 28, 36, 42, 48, 55, 58, 56, 55, 60, 70, 85,
                        100, 110, 105, 85, 55], dtype=float)
LOCAL_CUM = np.cumsum(LOCAL_HOURS) / LOCAL_HOURS.sum()

# brand, region, country, currency, minor units per EUR cent, UTC offset (h), weight
MARKETS: tuple[tuple[str, str, str, str, float, int, float], ...] = (
    ("brand-1", "EU", "DE", "EUR", 1.0, 1, 10), ("brand-1", "EU", "FI", "EUR", 1.0, 2, 4),
    ("brand-1", "EU", "SE", "SEK", 11.5, 1, 4), ("brand-1", "UK", "GB", "GBP", 0.85, 0, 12),
    ("brand-2", "LATAM", "BR", "BRL", 6.0, -3, 14), ("brand-2", "LATAM", "MX", "MXN", 20.0, -6, 6),
    ("brand-2", "LATAM", "PE", "PEN", 4.0, -5, 2), ("brand-3", "NA", "CA", "CAD", 1.5, -5, 9),
    ("brand-3", "NA", "US", "USD", 1.1, -5, 6), ("brand-4", "APAC", "NZ", "NZD", 1.8, 12, 5),
    ("brand-4", "APAC", "JP", "JPY", 1.6, 9, 4), ("brand-4", "UK", "GB", "GBP", 0.85, 0, 4),
)
VERSIONS = {"brand-1": "1.3.0", "brand-2": "1.3.0", "brand-3": "1.3.0", "brand-4": "1.2.0"}
UNTRACED = frozenset({"brand-3"})  # its platform does not propagate trace ids
LEGACY_METHODS = frozenset({"pix", "bank_transfer"})  # their PSP webhooks still speak 1.0.0
# region: (method, weight, failure rate)
METHODS = {
    "EU": (("card", 45, 0.10), ("paypal", 20, 0.08), ("skrill", 10, 0.12),
           ("apple_pay", 15, 0.08), ("bank_transfer", 10, 0.14)),
    "UK": (("card", 55, 0.09), ("paypal", 25, 0.08), ("apple_pay", 15, 0.08),
           ("bank_transfer", 5, 0.13)),
    "LATAM": (("pix", 55, 0.09), ("card", 35, 0.15), ("bank_transfer", 10, 0.13)),
    "NA": (("card", 60, 0.13), ("paypal", 20, 0.09), ("apple_pay", 15, 0.08),
           ("bank_transfer", 5, 0.12)),
    "APAC": (("card", 55, 0.11), ("skrill", 15, 0.12), ("apple_pay", 20, 0.08),
             ("bank_transfer", 10, 0.14)),
}
DEVICES = ("desktop", "android", "ios", "mobile_web")
LIMIT_TYPES = ("deposit", "loss", "wager", "session_time")
STAKES_EUR_CENTS = (10, 20, 30, 40, 50, 60, 80, 100, 150, 200, 250, 300, 400, 500, 800, 1000,
                    1500, 2000, 2500, 3000, 4000, 5000)
DEPOSITS_EUR = (10, 20, 25, 30, 50, 75, 100, 150, 200, 250, 500, 1000, 2500)
# Stake changes within a session: mostly the player's usual level, a heavy tail upwards.
STEPS = (0,) * 44 + (1,) * 7 + (-1,) * 6 + (2,) * 4 + (-2,) * 1 + (3, 4)
# kind: (bet gap ms lo/median, settle ms lo/hi)
KINDS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "slot": ((2_500, 5_000), (80, 900)),
    "crash": ((8_000, 12_000), (3_000, 20_000)),
    "table": ((6_000, 9_000), (200, 1_500)),
    "live": ((25_000, 15_000), (15_000, 40_000)),
}
# provider kind commission(bps of stake) game:pay-table ... A pay table is a theoretical RTP in
# per mille and a shape (paytables.py: l/m/h = low/medium/high-volatility slot, w = game-show
# wheel, c = cash-out game), or the rules of a classic game; 'j': contributes to a jackpot
# (its base game pays less: the pool pays the rest, elsewhere).
GAMES_TABLE = """
nova slot 0 book-of-sand:941h fruit-storm:946l neon-nights:942m gold-rush-x:965h
  pharaoh-drop:921hj viking-gold:958m lucky-sevens:950l wild-west:946m
redstone slot 0 wolf-moon:945m dragon-pearls:915mj big-bass-bay:960h sweet-cascade:947m
  mega-fortune:880hj aztec-gems:948l cleopatra-ii:945l joker-strike:960m
bluefin slot 60 ocean-reels:968m starburst-xl:945l gem-heist:951h hot-chilli:944m
  arctic-fortune:930hj koi-garden:957l
orbit crash 0 rocket-x:970c aviator-one:970c plinko-pro:975l mines:972c keno-flash:936m
  dice-duel:990c
kestrel table 40 blackjack-classic:blackjack european-roulette:roulette baccarat-pro:baccarat
  video-poker:poker sic-bo:sicbo
livewave live 80 live-roulette:roulette live-blackjack:blackjack lightning-roulette:lightning
  crazy-wheel:961w live-baccarat:baccarat monopoly-live:962w deal-show:955w
"""
# The most played games, in order (a Zipf law over ranks); the rest rank below them. Low- and
# medium-volatility slots, live tables and a crash game lead, as on most operators' lobbies.
POPULAR = ("starburst-xl", "live-roulette", "book-of-sand", "live-blackjack", "aviator-one",
           "sweet-cascade", "big-bass-bay", "crazy-wheel", "fruit-storm", "lightning-roulette",
           "wolf-moon", "blackjack-classic")
RULES: dict[str, Callable[[], paytables.Table]] = {
    "roulette": paytables.roulette, "lightning": paytables.lightning_roulette,
    "blackjack": paytables.blackjack, "baccarat": paytables.baccarat,
    "poker": paytables.video_poker, "sicbo": paytables.sic_bo,
}
Game = tuple[str, str, list[float], list[int], bool, int, list[int], list[int]]
OCCURRED = itemgetter("occurred_at")


def pay_table(spec: str) -> paytables.Table:
    """The outcomes of a GAMES_TABLE pay-table spec (``962h``, ``970c``, ``roulette``)."""
    if spec in RULES:
        return RULES[spec]()
    rtp, shape = int(spec[:-1]) / 1000, spec[-1]
    return paytables.cash_out(rtp) if shape == "c" else paytables.spins(rtp, shape)


def games() -> list[tuple[Game, float]]:
    """(game, popularity) for the catalog: a bet's multiple of its stake in hundredths is
    ``mult[bisect_right(cum, u)]`` for a uniform ``u`` (the last entry, 0, is a lost bet)."""
    tables = np.random.default_rng(20251023)
    games: list[tuple[Game, float]] = []
    for line in GAMES_TABLE.replace("\n  ", " ").strip().splitlines():
        provider, kind, comm, *entries = line.split()
        (gap_lo, gap_med), (set_lo, set_hi) = KINDS[kind]
        gaps = (gap_lo + gap_med * tables.lognormal(0, 0.7, 1024)).astype(int).tolist()
        settles = tables.integers(set_lo, set_hi, 1024)
        settles[:10] = tables.integers(20_000, 180_000, 10)  # a provider hiccup now and then
        for entry in entries:
            name, spec = entry.split(":")
            outcomes = pay_table(spec.rstrip("j"))
            cum = np.cumsum([p for _, p in outcomes]).tolist()
            rank = (POPULAR.index(name) if name in POPULAR
                    else len(POPULAR) + (len(games) * 17) % 31) + 1
            games.append(((name, provider, cum, [m for m, _ in outcomes] + [0], spec.endswith("j"),
                           int(comm), gaps, tables.permutation(settles).tolist()), rank ** -0.9))
    return games


@cache
def clock_tables() -> tuple[list[str], list[str]]:
    hms = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400)]
    return hms, [f".{ms:03d}Z" for ms in range(1000)]


def fx_rates(base: str, day: date) -> list[tuple[date, str, Decimal]]:
    """The demo's exchange rates as of ``day``, per major unit in ``base`` (consistent with the
    amounts the generator makes: MARKETS gives minor units per EUR cent)."""
    per_cent = {m[3]: Decimal(str(m[4])) for m in MARKETS} | {"EUR": Decimal(1)}

    def in_eur(currency: str) -> Decimal:  # one major unit of ``currency`` in EUR
        return Decimal(10) ** minor_exponent(currency) / (per_cent[currency] * 100)

    base_in_eur = in_eur(base) if base in per_cent else None
    if base_in_eur is None:
        return []  # a base the demo knows no rate for: the operator sets rates
    return [(day, currency, (in_eur(currency) / base_in_eur).quantize(Decimal("0.000001")))
            for currency in sorted(per_cent) if currency != base]

"""Pay tables of the demo's games: what one bet returns, as a multiple of its stake.

A table is a list of outcomes ``(multiplier in hundredths, probability)``; the probabilities
sum to at most 1 and the rest is a lost bet. Every table returns exactly its game's RTP in
expectation (the rules of a classic table game give it; the other builders are scaled to the
RTP they are given), and its shape is that game's volatility: most slot spins lose, small wins
are frequent, bonus features rare, and a high-volatility slot pays a third of its RTP through
features that may reach thousands of times the stake. numpy only, no state: the catalog builds each
table once.
"""

from __future__ import annotations

from math import erf, exp, log, sqrt

import numpy as np

Table = list[tuple[int, float]]

# The multiples a win may be (in hundredths), 10 round numbers a decade from 0.1x to 10,000x:
# the discrete outcomes of the continuous shapes below. A win under 1x is a slot's "you won
# less than you bet".
GRID = np.array([m * 10**k for k in range(5) for m in (10, 12, 15, 20, 25, 30, 40, 50, 60, 80)]
                + [1_000_000])

# Slot volatility: hit rate of base-game wins, their spread (log-normal sigma, median fitted to
# the RTP), bonus features every N spins with their median multiple, spread and cap. They give
# a per-spin standard deviation of about 2 (low), 3.7 (medium) and 7.3 (high) times the stake.
SLOTS: dict[str, tuple[float, float, int, float, float, float]] = {
    "l": (0.40, 0.8, 200, 10.0, 0.7, 500.0),
    "m": (0.30, 1.0, 200, 20.0, 0.85, 2_500.0),
    "h": (0.24, 1.0, 300, 40.0, 1.05, 10_000.0),
    # a game show's wheel: frequent small wins, a bonus round every ~30 spins
    "w": (0.40, 0.7, 30, 8.0, 0.9, 2_500.0),
}
# Cash-out games (crash, dice, mines): the target multiple players set, and how many set it;
# a target t is reached with probability rtp / t, so every target returns the RTP.
TARGETS = ((1.2, 20), (1.5, 25), (2.0, 25), (3.0, 12), (5.0, 10), (10.0, 6), (100.0, 2))


def _lognormal(median: float, sigma: float, cap: float) -> np.ndarray:
    """Probabilities over GRID of a log-normal multiple (mass per grid cell), capped at
    ``cap`` and renormalised: a slot cannot pay more than its maximum win."""
    grid = GRID[GRID <= cap * 100] / 100
    edges = np.concatenate(([0.0], np.sqrt(grid[1:] * grid[:-1]), [np.inf]))
    z = (np.log(np.maximum(edges, 1e-12)) - log(median)) / (sigma * sqrt(2))
    cdf = np.array([0.5 * (1 + erf(v)) for v in z])  # erf(inf) = 1
    mass = np.diff(cdf)
    out = np.zeros(len(GRID))
    out[: len(grid)] = mass / mass.sum()
    return out


def spins(rtp: float, volatility: str) -> Table:
    """A slot (or wheel): base-game wins plus rare features, base wins scaled to the RTP."""
    hit, base_sigma, every, feature_median, feature_sigma, cap = SLOTS[volatility]
    feature = _lognormal(feature_median, feature_sigma, cap) / every
    feature_rtp = float(feature @ GRID) / 100
    mean_base = rtp - feature_rtp
    base = _lognormal(mean_base / hit / exp(base_sigma**2 / 2), base_sigma, cap)
    base *= mean_base / (float(base @ GRID) / 100)  # exact: the grid is coarse
    return _table(GRID, base + feature)


def cash_out(rtp: float) -> Table:
    total = sum(w for _, w in TARGETS)
    return [(round(t * 100), rtp / t * w / total) for t, w in TARGETS]


def roulette() -> Table:
    """European roulette (RTP 36/37) over a mix of bets: even chances, dozens, corners and
    straight-ups (which carry most of its volatility)."""
    mix = ((2, 18, 0.50), (3, 12, 0.25), (9, 4, 0.15), (36, 1, 0.10))
    return _merge([(pays * 100, share * hits / 37) for pays, hits, share in mix])


def lightning_roulette() -> Table:
    """Roulette whose straight-ups pay 30x, or 50-500x on the ~5 lightning numbers a round."""
    table = [(pays * 100, share * hits / 37) for pays, hits, share in
             ((2, 18, 0.45), (3, 12, 0.20), (9, 4, 0.15))]
    lightning = ((50, 0.45), (100, 0.30), (150, 0.10), (200, 0.08), (300, 0.04), (400, 0.02),
                 (500, 0.01))
    mean = sum(m * w for m, w in lightning)
    q = (36 - 30) / (mean - 30)  # a lightning straight-up, so straight-ups return 36/37 too
    table += [(3_000, 0.20 / 37 * (1 - q))]
    table += [(m * 100, 0.20 / 37 * q * w) for m, w in lightning]
    return _merge(table)


def blackjack() -> Table:
    """Basic strategy, slightly imperfect play: RTP about 99.0%."""
    return [(250, 0.045), (300, 0.050), (200, 0.3213), (100, 0.085)]


def baccarat() -> Table:
    """Punto banco, 8 decks: banker (5% commission), player and tie (8:1) bets, 60/35/5."""
    win, lose, tie = 0.458597, 0.446247, 0.095156
    return _merge([(195, 0.60 * win), (200, 0.35 * lose), (900, 0.05 * tie),
                   (100, 0.95 * tie)])


def video_poker() -> Table:
    """Jacks or Better 9/6, optimal play (RTP 99.54%)."""
    return [(80_000, 0.0000248), (5_000, 0.0001093), (2_500, 0.0023625), (900, 0.0115122),
            (600, 0.0110151), (400, 0.0112289), (300, 0.0744486), (200, 0.1292789),
            (100, 0.2145850)]


def sic_bo() -> Table:
    """Big/small (even money, lost on a triple) and, now and then, any triple (30:1)."""
    return [(200, 0.9 * 105 / 216), (3_100, 0.1 * 6 / 216)]


def _table(grid: np.ndarray, probs: np.ndarray) -> Table:
    return [(int(m), float(p)) for m, p in zip(grid, probs, strict=True) if p > 1e-12]


def _merge(outcomes: Table) -> Table:
    merged: dict[int, float] = {}
    for m, p in outcomes:
        merged[m] = merged.get(m, 0.0) + p
    return sorted(merged.items())

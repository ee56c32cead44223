"""The demo player population: who plays on which day and when (numpy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tally.demo.catalog import (
    BASE_RETURN,
    DOW,
    HOUR,
    LIFE_MEAN,
    LOCAL_CUM,
    MARKETS,
    ONE_TIMER,
    STAKES_EUR_CENTS,
    Array,
)


class Population:
    """Who plays on which day and when; numpy only, so a dry run replays it exactly."""

    FIELDS = ("reg", "life", "eng", "market", "device", "level", "pid")

    def __init__(self, seed: int, rate: float, markets: list[int], first_day: int) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.rate = rate
        self.markets = np.asarray(markets)
        weights = np.array([MARKETS[m][6] for m in markets])
        self.market_p = weights / weights.sum()
        self.offsets = np.array([m[5] for m in MARKETS])
        self.first_day = first_day
        self.next_pid = 0
        self.cols: dict[str, Array] = {f: np.zeros(0, dtype=np.int64) for f in self.FIELDS}
        self.cols["eng"] = np.zeros(0)
        self.deposited = np.zeros(0, dtype=bool)  # event-side state, never read here
        ages = np.arange(1, 366)
        counts = self.rng.poisson(rate * (1 - ONE_TIMER) * np.exp(-(ages - 1) / LIFE_MEAN))
        age = np.repeat(ages, counts)
        self.add(len(age), -age, age + 1 + np.floor(self.rng.exponential(LIFE_MEAN, len(age))))
        self.deposited[:] = self.rng.random(len(age)) < 0.6  # veterans: most have deposited

    def add(self, n: int, reg: Array | int, life: Array | None = None) -> None:
        rng = self.rng
        if life is None:
            lifetime = 2 + np.floor(rng.exponential(LIFE_MEAN, n))
            life = np.where(rng.random(n) < ONE_TIMER, 1, lifetime)
        new = {
            "reg": np.broadcast_to(reg, (n,)), "life": life,
            "eng": np.minimum(rng.lognormal(-0.18, 0.6, n), 6.0),
            "market": rng.choice(self.markets, n, p=self.market_p),
            "device": rng.choice(4, n, p=[0.38, 0.27, 0.25, 0.10]),
            "level": np.clip(np.rint(rng.normal(5.0, 1.8, n)), 0, len(STAKES_EUR_CENTS) - 1),
            "pid": np.arange(self.next_pid, self.next_pid + n),
        }
        self.next_pid += n
        for f in self.FIELDS:
            self.cols[f] = np.concatenate((self.cols[f], new[f].astype(self.cols[f].dtype)))
        self.deposited = np.concatenate((self.deposited, np.zeros(n, dtype=bool)))

    def day(self, d: int, day_ms: int) -> list[list[Any]]:
        """Day ``d``'s sessions by start: [start, index, first, market, device, level, pid]."""
        c, rng = self.cols, self.rng
        keep = (d - c["reg"]) < c["life"]
        if not keep.all():
            self.cols = c = {f: v[keep] for f, v in c.items()}
            self.deposited = self.deposited[keep]
        dow = DOW[(self.first_day + d + 3) % 7]  # 1970-01-01 was a Thursday
        age = np.minimum(d - c["reg"], len(BASE_RETURN) - 1)
        p = np.minimum(c["eng"] * BASE_RETURN[age] * dow, 0.95)
        active = np.flatnonzero(rng.random(len(p)) < p)
        n_new = int(rng.poisson(self.rate * dow * (0.9 + 0.2 * rng.random())))  # campaigns
        old = len(p)
        self.add(n_new, d)
        c = self.cols
        per = 1 + rng.poisson(0.35 * c["eng"][active])
        idx = np.concatenate((np.repeat(active, per), np.arange(old, old + n_new)))
        first = np.arange(len(idx)) >= len(idx) - n_new  # a new player's one session today
        hour = np.searchsorted(LOCAL_CUM, rng.random(len(idx)))
        utc_hour = (hour - self.offsets[c["market"][idx]]) % 24
        start = day_ms + utc_hour * HOUR + rng.integers(0, HOUR - 60_000, len(idx))
        o = np.argsort(start, kind="stable")
        idx = idx[o]
        return [start[o].tolist(), idx.tolist(), first[o].tolist(), c["market"][idx].tolist(),
                c["device"][idx].tolist(), c["level"][idx].tolist(), c["pid"][idx].tolist()]

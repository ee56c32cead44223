"""A deterministic synthetic event stream of an online-casino operator (``tally demo``).

Two seeded random streams: the player population (numpy) decides who plays on which day and
when each session starts; a per-session simulation (``random.Random``) writes the session's
events (registration, payment flow, bets, bonuses, RG signals, withdrawals). Events are bucketed
by hour and released hour by hour, sorted, so the stream is time-ordered and memory is bounded
by the few hours a session can span, not by the history. On release ~1% of events are re-sent
later as exact duplicates and ~2% are held back for hours (late webhooks).

The count is exact: a dry run of the population (cheap, numpy only) gives the number of sessions
up front, and the mean bets per session is steered towards the remaining budget session by
session; the last hour is topped up or cut so the stream holds exactly ``events`` events.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import random
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta
from functools import cache
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

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
# kind: (bet gap ms lo/median, settle ms lo/hi, win multipliers ×10, base probabilities)
KINDS: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, ...], tuple[float, ...]]] = {
    "slot": ((2_500, 5_000), (80, 900), (5, 10, 20, 30, 50, 100, 200, 500, 1000),
             (0.12, 0.08, 0.06, 0.03, 0.02, 0.01, 0.004, 0.0012, 0.0003)),
    "crash": ((8_000, 12_000), (3_000, 20_000), (12, 15, 20, 30, 50, 100, 500),
              (0.25, 0.15, 0.12, 0.05, 0.03, 0.012, 0.001)),
    "table": ((6_000, 9_000), (200, 1_500), (10, 20, 25, 360), (0.06, 0.40, 0.04, 0.002)),
    "live": ((25_000, 15_000), (15_000, 40_000), (10, 20, 25, 360), (0.06, 0.40, 0.04, 0.002)),
}
# provider kind commission(bps of stake) game:rtp‰ ('j': contributes to a jackpot)
GAMES_TABLE = """
nova slot 0 book-of-sand:961 fruit-storm:955 neon-nights:942 gold-rush-x:965 pharaoh-drop:921j
  viking-gold:958 lucky-sevens:950 wild-west:946
redstone slot 0 wolf-moon:962 dragon-pearls:915j big-bass-bay:960 sweet-cascade:957
  mega-fortune:903j aztec-gems:948 cleopatra-ii:945 joker-strike:960
bluefin slot 60 ocean-reels:968 starburst-xl:962 gem-heist:951 hot-chilli:944 arctic-fortune:930j
  koi-garden:957
orbit crash 0 rocket-x:970 aviator-one:970 plinko-pro:975 mines:972 keno-flash:936 dice-duel:968
kestrel table 40 blackjack-classic:980 european-roulette:973 baccarat-pro:976 video-poker:975
  sic-bo:972
livewave live 80 live-roulette:973 live-blackjack:978 lightning-roulette:971 crazy-wheel:962
  live-baccarat:976 monopoly-live:962 deal-show:955
"""
Game = tuple[str, str, list[float], list[int], bool, int, list[int], list[int]]
_OCCURRED = itemgetter("occurred_at")


def _games() -> list[tuple[Game, float]]:
    """(game, popularity) for the catalog; the RTP is exact by construction of the pay table."""
    tables = np.random.default_rng(20251023)
    games: list[tuple[Game, float]] = []
    for line in GAMES_TABLE.replace("\n  ", " ").strip().splitlines():
        provider, kind, comm, *entries = line.split()
        (gap_lo, gap_med), (set_lo, set_hi), mults, probs = KINDS[kind]
        gaps = (gap_lo + gap_med * tables.lognormal(0, 0.7, 1024)).astype(int).tolist()
        settles = tables.integers(set_lo, set_hi, 1024)
        settles[:10] = tables.integers(20_000, 180_000, 10)  # a provider hiccup now and then
        ev = sum(p * m / 10 for p, m in zip(probs, mults, strict=True))
        for entry in entries:
            name, rtp = entry.rstrip("j").split(":")
            cum = np.cumsum(np.array(probs) * int(rtp) / 1000 / ev).tolist()
            rank = 1 + (len(games) * 17) % 40
            weight = {"slot": 1.0, "crash": 0.6, "table": 0.4, "live": 0.7}[kind] / rank ** 0.9
            games.append(((name, provider, cum, [*mults, 0], entry.endswith("j"), int(comm),
                           gaps, tables.permutation(settles).tolist()), weight))
    return games


@cache
def _clock_tables() -> tuple[list[str], list[str]]:
    hms = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}" for s in range(86_400)]
    return hms, [f".{ms:03d}Z" for ms in range(1000)]


class _Population:
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


class _Sim:
    """The session simulation, the hourly release and the count controller."""

    def __init__(self, events: int, days: int, seed: int, end: datetime, batch_size: int,
                 markets: list[int]) -> None:
        self.events, self.batch_size = events, batch_size
        self.end_ms = int((end - EPOCH) / timedelta(milliseconds=1))
        self.start_ms = self.end_ms - days * DAY
        self.hours = days * 24
        key = f"{seed}|{events}|{days}|{self.end_ms}|{markets}".encode()
        tag = hashlib.blake2b(key, digest_size=3).hexdigest()
        self.etag, self.btag, self.tag = f"{tag}-", f"bt_{tag}_", tag
        self.salt = int(tag, 16)
        self.rng = random.Random(seed)  # noqa: S311 - reproducible simulation, not crypto
        self.rnd, self.bits = self.rng.random, self.rng.getrandbits
        tables = np.random.default_rng([seed, 2])
        self.lag = (200 + tables.gamma(1.6, 700, 4096)).astype(int).tolist()
        self.lag[:90] = tables.integers(30_000, 900_000, 90).tolist()  # webhooks stuck for minutes
        self.pay_lag = (500 + tables.gamma(1.5, 1500, 4096)).astype(int).tolist()
        self.pay_lag[:400] = tables.integers(60_000, 1_200_000, 400).tolist()
        self.rng.shuffle(self.lag)
        self.rng.shuffle(self.pay_lag)
        self.spread = tables.lognormal(-0.32, 0.8, 4096).tolist()  # mean 1, heavy right tail
        catalog = _games()
        self.games = [g for g, _ in catalog]
        self.game_cum = np.cumsum([w for _, w in catalog]).tolist()
        self.methods = {r: ([m for m, _, _ in ms], np.cumsum([w for _, w, _ in ms]).tolist(),
                            {m: f for m, _, f in ms}) for r, ms in METHODS.items()}
        self.fmt, self.fmt_ing = _formatters(self.start_ms // DAY, self.end_ms)
        self.stake_tables: dict[tuple[float, int], list[int]] = {}
        self.buckets: defaultdict[int, list[Event]] = defaultdict(list)
        self.late: defaultdict[int, list[Event]] = defaultdict(list)
        self.dups: list[tuple[int, int, Event]] = []
        self.n_ev = self.n_bet = self.n_ses = self.n_obj = self.emitted = 0
        # Retries are due one to a few batches later; those due after the end never come.
        self.dup_spread = min(3 * batch_size, max(1, events // 20))
        self.unsent = min(events, batch_size + self.dup_spread // 2)
        self.n_dups = 0
        self.made = self.bet_events = 0
        rate, self.ses_left = _calibrate(seed, events, days, markets, self.start_ms)
        # recent bet events, mu asked, other events, sessions: the share of players who can
        # bet drifts as they deposit, so the controller learns from a moving window, not all
        self.recent = (1.5 * 20, 20.0, 6.0 * 20, 20.0)
        self.forget = min(0.05, max(1 / 3000, 30 / max(self.ses_left, 1)))
        self.pop = _Population(seed, rate, markets, self.start_ms // DAY)
        self.days = days
        # the session's context, set by _session and read by the event writers
        self.tenant = self.region = self.pid = self.cur = self.ver = ""
        self.trace: str | None = None
        self.scale = 1.0

    # -- the stream ------------------------------------------------------------------------
    def stream(self) -> Iterator[list[Event]]:
        for d in range(self.days):
            day = self.pop.day(d, self.start_ms + d * DAY)
            j, total = 0, len(day[0])
            for h in range(d * 24, d * 24 + 24):
                limit = self.start_ms + (h + 1) * HOUR
                while j < total and day[0][j] < limit:
                    self._session(*(col[j] for col in day))
                    j += 1
                chunk = self._release(h)
                room = self.events - self.emitted
                if len(chunk) >= room:  # only in the last hour, unless the budget ran out early
                    yield chunk[:room]
                    return
                self.emitted += len(chunk)
                yield chunk

    def _release(self, h: int) -> list[Event]:
        """Hour ``h``: late arrivals due, duplicates due, then the hour's events in time order."""
        out = self.late.pop(h, [])
        while self.dups and self.dups[0][0] <= self.emitted:
            out.append(heapq.heappop(self.dups)[2])
        if h == self.hours - 1:
            self._top_up(h, len(out))
            out += sorted(self.buckets.pop(h, []), key=_OCCURRED)
            for due_at, _, ev in sorted(self.dups, key=itemgetter(0, 1)):
                if due_at > self.emitted + len(out):
                    break  # its retry would come after the stream ends
                out.append(ev)
            return out
        bucket = self.buckets.pop(h, [])
        bucket.sort(key=_OCCURRED)
        rnd, bits, pos = self.rnd, self.bits, self.emitted + len(out)
        for ev in bucket:
            u = rnd()
            if u < DUP_RATE:  # re-sent at least one batch later, as producers retry
                gap = self.batch_size + bits(24) % self.dup_spread
                self.n_dups += 1
                heapq.heappush(self.dups, (pos + gap, self.n_dups, ev))
            elif u < DUP_RATE + LATE_RATE and ev["event_type"] in LATE_TYPES:
                due = min(h + 1 + bits(3), self.hours - 1)
                ev["ingested_at"] = self.fmt(self.start_ms + due * HOUR + bits(21) % HOUR)
                self.late[due].append(ev)
                continue
            out.append(ev)
            pos += 1
        return out

    def _top_up(self, h: int, due: int) -> None:
        """Sessions late in the last hour until the stream can hold exactly ``events``."""
        hour_ms = self.start_ms + h * HOUR
        while True:
            have = self.emitted + due + len(self.buckets[h])
            if have + sum(due_at <= have for due_at, _, _ in self.dups) >= self.events:
                return
            c = self.pop.cols
            known = np.flatnonzero(c["reg"] < self.days - 1)  # signed up before today's hour
            first = len(known) == 0  # a tiny stream: someone must sign up
            if first:
                self.pop.add(1, self.days - 1)
                c = self.pop.cols
            i = len(c["pid"]) - 1 if first else int(known[self.bits(30) % len(known)])
            self._session(hour_ms + self.bits(20) % (HOUR - 60_000), i, first,
                          *(int(c[f][i]) for f in ("market", "device", "level", "pid")))

    # -- one session -----------------------------------------------------------------------
    def _session(self, start: int, i: int, first: bool, market: int, device: int, level: int,
                 pid: int) -> None:
        rnd, bits, made0, bet0 = self.rnd, self.bits, self.made, self.bet_events
        m = MARKETS[market]
        self.tenant, self.region, self.cur, self.scale = m[0], m[1], m[3], m[4]
        self.pid = f"p_{(pid * 2654435761 + self.salt) & 0xFFFFFFFF:08x}"
        self.ver = VERSIONS[m[0]]
        self.n_ses += 1
        sid = f"ss_{self.tag}_{self.n_ses:x}"
        self.trace = None if m[0] in UNTRACED else f"tr_{self.tag}_{self.n_ses:x}"
        stakes = self.stake_tables.get((m[4], level)) or self._stakes(m[4], level)
        t = start
        if first:
            self._put(t, "player.registered", {"country": m[2], "device": DEVICES[device]})
            t += 2_000 + bits(14)
        self._put(t, "session.started", {"session_id": sid, "device": DEVICES[device]})
        t0, t = t, t + 3_000 + bits(15 + bits(2))  # looking around the lobby
        deposited = bool(self.pop.deposited[i])
        bonus, bonus_id = 0, ""
        if rnd() < (0.22 if deposited else 0.5 if first else 0.15):
            t, amount = self._deposit(t, level)
            if amount and not deposited:
                self.pop.deposited[i] = deposited = True
                if rnd() < 0.5:  # welcome bonus: 100% match, capped
                    bonus = min(amount, round(100 * self.scale) * 100)
        if not bonus and rnd() < (0.12 if first else 0.05 if deposited else 0.02):
            bonus = round(10 * self.scale) * 100  # free spins / reload
        mu = self._mu()
        # no whales among the last sessions: they must land the count, not upset it
        spread = self.spread[bits(12)] if self.ses_left > 50 else 0.5 + rnd()
        n = int(mu * spread + rnd()) if deposited or bonus else 0
        if bonus:
            t += 500 + bits(12)
            bonus_id = f"bn_{self.tag}_{self.n_ses:x}"
            self._put(t, "bonus.issued", {"bonus_id": bonus_id, "amount_minor": bonus,
                                          "currency": self.cur})
        if n:
            t = self._bets(t, n, n if not deposited else n // 3 if bonus else 0, sid, stakes)
        if bonus and n and rnd() < 0.65:
            used = bonus * (30 + bits(7) % 71) // 100
            self._put(t + 400, "bonus.consumed", {"bonus_id": bonus_id, "amount_minor": used,
                                                  "currency": self.cur})
        self._tail(t, t0, sid, deposited, bool(n), level)
        self._account(mu, self.bet_events - bet0, self.made - made0)

    def _account(self, mu: float, bets: int, made: int) -> None:
        keep = 1.0 - self.forget
        bet_ev, asked, other, sessions = self.recent
        self.recent = (bet_ev * keep + bets, asked * keep + mu, other * keep + made - bets,
                       sessions * keep + 1)
        self.ses_left -= 1

    def _tail(self, t: int, t0: int, sid: str, deposited: bool, played: bool,
              level: int) -> None:
        """RG signals, a withdrawal now and then, and the end of the session."""
        rnd, bits, cur = self.rnd, self.bits, self.cur
        if played and rnd() < 0.012:
            t += 2_000 + bits(15)
            self._put(t, "rg.limit.hit", {"limit_type": LIMIT_TYPES[bits(2)], "session_id": sid})
        if deposited and played and rnd() < 0.05:
            t += 5_000 + bits(16)
            self.n_obj += 1
            amount = round(DEPOSITS_EUR[min(level // 2 + bits(2), 12)] * self.scale) * 100
            self._put(t, "wallet.debit", {"amount_minor": amount * (1 + bits(1)), "currency": cur,
                                          "reason": "withdrawal",
                                          "reference_id": f"wd_{self.tag}_{self.n_obj:x}"})
        t += 1_000 + bits(13)
        self._put(t, "session.ended", {"session_id": sid, "duration_sec": (t - t0) // 1000})

    def _deposit(self, t: int, level: int) -> tuple[int, int]:
        """intent → authorized → captured → wallet credit, or a failure and maybe a retry."""
        rnd, bits = self.rnd, self.bits
        names, cum, fail = self.methods[self.region]
        amount = round(DEPOSITS_EUR[min(level // 2 + bits(2), 12)] * self.scale) * 100
        method = names[bisect_right(cum, rnd() * cum[-1])]
        for _attempt in range(2):
            self.n_obj += 1
            pay = f"pm_{self.tag}_{self.n_obj:x}"
            body = {"payment_id": pay, "amount_minor": amount, "currency": self.cur,
                    "method": method}
            ver = "1.0.0" if method in LEGACY_METHODS else None
            t += 4_000 + bits(15)
            self._put(t, "payment.intent", body, ver, self.pay_lag)
            failed = rnd() < fail[method]
            if not (failed and rnd() < 0.55):  # declined by the issuer, or not at all
                t += 800 + bits(12)
                self._put(t, "payment.authorized", body, ver, self.pay_lag)
            if not failed:
                t += 500 + bits(13)
                self._put(t, "payment.captured", body, ver, self.pay_lag)
                t += 200 + bits(10)
                self._put(t, "wallet.credit", {"amount_minor": amount, "currency": self.cur,
                                               "reason": "deposit", "reference_id": pay})
                return t, amount
            t += 1_500 + bits(13)
            self._put(t, "payment.failed", body, ver, self.pay_lag)
            if rnd() < 0.6:  # gives up
                break
            method = names[bisect_right(cum, rnd() * cum[-1])]
        return t, 0

    def _put(self, t: int, etype: str, payload: dict[str, Any], ver: str | None = None,
             lag: list[int] | None = None) -> None:
        if t >= self.end_ms:
            return
        self.n_ev += 1
        ev = {"event_id": f"{self.etag}{self.n_ev:x}", "event_type": etype,
              "occurred_at": self.fmt(t),
              "ingested_at": self.fmt_ing(t + (lag or self.lag)[self.bits(12)]),
              "tenant_id": self.tenant, "region": self.region, "player_id": self.pid,
              "schema_version": ver or self.ver, "payload": payload}
        if self.trace:
            ev["trace_id"] = self.trace
        self.buckets[(t - self.start_ms) // HOUR].append(ev)
        self.made += 1

    def _bets(self, t: int, n: int, n_bonus: int, sid: str, stakes: list[int]) -> int:
        """``n`` bets, each placed then settled; the hot loop, so everything is a local."""
        rnd, bits, fmt, ing, lag = self.rnd, self.bits, self.fmt, self.fmt_ing, self.lag
        buckets = self.buckets
        start, end, cur, etag, btag = self.start_ms, self.end_ms, self.cur, self.etag, self.btag
        tenant, region, pid, ver, trace = self.tenant, self.region, self.pid, self.ver, self.trace
        games, game_cum = self.games, self.game_cum
        gid, prov, cum, mult, jackpot, comm, gaps, settles = games[
            bisect_right(game_cum, rnd() * game_cum[-1])]
        n_ev, n_bet, made, last, next_check = self.n_ev, self.n_bet, 0, t, t + REALITY_CHECK_MS
        side_made = self.made  # side events count themselves in self.made via _put
        for k in range(n):
            if rnd() < 0.05:  # tries another game
                gid, prov, cum, mult, jackpot, comm, gaps, settles = games[
                    bisect_right(game_cum, rnd() * game_cum[-1])]
            t += gaps[bits(10)]
            if t >= end:
                break
            stake = stakes[bits(6)]
            win = stake * mult[bisect_right(cum, rnd())] // 10
            n_bet += 1
            bet = f"{btag}{n_bet:x}"
            placed = {"bet_id": bet, "stake_minor": stake, "currency": cur, "game_id": gid,
                      "provider_id": prov}
            settled = {"bet_id": bet, "stake_minor": stake, "win_minor": win, "currency": cur,
                       "game_id": gid, "provider_id": prov}
            if k < n_bonus:
                placed["in_bonus"] = settled["in_bonus"] = True
            if jackpot:
                settled["jackpot_contribution_minor"] = (stake + 50) // 100
            if comm:
                settled["commission_minor"] = stake * comm // 10_000
            n_ev += 1
            ev = {"event_id": f"{etag}{n_ev:x}", "event_type": "bet.placed",
                  "occurred_at": fmt(t), "ingested_at": ing(t + lag[bits(12)]),
                  "tenant_id": tenant, "region": region, "player_id": pid,
                  "schema_version": ver, "payload": placed}
            if trace:
                ev["trace_id"] = trace
            buckets[(t - start) // HOUR].append(ev)
            ts = t + settles[bits(10)]
            last = ts if ts > last else last
            if ts < end:
                n_ev += 1
                ev = {"event_id": f"{etag}{n_ev:x}", "event_type": "bet.settled",
                      "occurred_at": fmt(ts), "ingested_at": ing(ts + lag[bits(12)]),
                      "tenant_id": tenant, "region": region, "player_id": pid,
                      "schema_version": ver, "payload": settled}
                if trace:
                    ev["trace_id"] = trace
                buckets[(ts - start) // HOUR].append(ev)
                made += 2
            else:
                made += 1
            if t >= next_check or rnd() < 0.02:  # reality check due, or a seamless-wallet echo
                self.n_ev, check = n_ev, t >= next_check
                self._side_events(t, ts, check, sid, bet, stake, win)
                n_ev, next_check = self.n_ev, t + REALITY_CHECK_MS if check else next_check
        self.n_ev, self.n_bet = n_ev, n_bet
        self.made += made
        self.bet_events += self.made - side_made
        return max(t, last)

    def _side_events(self, t: int, ts: int, check: bool, sid: str, bet: str, stake: int,
                     win: int) -> None:
        if check:
            self._put(t + 1, "rg.reality_check", {"session_id": sid})
            return
        self._put(t + 1, "wallet.debit", {"amount_minor": stake, "currency": self.cur,
                                          "reason": "bet", "reference_id": bet})
        if win:
            self._put(ts + 1, "wallet.credit", {"amount_minor": win, "currency": self.cur,
                                                "reason": "win", "reference_id": bet})

    def _stakes(self, scale: float, level: int) -> list[int]:
        top = len(STAKES_EUR_CENTS) - 1
        table = [max(1, round(STAKES_EUR_CENTS[min(max(level + s, 0), top)] * scale))
                 for s in STEPS]
        self.stake_tables[scale, level] = table
        return table

    def _mu(self) -> float:
        """Mean bets for the next session, so the events still to come meet the budget."""
        left = max(self.ses_left, 1)
        per_mu, other = self.recent[0] / self.recent[1], self.recent[2] / self.recent[3]
        rest = self.events - self.made - self.n_dups  # events to come, first sends and retries
        need = rest * (1 - DUP_RATE) + DUP_RATE * self.unsent  # first sends
        mu = (need - other * left) / (per_mu * left)
        return min(max(mu, 0.5), 20 * MU0)


def _formatters(first_day: int, end_ms: int) -> tuple[Any, Any]:
    """Epoch ms → RFC 3339 with milliseconds, from tables (4x faster than strftime); the second
    caps at ``end``: a producer cannot have ingested an event after the stream was sent."""
    prefix = {d: (EPOCH + timedelta(days=d)).strftime("%Y-%m-%dT")
              for d in range(first_day - 1, end_ms // DAY + 2)}
    hms, msz = _clock_tables()

    def fmt(t: int) -> str:
        s, ms = divmod(t, 1000)
        d, sod = divmod(s, 86_400)
        return prefix[d] + hms[sod] + msz[ms]

    def fmt_capped(t: int) -> str:
        s, ms = divmod(t if t < end_ms else end_ms - 1, 1000)
        d, sod = divmod(s, 86_400)
        return prefix[d] + hms[sod] + msz[ms]

    return fmt, fmt_capped


def _sessions_total(seed: int, rate: float, days: int, markets: list[int], start_ms: int) -> int:
    pop = _Population(seed, rate, markets, start_ms // DAY)
    return sum(len(pop.day(d, start_ms + d * DAY)[0]) for d in range(days))


def _calibrate(seed: int, events: int, days: int, markets: list[int],
               start_ms: int) -> tuple[float, int]:
    """Sign-ups per day for about MU0 bets a session, and the exact session count it gives."""
    probe = 40.0
    per_probe = _sessions_total(seed, probe, days, markets, start_ms)
    wanted = events / (1 + DUP_RATE) / (1.45 * MU0 + 6.0)
    rate = probe * wanted / max(per_probe, 1)
    rate = min(rate, 60_000.0)  # beyond this, sessions get longer rather than players more
    return rate, _sessions_total(seed, rate, days, markets, start_ms)


def _without_gc(chunks: Iterator[list[Event]]) -> Iterator[list[Event]]:
    """Run each step of ``chunks`` with the cyclic GC paused. The simulation makes no cycles,
    but its hours of live event dicts make every collection rescan them: ~25% of the time.
    The caller's code between steps runs with the GC as it found it."""
    while True:
        paused = gc.isenabled()
        gc.disable()
        try:
            chunk = next(chunks, None)
        finally:
            if paused:
                gc.enable()
        if chunk is None:
            return
        yield chunk


def demo_markets(regions: Collection[str] | None = None) -> list[int]:
    """Indices of the markets (brand × country) that live in ``regions`` (None: all)."""
    return [i for i, m in enumerate(MARKETS) if regions is None or m[1] in regions]


def generate(events: int, days: int, seed: int, end: datetime, batch_size: int = 5000,
             regions: Collection[str] | None = None) -> Iterator[list[Event]]:
    """Exactly ``events`` events in batches of ``batch_size`` (the last may be shorter),
    covering ``[end - days, end)``, roughly in time order; only brands in ``regions``."""
    if end.tzinfo is None:
        raise ValueError("end must be an aware UTC datetime")
    if events < 1 or days < 1 or batch_size < 1:
        raise ValueError("events, days and batch_size must be positive")
    markets = demo_markets(regions)
    if not markets:
        raise ValueError(f"no demo brand lives in the regions {sorted(regions or ())}")
    sim = _Sim(events, days, seed, end.astimezone(UTC), batch_size, markets)
    out: list[Event] = []
    for chunk in _without_gc(sim.stream()):
        out += chunk
        while len(out) >= batch_size:
            yield out[:batch_size]
            del out[:batch_size]
    if out:
        yield out

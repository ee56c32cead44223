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
from operator import itemgetter
from typing import Any

import numpy as np

from tally.demo.catalog import (
    DAY,
    DEPOSITS_EUR,
    DEVICES,
    DUP_RATE,
    EPOCH,
    HOUR,
    LATE_RATE,
    LATE_TYPES,
    LEGACY_METHODS,
    LIMIT_TYPES,
    MARKETS,
    METHODS,
    MU0,
    OCCURRED,
    REALITY_CHECK_MS,
    STAKES_EUR_CENTS,
    STEPS,
    UNTRACED,
    VERSIONS,
    Event,
    clock_tables,
    games,
)
from tally.demo.population import Population


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
        catalog = games()
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
        self.pop = Population(seed, rate, markets, self.start_ms // DAY)
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
            out += sorted(self.buckets.pop(h, []), key=OCCURRED)
            for due_at, _, ev in sorted(self.dups, key=itemgetter(0, 1)):
                if due_at > self.emitted + len(out):
                    break  # its retry would come after the stream ends
                out.append(ev)
            return out
        bucket = self.buckets.pop(h, [])
        bucket.sort(key=OCCURRED)
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
        """``n`` bets, each placed then settled (with the occasional side event)."""
        rnd, bits, put = self.rnd, self.bits, self._put
        end, cur, btag = self.end_ms, self.cur, self.btag
        games, game_cum = self.games, self.game_cum
        gid, prov, cum, mult, jackpot, comm, gaps, settles = games[
            bisect_right(game_cum, rnd() * game_cum[-1])]
        n_bet, last, next_check = self.n_bet, t, t + REALITY_CHECK_MS
        made_before = self.made
        for k in range(n):
            if rnd() < 0.05:  # tries another game
                gid, prov, cum, mult, jackpot, comm, gaps, settles = games[
                    bisect_right(game_cum, rnd() * game_cum[-1])]
            t += gaps[bits(10)]
            if t >= end:
                break
            stake = stakes[bits(6)]
            win = (stake * mult[bisect_right(cum, rnd())] + 50) // 100  # to the minor unit
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
            put(t, "bet.placed", placed)
            ts = t + settles[bits(10)]
            last = ts if ts > last else last
            put(ts, "bet.settled", settled)  # unless the settlement falls after the end
            if t >= next_check or rnd() < 0.02:  # reality check due, or a seamless-wallet echo
                check = t >= next_check
                self._side_events(t, ts, check, sid, bet, stake, win)
                next_check = t + REALITY_CHECK_MS if check else next_check
        self.n_bet = n_bet
        self.bet_events += self.made - made_before
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
    hms, msz = clock_tables()

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
    pop = Population(seed, rate, markets, start_ms // DAY)
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

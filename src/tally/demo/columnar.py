"""The demo operator's stream, vectorised: big stores in minutes (``tally demo --bulk``).

The same catalog (markets, methods, games and their pay tables, clocks) and the same player
population (``population.py``: who plays on which day and when) as ``generator.py``, but each
day's sessions are simulated together in numpy — registration, the payment flow, bonuses, bets
placed and settled with the game's pay table, seamless-wallet echoes, reality checks, RG limits,
withdrawals, the end of the session — and the events come out as Arrow tables in the columnar
format (:data:`tally.ingest.columnar.INPUT_SCHEMA`) for the bulk path, which validates and
dedups them like any batch. Like the per-event generator, ~2% of the late-arriving types come
hours late and ~1% of events are re-sent as exact duplicates a little later.

What differs from ``generator.py``: a player keeps one game per session but for a 5% re-roll
per bet (not a switch that sticks), a failed deposit is not retried, and the mean bets per
session is steered day by day (not session by session), so the count is close to, not exactly,
the number asked; :func:`tables` stops at it. The shape (players, sessions, events per type)
is returned by :meth:`Stream.shape` for the benchmark reports.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    REALITY_CHECK_MS,
    STAKES_EUR_CENTS,
    STEPS,
    UNTRACED,
    VERSIONS,
    games,
)
from tally.demo.generator import _calibrate, demo_markets
from tally.demo.population import Population
from tally.ingest.columnar import INPUT_SCHEMA

Ints = np.ndarray[Any, np.dtype[np.int64]]
Bools = np.ndarray[Any, np.dtype[np.bool_]]
_METHODS = sorted({m for ms in METHODS.values() for m, _, _ in ms})
_REGIONS = sorted({m[1] for m in MARKETS})
_BRANDS = sorted({m[0] for m in MARKETS})
_VERSIONS = sorted(set(VERSIONS.values()) | {"1.0.0"})


def _cat(values: list[str] | tuple[str, ...], idx: Any) -> pa.Array:
    """Strings from a small vocabulary by index (dictionary-decoded)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(idx, dtype=np.int32)),
                                          pa.array(list(values))).cast(pa.string())


def _ids(prefix: str, numbers: Any) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(np.asarray(numbers,
                                                                          dtype=np.int64)),
                                                       pa.string()), "")


class _Group:
    """Events of one type, one per masked session (or per bet): times, sessions, payload."""

    def __init__(self, etype: str, t: Ints, s: Ints, version: Ints | None = None,
                 lag: Ints | None = None, **payload: Any) -> None:
        self.etype, self.t, self.s, self.version, self.lag = etype, t, s, version, lag
        self.payload = payload


class Stream:
    def __init__(self, events: int, days: int, seed: int, end: datetime,
                 regions: Collection[str] | None = None) -> None:
        if end.tzinfo is None:
            raise ValueError("end must be an aware UTC datetime")
        if events < 1 or days < 1:
            raise ValueError("events and days must be positive")
        self.markets = demo_markets(regions)
        if not self.markets:
            raise ValueError(f"no demo brand lives in the regions {sorted(regions or ())}")
        self.events, self.days = events, days
        self.end_ms = int((end.astimezone(UTC) - EPOCH) / timedelta(milliseconds=1))
        self.start_ms = self.end_ms - days * DAY
        key = f"columnar|{seed}|{events}|{days}|{self.end_ms}|{self.markets}".encode()
        self.tag = hashlib.blake2b(key, digest_size=3).hexdigest()
        self.salt = int(self.tag, 16)
        rate, self.sessions_left = _calibrate(seed, events, days, self.markets, self.start_ms)
        self.pop = Population(seed, rate, self.markets, self.start_ms // DAY)
        self.rng = np.random.default_rng([seed, 3])
        rng = self.rng
        self.lag = (200 + rng.gamma(1.6, 700, 4096)).astype(np.int64)
        self.lag[:90] = rng.integers(30_000, 900_000, 90)
        self.pay_lag = (500 + rng.gamma(1.5, 1500, 4096)).astype(np.int64)
        self.pay_lag[:400] = rng.integers(60_000, 1_200_000, 400)
        rng.shuffle(self.lag)
        rng.shuffle(self.pay_lag)
        catalog = games()
        weights = np.array([w for _, w in catalog])
        self.game_p = weights / weights.sum()
        self.game_names = [g[0] for g, _ in catalog]
        self.providers = sorted({g[1] for g, _ in catalog})
        self.game_provider = np.array([self.providers.index(g[1]) for g, _ in catalog])
        self.game_cum = [np.asarray(g[2]) for g, _ in catalog]
        self.game_mult = [np.asarray(g[3], dtype=np.int64) for g, _ in catalog]
        self.jackpot = np.array([g[4] for g, _ in catalog])
        self.commission = np.array([g[5] for g, _ in catalog], dtype=np.int64)
        self.gaps = np.array([g[6] for g, _ in catalog], dtype=np.int64)
        self.settles = np.array([g[7] for g, _ in catalog], dtype=np.int64)
        m = MARKETS
        self.m_brand = np.array([_BRANDS.index(x[0]) for x in m])
        self.m_region = np.array([_REGIONS.index(x[1]) for x in m])
        self.m_country = [x[2] for x in m]
        self.m_currency = [x[3] for x in m]
        self.m_scale = np.array([x[4] for x in m])
        self.m_version = np.array([_VERSIONS.index(VERSIONS[x[0]]) for x in m])
        self.m_traced = np.array([x[0] not in UNTRACED for x in m])
        self.region_methods = {_REGIONS.index(r): (
            np.array([_METHODS.index(n) for n, _, _ in ms]),
            np.array([w for _, w, _ in ms], dtype=float) / sum(w for _, w, _ in ms))
            for r, ms in METHODS.items()}
        fail = dict.fromkeys(_METHODS, 0.0)
        for ms in METHODS.values():
            fail.update({n: f for n, _, f in ms})
        self.method_fail = np.array([fail[n] for n in _METHODS])
        self.legacy = np.array([n in LEGACY_METHODS for n in _METHODS])
        self.mu = MU0
        self.counts: Counter[str] = Counter()
        self.n_ses = self.n_bet = self.n_obj = self.emitted = self.made = 0
        self.players: set[int] = set()

    def shape(self) -> dict[str, Any]:
        """What the stream held: for the benchmarks' reports."""
        return {"events": self.emitted, "days": self.days, "players": len(self.players),
                "sessions": self.n_ses, "bets": self.n_bet,
                "by_type": dict(sorted(self.counts.items()))}

    def r(self, n: int, bits: int) -> Ints:
        return self.rng.integers(0, 1 << bits, n)

    # -- a day of sessions ---------------------------------------------------------------
    def day(self, d: int) -> list[_Group]:
        rng, r = self.rng, self.r
        cols = self.pop.day(d, self.start_ms + d * DAY)
        start, idx, first, market, device, level, pid = (np.asarray(c) for c in cols)
        n_s = len(start)
        if not n_s:
            return []
        first = first.astype(bool)
        self.session_base = self.n_ses
        self.n_ses += n_s
        self.players.update(pid.tolist())
        self.day_market, self.day_device = market, device
        self.day_pid = pid
        scale = self.m_scale[market]
        deposited = self.pop.deposited[idx].copy()
        s_all = np.arange(n_s)
        out: list[_Group] = []
        t = start.copy()
        out.append(_Group("player.registered", t[first], s_all[first],
                          country=_cat(self.m_country, market[first]),
                          device=_cat(DEVICES, device[first])))
        t = np.where(first, t + 2_000 + r(n_s, 14), t)
        out.append(_Group("session.started", t, s_all, session_id=None,
                          device=_cat(DEVICES, device)))
        t0 = t
        t = t + 3_000 + rng.integers(0, 1 << (15 + r(n_s, 2)))
        # the deposit: intent → authorized → captured → wallet credit, or a failure
        p = np.where(deposited, 0.22, np.where(first, 0.5, 0.15))
        att = rng.random(n_s) < p
        s_att = s_all[att]
        method = np.zeros(n_s, dtype=np.int64)
        region = self.m_region[market]
        for reg, (names, weights) in self.region_methods.items():
            here = att & (region == reg)
            method[here] = rng.choice(names, int(here.sum()), p=weights)
        amount = (np.rint(np.asarray(DEPOSITS_EUR)[np.minimum(level // 2 + r(n_s, 2), 12)]
                          * scale) * 100).astype(np.int64)
        fail = rng.random(n_s) < self.method_fail[method]
        version = np.where(self.legacy[method], _VERSIONS.index("1.0.0"),
                           self.m_version[market])
        pay = self.n_obj + np.arange(n_s)
        self.n_obj += n_s
        t_int = t + 4_000 + r(n_s, 15)
        auth = att & ~(fail & (rng.random(n_s) < 0.55))
        t_auth = t_int + 800 + r(n_s, 12)
        capt = att & ~fail
        t_cap = t_auth + 500 + r(n_s, 13)
        t_credit = t_cap + 200 + r(n_s, 10)
        failed = att & fail
        t_fail = np.where(auth, t_auth, t_int) + 1_500 + r(n_s, 13)

        def payment(etype: str, when: Ints, mask: Bools) -> _Group:
            return _Group(etype, when[mask], s_all[mask], version[mask], self.pay_lag,
                          payment_id=_ids(f"pm_{self.tag}_", pay[mask]),
                          amount_minor=amount[mask], currency=None,
                          method=_cat(_METHODS, method[mask]))

        out += [payment("payment.intent", t_int, att), payment("payment.authorized", t_auth, auth),
                payment("payment.captured", t_cap, capt), payment("payment.failed", t_fail, failed)]
        out.append(_Group("wallet.credit", t_credit[capt], s_all[capt],
                          amount_minor=amount[capt], currency=None,
                          reason=_cat(["deposit"], np.zeros(int(capt.sum()))),
                          reference_id=_ids(f"pm_{self.tag}_", pay[capt])))
        t = np.where(att, np.where(fail, t_fail, t_credit), t)
        del s_att
        new_dep = capt & ~deposited
        self.pop.deposited[idx[capt]] = True
        deposited = deposited | capt
        welcome = np.minimum(amount, np.rint(100 * scale).astype(np.int64) * 100)
        bonus = np.where(new_dep & (rng.random(n_s) < 0.5), welcome, 0)
        reload = (bonus == 0) & (rng.random(n_s) < np.where(first, 0.12,
                                                            np.where(deposited, 0.05, 0.02)))
        bonus = np.where(reload, np.rint(10 * scale).astype(np.int64) * 100, bonus)
        has_bonus = bonus > 0
        spread = rng.lognormal(-0.32, 0.8, n_s)
        n = np.where(deposited | has_bonus,
                     np.minimum(np.floor(self.mu * spread + rng.random(n_s)), 3_000), 0
                     ).astype(np.int64)
        t = np.where(has_bonus, t + 500 + r(n_s, 12), t)
        bonus_ids = _ids(f"bn_{self.tag}_", self.session_base + s_all[has_bonus])
        out.append(_Group("bonus.issued", t[has_bonus], s_all[has_bonus],
                          bonus_id=bonus_ids, amount_minor=bonus[has_bonus], currency=None))
        n_bonus = np.where(~deposited, n, np.where(has_bonus, n // 3, 0))
        t, bet_groups = self._bets(t, n, n_bonus, level, scale, s_all)
        out += bet_groups
        played = n > 0
        used = has_bonus & played & (rng.random(n_s) < 0.65)
        out.append(_Group("bonus.consumed", (t + 400)[used], s_all[used],
                          bonus_id=_ids(f"bn_{self.tag}_", self.session_base + s_all[used]),
                          amount_minor=bonus[used] * (30 + r(n_s, 7)[used] % 71) // 100,
                          currency=None))
        limit = played & (rng.random(n_s) < 0.012)
        t = np.where(limit, t + 2_000 + r(n_s, 15), t)
        out.append(_Group("rg.limit.hit", t[limit], s_all[limit], session_id=None,
                          limit_type=_cat(LIMIT_TYPES, r(int(limit.sum()), 2))))
        withdraw = deposited & played & (rng.random(n_s) < 0.05)
        t = np.where(withdraw, t + 5_000 + r(n_s, 16), t)
        w_amount = (np.rint(np.asarray(DEPOSITS_EUR)[np.minimum(level // 2 + r(n_s, 2), 12)]
                            * scale) * 100).astype(np.int64) * (1 + r(n_s, 1))
        wd = self.n_obj + np.arange(int(withdraw.sum()))
        self.n_obj += len(wd)
        out.append(_Group("wallet.debit", t[withdraw], s_all[withdraw],
                          amount_minor=w_amount[withdraw], currency=None,
                          reason=_cat(["withdrawal"], np.zeros(len(wd))),
                          reference_id=_ids(f"wd_{self.tag}_", wd)))
        t = t + 1_000 + r(n_s, 13)
        out.append(_Group("session.ended", t, s_all, session_id=None,
                          duration_sec=(t - t0) // 1000))
        return out

    def _bets(self, t: Ints, n: Ints, n_bonus: Ints, level: Ints, scale: Any,
              s_all: Ints) -> tuple[Ints, list[_Group]]:
        """Each session's ``n`` bets, placed then settled, with the side events."""
        rng, r = self.rng, self.r
        total = int(n.sum())
        if not total:
            return t, []
        bs = np.repeat(s_all, n)
        first_of = np.cumsum(n) - n
        k = np.arange(total) - np.repeat(first_of, n)
        n_games = len(self.game_names)
        game = rng.choice(n_games, len(n), p=self.game_p)[bs]
        reroll = rng.random(total) < 0.05
        game[reroll] = rng.choice(n_games, int(reroll.sum()), p=self.game_p)
        gap = self.gaps[game, r(total, 10)]
        run = np.cumsum(gap)
        base = np.zeros(len(n), dtype=np.int64)
        played = n > 0
        base[played] = run[first_of[played]] - gap[first_of[played]]
        placed_t = t[bs] + run - base[bs]
        lvl = np.clip(level[bs] + np.asarray(STEPS)[r(total, 6)], 0, len(STAKES_EUR_CENTS) - 1)
        stake = np.maximum(1, np.rint(np.asarray(STAKES_EUR_CENTS)[lvl] * scale[bs])
                           ).astype(np.int64)
        u = rng.random(total)
        win = np.zeros(total, dtype=np.int64)
        order = np.argsort(game, kind="stable")
        bounds = np.searchsorted(game[order], np.arange(n_games + 1))
        for g in range(n_games):
            sel = order[bounds[g]:bounds[g + 1]]
            if len(sel):
                mult = self.game_mult[g][np.searchsorted(self.game_cum[g], u[sel], "right")]
                win[sel] = (stake[sel] * mult + 50) // 100
        settled_t = placed_t + self.settles[game, r(total, 10)]
        in_bonus = k < n_bonus[bs]
        bet_no = self.n_bet + np.arange(total)
        self.n_bet += total
        bet_ids = _ids(f"bt_{self.tag}_", bet_no)
        game_ids = _cat(self.game_names, game)
        providers = _cat(self.providers, self.game_provider[game])
        bonus_flag = pa.array(in_bonus, mask=~in_bonus)  # true, or absent
        jackpot = self.jackpot[game]
        commission = self.commission[game]
        groups = [
            _Group("bet.placed", placed_t, bs, bet_id=bet_ids, stake_minor=stake,
                   currency=None, game_id=game_ids, provider_id=providers, in_bonus=bonus_flag),
            _Group("bet.settled", settled_t, bs, bet_id=bet_ids, stake_minor=stake,
                   win_minor=win, currency=None, game_id=game_ids, provider_id=providers,
                   in_bonus=bonus_flag,
                   jackpot_contribution_minor=pa.array(np.where(jackpot, (stake + 50) // 100, 0),
                                                       mask=~jackpot),
                   commission_minor=pa.array(stake * commission // 10_000,
                                             mask=commission == 0)),
        ]
        echo = rng.random(total) < 0.02
        groups.append(_Group("wallet.debit", placed_t[echo] + 1, bs[echo],
                             amount_minor=stake[echo], currency=None,
                             reason=_cat(["bet"], np.zeros(int(echo.sum()))),
                             reference_id=bet_ids.filter(pa.array(echo))))
        won = echo & (win > 0)
        groups.append(_Group("wallet.credit", settled_t[won] + 1, bs[won],
                             amount_minor=win[won], currency=None,
                             reason=_cat(["win"], np.zeros(int(won.sum()))),
                             reference_id=bet_ids.filter(pa.array(won))))
        last = t.copy()
        np.maximum.at(last, bs, settled_t)
        np.maximum.at(last, bs, placed_t)
        first_bet = np.full(len(n), 0, dtype=np.int64)
        first_bet[played] = placed_t[first_of[played]]
        checks = np.where(played, (last - first_bet) // REALITY_CHECK_MS, 0)
        cs = np.repeat(s_all, checks)
        nth = np.arange(len(cs)) - np.repeat(np.cumsum(checks) - checks, checks) + 1
        groups.append(_Group("rg.reality_check", first_bet[cs] + nth * REALITY_CHECK_MS + 1, cs,
                             session_id=None))
        return np.where(played, last, t), groups

    # -- groups to a table -----------------------------------------------------------------
    def table(self, groups: list[_Group]) -> pa.Table:
        """The day's events as one table, in the order a producer sends them (by
        ``ingested_at``, late arrivals hours later), with the re-sent duplicates."""
        parts, keys = [], []
        for g in groups:
            keep = g.t < self.end_ms
            if not keep.any():
                continue
            part, key = self._part(g, keep)
            parts.append(part)
            keys.append(key)
        if not parts:
            return INPUT_SCHEMA.empty_table()
        table = pa.concat_tables(parts)
        key = np.concatenate(keys)
        order = np.argsort(key, kind="stable")
        count = len(order)
        ids = _ids(f"ev_{self.tag}_", self.made + np.arange(count))
        self.made += count
        table = table.take(pa.array(order)).set_column(0, "event_id", ids)
        dups = np.flatnonzero(self.rng.random(count) < DUP_RATE)
        later = np.minimum(dups + 1 + self.r(len(dups), 14), count)
        final = np.argsort(np.concatenate((np.arange(count) * 2, later * 2 - 1)), kind="stable")
        return pa.concat_tables([table, table.take(pa.array(dups))]).take(pa.array(final))

    def _part(self, g: _Group, keep: Bools) -> tuple[pa.Table, Ints]:
        rng = self.rng
        t, s = g.t[keep], g.s[keep]
        n = len(t)
        market = self.day_market[s]
        lag = (g.lag if g.lag is not None else self.lag)[self.r(n, 12)]
        ingested = np.minimum(t + lag, self.end_ms - 1)
        if g.etype in LATE_TYPES:
            late = rng.random(n) < LATE_RATE
            hour = (t - self.start_ms) // HOUR
            due = np.minimum(hour + 1 + self.r(n, 3), self.days * 24 - 1)
            late_at = self.start_ms + due * HOUR + self.r(n, 21) % HOUR
            ingested = np.where(late & (late_at > t), late_at, ingested)
        ses = self.session_base + s
        version = g.version[keep] if g.version is not None else self.m_version[market]
        pid = (self.day_pid[s] * 2654435761 + self.salt) & 0xFFFFFFFF
        traced = self.m_traced[market]
        cols: dict[str, Any] = {
            "event_id": pa.nulls(n, pa.string()),
            "event_type": _cat([g.etype], np.zeros(n)),
            "occurred_at": pa.array(t * 1000, pa.timestamp("us", tz="UTC")),
            "ingested_at": pa.array(ingested * 1000, pa.timestamp("us", tz="UTC")),
            "tenant_id": _cat(_BRANDS, self.m_brand[market]),
            "region": _cat(_REGIONS, self.m_region[market]),
            "player_id": _ids("p_", pid),
            "trace_id": _ids(f"tr_{self.tag}_", ses) if traced.all() else pc.if_else(
                pa.array(traced), _ids(f"tr_{self.tag}_", ses), pa.scalar(None, pa.string())),
            "schema_version": _cat(_VERSIONS, version),
        }
        for name, value in g.payload.items():
            if name == "session_id":
                cols[name] = _ids(f"ss_{self.tag}_", ses)
            elif name == "currency":
                cols[name] = _cat(self.m_currency, market)
            elif isinstance(value, pa.Array | pa.ChunkedArray):
                cols[name] = value if n == len(keep) else value.filter(pa.array(keep))
            else:
                cols[name] = pa.array(np.asarray(value)[keep])
        self.counts[g.etype] += n
        arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in INPUT_SCHEMA]
        return (pa.Table.from_arrays([a.cast(f.type) for a, f in zip(arrays, INPUT_SCHEMA,
                                                                      strict=True)],
                                     schema=INPUT_SCHEMA), ingested)

    def _steer(self, made: int, sessions: int, bet_events: int) -> None:
        """The mean bets per session for the days to come, so the count meets the budget."""
        self.sessions_left = max(self.sessions_left - sessions, 1)
        mus = max(self.mu, 0.5)
        per_mu = bet_events / max(sessions * mus, 1)  # bet events per session per unit of mu
        other = (made - bet_events) / max(sessions, 1)
        need = (self.events - self.emitted) / (1 + DUP_RATE)
        self.mu = min(max((need - other * self.sessions_left)
                          / max(per_mu * self.sessions_left, 1e-9), 0.5), 20 * MU0)

    def tables(self, batch: int) -> Iterator[pa.Table]:
        bet_types = ("bet.placed", "bet.settled", "wallet.debit", "wallet.credit",
                     "rg.reality_check")
        for d in range(self.days):
            before = Counter(self.counts)
            sessions = self.n_ses
            table = self.table(self.day(d))
            made = sum(self.counts.values()) - sum(before.values())
            bets = sum(self.counts[x] - before[x] for x in bet_types)
            if self.emitted + table.num_rows >= self.events:
                table = table.slice(0, self.events - self.emitted)
            self.emitted += table.num_rows
            for offset in range(0, table.num_rows, batch):
                yield table.slice(offset, batch)
            if self.emitted >= self.events:
                return
            self._steer(made, self.n_ses - sessions, bets)


def tables(events: int, days: int, seed: int, end: datetime, batch: int = 100_000,
           regions: Collection[str] | None = None) -> tuple[Stream, Iterator[pa.Table]]:
    """About ``events`` events (at most that many) over ``[end - days, end)`` in tables of at
    most ``batch`` rows, in the columnar format; the stream object tells their shape."""
    stream = Stream(events, days, seed, end, regions)
    return stream, stream.tables(batch)

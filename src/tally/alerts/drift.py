"""RTP drift: is a game's (or provider's) observed RTP outside the confidence interval of its
theoretical RTP, given the bets seen? (docs/alerts.md#rtp-drift)

**Method.** With n bets of stakes sᵢ and wins wᵢ, the observed RTP is the ratio estimator
R̂ = Σw / Σs. Its variance, by the delta method with the observed spread of win per unit
stake around it, is

    Var(R̂) ≈ Σ(wᵢ − R̂ sᵢ)² / (Σs)² = (Σw² − 2 R̂ Σsw + R̂² Σs²) / (Σs)²

so only five sums are needed — Σs, Σw, Σs², Σw², Σs·w — which the rollups keep per bucket
(``semantic/catalog.py``: ``stake_sum`` … ``stake_win_sum``, 128-bit), and reading them costs
one rollup query. With z the two-sided normal quantile of the confidence c
(Φ⁻¹((1 + c) / 2): 3.29 for 0.999), the rule fires when R̂ lies outside
θ ± z·√Var(R̂), θ the theoretical RTP. A key is judged once it has ``min_bets`` bets (the
interval is a normal approximation: it needs enough bets for the central limit theorem).

**Exactness.** The sums are exact integers; converted to the reporting currency they are
exact fractions (a sum by the day's rate, a second moment by its square); the residual sum
above is computed from them exactly (no cancellation error), and only the final ratio, its
standard error and the interval are floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction
from statistics import NormalDist
from typing import Any

from tally.alerts.conditions import MAX_SUBJECTS, Reading
from tally.errors import QueryTooLarge
from tally.insights import request as rq
from tally.insights.evaluate import DAY, run, statement
from tally.insights.series import Context, currency_of
from tally.semantic.catalog import RTP_MOMENTS
from tally.semantic.compiler import Scope

MOMENTS = tuple(name for _, name in RTP_MOMENTS.terms)  # bets, Σs, Σw, Σs², Σw², Σsw


@dataclass
class Moments:
    """A key's bets and the sums of its stakes and wins (minor units of one currency)."""

    bets: int = 0
    stake: Fraction | int = 0
    wins: Fraction | int = 0
    stake_sq: Fraction | int = 0
    win_sq: Fraction | int = 0
    stake_win: Fraction | int = 0

    def add(self, bets: int, stake: Fraction | int, wins: Fraction | int,
            stake_sq: Fraction | int, win_sq: Fraction | int,
            stake_win: Fraction | int) -> None:
        self.bets += bets
        self.stake += stake
        self.wins += wins
        self.stake_sq += stake_sq
        self.win_sq += win_sq
        self.stake_win += stake_win


@dataclass(frozen=True)
class Assessment:
    rtp: float  # observed, R̂
    standard_error: float  # √Var(R̂)
    low: float  # θ − z·SE
    high: float  # θ + z·SE
    outside: bool

    @property
    def interval(self) -> list[float]:
        return [self.low, self.high]


def critical(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence``."""
    return NormalDist().inv_cdf((1 + confidence) / 2)


def assess(m: Moments, theoretical: float, confidence: float) -> Assessment | None:
    """Whether the observed RTP of ``m`` lies outside the interval (None: no stake)."""
    if m.stake <= 0:
        return None
    stake = Fraction(m.stake)
    ratio = Fraction(m.wins) / stake
    residual = m.win_sq - 2 * ratio * m.stake_win + ratio * ratio * m.stake_sq
    se = math.sqrt(max(float(residual / (stake * stake)), 0.0))
    half = critical(confidence) * se
    observed = float(ratio)
    return Assessment(observed, se, theoretical - half, theoretical + half,
                      abs(observed - theoretical) > half)


def read(query: dict[str, Any], spec: dict[str, Any], ctx: Context) -> list[Reading]:
    """One reading per key of the slice (``game_id`` or ``provider_id``) with bets in its
    range, confined as the slice route confines it."""
    params = query["params"]
    metric = rq.parse_metric(params.get("metric"), ctx.principal)
    dim = params["dim"]
    start, end = rq.parse_range(params.get("from"), params.get("to"))
    filters = rq.confine(rq.parse_filters(params.get("filters"), metric), ctx.principal,
                         ctx.settings.served_regions)
    currency = currency_of(params.get("currency"), ctx.settings)
    found = moments(ctx, Scope(start, end, DAY, filters, (dim,)), currency)
    readings = []
    for key, m in sorted(found.items(), key=lambda kv: str(kv[0])):
        judged = assess(m, spec["theoretical"], spec["confidence"]) \
            if m.bets >= spec.get("min_bets", 1000) else None
        values: dict[str, Any] = {"bets": m.bets, "stake_minor": round(m.stake),
                                  "wins_minor": round(m.wins)}
        if judged is not None:
            values |= {"rtp": judged.rtp, "theoretical": spec["theoretical"],
                       "confidence": spec["confidence"],
                       "standard_error": judged.standard_error, "interval": judged.interval}
        readings.append(Reading({dim: key}, judged is not None and judged.outside, values))
    return readings


def moments(ctx: Context, scope: Scope, currency: str) -> dict[Any, Moments]:
    """Per key of ``scope.group_by``: the moments of its bets, converted to ``currency``
    (each day's sums by that day's rate; second moments by its square)."""
    rows = run(ctx.backend, statement(RTP_MOMENTS, scope, 0))
    key_name = scope.group_by[0]
    found: dict[Any, Moments] = {}
    for row in rows:
        key = row[key_name]
        if key not in found and len(found) == MAX_SUBJECTS:
            raise QueryTooLarge(f"more than {MAX_SUBJECTS} keys have bets in the range: narrow "
                                "it with a filter", limit="max_subjects")
        bets, *sums = (int(row[name]) for name in MOMENTS)
        source = row["source_currency"]
        rate: Fraction | int = 1 if source == currency \
            else ctx.fx.factor(source, currency, _day(row["bucket"]))
        stake, wins, stake_sq, win_sq, stake_win = sums
        found.setdefault(key, Moments()).add(bets, stake * rate, wins * rate,
                                             stake_sq * rate * rate, win_sq * rate * rate,
                                             stake_win * rate * rate)
    return found


def _day(bucket: Any) -> date:
    return datetime.fromtimestamp(int(bucket), UTC).date()

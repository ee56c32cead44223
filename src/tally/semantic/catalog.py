"""The metric catalog (CONTRACT §5) as data: measures over events, metrics over measures.

A *measure* is an additive aggregate of one kind of event (a sum of a money column, or a
count). A *metric* is an expression over measures (``ggr = stake − wins``), a ratio of two
measures, a percentile of a per-event quantity, or a distinct count of active players. Every
endpoint asks this module what a metric means; nothing else defines one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tally.semantic.rules import ACTIVE_DEFINITION, BET_SETTLED, DEPOSIT, EventRule


class Unit(StrEnum):
    MONEY = "money"  # integer minor units of the reporting currency: answered as value_minor
    COUNT = "count"
    RATIO = "ratio"
    SECONDS = "seconds"


class Kind(StrEnum):
    ADDITIVE = "additive"  # a signed sum of measures: sums of buckets are sums of events
    RATIO = "ratio"  # numerator measure / denominator measure, null when the denominator is 0
    PERCENTILE = "percentile"  # exact, over per-event values
    DISTINCT = "distinct"  # distinct active players, never summed across buckets


@dataclass(frozen=True)
class Dimension:
    name: str  # the API's filter / group-by key
    column: str  # the column it reads: of the events, or of player_attributes
    description: str
    # a player attribute (CONTRACT §4): this field of the player's registration, kept per
    # (brand, player) in player_attributes (semantic/attributes.py), not the event's own
    registration_field: str | None = None

    @property
    def player_attribute(self) -> bool:
        return self.registration_field is not None


_REGISTRATION = ("of the player's registration (its first player.registered by occurred_at), "
                 "joined per (brand, player) to every event a metric counts; null for the "
                 "events of a player with no registration")
DIMENSIONS: dict[str, Dimension] = {
    d.name: d
    for d in (
        Dimension("brand_id", "tenant_id", "the brand (the event's tenant_id)"),
        Dimension("region", "region", "the region the event belongs to"),
        Dimension("provider_id", "provider_id", "game provider (bets)"),
        Dimension("game_id", "game_id", "game (bets)"),
        Dimension("method", "method", "payment method (payment events)"),
        Dimension("currency", "currency", "the event's own currency, before conversion"),
        Dimension("device", "registered_device", f"device class {_REGISTRATION}",
                  registration_field="device"),
        Dimension("geo", "registered_country", f"ISO 3166 country {_REGISTRATION}",
                  registration_field="country"),
    )
}
# every metric counts events of players (a payment or any event may lack one: it then has no
# attribute), so every metric can be filtered and grouped by the player's attributes
PLAYER_ATTRIBUTES = tuple(name for name, d in DIMENSIONS.items() if d.player_attribute)
BET_DIMENSIONS = ("brand_id", "region", "provider_id", "game_id", "currency", *PLAYER_ATTRIBUTES)
PAYMENT_DIMENSIONS = ("brand_id", "region", "method", "currency", *PLAYER_ATTRIBUTES)
WALLET_DIMENSIONS = ("brand_id", "region", "currency", *PLAYER_ATTRIBUTES)
PLAYER_DIMENSIONS = ("brand_id", "region", *PLAYER_ATTRIBUTES)


@dataclass(frozen=True)
class Measure:
    name: str
    event: EventRule  # the events it aggregates (semantic/rules.py)
    column: str | None  # summed column; None counts events
    money: bool = False
    # a second column: the measure sums column × times per event (a second moment, for the
    # variance of RTP: alerts/drift.py); money² in minor units², converted by rate²
    times: str | None = None

    @property
    def event_type(self) -> str:
        return self.event.event_type

    @property
    def reason(self) -> str | None:  # wallet reason the event must carry
        return self.event.reason


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("stake_sum", BET_SETTLED, "stake_minor", money=True),
        Measure("win_sum", BET_SETTLED, "win_minor", money=True),
        Measure("jackpot_sum", BET_SETTLED, "jackpot_contribution_minor", money=True),
        Measure("commission_sum", BET_SETTLED, "commission_minor", money=True),
        Measure("bonus_consumed_sum", EventRule("bonus.consumed"), "amount_minor", money=True),
        Measure("bet_count", BET_SETTLED, None),
        Measure("deposit_sum", DEPOSIT, "amount_minor", money=True),
        Measure("deposit_count", DEPOSIT, None),
        Measure("intent_count", EventRule("payment.intent"), None),
        Measure("capture_count", EventRule("payment.captured"), None),
        # second moments of bets (RTP drift, docs/alerts.md#rtp-drift): no metric reads them
        Measure("stake_sq_sum", BET_SETTLED, "stake_minor", money=True, times="stake_minor"),
        Measure("win_sq_sum", BET_SETTLED, "win_minor", money=True, times="win_minor"),
        Measure("stake_win_sum", BET_SETTLED, "stake_minor", money=True, times="win_minor"),
    )
}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: Unit
    kind: Kind
    definition: str
    dimensions: tuple[str, ...]
    terms: tuple[tuple[int, str], ...] = ()  # ADDITIVE: (sign, measure); RATIO: (num, den)
    window_days: int = 1  # DISTINCT: active in the N UTC days ending with the bucket's day
    granularities: tuple[str, ...] = ("1m", "5m", "1h", "1d")

    @property
    def measures(self) -> tuple[Measure, ...]:
        return tuple(MEASURES[name] for _, name in self.terms)


def _additive(name: str, unit: Unit, definition: str, dims: tuple[str, ...],
              *terms: tuple[int, str]) -> Metric:
    return Metric(name, unit, Kind.ADDITIVE, definition, dims, terms)


_ACTIVE = ACTIVE_DEFINITION

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        _additive("stake", Unit.MONEY, "Σ stake_minor of bet.settled", BET_DIMENSIONS,
                  (1, "stake_sum")),
        _additive("wins", Unit.MONEY, "Σ win_minor of bet.settled", BET_DIMENSIONS,
                  (1, "win_sum")),
        _additive("ggr", Unit.MONEY, "gross gaming revenue: stake − wins (bet.settled)",
                  BET_DIMENSIONS, (1, "stake_sum"), (-1, "win_sum")),
        _additive("ngr", Unit.MONEY,
                  "net gaming revenue: ggr − Σ bonus.consumed.amount_minor − Σ "
                  "jackpot_contribution_minor − Σ commission_minor (of bet.settled)",
                  ("brand_id", "region", "currency", *PLAYER_ATTRIBUTES),
                  (1, "stake_sum"), (-1, "win_sum"), (-1, "bonus_consumed_sum"),
                  (-1, "jackpot_sum"), (-1, "commission_sum")),
        Metric("rtp", Unit.RATIO, Kind.RATIO,
               "return to player: wins / stake of bet.settled (null when stake = 0)",
               BET_DIMENSIONS, ((1, "win_sum"), (1, "stake_sum"))),
        _additive("bets", Unit.COUNT, "count of bet.settled", BET_DIMENSIONS,
                  (1, "bet_count")),
        _additive("deposits", Unit.MONEY,
                  f"Σ amount_minor of {DEPOSIT.describe()}", WALLET_DIMENSIONS,
                  (1, "deposit_sum")),
        _additive("deposits_count", Unit.COUNT,
                  f"count of {DEPOSIT.describe()}", WALLET_DIMENSIONS,
                  (1, "deposit_count")),
        Metric("deposits_success", Unit.RATIO, Kind.RATIO,
               "count of payment.captured / count of payment.intent in the bucket (null "
               "when there is no intent)", PAYMENT_DIMENSIONS,
               ((1, "capture_count"), (1, "intent_count"))),
        Metric("settle_lag_p95", Unit.SECONDS, Kind.PERCENTILE,
               "p95 of t(bet.settled) − t(bet.placed) for the same (brand, bet_id), pairing "
               "each settle with the latest placement at or before it (a settle with none is "
               "left out), in seconds, bucketed by settle time", BET_DIMENSIONS),
        Metric("webhook_lag_p95", Unit.SECONDS, Kind.PERCENTILE,
               "p95 of ingested_at − occurred_at over all events, in seconds",
               PLAYER_DIMENSIONS),
        Metric("dau", Unit.COUNT, Kind.DISTINCT,
               f"distinct players active in the bucket; {_ACTIVE}", PLAYER_DIMENSIONS),
        Metric("wau", Unit.COUNT, Kind.DISTINCT,
               "distinct players active in the 7 UTC days ending with the bucket's day",
               PLAYER_DIMENSIONS, window_days=7, granularities=("1d",)),
        Metric("mau", Unit.COUNT, Kind.DISTINCT,
               "distinct players active in the 30 UTC days ending with the bucket's day",
               PLAYER_DIMENSIONS, window_days=30, granularities=("1d",)),
    )
}

# what RTP drift reads per (day, key, currency): the bets, their first and second moments
# (not a metric of the catalog: alerts/drift.py asks the semantic layer for it)
RTP_MOMENTS = Metric("rtp_moments", Unit.RATIO, Kind.RATIO,
                     "bets, Σ stake, Σ win, Σ stake², Σ win², Σ stake·win of bet.settled",
                     BET_DIMENSIONS, ((1, "bet_count"), (1, "stake_sum"), (1, "win_sum"),
                                      (1, "stake_sq_sum"), (1, "win_sq_sum"),
                                      (1, "stake_win_sum")))

PERCENTILE_METHOD = "nearest-rank"  # the smallest value with at least 95% of values ≤ it


def describe(allowed: frozenset[str] | None = None) -> list[dict[str, object]]:
    """The catalog as served at ``GET /v1/metrics`` (only ``allowed`` metrics when given)."""
    return [
        {
            "name": m.name,
            "unit": m.unit.value,
            "kind": m.kind.value,
            "definition": m.definition,
            "answer_field": "value_minor" if m.unit is Unit.MONEY else "value",
            "dimensions": list(m.dimensions),
            "granularities": list(m.granularities),
            **({"percentile_method": PERCENTILE_METHOD} if m.kind is Kind.PERCENTILE else {}),
            **({"window_days": m.window_days} if m.kind is Kind.DISTINCT else {}),
        }
        for m in METRICS.values()
        if allowed is None or m.name in allowed
    ]

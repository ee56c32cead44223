"""The business rules every query, rollup and cohort table derives from, each defined once.

- An :class:`EventRule` is a kind of event: an event type, and the wallet ``reason`` it must
  carry when it has one. ``DEPOSIT`` — a ``wallet.credit`` with ``reason=deposit`` — is the
  one definition of a deposit: the ``deposits`` measures, the activity tables, the
  ``first_deposit`` cohort and retention's deposit returns all read it from here.
- A player is *active* (CONTRACT §5) when they place a bet or make a deposit
  (:data:`ALWAYS_ACTIVE`: active whatever else happens), or start a session whose
  ``session.ended`` duration is at least ``TALLY_ACTIVE_SESSION_MIN`` minutes (counted at the
  session's start: :func:`active`, :func:`long_enough`).

Each rule builds typed sqlglot conditions (no SQL text): a store renders them in its dialect.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlglot import exp


@dataclass(frozen=True)
class EventRule:
    """Events of one type, carrying ``reason`` when it is set."""

    event_type: str
    reason: str | None = None

    def condition(self, table: str | None = None) -> exp.Expr:
        """The rule as a condition on the columns (of ``table``, if named)."""
        found: exp.Expr = exp.column("event_type", table).eq(
            exp.Literal.string(self.event_type))
        if self.reason is not None:
            found = exp.and_(found, exp.column("reason", table).eq(
                exp.Literal.string(self.reason)))
        return found

    @property
    def conditions(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The payload conditions beyond the event type, as a cohort step writes them."""
        return () if self.reason is None else (("reason", (self.reason,)),)

    def describe(self) -> str:
        return self.event_type if self.reason is None \
            else f"{self.event_type} with reason={self.reason}"


BET_PLACED = EventRule("bet.placed")
BET_SETTLED = EventRule("bet.settled")
DEPOSIT = EventRule("wallet.credit", "deposit")
REGISTRATION = EventRule("player.registered")
SESSION_STARTED = EventRule("session.started")
SESSION_ENDED = EventRule("session.ended")

# what makes a player active whatever else happens, by the kind the activity tables record
# (retention reads bets or deposits alone by it); the last is the ELSE of :func:`active_kind`
ALWAYS_ACTIVE: dict[str, EventRule] = {"bet": BET_PLACED, "deposit": DEPOSIT}
SESSION_KIND = "session"  # an activity row from a session (its duration decides)

ACTIVE_DEFINITION = (
    f"active = placed a bet ({BET_PLACED.describe()}), or made a deposit "
    f"({DEPOSIT.describe()}), or had a session whose {SESSION_ENDED.event_type}.duration_sec "
    "≥ TALLY_ACTIVE_SESSION_MIN minutes (counted at the session's start)")


def always_active(table: str | None = None) -> exp.Expr:
    """The events that make their player active whatever else happens."""
    return exp.or_(*(rule.condition(table) for rule in ALWAYS_ACTIVE.values()))


def active(long_session: exp.Expr, table: str | None = None) -> exp.Expr:
    """The events that make their player active, ``long_session`` saying of a session start
    that its session lasted long enough (:func:`long_enough` of its end's duration)."""
    return exp.or_(*(rule.condition(table) for rule in ALWAYS_ACTIVE.values()),
                   exp.and_(SESSION_STARTED.condition(table), long_session))


def long_enough(duration_sec: exp.Expr, min_session_seconds: exp.Expr) -> exp.Expr:
    """A session of ``duration_sec`` counts its player as active."""
    return duration_sec >= min_session_seconds


def active_kind(table: str | None = None) -> exp.Expr:
    """Of an event :func:`always_active` holds: the kind of :data:`ALWAYS_ACTIVE` it is."""
    *first, (last, _) = ALWAYS_ACTIVE.items()
    case = exp.Case()
    for kind, rule in first:
        case = case.when(rule.condition(table), exp.Literal.string(kind))
    return case.else_(exp.Literal.string(last))


def matching(event: str, conditions: tuple[tuple[str, tuple[object, ...]], ...]) \
        -> EventRule | None:
    """The rule a cohort step (event type and payload conditions) states exactly, if any."""
    for rule in (BET_PLACED, BET_SETTLED, DEPOSIT, REGISTRATION, SESSION_STARTED,
                 SESSION_ENDED):
        if rule.event_type == event and rule.conditions == conditions:
            return rule
    return None

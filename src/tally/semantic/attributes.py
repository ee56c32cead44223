"""The player's registration attributes (CONTRACT §4), defined once and used everywhere.

``device`` and ``geo`` of a (brand, player) are the ``device`` and ``country`` of the player's
first ``player.registered`` event by ``occurred_at`` (ties: the smallest ``event_id``, so the
answer never depends on arrival order); a player with no registration has neither, and neither
has an event without a player.

They are kept in ``player_attributes``, one row per (brand, player), in the events' transaction
like the rollups: each batch upserts its own first registration per player, which replaces the
kept row only when it comes first in (occurred_at, event_id) order. A late, earlier
registration therefore moves the attributes back, a later one changes nothing, and a journal
replay or a back-fill from the events rebuilds the same rows.

A query that filters or groups by an attribute reads its source (the events, an activity table,
the cohort members) through :func:`source`: the same rows with the attribute columns of their
(brand, player) joined on; every other query reads the source alone (the rollups keep no
player, so they cannot answer an attribute query, and need not).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlglot import exp

from tally.semantic.catalog import DIMENSIONS
from tally.semantic.rules import REGISTRATION
from tally.storage.base import DerivedTable, Least
from tally.storage.dialects import excluded, render, upsert

TABLE = "player_attributes"
# one row per (brand, player): the first registration, in (occurred_at, event_id) order
KEPT = Least(keys=("tenant_id", "player_id"), by=("registered_at", "registration_id"))
# (events field of the registration, column kept) per attribute dimension, in catalog order
COLUMNS = tuple((d.registration_field, d.column) for d in DIMENSIONS.values()
                if d.registration_field is not None)


def names_attributes(keys: Iterable[str]) -> bool:
    """Do these filter or group-by keys name a player attribute?"""
    return any(DIMENSIONS[key].player_attribute for key in keys)


def source(table: str, keys: Iterable[str], alias: str | None = None) -> exp.Expr:
    """``table`` (any with ``tenant_id`` and ``player_id``) under ``alias`` (default: its own
    name) — with its players' attribute columns joined on when ``keys`` name one (a LEFT
    join: a player without registration keeps its rows, with NULL attributes)."""
    name = alias or table
    if not names_attributes(keys):
        return exp.alias_(exp.to_table(table), name, table=True) if alias else \
            exp.to_table(table)
    on = exp.and_(*(exp.column(key, "a").eq(exp.column(key, table))
                    for key in ("tenant_id", "player_id")))
    joined = (
        exp.select(exp.Column(this=exp.Star(), table=exp.to_identifier(table)),
                   *(exp.column(kept, "a") for _, kept in COLUMNS))
        .from_(table)
        .join(exp.alias_(exp.to_table(TABLE), "a", table=True), on=on, join_type="LEFT")
    )
    return exp.alias_(joined.subquery(), name, table=True)


def _maintenance(events: str) -> exp.Insert:
    """Each (brand, player)'s first registration in ``events``, replacing the kept row only
    when it comes first in (occurred_at, event_id) order."""
    first = exp.Window(
        this=exp.RowNumber(),
        partition_by=[exp.column("tenant_id"), exp.column("player_id")],
        order=exp.Order(expressions=[exp.Ordered(this=exp.column("occurred_at")),
                                     exp.Ordered(this=exp.column("event_id"))]))
    select = (
        exp.select("tenant_id", "player_id", "occurred_at", "event_id",
                   *(field for field, _ in COLUMNS))
        .from_(events)
        .where(REGISTRATION.condition())
        .where(exp.column("player_id").is_(exp.null()).not_())
        .qualify(first.eq(exp.Literal.number(1)))
    )
    updates = {c: excluded(c) for c in
               ("registered_at", "registration_id", *(kept for _, kept in COLUMNS))}

    def kept(name: str) -> exp.Column:
        return exp.column(name, TABLE)

    earlier = exp.or_(
        excluded("registered_at") < kept("registered_at"),
        exp.and_(excluded("registered_at").eq(kept("registered_at")),
                 excluded("registration_id") < kept("registration_id")))
    return upsert(exp.insert(select, TABLE), KEPT.keys, updates, earlier)


def derived_table(dialect: str = "duckdb") -> DerivedTable:
    """``player_attributes`` as a table the store keeps from the events (filled from the
    stored events when new to an existing store)."""
    columns = ", ".join(f"{kept} VARCHAR" for _, kept in COLUMNS)
    return DerivedTable(
        TABLE,
        f"CREATE TABLE IF NOT EXISTS {TABLE} (tenant_id VARCHAR NOT NULL, "
        "player_id VARCHAR NOT NULL, registered_at TIMESTAMP NOT NULL, "
        f"registration_id VARCHAR NOT NULL, {columns}, PRIMARY KEY (tenant_id, player_id))",
        (render(_maintenance("_new_events"), dialect),),
        (render(_maintenance("events"), dialect),), least=KEPT)

"""Typed payloads of every event type (CONTRACT §2). Money is integer minor units."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
# The money range of one event (docs/ingestion.md): 0 ≤ amount ≤ 2^53 − 1 minor units, the
# integers every JSON reader holds exactly (RFC 7493 I-JSON); 90 trillion EUR in cents, beyond
# any real bet or payment. Sums are kept in 128 bits, so no number of them can overflow.
MAX_MINOR = 2**53 - 1
Minor = Annotated[int, msgspec.Meta(ge=0, le=MAX_MINOR)]
Currency = Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")]
WalletReason = Literal["deposit", "withdrawal", "bet", "win", "bonus", "adjustment"]


class Payload(msgspec.Struct, frozen=True):
    """Base of all payloads; unknown fields are ignored here and kept in the raw payload."""


class PlayerRegistered(Payload, frozen=True):
    country: Annotated[str, msgspec.Meta(pattern="^[A-Z]{2}$")] | None = None
    device: Label | None = None


class SessionStarted(Payload, frozen=True):
    session_id: Id
    device: Label | None = None


class SessionEnded(Payload, frozen=True):
    session_id: Id
    duration_sec: Annotated[int, msgspec.Meta(ge=0, le=10 * 365 * 86400)]


class BetPlaced(Payload, frozen=True):
    bet_id: Id
    stake_minor: Minor
    currency: Currency
    game_id: Id
    provider_id: Id
    in_bonus: bool | None = None


class BetSettled(Payload, frozen=True):
    bet_id: Id
    stake_minor: Minor
    win_minor: Minor
    currency: Currency
    game_id: Id
    provider_id: Id
    in_bonus: bool | None = None
    jackpot_contribution_minor: Minor | None = None
    commission_minor: Minor | None = None


class WalletMove(Payload, frozen=True):
    amount_minor: Minor
    currency: Currency
    reason: WalletReason
    reference_id: Id | None = None


class Payment(Payload, frozen=True):
    payment_id: Id
    amount_minor: Minor
    currency: Currency
    method: Label


class Bonus(Payload, frozen=True):
    bonus_id: Id
    amount_minor: Minor
    currency: Currency


class ResponsibleGambling(Payload, frozen=True):
    limit_type: Label | None = None
    session_id: Id | None = None

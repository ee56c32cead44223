"""Valid events for fault scenarios, and the timestamps they carry (CONTRACT §2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

BRAND = "brand-rel"


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def bet(event_id: str, occurred_at: datetime, brand: str = BRAND,
        stake_minor: int = 500) -> dict[str, Any]:
    """A valid ``bet.settled``: counted by the ``bets`` metric of its brand."""
    return {
        "event_id": event_id,
        "event_type": "bet.settled",
        "occurred_at": rfc3339(occurred_at),
        "tenant_id": brand,
        "region": "EU",
        "player_id": f"p-{event_id[-3:]}",
        "schema_version": "1.3.0",
        "payload": {"bet_id": f"b-{event_id}", "stake_minor": stake_minor, "win_minor": 0,
                    "currency": "EUR", "game_id": "g_01", "provider_id": "studio_x"},
    }


def body(events: list[dict[str, Any]]) -> bytes:
    return msgspec.json.encode(events)


def recent_hour() -> datetime:
    """The start of an hour well in the past (no future-skew refusal) and recent."""
    return (datetime.now(UTC) - timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)

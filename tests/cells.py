"""One player's full day of activity, so that every metric of the catalog has a value in the
player's (brand, region) cell: sessions, bets placed and settled, a deposit, a payment, a
bonus. Used by the authorisation matrix and the privacy tests."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta
from typing import Any

_serial = itertools.count()


def _at(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def player_day(brand: str, region: str, player: str, start: datetime, *, bets: int = 1,
               tag: str | None = None) -> list[dict[str, Any]]:
    """Events of one player from ``start`` (naive UTC). ``tag`` makes every id (event,
    session, bet, payment, bonus) contain it, e.g. a canary string."""
    tag = tag or f"x{next(_serial)}"
    n = itertools.count()

    def event(event_type: str, t: datetime, payload: dict[str, Any]) -> dict[str, Any]:
        return {"event_id": f"ev-{tag}-{next(n)}", "event_type": event_type,
                "occurred_at": _at(t), "ingested_at": _at(t + timedelta(seconds=2)),
                "tenant_id": brand, "region": region, "player_id": player,
                "trace_id": f"tr-{tag}", "schema_version": "1.0.0", "payload": payload}

    money = {"currency": "EUR"}
    game = {"game_id": "g_01", "provider_id": "studio_x"}
    out = [
        event("player.registered", start, {"country": "DE", "device": "ios"}),
        event("session.started", start, {"session_id": f"ses-{tag}", "device": "ios"}),
        event("session.ended", start + timedelta(minutes=5),
              {"session_id": f"ses-{tag}", "duration_sec": 300}),
        event("wallet.credit", start + timedelta(seconds=5),
              {"amount_minor": 5000, "reason": "deposit", **money}),
        event("payment.intent", start + timedelta(seconds=1),
              {"payment_id": f"pay-{tag}", "amount_minor": 5000, "method": "card", **money}),
        event("payment.captured", start + timedelta(seconds=4),
              {"payment_id": f"pay-{tag}", "amount_minor": 5000, "method": "card", **money}),
        event("bonus.consumed", start + timedelta(seconds=50),
              {"bonus_id": f"bon-{tag}", "amount_minor": 100, **money}),
    ]
    for k in range(bets):
        placed = start + timedelta(seconds=10 + 10 * k)
        bet = {"bet_id": f"bet-{tag}-{k}", "stake_minor": 1000, **money, **game}
        out.append(event("bet.placed", placed, bet))
        out.append(event("bet.settled", placed + timedelta(seconds=3),
                         {**bet, "win_minor": 400, "jackpot_contribution_minor": 5,
                          "commission_minor": 7}))
    return out

"""Ingestion requests whose events are recorded as *sent* before they leave (the set check's
left side); the request's ``tag`` lists the keys its ``202`` acknowledges."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reliability.events import BRAND, bet, body, recent_hour
from reliability.load import Request
from reliability.setcheck import EventSet

PATH = "/v1/events:batch"


def batch_request(headers: dict[str, str], events: list[dict[str, Any]], sent: EventSet,
                  key: str | None = None) -> Request:
    keys = [(e["tenant_id"], e["event_id"]) for e in events]
    sent.record_sent(keys)
    extra = {"X-Idempotency-Key": key} if key else {}
    return Request("POST", PATH, body(events), {**headers, **extra,
                                                "Content-Type": "application/json"}, keys)


@dataclass
class BatchSource:
    """Request ``i`` of an open load: ``size`` fresh events ``<prefix>-i-j`` occurring at
    ``occurred(i, j)`` (default: spread over a recent past hour)."""

    prefix: str
    size: int
    headers: dict[str, str]
    sent: EventSet
    occurred: Callable[[int, int], datetime] | None = None
    brand: str = BRAND

    def __post_init__(self) -> None:
        self._hour = recent_hour()

    def events(self, i: int) -> list[dict[str, Any]]:
        when = self.occurred or (lambda i, j: self._hour + timedelta(
            seconds=(i * self.size + j) % 3600))
        return [bet(f"{self.prefix}-{i}-{j}", when(i, j), self.brand) for j in range(self.size)]

    def __call__(self, i: int) -> Request:
        return batch_request(self.headers, self.events(i), self.sent)

"""Delivering alert events: each one POSTed until its webhook acknowledges it.

An event is written to the outbox (``alert_events``) in the transaction that records its
transition (``alerts/store.py``); this thread sends it, one attempt at a time, signed per
Standard Webhooks with the creator's secrets (``webhooks/delivery.py``: the destination
guarded at every connection), the event's id as ``webhook-id`` on every attempt — also after
a restart, so a receiver that saw an attempt whose answer was lost recognises the retry.
Each attempt is recorded before the next is tried; a failed one is tried again after
:data:`FIRST_DELAY` seconds, doubling up to :data:`MAX_DELAY`, at most :data:`ATTEMPTS`
times (about 47 minutes), then the event is ``failed``. Events of one alert go out in
order: a later one waits while an earlier one is retried. A revoked creator's events are
cancelled, never sent. The final outcome of each event is in the audit log.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tally.alerts import store
from tally.alerts.store import Alert, Event
from tally.audit import record
from tally.webhooks import secrets
from tally.webhooks.delivery import deliver
from tally.workers import Worker

log = logging.getLogger(__name__)
ATTEMPTS = 12  # attempts of one event before it is failed
FIRST_DELAY, MAX_DELAY = 2.0, 900.0  # seconds before the second attempt; the longest wait
IDLE = 30.0  # seconds between looks at the outbox when nothing is due (a wake comes first)


class Outbox(Worker):
    def __init__(self, meta: sqlite3.Connection, allow_loopback: bool,
                 refused: Callable[[Alert], str | None],
                 audit: Callable[[dict[str, Any]], object]) -> None:
        """``refused(alert)``: why its creator may no longer be served (None: it may)."""
        self.meta, self.allow_loopback = meta, allow_loopback
        self.refused, self.audit = refused, audit
        self._rng = random.Random()  # noqa: S311 - jitter, not a secret
        super().__init__("tally-alert-webhooks", "alerts: the outbox", IDLE)

    def step(self) -> float:
        """Send what is due; sleep until the next attempt is (at most :data:`IDLE`). A stop
        comes after the attempt in flight, its outcome recorded."""
        self.send_due()
        soonest = store.next_due(self.meta)
        return IDLE if soonest is None else min(IDLE, max(0.0, soonest - time.time()))

    def send_due(self) -> None:
        """One attempt of each event due now."""
        for event in store.due(self.meta, time.time()):
            if self.stopping:
                return
            alert = store.get(self.meta, event.alert_id)
            if alert is None:  # deleted meanwhile (its events with it)
                continue
            why = self.refused(alert)
            if why is not None:
                event.status, event.last_error = store.CANCELLED, why
                store.attempted(self.meta, event)
                continue
            self._attempt(alert, event)

    def _attempt(self, alert: Alert, event: Event) -> None:
        body = json.dumps(event.body).encode()
        outcome = deliver(alert.webhook_url, body, secrets.signing(self.meta, alert.client_id),
                          allow_loopback=self.allow_loopback, attempts=1, message_id=event.id)
        attempt = outcome.attempts[-1]
        event.attempts += 1
        event.last_status, event.last_error = attempt.status, attempt.error
        if outcome.delivered:
            event.status, event.delivered_at = store.DELIVERED, attempt.at
        elif event.attempts >= ATTEMPTS:
            event.status = store.FAILED
        else:
            delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (event.attempts - 1))
            event.next_attempt_at = time.time() + delay * self._rng.uniform(0.75, 1.25)
        store.attempted(self.meta, event)
        if event.status != store.PENDING:
            self._audited(alert, event)

    def _audited(self, alert: Alert, event: Event) -> None:
        try:  # every webhook is in the audit log (CONTRACT §8, §11)
            self.audit(record.delivery(event.id, alert.client_id,
                                       str(alert.principal["token_id"]),
                                       urlsplit(alert.webhook_url).hostname or "",
                                       event.attempts, event.last_status, source="alert",
                                       subject="event"))
        except Exception:  # the log cannot take it: the outcome stays on the event
            log.exception("alerts: a webhook delivery could not be audited",
                          extra={"event": event.id})

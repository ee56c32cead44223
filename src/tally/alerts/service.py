"""Evaluating alerts as data is applied: not every rule on a timer, only those whose data
changed.

The applier calls :meth:`AlertService.wake` after each group it applies. The evaluator then
asks, for each rule, the data version of what its query reads (``ingest/versions.py``: the
latest change to its brands on its days, as answers derive their ETag) and evaluates only the
rules whose version moved since their last evaluation (kept with the rule: a restart does not
evaluate again what it already judged), at most once per ``every_seconds`` each (a rule whose
data moved sooner is evaluated when its interval has passed). A new rule is evaluated at once.

An evaluation reads each subject (``alerts/conditions.py``), compares with the subjects
firing before and records the transitions and the new state in one transaction
(``alerts/store.py``); the outbox delivers them (``alerts/outbox.py``). A rule whose creator
is revoked is not evaluated (its ``error`` says why). A query that fails as the route would
(a missing FX rate, too many keys) records its reason on the rule, and changes no state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from tally.alerts import conditions, store
from tally.alerts.outbox import Outbox
from tally.alerts.store import Alert, Transition
from tally.errors import TallyError, UserError
from tally.ingest.versions import DataVersions
from tally.insights.series import Context
from tally.security.tokens import Principal
from tally.workers import Worker

log = logging.getLogger(__name__)
IDLE = 60.0  # seconds between looks when nothing wakes the evaluator
Reads = tuple[tuple[str, ...] | None, tuple[datetime, datetime] | None]


class AlertService(Worker):
    def __init__(self, meta: sqlite3.Connection, context_for: Callable[[Principal], Context],
                 versions: DataVersions, refused: Callable[[Alert], str | None],
                 audit: Callable[[dict[str, Any]], object], allow_loopback: bool) -> None:
        """``context_for``: what a principal's query is planned with (``Runtime``'s);
        ``refused(alert)``: why its creator may no longer be served (None: it may)."""
        self.meta, self.context_for, self.versions = meta, context_for, versions
        self.refused = refused
        self.outbox = Outbox(meta, allow_loopback, refused, audit)
        self._reads: dict[str, Reads] = {}  # what each rule's query reads, planned once
        super().__init__("tally-alerts", "alerts: the evaluator", IDLE)

    def start(self) -> None:
        self.outbox.start()
        super().start()

    def wake(self) -> None:
        """Data was applied, or a rule made: look for rules to evaluate."""
        super().wake()

    def stop(self) -> None:
        super().stop()
        self.outbox.stop()

    def step(self) -> float:
        return self.sweep()

    def sweep(self) -> float:
        """Evaluate the rules due now; the seconds until the next one will be (at most
        :data:`IDLE`)."""
        wait = IDLE
        now = datetime.now(UTC)
        for alert in store.every_alert(self.meta):
            if self.stopping:
                break
            why = self.refused(alert)
            if why is not None:
                if alert.error != why:
                    store.record(self.meta, alert, alert.data_version, [], 0, why)
                continue
            try:
                version = self.versions.version(*self._reads_of(alert))
            except TallyError as exc:  # its query no longer plans (a region not served now)
                self._failed(alert, None, exc)
                continue
            if version == alert.data_version:
                continue
            if alert.evaluated_at is not None:
                since = (now - _parse(alert.evaluated_at)).total_seconds()
                if since < alert.every_seconds:
                    wait = min(wait, alert.every_seconds - since)
                    continue
            try:
                self.evaluate(alert, version)
            except Exception:  # a bug: the other rules are still evaluated
                log.exception("alerts: an evaluation failed", extra={"alert": alert.id})
        return max(wait, 0.0)

    def _reads_of(self, alert: Alert) -> Reads:
        reads = self._reads.get(alert.id)
        if reads is None:
            plan = conditions.plan(alert.query, self.context_for(alert.who()))
            reads = self._reads[alert.id] = (plan.brands, plan.reads)
        return reads

    def evaluate(self, alert: Alert, version: int | None) -> None:
        """Read every subject, record the transitions (and wake the outbox)."""
        ctx = self.context_for(alert.who())
        try:
            whole = conditions.plan(alert.query, ctx)
            readings = conditions.read(alert.query, alert.condition, ctx, whole)
        except TallyError as exc:
            self._failed(alert, version, exc)
            return
        mark = ctx.watermark(whole.brands)
        watermark = None if mark is None else mark.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        now = {reading.key: reading for reading in readings}
        before = store.firing(self.meta, alert.id)
        changes = [Transition(key, True, _told(alert, reading, watermark))
                   for key, reading in now.items() if reading.breaching and key not in before]
        for key in sorted(before):
            reading = now.get(key) or conditions.absent(alert.query, alert.condition,
                                                        json.loads(key))
            if not reading.breaching:
                changes.append(Transition(key, False, _told(alert, reading, watermark)))
        breaching = sum(reading.breaching for reading in readings)
        if store.record(self.meta, alert, version, changes, breaching, None):
            self.outbox.wake()

    def _failed(self, alert: Alert, version: int | None, exc: TallyError) -> None:
        """A query the route would refuse now: its reason on the rule, the state as it was
        (a store failing is tried again at the next change)."""
        if not isinstance(exc, UserError):
            log.warning("alerts: an evaluation failed", extra={"alert": alert.id,
                                                               "error": str(exc)})
            version = alert.data_version
        reason = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        store.record(self.meta, alert, version, [], alert.breaching, reason)

    def forget(self, alert_id: str) -> None:
        """A rule was deleted."""
        self._reads.pop(alert_id, None)


def _told(alert: Alert, reading: conditions.Reading, watermark: str | None) -> dict[str, Any]:
    """What a transition's webhook says (``data``; the store adds the event's id)."""
    return {"alert": {"id": alert.id, "name": alert.name,
                      "query": alert.query["params"] | {"kind": alert.query["kind"]},
                      "condition": alert.condition},
            "subject": reading.subject, "values": reading.values, "watermark": watermark}


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)

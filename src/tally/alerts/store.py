"""Alert rules, their state and their outbox, kept in the metadata database
(``metadata.SCHEMA``: ``alerts``, ``alert_subjects``, ``alert_events``).

An evaluation's outcome is recorded in one SQLite transaction (:func:`record`): the subjects
firing now, and an event for each transition (a subject that starts or stops breaching). So a
stop at any moment leaves the state and the events to deliver together: a restart neither
sends a transition again nor loses one. Events wait in the outbox until their webhook
acknowledges them (``alerts/outbox.py``), one after another per alert, in order.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tally.security.tokens import Principal, principal_of_record, principal_record

_lock = threading.Lock()  # one connection, several threads (routes, evaluator, outbox)
KEEP_EVENTS = 1000  # events kept per alert (the newest; pending ones always)
PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"


def stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Alert:
    id: str
    client_id: str
    principal: dict[str, Any]
    name: str
    query: dict[str, Any]  # {"kind", "params"} (api/queries.py)
    condition: dict[str, Any]  # as the body gave it, checked (alerts/conditions.py)
    webhook_url: str
    every_seconds: int
    created_at: str
    evaluated_at: str | None = None
    data_version: int | None = None
    breaching: int = 0
    error: str | None = None

    def who(self) -> Principal:
        return principal_of_record(self.principal)

    @property
    def created_epoch(self) -> float:
        return datetime.strptime(self.created_at, "%Y-%m-%dT%H:%M:%S.%fZ") \
            .replace(tzinfo=UTC).timestamp()


@dataclass
class Event:
    id: str  # also the webhook-id of every attempt
    alert_id: str
    client_id: str
    type: str  # alert.firing | alert.resolved
    at: str
    body: dict[str, Any]
    status: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    delivered_at: str | None


@dataclass(frozen=True)
class Transition:
    """A subject starting (``firing``) or stopping (``resolved``) to breach, with the body of
    the webhook that tells it."""

    subject: str  # canonical JSON of the subject's keys
    firing: bool
    body: dict[str, Any]


_ALERT = ("id, client_id, principal, name, query, condition, webhook_url, every_seconds, "
          "created_at, evaluated_at, data_version, breaching, error")
_EVENT = ("id, alert_id, client_id, type, at, body, status, attempts, next_attempt_at, "
          "last_status, last_error, delivered_at")


def _alert(row: tuple[Any, ...]) -> Alert:
    (id_, client_id, principal, name, query, condition, url, every, created, evaluated,
     version, breaching, error) = row
    return Alert(id_, client_id, json.loads(principal), name, json.loads(query),
                 json.loads(condition), url, every, created, evaluated, version, breaching,
                 error)


def _event(row: tuple[Any, ...]) -> Event:
    (id_, alert_id, client_id, type_, at, body, status, attempts, next_at, last_status,
     last_error, delivered_at) = row
    return Event(id_, alert_id, client_id, type_, at, json.loads(body), status, attempts,
                 next_at, last_status, last_error, delivered_at)


def count(con: sqlite3.Connection, client_id: str) -> int:
    with _lock:
        return int(con.execute("SELECT count(*) FROM alerts WHERE client_id = ?",
                               (client_id,)).fetchone()[0])


def create(con: sqlite3.Connection, principal: Principal, name: str, query: dict[str, Any],
           condition: dict[str, Any], webhook_url: str, every_seconds: int,
           at_most: int) -> Alert | None:
    """A new rule of ``principal``'s client, or None when it has ``at_most`` already (the
    count and the insert in one transaction: two requests cannot both pass the bound)."""
    alert = Alert(f"alr_{secrets.token_hex(12)}", principal.client_id,
                  principal_record(principal), name, query, condition, webhook_url,
                  every_seconds, stamp())
    with _lock:
        con.execute("BEGIN IMMEDIATE")
        try:
            held = con.execute("SELECT count(*) FROM alerts WHERE client_id = ?",
                               (alert.client_id,)).fetchone()[0]
            if held >= at_most:
                con.execute("ROLLBACK")
                return None
            con.execute(f"INSERT INTO alerts ({_ALERT}) VALUES "  # noqa: S608 - our columns
                        "(?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, 0, NULL)",
                        (alert.id, alert.client_id, json.dumps(alert.principal), name,
                         json.dumps(query), json.dumps(condition), webhook_url, every_seconds,
                         alert.created_at))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return alert


def get(con: sqlite3.Connection, alert_id: str) -> Alert | None:
    with _lock:
        row = con.execute(f"SELECT {_ALERT} FROM alerts WHERE id = ?",  # noqa: S608
                          (alert_id,)).fetchone()
    return None if row is None else _alert(row)


def every_alert(con: sqlite3.Connection) -> list[Alert]:
    with _lock:
        rows = con.execute(f"SELECT {_ALERT} FROM alerts ORDER BY rowid").fetchall()  # noqa: S608
    return [_alert(row) for row in rows]


def listing(con: sqlite3.Connection, client_id: str, after: int,
            limit: int) -> list[tuple[int, Alert]]:
    """The client's rules after position ``after`` (SQLite's rowid), oldest first."""
    with _lock:
        rows = con.execute(f"SELECT rowid, {_ALERT} FROM alerts "  # noqa: S608
                           "WHERE client_id = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                           (client_id, after, limit)).fetchall()
    return [(int(row[0]), _alert(row[1:])) for row in rows]


def delete(con: sqlite3.Connection, alert_id: str) -> None:
    """The rule, its state and its events go (those not delivered yet are never sent)."""
    with _lock:
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("DELETE FROM alerts WHERE id = ?", (alert_id,))
            con.execute("DELETE FROM alert_subjects WHERE alert_id = ?", (alert_id,))
            con.execute("DELETE FROM alert_events WHERE alert_id = ?", (alert_id,))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise


def firing(con: sqlite3.Connection, alert_id: str) -> set[str]:
    """The subjects of the alert firing now."""
    with _lock:
        return {str(row[0]) for row in con.execute(
            "SELECT subject FROM alert_subjects WHERE alert_id = ?", (alert_id,))}


def record(con: sqlite3.Connection, alert: Alert, version: int | None,
           transitions: list[Transition], breaching: int, error: str | None) -> int:
    """An evaluation's outcome, in one transaction: the state, the events of its
    transitions, the rule's last evaluation. Returns the events added (0 if the rule was
    deleted meanwhile: nothing is recorded)."""
    now = stamp()
    with _lock:
        con.execute("BEGIN IMMEDIATE")
        try:
            found = con.execute("UPDATE alerts SET evaluated_at = ?, data_version = ?, "
                                "breaching = ?, error = ? WHERE id = ?",
                                (now, version, breaching, error, alert.id)).rowcount
            if not found:
                con.execute("ROLLBACK")
                return 0
            for change in transitions:
                if change.firing:
                    con.execute("INSERT OR IGNORE INTO alert_subjects (alert_id, subject, "
                                "since) VALUES (?, ?, ?)", (alert.id, change.subject, now))
                else:
                    con.execute("DELETE FROM alert_subjects WHERE alert_id = ? AND "
                                "subject = ?", (alert.id, change.subject))
                event_id = f"evt_{secrets.token_hex(12)}"
                kind = "alert.firing" if change.firing else "alert.resolved"
                body = {"type": kind, "timestamp": now, "data": {"event_id": event_id,
                                                                 **change.body}}
                con.execute(f"INSERT INTO alert_events ({_EVENT}) VALUES "  # noqa: S608
                            "(?, ?, ?, ?, ?, ?, ?, 0, ?, NULL, NULL, NULL)",
                            (event_id, alert.id, alert.client_id, kind, now, json.dumps(body),
                             PENDING, time.time()))
            _prune(con, alert.id)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return len(transitions)


def _prune(con: sqlite3.Connection, alert_id: str) -> None:
    """Finished events past the newest :data:`KEEP_EVENTS` of the alert are forgotten."""
    con.execute("DELETE FROM alert_events WHERE alert_id = ? AND status != ? AND rowid <= "
                "(SELECT rowid FROM alert_events WHERE alert_id = ? ORDER BY rowid DESC "
                "LIMIT 1 OFFSET ?)", (alert_id, PENDING, alert_id, KEEP_EVENTS))


def events(con: sqlite3.Connection, alert_id: str, after: int,
           limit: int) -> list[tuple[int, Event]]:
    """The alert's events after position ``after``, oldest first."""
    with _lock:
        rows = con.execute(f"SELECT rowid, {_EVENT} FROM alert_events "  # noqa: S608
                           "WHERE alert_id = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                           (alert_id, after, limit)).fetchall()
    return [(int(row[0]), _event(row[1:])) for row in rows]


def due(con: sqlite3.Connection, now: float, limit: int = 20) -> list[Event]:
    """Events to attempt now: the oldest pending event of each alert, if its next attempt
    is due (a later event of the same alert waits for it: they arrive in order)."""
    with _lock:
        rows = con.execute(
            f"SELECT {_EVENT} FROM alert_events AS e WHERE status = ? AND "  # noqa: S608
            "next_attempt_at <= ? AND rowid = (SELECT min(rowid) FROM alert_events "
            "WHERE alert_id = e.alert_id AND status = ?) ORDER BY rowid LIMIT ?",
            (PENDING, now, PENDING, limit)).fetchall()
    return [_event(row) for row in rows]


def next_due(con: sqlite3.Connection) -> float | None:
    """When the earliest pending event may be attempted (None: none is pending)."""
    with _lock:
        row = con.execute("SELECT min(next_attempt_at) FROM alert_events WHERE status = ?",
                          (PENDING,)).fetchone()
    return None if row[0] is None else float(row[0])


def attempted(con: sqlite3.Connection, event: Event) -> None:
    """Record an attempt's outcome (``event`` as updated by the outbox)."""
    with _lock:
        con.execute("UPDATE alert_events SET status = ?, attempts = ?, next_attempt_at = ?, "
                    "last_status = ?, last_error = ?, delivered_at = ? WHERE id = ?",
                    (event.status, event.attempts, event.next_attempt_at, event.last_status,
                     event.last_error, event.delivered_at, event.id))

"""What an audit entry says about a request — and, as carefully, what it never says.

Recorded: the kind of call, method, route *template*, the caller (client id and token id, never
a secret or a token), the parameters and filters after an allow-list, rows returned, status,
outcome and trace id. Never recorded: request bodies, headers, secrets, tokens, and any value
that could name a player. A parameter is kept only if its name is known and its value passes
a check for that name (a metric must be a catalog metric, a date must look like a date...);
filter values only for the CONTRACT §4 filter keys. Anything else leaves only its *name* in
``withheld`` (if it is a name Tally knows: else "(other)"), so an attempt to filter by ``player_id``
is visible without the id.

Routes add what only they know through ``request.state``: ``audit_rows`` (rows returned),
``audit_params`` (body parameters, same allow-list), ``audit_filters`` (``{key: [values]}``)
and ``audit_client_id`` (the client a token request claims to be).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from tally.events.currencies import ISO_4217
from tally.semantic.catalog import DIMENSIONS, METRICS

FILTER_KEYS = frozenset(("brand_id", "region", "provider_id", "game_id", "method", "currency",
                         "device", "geo"))
CLIENT_ID = re.compile(r"cl_[0-9a-f]{16}")  # the form `tally client create` issues
_INSTANT = re.compile(r"[0-9T:.+\-Z]{1,40}")
_NUMBER = re.compile(r"[0-9]{1,12}")
_WORD = re.compile(r"[A-Za-z0-9_.:/+\- ]{1,64}")
# names worth seeing when their values are withheld; any other name is recorded as "(other)",
# since a caller could type anything, a person's name included, where a key belongs
KNOWN_NAMES = frozenset(("player_id", "event_id", "session_id", "bet_id", "payment_id",
                         "bonus_id", "reference_id", "tenant_id", "trace_id", "country", "email",
                         "ip", "user_id", "account_id", "event_type", "steps", "days"))
MAX_VALUE = 128
MAX_VALUES = 50
INVALID = "(invalid)"


def _matches(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda value: pattern.fullmatch(value) is not None


def _dims(value: str) -> bool:
    return all(k.strip() in DIMENSIONS for k in value.split(",") if k.strip())


PARAM_CHECKS: dict[str, Callable[[str], bool]] = {
    "metric": lambda v: v in METRICS,
    "dim": lambda v: v in DIMENSIONS,
    "group_by": _dims,
    "granularity": lambda v: v in ("1m", "5m", "1h", "1d"),
    "order": lambda v: v in ("value", "-value"),
    "currency": lambda v: v in ISO_4217,
    **{name: _matches(_INSTANT) for name in ("from", "to", "start_date", "end_date")},
    **{name: _matches(_NUMBER) for name in ("limit", "after", "window_sec")},
    "embed": _matches(re.compile(r"emb_[0-9a-f]{24}")),
    "alert": _matches(re.compile(r"alr_[0-9a-f]{24}")),
    "chart": lambda v: v in ("line", "bar", "table", "funnel"),
    **{name: _matches(_WORD) for name in ("cohort", "horizon", "timezone", "return_event",
                                          "correlate_by", "scope")},
}
OPAQUE = frozenset(("cursor",))  # recorded as present, never as a value


def kind_of(path: str) -> str | None:
    """The kind of an audited call, or None for paths that are not audited (ingestion,
    health, schemas, the catalog)."""
    if path == "/oauth/token":
        return "token"
    if path.startswith("/v1/analytics/"):
        return "query"
    if path.startswith("/v1/admin/"):
        return "admin"
    if path.startswith("/v1/exports"):
        return "export"
    if path == "/v1/webhook-secret":  # reading or rotating a signing secret
        return "webhook"
    if path.startswith("/v1/alerts"):
        return "alert"  # made, listed, its events read, deleted
    if path == "/v1/embeds" or (path.startswith("/embed/")
                                and not path.startswith("/embed/assets/")):
        return "embed"  # made, its page viewed, its data read
    return None


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status == 429:
        return "limited"
    return "rejected" if status < 500 else "error"


class _Sanitised:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.filters: dict[str, list[str]] = {}
        self.withheld: set[str] = set()

    def withhold(self, name: str, prefix: str = "") -> None:
        known = name in KNOWN_NAMES or name in DIMENSIONS or name in PARAM_CHECKS
        self.withheld.add(prefix + (name if known else "(other)"))

    def param(self, name: str, value: Any) -> None:
        if name == "filters":
            if isinstance(value, str):
                self.filter_text(value)
            elif isinstance(value, Mapping):
                self.filter_map(value)
            return
        if name in OPAQUE:
            self.params[name] = True
            return
        check = PARAM_CHECKS.get(name)
        if check is None:
            self.withhold(name)
        elif isinstance(value, str):
            self.params[name] = value if check(value) else INVALID
        elif isinstance(value, int) and not isinstance(value, bool):
            self.params[name] = value
        else:
            self.params[name] = INVALID

    def filter_text(self, text: str) -> None:
        for part in text.split(","):
            key, _, value = part.partition(":")
            if part.strip():
                self.filter_value(key.strip(), value.strip())

    def filter_map(self, filters: Mapping[Any, Any]) -> None:
        for key, values in filters.items():
            for value in values if isinstance(values, list) else [values]:
                self.filter_value(str(key), value if isinstance(value, str) else INVALID)

    def filter_value(self, key: str, value: str) -> None:
        if key not in FILTER_KEYS:
            self.withhold(key, "filters.")
            return
        values = self.filters.setdefault(key, [])
        if len(values) < MAX_VALUES and value[:MAX_VALUE] not in values:
            values.append(value[:MAX_VALUE])


def sanitise(query: Iterable[tuple[str, str]], extra: Mapping[str, Any] | None = None,
             filters: Mapping[str, Any] | None = None
             ) -> tuple[dict[str, Any], dict[str, list[str]], list[str]]:
    """``(params, filters, withheld)`` from query pairs and what a route added."""
    clean = _Sanitised()
    for name, value in [*query, *(extra or {}).items()]:
        clean.param(name, value)
    if filters:
        clean.filter_map(filters)
    return clean.params, clean.filters, sorted(clean.withheld)


def actor_of(state: Mapping[str, Any]) -> dict[str, Any] | None:
    principal = state.get("principal")
    if principal is not None:
        return {"client_id": principal.client_id, "token_id": principal.token_id}
    claimed = state.get("audit_client_id")
    if isinstance(claimed, str):
        # a token request: the client it claims to be, only if it has a client id's form
        # (a secret typed into the client id field must not land in the log)
        return {"client_id": claimed if CLIENT_ID.fullmatch(claimed) else INVALID}
    return None


def build(scope: Mapping[str, Any], kind: str, status: int) -> dict[str, Any]:
    """The record of a finished request (``entry.seal`` adds seq, time, prev and hash)."""
    state: Mapping[str, Any] = scope.get("state") or {}
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    extra, filters = state.get("audit_params"), state.get("audit_filters")
    params, kept, withheld = sanitise(
        query, extra if isinstance(extra, Mapping) else None,
        filters if isinstance(filters, Mapping) else None)
    rows = state.get("audit_rows")
    return {
        "kind": kind,
        "method": scope.get("method"),
        "route": getattr(scope.get("route"), "path", None) or "unmatched",
        "actor": actor_of(state),
        "params": params,
        "filters": kept,
        "withheld": withheld,
        "rows": rows if isinstance(rows, int) and not isinstance(rows, bool) else None,
        "status": status,
        "outcome": outcome_of(status),
        "trace_id": state.get("trace_id"),
    }


def delivery(job_id: str, client_id: str, token_id: str, url_host: str, attempts: int,
             status: int | None, *, source: str = "export",
             subject: str = "job") -> dict[str, Any]:
    """The record of a webhook delivery (done off any request): ``status`` the receiver's last
    answer (0: none came); ``source`` what sent it (``export``, ``alert``) and ``subject`` the
    name of the id it is about (an export's ``job``, an alert's ``event``)."""
    code = status or 0
    return {"kind": "webhook", "method": "POST", "route": f"webhook:{source}",
            "actor": {"client_id": client_id, "token_id": token_id},
            "params": {subject: job_id, "host": url_host, "attempts": str(attempts)},
            "filters": {}, "withheld": [], "rows": None, "status": code,
            "outcome": "ok" if 200 <= code < 300 else "error", "trace_id": None}


class _Counted(msgspec.Struct):
    series: list[msgspec.Raw] | None = None
    items: list[msgspec.Raw] | None = None
    rows: list[msgspec.Raw] | None = None
    cohorts: list[msgspec.Raw] | None = None
    steps: list[msgspec.Raw] | None = None


def count_rows(content: bytes) -> int | None:
    """Rows in a JSON answer (its ``series``, ``items``, ``rows``, ``cohorts`` or ``steps``),
    without decoding the values."""
    try:
        counted = msgspec.json.decode(content, type=_Counted)
    except msgspec.DecodeError:
        return None
    for found in (counted.series, counted.items, counted.rows, counted.cohorts, counted.steps):
        if found is not None:
            return len(found)
    return None

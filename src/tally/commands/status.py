"""``tally status``: a running server's ``GET /status`` (``--url``), or a stopped store read in
place (``--data-dir``), as ``name: value`` lines or one JSON document (``--json``).

Exit codes (:mod:`tally.commands.common`): 0 when the report was made and the server is ready
(``ok`` or ``degraded``) or the store was read; 1 when the server reports itself
``unavailable`` (the report is printed all the same, as ``tally audit verify`` prints a bad
verdict); 2 with one line on stderr when no report could be made (no server at the URL, a
refused token, no store in the directory, a store a running Tally holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tally.commands.common import REFUSED, fail, print_fields, print_json, settings_for
from tally.errors import StoreUnavailable

TIMEOUT_SECONDS = 10.0


def status_url(url: str) -> str:
    base = url.rstrip("/")
    return base if base.endswith("/status") else f"{base}/status"


def from_server(url: str, token: str | None) -> dict[str, Any]:
    """The document of ``GET URL/status``; :func:`fail` (one line) when there is none."""
    import httpx2 as httpx

    target = status_url(url)
    if not target.startswith(("http://", "https://")):
        fail(f"--url {url!r} is not an http:// or https:// URL")
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        answer = httpx.get(target, headers=headers, timeout=TIMEOUT_SECONDS)
    except httpx.HTTPError as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        fail(f"cannot reach {target}: {why}")
    if answer.status_code == 401:
        fail(f"{target} answered 401: it needs the scrape token (TALLY_METRICS_TOKEN, or "
             "--token)")
    if answer.status_code != 200:
        detail = ""
        if answer.headers.get("content-type", "").startswith("application/problem+json"):
            detail = f": {answer.json().get('detail', '')}"
        fail(f"{target} answered {answer.status_code}{detail}".splitlines()[0][:300])
    try:
        document = answer.json()
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("source") != "server":
        fail(f"{target} did not answer a Tally status document (is it a Tally server?)")
    return document


def from_data_dir(data_dir: Path | None) -> dict[str, Any]:
    from tally.observability.offline import store_status

    try:
        return store_status(settings_for(data_dir))
    except (StoreUnavailable, OSError) as exc:
        fail(str(exc).splitlines()[0])


def _seconds(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f} s"


def _health_lines(document: Mapping[str, Any]) -> list[tuple[str, str]]:
    health = document["health"]
    store, journal = health["store"], health["journal"]
    if document["source"] == "data-dir":
        return [("store", store["kind"] + ("" if store["inspected"] else
                                           f" (not opened: {store['note']})")),
                ("journal", f"{journal['records']} records in {journal['segments']} segments "
                            f"({journal['bytes']:,} bytes"
                            + (f", a torn tail of {journal['torn_tail_bytes']} bytes"
                               if journal["torn_tail_bytes"] else "") + ")")]
    lines = [("ready", "yes" if health["ready"] else "no: " + "; ".join(document["reasons"])),
             ("store", f"{store['kind']}: "
                       + ("answers" if store["reachable"] else "does not answer") + ", "
                       + ("writable" if store["writable"] else
                          f"not writable ({store['failure']})")),
             ("journal", "writable" if journal["writable"] else
              f"not writable ({journal['failure']})")]
    kafka, redis = health.get("kafka"), health.get("redis")
    lines.append(("kafka", "not configured" if kafka is None else
                  f"{kafka['topic']} (group {kafka['group']}): "
                  + ("consuming" if kafka["running"] else f"stopped ({kafka['failure']})")
                  + f", lag {kafka['lag_messages']:,} messages"))
    lines.append(("redis", "not configured" if redis is None else
                  "answers" if redis["reachable"] else f"does not answer ({redis['failure']})"))
    return lines


def _backlog_line(document: Mapping[str, Any]) -> str:
    backlog = document["backlog"]
    if document["source"] == "data-dir":
        if backlog["pending_rows"] is None:
            return (f"unknown ({backlog['journal_rows']:,} rows in the journal, applied or "
                    "not)")
        return (f"{backlog['pending_rows']:,} rows in {backlog['pending_records']} journal "
                f"records waiting (applied up to seq {backlog['applied_seq']})")
    return (f"{backlog['pending_rows']:,} rows waiting, the oldest "
            f"{backlog['lag_seconds']:.1f} s (bound {backlog['max_rows']:,} rows / "
            f"{backlog['max_seconds']:.0f} s); {backlog['applied_rows']:,} applied, "
            f"{backlog['set_aside_rows']:,} set aside since start")


def _objective_line(o: Mapping[str, Any]) -> str:
    if o["total"] == 0:
        return f"no data ({o['objective']})"
    verdict = "met" if o["met"] else "MISSED"
    return (f"{verdict}: {o['bad']:,} bad of {o['total']:,} ({o['bad_ratio'] * 100:.3g} %, "
            f"budget {o['budget'] * 100:g} %, burn rate {o['burn_rate']:.2f}; "
            f"{o['objective']})")


def print_report(document: Mapping[str, Any]) -> None:
    where = document.get("data_dir") or "server"
    fields = [("status", f"{document['status']} ({where})"),
              ("version", str(document["version"]))]
    fields += _health_lines(document)
    freshness = document["freshness"]
    for rollup in freshness["rollups"]:
        fields.append((f"freshness {rollup['rollup']}", _seconds(rollup["lag_seconds"])
                       + (" (over the objective)"
                          if (rollup["lag_seconds"] or 0) > freshness["objective_seconds"]
                          else "")))
    if document["source"] == "data-dir":
        if freshness.get("underived_bulk_load"):
            bulk = freshness["underived_bulk_load"]
            fields.append(("underived", f"{bulk['rows']:,} events of a bulk load are not in "
                                        "the rollups yet (derived at the next start)"))
        fields.append(("latest event", f"occurred {freshness['latest_occurred_at'] or '-'}, "
                                       f"received {freshness['latest_received_at'] or '-'}"))
    fields.append(("backlog", _backlog_line(document)))
    slo = document.get("slo")
    if slo is None:
        fields.append(("objectives", "a stopped store has none (a server's /status does)"))
    else:
        minutes = slo["window"]["covered_seconds"] / 60
        fields.append(("objectives", f"over the last {minutes:.1f} minutes of this replica"))
        fields += [(f"  {o['slo']}", _objective_line(o)) for o in slo["objectives"]]
    print_fields(fields)


def run(url: str | None, data_dir: Path | None, token: str | None, json_output: bool) -> int:
    """The exit code (0, or 1 for a server that reports itself unavailable)."""
    if url is not None and data_dir is not None:
        fail("--url reads a running server, --data-dir a stopped store: give one of them")
    document = from_server(url, token) if url is not None else from_data_dir(data_dir)
    if json_output:
        print_json(document)
    else:
        print_report(document)
    return REFUSED if document["status"] == "unavailable" else 0

"""The ``/metrics`` exposition of a real ``tally serve`` after traffic of every kind: it passes
``promtool check metrics`` (Prometheus's own linter), and every metric a shipped rule or
dashboard panel reads is in it (docs/operations.md)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_event
from tests.promql import ROOT, dashboard_queries, metric_names, recorded, rules
from tests.promtool import promtool
from tests.server import Server, new_client, token
from tests.test_webhooks import Receiver

pytestmark = pytest.mark.slow
DAY = "2025-10-23"


def traffic(url: str, headers: dict[str, str], receiver: Receiver) -> None:
    """Requests of every kind the shipped rules and panels count."""
    dup = make_event()
    batch = [dup, dup, make_event(event_type="nope"),
             *(make_event(occurred_at=f"{DAY}T{h:02d}:10:00Z") for h in range(24))]
    r = httpx.post(f"{url}/v1/events:batch", json=batch, headers=headers)
    assert r.status_code == 202, r.text
    span = {"from": DAY, "to": "2025-10-24"}
    for _ in range(2):  # the second from the answer cache
        r = httpx.get(f"{url}/v1/analytics/timeseries", headers=headers,
                      params={"metric": "bets", "granularity": "1h", **span})
        assert r.status_code == 200, r.text
    r = httpx.get(f"{url}/v1/analytics/slice", headers=headers,
                  params={"metric": "ggr", "dim": "game_id", **span})
    assert r.status_code == 200, r.text
    r = httpx.post(f"{url}/v1/analytics/retention", headers=headers, json={
        "cohort": "first_deposit", "start_date": "2025-10-01", "end_date": "2025-10-31",
        "return_event": "bet.placed", "days": [1, 7], "timezone": "UTC", "mode": "on"})
    assert r.status_code == 200, r.text
    assert httpx.get(f"{url}/v1/nowhere", headers=headers).status_code == 404
    assert httpx.get(f"{url}/openapi.json").status_code == 200
    r = httpx.post(f"{url}/v1/exports", headers=headers, json={
        "query": {"kind": "timeseries", "metric": "bets", "granularity": "1d", **span},
        "format": "csv", "webhook_url": receiver.url})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while not receiver.received and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.received, "the export's webhook never came"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("exposition") / "data"
    creds = new_client(data, scopes="events:write analytics:read exports:write admin")
    receiver = Receiver()
    server = Server(data, env={"TALLY_WEBHOOK_ALLOW_LOOPBACK": "1",
                               "TALLY_RATE_TOKEN": "1/h burst 1"})
    try:
        headers = token(server.url, *creds)
        refused = httpx.post(f"{server.url}/oauth/token", auth=creds,
                             data={"grant_type": "client_credentials"})
        assert refused.status_code == 429  # a second token within the hour
        traffic(server.url, headers, receiver)
        yield {"url": server.url, "headers": headers}
    finally:
        server.stop()
        receiver.close()


def scrape(url: str) -> str:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    return r.text


def test_the_exposition_passes_promtool_check_metrics(served):
    text = scrape(served["url"])
    linted = promtool("check", "metrics", stdin=text)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout.strip() == "" and linted.stderr.strip() == ""
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"tally_http_responses_total", "tally_build_info",
            "process_cpu_seconds_total"} <= names
    assert not [n for n in names if n.endswith("_created")]


def test_promtool_check_metrics_does_find_lint():
    """The linter the test above relies on does report a problem when there is one."""
    bad = "# HELP requests_count Requests.\n# TYPE requests_count counter\nrequests_count 1\n"
    linted = promtool("check", "metrics", stdin=bad)
    assert linted.returncode != 0 and "counter metrics should have \"_total\" suffix" in (
        linted.stdout + linted.stderr)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value)
            for f in text_string_to_metric_families(text) for s in f.samples]


def test_every_metric_a_rule_or_panel_reads_is_exposed(served):
    """Every name the shipped rules and dashboard select is a series of a real server (or a
    series the rules record), after traffic of every kind."""
    exposed = samples(scrape(served["url"]))
    names = {name for name, _, _ in exposed}
    read = {f"rule {n} {r.get('record') or r['alert']} {r.get('labels', {}).get('slo', '')}":
            metric_names(r["expr"]) for n, r in enumerate(rules())}
    read |= {f"panel {where}": metric_names(expr) for where, expr in dashboard_queries().items()}
    assert len(read) == len(rules()) + len(dashboard_queries()) > 40
    # only the budgets, constants, read no metric
    assert {where.split()[2] for where, names in read.items() if not names} == {
        "tally:slo_error_budget:ratio"}
    made_here = recorded()
    missing = {where: sorted(wanted - names - made_here) for where, wanted in read.items()
               if wanted - names - made_here}
    assert not missing
    used = set().union(*read.values())
    for name in ("tally_rate_limit_refusals_total", "tally_export_jobs_total",
                 "tally_webhook_deliveries_total", "tally_applier_pending_rows",
                 "tally_answer_cache_lookups_total", "tally_rows_scanned_total"):
        assert name in used  # the dashboard's concerns (issue 15), each read by a panel
    moved = {(name, tuple(sorted(labels.items()))) for name, labels, value in exposed
             if value > 0}
    for wanted in (("tally_rate_limit_refusals_total", (("limit", "token"),)),
                   ("tally_export_jobs_total", (("outcome", "succeeded"),)),
                   ("tally_webhook_deliveries_total",
                    (("kind", "export"), ("outcome", "delivered"))),
                   ("tally_answer_cache_lookups_total", (("result", "hit"),)),
                   ("tally_rows_scanned_total", ()),
                   ("tally_ingest_events_total", (("outcome", "rejected"),))):
        assert wanted in moved, wanted


def test_the_buckets_the_latency_rules_read_are_exposed(served):
    """``le="0.8"`` of ``/v1/analytics/timeseries`` and the like: the exact series a rule
    reads exists, with the label values the server writes."""
    exposed = samples(scrape(served["url"]))
    for rule in rules():
        for route, le in re.findall(r'_bucket\{route="([^"]+)", le="([^"]+)"\}',
                                    rule.get("expr", "")):
            assert [v for name, labels, v in exposed
                    if name == "tally_http_request_duration_seconds_bucket"
                    and labels.get("route") == route and labels.get("le") == le], (route, le)


def test_every_exposed_metric_is_in_docs_operations(served):
    documented = (ROOT / "docs" / "operations.md").read_text()
    families = list(text_string_to_metric_families(scrape(served["url"])))
    assert len(families) > 20
    for family in families:  # the parser names a counter without its _total
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}`" in documented, name

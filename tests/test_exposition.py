"""The ``/metrics`` exposition of a real ``tally serve`` after traffic of every kind: it passes
``promtool check metrics`` (Prometheus's own linter), and every metric a shipped rule or
dashboard panel reads is in it (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_event
from tests.promtool import promtool
from tests.server import Server, new_client, token

pytestmark = pytest.mark.slow
DAY = "2025-10-23"


def traffic(url: str, headers: dict[str, str]) -> None:
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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("exposition") / "data"
    creds = new_client(data, scopes="events:write analytics:read exports:write admin")
    server = Server(data)
    try:
        headers = token(server.url, *creds)
        traffic(server.url, headers)
        yield {"url": server.url, "headers": headers}
    finally:
        server.stop()


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

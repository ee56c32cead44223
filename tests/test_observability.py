"""GET /metrics (CONTRACT §7): Prometheus text with latency by route, responses by status,
ingestion outcomes, cache lookups, index size and freshness per rollup."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_event


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_what_happened(client, headers):
    dup, bad = make_event(), make_event(event_type="nope")
    r = client.post("/v1/events:batch", content=json.dumps([dup, dup, bad, make_event()]),
                    headers=headers)
    assert r.status_code == 202
    client.get("/v1/nowhere", headers=headers)
    q = {"metric": "bets", "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24"}
    for _ in range(2):
        assert client.get("/v1/analytics/timeseries", params=q, headers=headers).status_code \
            == 200
    m = scrape(client)
    assert m[("tally_ingest_events_total", (("outcome", "accepted"),))] == 2
    assert m[("tally_ingest_events_total", (("outcome", "duplicate"),))] == 1
    assert m[("tally_ingest_events_total", (("outcome", "rejected"),))] == 1
    assert m[("tally_http_responses_total",
              (("route", "/v1/events:batch"), ("status", "202")))] == 1
    assert m[("tally_http_responses_total", (("route", "unmatched"), ("status", "404")))] == 1
    assert m[("tally_http_request_duration_seconds_count",
              (("method", "GET"), ("route", "/v1/analytics/timeseries")))] == 2
    assert m[("tally_answer_cache_lookups", (("result", "hit"),))] == 1
    assert m[("tally_dedup_index_keys", ())] == 2
    for grain in ("1m", "1h", "1d"):
        assert m[("tally_rollup_freshness_lag_seconds", (("rollup", grain),))] >= 0

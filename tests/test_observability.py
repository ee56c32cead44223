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
    r = client.post("/v1/events:batch", json=[dup, dup, bad, make_event()],
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


def test_one_json_log_line_per_request_with_its_trace_id(client, headers, caplog):
    import logging

    from tally.observability.logs import JsonFormatter

    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with caplog.at_level(logging.INFO, logger="tally.access"):
        client.get("/v1/analytics/timeseries", headers={
            **headers, "traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
            params={"metric": "bets", "granularity": "1d", "from": "2025-10-23",
                    "to": "2025-10-24", "filters": "brand_id:p_secret_player"})
    records = [r for r in caplog.records if r.name == "tally.access"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["trace_id"] == trace and line["status"] == 200
    assert line["route"] == "/v1/analytics/timeseries" and line["msg"] == "request"
    assert "p_secret_player" not in json.dumps(line)  # no query string, so no ids

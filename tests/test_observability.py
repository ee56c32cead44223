"""GET /metrics (CONTRACT §7): Prometheus text with latency by route, responses by status,
ingestion outcomes, cache lookups, index size and freshness per rollup."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tests.conftest import bearer, make_event
from tests.test_exports import finished
from tests.test_webhooks import Receiver


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
              (("method", "POST"), ("route", "/v1/events:batch"), ("status", "202")))] == 1
    assert m[("tally_http_responses_total",
              (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert m[("tally_http_request_duration_seconds_count",
              (("method", "GET"), ("route", "/v1/analytics/timeseries")))] == 2
    assert m[("tally_answer_cache_lookups_total", (("result", "hit"),))] == 1
    assert m[("tally_answer_cache_lookups_total", (("result", "miss"),))] == 1
    assert m[("tally_dedup_index_keys", ())] == 2
    for grain in ("1m", "1h", "1d"):
        assert m[("tally_rollup_freshness_lag_seconds", (("rollup", grain),))] >= 0


def families(client) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}


def test_counts_are_counters_with_no_created_series(client, headers):
    client.get("/v1/analytics/timeseries", headers=headers, params={
        "metric": "bets", "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24"})
    found = families(client)
    # the parser names a counter family without its _total; a gauge keeps its whole name
    for name in ("tally_answer_cache_lookups", "tally_http_responses", "tally_ingest_events",
                 "tally_rows_scanned", "tally_applier_applied_rows",
                 "tally_applier_set_aside_rows", "process_cpu_seconds"):
        assert found[name].type == "counter", name
    assert found["tally_http_request_duration_seconds"].type == "histogram"
    assert found["tally_applier_pending_rows"].type == "gauge"
    samples = [s.name for f in found.values() for s in f.samples]
    assert "tally_http_responses_total" in samples
    assert not [n for n in samples if n.endswith("_created")]
    # the latency objectives of CONTRACT §7 are bucket bounds, as the rules name them
    bounds = {s.labels["le"] for s in found["tally_http_request_duration_seconds"].samples
              if s.name.endswith("_bucket")}
    assert {"0.8", "2.0", "5.0"} <= bounds


def test_build_info_and_the_process_are_exposed(client):
    from tally import __version__

    found = families(client)
    [build] = found["tally_build_info"].samples  # an info metric: a gauge of 1
    assert build.value == 1
    assert build.labels["version"] == __version__
    assert found["process_resident_memory_bytes"].samples[0].value > 0
    assert found["process_start_time_seconds"].samples[0].value > 0
    assert found["python_info"].samples[0].labels["implementation"]


def test_every_answered_request_has_its_route_and_method(client):
    for path in ("/openapi.json", "/docs", "/redoc", "/healthz"):
        assert client.get(path).status_code == 200
    m = scrape(client)
    for path in ("/openapi.json", "/docs", "/redoc", "/healthz"):
        assert m[("tally_http_responses_total",
                  (("method", "GET"), ("route", path), ("status", "200")))] == 1, path
    assert not [key for key in m if key[0] == "tally_http_responses_total"
                and ("route", "unmatched") in key[1]]


def test_ingestion_outcomes_are_zero_before_the_first_batch(client):
    m = scrape(client)
    for outcome in ("accepted", "duplicate", "rejected"):
        assert m[("tally_ingest_events_total", (("outcome", outcome),))] == 0


def test_rate_limit_refusals_are_counted_by_limit(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", rate_client="1/h burst 2",
                        rate_token="1/h burst 3")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)  # one token request of 3
        before = scrape(client)
        assert {before[("tally_rate_limit_refusals_total", (("limit", limit),))]
                for limit in ("client", "brand", "region", "token", "token_source",
                              "rows_per_day")} == {0}
        statuses = [client.get("/v1/metrics", headers=headers).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, "more", "analytics:read")
        con.close()
        statuses = [client.post("/oauth/token", auth=(client_id, secret), data={
            "grant_type": "client_credentials"}).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        after = scrape(client)
    assert after[("tally_rate_limit_refusals_total", (("limit", "client"),))] == 2
    assert after[("tally_rate_limit_refusals_total", (("limit", "token"),))] == 1
    assert after[("tally_rate_limit_refusals_total", (("limit", "brand"),))] == 0


def test_export_jobs_and_their_webhooks_are_counted_by_outcome(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", webhook_allow_loopback=True,
                        export_max_rows=3)
    receiver = Receiver()
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            headers = bearer(client, settings.data_dir)
            events = [make_event(occurred_at=f"2025-10-23T{h:02d}:00:00Z") for h in range(6)]
            assert client.post("/v1/events:batch", json=events,
                               headers=headers).status_code == 202
            m = scrape(client)
            for outcome in ("succeeded", "failed"):
                assert m[("tally_export_jobs_total", (("outcome", outcome),))] == 0
            small = {"kind": "timeseries", "metric": "bets", "granularity": "1d",
                     "from": "2025-10-23", "to": "2025-10-24"}
            large = small | {"granularity": "1h"}  # 24 rows: over TALLY_EXPORT_MAX_ROWS
            for query, webhook in ((small, receiver.url), (large, None), (large, None)):
                body = {"query": query, "format": "csv"} | (
                    {"webhook_url": webhook} if webhook else {})
                r = client.post("/v1/exports", json=body, headers=headers)
                assert r.status_code == 202, r.text
                finished(client, headers, r.json()["id"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and scrape(client)[(
                    "tally_webhook_deliveries_total",
                    (("kind", "export"), ("outcome", "delivered")))] == 0:
                time.sleep(0.05)
            m = scrape(client)
    finally:
        receiver.close()
    assert m[("tally_export_jobs_total", (("outcome", "succeeded"),))] == 1
    assert m[("tally_export_jobs_total", (("outcome", "failed"),))] == 2
    assert m[("tally_webhook_deliveries_total",
              (("kind", "export"), ("outcome", "delivered")))] == 1
    assert m[("tally_webhook_deliveries_total",
              (("kind", "export"), ("outcome", "failed")))] == 0
    assert len(receiver.received) == 1


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

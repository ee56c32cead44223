"""The status page (``GET /status``) and ``tally status`` (issue 15 item 4).

In process: the page names no other origin and runs under a strict CSP; its numbers are those
of ``/metrics`` (requests of every objective, a real 5xx of ingestion back-pressure, the
backlog and freshness gauges); it shows no tenant data; with ``TALLY_METRICS_TOKEN`` only the
token opens it (bearer, or Basic for a browser), a tenant's OAuth token does not. The sliding
hour is checked with a clock of its own. Then the real ``tally`` executable: ``--url`` against
a real ``tally serve`` (with a token), ``--data-dir`` on a store a server holds (one line), on
the stopped store, and on one with acknowledged rows left in the journal (read, not changed);
a dead URL is one line.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tally.api.app import create_app
from tally.config import Settings
from tally.events.envelope import ValidationContext
from tally.ingest.journal import Journal
from tally.observability.slo import OBJECTIVES, SloWindow
from tally.storage.base import WriteSet
from tests.conftest import bearer, make_event
from tests.server import Server, free_port, new_client, token
from tests.test_cli import assert_one_line_error, tally_run

SECRET_BRAND, SECRET_PLAYER = "brand-hush-7731", "p_hush_5521"
SCRAPE_TOKEN = "status-scrape-token-0123456789"
JSON_ACCEPT = {"Accept": "application/json"}
TS = {"metric": "bets", "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24"}
SLICE = {"metric": "stake", "dim": "brand_id", "from": "2025-10-23", "to": "2025-10-24"}
RETENTION = {"cohort": "registration", "start_date": "2025-10-01", "end_date": "2025-10-23",
             "return_event": "bet.settled", "days": [1]}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def expected_from_metrics(text: str) -> dict[str, tuple[int, int]]:
    """(bad, total) of every request objective, as the rules compute them from /metrics."""
    found = samples(text)
    out = {}
    for objective in OBJECTIVES:
        if objective.route is None:
            continue
        bound = repr(float(objective.bound_seconds or 0))
        total = sum(v for n, labels, v in found if n == "tally_http_request_duration_seconds_count"
                    and labels["route"] == objective.route)
        good = sum(v for n, labels, v in found if n == "tally_http_request_duration_seconds_bucket"
                   and labels["route"] == objective.route and labels["le"] == bound)
        out[objective.slo] = (int(total - good), int(total))
    answers = [(labels, v) for n, labels, v in found if n == "tally_http_responses_total"
               and labels["route"] not in ("/metrics", "/healthz", "/readyz")]
    out["errors"] = (int(sum(v for labels, v in answers if labels["status"].startswith("5"))),
                     int(sum(v for _, v in answers)))
    return out


def gauge(text: str, name: str) -> float:
    return next(v for n, _, v in samples(text) if n == name)


def objectives(document: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {o["slo"]: (o["bad"], o["total"]) for o in document["slo"]["objectives"]}


# ------------------------------------------------------------------ the page


def test_the_page_loads_nothing_from_elsewhere_under_a_strict_policy(client: TestClient):
    r = client.get("/status", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in
                  r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["style-src"] == "'self'"
    assert "script-src" not in policy  # no script at all: default-src 'none' covers it
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store"
    html = r.text
    assert "<script" not in html and " style=" not in html and "<style" not in html
    assert not re.search(r"(https?:)?//[a-z0-9]", html, re.IGNORECASE)  # no other origin
    links = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert links and all(link.startswith("/status/assets/") or link == "data:," for link in links)
    for link in links:
        if link.startswith("/"):
            asset = client.get(link)
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(
                "text/css")
            assert "url(" not in asset.text and "@import" not in asset.text
    for part in ("Health", "Freshness per rollup", "Applier backlog", "Objectives",
                 "timeseries-latency", "freshness", "1m", "1h", "1d"):
        assert part in html, part


def test_json_by_accept_and_a_tie_or_no_accept_is_the_page(client: TestClient):
    assert client.get("/status", headers=JSON_ACCEPT).headers["content-type"] \
        .startswith("application/json")
    assert client.get("/status", headers={"Accept": "*/*"}).headers["content-type"] \
        .startswith("text/html")
    r = client.get("/status", headers={"Accept": "image/png"})
    assert r.status_code == 406
    assert client.get("/status", params={"format": "json"}).status_code == 400  # strict input


def test_the_numbers_are_those_of_metrics(settings: Settings):
    # a small backlog bound, so that holding the store's writer makes ingestion push back
    # with a real 503 (a 5xx of the errors objective, as the rules count it)
    settings = settings.model_copy(update={"max_backlog_rows": 1000})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        assert client.post("/v1/events:batch", json=[make_event() for _ in range(5)],
                           headers=headers).status_code == 202
        for _ in range(3):
            assert client.get("/v1/analytics/timeseries", params=TS,
                              headers=headers).status_code == 200
        assert client.get("/v1/analytics/timeseries", params={**TS, "metric": "nope"},
                          headers=headers).status_code == 400  # counted: latency of a 400
        assert client.get("/v1/analytics/slice", params=SLICE, headers=headers).status_code \
            == 200
        assert client.post("/v1/analytics/retention", json=RETENTION,
                           headers=headers).status_code == 200
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.backend._write_lock:  # the applier waits: acknowledged rows pile up
            first = client.post("/v1/events:batch", json=[make_event() for _ in range(1001)],
                                headers=headers)
            refused = client.post("/v1/events:batch", json=[make_event()], headers=headers)
        assert first.status_code == 202 and refused.status_code == 503
        assert runtime.ingest.flush(30)
        client.get("/healthz"), client.get("/readyz")  # not counted by the errors objective
        metrics = client.get("/metrics").text  # not counted either: /status sees the same
        document = client.get("/status", headers=JSON_ACCEPT).json()
    expected = expected_from_metrics(metrics)
    assert expected["errors"][0] == 1 and expected["timeseries-latency"][1] == 4
    assert expected["slice-latency"][1] == 1 and expected["retention-latency"][1] == 1
    assert {k: v for k, v in objectives(document).items() if k != "freshness"} == expected
    assert document["slo"]["missed"] == ["errors"] and document["status"] == "degraded"
    errors = next(o for o in document["slo"]["objectives"] if o["slo"] == "errors")
    assert errors["met"] is False and errors["bad_ratio"] == 1 / errors["total"]
    assert errors["burn_rate"] == pytest.approx(errors["bad_ratio"] / 0.001)
    fresh = next(o for o in document["slo"]["objectives"] if o["slo"] == "freshness")
    assert fresh["total"] >= 1 and fresh["bad"] == 0  # sampled at start, every 10 s after
    backlog = document["backlog"]
    assert backlog["applied_rows"] == gauge(metrics, "tally_applier_applied_rows_total") \
        == 5 + 1001
    assert backlog["pending_rows"] == gauge(metrics, "tally_applier_pending_rows") == 0
    assert backlog["set_aside_rows"] == gauge(metrics, "tally_applier_set_aside_rows_total")
    lags = {labels["rollup"]: v for n, labels, v in samples(metrics)
            if n == "tally_rollup_freshness_lag_seconds"}
    assert {r["rollup"]: r["lag_seconds"] for r in document["freshness"]["rollups"]} == lags
    assert document["health"]["store"] == {"kind": "duckdb", "reachable": True,
                                           "writable": True, "failure": None}
    assert document["health"]["kafka"] is None and document["health"]["redis"] is None
    assert document["slo"]["window"]["seconds"] == 3600


def test_no_tenant_data_on_the_page_or_in_the_document(client: TestClient, headers):
    event = make_event(tenant_id=SECRET_BRAND, player_id=SECRET_PLAYER)
    assert client.post("/v1/events:batch", json=[event], headers=headers).status_code == 202
    client.get("/v1/analytics/slice", params=SLICE, headers=headers)
    for accept in ("text/html", "application/json"):
        text = client.get("/status", headers={"Accept": accept}).text
        for secret in (SECRET_BRAND, SECRET_PLAYER, event["event_id"], "brand-7", "p_19f3",
                       "studio_x", "client_id"):
            assert secret not in text, (accept, secret)


def test_with_a_scrape_token_only_the_token_opens_it(settings: Settings):
    settings = settings.model_copy(update={"metrics_token": SecretStr(SCRAPE_TOKEN)})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        tenant = bearer(client, settings.data_dir)  # an OAuth token with every scope
        basic = base64.b64encode(f"oncall:{SCRAPE_TOKEN}".encode()).decode()
        for sent in ({}, tenant, {"Authorization": "Bearer wrong-token-0123456789"},
                     {"Authorization": "Basic " + base64.b64encode(b"x:wrong").decode()},
                     {"Authorization": "Basic !!!"}):
            for accept in ("text/html", "application/json"):
                r = client.get("/status", headers={**sent, "Accept": accept})
                assert r.status_code == 401, (sent, accept)
                assert r.headers["content-type"].startswith("application/problem+json")
                challenge = r.headers["www-authenticate"]
                assert "Basic" in challenge and "Bearer" in challenge
                assert "version" not in r.json() and "slo" not in r.json()
        for sent in ({"Authorization": f"Bearer {SCRAPE_TOKEN}"},
                     {"Authorization": f"Basic {basic}"}):
            assert client.get("/status", headers=sent).status_code == 200
            assert client.get("/status", headers={**sent, **JSON_ACCEPT}).json()["status"]
        assert client.get("/metrics", headers={"Authorization": f"Basic {basic}"}) \
            .status_code == 401  # /metrics keeps to bearer tokens (scrapers)
        assert client.get("/status/assets/status.css").status_code == 200  # a style sheet
        assert client.get("/healthz").status_code == 200  # the probes stay open


def test_the_window_slides_by_the_minute():
    now = [10_000.0 * 60]
    window = SloWindow(clock=lambda: now[0])
    window.observe("/v1/analytics/timeseries", 200, 0.9)  # slow: bad
    window.observe("/v1/analytics/timeseries", 200, 0.8)  # at the bound: good (le="0.8")
    window.observe("/v1/analytics/slice", 500, 0.1)
    window.observe("/metrics", 500, 0.1)  # not an objective's request
    window.sample_freshness(301.0)
    covered, report = window.report()
    by = {c.slo: (c.bad, c.total) for c in report}
    assert by == {"timeseries-latency": (1, 2), "slice-latency": (0, 1),
                  "retention-latency": (0, 0), "errors": (1, 3), "freshness": (1, 1)}
    assert covered == 0
    now[0] += 59 * 60 + 30  # 59.5 minutes later: still in the window
    window.observe("/v1/analytics/slice", 200, 0.1)
    covered, report = window.report()
    assert {c.slo: c.total for c in report}["errors"] == 4 and covered == 59 * 60 + 30
    now[0] += 31  # the first minute left the window
    covered, report = window.report()
    assert {c.slo: (c.bad, c.total) for c in report}["errors"] == (0, 1)
    assert covered == 59 * 60 + 1  # from the start of the minute 59 minutes before now's
    assert next(c for c in report if c.slo == "retention-latency").met is None


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("status") / "data"
    new_client(data)
    server = Server(data, env={"TALLY_METRICS_TOKEN": SCRAPE_TOKEN})
    yield server
    server.stop()


def status_cli(*args: str, token_env: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"TALLY_METRICS_TOKEN": token_env} if token_env else {}
    return tally_run("status", *args, env=env)


def test_status_url_reads_a_live_server_and_matches_its_metrics(served: Server):
    creds = new_client(served.data_dir)
    headers = token(served.url, *creds)
    events = [make_event(tenant_id=SECRET_BRAND) for _ in range(3)]
    assert httpx.post(f"{served.url}/v1/events:batch", json=events, headers=headers,
                      timeout=10).status_code == 202
    for _ in range(2):
        assert httpx.get(f"{served.url}/v1/analytics/timeseries", params=TS, headers=headers,
                         timeout=30).status_code == 200
    metrics = httpx.get(f"{served.url}/metrics", timeout=10,
                        headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}).text
    out = status_cli("--url", served.url, "--json", token_env=SCRAPE_TOKEN)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and out.stderr == ""
    document = json.loads(out.stdout)
    assert document["source"] == "server" and document["status"] == "ok"
    assert document["version"] == tally_run("--version").stdout.split()[-1]
    assert {k: v for k, v in objectives(document).items() if k != "freshness"} \
        == expected_from_metrics(metrics)
    assert document["backlog"]["applied_rows"] == gauge(metrics,
                                                        "tally_applier_applied_rows_total")
    assert SECRET_BRAND not in out.stdout
    text = status_cli("--url", served.url + "/", "--token", SCRAPE_TOKEN)
    assert text.returncode == 0, text.stderr
    lines = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert lines["status"].strip() == "ok (server)" and "freshness 1m" in lines
    assert lines["store"].strip() == "duckdb: answers, writable"
    assert "timeseries-latency" in text.stdout


def test_status_url_without_the_token_is_one_line(served: Server):
    out = status_cli("--url", served.url)
    assert_one_line_error(out, 2, "401", "TALLY_METRICS_TOKEN")


def test_a_dead_url_is_one_line():
    out = status_cli("--url", f"http://127.0.0.1:{free_port()}")
    assert_one_line_error(out, 2, "cannot reach", "/status")
    assert_one_line_error(status_cli("--url", "ftp://example"), 2, "http://")
    assert_one_line_error(status_cli("--url", "http://x", "--data-dir", "/tmp"), 2, "one of them")


def test_not_a_tally_at_the_url_is_one_line(served: Server):
    # a server that answers, but not a status document (its /healthz)
    out = status_cli("--url", f"{served.url}/healthz/status", token_env=SCRAPE_TOKEN)
    assert_one_line_error(out, 2, "404")


def test_a_data_dir_a_server_holds_is_one_line(served: Server):
    out = status_cli("--data-dir", str(served.data_dir))
    assert_one_line_error(out, 2, "held by a running Tally", "--url")


def test_a_stopped_store_and_the_journal_it_left(tmp_path: Path):
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data)
    try:
        headers = token(server.url, *creds)
        assert httpx.post(f"{server.url}/v1/events:batch", headers=headers, timeout=10,
                          json=[make_event() for _ in range(4)]).status_code == 202
    finally:
        server.stop()
    out = status_cli("--data-dir", str(data), "--json")
    assert out.returncode == 0, out.stderr
    stopped = json.loads(out.stdout)
    assert stopped["source"] == "data-dir" and stopped["status"] == "stopped"
    assert stopped["backlog"]["pending_rows"] == 0 and stopped["backlog"]["applied_seq"] >= 1
    assert stopped["freshness"]["events_stored"] == 4
    assert [r["lag_seconds"] for r in stopped["freshness"]["rollups"]] == [0.0, 0.0, 0.0]
    assert stopped["slo"] is None

    # what a crash right after a 202 leaves: an acknowledged record the store has not applied
    settings = Settings(data_dir=data, regions="EU,UK,LATAM")
    with TestClient(create_app(settings)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        context = ValidationContext(received_at=datetime.now(UTC),
                                    served_regions=frozenset({"EU"}))
        prepared = runtime.ingest.prepare(json.dumps([make_event() for _ in range(3)])
                                          .encode(), context, "crash-test")
    after = json.loads(status_cli("--data-dir", str(data), "--json").stdout)
    applied = after["backlog"]["applied_seq"]
    journal = Journal(data / "journal")
    journal.append(applied + 1, WriteSet(events=[prepared.table]))
    journal.close()
    before = {p: p.read_bytes() for p in (data / "journal").glob("*")}
    before_store = (data / "events.duckdb").stat().st_mtime_ns
    out = status_cli("--data-dir", str(data), "--json")
    assert out.returncode == 0, out.stderr
    waiting = json.loads(out.stdout)
    assert waiting["backlog"]["pending_rows"] == 3
    assert waiting["backlog"]["pending_records"] == 1
    assert waiting["backlog"]["last_journal_seq"] == applied + 1
    assert all(0 <= r["lag_seconds"] < 600 for r in waiting["freshness"]["rollups"])
    assert waiting["freshness"]["oldest_waiting_received_at"] is not None
    assert {p: p.read_bytes() for p in (data / "journal").glob("*")} == before  # read only
    assert (data / "events.duckdb").stat().st_mtime_ns == before_store
    text = status_cli("--data-dir", str(data))
    assert text.returncode == 0, text.stderr
    assert "3 rows in 1 journal records waiting" in text.stdout


def test_a_directory_without_a_store_is_one_line(tmp_path: Path):
    out = status_cli("--data-dir", str(tmp_path / "none"))
    assert_one_line_error(out, 2, "no Tally store")
    assert not (tmp_path / "none").exists()


def test_redis_is_reported_when_configured(settings: Settings, redis_server: str):
    settings = settings.model_copy(update={"redis_url": redis_server})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        document = client.get("/status", headers=JSON_ACCEPT).json()
    assert document["health"]["redis"] == {"reachable": True, "failure": None}
    assert redis_server not in json.dumps(document)  # no URL (it may carry a password)

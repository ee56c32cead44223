"""Export jobs (CONTRACT §8): a confined query into a CSV or Parquet file, fetched by a signed,
expiring link — the file holds the route's rows, read back by pyarrow and DuckDB."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from tally.api.app import create_app
from tally.config import Settings
from tally.exports import jobs, links
from tests.conftest import TokenFactory, bearer
from tests.test_csv_answers import BATCH, CSV, DAY, SLICE, TS, _events, parsed
from tests.test_webhooks import Receiver

EXPORTS = "/v1/exports"
JSON_TYPE = {"Content-Type": "application/json"}
TS_QUERY = {"kind": "timeseries", "metric": "ggr", "granularity": "1h",
            "from": f"{DAY}T00:00:00Z", "to": "2025-10-24T00:00:00Z", "group_by": "brand_id"}
SLICE_QUERY = {"kind": "slice", "metric": "ggr", "dim": "game_id", "from": DAY,
               "to": "2025-10-24"}


@pytest.fixture
def stored(client: TestClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    events = _events()
    r = client.post(BATCH, content=json.dumps(events), headers={**headers, **JSON_TYPE})
    assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text
    return events


def start(client: TestClient, headers: dict[str, str], query: dict[str, Any], fmt: str,
          **extra: Any) -> Any:
    return client.post(EXPORTS, content=json.dumps({"query": query, "format": fmt, **extra}),
                       headers={**headers, **JSON_TYPE})


def finished(client: TestClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = client.get(f"{EXPORTS}/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return dict(job)
        time.sleep(0.05)
    raise AssertionError(f"export {job_id} did not finish: {job}")


def exported(client: TestClient, headers: dict[str, str], query: dict[str, Any],
             fmt: str) -> tuple[dict[str, Any], bytes]:
    r = start(client, headers, query, fmt)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.headers["location"] == f"{EXPORTS}/{r.json()['id']}"
    job = finished(client, headers, r.json()["id"])
    assert job["status"] == "succeeded", job
    file = client.get(job["download_url"])  # no bearer token: the link is the credential
    assert file.status_code == 200, file.text
    return job, file.content


def route_params(query: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in query.items() if k != "kind"}


def test_a_csv_export_is_the_routes_csv(client, headers, stored):
    job, content = exported(client, headers, TS_QUERY, "csv")
    route = client.get(TS, params=route_params(TS_QUERY), headers={**headers, **CSV})
    assert content == route.content  # byte for byte
    assert job["rows"] == len(parsed(route.text)[1]) > 0 and job["bytes"] == len(content)
    assert job["sha256"] == hashlib.sha256(content).hexdigest()
    assert job["watermark"] == route.headers["x-data-watermark"]


def test_a_parquet_export_keeps_types_and_reads_back_in_duckdb(client, headers, stored):
    job, content = exported(client, headers, SLICE_QUERY, "parquet")
    table = pq.read_table(io.BytesIO(content))
    assert str(table.schema.field("value_minor").type) == "int64"
    items = client.get(SLICE, params={**route_params(SLICE_QUERY), "limit": "1000"},
                       headers=headers).json()["items"]
    assert table.to_pylist() == items and job["rows"] == len(items) == 4
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE f AS SELECT * FROM read_parquet(?)",
                    [_spill(content)])
        assert con.execute("SELECT sum(value_minor) FROM f").fetchone()[0] == sum(
            e["payload"]["stake_minor"] - e["payload"]["win_minor"] for e in stored)
    finally:
        con.close()
    series, ts_content = exported(client, headers, TS_QUERY, "parquet")
    ts = pq.read_table(io.BytesIO(ts_content))
    assert str(ts.schema.field("ts").type) == "timestamp[us, tz=UTC]"


def _spill(content: bytes) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as f:
        f.write(content)
    return f.name


def test_a_long_export_pages_through_the_whole_answer(client, headers, stored):
    """11,520 one-minute buckets: two of the route's largest pages, written one by one."""
    query = {"kind": "timeseries", "metric": "bets", "granularity": "1m", "from": DAY,
             "to": "2025-10-31"}
    job, content = exported(client, headers, query, "csv")
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(TS, params={**route_params(query), "limit": "10000",
                                      **({"cursor": cursor} if cursor else {})},
                          headers=headers).json()
        rows += page["series"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    columns, exported_rows = parsed(content.decode())
    assert columns == ["ts", "value"] and job["rows"] == len(rows) == 8 * 1440
    assert exported_rows == [{"ts": r["ts"], "value": str(r["value"])} for r in rows]


def test_an_export_never_sees_more_than_its_creator(client, auth: TokenFactory, stored):
    only_a = auth(scopes="analytics:read exports:write", brands="brand-a")
    refused = start(client, only_a, {**SLICE_QUERY, "filters": "brand_id:brand-b"}, "csv")
    assert refused.status_code == 403, refused.text
    job, content = exported(client, only_a, {**SLICE_QUERY, "dim": "brand_id",
                                             "metric": "bets"}, "csv")
    assert parsed(content.decode())[1] == [
        {"brand_id": "brand-a", "value": str(sum(e["tenant_id"] == "brand-a" for e in stored))}]
    # another client sees neither the job nor it in its list; an admin without limits does
    other = auth(scopes="analytics:read exports:write")
    assert client.get(f"{EXPORTS}/{job['id']}", headers=other).status_code == 404
    assert client.get(EXPORTS, headers=other).json()["items"] == []
    assert [j["id"] for j in client.get(EXPORTS, headers=only_a).json()["items"]] == [job["id"]]
    admin = auth(scopes="admin")
    assert client.get(f"{EXPORTS}/{job['id']}", headers=admin).json()["id"] == job["id"]


def test_an_export_needs_both_scopes_and_a_valid_query(client, auth: TokenFactory, stored):
    reader, writer = auth(scopes="analytics:read"), auth(scopes="exports:write")
    assert start(client, reader, TS_QUERY, "csv").status_code == 403
    r = start(client, writer, TS_QUERY, "csv")
    assert r.status_code == 403 and r.json()["missing_scope"] == "analytics:read"
    both = auth(scopes="analytics:read exports:write")
    for query, fmt, extra, status in [
        ({**TS_QUERY, "metric": "nope"}, "csv", {}, 400),
        ({**TS_QUERY, "granularity": "2h"}, "csv", {}, 400),
        ({**TS_QUERY, "fitlers": "x"}, "csv", {}, 400),
        ({"kind": "funnel"}, "csv", {}, 400),  # a funnel without its steps
        ({"kind": "cohorts"}, "csv", {}, 400),
        ({"metric": "ggr"}, "csv", {}, 400),
        (TS_QUERY, "xlsx", {}, 400),
        (TS_QUERY, "csv", {"webhook_url": "https://10.0.0.7/hook"}, 400),
        (TS_QUERY, "csv", {"webhook_url": "http://example.com/hook"}, 400),
    ]:
        r = start(client, both, query, fmt, **extra)
        assert r.status_code == status, (query, fmt, extra, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    assert client.get(EXPORTS, headers=both).json()["items"] == []  # none was made
    r = client.post(EXPORTS, content=b"format=csv", headers={**both, "Content-Type":
                                                              "text/plain"})
    assert r.status_code == 415


def test_a_link_works_for_its_file_until_it_expires(client, headers, stored, settings):
    job, content = exported(client, headers, TS_QUERY, "csv")
    url = job["download_url"]
    assert client.get(url, headers={"Range": "bytes=0-9"}).content == content[:10]
    assert client.get(url, headers={"Range": "bytes=0-9"}).status_code == 206
    assert "attachment" in client.get(url).headers["content-disposition"]
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert client.get(tampered).status_code == 403
    con = sqlite3.connect(settings.data_dir / "meta.sqlite3", isolation_level=None)
    try:
        past = jobs.now() - timedelta(seconds=1)
        expired = links.link(con, job["id"], past)  # well signed, but past
        assert client.get(expired).status_code == 403
        other, _ = exported(client, headers, SLICE_QUERY, "csv")
        swapped = url.replace(job["id"], other["id"])  # this signature, another file
        assert client.get(swapped).status_code == 403
        from tests.server import cli  # the operator's command, while the server runs
        done = cli("keys", "rotate-link-key", "--json", data_dir=settings.data_dir)
        assert done.returncode == 0 and json.loads(done.stdout) == {"rotated": "export_links"}
        assert client.get(url).status_code == 403  # the key replaced: every old link dies
        fresh = client.get(f"{EXPORTS}/{job['id']}", headers=headers).json()["download_url"]
        assert client.get(fresh).content == content
    finally:
        con.close()
    assert client.get(f"{EXPORTS}/{job['id']}/file").status_code == 400  # no signature


def test_exports_and_downloads_are_in_the_audit_log(client, headers, auth, stored):
    job, _ = exported(client, headers, TS_QUERY, "csv")
    client.post("/v1/webhook-secret", headers=headers)
    entries = client.get("/v1/admin/audit", params={"limit": "1000"},
                         headers=auth(scopes="admin")).json()["items"]
    seen = [(e["kind"], e["method"], e["route"], e["status"]) for e in entries]
    assert ("export", "POST", "/v1/exports", 202) in seen
    assert ("export", "GET", "/v1/exports/{job_id}", 200) in seen
    assert ("export", "GET", "/v1/exports/{job_id}/file", 200) in seen  # the download
    assert ("webhook", "POST", "/v1/webhook-secret", 200) in seen


@pytest.fixture
def tight(tmp_path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM", export_max_rows=10)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, bearer(client, settings.data_dir)


def test_an_export_over_its_limit_fails_with_the_reason(tight):
    client, headers = tight
    client.post(BATCH, content=json.dumps(_events()), headers={**headers, **JSON_TYPE})
    r = start(client, headers, TS_QUERY, "csv")
    job = finished(client, headers, r.json()["id"])
    assert job["status"] == "failed" and "TALLY_EXPORT_MAX_ROWS" in job["error"]
    assert job["download_url"] is None
    data = client.app.state.runtime.settings.data_dir  # type: ignore[attr-defined]
    assert list((data / "exports").iterdir()) == []  # no partial file left


def test_a_job_cut_off_by_a_stop_runs_again_at_the_next_start(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        client.post(BATCH, content=json.dumps(_events()), headers={**headers, **JSON_TYPE})
        job_id = finished(client, headers, start(client, headers, TS_QUERY, "csv")
                          .json()["id"])["id"]
        other = finished(client, headers, start(client, headers, SLICE_QUERY, "csv")
                         .json()["id"])["id"]
    con = sqlite3.connect(settings.data_dir / "meta.sqlite3", isolation_level=None)
    con.execute("UPDATE export_jobs SET status = 'running', attempts = 1 WHERE id = ?",
                (job_id,))  # as if the server had died while running it
    con.execute("UPDATE export_jobs SET status = 'running', attempts = 3 WHERE id = ?",
                (other,))  # cut off three times already
    con.close()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        admin = bearer(client, settings.data_dir, "admin")
        again = finished(client, admin, job_id)
        assert again["status"] == "succeeded" and again["rows"] > 0
        given_up = client.get(f"{EXPORTS}/{other}", headers=admin).json()
        assert given_up["status"] == "failed" and "interrupted" in given_up["error"]


def test_the_outcome_is_delivered_signed_to_the_webhook(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                        webhook_allow_loopback=True)
    receiver = Receiver()
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            headers = bearer(client, settings.data_dir)
            secret = client.get("/v1/webhook-secret", headers=headers).json()["secret"]
            r = start(client, headers, TS_QUERY, "csv", webhook_url=receiver.url)
            job = finished(client, headers, r.json()["id"])
            deadline = time.monotonic() + 10
            while not receiver.received and time.monotonic() < deadline:
                time.sleep(0.05)
            received_headers, body = receiver.received[0]
            message = Webhook(secret).verify(body, received_headers)
            assert message["type"] == "export.succeeded"
            assert message["data"]["id"] == job["id"] and message["data"]["rows"] == job["rows"]
            while time.monotonic() < deadline and not client.get(
                    f"{EXPORTS}/{job['id']}", headers=headers).json()["deliveries"]:
                time.sleep(0.05)
            deliveries = client.get(f"{EXPORTS}/{job['id']}", headers=headers).json()[
                "deliveries"]
            assert [d["status"] for d in deliveries] == [200]
            assert deliveries[0]["message_id"] == received_headers["webhook-id"]
            admin = bearer(client, settings.data_dir, "admin")
            entries = client.get("/v1/admin/audit", params={"limit": "1000"},
                                 headers=admin).json()["items"]
            sent = [e for e in entries if e["route"] == "webhook:export"]
            assert [(e["kind"], e["status"], e["params"]["job"]) for e in sent] == [
                ("webhook", 200, job["id"])]
            verified = client.get("/v1/admin/audit/verify", headers=admin).json()
            assert verified["intact"] is True
    finally:
        receiver.close()


def test_a_stop_does_not_wait_for_a_long_export_which_runs_again_after(tmp_path):
    """Five pages of one-minute buckets: the server stops while the job runs; the job is
    queued again (no partial file left) and completes, whole, after the restart."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    query = {"kind": "timeseries", "metric": "bets", "granularity": "1m", "from": DAY,
             "to": "2025-11-22"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        client.post(BATCH, content=json.dumps(_events()), headers={**headers, **JSON_TYPE})
        job_id = start(client, headers, query, "csv").json()["id"]
        deadline = time.monotonic() + 30
        while client.get(f"{EXPORTS}/{job_id}", headers=headers).json()["status"] == "queued" \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = client.get(f"{EXPORTS}/{job_id}", headers=headers).json()["status"]
    exports_dir = settings.data_dir / "exports"
    assert [p.name for p in exports_dir.iterdir() if p.name.endswith(".part")] == []
    con = sqlite3.connect(settings.data_dir / "meta.sqlite3")
    status = con.execute("SELECT status FROM export_jobs WHERE id = ?", (job_id,)).fetchone()[0]
    con.close()
    assert status in ("queued", "succeeded"), status  # never left running
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = bearer(client, settings.data_dir, "admin")
        job = finished(client, admin, job_id)
        assert job["status"] == "succeeded" and job["rows"] == 30 * 1440
        content = client.get(job["download_url"]).content
        assert len(parsed(content.decode())[1]) == 30 * 1440
    print(f"status seen before the stop: {seen}; after it: {status}")


def test_a_file_is_deleted_once_its_job_expires(client, headers, stored, settings):
    job, _ = exported(client, headers, TS_QUERY, "csv")
    url = job["download_url"]  # signed for an hour: outlives the file here
    exports_dir = settings.data_dir / "exports"
    assert [p.name for p in exports_dir.iterdir()] == [f"{job['id']}.csv"]
    con = sqlite3.connect(settings.data_dir / "meta.sqlite3", isolation_level=None)
    con.execute("UPDATE export_jobs SET expires_at = ? WHERE id = ?",
                (jobs.stamp(jobs.now() - timedelta(seconds=1)), job["id"]))
    con.close()
    deadline = time.monotonic() + 10
    while list(exports_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(exports_dir.iterdir()) == []  # the worker's sweep deleted it
    assert client.get(url).status_code == 404  # a link still good, to a file gone
    again = client.get(f"{EXPORTS}/{job['id']}", headers=headers).json()
    assert again["status"] == "succeeded" and again["download_url"] is None


def test_analyses_export_as_their_answers(client, headers):
    """Funnel, retention and LTV: the answer's rows (steps, cohorts) as the file's, an LTV
    cohort's per-day values one column a day."""
    from datetime import datetime

    from tests.cells import player_day
    from tests.test_csv_answers import as_field

    events = [e for i in range(8) for e in player_day("brand-a", "EU", f"pa-{i}",
                                                       datetime(2025, 10, 23, 1 + i))]
    # a later day of the brand's: the watermark passes the LTV's two days
    events += player_day("brand-a", "EU", "pa-later", datetime(2025, 10, 27, 12))
    r = client.post(BATCH, content=json.dumps(events), headers={**headers, **JSON_TYPE})
    assert r.status_code == 202 and r.json()["rejected"] == 0, r.text
    funnel = {"steps": ["payment.intent", "payment.captured", "bet.placed"],
              "window_sec": 3600, "from": DAY, "to": "2025-10-24"}
    job, content = exported(client, headers, {"kind": "funnel", **funnel}, "csv")
    steps = client.post("/v1/analytics/funnel", json=funnel, headers=headers).json()["steps"]
    columns, rows = parsed(content.decode())
    assert columns == ["name", "count", "rate", "median_sec"] and steps[0]["count"] == 8
    assert rows == [{c: as_field(s.get(c)) for c in columns} for s in steps]
    retention = {"cohort": "registration", "start_date": DAY, "end_date": DAY, "days": [0, 1]}
    job, content = exported(client, headers, {"kind": "retention", **retention}, "parquet")
    answer = client.post("/v1/analytics/retention", json=retention, headers=headers).json()
    table = pq.read_table(io.BytesIO(content))
    assert table.column_names == ["cohort_date", "size", "d0", "d1"]
    assert [{**row, "cohort_date": row["cohort_date"].isoformat()} for row in table.to_pylist()] \
        == [{k: row.get(k) for k in table.column_names} for row in answer["rows"]]
    assert job["rows"] == len(answer["rows"]) == 1 and answer["rows"][0]["size"] == 8
    ltv = {"cohort": "first_deposit", "start_date": DAY, "end_date": DAY, "horizon": "2d"}
    job, content = exported(client, headers, {"kind": "ltv", **ltv}, "csv")
    cohorts = client.get("/v1/analytics/ltv", params=ltv, headers=headers).json()["cohorts"]
    columns, rows = parsed(content.decode())
    assert columns == ["date", "size", "ltv_minor_d0", "ltv_minor_d1"]
    assert [len(c["ltv_minor"]) for c in cohorts] == [2]  # both days have values
    assert rows == [{"date": c["date"], "size": str(c["size"]),
                     **{f"ltv_minor_d{k}": str(v) for k, v in enumerate(c["ltv_minor"])}}
                    for c in cohorts]


def test_an_export_onto_a_full_disk_fails_with_the_reason(tmp_path):
    """The exports' file system fills up mid-file: the job fails saying so, no partial file
    is left, and the server goes on (the next small export to a freed disk succeeds)."""
    from tests.fs import tmpfs

    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with tmpfs(settings.data_dir / "exports", "256k"), \
            TestClient(create_app(settings), raise_server_exceptions=False) as client:
        headers = bearer(client, settings.data_dir)
        client.post(BATCH, content=json.dumps(_events()), headers={**headers, **JSON_TYPE})
        big = {"kind": "timeseries", "metric": "bets", "granularity": "1m", "from": DAY,
               "to": "2025-10-31"}  # ~300 KB of CSV
        job = finished(client, headers, start(client, headers, big, "csv").json()["id"])
        assert job["status"] == "failed" and "No space left" in job["error"], job
        assert list((settings.data_dir / "exports").iterdir()) == []
        small, _ = exported(client, headers, SLICE_QUERY, "csv")
        assert small["rows"] == 4

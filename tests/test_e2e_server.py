"""End to end through the real server process: durability under SIGKILL, operator commands
while serving, and the CLI's contract (CONTRACT §1, §3)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import duckdb
import httpx2 as httpx
import pytest

from tests.conftest import make_event
from tests.server import Server, cli, new_client, token

pytestmark = pytest.mark.slow


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path):
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data)
    headers = token(server.url, *creds)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def producer(worker: int) -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            n = 0
            while not stop.is_set():
                batch = [make_event(event_id=f"w{worker}-{n}-{i}") for i in range(200)]
                n += 1
                try:
                    r = http.post("/v1/events:batch", json=batch)
                except httpx.TransportError:
                    return  # the server died under us: this batch was never acknowledged
                if r.status_code == 202:
                    assert r.json()["accepted"] == 200
                    with lock:
                        acknowledged.extend(e["event_id"] for e in batch)

    workers = [threading.Thread(target=producer, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill with requests in flight, right after 202s
        with lock:
            if len(acknowledged) >= 6_000:
                break
        threading.Event().wait(0.01)
    server.kill()
    stop.set()
    for w in workers:
        w.join()
    with lock:
        acked = list(acknowledged)
    assert len(acked) >= 6_000, (server.log.read_text())[-2000:]

    assert (data / "journal").exists()
    again = Server(data)  # restart: unapplied journal records are replayed, index rebuilt
    try:
        headers = token(again.url, *creds)
        sample = [make_event(event_id=e) for e in acked[:: max(1, len(acked) // 500)]]
        r = httpx.post(f"{again.url}/v1/events:batch", json=sample,
                       headers=headers)
        assert r.json()["duplicates"] == len(sample) and r.json()["accepted"] == 0
    finally:
        again.stop()
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    rows = dict(con.execute("SELECT event_id, count(*) FROM events GROUP BY 1").fetchall())
    con.close()
    missing = [e for e in acked if rows.get(e) != 1]
    assert missing == [], f"{len(missing)} acknowledged events lost or doubled"


def test_operator_commands_work_while_serving(tmp_path: Path):
    data = tmp_path / "data"
    server = Server(data)
    try:
        creds = new_client(data, scopes="events:write")  # written while the server runs
        headers = token(server.url, *creds)
        r = httpx.post(f"{server.url}/v1/events:batch", headers=headers,
                       json=[make_event()])
        assert r.status_code == 202 and r.json()["accepted"] == 1
        demo = cli("demo", "--events", "10", data_dir=data)
        assert demo.returncode != 0 and "in use" in demo.stderr
        assert demo.stderr.count("\n") == 1 and "Traceback" not in demo.stderr
    finally:
        server.stop()


def test_client_create_prints_only_json(tmp_path: Path):
    out = cli("client", "create", "--name", "bi", "--scopes", "analytics:read",
              "--brands", "brand-1,brand-2", "--regions", "EU,UK", "--metrics", "ggr,ngr",
              data_dir=tmp_path)
    assert out.returncode == 0
    creds = json.loads(out.stdout)
    assert set(creds) == {"client_id", "client_secret"}
    assert out.stdout.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("client", "create", "--name", "x", "--scopes", "root"),
        ("client", "create", "--name", " ", "--scopes", "admin"),
    ],
)
def test_cli_errors_are_one_line_and_non_zero(tmp_path: Path, args):
    out = cli(*args, data_dir=tmp_path)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.startswith("tally: ") and out.stderr.count("\n") == 1


def test_serve_refuses_an_unusable_data_dir(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = cli("serve", "--port", "0", data_dir=blocker / "sub")
    assert out.returncode != 0 and "unusable" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_a_data_dir_in_use(tmp_path: Path):
    data = tmp_path / "data"
    server = Server(data)
    try:
        out = cli("serve", "--port", "0", data_dir=data)
        assert out.returncode != 0 and "in use" in out.stderr
    finally:
        server.stop()


def test_ingestion_contract_through_the_real_server(tmp_path: Path):
    """CONTRACT §3 over a real socket: receipts, dedup, idempotency, 400/413/401/403,
    residency, quarantine, problem+json."""
    data = tmp_path / "data"
    writer = new_client(data, scopes="events:write admin")
    reader = new_client(data, scopes="analytics:read")
    server = Server(data, env={"TALLY_REGIONS": "EU,UK", "TALLY_MAX_BATCH_EVENTS": "50"})
    try:
        headers, read_only = token(server.url, *writer), token(server.url, *reader)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            def post(events, **extra):
                return http.post("/v1/events:batch", json=events,
                                 headers={**headers, **extra})

            a, bad, far = make_event(), make_event(event_type="x.y"), make_event(region="NA")
            r = post([a, bad, a, far], **{"X-Idempotency-Key": "k"})
            assert r.status_code == 202
            assert {k: r.json()[k] for k in ("accepted", "duplicates", "rejected")} == {
                "accepted": 1, "duplicates": 1, "rejected": 2}
            assert post([a, bad, a, far], **{"X-Idempotency-Key": "k"}).json() == r.json()
            assert post([a], **{"X-Idempotency-Key": "k"}).status_code == 422
            assert post([a]).json()["duplicates"] == 1
            for status, response in [
                (400, http.post("/v1/events:batch", json={}, headers=headers)),
                (413, post([make_event() for _ in range(51)])),
                (401, http.post("/v1/events:batch", json=[])),
                (403, http.post("/v1/events:batch", json=[], headers=read_only)),
            ]:
                assert response.status_code == status
                assert response.headers["content-type"] == "application/problem+json"
            items = http.get("/v1/admin/quarantine", headers=headers).json()["items"]
            assert [i["event"] for i in items] == [bad, {"event_id": far["event_id"],
                                                         "redacted": True}]
    finally:
        server.stop()

"""End to end through the real server process: durability under SIGKILL, operator commands
while serving, and the CLI's contract (CONTRACT §1, §3). HTTP goes through tally-client, so
the client and the server cannot drift apart; only what the client cannot send by design
(a body that is not a list of events, no token) goes out as raw HTTP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tally_client import (
    NO_RETRY,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    TallyClient,
    Unprocessable,
)
from tests.conftest import make_event
from tests.server import Server, cli, new_client
from tests.stores import rows as stored_rows

pytestmark = pytest.mark.slow


def test_every_acknowledged_event_survives_sigkill(tmp_path: Path):
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    # no retries: a batch is acknowledged by its own 202 or not at all
    tally = TallyClient(server.url, client_id=creds[0], client_secret=creds[1],
                        retry=NO_RETRY, timeout=10)
    tally.token()

    def producer(worker: int) -> None:
        n = 0
        while not stop.is_set():
            batch = [make_event(event_id=f"w{worker}-{n}-{i}") for i in range(200)]
            n += 1
            try:
                receipt = tally.send_batch(batch)
            except httpx.TransportError:
                return  # the server died under us: this batch was never acknowledged
            except (RateLimited, ServiceUnavailable):
                continue  # refused for now: not acknowledged either
            assert receipt.accepted == 200
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
    tally.close()
    with lock:
        acked = list(acknowledged)
    assert len(acked) >= 6_000, (server.log.read_text())[-2000:]

    assert (data / "journal").exists()
    again = Server(data)  # restart: unapplied journal records are replayed, index rebuilt
    try:
        sample = [make_event(event_id=e) for e in acked[:: max(1, len(acked) // 500)]]
        with TallyClient(again.url, client_id=creds[0], client_secret=creds[1]) as client:
            receipt = client.send_batch(sample)
        assert receipt.duplicates == len(sample) and receipt.accepted == 0
    finally:
        again.stop()
    rows = dict(stored_rows(data, "SELECT event_id, count(*) FROM events GROUP BY event_id"))
    missing = [e for e in acked if rows.get(e) != 1]
    assert missing == [], f"{len(missing)} acknowledged events lost or doubled"


def test_operator_commands_work_while_serving(tmp_path: Path):
    data = tmp_path / "data"
    server = Server(data)
    try:
        creds = new_client(data, scopes="events:write")  # written while the server runs
        with TallyClient(server.url, client_id=creds[0], client_secret=creds[1]) as client:
            assert client.ingest([make_event()]).accepted == 1
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
        with (TallyClient(server.url, client_id=writer[0], client_secret=writer[1]) as tally,
              TallyClient(server.url, client_id=reader[0], client_secret=reader[1]) as read):
            a, bad, far = make_event(), make_event(event_type="x.y"), make_event(region="NA")
            first = tally.send_batch([a, bad, a, far], idempotency_key="k")
            assert (first.accepted, first.duplicates, first.rejected) == (1, 1, 2)
            assert [(e.index, e.event_id) for e in first.errors] == [
                (1, bad["event_id"]), (3, far["event_id"])]
            assert tally.send_batch([a, bad, a, far], idempotency_key="k") == first
            for call, problem in [
                (lambda: tally.send_batch([a], idempotency_key="k"), Unprocessable),
                (lambda: tally.send_batch([make_event() for _ in range(51)]), PayloadTooLarge),
                (lambda: read.send_batch([]), Forbidden),
            ]:
                with pytest.raises(problem) as caught:
                    call()
                assert caught.value.response.headers["content-type"] == (
                    "application/problem+json")
            assert tally.send_batch([a]).duplicates == 1
            # what the client never sends: a body that is not a list of events, no token
            token = tally.token().access_token
            for status, response in [
                (400, httpx.post(f"{server.url}/v1/events:batch", json={},
                                 headers={"Authorization": f"Bearer {token}"})),
                (401, httpx.post(f"{server.url}/v1/events:batch", json=[])),
            ]:
                assert response.status_code == status
                assert response.headers["content-type"] == "application/problem+json"
            items = tally.quarantine().items
            assert [i.event for i in items] == [bad, {"event_id": far["event_id"],
                                                      "redacted": True}]
    finally:
        server.stop()

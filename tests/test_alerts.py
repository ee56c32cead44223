"""Metric alerts (CONTRACT §11): rules on a timeseries or slice, evaluated as data is applied,
each firing and resolution POSTed once to a real local receiver that verifies the Standard
Webhooks signature (``standardwebhooks``) — across a restart of a real server too; the
creator's row-level security; strict input."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from tally import metadata
from tally.config import Settings
from tally.security.clients import create_client, revoke_client
from tests.conftest import make_event
from tests.server import Server, new_client, token
from tests.test_webhooks import Receiver

ALERTS = "/v1/alerts"
BATCH = "/v1/events:batch"
JSON_TYPE = {"Content-Type": "application/json"}
GGR_BY_GAME = {"kind": "slice", "metric": "ggr", "dim": "game_id", "from": "2025-10-23",
               "to": "2025-10-24"}
OVER_1000 = {"op": ">", "value": 1000}


def bet(game: str, stake: int, win: int, at: str = "2025-10-23T16:21:05Z",
        brand: str = "brand-7") -> dict[str, Any]:
    event = make_event(occurred_at=at, tenant_id=brand)
    event["payload"].update(game_id=game, stake_minor=stake, win_minor=win)
    return event


def wait_for(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def verified(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    """Every message received, each verified against ``secret`` (raises if one is not)."""
    return [dict(Webhook(secret).verify(body, headers), webhook_id=headers["webhook-id"])
            for headers, body in receiver.received]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                    webhook_allow_loopback=True, alerts_max_per_client=3)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


Login = Callable[..., tuple[str, dict[str, str]]]


@pytest.fixture
def login(client: TestClient, settings: Settings) -> Login:
    """``login(scopes, brands=...)`` → (client id, Authorization headers) of a new client."""

    def factory(scopes: str = "events:write analytics:read admin",
                brands: str | None = None) -> tuple[str, dict[str, str]]:
        con = metadata.connect(settings.data_dir)
        client_id, secret = create_client(con, "alerts", scopes, brands, None, None)
        con.close()
        r = client.post("/oauth/token", auth=(client_id, secret),
                        data={"grant_type": "client_credentials"})
        assert r.status_code == 200, r.text
        return client_id, {"Authorization": f"Bearer {r.json()['access_token']}"}

    return factory


def ingest(client: TestClient, headers: dict[str, str], events: list[dict[str, Any]]) -> None:
    r = client.post(BATCH, content=json.dumps(events), headers={**headers, **JSON_TYPE})
    assert r.status_code == 202 and r.json()["accepted"] == len(events), r.text


def make(client: TestClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return client.post(ALERTS, content=json.dumps(body), headers={**headers, **JSON_TYPE})


def test_a_slice_threshold_fires_and_resolves_once_each(client, login, receiver):
    _, headers = login()
    secret = client.get("/v1/webhook-secret", headers=headers).json()["secret"]
    made = make(client, headers, name="big winners", query=GGR_BY_GAME, condition=OVER_1000,
                webhook_url=receiver.url, every_seconds=1)
    assert made.status_code == 201, made.text
    alert = made.json()
    assert made.headers["location"] == f"{ALERTS}/{alert['id']}"
    assert alert["query"] == GGR_BY_GAME and alert["condition"] == OVER_1000
    ingest(client, headers, [bet("g1", 1000, 500), bet("g2", 300, 0)])  # 500, 300: fine
    wait_for(lambda: client.get(f"{ALERTS}/{alert['id']}", headers=headers)
             .json()["evaluated_at"], "a first evaluation")
    ingest(client, headers, [bet("g1", 2000, 900)])  # g1: 1,600
    messages = wait_for(lambda: verified(receiver, secret), "the firing")
    assert [m["type"] for m in messages] == ["alert.firing"]
    data = messages[0]["data"]
    assert data["subject"] == {"game_id": "g1"} and data["values"] == {"value_minor": 1600}
    assert data["alert"]["id"] == alert["id"] and data["alert"]["condition"] == OVER_1000
    ingest(client, headers, [bet("g2", 100, 0)])  # g2: 400: nothing changes
    ingest(client, headers, [bet("g1", 100, 900)])  # g1: 800: resolved
    messages = wait_for(lambda: len(receiver.received) >= 2 and verified(receiver, secret),
                        "the resolution")
    time.sleep(1.5)  # nothing more comes
    messages = verified(receiver, secret)
    assert [m["type"] for m in messages] == ["alert.firing", "alert.resolved"]
    assert messages[1]["data"]["values"] == {"value_minor": 800}
    assert messages[0]["webhook_id"] != messages[1]["webhook_id"]
    events = client.get(f"{ALERTS}/{alert['id']}/events", headers=headers).json()["items"]
    assert [(e["id"], e["type"], e["delivery"]["status"], e["delivery"]["attempts"])
            for e in events] == [(m["webhook_id"], m["type"], "delivered", 1) for m in messages]
    assert [e["data"] for e in events] == [m["data"] for m in messages]


def test_a_timeseries_is_judged_at_its_latest_complete_bucket(client, login, receiver):
    """Bets per hour by brand under 3: hour 16 is judged once data of hour 17 arrives (the
    watermark has passed its end), never while it fills."""
    _, headers = login()
    query = {"kind": "timeseries", "metric": "bets", "granularity": "1h",
             "from": "2025-10-23T00:00:00Z", "to": "2030-01-01T00:00:00Z",
             "group_by": "brand_id"}
    made = make(client, headers, name="quiet brand", query=query,
                condition={"op": "<", "value": 3}, webhook_url=receiver.url, every_seconds=1)
    assert made.status_code == 201, made.text
    alert_id = made.json()["id"]
    ingest(client, headers, [bet("g1", 10, 0, "2025-10-23T16:10:00Z"),
                             bet("g1", 10, 0, "2025-10-23T16:20:00Z")])
    wait_for(lambda: client.get(f"{ALERTS}/{alert_id}", headers=headers)
             .json()["evaluated_at"], "an evaluation")
    time.sleep(1.5)
    assert receiver.received == []  # hour 16 is not complete yet
    ingest(client, headers, [bet("g1", 10, 0, "2025-10-23T17:05:00Z")])
    wait_for(lambda: receiver.received, "the firing")
    message = json.loads(receiver.received[0][1])
    assert message["type"] == "alert.firing"
    assert message["data"]["subject"] == {"brand_id": "brand-7"}
    assert message["data"]["values"] == {"value": 2, "ts": "2025-10-23T16:00:00Z"}
    for minute in (10, 20, 30):  # hour 17 gets 4 bets, and hour 18 begins: resolved
        ingest(client, headers, [bet("g1", 10, 0, f"2025-10-23T17:{minute}:00Z")])
    ingest(client, headers, [bet("g1", 10, 0, "2025-10-23T18:01:00Z")])
    wait_for(lambda: len(receiver.received) >= 2, "the resolution")
    message = json.loads(receiver.received[1][1])
    assert message["type"] == "alert.resolved"
    assert message["data"]["values"] == {"value": 4, "ts": "2025-10-23T17:00:00Z"}


def test_a_delivery_is_retried_until_acknowledged(client, login):
    receiver = Receiver(answers=[(500, {})])
    try:
        _, headers = login()
        made = make(client, headers, name="r", query=GGR_BY_GAME, condition=OVER_1000,
                    webhook_url=receiver.url, every_seconds=1)
        ingest(client, headers, [bet("g1", 5000, 0)])
        wait_for(lambda: len(receiver.received) >= 2, "the retry")
        ids = {headers_["webhook-id"] for headers_, _ in receiver.received}
        assert len(ids) == 1  # one message, attempted twice
        event = wait_for(lambda: [e for e in client.get(
            f"{ALERTS}/{made.json()['id']}/events", headers=headers).json()["items"]
            if e["delivery"]["status"] == "delivered"], "the delivery")[0]
        assert event["delivery"]["attempts"] == 2 and event["delivery"]["last_status"] == 200
        admin = login("admin")[1]
        entries = client.get("/v1/admin/audit", params={"limit": "1000"},
                             headers=admin).json()["items"]
        sent = [e for e in entries if e["route"] == "webhook:alert"]
        assert [(e["status"], e["params"]["event"], e["params"]["attempts"]) for e in sent] \
            == [(200, event["id"], "2")]
        made_entry = [e for e in entries if e["kind"] == "alert" and e["method"] == "POST"]
        assert made_entry[0]["params"]["alert"] == made.json()["id"]
    finally:
        receiver.close()


def test_an_alert_sees_only_its_creators_brands(client, login, receiver, settings):
    _, writer = login()
    creator, limited = login("analytics:read", brands="brand-a")
    refused = make(client, limited, name="x", query={**GGR_BY_GAME,
                                                     "filters": "brand_id:brand-b"},
                   condition=OVER_1000, webhook_url=receiver.url)
    assert refused.status_code == 403 and refused.json()["claim"] == "brands", refused.text
    by_brand = {**GGR_BY_GAME, "dim": "brand_id"}
    made = make(client, limited, name="brands", query=by_brand, condition={"op": ">", "value": 0},
                webhook_url=receiver.url, every_seconds=1)
    assert made.status_code == 201, made.text
    ingest(client, writer, [bet("g1", 500, 0, brand="brand-a"),
                            bet("g1", 500, 0, brand="brand-b")])
    wait_for(lambda: receiver.received, "the firing")
    time.sleep(1.5)
    subjects = [json.loads(body)["data"]["subject"] for _, body in receiver.received]
    assert subjects == [{"brand_id": "brand-a"}]  # brand-b breaches too, unseen by it
    # revoked, its alert stops: evaluated no more, and what it had not sent is cancelled
    con = metadata.connect(settings.data_dir)
    revoke_client(con, creator)
    con.close()
    alert_id = made.json()["id"]
    ingest(client, writer, [bet("g1", 100, 1000, brand="brand-a")])  # would resolve it
    wait_for(lambda: "no longer has access" in (client.get(
        f"{ALERTS}/{alert_id}", headers=writer).json()["error"] or ""),
        "the alert to stop", seconds=10)
    time.sleep(1.5)
    assert len(receiver.received) == 1


def test_alerts_are_the_creators_and_bounded(client, login, receiver):
    _, mine = login()
    _, other = login("analytics:read")
    made = [make(client, mine, name=f"a{i}", query=GGR_BY_GAME, condition=OVER_1000,
                 webhook_url=receiver.url) for i in range(3)]
    assert [r.status_code for r in made] == [201, 201, 201]
    over = make(client, mine, name="a4", query=GGR_BY_GAME, condition=OVER_1000,
                webhook_url=receiver.url)
    assert over.status_code == 422 and over.json()["limit"] == "alerts_max_per_client"
    first = made[0].json()["id"]
    listed = client.get(ALERTS, params={"limit": "2"}, headers=mine).json()
    assert [a["id"] for a in listed["items"]] == [made[0].json()["id"], made[1].json()["id"]]
    rest = client.get(ALERTS, params={"cursor": listed["next_cursor"]}, headers=mine).json()
    assert [a["id"] for a in rest["items"]] == [made[2].json()["id"]]
    assert client.get(ALERTS, headers=other).json()["items"] == []
    for path in (f"{ALERTS}/{first}", f"{ALERTS}/{first}/events"):
        assert client.get(path, headers=other).status_code == 404
    assert client.delete(f"{ALERTS}/{first}", headers=other).status_code == 404
    assert client.delete(f"{ALERTS}/{first}", headers=mine).status_code == 204
    assert client.get(f"{ALERTS}/{first}", headers=mine).status_code == 404
    again = make(client, mine, name="a4", query=GGR_BY_GAME, condition=OVER_1000,
                 webhook_url=receiver.url)
    assert again.status_code == 201


@pytest.mark.parametrize(("change", "status", "names"), [
    ({"extra": 1}, 400, "extra"),
    ({"query": {**GGR_BY_GAME, "fitlers": "brand_id:b"}}, 400, "fitlers"),
    ({"condition": {"op": "!=", "value": 1}}, 400, "condition.op"),
    ({"condition": {"op": ">", "value": "1"}}, 400, "condition.value"),
    ({"condition": {"op": ">", "value": 1, "x": 2}}, 400, "condition.x"),
    ({"condition": {"rtp_drift": {"theoretical": 0.96}}}, 400, "condition.rtp_drift.confidence"),
    ({"condition": {"rtp_drift": {"theoretical": 0.96, "confidence": 1.0}}}, 400,
     "condition.rtp_drift.confidence"),
    ({"condition": {"rtp_drift": {"theoretical": 0.96, "confidence": 0.99}}}, 400,
     "condition.rtp_drift"),  # on a slice of ggr
    ({"query": {"kind": "funnel", "steps": [{"event": "bet.placed"}]}}, 400, "query.kind"),
    ({"query": {**GGR_BY_GAME, "metric": "nope"}}, 400, None),
    ({"query": {**GGR_BY_GAME, "from": "2025-13-01"}}, 400, "from"),
    ({"webhook_url": "http://example.com/hook"}, 400, "webhook_url"),
    ({"webhook_url": "https://10.0.0.1/hook"}, 400, "webhook_url"),
    ({"webhook_url": "https://169.254.169.254/latest"}, 400, "webhook_url"),
    ({"webhook_url": None}, 400, "webhook_url"),
    ({"every_seconds": 0}, 400, "every_seconds"),
    ({"name": ""}, 400, "name"),
    ({"name": "x" * 201}, 400, "name"),
])
def test_a_bad_rule_is_a_problem_naming_it(client, login, receiver, change, status, names):
    _, headers = login()
    body = {"name": "n", "query": GGR_BY_GAME, "condition": OVER_1000,
            "webhook_url": receiver.url, **change}
    r = make(client, headers, **body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    if names is not None:
        named = [problem.get("parameter"), problem.get("field"),
                 *(problem.get("parameters") or []),
                 *(e["parameter"] for e in problem.get("errors") or [])]
        assert names in named, problem


def test_strict_input_on_every_alert_route(client, login, receiver):
    _, headers = login()
    assert client.post(ALERTS, content=b"[1", headers={**headers, **JSON_TYPE}) \
        .status_code == 400
    assert client.post(ALERTS, content=b"{}", headers={**headers, "Content-Type": "text/plain"}) \
        .status_code == 415
    assert client.get(ALERTS, params={"limt": "2"}, headers=headers).status_code == 400
    assert client.get(ALERTS, params={"cursor": "nope"}, headers=headers).status_code == 400
    assert client.get(f"{ALERTS}/alr_nope", headers=headers).status_code == 404
    assert client.get(f"{ALERTS}/{'x' * 5000}", headers=headers).status_code in (404, 414)
    assert make(client, login("events:write")[1], name="n", query=GGR_BY_GAME,
                condition=OVER_1000, webhook_url=receiver.url).status_code == 403
    assert client.get(ALERTS).status_code == 401


def test_firing_and_resolution_once_across_a_restart(tmp_path):
    """A real server: the firing is delivered, the server restarts, new data that keeps the
    key breaching sends nothing again, and the resolution after it is delivered once."""
    data = tmp_path / "data"
    env = {"TALLY_WEBHOOK_ALLOW_LOOPBACK": "1", "TALLY_REGIONS": "EU,UK,LATAM"}
    client_id, secret = new_client(data, "events:write analytics:read")
    receiver = Receiver()
    server = Server(data, env=env)
    try:
        headers = token(server.url, client_id, secret)
        signing = httpx.get(f"{server.url}/v1/webhook-secret", headers=headers).json()["secret"]

        def send(*events: dict[str, Any]) -> None:
            r = httpx.post(f"{server.url}{BATCH}", content=json.dumps(list(events)),
                           headers={**headers, **JSON_TYPE})
            assert r.status_code == 202, r.text

        made = httpx.post(f"{server.url}{ALERTS}", headers={**headers, **JSON_TYPE},
                          content=json.dumps({"name": "g1", "query": GGR_BY_GAME,
                                              "condition": OVER_1000,
                                              "webhook_url": receiver.url,
                                              "every_seconds": 1}))
        assert made.status_code == 201, made.text
        send(bet("g1", 3000, 0))
        wait_for(lambda: receiver.received, "the firing")
        server.stop()
        server = Server(data, env=env)
        headers = token(server.url, client_id, secret)
        alert_url = f"{server.url}{ALERTS}/{made.json()['id']}"
        # read before the send: the evaluation it causes may come before any later read
        version = httpx.get(alert_url, headers=headers).json()["evaluated_at"]
        send(bet("g1", 10, 0))  # still breaching: nothing to tell
        wait_for(lambda: httpx.get(alert_url, headers=headers).json()["evaluated_at"]
                 != version, "an evaluation after the restart")
        send(bet("g1", 10, 0), bet("g1", 10, 2900))  # 3,020 - 2,890: 130
        wait_for(lambda: len(receiver.received) >= 2, "the resolution")
        time.sleep(1.5)
        messages = verified(receiver, signing)
        assert [(m["type"], m["data"]["values"]) for m in messages] == [
            ("alert.firing", {"value_minor": 3000}), ("alert.resolved", {"value_minor": 130})]
    finally:
        server.stop()
        receiver.close()

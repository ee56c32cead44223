"""CONTRACT §3 through the real app: receipts, dedup, idempotency, quarantine, limits."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.config import Settings
from tally.ingest.columnar import typed_payload
from tests.conftest import TokenFactory, bearer, make_event, on_duckdb_only

BATCH = "/v1/events:batch"


def stored(client: TestClient, where: str = "true") -> list[dict[str, Any]]:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    assert runtime.ingest.flush()  # acknowledged events reach the store shortly after the 202
    table = runtime.backend.query(
        f"SELECT * FROM events WHERE {where} ORDER BY event_id"
    )
    return table.to_pylist()  # type: ignore[no-any-return]


def post(client: TestClient, headers: dict[str, str], events: Any, **extra: str) -> Any:
    body = events if isinstance(events, (bytes, str)) else json.dumps(events)
    return client.post(BATCH, content=body,
                       headers={"Content-Type": "application/json", **headers, **extra})


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail"} <= set(body)
    assert "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


def test_accepts_a_batch_and_stores_typed_columns(client, headers):
    events = [make_event(), make_event(event_type="wallet.credit", payload={
        "amount_minor": 2500, "currency": "GBP", "reason": "deposit", "reference_id": "pay-1",
        "future_field": {"kept": True}})]
    r = post(client, headers, events)
    assert r.status_code == 202
    receipt = r.json()
    assert receipt == {"accepted": 2, "duplicates": 0, "rejected": 0, "errors": [],
                       "trace_id": r.headers["x-trace-id"]}
    rows = {row["event_id"]: row for row in stored(client)}
    bet, credit = rows[events[0]["event_id"]], rows[events[1]["event_id"]]
    assert (bet["stake_minor"], bet["win_minor"], bet["game_id"]) == (500, 450, "g_01")
    assert (credit["amount_minor"], credit["currency"]) == (2500, "GBP")
    assert credit["reason"] == "deposit"
    assert json.loads(credit["payload"])["future_field"] == {"kept": True}  # unknown kept
    assert str(bet["occurred_at"]) == "2025-10-23 16:21:05"

def test_payload_text_is_stored_only_when_it_carries_more_than_the_typed_columns(client,
                                                                                 headers):
    """A batch whose payloads hold only their types' fields stores no payload text (the typed
    columns rebuild it); one unknown field anywhere keeps every text of that batch verbatim."""
    closed = [make_event(), make_event(event_type="wallet.credit", payload={
        "amount_minor": 2500, "currency": "GBP", "reason": "deposit", "reference_id": None})]
    open_ = [make_event(), make_event(event_type="wallet.credit", payload={
        "amount_minor": 7, "currency": "GBP", "reason": "deposit", "x_new": [1, 2]})]
    for batch in (closed, open_):
        assert post(client, headers, batch).json()["accepted"] == 2
    rows = {row["event_id"]: row for row in stored(client)}
    for event in closed:
        row = rows[event["event_id"]]
        assert row["payload"] == ""
        sent = {k: v for k, v in event["payload"].items() if v is not None}
        assert typed_payload(row) == sent  # nothing the producer sent is lost
    for event in open_:
        text = rows[event["event_id"]]["payload"]
        assert json.loads(text) == event["payload"]
        assert text == json.dumps(event["payload"])  # as sent (post() encodes so)



def test_occurred_at_is_stored_in_utc_and_producer_ingested_at_kept(client, headers):
    ev = make_event(occurred_at="2025-10-23T18:21:05+02:00",
                    ingested_at="2025-10-23T16:21:09.5Z")
    ev_no_ingest = make_event()
    assert post(client, headers, [ev, ev_no_ingest]).status_code == 202
    rows = {row["event_id"]: row for row in stored(client)}
    assert str(rows[ev["event_id"]]["occurred_at"]) == "2025-10-23 16:21:05"
    assert str(rows[ev["event_id"]]["ingested_at"]) == "2025-10-23 16:21:09.500000"
    server_set = rows[ev_no_ingest["event_id"]]
    assert server_set["ingested_at"] == server_set["received_at"]


def test_duplicates_in_batch_and_across_batches_at_any_delay(client, headers):
    a, b = make_event(), make_event()
    r = post(client, headers, [a, b, a])
    assert (r.json()["accepted"], r.json()["duplicates"]) == (2, 1)
    post(client, headers, [make_event() for _ in range(50)])  # other traffic in between
    r = post(client, headers, [b, make_event(), a])
    assert (r.json()["accepted"], r.json()["duplicates"]) == (1, 2)
    assert len(stored(client, f"event_id in ('{a['event_id']}', '{b['event_id']}')")) == 2


def test_dedup_is_per_tenant(client, headers):
    a = make_event()
    other = dict(a, tenant_id="brand-8")
    r = post(client, headers, [a, other])
    assert (r.json()["accepted"], r.json()["duplicates"]) == (2, 0)


def test_dedup_survives_a_restart(settings: Settings, auth: TokenFactory, client, headers):
    a = make_event()
    assert post(client, headers, [a]).json()["accepted"] == 1
    client.__exit__(None, None, None)
    with TestClient(create_app(settings)) as again:
        r = post(again, headers, [a, make_event()])
        assert (r.json()["accepted"], r.json()["duplicates"]) == (1, 1)


def test_partial_acceptance_and_quarantine(client, headers):
    good, bad = make_event(), make_event(payload={"bet_id": "x", "stake_minor": "100"})
    r = post(client, headers, [good, bad])
    receipt = r.json()
    assert (receipt["accepted"], receipt["rejected"]) == (1, 1)
    assert receipt["errors"] == [{"index": 1, "event_id": bad["event_id"],
                                  "detail": receipt["errors"][0]["detail"]}]
    assert "$.payload.stake_minor" in receipt["errors"][0]["detail"]
    q = client.get("/v1/admin/quarantine", headers=headers).json()
    assert len(q["items"]) == 1
    item = q["items"][0]
    assert item["event"] == bad and item["reason"] == receipt["errors"][0]["detail"]
    assert item["received_at"].endswith("Z")
    assert q["next_cursor"] is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"event_type": "bet.cancelled"}, "unknown event_type"),
        ({"schema_version": "2.0.0"}, "major version 2"),
        ({"schema_version": "1.3"}, "not semver"),
        ({"occurred_at": "2025-10-23T16:21:05"}, "no UTC offset"),
        ({"occurred_at": "yesterday"}, "datetime"),
        ({"occurred_at": "2999-01-01T00:00:00Z"}, "in the future"),
        ({"occurred_at": "1999-12-31T23:59:59Z"}, "before 2000"),
        ({"ingested_at": "2025-10-23T16:21:05"}, "ingested_at has no UTC offset"),
        ({"ingested_at": "2999-01-01T00:00:00Z"}, "ingested_at is more than"),
        ({"event_id": ""}, "length >= 1"),
        ({"event_id": "x" * 129}, "length <= 128"),
        ({"player_id": None}, "player_id is required"),
        ({"tenant_id": 7}, "Expected `str`"),
        ({"payload": []}, "Expected `object`"),
        ({"unexpected": 1}, "unknown field `unexpected`"),
        ({"payload": {"bet_id": "b", "stake_minor": 1.5, "win_minor": 0, "currency": "EUR",
                      "game_id": "g", "provider_id": "p"}}, "Expected `int`, got `float`"),
        ({"payload": {"bet_id": "b", "stake_minor": -1, "win_minor": 0, "currency": "EUR",
                      "game_id": "g", "provider_id": "p"}}, ">= 0"),
        ({"payload": {"bet_id": "b", "stake_minor": 1, "win_minor": 0, "currency": "EURO",
                      "game_id": "g", "provider_id": "p"}}, "currency"),
        ({"payload": {"bet_id": "b", "stake_minor": 1, "win_minor": 0, "currency": "XYZ",
                      "game_id": "g", "provider_id": "p"}}, "not an ISO 4217 code"),
        ({"payload": {"bet_id": "b", "stake_minor": 1, "currency": "EUR", "game_id": "g",
                      "provider_id": "p"}}, "missing required field `win_minor`"),
        ({"payload": {"bet_id": "b", "stake_minor": 1, "win_minor": 0, "currency": "EUR",
                      "game_id": "g", "provider_id": "p", "in_bonus": "yes"}}, "got `str`"),
        ({"event_type": "wallet.credit", "payload": {"amount_minor": 1, "currency": "EUR",
                                                     "reason": "gift"}}, "reason"),
        ({"event_type": "session.ended", "payload": {"session_id": "s"}}, "duration_sec"),
    ],
)
def test_every_rejection_reason(client, headers, change, reason):
    bad = make_event(**change)
    r = post(client, headers, [make_event(), bad])
    receipt = r.json()
    assert r.status_code == 202 and receipt["accepted"] == 1 and receipt["rejected"] == 1
    assert reason in receipt["errors"][0]["detail"], receipt["errors"][0]["detail"]
    assert client.get("/v1/admin/quarantine", headers=headers).json()["items"][0]["event"] == bad


def test_payment_events_do_not_require_player_id(client, headers):
    ev = make_event(event_type="payment.intent", player_id=None, payload={
        "payment_id": "pay-1", "amount_minor": 1000, "currency": "EUR", "method": "card"})
    del ev["player_id"]
    assert post(client, headers, [ev]).json()["accepted"] == 1


def test_newer_minor_version_with_new_fields_is_accepted(client, headers):
    ev = make_event(schema_version="1.9.4")
    ev["payload"]["new_optional"] = 3
    assert post(client, headers, [ev]).json()["accepted"] == 1


def test_residency_rejected_event_is_stored_nowhere(client, headers):
    ev = make_event(region="NA", player_id="p_canary_na")  # TALLY_REGIONS=EU,UK,LATAM here
    receipt = post(client, headers, [ev]).json()
    assert receipt["rejected"] == 1 and "not served" in receipt["errors"][0]["detail"]
    assert stored(client) == []
    quarantine = client.get("/v1/admin/quarantine", headers=headers)
    assert "p_canary_na" not in quarantine.text and "stake_minor" not in quarantine.text
    assert quarantine.json()["items"][0]["event"] == {"event_id": ev["event_id"],
                                                      "redacted": True}


def test_events_outside_the_token_brands_or_regions_are_rejected(client, auth):
    headers = auth(scopes="events:write", brands="brand-7", regions="EU")
    ok, other_brand, other_region = make_event(), make_event(tenant_id="brand-9"), \
        make_event(region="UK")
    receipt = post(client, headers, [ok, other_brand, other_region]).json()
    assert receipt["accepted"] == 1
    assert [e["index"] for e in receipt["errors"]] == [1, 2]
    assert "outside this client's brands" in receipt["errors"][0]["detail"]
    assert "outside this client's regions" in receipt["errors"][1]["detail"]


@pytest.mark.parametrize(
    "body", [b'{"event_id": "x"}', b"[1, 2]", b'[{"a": 1}, "x"]', b"null", b'"text"', b""],
)
def test_body_that_is_not_an_array_of_objects_is_400(client, headers, body):
    assert_problem(post(client, headers, body), 400)
    assert stored(client) == []


def test_invalid_json_is_400(client, headers):
    body = assert_problem(post(client, headers, b'[{"event_id": '), 400)
    assert "not valid JSON" in body["detail"]


@contextmanager
def app_with(tmp_path: Path, **overrides: Any) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app with some settings changed, and an events:write client's headers."""
    settings = Settings(data_dir=tmp_path / "d", **overrides)
    with TestClient(create_app(settings)) as client:
        yield client, bearer(client, settings.data_dir, "events:write")


def test_batch_over_the_event_limit_is_413(tmp_path):
    with app_with(tmp_path, max_batch_events=5) as (client, headers):
        assert post(client, headers, [make_event() for _ in range(5)]).status_code == 202
        assert_problem(post(client, headers, [make_event() for _ in range(6)]), 413)


def test_batch_over_the_byte_limit_is_413(tmp_path):
    with app_with(tmp_path, max_batch_bytes=4096) as (client, headers):
        body = assert_problem(post(client, headers, [make_event() for _ in range(30)]), 413)
        assert "4096" in body["detail"]


def test_idempotency_key_replays_the_first_response(client, headers):
    events = [make_event(), make_event(event_type="nope")]
    first = post(client, headers, events, **{"X-Idempotency-Key": "ev_20251023_001"})
    again = post(client, headers, events, **{"X-Idempotency-Key": "ev_20251023_001"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()  # same counts and the first trace_id, not duplicates
    assert len(client.get("/v1/admin/quarantine", headers=headers).json()["items"]) == 1


def test_idempotency_key_with_a_different_body_is_422(client, headers):
    key = {"X-Idempotency-Key": "k-1"}
    assert post(client, headers, [make_event()], **key).status_code == 202
    other = make_event()
    body = assert_problem(post(client, headers, [other], **key), 422)
    assert "different body" in body["detail"]
    assert stored(client, f"event_id = '{other['event_id']}'") == []


def test_idempotency_keys_are_scoped_per_client(client, auth):
    one, two = auth(scopes="events:write"), auth(scopes="events:write")
    key = {"X-Idempotency-Key": "shared-key"}
    assert post(client, one, [make_event()], **key).json()["accepted"] == 1
    assert post(client, two, [make_event()], **key).json()["accepted"] == 1


def test_quarantine_pagination(client, headers):
    bad = [make_event(event_type=f"bad.{i}") for i in range(7)]
    post(client, headers, bad)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/admin/quarantine", params=params, headers=headers).json()
        seen += [item["event"]["event_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["event_id"] for e in bad]
    assert_problem(client.get("/v1/admin/quarantine", params={"cursor": "garbage!"},
                              headers=headers), 400)
    assert_problem(client.get("/v1/admin/quarantine", params={"limit": 0}, headers=headers), 400)


def test_routes_need_a_token_and_the_scope(client, auth):
    assert_problem(client.post(BATCH, json=[]), 401)
    assert client.post(BATCH, json=[]).headers["www-authenticate"] == 'Bearer realm="tally"'
    assert_problem(client.post(BATCH, json=[],
                               headers={"Authorization": "Bearer not-a-jwt"}), 401)
    reader = auth(scopes="analytics:read")
    body = assert_problem(post(client, reader, [make_event()]), 403)
    assert body["missing_scope"] == "events:write"
    assert_problem(client.get("/v1/admin/quarantine", headers=reader), 403)
    assert_problem(client.get("/v1/schemas"), 401)
    assert client.get("/v1/schemas", headers=reader).status_code == 200


def test_unknown_route_and_method_are_problems(client, headers):
    assert_problem(client.get("/v1/nothing-here", headers=headers), 404)
    assert_problem(client.get(BATCH, headers=headers), 405)


def test_journal_failure_is_a_503_and_nothing_is_acknowledged(client, headers):
    assert post(client, headers, [make_event()]).status_code == 202  # opens the segment
    journal = client.app.state.runtime.ingest.journal  # type: ignore[attr-defined]
    read_only = os.open(os.devnull, os.O_RDONLY)
    os.dup2(read_only, journal._file)  # the disk refuses the next write (EBADF)
    os.close(read_only)
    lost = make_event()
    refused = post(client, headers, [lost])
    body = assert_problem(refused, 503)
    assert refused.headers["retry-after"] == "5" and body["trace_id"]
    assert "journal cannot be written" in body["detail"] and "Errno" not in json.dumps(body)
    assert stored(client, f"event_id = '{lost['event_id']}'") == []
    # nothing of the refused batch was remembered: the retry is a first attempt, and works
    # (the journal gave up the broken segment and opened a new one)
    again = post(client, headers, [lost])
    assert again.status_code == 202 and again.json()["accepted"] == 1
    assert len(stored(client, f"event_id = '{lost['event_id']}'")) == 1


@on_duckdb_only("kills DuckDB's connection under the applier")
def test_a_store_that_dies_after_the_ack_is_reopened_and_loses_nothing(client, headers):
    acked = make_event()
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    runtime.backend._con.close()  # the store's connection dies under the applier
    assert post(client, headers, [acked]).status_code == 202  # durable in the journal
    assert runtime.ingest.flush(10)  # the applier opened the store again and applied it
    assert runtime.ingest.applier.store_failure is None
    assert len(stored(client, f"event_id = '{acked['event_id']}'")) == 1
    assert post(client, headers, [acked]).json()["duplicates"] == 1


def test_traceparent_is_honoured(client, headers):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = post(client, headers, [make_event()], traceparent=f"00-{trace}-00f067aa0ba902b7-01")
    assert r.json()["trace_id"] == trace == r.headers["x-trace-id"]


def test_health_and_readiness(client):
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/readyz").json()["status"] == "ready"


def test_field_order_does_not_matter(client, headers):
    ev = make_event()
    reordered = {k: ev[k] for k in reversed(list(ev))}  # event_type after payload
    assert post(client, headers, [reordered]).json()["accepted"] == 1

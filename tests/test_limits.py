"""Rate limits and row quotas (CONTRACT §6, docs/security.md "Rate limits and quotas").

In-process tests use the real app and store with the local buckets on an injected clock, so
the numbers in the headers are exact; the Redis tests use a real ``redis-server`` of their own
(tests/conftest.py: on a free port, files in a temporary directory) and, for the shared limit,
two real ``tally serve`` processes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.config_values import Rate, parse_rate
from tally.insights.cache import AnswerCache
from tally.runtime import Runtime
from tally.security.admission import redis_client
from tally.security.clients import create_client
from tally.security.limits import (
    PRUNE_EVERY,
    Bucket,
    LocalRateLimiter,
    RedisRateLimiter,
)
from tally.security.quotas import RedisRowsLedger
from tests.conftest import bearer, make_event
from tests.server import Server, cli, free_port, new_client, token

TS = "/v1/analytics/timeseries"


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    http: TestClient
    settings: Settings
    runtime: Runtime
    clock: Clock

    def token(self, **limits: str) -> dict[str, str]:
        return bearer(self.http, self.settings.data_dir, **limits)

    def ts(self, headers: dict[str, str], **params: str) -> httpx.Response:
        query = {"metric": "ggr", "granularity": "1d", "from": "2025-10-01",
                 "to": "2025-10-31", **params}
        return self.http.get(TS, headers=headers, params=query)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """``start(**settings)`` → an :class:`Api` whose buckets run on a frozen clock."""
    with ExitStack() as stack:
        def factory(**overrides: Any) -> Api:
            settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM", **overrides)
            runtime = Runtime.open(settings)
            clock = Clock()
            runtime.limits.limiter = LocalRateLimiter(clock=clock)
            http = TestClient(create_app(settings, runtime), raise_server_exceptions=False)
            stack.enter_context(http)
            return Api(http, settings, runtime, clock)

        yield factory


def structured(header: str) -> dict[str, dict[str, str]]:
    """A RateLimit / RateLimit-Policy field as {policy: {param: value}}."""
    out: dict[str, dict[str, str]] = {}
    for member in header.split(", "):
        name, *params = member.split(";")
        out[json.loads(name)] = dict(p.split("=", 1) for p in params)
    return out


def limits_of(response: httpx.Response) -> tuple[dict[str, dict[str, str]],
                                                  dict[str, dict[str, str]]]:
    return (structured(response.headers["RateLimit-Policy"]),
            structured(response.headers["RateLimit"]))


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


# -- rates ---------------------------------------------------------------------------------


def test_rate_texts():
    assert parse_rate("20/s burst 40") == Rate(20, 40)
    assert parse_rate("600/m") == Rate(10, 600)
    assert parse_rate(" 3/h  burst 5 ") == Rate(3 / 3600, 5)
    assert parse_rate("off") is None
    assert Rate(20, 40).window == 2 and Rate(0.1, 5).window == 50
    for bad in ("fast", "20/s burst", "0/s", "5/s burst 0", "20/d"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError, match="is not a rate"):
        Settings(rate_client="lots")
    with pytest.raises(ValueError, match="TALLY_REDIS_URL"):
        Settings(redis_url="http://127.0.0.1:6379")


# -- the client bucket ---------------------------------------------------------------------


def test_exactly_burst_requests_pass_then_429_then_refill(start):
    api = start(rate_client="6/m burst 5")  # a token every 10 s
    headers = api.token()
    for k in range(1, 6):  # the clock does not move: no refill
        r = api.http.get("/v1/schemas", headers=headers)
        assert r.status_code == 200, r.text
        policy, current = limits_of(r)
        assert policy == {"client": {"q": "5", "w": "50"}}
        assert current == {"client": {"r": str(5 - k), "t": str(10 * k)}}
    r = api.http.get("/v1/schemas", headers=headers)
    body = problem(r, 429)
    assert body["limit"] == "client" and body["retry_after"] == 10
    assert r.headers["Retry-After"] == "10"
    assert limits_of(r)[1] == {"client": {"r": "0", "t": "50"}}

    api.clock.now += 9.5  # half a token short
    r = api.http.get("/v1/schemas", headers=headers)
    assert problem(r, 429)["retry_after"] == 1 and r.headers["Retry-After"] == "1"
    api.clock.now += 0.5  # now exactly one token
    r = api.http.get("/v1/schemas", headers=headers)
    assert r.status_code == 200
    assert limits_of(r)[1] == {"client": {"r": "0", "t": "50"}}
    assert "Retry-After" not in r.headers
    assert api.http.get("/v1/schemas", headers=headers).status_code == 429

    other = api.token()  # another client has its own bucket
    assert api.http.get("/v1/schemas", headers=other).status_code == 200


def test_every_v1_route_is_limited_and_operations_are_not(start):
    api = start(rate_client="1/h burst 1")
    headers = api.token()
    assert api.ts(headers).status_code == 200
    for method, path in (("get", "/v1/metrics"), ("get", "/v1/admin/quarantine"),
                         ("post", "/v1/events:batch")):
        r = api.http.request(method, path, headers=headers,
                             json=[] if method == "post" else None)
        assert problem(r, 429)["limit"] == "client", path
    for path in ("/healthz", "/readyz", "/metrics", "/healthz"):
        r = api.http.get(path)
        assert r.status_code == 200 and "RateLimit" not in r.headers, path
    r = api.http.get("/v1/schemas")  # no token: 401, not charged, no headers
    assert r.status_code == 401 and "RateLimit" not in r.headers


# -- brands and regions --------------------------------------------------------------------


def test_brand_and_region_buckets_are_shared_and_separate_from_clients(start):
    api = start(rate_client="6/m burst 100", rate_brand="6/m burst 2",
                rate_region="6/m burst 3")
    brand7 = api.token(brands="brand-7")
    for k in (1, 2):
        r = api.ts(brand7)
        assert r.status_code == 200, r.text
        policy, current = limits_of(r)
        assert policy == {"client": {"q": "100", "w": "1000"}, "brand": {"q": "2", "w": "20"}}
        pk = ":" + base64.b64encode(b"brand-7").decode() + ":"
        assert current["brand"] == {"r": str(2 - k), "t": str(10 * k), "pk": pk}
        assert current["client"] == {"r": str(100 - k), "t": str(10 * k)}
    r = api.ts(brand7)
    body = problem(r, 429)
    assert (body["limit"], body["brand"], body["retry_after"]) == ("brand", "brand-7", 10)
    assert limits_of(r)[1]["client"]["r"] == "97"  # its own bucket still has plenty

    anyone = api.token()
    assert api.ts(anyone).status_code == 200  # not confined to a brand: no brand bucket
    assert api.ts(anyone, filters="brand_id:brand-8").status_code == 200
    r = api.ts(anyone, filters="brand_id:brand-7")  # the same brand's bucket, by filter
    assert problem(r, 429)["brand"] == "brand-7"
    # a brand outside the caller's token is a 403 and spends nobody's bucket
    assert api.ts(brand7, filters="brand_id:brand-8").status_code == 403
    assert api.ts(anyone, filters="brand_id:brand-8").status_code == 200

    uk = api.token(regions="UK")
    for _ in range(3):
        assert api.ts(uk).status_code == 200
    r = api.ts(uk)
    body = problem(r, 429)
    assert (body["limit"], body["region"]) == ("region", "UK")
    assert api.ts(anyone, filters="region:EU").status_code == 200
    assert problem(api.ts(anyone, filters="region:UK"), 429)["region"] == "UK"


def test_a_batch_is_charged_to_its_brands_and_a_refused_batch_stores_nothing(start):
    api = start(rate_brand="6/m burst 2")
    headers = api.token()
    batches = [[make_event(tenant_id="brand-3"), make_event(tenant_id="brand-4")]
               for _ in range(3)]
    for batch in batches[:2]:
        r = api.http.post("/v1/events:batch", headers=headers, json=batch)
        assert r.status_code == 202 and r.json()["accepted"] == 2
        assert "brand" in limits_of(r)[0]
    r = api.http.post("/v1/events:batch", headers=headers, json=batches[2])
    assert problem(r, 429)["limit"] == "brand"
    assert api.http.post("/v1/events:batch", headers=headers,  # another brand: fine
                         json=[make_event(tenant_id="brand-5")]).status_code == 202
    api.clock.now += 10
    r = api.http.post("/v1/events:batch", headers=headers, json=batches[2])
    assert r.status_code == 202
    assert (r.json()["accepted"], r.json()["duplicates"]) == (2, 0)  # the 429 stored nothing


def test_token_endpoint_is_limited_per_client_id_and_address(start):
    api = start(rate_token="6/m burst 2")
    meta = metadata.connect(api.settings.data_dir)
    first, secret = create_client(meta, "a", "analytics:read")
    second, secret2 = create_client(meta, "b", "analytics:read")
    meta.close()
    form = {"grant_type": "client_credentials"}
    assert api.http.post("/oauth/token", auth=(first, secret), data=form).status_code == 200
    assert api.http.post("/oauth/token", auth=(first, "wrong"), data=form).status_code == 401
    r = api.http.post("/oauth/token", auth=(first, secret), data=form)  # guesses count too
    body = problem(r, 429)
    assert (body["limit"], body["retry_after"]) == ("token", 10)
    assert "from testclient" in body["detail"]  # the peer address of Starlette's test client
    assert limits_of(r) == ({"token_source": {"q": "100", "w": "10"},
                             "token": {"q": "2", "w": "20"}},
                            {"token_source": {"r": "97", "t": "1"},
                             "token": {"r": "0", "t": "20"}})
    r = api.http.post("/oauth/token", auth=(second, secret2), data=form)
    assert r.status_code == 200 and limits_of(r)[1]["token"] == {"r": "1", "t": "10"}


def from_address(api: Api, address: str) -> TestClient:
    """The same app and runtime, seen from another peer address."""
    return TestClient(api.http.app, raise_server_exceptions=False, client=(address, 40000))


def test_wrong_secrets_from_one_address_do_not_lock_the_owner_out_of_another(start):
    api = start(rate_token="6/m burst 2")
    meta = metadata.connect(api.settings.data_dir)
    owner, secret = create_client(meta, "owner", "analytics:read")
    meta.close()
    form = {"grant_type": "client_credentials"}
    attacker = from_address(api, "203.0.113.9")
    statuses = [attacker.post("/oauth/token", auth=(owner, f"guess-{k}"), data=form).status_code
                for k in range(60)]
    assert statuses == [401, 401] + [429] * 58
    assert attacker.post("/oauth/token", auth=(owner, secret), data=form).status_code == 429
    for _ in range(2):  # the owner, from its own address, still gets its burst of tokens
        assert api.http.post("/oauth/token", auth=(owner, secret), data=form).status_code == 200


def test_token_requests_from_one_address_are_limited_whatever_the_id(start):
    api = start(rate_token_source="6/m burst 5")
    meta = metadata.connect(api.settings.data_dir)
    owner, secret = create_client(meta, "owner", "analytics:read")
    meta.close()
    form = {"grant_type": "client_credentials"}
    attacker = from_address(api, "198.51.100.7")
    assert attacker.post("/oauth/token", data={}).status_code == 400  # malformed ones count too
    for k in range(4):
        assert attacker.post("/oauth/token", auth=(f"cl_unknown{k}", "x"),
                             data=form).status_code == 401
    r = attacker.post("/oauth/token", auth=("cl_unknown9", "x"), data=form)
    body = problem(r, 429)
    assert (body["limit"], body["retry_after"]) == ("token_source", 10)
    assert "token requests from 198.51.100.7" in body["detail"]
    assert r.headers["Retry-After"] == "10"
    # another address is not touched by it
    assert api.http.post("/oauth/token", auth=("cl_unknown9", "x"), data=form).status_code == 401
    assert api.http.post("/oauth/token", auth=(owner, secret), data=form).status_code == 200
    api.clock.now += 10  # a token later, the address may ask again
    assert attacker.post("/oauth/token", auth=(owner, secret), data=form).status_code == 200


# -- rows ----------------------------------------------------------------------------------

def webhook_lag(api: Api, headers: dict[str, str], start_day: str) -> httpx.Response:
    """A query that reads the events table once (no rollup): it scans every event."""
    return api.ts(headers, metric="webhook_lag_p95", granularity="1d", **{"from": start_day})


def scanned_total(api: Api) -> float:
    for line in api.http.get("/metrics").text.splitlines():
        if line.startswith("tally_rows_scanned_total "):
            return float(line.split()[1])
    raise AssertionError("tally_rows_scanned_total is not exported")


def test_rows_per_request_is_refused_before_running(start):
    api = start(max_rows_per_request=1)
    headers = api.token()
    events = [make_event(occurred_at=f"2025-10-23T{h:02d}:00:00Z") for h in range(24)]
    assert api.http.post("/v1/events:batch", headers=headers,
                         json=events).status_code == 202
    before = scanned_total(api)
    body = problem(webhook_lag(api, headers, "2025-10-01"), 422)
    assert body["limit"] == "rows_per_request" and body["max_rows"] == 1
    estimate = body["estimated_rows"]
    assert 1 < estimate <= 24
    assert scanned_total(api) == before  # refused before anything ran

    limits = api.runtime.limits
    limits.policy = dataclasses.replace(limits.policy, max_rows_per_request=estimate)
    r = webhook_lag(api, headers, "2025-10-01")  # at the limit
    assert r.status_code == 200, r.text
    assert scanned_total(api) == before + 24  # and it read every event once
    api.runtime.answers = AnswerCache()  # so that the same question runs again
    limits.policy = dataclasses.replace(limits.policy, max_rows_per_request=estimate - 1)
    assert problem(webhook_lag(api, headers, "2025-10-01"), 422)["estimated_rows"] == estimate


def test_rows_per_day_quota_per_client(start):
    api = start(rows_per_day=100)
    headers = api.token()
    events = [make_event(occurred_at=f"2025-10-23T{i % 24:02d}:{i // 24:02d}:00Z")
              for i in range(40)]
    assert api.http.post("/v1/events:batch", headers=headers,
                         json=events).status_code == 202
    before = scanned_total(api)
    # 40 rows each (distinct ranges: no cached answers): 0, 40, 80 used before → allowed
    for day in ("2025-10-01", "2025-10-02", "2025-10-03"):
        assert webhook_lag(api, headers, day).status_code == 200
    assert scanned_total(api) == before + 120
    r = webhook_lag(api, headers, "2025-10-04")
    body = problem(r, 429)
    expected = 86_400 - int(time.time()) % 86_400  # until the next 00:00 UTC
    assert (body["limit"], body["used"], body["quota"]) == ("rows_per_day", 120, 100)
    assert abs(int(r.headers["Retry-After"]) - expected) <= 2
    assert body["retry_after"] == int(r.headers["Retry-After"])
    assert scanned_total(api) == before + 120  # the refused request read nothing
    # an answer already cached scans nothing and is still served; another client has its own
    assert webhook_lag(api, headers, "2025-10-01").status_code == 200
    assert webhook_lag(api, api.token(), "2025-10-04").status_code == 200


# -- Redis ---------------------------------------------------------------------------------


def test_the_redis_of_the_tests_is_their_own(redis_server):
    """Started for this session: its files in a temporary directory, none persisted, and not
    the machine's Redis on 6379."""
    client = redis.Redis.from_url(redis_server, decode_responses=True)
    config = client.config_get("*")
    client.close()
    assert Path(config["dir"]).is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert config["save"] == "" and config["appendonly"] == "no" and config["port"] != "6379"
    assert Path(config["logfile"]).parent == Path(config["dir"])


@pytest.fixture
def prefix(redis_server: str) -> Iterator[str]:
    """A key prefix of this test only; its keys are removed afterwards."""
    name = f"tally-test-{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(redis_server)
    keys = list(client.scan_iter(match=f"{name}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["local", "redis"])
def limiter(request) -> Iterator[Any]:
    if request.param == "local":
        yield LocalRateLimiter(clock=Clock())
        return
    name = request.getfixturevalue("prefix")
    limiter = RedisRateLimiter(redis_client(request.getfixturevalue("redis_server")), name)
    yield limiter
    limiter.close()


def test_buckets_take_all_or_nothing(limiter):
    slow = Rate(1 / 600, 3)  # a token every 10 minutes: no refill during the test
    a, b = Bucket("brand", "a", slow), Bucket("region", "b", Rate(1 / 600, 1))
    assert limiter.acquire([a]).allowed
    first = limiter.acquire([a, b])
    assert first.allowed and [s.remaining for s in first.states] == [1, 0]
    refused = limiter.acquire([a, b])  # b is empty: a keeps its token
    assert not refused.allowed and refused.denied_by is not None
    assert refused.denied_by.bucket == b and 595 <= refused.denied_by.retry_after <= 600
    assert [s.remaining for s in refused.states] == [1, 0]
    decision = limiter.acquire([a])
    assert decision.allowed and decision.states[0].remaining == 0
    assert decision.states[0].reset in (1800, 1799)  # 3 tokens at 600 s each
    assert not limiter.acquire([a]).allowed
    if isinstance(limiter, RedisRateLimiter):  # expires once it would be full again
        ttl = limiter.client.pttl(f"{limiter.prefix}rl:brand:a")
        assert 1_799_000 < ttl <= 1_801_000


def test_local_buckets_forget_full_buckets():
    clock = Clock()
    limiter = LocalRateLimiter(clock=clock)
    rate = Rate(1, 2)
    for i in range(PRUNE_EVERY - 1):
        limiter.acquire([Bucket("client", str(i), rate)])
    assert len(limiter._buckets) == PRUNE_EVERY - 1
    clock.now += 1  # every bucket is full again
    limiter.acquire([Bucket("client", "last", rate)])  # the sweep
    assert list(limiter._buckets) == ["client:last"]


def test_redis_rows_ledger_is_shared(redis_server, prefix):
    one, two = redis.Redis.from_url(redis_server), redis.Redis.from_url(redis_server)
    a = RedisRowsLedger(one, prefix, warn=print)
    b = RedisRowsLedger(two, prefix, warn=print)
    a.add("c1", 20_000, 70)
    b.add("c1", 20_000, 30)
    b.add("c1", 20_001, 5)
    assert (a.used("c1", 20_000), b.used("c1", 20_000), a.used("c1", 20_001)) == (100, 100, 5)
    assert a.used("c2", 20_000) == 0
    assert 0 < one.ttl(f"{prefix}rows:c1:20000") <= 2 * 86_400
    one.close()
    two.close()


def test_a_redis_that_stops_answering_lets_requests_through(caplog):
    dead = redis_client(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RedisRateLimiter(dead, "tally-test:")
    decision = limiter.acquire([Bucket("client", "c", Rate(1, 1))])
    assert decision.allowed and decision.states == ()
    assert "Redis unavailable" in caplog.text
    ledger = RedisRowsLedger(dead, "tally-test:", warn=limiter.warn)
    assert ledger.used("c", 1) == 0
    ledger.add("c", 1, 10)  # lost, not raised


@pytest.mark.slow
def test_serve_refuses_to_start_when_redis_is_unreachable(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    out = cli("serve", "--port", "0", data_dir=tmp_path / "data", env={"TALLY_REDIS_URL": url})
    assert out.returncode != 0
    assert "cannot reach Redis" in out.stderr and "Traceback" not in out.stderr
    assert "hunter2" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_servers_share_their_limits_through_redis(tmp_path, redis_server, prefix):
    env = {"TALLY_REDIS_URL": redis_server, "TALLY_REDIS_PREFIX": prefix,
           "TALLY_RATE_CLIENT": "1/m burst 6", "TALLY_RATE_BRAND": "1/m burst 4"}
    first_dir, second_dir = tmp_path / "one" / "data", tmp_path / "two" / "data"
    reader = new_client(first_dir)
    producer = new_client(first_dir)
    servers: list[Server] = []
    try:
        servers.append(Server(first_dir, env))  # creates the signing key
        second_dir.mkdir(parents=True)
        # replicas share their metadata (clients, signing keys); the copy stands in for that
        source = sqlite3.connect(first_dir / "meta.sqlite3")
        target = sqlite3.connect(second_dir / "meta.sqlite3")
        source.backup(target)
        source.close()
        target.close()
        servers.append(Server(second_dir, env))
        urls = [server.url for server in servers]

        headers = token(urls[0], *reader)
        remaining = []
        for k in range(6):  # alternating: 3 on each server, one bucket between them
            r = httpx.get(f"{urls[k % 2]}/v1/schemas", headers=headers)
            assert r.status_code == 200, r.text
            remaining.append(int(structured(r.headers["RateLimit"])["client"]["r"]))
        assert remaining == [5, 4, 3, 2, 1, 0]
        for url in urls:  # one past the limit, on either server
            r = httpx.get(f"{url}/v1/schemas", headers=headers)
            assert r.status_code == 429, r.text
            assert r.json()["limit"] == "client"
            assert 50 <= int(r.headers["Retry-After"]) <= 60
            assert structured(r.headers["RateLimit"])["client"]["r"] == "0"

        headers = token(urls[1], *producer)  # brand buckets are shared the same way
        statuses = []
        for k in range(5):
            batch = [make_event(tenant_id="brand-shared")]
            r = httpx.post(f"{urls[k % 2]}/v1/events:batch", json=batch, headers=headers)
            statuses.append((r.status_code, r.json().get("limit")))
        assert statuses == [(202, None)] * 4 + [(429, "brand")]
    finally:
        for server in servers:
            server.stop()

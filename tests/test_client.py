"""tally-client against a real ``tally serve`` process: tokens, batched idempotent ingestion
with retries across a server crash, every query route with typed answers checked against
answers computed here from the events sent, pagination, problems as exceptions, ETag
revalidation; the package's README examples; its wheel in a fresh environment; and
``tally demo --url``. Pure parts (batch splitting, retry decisions, problem decoding) are
tested directly at the end."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tally.config import Settings
from tally.demo.load import load_demo
from tally_client import (
    NO_RETRY,
    AsyncTallyClient,
    BadRequest,
    Conflict,
    Forbidden,
    FxRate,
    NotModified,
    PayloadTooLarge,
    RateLimited,
    RetryPolicy,
    ServiceUnavailable,
    TallyClient,
    TallyProblem,
    Timeseries,
    Unauthorized,
    Unprocessable,
)
from tally_client.batching import split
from tally_client.problems import problem_from, retry_after
from tests.conftest import make_event
from tests.server import TALLY, Server, cli, new_client
from tests.stores import rows as stored_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BRANDS = ["brand-c1", "brand-c2", "brand-c3"]
GBP = Decimal("1.15")
LIMITS = {"TALLY_MAX_BATCH_EVENTS": "100", "TALLY_MAX_BATCH_BYTES": "65536"}
# (brand, currency, game, stake, win, day of October 2025, player)
BETS = [
    ("brand-c1", "EUR", "g1", 1000, 400, 1, "q1"),
    ("brand-c1", "EUR", "g2", 2500, 2600, 1, "q2"),
    ("brand-c1", "EUR", "g1", 700, 0, 2, "q1"),
    ("brand-c1", "EUR", "g3", 300, 150, 3, "q3"),
    ("brand-c2", "GBP", "g1", 1000, 500, 1, "q4"),  # exact in EUR: no rounding question
    ("brand-c2", "EUR", "g2", 400, 100, 2, "q5"),
    ("brand-c3", "EUR", "g3", 900, 300, 1, "r1"),  # r1..r3: a first-deposit cohort
    ("brand-c3", "EUR", "g3", 300, 500, 2, "r2"),
]


def at(day: int, hour: int = 12, minute: int = 0) -> str:
    return f"2025-10-{day:02d}T{hour:02d}:{minute:02d}:00Z"


def event(event_type: str, brand: str, player: str, when: str, **payload: Any) -> dict:
    return {"event_id": uuid.uuid4().hex, "event_type": event_type, "occurred_at": when,
            "tenant_id": brand, "region": "EU", "player_id": player, "schema_version": "1.0.0",
            "payload": payload}


def dataset() -> list[dict]:
    events = [event("bet.settled", b, p, at(d), bet_id=uuid.uuid4().hex, stake_minor=s,
                    win_minor=w, currency=c, game_id=g, provider_id="studio")
              for b, c, g, s, w, d, p in BETS]
    events.append(event("bet.settled", "brand-c3", "late", at(5), bet_id="late",
                        stake_minor=0, win_minor=0, currency="EUR", game_id="g9",
                        provider_id="studio"))  # moves brand-c3's watermark past the cohorts
    for n, player in enumerate(["f1", "f2", "f3"]):
        events.append(event("payment.intent", "brand-c1", player, at(1, 10), payment_id=player,
                            amount_minor=1000, currency="EUR", method="card"))
        if n < 2:
            events.append(event("payment.captured", "brand-c1", player, at(1, 10, 5 + 10 * n),
                                payment_id=player, amount_minor=1000, currency="EUR",
                                method="card"))
    for player in ["r1", "r2", "r3"]:
        events.append(event("wallet.credit", "brand-c3", player, at(1, 9), amount_minor=5000,
                            currency="EUR", reason="deposit"))
    for hour, player in [(10, "r1"), (11, "r2")]:
        events.append(event("bet.placed", "brand-c3", player, at(2, hour), bet_id=player,
                            stake_minor=100, currency="EUR", game_id="g3", provider_id="studio"))
    return events


def eur(amount: int, currency: str) -> Decimal:
    return Decimal(amount) * (GBP if currency == "GBP" else 1)


def expected_ggr() -> dict[tuple[int, str], int]:
    """ggr by (day, brand): each (bucket, currency) sum converted, rounded half-to-even."""
    sums: dict[tuple[int, str, str], int] = defaultdict(int)
    for brand, currency, _, stake, win, day, _ in BETS:
        sums[day, brand, currency] += stake - win
    out: dict[tuple[int, str], int] = defaultdict(int)
    for (day, brand, currency), total in sums.items():
        out[day, brand] += int(eur(total, currency).quantize(Decimal(1), ROUND_HALF_EVEN))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server holding :func:`dataset` (and a GBP rate), and the admin's credentials."""
    data = tmp_path_factory.mktemp("client") / "data"
    admin = new_client(data, scopes="events:write analytics:read exports:write admin")
    server = Server(data, env=LIMITS)
    with TallyClient(server.url, client_id=admin[0], client_secret=admin[1],
                     max_batch_events=100, max_batch_bytes=65536) as tally:
        tally.add_fx_rates([FxRate(date=date(2025, 10, 1), currency="GBP", rate=GBP)])
        result = tally.ingest(dataset())
        assert (result.accepted, result.rejected) == (len(dataset()), 0)
    yield server, admin
    server.stop()


@pytest.fixture
def tally(served):
    server, (client_id, secret) = served
    with TallyClient(server.url, client_id=client_id, client_secret=secret,
                     max_batch_events=100, max_batch_bytes=65536) as client:
        yield client


def responses(url: str, status: int) -> float:
    """Responses with ``status`` the server counted (``GET /metrics``), over every route."""
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("tally_http_responses_total") and f'status="{status}"' in line)


# --- tokens ---------------------------------------------------------------------------------

def test_token_is_cached_renewed_before_expiry_and_on_a_401(served):
    server, (client_id, secret) = served
    now = [0.0]
    with TallyClient(server.url, client_id=client_id, client_secret=secret,
                     clock=lambda: now[0]) as tally:
        first = tally.token()
        assert first.token_type == "Bearer" and first.expires_in == 900
        assert set(first.scope.split()) == {"events:write", "analytics:read", "exports:write",
                                           "admin"}
        now[0] = 839.0  # within the lifetime less a tenth (at most 60 s): still the same
        assert tally.token() == first
        now[0] = 841.0
        second = tally.token()
        assert second.access_token != first.access_token
        # a token the server stops accepting (its signing key revoked) is replaced once
        assert cli("keys", "rotate", "--revoke", data_dir=server.data_dir).returncode == 0
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/v1/schemas", headers={
                "Authorization": f"Bearer {second.access_token}"}).status_code != 401:
            assert time.monotonic() < deadline, "the revoked key's tokens still work"
            time.sleep(0.1)
        before = responses(server.url, 401)
        assert tally.metrics().base_currency == "EUR"
        assert responses(server.url, 401) == before + 1  # one 401, then a new token
        assert tally.token().access_token not in (first.access_token, second.access_token)


def test_wrong_credentials_are_unauthorized_without_retrying(served):
    server, (client_id, _) = served
    before = responses(server.url, 401)
    with TallyClient(server.url, client_id=client_id, client_secret="wrong") as tally:
        with pytest.raises(Unauthorized) as caught:
            tally.metrics()
    problem = caught.value
    assert problem.status == 401 and problem.extra["error"] == "invalid_client"
    assert responses(server.url, 401) == before + 1


# --- ingestion ------------------------------------------------------------------------------

def test_ingest_splits_under_the_limits_and_indexes_errors_in_the_whole_list(tally, served):
    events = [make_event(tenant_id="brand-split") for _ in range(250)]
    events[177] = {**events[177], "event_type": "no.such"}
    result = tally.ingest(events)
    assert [r.accepted + r.rejected for r in result.receipts] == [100, 100, 50]
    assert (result.accepted, result.duplicates, result.rejected) == (249, 0, 1)
    assert [(e.index, e.event_id) for e in result.errors] == [(177, events[177]["event_id"])]
    # events of ~1.5 KB: the byte limit binds first, and no body is refused (no 413)
    padded = [make_event(tenant_id="brand-split", payload={
        **make_event()["payload"], "note": "x" * 1400}) for _ in range(120)]
    before = responses(served[0].url, 413)
    result = tally.ingest(padded)
    assert result.accepted == 120 and len(result.receipts) >= 3
    assert all(r.accepted <= 100 for r in result.receipts)
    assert responses(served[0].url, 413) == before
    assert tally.ingest(padded).duplicates == 120


class LosingProxy:
    """A TCP relay to the server that, when armed, drops the next response: the server has
    handled the request (a batch is stored) and the client's connection breaks before it
    hears so — the failure an idempotency key is for."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = threading.Event()
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        try:
            while data := source.recv(65536):
                if answers and self.armed.is_set():
                    self.armed.clear()
                    self.dropped += 1
                    break  # the answer is lost with the connection
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()


def test_a_batch_whose_receipt_was_lost_is_retried_with_its_key_and_counted_once(
        served, caplog):
    server, (client_id, secret) = served
    proxy = LosingProxy(server.port)
    events = [make_event(tenant_id="brand-lost") for _ in range(250)]
    try:
        with TallyClient(proxy.url, client_id=client_id, client_secret=secret,
                         max_batch_events=100, max_batch_bytes=65536) as tally:
            tally.token()
            proxy.armed.set()  # the first batch is stored, its receipt lost
            result = tally.ingest(events)

        async def again() -> Any:
            async with AsyncTallyClient(proxy.url, client_id=client_id,
                                        client_secret=secret) as client:
                await client.token()
                proxy.armed.set()
                return await client.ingest([make_event(tenant_id="brand-lost")])

        later = asyncio.run(again())
    finally:
        proxy.close()
    assert proxy.dropped == 2
    assert (result.accepted, result.duplicates, len(result.receipts)) == (250, 0, 3)
    assert (later.accepted, later.duplicates) == (1, 0)
    assert sum("RemoteProtocolError" in r.getMessage() for r in caplog.records
               if r.name == "tally_client") == 2


def test_ingestion_survives_a_server_crash_with_nothing_lost_or_doubled(tmp_path, caplog):
    """A producer ingests while the server is killed (SIGKILL) and restarted on its port: the
    client retries each batch with its key, so every event is stored once and the receipts
    add up to exactly the events sent (a batch stored before the crash is replayed, not
    counted as duplicates). A key sent before the crash replays its receipt after it."""
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data)
    events = [make_event(event_id=f"crash-{n}", tenant_id="brand-crash") for n in range(4000)]
    keyed = [make_event(tenant_id="brand-idem") for _ in range(20)]
    with TallyClient(server.url, client_id=creds[0], client_secret=creds[1]) as tally:
        first = tally.send_batch(keyed, idempotency_key="batch-1")
    outcome: dict[str, Any] = {}

    def produce() -> None:
        with TallyClient(server.url, client_id=creds[0], client_secret=creds[1],
                         max_batch_events=200, timeout=10,
                         retry=RetryPolicy(attempts=200, backoff=0.05, max_backoff=0.25)) as c:
            try:
                outcome["result"] = c.ingest(events)
            except Exception as exc:  # reported by the assertion below
                outcome["error"] = exc

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        deadline = time.monotonic() + 60
        while _accepted(server.url) < 1000:  # mid-way, with requests in flight
            assert time.monotonic() < deadline and producer.is_alive()
            time.sleep(0.02)
        server.kill()
        server = Server(data, port=server.port)
        producer.join(timeout=120)
        with TallyClient(server.url, client_id=creds[0], client_secret=creds[1]) as tally:
            again = tally.send_batch(keyed, idempotency_key="batch-1")
            assert again == first and first.accepted == 20  # same counts, same trace_id
            assert tally.send_batch(keyed).duplicates == 20  # another key: duplicates
            with pytest.raises(Unprocessable):  # the key with another body
                tally.send_batch(keyed[:5], idempotency_key="batch-1")
    finally:
        server.stop()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert (result.accepted, result.duplicates, result.rejected) == (4000, 0, 0)
    assert any("try" in r.getMessage() for r in caplog.records if r.name == "tally_client")
    counts = dict(stored_rows(data, "SELECT event_id, count(*) FROM events "
                                    "WHERE tenant_id = 'brand-crash' GROUP BY event_id"))
    assert len(counts) == 4000 and set(counts.values()) == {1}


def _accepted(url: str) -> float:
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.TransportError:
        return 0.0
    match = re.search(r'tally_ingest_events_total\{outcome="accepted"\} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_429_is_waited_for_as_retry_after_says(tmp_path):
    data = tmp_path / "data"
    creds = new_client(data)
    server = Server(data, env={"TALLY_RATE_CLIENT": "1/s burst 1"})
    try:
        with TallyClient(server.url, client_id=creds[0], client_secret=creds[1]) as tally:
            tally.schemas()
            started = time.monotonic()
            assert tally.metrics().metrics  # refused once (429, Retry-After: 1), then served
            assert time.monotonic() - started >= 0.9
            assert responses(server.url, 429) == 1
        impatient = RetryPolicy(max_retry_after=0.5)
        for policy in (NO_RETRY, impatient):
            with TallyClient(server.url, client_id=creds[0], client_secret=creds[1],
                             retry=policy) as tally:
                tally.token()
                time.sleep(1.1)  # the bucket refills (1/s)
                tally.schemas()
                started = time.monotonic()
                with pytest.raises(RateLimited) as caught:
                    tally.schemas()
                assert time.monotonic() - started < 0.5
                assert caught.value.retry_after >= 1 and caught.value.extra["limit"] == "client"
    finally:
        server.stop()


# --- queries: typed answers against answers computed from the events sent ----------------

FROM, TO = date(2025, 10, 1), date(2025, 10, 4)
MINE = {"brand_id": BRANDS}


def test_timeseries_money_and_counts(tally):
    ggr = expected_ggr()
    answer = tally.timeseries("ggr", "1d", FROM, TO, filters=MINE, group_by="brand_id")
    assert answer.currency == "EUR" and answer.next_cursor is None
    assert [(p.ts, p.group["brand_id"], p.value_minor) for p in answer.series] == [
        (datetime(2025, 10, d, tzinfo=UTC), b, ggr.get((d, b), 0))
        for d in (1, 2, 3) for b in BRANDS]
    assert all(type(p.value_minor) is int and p.ts.tzinfo == UTC for p in answer.series)
    assert answer.watermark is not None and answer.watermark.tzinfo == UTC
    bets = tally.timeseries("bets", "1d", FROM, TO, filters=MINE)
    assert [p.value for p in bets.series] == [
        sum(1 for b in BETS if b[5] == d) for d in (1, 2, 3)]
    assert all(type(p.value) is int and p.value_minor is None for p in bets.series)


def test_slices_rank_money_and_ratios(tally):
    answer = tally.slice("ggr", "game_id", FROM, TO, filters=MINE)
    by_game: dict[str, int] = defaultdict(int)
    for brand, currency, game, stake, win, _, _ in BETS:  # one currency per game and day here
        by_game[game] += int(eur(stake - win, currency).quantize(Decimal(1), ROUND_HALF_EVEN))
    ranked = sorted(by_game.items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(i.key, i.value_minor) for i in answer.items] == ranked
    rtp = tally.slice("rtp", "brand_id", FROM, TO, filters=MINE, order="value")
    stakes: dict[str, Decimal] = defaultdict(Decimal)
    wins: dict[str, Decimal] = defaultdict(Decimal)
    for brand, currency, _, stake, win, _, _ in BETS:
        stakes[brand] += eur(stake, currency)
        wins[brand] += eur(win, currency)
    ratios = sorted((float(wins[b] / stakes[b]), b) for b in BRANDS)
    assert [i.key for i in rtp.items] == [b for _, b in ratios]
    assert [i.value for i in rtp.items] == pytest.approx([r for r, _ in ratios], rel=1e-12)
    assert all(type(i.value) is float for i in rtp.items)


def test_pages_are_followed_to_the_end(tally):
    whole = tally.timeseries("ggr", "1d", FROM, TO, filters=MINE, group_by="brand_id")
    first = tally.timeseries("ggr", "1d", FROM, TO, filters=MINE, group_by="brand_id", limit=4)
    assert first.series == whole.series[:4] and first.next_cursor is not None
    assert list(tally.iter_timeseries("ggr", "1d", FROM, TO, filters=MINE,
                                      group_by=["brand_id"], page_size=4)) == whole.series
    items = tally.slice("ggr", "game_id", FROM, TO, filters=MINE).items
    assert list(tally.iter_slice("ggr", "game_id", FROM, TO, filters=MINE,
                                 page_size=2)) == items


def test_funnel_retention_and_ltv(tally):
    funnel = tally.funnel(["payment.intent", {"event": "payment.captured", "name": "paid"}],
                          window_sec=3600, from_=FROM, to=TO,
                          filters={"brand_id": ["brand-c1"]})
    assert funnel.total == 3
    assert [(s.name, s.count) for s in funnel.steps] == [("payment.intent", 3), ("paid", 2)]
    assert funnel.steps[1].rate == pytest.approx(2 / 3)
    assert funnel.steps[1].median_sec == 300.0  # of 300 s and 900 s, nearest-rank
    retention = tally.retention("first_deposit", "2025-10-01", date(2025, 10, 1),
                                days=[1, 30], filters={"brand_id": "brand-c3"})
    [row] = retention.rows
    assert (row.cohort_date, row.size) == (date(2025, 10, 1), 3)
    assert row.days[1] == pytest.approx(2 / 3) and row.days[30] is None
    ltv = tally.ltv(FROM, FROM, horizon=3, metric="ggr", filters={"brand_id": "brand-c3"})
    [cohort] = ltv.cohorts
    # r1: ggr 600 on day 0, r2: -200 on day 1, r3: nothing; per member of 3, rounded
    assert (cohort.date, cohort.size, cohort.ltv_minor) == (FROM, 3, [200, 133, 133])
    assert all(type(v) is int for v in cohort.ltv_minor)


def test_catalog_schemas_fx_quarantine_and_audit(tally):
    catalog = tally.metrics()
    by_name = {m.name: m for m in catalog.metrics}
    assert by_name["ggr"].answer_field == "value_minor" and by_name["rtp"].unit == "ratio"
    registry = tally.schemas()
    assert "bet.settled" in {s.event_type for s in registry.event_types}
    rates = tally.fx_rates()
    assert rates.base_currency == "EUR"
    assert FxRate(date=date(2025, 10, 1), currency="GBP", rate=GBP) in rates.rates
    again = tally.add_fx_rates([FxRate(date=date(2025, 10, 1), currency="GBP", rate=GBP)])
    assert (again.inserted, again.unchanged) == (0, 1)
    bad = [{**make_event(tenant_id="brand-q"), "event_type": f"bad.{n}"} for n in range(3)]
    assert tally.ingest(bad).rejected == 3
    listed = list(tally.iter_quarantine(brand_id="brand-q", page_size=1))
    assert [item.event for item in listed] == bad
    assert all(item.received_at.tzinfo == UTC and "bad." in item.reason for item in listed)
    entries = list(tally.iter_audit(page_size=3))
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1)) and len(entries) > 5
    assert tally.audit(limit=5).items == entries[:5]
    prev = "0" * 64
    for entry in entries:  # the chain, recomputed from the entries as returned
        body = {k: v for k, v in entry.raw.items() if k != "hash"}
        digest = hashlib.sha256(msgspec.json.encode(body, order="sorted")).hexdigest()
        assert (entry.prev, entry.hash) == (prev, digest)
        prev = digest
    assert tally.verify_audit().intact


# --- problems and revalidation ----------------------------------------------------------

def test_problems_are_typed_exceptions_and_4xx_are_not_retried(tally, served):
    server, _ = served
    before = responses(server.url, 400)
    with pytest.raises(BadRequest) as caught:
        tally.slice("ggr", "no_such_dim", FROM, TO)
    problem = caught.value
    assert isinstance(problem, TallyProblem) and problem.status == 400
    assert problem.type.startswith("http") and "no_such_dim" in problem.detail
    assert problem.trace_id and problem.title
    assert responses(server.url, 400) == before + 1
    with pytest.raises(PayloadTooLarge):
        tally.send_batch([make_event() for _ in range(101)])
    with pytest.raises(Conflict):
        tally.add_fx_rates([FxRate(date=date(2025, 10, 1), currency="GBP",
                                   rate=Decimal("2"))])
    reader = new_client(server.data_dir, scopes="analytics:read")
    with TallyClient(server.url, client_id=reader[0], client_secret=reader[1]) as client:
        with pytest.raises(Forbidden):
            client.ingest([make_event()])
    with pytest.raises(ValueError, match="naive"):
        tally.timeseries("ggr", "1d", datetime(2025, 10, 1), TO)


ROUTES = {
    "timeseries": lambda t, **kw: t.timeseries("ggr", "1d", FROM, TO, filters=MINE, **kw),
    "slice": lambda t, **kw: t.slice("ggr", "game_id", FROM, TO, **kw),
    "funnel": lambda t, **kw: t.funnel(["payment.intent", "payment.captured"],
                                       window_sec=600, from_=FROM, to=TO, **kw),
    "retention": lambda t, **kw: t.retention("first_deposit", FROM, FROM, days=[1], **kw),
    "ltv": lambda t, **kw: t.ltv(FROM, FROM, horizon=2, **kw),
}


@pytest.mark.parametrize("route", ROUTES)
def test_if_none_match_answers_not_modified(tally, route):
    answer = ROUTES[route](tally)
    assert answer.etag
    again = ROUTES[route](tally, if_none_match=answer.etag)
    assert again == NotModified(etag=answer.etag, watermark=answer.watermark)


def test_a_new_event_in_range_changes_the_answer_and_its_etag(tally):
    def ggr(**kw):
        return tally.timeseries("ggr", "1d", FROM, TO, filters={"brand_id": "brand-e"}, **kw)

    bet = make_event(tenant_id="brand-e", occurred_at=at(2))
    tally.ingest([bet])
    first = ggr()
    assert isinstance(ggr(if_none_match=first.etag), NotModified)
    tally.ingest([make_event(tenant_id="brand-e", occurred_at=at(2))])
    changed = ggr(if_none_match=first.etag)
    assert isinstance(changed, Timeseries) and changed.etag != first.etag
    assert [p.value_minor for p in changed.series] == [0, 100, 0]  # two bets of 500 − 450


def test_the_async_client_gives_the_same_answers(tally, served):
    server, (client_id, secret) = served

    async def run():
        async with AsyncTallyClient(server.url, client_id=client_id,
                                    client_secret=secret) as client:
            result = await client.ingest([make_event(tenant_id="brand-async")])
            series = await client.timeseries("ggr", "1d", FROM, TO, filters=MINE,
                                             group_by="brand_id")
            paged = [p async for p in client.iter_timeseries(
                "ggr", "1d", FROM, TO, filters=MINE, group_by="brand_id", page_size=4)]
            audit = [e async for e in client.iter_audit(page_size=2)]
            with pytest.raises(BadRequest):
                await client.timeseries("no_such_metric", "1d", FROM, TO)
            return result, series, paged, audit

    result, series, paged, audit = asyncio.run(run())
    assert result.accepted == 1
    assert series.series == paged == tally.timeseries(
        "ggr", "1d", FROM, TO, filters=MINE, group_by="brand_id").series
    assert [e.seq for e in audit[:4]] == [1, 2, 3, 4]


# --- the package: README examples, a wheel of its own, the demo path ---------------------

def test_the_readme_examples_run(served, monkeypatch):
    server, (client_id, secret) = served
    monkeypatch.setenv("TALLY_URL", server.url)
    monkeypatch.setenv("TALLY_CLIENT_ID", client_id)
    monkeypatch.setenv("TALLY_CLIENT_SECRET", secret)
    for path, least in [("clients/python/README.md", 6), ("README.md", 1)]:
        blocks = re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)
        assert len(blocks) >= least
        session: dict[str, Any] = {"__name__": "readme"}  # one after another, like a session
        for block in blocks:
            exec(compile(block, path, "exec"), session)


def test_the_wheel_installs_and_works_on_its_own(served, tmp_path):
    uv = shutil.which("uv") or str(ROOT / ".tools" / "bin" / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed (make installs it)")
    server, (client_id, secret) = served
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}

    def run(*args: str | Path, **extra: str) -> str:
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              timeout=120, env={**env, **extra})
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(uv, "build", "--wheel", "--out-dir", tmp_path / "dist", ROOT / "clients" / "python")
    [wheel] = (tmp_path / "dist").glob("tally_client-*.whl")
    run(uv, "venv", "--quiet", "--python", sys.executable, tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    run(uv, "pip", "install", "--quiet", "--python", python, wheel)  # deps: PyPI or cache
    script = ("import importlib.util, tally_client\n"
              "assert importlib.util.find_spec('tally') is None\n"
              "with tally_client.TallyClient.from_env() as c:\n"
              "    print(tally_client.__version__, c.metrics().base_currency)\n")
    out = run(python, "-c", script, TALLY_URL=server.url, TALLY_CLIENT_ID=client_id,
              TALLY_CLIENT_SECRET=secret)
    assert out.split() == ["0.1.0", "EUR"]


def test_demo_url_sends_the_in_process_demo_through_the_client(tmp_path):
    """``tally demo --url`` stores what ``tally demo --data-dir`` stores (same seed)."""
    for _ in range(2):  # the demo ends at the current hour: again if the hour turned
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        local, remote = tmp_path / f"local-{hour:%H}", tmp_path / f"remote-{hour:%H}"
        here = load_demo(Settings(data_dir=local), events=3000, days=3, seed=7)  # the default
        creds = new_client(remote, scopes="events:write admin")
        server = Server(remote)
        try:
            sent = subprocess.run(
                [TALLY, "demo", "--events", "3000", "--days", "3", "--json", "--url",
                 server.url], capture_output=True, text=True, timeout=120,
                env={**os.environ, "TALLY_CLIENT_ID": creds[0],
                     "TALLY_CLIENT_SECRET": creds[1]})
        finally:
            server.stop()
        if datetime.now(UTC).replace(minute=0, second=0, microsecond=0) == hour:
            break
    assert sent.returncode == 0, sent.stderr
    there = msgspec.json.decode(sent.stdout)
    for key in ("events_generated", "accepted", "duplicates", "rejected"):
        assert here[key] == there[key], key
    assert there["fx_rates"].endswith("set, 0 already there")
    assert _store(local) == _store(remote)


def _store(data: Path) -> tuple:
    ids = stored_rows(data, "SELECT tenant_id, event_id, event_type, occurred_at, stake_minor "
                            "FROM events ORDER BY tenant_id, event_id")
    rates = stored_rows(data, "SELECT day, currency, rate FROM fx_rates "
                              "ORDER BY day, currency, rate")
    return ids, rates


def test_demo_url_errors_are_one_line(served):
    server, (client_id, _) = served
    for env, expected in [({}, "needs --client-id"),
                          ({"TALLY_CLIENT_ID": client_id, "TALLY_CLIENT_SECRET": "wrong"},
                           "401 Unauthorized: unknown client or wrong secret")]:
        out = subprocess.run([TALLY, "demo", "--events", "10", "--url", server.url],
                             capture_output=True, text=True, timeout=60,
                             env={**{k: v for k, v in os.environ.items()
                                     if not k.startswith("TALLY_CLIENT")}, **env})
        assert out.returncode == 2 and expected in out.stderr, out.stderr
        assert out.stderr.startswith("tally: ") and out.stderr.count("\n") == 1


# --- pure parts ---------------------------------------------------------------------------

def test_split_keeps_order_and_both_limits():
    events = [{"n": n, "pad": "x" * (n % 7) * 10} for n in range(1000)]
    bodies = list(split(events, max_events=64, max_bytes=2000))
    decoded = [msgspec.json.decode(b.content) for b in bodies]
    assert [e for batch in decoded for e in batch] == events
    assert all(len(batch) <= 64 and len(b.content) <= 2000
               for batch, b in zip(decoded, bodies))
    assert [b.first for b in bodies] == [sum(map(len, decoded[:i])) for i in range(len(bodies))]
    assert len(bodies) == len(list(split(events, 10_000, 2000)))  # bytes bind here
    with pytest.raises(ValueError, match="event 1 "):
        list(split([{"a": 1}, {"a": "x" * 3000}], max_bytes=2000))


def _response(status: int, headers: dict[str, str] | None = None,
              body: bytes = b"") -> httpx.Response:
    return httpx.Response(status, headers=headers, content=body,
                          request=httpx.Request("GET", "http://tally.test/v1/metrics"))


def test_retry_decisions():
    policy = RetryPolicy(attempts=3, backoff=1, max_backoff=8, max_retry_after=30)
    assert policy.delay(1, _response(503, {"Retry-After": "7"})) == 7
    assert policy.delay(1, _response(429, {"Retry-After": "120"})) is None  # too long
    assert policy.delay(3, _response(503, {"Retry-After": "1"})) is None  # no tries left
    for status in (400, 401, 403, 404, 409, 413, 422, 500):
        assert policy.delay(1, _response(status)) is None, status
    assert 0.5 <= policy.delay(1, httpx.ConnectError("refused")) <= 1
    assert 1 <= policy.delay(2, _response(502)) <= 2
    assert policy.delay(1, httpx.UnsupportedProtocol("ftp")) is None
    when = (datetime.now(UTC) + timedelta(seconds=20)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 18 <= retry_after(_response(503, {"Retry-After": when})) <= 20


def test_problems_are_chosen_by_status_not_by_type():
    body = msgspec.json.encode({"type": "https://example.com/any", "title": "Service "
                                "Unavailable", "status": 503, "detail": "backlog",
                                "limit": "backlog", "trace_id": "t1"})
    problem = problem_from(_response(503, {"Retry-After": "3"}, body))
    assert isinstance(problem, ServiceUnavailable) and problem.retry_after == 3
    assert (problem.type, problem.detail, problem.trace_id) == (
        "https://example.com/any", "backlog", "t1")
    assert problem.extra == {"limit": "backlog"}
    proxy = problem_from(_response(502, {"X-Trace-Id": "t2"}, b"<html>bad gateway</html>"))
    assert proxy.status == 502 and "bad gateway" in proxy.detail and proxy.trace_id == "t2"

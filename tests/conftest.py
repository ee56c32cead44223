"""Shared fixtures: a real store in a temp dir, the real app in-process, real tokens."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tests.kafka_broker import KafkaBroker
from tests.redis_server import RedisServer

# The suite checks answers right after ingesting: queries wait for the applier (bounded by
# TALLY_READ_YOUR_WRITES_MS, 500 ms by default) as long as a loaded CI machine may need. Tests
# of the bound itself set it explicitly. Server processes inherit it.
os.environ.setdefault("TALLY_READ_YOUR_WRITES_MS", "30000")

# The store every test's Settings and server process uses (CONTRACT §10): `duckdb`, or `chdb`
# to run the API suite on the ClickHouse engine (`make test` runs the API modules on both:
# STORE_SUITE in the Makefile). Set as TALLY_STORE, which Settings and servers read.
STORE = os.environ.get("TALLY_TEST_STORE", "duckdb")
os.environ["TALLY_STORE"] = STORE
ON_CHDB = STORE == "chdb"


def on_duckdb_only(reason: str) -> pytest.MarkDecorator:
    """A test of something only the DuckDB store has (its file, its engine's errors): a
    strict xfail on another store, with the reason — a gap, never a skip."""
    return pytest.mark.xfail(ON_CHDB, reason=reason, strict=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """chDB runs one engine a process (a second store path is refused while one is open):
    on it, a module's tests that open a store of their own run before those that share one
    the module keeps open, so no two stores are open at once."""
    if not ON_CHDB:
        return

    def shares_a_store(item: pytest.Item) -> bool:
        info = getattr(item, "_fixtureinfo", None)
        return info is not None and any(  # the session's fixtures open no store
            d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs)

    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.nodeid.split("::")[0], shares_a_store(item),
                                 order[id(item)]))


@pytest.fixture(autouse=True)
def _no_store_left_open(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """On chDB a store a test opened and left open (a strict xfail stopped at its first
    DuckDB-only line) would refuse every later store in the process: closed after the test.
    Stores of module fixtures, opened before the test, are left to their fixture."""
    if not ON_CHDB:
        yield
        return
    from tally.storage.clickhouse import ClickHouseBackend

    opened: list[ClickHouseBackend] = []
    init = ClickHouseBackend.__init__

    def recording(self: ClickHouseBackend, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)  # a store that fails to open closes itself
        opened.append(self)

    monkeypatch.setattr(ClickHouseBackend, "__init__", recording)
    yield
    for store in opened:
        if not store._closed:
            store.close()


ALL_SCOPES = "events:write analytics:read exports:write admin"
_ids = itertools.count()


def make_event(**overrides: Any) -> dict[str, Any]:
    """A valid bet.settled event; keyword arguments replace envelope fields."""
    n = next(_ids)
    event: dict[str, Any] = {
        "event_id": f"ev-{n}",
        "event_type": "bet.settled",
        "occurred_at": "2025-10-23T16:21:05Z",
        "tenant_id": "brand-7",
        "region": "EU",
        "player_id": "p_19f3",
        "trace_id": "tr_a1b2c3",
        "schema_version": "1.3.0",
        "payload": {"bet_id": f"b-{n}", "stake_minor": 500, "win_minor": 450,
                    "currency": "EUR", "game_id": "g_01", "provider_id": "studio_x"},
    }
    event.update(overrides)
    return event


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


TokenFactory = Callable[..., dict[str, str]]


@pytest.fixture
def auth(client: TestClient, settings: Settings) -> TokenFactory:
    """``auth(scopes=..., brands=..., regions=...)`` → Authorization headers of a new client."""

    def factory(scopes: str = ALL_SCOPES, brands: str | None = None,
                regions: str | None = None, metrics: str | None = None) -> dict[str, str]:
        return bearer(client, settings.data_dir, scopes, brands, regions, metrics)

    return factory


def bearer(client: TestClient, data_dir: Path, scopes: str = ALL_SCOPES,
           brands: str | None = None, regions: str | None = None,
           metrics: str | None = None) -> dict[str, str]:
    """Register a client in ``data_dir`` and return the Authorization header of its token."""
    con = metadata.connect(data_dir)
    client_id, secret = create_client(con, "test", scopes, brands, regions, metrics)
    con.close()
    response = client.post("/oauth/token", auth=(client_id, secret),
                           data={"grant_type": "client_credentials"})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def headers(auth: TokenFactory) -> dict[str, str]:
    return auth()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a ``redis-server`` of this test session (of this xdist worker), started on
    first use on a free port with its files in a temporary directory, stopped at the end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker of this test session (of this xdist worker), started on first
    use on a free port (tests/kafka_broker.py), stopped at the end."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        yield broker
    finally:
        broker.stop()

"""tally-client's data-out calls (exports, webhook secrets, widgets) against a real server:
the file it downloads is the route's CSV and the job's sha256, a rotated secret is new, a
widget it makes draws, and a problem is raised as its exception — sync and async alike."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pyarrow.parquet as pq
import pytest

from tally_client import AsyncTallyClient, BadRequest, Forbidden, TallyClient
from tests.conftest import make_event
from tests.server import Server, new_client, token

DAY = "2025-10-23"
SLICE = {"metric": "ggr", "dim": "game_id", "from_": DAY, "to": "2025-10-24"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, tuple[str, str], Path]]:
    data: Path = tmp_path_factory.mktemp("client-out") / "data"
    creds = new_client(data, scopes="events:write analytics:read exports:write")
    server = Server(data)
    try:
        events = [make_event(tenant_id="brand-a", occurred_at=f"{DAY}T{i % 24:02d}:10:00Z",
                             payload={"bet_id": f"b{i}", "stake_minor": 100 + i,
                                      "win_minor": i % 7, "currency": "EUR",
                                      "game_id": f"g{i % 5}", "provider_id": "s"})
                  for i in range(120)]
        r = httpx.post(f"{server.url}/v1/events:batch", content=json.dumps(events),
                       headers={**token(server.url, *creds),
                                "Content-Type": "application/json"})
        assert r.status_code == 202
        yield server.url, creds, data
    finally:
        server.stop()


def test_an_export_round_trip(served):
    url, (client_id, secret), _ = served
    with TallyClient(url, client_id=client_id, client_secret=secret) as tally:
        job = tally.export("slice", SLICE)
        assert job.status == "queued"
        done = tally.wait_for_export(job.id, timeout=60, poll=0.1)
        assert done.status == "succeeded" and done.rows == 5
        content = tally.download(done)
        assert hashlib.sha256(content).hexdigest() == done.sha256
        route = httpx.get(f"{url}/v1/analytics/slice", headers={
            **token(url, client_id, secret), "Accept": "text/csv"},
            params={"metric": "ggr", "dim": "game_id", "from": DAY, "to": "2025-10-24",
                    "limit": "1000"})
        assert content == route.content
        parquet = tally.wait_for_export(tally.export("slice", SLICE, format="parquet").id,
                                        timeout=60, poll=0.1)
        table = pq.read_table(io.BytesIO(tally.download(parquet)))
        assert table.num_rows == 5 and str(table.schema.field("value_minor").type) == "int64"
        assert [j.id for j in tally.iter_exports(page_size=1)] == [job.id, parquet.id]
        with pytest.raises(BadRequest):
            tally.export("slice", {**SLICE, "dim": "nope"})
        with pytest.raises(ValueError, match="no file"):
            tally.download(job)  # the queued view: no link yet


def test_webhook_secrets_and_widgets_async(served):
    url, (client_id, secret), _ = served

    async def run() -> tuple[str, str, dict[str, Any]]:
        async with AsyncTallyClient(url, client_id=client_id, client_secret=secret) as tally:
            first = (await tally.webhook_secret()).secret
            rotated = (await tally.webhook_secret(rotate=True)).secret
            widget = await tally.embed("slice", SLICE, chart="bar", title="Top games")
            with pytest.raises(BadRequest):
                await tally.embed("slice", SLICE, chart="line")  # a line cannot draw a slice
            return first, rotated, {"url": widget.url, "expires": widget.expires_at}

    first, rotated, widget = asyncio.run(run())
    assert first.startswith("whsec_") and rotated.startswith("whsec_") and first != rotated
    data = httpx.get(f"{url}{widget['url']}/data").json()
    assert data["title"] == "Top games" and len(data["x"]["values"]) == 5


def test_a_confined_client_gets_forbidden(served):
    url, _, data = served
    limited = new_client(data, scopes="analytics:read exports:write", brands="brand-b")
    with TallyClient(url, client_id=limited[0], client_secret=limited[1]) as tally:
        with pytest.raises(Forbidden):
            tally.export("slice", {**SLICE, "filters": "brand_id:brand-a"})
        with pytest.raises(Forbidden):
            tally.embed("slice", {**SLICE, "filters": "brand_id:brand-a"}, chart="bar")
        job = tally.wait_for_export(tally.export("slice", SLICE).id, timeout=60, poll=0.1)
        assert job.status == "succeeded" and job.rows == 0  # brand-b has no bets

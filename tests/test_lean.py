"""The hot read routes' lean handler (api/lean.py) answers exactly as FastAPI's would: the same
requests — valid, malformed, unauthenticated, under-scoped, confined — sent to an app built
with it and to one built without it, on the same store, get the same status, body and headers
(but the per-request trace id and date)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import tally.api.lean as lean
from tally.api.app import create_app
from tally.api.routes import analytics
from tally.config import Settings
from tests.conftest import bearer, make_event

DAY = "2025-10-23"
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24"}),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "5m", "from": DAY,
                                  "to": "2025-10-24", "filters": "brand_id:brand-7"}),
    ("/v1/analytics/timeseries", {"metric": "bets", "granularity": "1d", "from": DAY,
                                  "to": "2025-10-25", "group_by": "brand_id", "limit": "1"}),
    ("/v1/analytics/timeseries", {}),  # nothing given
    ("/v1/analytics/timeseries", {"metric": "ggr"}),  # required ones missing
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "2h", "from": DAY,
                                  "to": "2025-10-24"}),
    ("/v1/analytics/timeseries", {"metric": "nope", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24"}),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", "from": "yesterday",
                                  "to": "2025-10-24"}),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24", "limit": "0"}),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24", "bogus": "1"}),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24", "cursor": "not-a-cursor"}),
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "game_id", "from": DAY,
                             "to": "2025-10-24"}),
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "shoe_size", "from": DAY,
                             "to": "2025-10-24"}),
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "game_id", "from": DAY,
                             "to": "2025-10-24", "order": "sideways"}),
    ("/v1/analytics/ltv", {"start_date": DAY, "end_date": DAY}),
    ("/v1/analytics/ltv", {"start_date": DAY, "end_date": DAY, "horizon": "9999d"}),
    ("/v1/analytics/ltv", {"end_date": DAY}),
]
VOLATILE = {"date", "x-trace-id", "traceparent"}
TRACE_ID = re.compile(rb'"trace_id":"[0-9a-f]+"')


def _answers(settings: Settings, enabled: bool, tokens: dict[str, dict[str, str]] | None
             ) -> tuple[list[tuple[int, bytes, dict[str, str]]], dict[str, dict[str, str]]]:
    lean.ENABLED = enabled
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            if tokens is None:
                data = settings.data_dir
                tokens = {"all": bearer(client, data),
                          "brand-8": bearer(client, data, brands="brand-8"),
                          "no-analytics": bearer(client, data, scopes="events:write"),
                          "none": {},
                          "garbage": {"Authorization": "Bearer not.a.token"}}
                events = [make_event(), make_event(tenant_id="brand-8", player_id="p_2"),
                          make_event(occurred_at="2025-10-24T01:00:00Z")]
                assert client.post("/v1/events:batch", json=events,
                                   headers=tokens["all"]).status_code == 202
            out = []
            for who, headers in tokens.items():
                for path, params in REQUESTS:
                    for accept in (None, "text/csv", "image/png"):
                        extra = {} if accept is None else {"Accept": accept}
                        r = client.get(path, params=params, headers={**headers, **extra})
                        out.append((r.status_code, TRACE_ID.sub(b"", r.content), {
                            k: v for k, v in r.headers.items() if k not in VOLATILE}))
                # the same query twice: the second from the answer cache, then a 304
                r = client.get(REQUESTS[0][0], params=REQUESTS[0][1], headers=headers)
                if r.status_code == 200:
                    again = client.get(REQUESTS[0][0], params=REQUESTS[0][1], headers={
                        **headers, "If-None-Match": r.headers["etag"]})
                    out.append((again.status_code, TRACE_ID.sub(b"", again.content), {
                        k: v for k, v in again.headers.items() if k not in VOLATILE}))
            return out, tokens
    finally:
        lean.ENABLED = True


@pytest.fixture
def lean_settings(settings: Settings) -> Iterator[Settings]:
    yield settings.model_copy(update={"rate_client": "off", "rate_token": "off",
                                      "rate_brand": "off", "rate_region": "off"})


def test_the_lean_routes_answer_as_fastapi_does(lean_settings):
    without, tokens = _answers(lean_settings, False, None)
    with_lean, _ = _answers(lean_settings, True, tokens)
    assert len(with_lean) == len(without)
    statuses = {status for status, _, _ in without}
    assert {200, 304, 400, 401, 403, 406} <= statuses  # the battery reaches every outcome
    for (s1, b1, h1), (s2, b2, h2) in zip(without, with_lean, strict=True):
        assert (s1, b1, h1) == (s2, b2, h2)


def test_the_read_routes_take_the_lean_path():
    """The three GET analytics routes have the read shape; the POST ones do not."""
    shapes = {route.path: lean.shape(route.dependant) for route in analytics.router.routes
              if isinstance(route, lean.LeanRoute)}
    assert {path for path, found in shapes.items() if found is not None} == {
        "/v1/analytics/timeseries", "/v1/analytics/slice", "/v1/analytics/ltv"}
    assert shapes["/v1/analytics/timeseries"].scopes.scopes == ["analytics:read"]

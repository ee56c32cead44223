"""HTTP hygiene (security issue, item 8): security headers, cache rules for tenant data and
tokens, CORS only for an allow-list, every route in the OpenAPI document, and the ``/v1``
deprecation signal (RFC 9745 ``Deprecation``, RFC 8594 ``Sunset``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx2 as httpx
import pydantic
import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from tally.api import docs as api_docs
from tally.api.app import create_app
from tally.api.embed_page import EMBED_ASSETS
from tally.api.hygiene import Deprecations
from tally.api.status_page import STATUS_ASSETS
from tally.config import Settings
from tally.config_values import DeprecationRule
from tests.conftest import make_event
from tests.server import Server, new_client, token

TS = "/v1/analytics/timeseries"
TS_PARAMS = {"metric": "ggr", "granularity": "1d", "from": "2025-10-23", "to": "2025-10-24"}
SLICE_PARAMS = {k: v for k, v in TS_PARAMS.items() if k != "granularity"}


def sample_requests(client: TestClient, headers: dict[str, str]) -> list[httpx.Response]:
    """A bit of everything: answers, errors, unauthenticated routes, tokens, a 404."""
    client.post("/v1/events:batch", json=[make_event()], headers=headers)
    ts = client.get(TS, params=TS_PARAMS, headers=headers)
    return [
        ts,
        client.get(TS, params=TS_PARAMS, headers={**headers, "If-None-Match": ts.headers["etag"]}),
        client.get("/v1/analytics/slice", headers=headers,
                   params={**SLICE_PARAMS, "dim": "region"}),
        client.get(TS, params={**TS_PARAMS, "metric": "nope"}, headers=headers),  # 400
        client.get(TS, params=TS_PARAMS),  # 401
        client.get("/v1/metrics", headers=headers),
        client.get("/v1/schemas", headers=headers),
        client.get("/v1/admin/quarantine", headers=headers),
        client.post("/v1/events:batch", json=[make_event()], headers=headers),
        client.get("/v1/nowhere", headers=headers),  # 404
        client.get("/healthz"),
        client.get("/.well-known/jwks.json"),
        client.post("/oauth/token", data={"grant_type": "client_credentials"}),  # 401
    ]


def test_nosniff_on_every_response(client, headers):
    for response in sample_requests(client, headers):
        assert response.headers.get("x-content-type-options") == "nosniff", response.url


def test_tenant_data_is_private_or_not_stored(client, headers):
    """No /v1 response may be stored by a shared cache: ``private`` or ``no-store``."""
    for response in sample_requests(client, headers):
        if response.url.path.startswith("/v1/"):
            cache = response.headers.get("cache-control", "")
            assert "private" in cache or "no-store" in cache, (response.url, cache)
    answer = client.get(TS, params=TS_PARAMS, headers=headers)
    assert answer.headers["cache-control"] == "private, max-age=900"
    assert answer.headers["vary"] == "Authorization, Accept"  # JSON or CSV (CONTRACT §8)


def test_token_responses_are_never_cached_errors_included(client, auth, settings):
    from tally import metadata
    from tally.security.clients import create_client

    con = metadata.connect(settings.data_dir)
    client_id, secret = create_client(con, "t", "analytics:read")
    con.close()
    issued = client.post("/oauth/token", auth=(client_id, secret),
                         data={"grant_type": "client_credentials"})
    refused = client.post("/oauth/token", auth=(client_id, "wrong"),
                          data={"grant_type": "client_credentials"})
    assert (issued.status_code, refused.status_code) == (200, 401)
    for response in (issued, refused):
        assert response.headers["cache-control"] == "no-store"  # RFC 6749 §5.1
        assert response.headers["pragma"] == "no-cache"


def test_every_route_is_in_the_openapi_document(client):
    app = client.app
    # the reference (/openapi.json, /docs, /redoc), the widgets' scripts and styles, and the
    # status page's style sheet
    docs = {app.openapi_url, *api_docs.PATHS, f"{EMBED_ASSETS.url}/{{name}}",
            f"{STATUS_ASSETS.url}/{{name}}"}
    served = {(method, ctx.path) for ctx in iter_route_contexts(app.routes)
              if ctx.path not in docs for method in (ctx.methods or ()) if method != "HEAD"}
    documented = {(method.upper(), path) for path, ops in app.openapi()["paths"].items()
                  for method in ops}
    assert ("POST", "/v1/events:batch") in served and len(served) >= 12
    assert served - documented == set()
    assert documented - served == set()


# --------------------------------------------------------------------------- CORS

ORIGIN = "https://bi.example.com"
PREFLIGHT = {"Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "authorization"}


def test_no_cors_by_default(client, headers):
    preflight = client.options(TS, headers={"Origin": ORIGIN, **PREFLIGHT})
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get(TS, params=TS_PARAMS, headers={**headers, "Origin": ORIGIN})
    assert "access-control-allow-origin" not in simple.headers


@pytest.fixture
def cors_client(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU",
                        cors_origins=f"{ORIGIN}, https://ops.example.com:8443")
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_cors_allows_only_the_listed_origins_without_credentials(cors_client):
    ok = cors_client.options(TS, headers={"Origin": ORIGIN, **PREFLIGHT})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in ok.headers
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert ok.headers["x-content-type-options"] == "nosniff"
    other = cors_client.options(TS, headers={"Origin": "https://evil.example.com", **PREFLIGHT})
    assert "access-control-allow-origin" not in other.headers
    simple = cors_client.get("/healthz", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "etag" in simple.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize("origins", ["*", "https://*.example.com", "https://a.example.com/x",
                                     "null", "bi.example.com"])
def test_cors_origins_must_be_explicit_origins(origins):
    with pytest.raises(pydantic.ValidationError, match="TALLY_CORS_ORIGINS"):
        Settings(cors_origins=origins)


# --------------------------------------------------------------------------- deprecation

RULE = {"deprecation": "2026-01-01T00:00:00Z", "sunset": "2027-06-30T00:00:00Z",
        "link": "https://docs.example.com/migrate-to-v2"}


def test_deprecation_headers_are_rfc_9745_and_8594():
    rule = DeprecationRule.model_validate(RULE)
    headers = dict(rule.headers())
    assert headers["Deprecation"] == "@1767225600"  # RFC 9745: a structured-field Date
    assert headers["Sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"  # RFC 8594: an HTTP-date
    assert parsedate_to_datetime(headers["Sunset"]) == datetime(2027, 6, 30, tzinfo=UTC)
    assert headers["Link"] == ('<https://docs.example.com/migrate-to-v2>; rel="deprecation"; '
                               'type="text/html"')
    assert dict(DeprecationRule.model_validate({"deprecation": RULE["deprecation"]})
                .headers()) == {"Deprecation": "@1767225600"}


def test_exact_routes_win_over_prefixes_and_longer_prefixes_over_shorter():
    early = DeprecationRule.model_validate({"deprecation": "2026-01-01T00:00:00Z"})
    late = DeprecationRule.model_validate({"deprecation": "2026-06-01T00:00:00Z"})
    exact = DeprecationRule.model_validate({"deprecation": "2026-03-01T00:00:00Z"})
    rules = Deprecations({"/v1/*": early, "/v1/analytics/*": late,
                          "/v1/analytics/slice": exact})
    assert rules.rule_for("/v1/analytics/slice") is exact
    assert rules.rule_for("/v1/analytics/timeseries") is late
    assert rules.rule_for("/v1/metrics") is early
    assert rules.rule_for("/healthz") is None
    assert not Deprecations({})


@pytest.mark.parametrize(("value", "message"), [
    ({"/v1/x": {"deprecation": "2027-01-01T00:00:00Z", "sunset": "2026-01-01T00:00:00Z"}},
     "sunset must not be before deprecation"),
    ({"v1/x": {"deprecation": "2026-01-01T00:00:00Z"}}, "must be a route path"),
    ({"/v1/*/x": {"deprecation": "2026-01-01T00:00:00Z"}}, "must be a route path"),
    ({"/v1/x": {"deprecation": "2026-01-01"}}, "timezone"),
    ({"/v1/x": {"deprecation": "2026-01-01T00:00:00Z", "sunest": "x"}}, "Extra inputs"),
])
def test_bad_deprecations_are_refused_at_start(value, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        Settings(deprecations=value)


@pytest.mark.slow
def test_deprecation_end_to_end_through_the_real_server(tmp_path):
    """TALLY_DEPRECATIONS from the environment of ``tally serve``, over a real socket: the
    slice route carries the three headers on answers and errors alike; other routes none."""
    data = tmp_path / "data"
    creds = new_client(data)
    env = {"TALLY_DEPRECATIONS": json.dumps({"/v1/analytics/slice": RULE})}
    server = Server(data, env=env)
    try:
        headers = token(server.url, *creds)
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as http:
            answer = http.get("/v1/analytics/slice", params={**SLICE_PARAMS, "dim": "region"})
            error = http.get("/v1/analytics/slice", params={"metric": "nope"})
            unauthenticated = httpx.get(f"{server.url}/v1/analytics/slice")
            other = http.get(TS, params=TS_PARAMS)
        for response, status in ((answer, 200), (error, 400), (unauthenticated, 401)):
            assert response.status_code == status
            assert response.headers["deprecation"] == "@1767225600"
            assert response.headers["sunset"] == "Wed, 30 Jun 2027 00:00:00 GMT"
            assert 'rel="deprecation"' in response.headers["link"]
        assert other.status_code == 200
        assert not {"deprecation", "sunset", "link"} & set(other.headers)
    finally:
        server.stop()

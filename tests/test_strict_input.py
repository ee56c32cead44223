"""Strict input (CONTRACT §4), stable problem types and the auth errors' form (RFC 6749 §5.2,
RFC 6750 §3), on every route of the document.

Every operation is taken from the app's own OpenAPI document, so a route added later is
covered without editing this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.errors import PROBLEM_BASE, PROBLEM_TYPES
from tests.conftest import make_event

DOCS = Path(__file__).parent.parent / "docs"
RANGE = {"from": "2025-10-23", "to": "2025-10-24"}
# a request each operation answers with 2xx (the baseline every misspelling is compared to)
VALID: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/analytics/timeseries"): {"params": {"metric": "ggr", "granularity": "1h",
                                                     **RANGE}},
    ("GET", "/v1/analytics/slice"): {"params": {"metric": "ggr", "dim": "game_id", **RANGE}},
    ("GET", "/v1/analytics/ltv"): {"params": {"start_date": "2025-10-23",
                                              "end_date": "2025-10-23", "horizon": "2d"}},
    ("POST", "/v1/analytics/funnel"): {"json": {
        "steps": ["bet.placed", {"event": "bet.settled", "game_id": "g_01"}],
        "window_sec": 3600, **RANGE, "filters": {"brand_id": "brand-7"}}},
    ("POST", "/v1/analytics/retention"): {"json": {
        "cohort": "registration", "start_date": "2025-10-23", "end_date": "2025-10-23",
        "days": [1], "filters": {"region": "EU"}}},
    ("POST", "/v1/events:batch"): {"json_factory": lambda: [make_event()]},
    ("POST", "/v1/admin/fx-rates"): {"json": [{"date": "2025-10-23", "currency": "GBP",
                                               "rate": "1.15"}]},
    ("POST", "/oauth/token"): {},  # form: checked in its own tests below
    ("POST", "/v1/exports"): {"json": {"query": {"kind": "slice", "metric": "ggr",
                                                 "dim": "game_id", **RANGE},
                                       "format": "csv"}},
    # a job of this client (made first), and its file by the signed link
    ("GET", "/v1/exports/{job_id}"): {"job": "self"},
    ("GET", "/v1/exports/{job_id}/file"): {"job": "file"},
    ("POST", "/v1/embeds"): {"json": {"query": {"kind": "slice", "metric": "ggr",
                                                "dim": "game_id", **RANGE}, "chart": "bar"}},
    # a widget of this client (made first): its page, its data
    ("GET", "/embed/{token}"): {"embed": ""},
    ("GET", "/embed/{token}/data"): {"embed": "/data"},
    ("POST", "/v1/alerts"): {"json": {"name": "n", "query": {"kind": "slice", "metric": "ggr",
                                                             "dim": "game_id", **RANGE},
                                      "condition": {"op": ">", "value": 1e15},
                                      "webhook_url": "https://1.1.1.1/hook"}},
    # an alert of this client (made first): itself, its events, its deletion
    ("GET", "/v1/alerts/{alert_id}"): {"alert": ""},
    ("GET", "/v1/alerts/{alert_id}/events"): {"alert": "/events"},
    ("DELETE", "/v1/alerts/{alert_id}"): {"alert": ""},
}


def _exported(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    """A finished export job of the caller."""
    import time

    made = client.post("/v1/exports", json=VALID[("POST", "/v1/exports")]["json"],
                       headers=headers)
    assert made.status_code == 202, made.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/exports/{made.json()['id']}",
                                         headers=headers).json()
        if job["status"] == "succeeded":
            return job
        time.sleep(0.05)
    raise AssertionError("the export did not finish")


def operations() -> list[tuple[str, str]]:
    doc = create_app().openapi()
    return [(method.upper(), path) for path, item in doc["paths"].items() for method in item]


def _send(client: TestClient, method: str, path: str, headers: dict[str, str],
          params: dict[str, Any] | None = None, **extra: Any) -> Any:
    spec = dict(VALID.get((method, path), {}))
    if "json_factory" in spec:
        spec["json"] = spec.pop("json_factory")()
    if "job" in spec:  # a route of one export job: a real one, made now
        job = _exported(client, headers)
        if spec.pop("job") == "file":
            link, _, signed = job["download_url"].partition("?")
            path = link
            spec["params"] = dict(part.split("=", 1) for part in signed.split("&"))
        else:
            path = job["links"]["self"]
    if "embed" in spec:  # a route of one widget: a real one, made now
        made = client.post("/v1/embeds", json=VALID[("POST", "/v1/embeds")]["json"],
                           headers=headers)
        assert made.status_code == 201, made.text
        path = made.json()["url"] + spec.pop("embed")
    if "alert" in spec:  # a route of one alert: a real one, made now
        made = client.post("/v1/alerts", json=VALID[("POST", "/v1/alerts")]["json"],
                           headers=headers)
        assert made.status_code == 201, made.text
        path = made.json()["links"]["self"] + spec.pop("alert")
    query = {**spec.pop("params", {}), **(params or {})}
    if "json" in extra:
        spec["json"] = extra.pop("json")
    return client.request(method, path, params=query, headers=headers, **spec, **extra)


def assert_problem(response: Any, status: int, code: str, *named: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + code, body
    for name in named:
        assert name in body["detail"], (name, body["detail"])
    return body


@pytest.mark.parametrize(("method", "path"), [op for op in operations()
                                              if op != ("POST", "/oauth/token")])
def test_every_operation_refuses_an_unknown_query_parameter(client, headers, method, path):
    baseline = _send(client, method, path, headers)
    assert baseline.status_code < 300, baseline.text  # the request without the typo works
    for typo in ("fitlers", "groupby", "limt"):
        body = assert_problem(_send(client, method, path, headers, params={typo: "x"}), 400,
                              "unknown-parameter", typo)
        assert body["parameters"] == [typo]


def test_the_token_endpoint_refuses_query_parameters(client):
    r = client.post("/oauth/token?client_secret=leak", data={"grant_type": "client_credentials"})
    assert_problem(r, 400, "unknown-parameter", "client_secret")


@pytest.mark.parametrize(("path", "params", "named"), [
    ("/v1/analytics/slice", {"metric": "ggr", "dim": "game_id", **RANGE,
                             "fitlers": "brand_id:brand-1"}, "fitlers"),
    ("/v1/analytics/timeseries", {"metric": "ggr", "granularity": "1h", **RANGE,
                                  "groupby": "brand_id"}, "groupby"),
    ("/v1/analytics/ltv", {"start_date": "2025-10-23", "end_date": "2025-10-23",
                           "horizn": "7d"}, "horizn"),
])
def test_the_reported_typos_are_400_not_an_unfiltered_answer(client, headers, path, params,
                                                             named):
    assert_problem(client.get(path, params=params, headers=headers), 400, "unknown-parameter",
                   named)


@pytest.mark.parametrize(("path", "change", "named"), [
    ("/v1/analytics/funnel", {"filter": {"brand_id": "brand-1"}}, "filter"),
    ("/v1/analytics/funnel", {"steps": ["bet.placed", {"event": "bet.settled", "gmae_id": "g"}]},
     "steps[1].gmae_id"),
    ("/v1/analytics/funnel", {"filters": {"brand": "brand-1"}}, "filters.brand"),
    ("/v1/analytics/funnel", {"exclusions": [{"event": "bet.placed", "betwen": [1, 2]}]},
     "exclusions[0].betwen"),
    ("/v1/analytics/retention", {"dayz": [1, 7]}, "dayz"),
    ("/v1/analytics/retention", {"return_event": {"event": "bet.placed", "x": 1}},
     "return_event.x"),
    ("/v1/analytics/retention", {"filters": {"device": "ios", "geoo": "DE"}}, "filters.geoo"),
    ("/v1/admin/fx-rates", None, "[0].rat"),
])
def test_unknown_body_fields_at_any_depth_are_400_naming_them(client, headers, path, change,
                                                              named):
    if change is None:
        body: Any = [{"date": "2025-10-23", "currency": "GBP", "rat": "1.1"}]
    else:
        body = {**VALID[("POST", path)]["json"], **change}
    problem = assert_problem(client.post(path, json=body, headers=headers), 400,
                             "unknown-parameter", named)
    assert named in problem["parameters"]


@pytest.mark.parametrize(("body", "named"), [
    ({"window_sec": "3600"}, "window_sec"),  # no coercion of a string
    ({"window_sec": True}, "window_sec"),  # nor of a boolean
    ({"correlate_by": "email"}, "correlate_by"),
    ({"steps": []}, "steps"),
])
def test_body_values_of_the_wrong_type_are_400_invalid_parameter(client, headers, body, named):
    sent = {**VALID[("POST", "/v1/analytics/funnel")]["json"], **body}
    assert_problem(client.post("/v1/analytics/funnel", json=sent, headers=headers), 400,
                   "invalid-parameter", named)


def test_a_single_valued_parameter_given_twice_is_400(client, headers):
    r = client.get("/v1/analytics/slice?metric=ggr&metric=ngr&dim=game_id&from=2025-10-23"
                   "&to=2025-10-24", headers=headers)
    assert_problem(r, 400, "invalid-parameter", "metric")
    # a repeatable one (the quarantine's brand_id) may repeat
    r = client.get("/v1/admin/quarantine?brand_id=brand-7&brand_id=brand-8", headers=headers)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("accept", "status"), [
    ("application/json", 200), ("*/*", 200), ("application/*", 200),
    ("text/html, application/json;q=0.1", 200), ("text/csv", 200), ("text/*", 200),
    ("application/json;q=0", 406), ("image/png", 406), ("text/html", 406),
])
def test_accept_is_honoured_or_406(client, headers, accept, status):
    r = client.get("/v1/analytics/slice", params={"metric": "ggr", "dim": "game_id", **RANGE},
                   headers={**headers, "Accept": accept})
    assert r.status_code == status, r.text
    if status == 406:
        body = assert_problem(r, 406, "not-acceptable")
        assert body["available"] == ["application/json", "text/csv"]  # CSV: CONTRACT §8
    # and a route answering JSON only refuses CSV
    r = client.get("/v1/metrics", headers={**headers, "Accept": "text/csv"})
    assert_problem(r, 406, "not-acceptable")


def test_metrics_text_is_served_to_a_prometheus_accept(client):
    r = client.get("/metrics", headers={"Accept": "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert_problem(client.get("/metrics", headers={"Accept": "application/json"}), 406,
                   "not-acceptable")


def test_wrong_problem_codes_are_distinct_types(client, headers, auth):
    """One stable type per error class, not one for every 400."""
    seen = {
        assert_problem(client.get("/v1/analytics/slice", params={
            "metric": "nope", "dim": "game_id", **RANGE}, headers=headers), 400,
            "unknown-metric")["type"],
        assert_problem(client.get("/v1/analytics/slice", params={
            "metric": "ggr", "dim": "game_id", **RANGE, "filters": "method:card"},
            headers=headers), 400, "invalid-filter")["type"],
        assert_problem(client.get("/v1/analytics/slice", params={
            "metric": "ggr", "dim": "game_id", **RANGE, "cursor": "abc"}, headers=headers),
            400, "invalid-cursor")["type"],
        assert_problem(client.get("/v1/analytics/slice", params={
            "metric": "ggr", "dim": "game_id", "from": "yesterday", "to": RANGE["to"]},
            headers=headers), 400, "invalid-parameter", "from")["type"],
        assert_problem(client.post("/v1/events:batch", content=b"{", headers={
            **headers, "Content-Type": "application/json"}), 400, "invalid-body")["type"],
        assert_problem(client.get("/v1/admin/quarantine", headers=auth(
            scopes="analytics:read")), 403, "insufficient-scope")["type"],
    }
    assert len(seen) == 6


def test_www_authenticate_follows_rfc_6750(client, auth):
    r = client.get("/v1/metrics")
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == 'Bearer realm="tally"'  # no error without a token
    r = client.get("/v1/metrics", headers={"Authorization": "Bearer not.a.jwt"})
    assert_problem(r, 401, "invalid-token")
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="tally", error="invalid_token", '
                                'error_description="')
    assert re.fullmatch(r'Bearer realm="tally", error="invalid_token", '
                        r'error_description="[\x20\x21\x23-\x5b\x5d-\x7e]*"', challenge)
    r = client.get("/v1/admin/quarantine", headers=auth(scopes="analytics:read"))
    assert r.headers["www-authenticate"] == ('Bearer realm="tally", error="insufficient_scope", '
                                             'scope="admin"')


def test_oauth_errors_follow_rfc_6749(client, settings):
    from tally import metadata
    from tally.security.clients import create_client

    con = metadata.connect(settings.data_dir)
    client_id, secret = create_client(con, "t", "analytics:read", None, None, None)
    con.close()
    cases = [
        ({"data": {"grant_type": "password"}, "auth": (client_id, secret)}, 400,
         "unsupported_grant_type"),
        ({"data": {}, "auth": (client_id, secret)}, 400, "invalid_request"),
        ({"content": "grant_type=client_credentials&grant_type=client_credentials",
          "headers": {"Content-Type": "application/x-www-form-urlencoded"},
          "auth": (client_id, secret)}, 400, "invalid_request"),
        ({"data": {"grant_type": "client_credentials", "scope": "admin"},
          "auth": (client_id, secret)}, 400, "invalid_scope"),
        ({"data": {"grant_type": "client_credentials"}, "auth": (client_id, "wrong")}, 401,
         "invalid_client"),
        ({"data": {"grant_type": "client_credentials"}}, 401, "invalid_client"),
    ]
    for kwargs, status, error in cases:
        r = client.post("/oauth/token", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        body = r.json()
        assert body["error"] == error and body["error_description"] == body["detail"], body
        assert body["type"] == PROBLEM_BASE + ("oauth-" + error.replace("_", "-")), body
        if status == 401:
            assert r.headers["www-authenticate"] == 'Basic realm="tally"'
    # an unrecognised parameter is ignored (RFC 6749 §3.2)
    r = client.post("/oauth/token", auth=(client_id, secret),
                    data={"grant_type": "client_credentials", "audience": "x"})
    assert r.status_code == 200, r.text


def test_every_problem_type_is_documented():
    text = (DOCS / "api.md").read_text()
    missing = [code for code in PROBLEM_TYPES if f"`{code}`" not in text]
    assert not missing, f"docs/api.md#problem-types lacks {missing}"

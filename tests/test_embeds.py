"""Embedded widgets (CONTRACT §9), over HTTP: what ``POST /v1/embeds`` checks, what the page
and its data request answer, and that nothing a viewer sends — a parameter, a changed token,
an expired or re-keyed one — widens what a widget shows. (In a real browser:
tests/test_embeds_browser.py.)"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.embeds import tokens
from tally.embeds.charts import MAX_SERIES
from tally.security.clients import revoke_client
from tests import test_csv_answers
from tests.conftest import bearer
from tests.server import cli
from tests.test_csv_answers import BATCH, DAY, TS, _events

EMBEDS = "/v1/embeds"
TS_QUERY = {"kind": "timeseries", "metric": "ggr", "granularity": "1h",
            "from": f"{DAY}T00:00:00Z", "to": "2025-10-24T00:00:00Z", "group_by": "brand_id"}
FUNNEL = {"kind": "funnel", "steps": ["bet.settled", "bet.settled"], "window_sec": 86400,
          "from": f"{DAY}T00:00:00Z", "to": "2025-10-24T00:00:00Z"}
ORIGIN = "https://backoffice.example.com"
stored = test_csv_answers.stored  # the fixture: its 60 bets in two brands, ingested


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                    embed_origins=f"{ORIGIN},https://bi.example.com:8443")


def embed(client: TestClient, headers: dict[str, str], query: dict[str, Any],
          chart: str = "line", **extra: Any) -> Any:
    return client.post(EMBEDS, json={"query": query, "chart": chart, **extra}, headers=headers)


def made(client: TestClient, headers: dict[str, str], query: dict[str, Any],
         chart: str = "line", **extra: Any) -> dict[str, Any]:
    r = embed(client, headers, query, chart, **extra)
    assert r.status_code == 201, r.text
    return dict(r.json())


def ggr_by_brand_hour(events: list[dict[str, Any]],
                      brands: set[str] | None = None) -> dict[str, dict[int, int]]:
    """Independently: GGR (stakes − wins, minor units) per brand per UTC hour."""
    out: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if brands is None or e["tenant_id"] in brands:
            at = datetime.fromisoformat(e["occurred_at"].replace("Z", "+00:00"))
            hour = int(at.replace(minute=0, second=0, tzinfo=UTC).timestamp())
            out[e["tenant_id"]][hour] += e["payload"]["stake_minor"] - e["payload"]["win_minor"]
    return out


def test_a_widget_draws_the_routes_answer(client, headers, stored):
    widget = made(client, headers, TS_QUERY, title="GGR by brand")
    assert widget["url"].startswith("/embed/") and widget["id"].startswith("emb_")
    page = client.get(widget["url"])  # no bearer token: the URL is the credential
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    data = client.get(widget["url"] + "/data")
    assert data.status_code == 200, data.text
    body = data.json()
    assert body["title"] == "GGR by brand" and body["unit"] == "money"
    assert body["currency"] == "EUR" and body["x"]["kind"] == "time"
    expected = ggr_by_brand_hour(stored)
    drawn = {s["name"]: dict(zip(body["x"]["values"], s["values"], strict=True))
             for s in body["series"]}
    assert drawn.keys() == expected.keys() == {"brand-a", "brand-b"}
    for brand, hours in expected.items():
        assert {h: v for h, v in drawn[brand].items() if v} == dict(hours)
    # the table is the route's rows, the watermark the route's
    params = {k: v for k, v in TS_QUERY.items() if k != "kind"}
    route = client.get(TS, params={**params, "limit": "10000"}, headers=headers)
    assert body["rows"] == [[p.get(c) for c in body["columns"]] for p in route.json()["series"]]
    assert body["watermark"] == route.headers["x-data-watermark"]
    assert data.headers["x-data-watermark"] == body["watermark"]


def test_a_widget_page_loads_nothing_from_elsewhere_and_frames_only_where_allowed(
        client, headers, stored):
    widget = made(client, headers, TS_QUERY)
    page = client.get(widget["url"])
    policy = dict(part.strip().split(" ", 1) for part in
                  page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == f"'self' {ORIGIN} https://bi.example.com:8443"
    assert page.headers["referrer-policy"] == "no-referrer"  # the token is in the URL
    assert "x-frame-options" not in page.headers  # would forbid every other origin
    links = Links(page.text)
    assert links.urls and not links.inline_scripts
    for url in links.urls:
        parts = urlsplit(url)
        assert not parts.scheme or parts.scheme == "data", url  # same origin, or inline data
        if not parts.scheme:
            asset = client.get(url)
            assert asset.status_code == 200 and asset.headers["cache-control"].startswith(
                "public, max-age=31536000"), url
    assert links.data_src == widget["url"] + "/data"


class Links(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.data_src = ""
        self._script = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for name in ("src", "href"):
            if name in a:
                self.urls.append(a[name])
        self._script = tag == "script" and "src" not in a
        if "data-src" in a:
            self.data_src = a["data-src"]

    def handle_data(self, data: str) -> None:
        if self._script and data.strip():
            self.inline_scripts += 1


def test_every_kind_and_chart_is_drawn(client, headers, stored):
    for query, chart in ((TS_QUERY, "bar"), (TS_QUERY, "table"), (FUNNEL, "funnel"),
                         ({"kind": "slice", "metric": "bets", "dim": "game_id", "from": DAY,
                           "to": "2025-10-24", "limit": "2"}, "bar"),
                         ({"kind": "retention", "cohort": "registration",
                           "start_date": DAY, "end_date": DAY, "days": [1, 7]}, "line"),
                         ({"kind": "ltv", "metric": "ggr", "start_date": DAY,
                           "end_date": DAY, "horizon": "3"}, "table")):
        data = client.get(made(client, headers, query, chart)["url"] + "/data")
        assert data.status_code == 200, (query, data.text)
        body = data.json()
        assert body["kind"] == query["kind"] and body["chart"] == chart
        for series in body["series"]:
            assert len(series["values"]) == len(body["x"]["values"])
    slice_ = client.get(made(client, headers, {
        "kind": "slice", "metric": "bets", "dim": "game_id", "from": DAY, "to": "2025-10-24",
        "limit": "2"}, "bar")["url"] + "/data").json()
    assert len(slice_["x"]["values"]) == 2 and slice_["more"]  # its top 2, as the route's
    funnel = client.get(made(client, headers, FUNNEL, "funnel")["url"] + "/data").json()
    route = client.post("/v1/analytics/funnel", headers=headers,
                        json={k: v for k, v in FUNNEL.items() if k != "kind"}).json()
    assert funnel["x"]["values"] == [s["name"] for s in route["steps"]]
    assert funnel["series"] == [{"name": "players",
                                 "values": [s["count"] for s in route["steps"]]}]
    assert funnel["series"][0]["values"][0] > 0


@pytest.mark.parametrize(("body", "status", "parameter"), [
    ({"query": TS_QUERY, "chart": "funnel"}, 400, "chart"),  # a funnel chart of a timeseries
    ({"query": FUNNEL, "chart": "line"}, 400, "chart"),
    ({"query": TS_QUERY, "chart": "pie"}, 400, None),
    ({"query": TS_QUERY, "chart": "line", "ttl_seconds": 86_401}, 400, None),
    ({"query": TS_QUERY, "chart": "line", "refresh_seconds": 1}, 400, None),
    ({"query": TS_QUERY, "chart": "line", "colour": "red"}, 400, None),
    ({"query": {**TS_QUERY, "metric": "nope"}, "chart": "line"}, 400, None),
    ({"query": {**TS_QUERY, "kind": "players"}, "chart": "line"}, 400, "query.kind"),
    ({"query": {**TS_QUERY, "player_id": "p1"}, "chart": "line"}, 400, None),
])
def test_a_bad_widget_is_refused_with_the_reason(client, headers, body, status, parameter):
    r = client.post(EMBEDS, json=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    if parameter is not None:
        assert r.json()["parameter"] == parameter


def test_making_a_widget_needs_analytics_read(client, auth):
    r = embed(client, auth(scopes="events:write"), TS_QUERY)
    assert r.status_code == 403 and r.json()["missing_scope"] == "analytics:read"
    assert embed(client, {}, TS_QUERY).status_code == 401


def test_a_confined_creator_cannot_widen_a_widget(client, auth, stored):
    """A brand-a client: a widget of brand-b is refused when made; its widget of "every
    brand" shows brand-a only; the data request takes no parameter to widen it; and a token
    edited to drop the creator's limits is refused."""
    limited = auth(brands="brand-a")
    other = embed(client, limited, {**TS_QUERY, "filters": "brand_id:brand-b"})
    assert other.status_code == 403, other.text
    widget = made(client, limited, TS_QUERY)
    body = client.get(widget["url"] + "/data").json()
    assert [s["name"] for s in body["series"]] == ["brand-a"]
    assert {row[1] for row in body["rows"]} == {"brand-a"}
    expected = ggr_by_brand_hour(stored, {"brand-a"})["brand-a"]
    drawn = dict(zip(body["x"]["values"], body["series"][0]["values"], strict=True))
    assert {h: v for h, v in drawn.items() if v} == dict(expected)
    for sneaky in ("filters=brand_id:brand-b", "brand_id=brand-b", "metric=deposits"):
        r = client.get(f"{widget['url']}/data?{sneaky}")
        assert r.status_code == 400 and r.json()["type"].endswith("unknown-parameter"), sneaky
    token = widget["url"].removeprefix("/embed/")
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["creator"]["brands"] = None
    forged = ".".join((head, base64.urlsafe_b64encode(json.dumps(claims).encode())
                       .decode().rstrip("="), signature))
    assert client.get(f"/embed/{forged}/data").status_code == 403
    page = client.get(f"/embed/{forged}")
    assert page.status_code == 403 and "This chart is not available" in page.text


def test_a_metrics_claim_is_kept_in_the_widget(client, auth, stored):
    ggr_only = auth(metrics="ggr")
    assert embed(client, ggr_only, {**TS_QUERY, "metric": "bets"}).status_code == 403
    assert client.get(made(client, ggr_only, TS_QUERY)["url"] + "/data").status_code == 200


def _resigned(client: TestClient, url: str, **changes: Any) -> str:
    """The widget's token with ``changes``, signed again with the deployment's key."""
    data_dir = client.app.state.runtime.settings.data_dir  # type: ignore[attr-defined]
    con = metadata.connect(data_dir)
    try:
        claims = jwt.decode(url.removeprefix("/embed/"), options={"verify_signature": False})
        key = metadata.deployment_key(con, tokens.KEY_NAME)
        return str(jwt.encode({**claims, **changes}, key, algorithm="HS256"))
    finally:
        con.close()


def test_tampered_expired_and_rekeyed_widgets_are_refused(client, headers, stored):
    widget = made(client, headers, TS_QUERY)
    token = widget["url"].removeprefix("/embed/")
    assert client.get(f"/embed/{token}/data").status_code == 200
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    expired = _resigned(client, widget["url"], exp=int(time.time()) - 5)
    unsigned = jwt.encode(jwt.decode(token, options={"verify_signature": False}), "",
                          algorithm="none")
    for bad, why in ((flipped, "not valid"), (expired, "expired"), (unsigned, "not valid"),
                     ("x" * 7000, "not one Tally made"), ("not.a.token", "not valid")):
        data = client.get(f"/embed/{bad}/data")
        assert data.status_code == 403 and why in data.json()["detail"], (bad[:40], data.text)
        assert data.json()["type"].endswith("embed-refused")
        page = client.get(f"/embed/{bad}")
        assert page.status_code == 403 and page.headers["content-type"].startswith("text/html")
    # the widget's token is no bearer token, and a bearer token no widget
    assert client.get(TS, params={"metric": "ggr", "granularity": "1h", "from": DAY,
                                  "to": "2025-10-24"},
                      headers={"Authorization": f"Bearer {token}"}).status_code == 401
    access = headers["Authorization"].removeprefix("Bearer ")
    assert client.get(f"/embed/{access}/data").status_code == 403
    # replacing the key (the operator's command, while the server runs) takes every widget down
    done = cli("keys", "rotate-embed-key", "--json",
               data_dir=client.app.state.runtime.settings.data_dir)  # type: ignore[attr-defined]
    assert done.returncode == 0 and json.loads(done.stdout) == {"rotated": "embed_tokens"}
    assert client.get(f"/embed/{token}/data").status_code == 403
    assert client.get(made(client, headers, TS_QUERY)["url"] + "/data").status_code == 200


def test_a_revoked_creator_takes_its_widgets_down(client, headers, stored):
    widget = made(client, headers, TS_QUERY)
    client_id = jwt.decode(headers["Authorization"].removeprefix("Bearer "),
                           options={"verify_signature": False})["client_id"]
    con = metadata.connect(client.app.state.runtime.settings.data_dir)  # type: ignore[attr-defined]
    try:
        revoke_client(con, client_id)
    finally:
        con.close()
    deadline = time.monotonic() + 5  # the server sees the commit within a second
    while client.get(widget["url"] + "/data").status_code != 403:
        assert time.monotonic() < deadline, "a revoked creator's widget still answers"
        time.sleep(0.1)
    assert "no longer has access" in client.get(widget["url"]).text


def test_widget_data_is_revalidated_with_its_etag(client, headers, stored):
    widget = made(client, headers, TS_QUERY)
    first = client.get(widget["url"] + "/data")
    tag = first.headers["etag"]
    again = client.get(widget["url"] + "/data", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""
    route = client.get(TS, params={k: v for k, v in TS_QUERY.items() if k != "kind"},
                       headers=headers)
    assert route.headers["etag"] != tag  # another representation, another validator
    more = [{**e, "event_id": e["event_id"] + "-late"} for e in _events()[:3]]
    client.post(BATCH, content=json.dumps(more),
                headers={**headers, "Content-Type": "application/json"})
    changed = client.get(widget["url"] + "/data", headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag


def test_widgets_made_and_viewed_are_audited_under_their_creator(client, headers, auth, stored):
    widget = made(client, headers, TS_QUERY, chart="bar")
    client.get(widget["url"])
    client.get(widget["url"] + "/data")
    client.get("/embed/forged.token.here")
    entries = client.get("/v1/admin/audit", params={"limit": "1000"},
                         headers=auth(scopes="admin")).json()["items"]
    mine = [e for e in entries if e["kind"] == "embed"]
    seen = [(e["method"], e["route"], e["status"], e["params"].get("embed")) for e in mine]
    assert seen == [("POST", "/v1/embeds", 201, widget["id"]),
                    ("GET", "/embed/{token}", 200, widget["id"]),
                    ("GET", "/embed/{token}/data", 200, widget["id"]),
                    ("GET", "/embed/{token}", 403, None)]
    creator = mine[0]["actor"]["client_id"]
    assert [e["actor"]["client_id"] for e in mine[:3]] == [creator] * 3
    assert mine[3]["actor"] is None and mine[3]["outcome"] == "denied"
    assert all(widget["url"].removeprefix("/embed/") not in json.dumps(e) for e in mine)
    assert mine[2]["rows"] == 48  # 24 hours × 2 brands


def test_more_series_than_drawn_are_counted_and_all_in_the_table(client, headers):
    events = [e for i in range(MAX_SERIES + 3) for e in _events()[:2]
              for e in [{**e, "event_id": f"{e['event_id']}-{i}",
                         "payload": {**e["payload"], "game_id": f"game-{i:02d}"}}]]
    client.post(BATCH, content=json.dumps(events),
                headers={**headers, "Content-Type": "application/json"})
    body = client.get(made(client, headers, {**TS_QUERY, "group_by": "game_id"})["url"]
                      + "/data").json()
    assert len(body["series"]) == MAX_SERIES and body["omitted"] == 3
    assert len({row[1] for row in body["rows"]}) == MAX_SERIES + 3


def test_embed_origins_must_be_origins(tmp_path):
    with pytest.raises(ValueError, match="TALLY_EMBED_ORIGINS entry"):
        Settings(data_dir=tmp_path, embed_origins="https://ok.example.com,*")
    with TestClient(create_app(Settings(data_dir=tmp_path / "d", regions="EU"))) as client:
        widget = made(client, bearer(client, tmp_path / "d"), TS_QUERY)
        policy = client.get(widget["url"]).headers["content-security-policy"]
        assert "frame-ancestors 'self';" in policy + ";"  # none listed: Tally's own pages



def test_cohort_widgets_draw_their_answers(client, headers):
    """Retention: a series per dN share over the cohort days; LTV: a series per cohort over
    the days since its start — each value the route's."""
    from tests.cells import player_day

    events = [e for i in range(8) for e in player_day("brand-a", "EU", f"pa-{i}",
                                                       datetime(2025, 10, 23, 1 + i))]
    events += player_day("brand-a", "EU", "pa-later", datetime(2025, 10, 27, 12))
    r = client.post(BATCH, content=json.dumps(events),
                    headers={**headers, "Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["rejected"] == 0, r.text
    retention = {"cohort": "registration", "start_date": DAY, "end_date": DAY, "days": [0, 1]}
    answer = client.post("/v1/analytics/retention", json=retention, headers=headers).json()
    drawn = client.get(made(client, headers, {"kind": "retention", **retention}, "bar")["url"]
                       + "/data").json()
    assert drawn["unit"] == "share" and drawn["x"]["values"] == [DAY]
    assert drawn["series"] == [{"name": f"d{n}", "values": [row[f"d{n}"] for row in
                                                           answer["rows"]]} for n in (0, 1)]
    assert drawn["series"][0]["values"] == [1.0]  # every player of the day came on day 0
    ltv = {"cohort": "first_deposit", "start_date": DAY, "end_date": DAY, "horizon": "2d"}
    cohorts = client.get("/v1/analytics/ltv", params=ltv, headers=headers).json()["cohorts"]
    drawn = client.get(made(client, headers, {"kind": "ltv", **ltv}, "line")["url"]
                       + "/data").json()
    assert drawn["x"] == {"name": "day", "kind": "number", "values": [0, 1]}
    assert drawn["series"] == [{"name": c["date"], "values": c["ltv_minor"]} for c in cohorts]
    assert drawn["unit"] == "money" and len(cohorts) == 1


def test_a_query_too_long_for_a_url_is_refused(client, headers):
    games = ",".join(f"game_id:{'g' * 100}{n}" for n in range(60))  # ~6.5 KB of filters
    r = embed(client, headers, {"kind": "slice", "metric": "ggr", "dim": "game_id",
                                "from": DAY, "to": "2025-10-24", "filters": games}, "bar")
    assert r.status_code == 400 and r.json()["parameter"] == "query", r.text
    assert "too long" in r.json()["detail"]


def test_refused_links_spend_their_senders_bucket_not_the_widgets(tmp_path):
    """Guessing links from one address is rate limited (the token-request bucket per
    address); real widgets' views are charged to their creators, untouched by it."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM",
                        rate_token_source="1/s burst 3")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        widget = made(client, bearer(client, settings.data_dir), TS_QUERY)
        statuses = [client.get(f"/embed/guess-{n}/data").status_code for n in range(6)]
        assert statuses[:2] == [403, 403] and statuses[-1] == 429, statuses
        assert client.get("/embed/guess-page").status_code == 429  # the page too
        assert all(client.get(widget["url"] + "/data").status_code == 200 for _ in range(5))

"""Embedded widgets in a real browser (Debian's Chromium, driven by Playwright): framed by
another site's page, the widget draws its chart (checked in a screenshot: not empty, one
colour per expected series), asks nothing of any origin but Tally's, refuses to be framed by
an origin not in ``TALLY_EMBED_ORIGINS``, shows an error page for a tampered link, refreshes
itself, fits a phone, and a brand-limited creator's widget never shows another brand."""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx2 as httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Frame, Page, sync_playwright

from tests.conftest import make_event
from tests.server import Server, free_port, new_client, token

pytestmark = pytest.mark.slow  # a real server and a real browser

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
DAY = "2025-10-23"
# embed.js's first two series colours
SERIES_COLOURS = ((0x1F, 0x6F, 0xB4), (0xC0, 0x39, 0x2B))
TS_QUERY = {"kind": "timeseries", "metric": "ggr", "granularity": "1h",
            "from": f"{DAY}T00:00:00Z", "to": "2025-10-24T00:00:00Z", "group_by": "brand_id"}


class Host:
    """Another site (another origin: its own port) whose page frames a URL: ``/frame?src=``."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                src = parse_qs(urlsplit(self.path).query).get("src", [""])[0]
                body = (f'<!DOCTYPE html><html><body><h1>Back office</h1>'
                        f'<iframe id="w" src="{src}" width="640" height="520" '
                        f'title="widget"></iframe></body></html>').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def frame_url(self, src: str) -> str:
        return f"{self.origin}/frame?src={src}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _events(start: int = 0, hours: int = 24) -> list[dict[str, Any]]:
    return [make_event(tenant_id="brand-a" if i % 3 else "brand-b", player_id=f"p{i % 11}",
                       occurred_at=f"{DAY}T{(i % hours):02d}:{i % 60:02d}:00Z",
                       payload={"bet_id": f"b{i}", "stake_minor": 1000 + 37 * i,
                                "win_minor": 11 * i, "currency": "EUR",
                                "game_id": f"g{i % 4}", "provider_id": "studio"})
            for i in range(start, start + 240)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():  # the test setup installs it (make test; README)
        subprocess.run(["bash", str(ROOT / "scripts" / "install-chromium.sh")], check=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A running Tally (its widgets framable by ``allowed``), ``stranger`` (a site not
    listed), a creator of every brand and one of brand-a only, 240 bets in two brands."""
    allowed, stranger = Host(), Host()
    data = tmp_path_factory.mktemp("embeds") / "data"
    everyone, brand_a = new_client(data), new_client(data, brands="brand-a")
    server = Server(data, env={"TALLY_EMBED_ORIGINS": allowed.origin})
    try:
        headers = token(server.url, *everyone)
        r = httpx.post(f"{server.url}/v1/events:batch", content=json.dumps(_events()),
                       headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 202 and r.json()["accepted"] == 240, r.text
        yield {"url": server.url, "allowed": allowed, "stranger": stranger,
               "everyone": headers, "brand_a": token(server.url, *brand_a)}
    finally:
        server.stop()
        allowed.close()
        stranger.close()


def widget(site: dict[str, Any], who: str, query: dict[str, Any], chart: str,
           **extra: Any) -> str:
    r = httpx.post(f"{site['url']}/v1/embeds", headers=site[who],
                   json={"query": query, "chart": chart, **extra})
    assert r.status_code == 201, r.text
    return f"{site['url']}{r.json()['url']}"


class Visit:
    """A page opened in a fresh context, with every request and console message kept."""

    def __init__(self, browser: Browser, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.page: Page = self.context.new_page()
        self.requests: list[str] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def close(self) -> None:
        self.context.close()


def ready(frame: Frame | Page) -> None:
    frame.wait_for_selector("#tally-embed[data-state=ready]", timeout=20_000)


def colours_in(png: bytes) -> tuple[float, list[bool]]:
    """The share of pixels that are not background, and which series colours appear."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = list(image.get_flattened_data())
    inked = sum(1 for p in pixels if sum(p) < 3 * 235) / len(pixels)
    found = [sum(1 for p in pixels if all(abs(a - b) <= 24 for a, b in zip(p, c, strict=True)))
             >= 30 for c in SERIES_COLOURS]
    return inked, found


def test_a_widget_draws_its_chart_inside_another_sites_page(browser, site):
    url = widget(site, "everyone", TS_QUERY, "line", title="GGR by brand")
    data = httpx.get(f"{url}/data").json()
    visit = Visit(browser)
    try:
        visit.page.goto(site["allowed"].frame_url(url))
        frame = visit.page.frame_locator("#w")
        inner = visit.page.frames[1]
        ready(inner)
        assert inner.get_attribute("#tally-embed", "data-series") == "2"
        assert frame.locator(".u-legend .u-series").count() == 1 + 2  # x, then a series each
        assert frame.locator("h1").inner_text() == "GGR by brand"
        assert frame.locator("#watermark").inner_text() == data["watermark"]
        assert frame.locator("#table tbody tr").count() == len(data["rows"]) == 48
        shot = visit.page.locator("#w").screenshot()
        inked, found = colours_in(shot)
        assert inked > 0.03, f"the chart looks empty ({inked:.1%} inked)"
        assert found == [True, True], "each series' colour should be drawn"
        elsewhere = [u for u in visit.requests
                     if not u.startswith((site["url"] + "/", site["allowed"].origin + "/",
                                          "data:"))]
        assert elsewhere == []
        assert any(u.startswith(f"{site['url']}/embed/assets/uPlot") for u in visit.requests)
        assert [m for m in visit.console if m.startswith(("error", "pageerror"))] == []
    finally:
        visit.close()


def test_a_widget_is_not_framed_by_an_origin_not_listed(browser, site):
    url = widget(site, "everyone", TS_QUERY, "line")
    visit = Visit(browser)
    try:
        visit.page.goto(site["stranger"].frame_url(url))
        visit.page.wait_for_timeout(1500)
        inner = visit.page.frames[1]
        assert inner.query_selector("#tally-embed") is None
        assert any("frame-ancestors" in m for m in visit.console), visit.console
    finally:
        visit.close()


def test_a_tampered_link_shows_an_error_page(browser, site):
    url = widget(site, "everyone", TS_QUERY, "line")
    head, payload, signature = url.rsplit("/", 1)[1].split(".")
    tampered = f"{site['url']}/embed/{head}.{payload}.{signature[::-1]}"
    visit = Visit(browser)
    try:
        response = visit.page.goto(tampered)
        assert response is not None and response.status == 403
        assert visit.page.locator("h1").inner_text() == "This chart is not available"
        assert "not valid" in visit.page.locator("main").inner_text()
        assert visit.page.query_selector("#tally-embed") is None
    finally:
        visit.close()


def test_a_brand_limited_creators_widget_never_shows_another_brand(browser, site):
    url = widget(site, "brand_a", TS_QUERY, "line")
    visit = Visit(browser)
    try:
        visit.page.goto(site["allowed"].frame_url(url))
        inner = visit.page.frames[1]
        ready(inner)
        assert inner.get_attribute("#tally-embed", "data-series") == "1"
        text = inner.inner_text("body") + inner.inner_html("#table")
        assert "brand-a" in text and "brand-b" not in text
        rows = inner.eval_on_selector_all("#table tbody td:nth-child(2)",
                                          "els => els.map(e => e.textContent)")
        assert rows and set(rows) == {"brand-a"}
        inked, found = colours_in(visit.page.locator("#w").screenshot())
        assert inked > 0.03 and found == [True, False]  # one series drawn, no second colour
    finally:
        visit.close()


def test_funnel_bar_and_table_widgets_fit_a_phone(browser, site):
    funnel = {"kind": "funnel", "steps": ["bet.settled", "bet.settled"], "window_sec": 86400,
              "from": f"{DAY}T00:00:00Z", "to": "2025-10-24T00:00:00Z"}
    slice_ = {"kind": "slice", "metric": "ggr", "dim": "game_id", "from": DAY,
              "to": "2025-10-24"}
    phone = {"viewport": {"width": 360, "height": 640}, "is_mobile": True,
             "device_scale_factor": 2}
    for query, chart, bars in ((funnel, "funnel", 2), (slice_, "bar", 4), (slice_, "table", 0)):
        url = widget(site, "everyone", query, chart)
        data = httpx.get(f"{url}/data").json()
        visit = Visit(browser, **phone)
        try:
            visit.page.goto(url)
            ready(visit.page)
            assert visit.page.locator("li.bar-row").count() == bars
            assert visit.page.locator("#table tbody tr").count() == len(data["rows"]) > 0
            overflow = visit.page.evaluate(
                "document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{chart}: {overflow}px wider than the phone"
            inked, _ = colours_in(visit.page.screenshot())
            assert inked > 0.02
            if chart == "bar":  # the biggest bar is the first (a slice is ranked)
                widths = visit.page.eval_on_selector_all(
                    ".bar-fill", "els => els.map(e => e.getBoundingClientRect().width)")
                assert widths == sorted(widths, reverse=True) and widths[0] > 100
        finally:
            visit.close()


def test_a_widget_refreshes_itself(browser, site):
    query = {**TS_QUERY, "group_by": None, "metric": "bets"}
    query.pop("group_by")
    url = widget(site, "everyone", query, "line", refresh_seconds=10)
    visit = Visit(browser)
    try:
        visit.page.goto(url)
        ready(visit.page)
        before = visit.page.locator("#table tbody tr").count()
        cells = "els => els.map(e => e.textContent)"
        first = visit.page.eval_on_selector_all("#table tbody td:nth-child(2)", cells)
        more = [make_event(tenant_id="brand-a", player_id="late", occurred_at=f"{DAY}T05:30:00Z",
                           payload={"bet_id": f"late{i}", "stake_minor": 500, "win_minor": 0,
                                    "currency": "EUR", "game_id": "g1",
                                    "provider_id": "studio"}) for i in range(7)]
        r = httpx.post(f"{site['url']}/v1/events:batch", content=json.dumps(more),
                       headers={**site["everyone"], "Content-Type": "application/json"})
        assert r.status_code == 202
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = visit.page.eval_on_selector_all("#table tbody td:nth-child(2)", cells)
            if now != first:
                break
            visit.page.wait_for_timeout(500)
        assert now != first, "the widget did not refresh"
        assert visit.page.locator("#table tbody tr").count() == before
        assert int(now[5]) == int(first[5]) + 7  # 05:00's bets, 7 more
    finally:
        visit.close()

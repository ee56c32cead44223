"""The API reference pages (``/docs``, ``/redoc``) are served by Tally itself: they name no
other origin, every asset they reference is served with its content type, and the headers the
pages and assets are sent with (the pages' own CSP, ``nosniff``) let a browser use them."""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser
from importlib.resources import files
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest

from tally.api import docs
from tests.server import Server

PAGES = ("/docs", "/redoc")
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class Page(HTMLParser):
    """The URLs a page makes the browser load, by kind, and its inline scripts."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.images: list[str] = []
        self.fetches: list[str] = []  # what a script fetches: the OpenAPI document
        self.links: list[str] = []  # <a href>: followed only if clicked
        self.inline_scripts: list[str] = []
        self._in_script = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self._in_script = "src" not in a
            if "src" in a:
                self.scripts.append(a["src"])
        elif tag == "link" and a.get("rel") == "stylesheet":
            self.styles.append(a["href"])
        elif tag == "link":
            self.images.append(a["href"])  # rel="icon"
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "redoc":
            self.fetches.append(a["spec-url"])
        if "data-openapi-url" in a:
            self.fetches.append(a["data-openapi-url"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts.append(data)

    def urls(self) -> list[str]:
        return self.scripts + self.styles + self.images + self.fetches + self.links


def csp(header: str) -> dict[str, list[str]]:
    directives = (part.split() for part in header.split(";") if part.strip())
    return {name: sources for name, *sources in directives}


def allows_self(policy: dict[str, list[str]], directive: str) -> bool:
    sources = policy.get(directive, policy.get("default-src", ["*"]))
    return "'self'" in sources or "*" in sources


@pytest.mark.parametrize("path", PAGES)
def test_the_pages_name_only_their_own_origin(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "//" not in response.text.replace("<!DOCTYPE html>", "")  # no URL with a host
    page = Page(response.text)
    assert page.scripts and page.images and page.fetches == ["/openapi.json"]
    for url in page.urls():
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("", "") and url.startswith("/"), url


@pytest.mark.parametrize("path", PAGES)
def test_every_asset_a_page_references_is_served_with_its_type(client, path):
    page = Page(client.get(path).text)
    for url in page.scripts + page.styles + page.images:
        response = client.get(url)
        assert response.status_code == 200, url
        suffix = "." + urlsplit(url).path.rsplit(".", 1)[1]
        assert response.headers["content-type"].split(";")[0] == TYPES[suffix], url
        assert response.headers["x-content-type-options"] == "nosniff"  # so the type must fit
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        # the URL's version is the body's hash: a new bundle is a new URL, never a stale cache
        version = urlsplit(url).query.removeprefix("v=")
        assert version == hashlib.sha256(response.content).hexdigest()[:16]
    document = client.get(page.fetches[0])
    assert document.status_code == 200 and document.json()["openapi"].startswith("3.1")


@pytest.mark.parametrize("path", PAGES)
def test_the_page_headers_let_the_browser_load_them(client, path):
    response = client.get(path)
    page = Page(response.text)
    policy = csp(response.headers["content-security-policy"])
    # no inline script at all, so the policy need not (and does not) allow one
    assert page.inline_scripts == []
    assert "'unsafe-inline'" not in policy["script-src"]
    for directive, urls in (("script-src", page.scripts), ("style-src", page.styles),
                            ("img-src", page.images), ("connect-src", page.fetches)):
        assert urls == [] or allows_self(policy, directive), directive
    # and it keeps what the bundles fetch on their own on this origin (ReDoc's vendor logo,
    # Swagger UI's online validator): no source in the policy names a host
    sources = [s for values in policy.values() for s in values]
    assert all(s.startswith("'") or s in ("data:", "blob:") for s in sources), sources
    assert policy["default-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]


def test_swagger_ui_starts_from_a_served_script_without_the_online_validator(client):
    page = Page(client.get("/docs").text)
    bundle, init = page.scripts  # the bundle first, then what starts it
    assert urlsplit(bundle).path == "/docs/assets/swagger-ui-bundle.js"
    script = client.get(init).text
    assert "SwaggerUIBundle(" in script and "root.dataset.openapiUrl" in script
    assert "validatorUrl: null" in script


def test_the_assets_are_the_vendored_bundles(client):
    static = files("fastapi_offline").joinpath("static")
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js",
                 "favicon.png"):
        assert client.get(f"/docs/assets/{name}").content == static.joinpath(name).read_bytes()


@pytest.mark.parametrize("name", ["nope.js", "..%2Fcore.py", "__init__.py", "static"])
def test_only_the_known_assets_are_served(client, name):
    response = client.get(f"/docs/assets/{name}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_behind_a_proxy_prefix_the_pages_keep_it(settings):
    from fastapi.testclient import TestClient

    from tally.api.app import create_app

    client = TestClient(create_app(settings), root_path="/tally")
    for path in PAGES:
        page = Page(client.get(path).text)
        assert page.fetches == ["/tally/openapi.json"]
        assert all(url.startswith("/tally/docs/assets/") for url in page.scripts + page.images)


def test_the_docs_routes_are_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]
    routes = {getattr(r, "path", None) for r in client.app.routes}
    assert docs.PATHS <= routes


@pytest.mark.slow
def test_a_real_server_serves_the_pages_and_their_assets(tmp_path):
    server = Server(tmp_path / "data")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for path in PAGES:
                response = http.get(path)
                assert response.status_code == 200
                assert "content-security-policy" in response.headers
                page = Page(response.text)
                for url in page.scripts + page.styles + page.images + page.fetches:
                    asset = http.get(url)
                    assert asset.status_code == 200, url
                    assert asset.content, url
    finally:
        server.stop()

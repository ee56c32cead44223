"""The API reference served by Tally itself: Swagger UI at ``/docs``, ReDoc at ``/redoc``, and
the stable text of the OpenAPI document that is committed as ``openapi.json``.

FastAPI's own pages load their scripts from a CDN, blank on a network without one; these load
the Swagger UI and ReDoc bundles vendored by the ``fastapi-offline`` package (MIT; Swagger UI
is Apache-2.0, ReDoc MIT) from ``/docs/assets/{name}``, and no page names another origin.

- The pages carry no inline script: Swagger UI starts from ``swagger-init.js``, served with
  the bundles, which reads the document's URL from the page; ReDoc starts itself from its
  ``<redoc spec-url>`` element. A policy with ``script-src 'self'`` therefore runs them.
- The pages' own ``Content-Security-Policy`` keeps the browser on this origin for everything
  they fetch (ReDoc's menu shows a logo from its vendor's CDN, Swagger UI's validator badge
  asks an online validator: both blocked). Scripts may still ``eval`` and start ``blob:``
  workers, which the bundles need (ReDoc compiles schemas and searches in a worker).
- Assets are only the known files, each with its content type (responses are ``nosniff``),
  cached for a year: their URLs carry a hash of their bytes, so a new version is a new URL.
- None of these routes is in the OpenAPI document (``include_in_schema=False``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from html import escape
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

DOCS_URL, REDOC_URL, ASSETS_URL = "/docs", "/redoc", "/docs/assets"
PATHS = frozenset({DOCS_URL, REDOC_URL, f"{ASSETS_URL}/{{name}}"})  # the routes added here
ASSET_CACHE = "public, max-age=31536000, immutable"
PAGE_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self' 'unsafe-eval'",  # no inline script; ReDoc's schema compiler evals
    "worker-src 'self' blob:",  # ReDoc's search worker
    "style-src 'self' 'unsafe-inline'",  # both set style attributes, ReDoc adds <style>
    "img-src 'self' data: blob:",
    "font-src 'self' data:",
    "connect-src 'self'",  # the document and "Try it out"; no online validator
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'self'",
))

SWAGGER_INIT = """\
"use strict";
// Starts Swagger UI on the page's #swagger-ui element (served, not inline: see tally.api.docs)
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]
  });
})();
"""

JS, CSS, PNG = "text/javascript; charset=utf-8", "text/css; charset=utf-8", "image/png"


def _vendored(name: str) -> Callable[[], bytes]:
    return lambda: files("fastapi_offline").joinpath("static", name).read_bytes()


ASSETS: Mapping[str, tuple[str, Callable[[], bytes]]] = {
    "swagger-ui-bundle.js": (JS, _vendored("swagger-ui-bundle.js")),
    "swagger-ui.css": (CSS, _vendored("swagger-ui.css")),
    "redoc.standalone.js": (JS, _vendored("redoc.standalone.js")),
    "favicon.png": (PNG, _vendored("favicon.png")),
    "swagger-init.js": (JS, SWAGGER_INIT.encode),
}


@dataclass(frozen=True)
class Asset:
    content_type: str
    body: bytes
    version: str  # a hash of the body: the URL's ?v=


class Assets:
    """Files served at ``{url}/{name}``, each read once, with its content type, cached for a
    year (a URL carries a hash of its file's bytes, so a new version is a new URL)."""

    def __init__(self, url: str, files_: Mapping[str, tuple[str, Callable[[], bytes]]]) -> None:
        self.url, self.files = url, files_
        self.get = cache(self._read)

    def _read(self, name: str) -> Asset:
        content_type, read = self.files[name]
        body = read()
        return Asset(content_type, body, hashlib.sha256(body).hexdigest()[:16])

    def href(self, root: str, name: str) -> str:
        """The URL of ``name`` (escaped for an HTML attribute)."""
        return escape(f"{root}{self.url}/{name}?v={self.get(name).version}")

    def install(self, app: FastAPI) -> None:
        @app.get(f"{self.url}/{{name}}", include_in_schema=False)
        def served_asset(name: str) -> Response:
            if name not in self.files:
                raise HTTPException(404, f"no asset {name!r}")
            found = self.get(name)
            return Response(found.body, media_type=found.content_type,
                            headers={"Cache-Control": ASSET_CACHE})


DOCS_ASSETS = Assets(ASSETS_URL, ASSETS)


def _url(root: str, name: str) -> str:
    return DOCS_ASSETS.href(root, name)


def html_page(title: str, head: str, body: str, policy: str, status: int = 200,
              headers: Mapping[str, str] | None = None) -> HTMLResponse:
    """A page with no inline script, under its own ``Content-Security-Policy``."""
    html = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(title)}</title>\n{head}</head>\n<body>\n{body}</body>\n</html>\n")
    return HTMLResponse(html, status_code=status,
                        headers={"Content-Security-Policy": policy, **(headers or {})})


def _page(title: str, head: str, body: str) -> HTMLResponse:
    return html_page(title, head, body, PAGE_POLICY)


def swagger_page(title: str, root: str, openapi_url: str) -> HTMLResponse:
    return _page(
        f"{title} - Swagger UI",
        f'<link rel="stylesheet" href="{_url(root, "swagger-ui.css")}">\n'
        f'<link rel="icon" type="image/png" href="{_url(root, "favicon.png")}">\n',
        f'<div id="swagger-ui" data-openapi-url="{escape(root + openapi_url)}"></div>\n'
        f'<script src="{_url(root, "swagger-ui-bundle.js")}"></script>\n'
        f'<script src="{_url(root, "swagger-init.js")}"></script>\n')


def redoc_page(title: str, root: str, openapi_url: str) -> HTMLResponse:
    return _page(  # no Google fonts: ReDoc falls back to the browser's sans-serif
        f"{title} - ReDoc",
        f'<link rel="icon" type="image/png" href="{_url(root, "favicon.png")}">\n'
        "<style>body { margin: 0; padding: 0; }</style>\n",
        "<noscript>ReDoc needs JavaScript: the document itself is at "
        f'<a href="{escape(root + openapi_url)}">{escape(root + openapi_url)}</a>.</noscript>\n'
        f'<redoc spec-url="{escape(root + openapi_url)}"></redoc>\n'
        f'<script src="{_url(root, "redoc.standalone.js")}"></script>\n')


def install(app: FastAPI) -> None:
    """Serve the pages and their assets; ``create_app`` turns FastAPI's own pages off."""
    openapi_url = app.openapi_url or "/openapi.json"

    def root_path(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        return swagger_page(app.title, root_path(request), openapi_url)

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        return redoc_page(app.title, root_path(request), openapi_url)

    DOCS_ASSETS.install(app)


def openapi_text(document: Mapping[str, Any]) -> str:
    """The committed form of an OpenAPI document: keys sorted, two-space indents, UTF-8
    characters as they are, one newline at the end (``tally openapi``, ``make openapi``)."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

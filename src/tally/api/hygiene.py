"""HTTP hygiene on every response: security headers, a safe cache default, CORS only for an
explicit allow-list, and the deprecation signal for routes that ``/v2`` will replace.

- ``X-Content-Type-Options: nosniff`` everywhere.
- A response that does not say how to cache it gets ``Cache-Control: no-store``: tenant data
  is cacheable only where a route says so, and then ``private`` (``api/caching.py``). Token
  responses also carry ``Pragma: no-cache`` (RFC 6749 §5.1), errors included.
- CORS (``TALLY_CORS_ORIGINS``) is off unless origins are listed; never ``*``, never with
  credentials (tokens travel in ``Authorization``, which needs no cookies).
- ``TALLY_DEPRECATIONS`` maps a route template (or a prefix ending in ``*``) to its
  ``Deprecation`` (RFC 9745, ``@<epoch seconds>``), ``Sunset`` (RFC 8594, HTTP-date) and
  ``Link: <…>; rel="deprecation"`` headers.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.config_values import DeprecationRule, check_cors_origins

NO_STORE_PATHS = ("/oauth/token",)  # RFC 6749 §5.1: no-store and Pragma: no-cache
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "X-Idempotency-Key", "If-None-Match",
                      "traceparent")
CORS_EXPOSE_HEADERS = ("ETag", "X-Data-Watermark", "X-Trace-Id", "Retry-After", "Deprecation",
                       "Sunset", "Link", "RateLimit", "RateLimit-Policy")


class Deprecations:
    """Route template → rule; exact templates win over prefixes, longer prefixes over
    shorter ones."""

    def __init__(self, rules: Mapping[str, DeprecationRule]) -> None:
        self._exact = {p: r for p, r in rules.items() if not p.endswith("*")}
        self._prefixes = sorted(((p[:-1], r) for p, r in rules.items() if p.endswith("*")),
                                key=lambda item: -len(item[0]))

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def rule_for(self, path: str) -> DeprecationRule | None:
        rule = self._exact.get(path)
        if rule is not None:
            return rule
        return next((r for prefix, r in self._prefixes if path.startswith(prefix)), None)


class HygieneMiddleware:
    """Pure ASGI, like ``TraceMiddleware``: headers are added as the response starts."""

    def __init__(self, app: ASGIApp, deprecations: Deprecations) -> None:
        self.app = app
        self.deprecations = deprecations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._decorate(scope, MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _decorate(self, scope: Scope, headers: MutableHeaders) -> None:
        headers.setdefault("X-Content-Type-Options", "nosniff")
        path: str = scope["path"]
        if path in NO_STORE_PATHS:
            headers["Cache-Control"] = "no-store"
            headers["Pragma"] = "no-cache"
        else:
            headers.setdefault("Cache-Control", "no-store")
        if self.deprecations:
            template = getattr(scope.get("route"), "path", None) or path
            rule = self.deprecations.rule_for(template)
            if rule is not None:
                for name, value in rule.headers():
                    headers.append(name, value)


def install(app: FastAPI, cors_origins: str,
            deprecations: Mapping[str, DeprecationRule]) -> None:
    """Add the middleware; called once by ``create_app``. Hygiene wraps CORS, so preflight
    answers get the headers too."""
    origins = check_cors_origins(cors_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=list(CORS_ALLOW_HEADERS),
                           expose_headers=list(CORS_EXPOSE_HEADERS), max_age=600)
    app.add_middleware(HygieneMiddleware, deprecations=Deprecations(deprecations))

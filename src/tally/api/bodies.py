"""Every request body is bounded, typed and timely while it streams in, before any route runs.

One pure-ASGI middleware (:class:`BodyMiddleware`) holds the rule of each route that takes a
body (:func:`body_rules`): its byte limit, and whether it must be declared JSON. Before the app
runs, a declared ``Content-Length`` over the limit is ``413`` and a JSON route's body that is
not declared JSON is ``415`` — so a 300 MiB body costs no authentication work and no memory.
While the app reads, the body is counted chunk by chunk (a chunked body has no
``Content-Length``): one byte over the limit is ``413``; a client that sends nothing for
``TALLY_BODY_TIMEOUT_SECONDS``, or slower than ``TALLY_BODY_MIN_RATE`` bytes a second on
average, is ``408``. Routes read the body with ``await request.body()`` and never check its
size themselves.

A response that starts before the request body was read to its end carries
``Connection: close``: otherwise uvicorn would go on reading (and discarding) the rest of the
body on a kept-alive connection, for as long as the client cares to send it.

Starlette's ``RequestBodyLimitMiddleware`` is not used: it checks a declared length only once
the app reads or answers (after authentication), has one limit per route object fixed at
import time (ingestion's comes from the settings), and knows neither media types nor time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tally.api.problems import user_error_response
from tally.config import Settings
from tally.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType, UserError

KIB = 1024
TOKEN_BODY_LIMIT = 8 * KIB  # a client-credentials form is under 200 bytes
QUERY_BODY_LIMIT = 64 * KIB  # a funnel or retention query
FX_BODY_LIMIT = 1024 * KIB  # a year of daily rates for 50 currencies is about 900 KiB
DEFAULT_BODY_LIMIT = 64 * KIB  # every other route (most take no body at all)
JSON = "application/json"


@dataclass(frozen=True)
class BodyRule:
    """What one route accepts as a body."""

    limit: int  # bytes
    json: bool  # must be declared JSON (``415`` otherwise)
    what: str  # named in the ``413`` detail


DEFAULT_RULE = BodyRule(DEFAULT_BODY_LIMIT, False, "a request")


def body_rules(settings: Settings) -> dict[tuple[str, str], BodyRule]:
    """(method, path) → rule; a route not listed gets :data:`DEFAULT_RULE` (64 KiB, any
    type): a new route with a JSON body adds its rule here."""
    query = BodyRule(QUERY_BODY_LIMIT, True, "a query")
    return {
        ("POST", "/v1/events:batch"): BodyRule(settings.max_batch_bytes, True, "a batch"),
        ("POST", "/oauth/token"): BodyRule(TOKEN_BODY_LIMIT, False, "a token request"),
        ("POST", "/v1/analytics/funnel"): query,
        ("POST", "/v1/analytics/retention"): query,
        ("POST", "/v1/admin/fx-rates"): BodyRule(FX_BODY_LIMIT, True, "an FX rates request"),
        # a rotation takes no body: any byte of one is refused (413) before it is read on
        ("POST", "/v1/webhook-secret"): BodyRule(0, False, "a secret rotation"),
        ("POST", "/v1/exports"): BodyRule(QUERY_BODY_LIMIT, True, "an export request"),
        ("POST", "/v1/embeds"): BodyRule(QUERY_BODY_LIMIT, True, "an embed request"),
        ("POST", "/v1/alerts"): BodyRule(QUERY_BODY_LIMIT, True, "an alert rule"),
    }


def is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/<anything>+json`` (RFC 6839), with no charset or
    UTF-8 (JSON is UTF-8, RFC 8259 §8.1)."""
    if content_type is None:
        return False
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        return False
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


class BodyReader:
    """One request's ``receive``: counts the body against its limit and its client's pace."""

    def __init__(self, receive: Receive, rule: BodyRule, headers: Headers, timeout: float,
                 min_rate: int) -> None:
        self.receive, self.rule = receive, rule
        self.timeout, self.min_rate = timeout, min_rate
        declared = declared_length(headers)
        self.done = declared in (None, 0) and "transfer-encoding" not in headers  # no body
        self.declared = declared
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for the client (not for the app)

    def refusal(self, content_type: str | None) -> UserError | None:
        """Why the request is refused before the app runs, if it is."""
        if self.declared is not None and self.declared > self.rule.limit:
            return PayloadTooLarge(f"the body of {self.rule.what} is {self.declared} bytes; "
                                   f"the limit is {self.rule.limit}", max_bytes=self.rule.limit)
        if self.rule.json and not is_json(content_type):
            return UnsupportedMediaType(
                f"the body must be JSON: Content-Type {JSON} (or application/*+json), "
                f"not {content_type!r}" if content_type else
                f"the body must be JSON: send Content-Type: {JSON}")
        return None

    def budget(self) -> float:
        """Seconds the next chunk may take: ``timeout``, less what the body so far has
        overdrawn at ``min_rate`` (the client may have made us wait ``received / min_rate``
        seconds in all, but never less than ``timeout``)."""
        if not self.min_rate:
            return self.timeout
        allowed = max(self.timeout, self.received / self.min_rate)
        return min(self.timeout, allowed - self.waited)

    async def __call__(self) -> Message:
        if self.done:  # after the body: a wait for the disconnect is not timed
            return await self.receive()
        budget = self.budget()
        started = time.monotonic()
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                message = await self.receive()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body stalled: {self.received} bytes received in "
                f"{self.waited + time.monotonic() - started:.1f} s (at most "
                f"{self.timeout:g} s without a byte, at least {self.min_rate} bytes/s)"
            ) from None
        finally:
            self.waited += time.monotonic() - started
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.rule.limit:
                raise PayloadTooLarge(f"the body of {self.rule.what} exceeds the limit of "
                                      f"{self.rule.limit} bytes", max_bytes=self.rule.limit)
            self.done = not message.get("more_body", False)
        else:
            self.done = True  # http.disconnect
        return message


class BodyMiddleware:
    def __init__(self, app: ASGIApp, rules: Mapping[tuple[str, str], BodyRule],
                 timeout: float, min_rate: int) -> None:
        self.app, self.rules = app, rules
        self.timeout, self.min_rate = timeout, min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        rule = self.rules.get((scope["method"], scope["path"]), DEFAULT_RULE)
        reader = BodyReader(receive, rule, headers, self.timeout, self.min_rate)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not reader.done:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        refusal = reader.refusal(headers.get("content-type"))
        if refusal is not None:
            response = user_error_response(Request(scope), refusal)
            await response(scope, receive, send_closing)
            return
        await self.app(scope, reader, send_closing)

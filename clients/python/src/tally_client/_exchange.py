"""The protocol of a call, written once for the sync and the async client.

A call is a generator (no I/O of its own, "sans-IO"): it yields :class:`Send` steps — HTTP
requests to make — and :class:`Wait` steps — pauses before a retry — and receives for each
``Send`` the response or the transport exception. :class:`~tally_client.TallyClient` drives it
with ``httpx.Client`` and ``time.sleep``, :class:`~tally_client.AsyncTallyClient` with
``httpx.AsyncClient`` and ``asyncio.sleep``, so token handling, retries and decoding are one
code path: the two clients cannot behave differently.

Tokens: a client-credentials token is fetched on first use and reused until shortly before it
expires (a tenth of its lifetime, at most a minute, early); a ``401`` on a route is answered
by fetching a new token and trying once more (the key may have been rotated, the token
revoked) — a second ``401`` is raised.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
import msgspec

from tally_client.models import NotModified, Token
from tally_client.problems import UnexpectedResponse, problem_from
from tally_client.retry import RetryPolicy

T = TypeVar("T")
log = logging.getLogger("tally_client")
MAX_REFRESH_MARGIN = 60.0  # seconds before expiry that a cached token is replaced


@dataclass(frozen=True)
class Send:
    """An HTTP request to make (``path`` is relative to the client's base URL)."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    content: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Wait:
    seconds: float


Step = Send | Wait
Outcome = httpx.Response | Exception | None  # None: the answer to a Wait
Exchange = Generator[Step, Outcome, T]


class Credentials:
    """OAuth2 client credentials (CONTRACT §6) and the token they last got."""

    def __init__(self, client_id: str, client_secret: str, scope: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client_id, self.scope = client_id, scope
        self._secret = client_secret
        self._clock = clock
        self._cached: tuple[Token, float] | None = None  # the token, when to replace it

    refreshable = True

    def bearer(self, policy: RetryPolicy) -> Exchange[str]:
        token = yield from self.current(policy)
        return token.access_token

    def current(self, policy: RetryPolicy) -> Exchange[Token]:
        """The cached token while it is fresh, else a new one."""
        cached = self._cached
        if cached is not None and self._clock() < cached[1]:
            return cached[0]
        token = yield from self.fetch(policy)
        return token

    def fetch(self, policy: RetryPolicy) -> Exchange[Token]:
        """A new token from ``POST /oauth/token`` (secret by HTTP Basic, RFC 6749 §2.3.1)."""
        asked = self._clock()  # the lifetime counts from before the request
        basic = f"{quote(self.client_id, safe='')}:{quote(self._secret, safe='')}"
        form = {"grant_type": "client_credentials", **({"scope": self.scope}
                                                        if self.scope else {})}
        send = Send("POST", "/oauth/token", content=urlencode(form).encode(), headers={
            "Authorization": "Basic " + base64.b64encode(basic.encode()).decode(),
            "Content-Type": "application/x-www-form-urlencoded"})
        token = yield from call(send, decoder(Token), None, policy)
        margin = min(MAX_REFRESH_MARGIN, token.expires_in / 10)
        self._cached = (token, asked + token.expires_in - margin)
        return token

    def invalidate(self, access_token: str) -> None:
        """Forget ``access_token`` (refused by the server), unless a newer one replaced it."""
        cached = self._cached
        if cached is not None and cached[0].access_token == access_token:
            self._cached = None


class StaticToken:
    """A bearer token obtained elsewhere (an identity provider): used as is, never renewed."""

    refreshable = False

    def __init__(self, access_token: str) -> None:
        self._token = access_token

    def bearer(self, policy: RetryPolicy) -> Exchange[str]:
        return self._token
        yield  # a generator, like Credentials.bearer

    def invalidate(self, access_token: str) -> None:
        pass


Auth = Credentials | StaticToken


def call(send: Send, parse: Callable[[httpx.Response], T], auth: Auth | None,
         policy: RetryPolicy) -> Exchange[T]:
    """One request, with a token when ``auth`` is given, retried as ``policy`` says; the
    final response is handed to ``parse`` (which raises the problem of an error answer)."""
    tries, refreshed = 0, False
    while True:
        headers = dict(send.headers)
        token = None
        if auth is not None:
            token = yield from auth.bearer(policy)
            headers["Authorization"] = f"Bearer {token}"
        outcome = yield from _send(replace(send, headers=headers))
        if (token is not None and auth is not None and auth.refreshable and not refreshed
                and isinstance(outcome, httpx.Response) and outcome.status_code == 401):
            auth.invalidate(token)  # expired early, revoked, or its key retired: once more
            refreshed = True
            continue
        tries += 1
        wait = policy.delay(tries, outcome)
        if wait is None:
            break
        log.warning("%s %s: %s; try %d of %d in %.2f s", send.method, send.path,
                    _describe(outcome), tries + 1, policy.attempts, wait)
        yield Wait(wait)
    if isinstance(outcome, Exception):
        raise outcome
    return parse(outcome)


def _send(send: Send) -> Generator[Step, Outcome, httpx.Response | Exception]:
    outcome = yield send
    if outcome is None:
        raise RuntimeError("the driver answered a request with nothing")
    return outcome


def _describe(outcome: httpx.Response | Exception) -> str:
    if isinstance(outcome, httpx.Response):
        return f"{outcome.status_code} {outcome.reason_phrase}"
    return f"{type(outcome).__name__}: {outcome}"


def decoder(cls: type[T], reshape: Callable[[Any], Any] | None = None,
            status: int = 200) -> Callable[[httpx.Response], T]:
    """A parser: ``status`` is decoded into ``cls`` (after ``reshape`` of the JSON, for
    answers with request-named keys); any other status raises its problem."""

    def parse(response: httpx.Response) -> T:
        if response.status_code != status:
            raise problem_from(response)
        return _convert(response, cls, reshape)

    return parse


def answer_decoder(cls: type[T], reshape: Callable[[Any], Any] | None,
                   if_none_match: str | None) -> Callable[[httpx.Response], T | NotModified]:
    """A parser for an analytics answer: ``304`` is :class:`NotModified`; a ``200`` is
    ``cls`` with its ``ETag`` and ``X-Data-Watermark``."""

    def parse(response: httpx.Response) -> T | NotModified:
        etag, mark = response.headers.get("etag"), response.headers.get("x-data-watermark")
        if response.status_code == 304 and if_none_match is not None:
            return _convert(response, NotModified, None,
                            {"etag": etag or if_none_match, "watermark": mark}, body=False)
        if response.status_code != 200:
            raise problem_from(response)
        return _convert(response, cls, reshape, {"etag": etag, "watermark": mark})

    return parse


def _convert(response: httpx.Response, cls: type[T], reshape: Callable[[Any], Any] | None,
             headers: dict[str, str | None] | None = None, body: bool = True) -> T:
    try:
        value = msgspec.json.decode(response.content) if body else {}
        if reshape is not None:
            value = reshape(value)
        if headers:
            if not isinstance(value, dict):
                raise msgspec.ValidationError("Expected `object`")
            value = {**value, **headers}
        return msgspec.convert(value, cls)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError,
            KeyError, AttributeError) as exc:
        raise UnexpectedResponse(
            f"{response.request.method} {response.request.url.path}: the "
            f"{response.status_code} answer is not a {cls.__name__}: {exc}", response) from exc

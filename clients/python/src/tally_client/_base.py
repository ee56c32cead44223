"""What the sync and the async client share: their settings and credentials."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Self, TypedDict

from tally_client._exchange import Auth, Credentials, Send, StaticToken
from tally_client._version import __version__
from tally_client.batching import DEFAULT_MAX_BYTES, DEFAULT_MAX_EVENTS
from tally_client.retry import RetryPolicy

DEFAULT_TIMEOUT = 30.0  # seconds per request: a 10 MiB batch on a slow link, a heavy query
HEADERS = {"User-Agent": f"tally-client/{__version__}",
           "Accept": "application/json, application/problem+json"}
ENV = {"url": "TALLY_URL", "client_id": "TALLY_CLIENT_ID",
       "client_secret": "TALLY_CLIENT_SECRET"}  # noqa: S105 - names, not secrets


class ClientOptions(TypedDict, total=False):
    """The keyword options of both clients (see :class:`ClientBase`)."""

    client_id: str
    client_secret: str
    scope: str
    access_token: str
    retry: RetryPolicy
    max_batch_events: int
    max_batch_bytes: int
    clock: Callable[[], float]


class ClientBase:
    """``url``: the server (``https://tally.example.com``). Credentials: ``client_id`` and
    ``client_secret`` (a token is fetched, cached and renewed), or an ``access_token`` got
    elsewhere. ``retry``: how failed requests are retried. ``max_batch_events`` and
    ``max_batch_bytes``: the server's batch limits, which :meth:`ingest` splits under.
    ``clock``: the monotonic clock token lifetimes are measured with."""

    def __init__(self, url: str, *, client_id: str | None = None,
                 client_secret: str | None = None, scope: str | None = None,
                 access_token: str | None = None, retry: RetryPolicy | None = None,
                 max_batch_events: int = DEFAULT_MAX_EVENTS,
                 max_batch_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self._auth: Auth
        if access_token is not None:
            if client_id or client_secret:
                raise ValueError("give client_id and client_secret, or access_token: not both")
            self._auth = StaticToken(access_token)
        elif client_id and client_secret:
            self._auth = Credentials(client_id, client_secret, scope, clock)
        else:
            raise ValueError("give client_id and client_secret (or access_token)")
        self.retry = retry if retry is not None else RetryPolicy()
        if max_batch_events < 1 or max_batch_bytes < 1024:
            raise ValueError("max_batch_events must be ≥ 1 and max_batch_bytes ≥ 1024")
        self.max_batch_events, self.max_batch_bytes = max_batch_events, max_batch_bytes

    @classmethod
    def from_env(cls, url: str | None = None, **options: Any) -> Self:
        """A client of ``url`` or ``$TALLY_URL``, with ``$TALLY_CLIENT_ID`` and
        ``$TALLY_CLIENT_SECRET`` unless ``options`` give credentials; other ``options`` as
        the constructor's."""
        url = url or os.environ.get(ENV["url"])
        if not url:
            raise ValueError("TALLY_URL is not set")
        if "access_token" not in options:
            for name in ("client_id", "client_secret"):
                if name not in options and os.environ.get(ENV[name]):
                    options[name] = os.environ[ENV[name]]
        return cls(url, **options)

    def _credentials(self) -> Credentials:
        if not isinstance(self._auth, Credentials):
            raise TypeError("this client was given an access_token: it has no credentials")
        return self._auth

    def _target(self, send: Send) -> str:
        return self.url + send.path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

"""The connections of ``tally serve``: no client holds one longer, nor more of them, nor a
bigger request head, than the settings allow, and the process never runs out of file
descriptors.

Uvicorn (0.54, its httptools protocol) starts no timer when a connection opens — only after a
response, for keep-alive — so a connection that never completes a request head was held
forever, and it accepts every connection the kernel hands it (``limit_concurrency`` answers
``503`` only once a head is complete): 20,100 idle connections exhausted the descriptors.
:class:`EdgeProtocol`, uvicorn's protocol with one instance per connection, adds:

- **the header timeout** (``TALLY_HEADER_TIMEOUT_SECONDS``): from the connection's opening —
  or, on a kept-alive connection, from the first byte after the previous answer — to the end
  of the request head. Late: ``408`` if part of a request came, then the connection is closed;
- **the head size** (:data:`MAX_HEAD_BYTES`): a request line and headers over it are ``431``
  and the connection is closed, before the app sees the request — a lingering close: what the
  client still sends is dropped for a moment first, so a client writing its body reads the
  answer instead of a connection reset;
- **the send timeout** (``TALLY_BODY_TIMEOUT_SECONDS``, the body timeout's other direction):
  a client that reads nothing of an answer for that long, once the socket's buffers are full,
  is disconnected;
- **the connection limit** (``TALLY_MAX_CONNECTIONS``): a new connection at the limit takes
  the place of the one that has waited longest for a request head (idle or slow clients: a
  flood of them cannot shut out a client that sends its request at once); with none waiting,
  it is answered ``503`` with ``Retry-After`` and closed. The limit is kept below the
  file-descriptor limit, less :data:`RESERVED_FDS` for the store, journal, audit log and logs;
  the soft ``RLIMIT_NOFILE`` is first raised to the hard one.

The idle time between two requests is uvicorn's ``timeout_keep_alive``
(``TALLY_KEEPALIVE_TIMEOUT_SECONDS``); the body's pace and size are ``api/bodies.py``'s.
The protocol extends the mutual-TLS one (``security/mtls.py``), which adds the ASGI TLS
extension on TLS connections and nothing on plain ones.
"""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from tally.config import Settings
from tally.errors import (
    PROBLEM_MEDIA_TYPE,
    HeadersTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    UserError,
)
from tally.security.mtls import ClientCertProtocol

RESERVED_FDS = 256  # an idle server holds ~25 (DuckDB, journal, audit, SQLite, epoll, logs)
DEFAULT_MAX_CONNECTIONS = 4096
OVERLOAD_RETRY_AFTER = 1  # seconds
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; a token-bearing head is ~1.5 KiB
WARN_EVERY = 10.0  # seconds between two "connection limit reached" log lines
# after a refusal below the app, what the client still sends is read and dropped — this long,
# at most this much — before the connection closes: closing with unread bytes makes the kernel
# answer RST, and a client still sending its body gets "connection reset" instead of the answer
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


def raw_problem(error: UserError) -> bytes:
    """A complete ``Connection: close`` problem+json response, for answers given below the
    app (no request, or none complete, to hand it)."""
    body = msgspec.json.encode(error.problem())
    head = [STATUS_LINE[error.status], b"content-type: ", PROBLEM_MEDIA_TYPE.encode(),
            b"\r\ncontent-length: ", str(len(body)).encode(),
            b"\r\nx-content-type-options: nosniff\r\ncache-control: no-store\r\n"]
    for name, value in (error.headers or {}).items():
        head += [name.lower().encode(), b": ", value.encode(), b"\r\n"]
    return b"".join([*head, b"connection: close\r\n\r\n", body])


class EdgeProtocol(ClientCertProtocol):
    """Configured by :func:`protocol_class` (uvicorn makes the instances)."""

    header_timeout: float = 10.0
    send_timeout: float = 30.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    last_warning = -WARN_EVERY  # monotonic time of the last "limit reached" log line
    # the connections waiting for a request head, longest-waiting first (one event loop: no
    # lock); a dict for its order and O(1) removal
    _waiting: dict[EdgeProtocol, None] = {}
    _header_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None
    _head_begun = False  # bytes of a request head have come, and not its end
    _head_pending = True  # the next bytes belong to a request head (none is complete yet)
    _head_read = 0  # bytes read while a head was pending
    _messages = 0  # requests read to their end on this connection
    _head_bytes = 0  # of the current head: its URL, header names and values
    _head_refused = False  # over MAX_HEAD_BYTES: the parser's callbacks are ignored
    _lingering = -1  # bytes dropped since a refusal (see :meth:`_refuse`); -1: none given

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_a_waiting_one():
            now = time.monotonic()
            if now - EdgeProtocol.last_warning >= WARN_EVERY:  # not a line per refusal
                EdgeProtocol.last_warning = now
                self.logger.warning("connection limit (%d) reached: connections refused",
                                    self.max_connections)
            transport.write(raw_problem(ServiceUnavailable(
                f"this server holds its limit of {self.max_connections} connections; retry "
                "shortly", retry_after=OVERLOAD_RETRY_AFTER)))
            transport.close()
            return
        self._arm_header_timer()

    def _evict_a_waiting_one(self) -> bool:
        """Close the connection that has waited longest for a request head, if any."""
        waiting = EdgeProtocol._waiting
        while waiting:
            oldest = next(iter(waiting))
            del waiting[oldest]
            if oldest is not self and not oldest.transport.is_closing():
                oldest._cancel_header_timer()
                oldest.transport.abort()
                return True
        return False

    def _refuse(self, error: UserError) -> None:
        """Answer ``error`` and end the connection as a lingering close (RFC 9112 §9.6): our
        side is shut for writing once the answer is out, what the client still sends is
        dropped for :data:`LINGER_SECONDS` or :data:`LINGER_BYTES`, then the socket closes."""
        self._cancel_header_timer()
        self.transport.write(raw_problem(error))
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = 0
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering >= 0:
            self._lingering += len(data)
            if self._lingering > LINGER_BYTES:
                self.transport.close()
            return
        # a byte between two requests stops uvicorn's keep-alive timer: it starts the clock
        # of the next head (the parser skips blank lines without beginning a message, so
        # waiting for one would let a client that sends "\r\n" now and then stay forever)
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()
        was_pending, messages = self._head_pending, self._messages
        super().data_received(data)
        if was_pending and self._head_pending and messages == self._messages:
            self._head_read += len(data)  # all of it went to a head still incomplete
            self._head_refused = self._head_refused or self._head_read > MAX_HEAD_BYTES
        if self._head_refused and not self.transport.is_closing():
            self._refuse(HeadersTooLarge(
                f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun, self._head_bytes = True, 0
        if self._header_timer is None:  # a pipelined request, while an answer is being made
            self._arm_header_timer()

    # httptools keeps no limit on a head: uvicorn held every byte of one (400 MiB of headers
    # sent in 2 s grew the server by 400 MB; a single endless header grows inside the parser,
    # which is why the bytes read are counted too). At most one read (256 KiB) passes it.
    def on_url(self, url: bytes) -> None:
        if self._count_head(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._count_head(len(name) + len(value) + 4):  # as sent: ": " and CRLF
            super().on_header(name, value)

    def _count_head(self, size: int) -> bool:
        self._head_bytes += size
        self._head_refused = self._head_refused or self._head_bytes > MAX_HEAD_BYTES
        return not self._head_refused

    def on_headers_complete(self) -> None:
        self._head_begun = self._head_pending = False
        self._cancel_header_timer()
        if not self._head_refused:  # a refused head never reaches the app
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._head_refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._head_pending, self._head_read = True, 0  # what follows is the next head
        self._messages += 1
        if not self._head_refused:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
        super().connection_lost(exc)

    # a client that stops reading our answers (pipelining requests meanwhile) held its
    # connection, and its place under the limit, forever: uvicorn awaits the drain unbounded
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout, self.transport.abort)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)
        EdgeProtocol._waiting[self] = None

    def _cancel_header_timer(self) -> None:
        EdgeProtocol._waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        EdgeProtocol._waiting.pop(self, None)
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined head is late: close after this answer
            return
        if self._head_begun:
            self._refuse(RequestTimeout(
                f"the request head did not arrive within {self.header_timeout:g} s"))
        else:
            self.transport.close()


def protocol_class(header_timeout: float, send_timeout: float,
                   max_connections: int) -> type[EdgeProtocol]:
    """:class:`EdgeProtocol` with these limits, for ``uvicorn.run(http=...)``."""

    class Configured(EdgeProtocol):
        pass

    Configured.header_timeout, Configured.send_timeout = header_timeout, send_timeout
    Configured.max_connections = max_connections
    return Configured


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # not allowed here: keep the soft limit
            pass
    return soft


def connection_limit(configured: int | None, fd_limit: int) -> int:
    """``TALLY_MAX_CONNECTIONS``, or by default :data:`DEFAULT_MAX_CONNECTIONS` capped by the
    room the file-descriptor limit leaves. Raises ``ValueError`` when it cannot fit."""
    room = fd_limit - RESERVED_FDS
    if configured is None and room >= 1:
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if configured is None or configured > room:
        raise ValueError(
            f"TALLY_MAX_CONNECTIONS={configured or 'auto'} does not fit the file-descriptor "
            f"limit of {fd_limit} less {RESERVED_FDS} kept for the store and logs: raise "
            f"`ulimit -n` (hard) or lower TALLY_MAX_CONNECTIONS to at most {max(room, 0)}")
    return configured


def server_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments for the timeouts, the connection limit and the
    proxies trusted for ``X-Forwarded-For`` (none unless ``TALLY_FORWARDED_ALLOW_IPS``)."""
    limit = connection_limit(settings.max_connections, raise_fd_limit())
    proxies = settings.forwarded_allow_ips.strip()
    return {"http": protocol_class(settings.header_timeout_seconds,
                                   settings.body_timeout_seconds, limit),
            "timeout_keep_alive": settings.keepalive_timeout_seconds,
            "proxy_headers": bool(proxies), "forwarded_allow_ips": proxies or None}

"""Delivering a webhook: Standard Webhooks signatures, a guarded destination, retries.

**Signatures** (``standardwebhooks``): ``webhook-id`` (one per message, the same on every
attempt), ``webhook-timestamp`` (of the attempt) and ``webhook-signature`` — ``v1,<base64
HMAC-SHA256>`` by each secret that signs now, space-separated (``secrets.signing``).

**The destination is checked where it is connected to**, not only when it is named (SSRF):
``https`` only, or ``http`` to a loopback address when ``TALLY_WEBHOOK_ALLOW_LOOPBACK=1``;
every address the host resolves to must be public (or loopback when allowed) — private,
link-local (cloud metadata at 169.254.169.254), shared, multicast, reserved and unspecified
addresses are refused, IPv4 inside IPv6 included — and the connection goes to the address
that was checked, so a DNS answer that changes between check and connect (rebinding) cannot
slip through. Redirects are not followed (a ``3xx`` is a failed attempt). Environment proxies
are ignored.

**Retries**: up to :data:`ATTEMPTS` attempts, exponential backoff from ``first_delay`` with
±25 % jitter, on a network error or any answer but ``2xx``; a refused destination is not
retried. Each attempt is recorded (:class:`Attempt`).
"""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpcore2
import httpx2 as httpx
from standardwebhooks import Webhook

ATTEMPTS = 6
FIRST_DELAY = 2.0  # seconds before the second attempt; doubled each time (about a minute)
TIMEOUT = 10.0  # seconds an attempt may take (connect, send, answer)
SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not the internet


class UnsafeDestination(ValueError):
    """A webhook URL Tally refuses to call (the reason, for the client)."""


def _refused(address: str, allow_loopback: bool) -> str | None:
    """Why ``address`` may not be connected to (None: it may)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:  # 0.0.0.0 reaches this host
        return "a reserved address"
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in SHARED):
        return "a private address"
    return None


def vetted(host: str, port: int, allow_loopback: bool) -> list[str]:
    """The addresses of ``host``, every one of them allowed; ``UnsafeDestination`` if any is
    not (a name with one private address among public ones is refused whole)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeDestination(f"the webhook host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        why = _refused(address, allow_loopback)
        if why is not None:
            raise UnsafeDestination(f"the webhook host {host!r} resolves to {why} "
                                    f"({address}): refused")
    if not addresses:
        raise UnsafeDestination(f"the webhook host {host!r} has no address")
    return addresses


def check_url(url: str, allow_loopback: bool, *, resolve: bool = True) -> None:
    """``UnsafeDestination`` unless ``url`` may be called: its scheme, and (``resolve``) the
    addresses its host has now. When a webhook is registered and again at each connection."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UnsafeDestination("a webhook URL is https://host/… (or http:// to a loopback "
                                "address when TALLY_WEBHOOK_ALLOW_LOOPBACK=1)")
    if parts.username or parts.password:
        raise UnsafeDestination("a webhook URL carries no credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeDestination("the webhook URL's port is not a number") from None
    if parts.scheme == "http":
        if not allow_loopback:
            raise UnsafeDestination("a webhook URL must be https")
        if resolve:
            for address in vetted(parts.hostname, port, True):
                if not ipaddress.ip_address(address).is_loopback:
                    raise UnsafeDestination("http is allowed to loopback addresses only")
        return
    if resolve:
        vetted(parts.hostname, port, allow_loopback)


class _GuardedBackend(httpcore2.SyncBackend):
    """Connects only to addresses :func:`vetted` allows, the very address checked."""

    def __init__(self, allow_loopback: bool) -> None:
        self.allow_loopback = allow_loopback

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None
                    ) -> httpcore2.NetworkStream:
        try:
            address = vetted(host, port, self.allow_loopback)[0]
        except UnsafeDestination as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        return super().connect_tcp(address, port, timeout, local_address, socket_options)


class _GuardedTransport(httpx.HTTPTransport):
    def __init__(self, allow_loopback: bool) -> None:
        super().__init__(trust_env=False)
        # TLS still names and verifies the host; only the TCP connection is guarded
        self._pool = httpcore2.ConnectionPool(ssl_context=ssl.create_default_context(),
                                              network_backend=_GuardedBackend(allow_loopback))


@dataclass(frozen=True)
class Attempt:
    at: str  # RFC 3339 UTC
    status: int | None  # the receiver's answer (None: none came)
    error: str | None  # why the attempt failed (None: delivered)
    ms: float


@dataclass(frozen=True)
class Outcome:
    message_id: str
    delivered: bool
    attempts: list[Attempt]


def signed_headers(secrets: list[str], message_id: str, at: datetime,
                   body: bytes) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed by each of ``secrets``."""
    signatures = " ".join(Webhook(secret).sign(message_id, at, body) for secret in secrets)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures, "content-type": "application/json"}


def deliver(url: str, body: bytes, secrets: list[str], *, allow_loopback: bool,
            attempts: int = ATTEMPTS, first_delay: float = FIRST_DELAY,
            timeout: float = TIMEOUT, sleep: Callable[[float], None] = time.sleep,
            rng: random.Random | None = None, message_id: str | None = None) -> Outcome:
    """POST ``body`` to ``url`` until a ``2xx`` (at most ``attempts`` times). ``message_id``:
    the ``webhook-id`` of a message whose attempts are spread over several calls (an alert's
    event, retried across restarts: the receiver deduplicates by it); None: a new one."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
    message_id = message_id or f"msg_{uuid.uuid4().hex}"
    log: list[Attempt] = []
    try:
        check_url(url, allow_loopback, resolve=False)
    except UnsafeDestination as exc:
        return Outcome(message_id, False, [Attempt(_stamp(), None, str(exc), 0.0)])
    with httpx.Client(transport=_GuardedTransport(allow_loopback), timeout=timeout,
                      follow_redirects=False) as client:
        for n in range(attempts):
            if n:
                sleep(first_delay * 2 ** (n - 1) * rng.uniform(0.75, 1.25))
            at, started = datetime.now(UTC), time.perf_counter()
            status, error = None, None
            try:
                answer = client.post(url, content=body,
                                     headers=signed_headers(secrets, message_id, at, body))
                status = answer.status_code
                if not 200 <= status < 300:
                    error = f"the receiver answered {status}"
            except httpx.HTTPError as exc:
                error = str(exc) or type(exc).__name__
                refused = _unsafe(exc)
            else:
                refused = False
            log.append(Attempt(_stamp(at), status, error,
                               round((time.perf_counter() - started) * 1000, 1)))
            if error is None:
                return Outcome(message_id, True, log)
            if refused:
                break  # the destination itself is refused: retrying cannot help
    return Outcome(message_id, False, log)


def _unsafe(exc: BaseException | None) -> bool:
    """Whether the guard refused the connection (somewhere in ``exc``'s causes)."""
    while exc is not None:
        if isinstance(exc, UnsafeDestination):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _stamp(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

"""Mutual TLS for B2B clients and certificate-bound access tokens (RFC 8705).

``tally serve --ssl-certfile C --ssl-keyfile K --ssl-client-ca CA`` serves HTTPS and requires
every client to present a certificate issued by ``CA`` (the handshake fails otherwise). A
client registered with a certificate (``tally client create --cert-file`` or
``--cert-thumbprint``) gets tokens carrying ``cnf: {"x5t#S256": <thumbprint>}`` and only when
it presents that certificate at ``POST /oauth/token``; every request made with such a token
must come over a connection presenting the same certificate, else ``401``.

Uvicorn does not put the peer certificate in the ASGI scope, so :class:`ClientCertProtocol`
(its HTTP protocol, one instance per connection) reads it from the TLS object once the
handshake is done and adds the ASGI TLS extension (``scope["extensions"]["tls"]``,
``client_cert_chain`` as PEM) to every request of that connection. The app reads only the
extension, so any ASGI server that implements it works too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ssl
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tally.errors import BadRequest, Unauthorized
from tally.security.clients import Client
from tally.security.tokens import Principal

TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
Scope = MutableMapping[str, Any]
ASGIApp = Callable[..., Any]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (no padding) of the SHA-256 of the DER cert."""
    return _b64url(hashlib.sha256(der).digest())


def certificate_thumbprint(data: bytes) -> str:
    """The thumbprint of a certificate file's content (PEM or DER)."""
    try:
        cert = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
                else x509.load_der_x509_certificate(data))
    except ValueError:
        raise BadRequest("not an X.509 certificate (PEM or DER)") from None
    return thumbprint(cert.public_bytes(Encoding.DER))


def parse_thumbprint(text: str) -> str:
    """A thumbprint as given by an operator: 43 base64url characters (a SHA-256)."""
    value = text.strip()
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or _b64url(raw) != value:
        raise BadRequest("a certificate thumbprint is the base64url SHA-256 of the DER "
                         "certificate: 43 characters, no padding")
    return value


def presented_thumbprint(scope: Scope) -> str | None:
    """The thumbprint of the client certificate of this request's connection, if any."""
    tls = scope.get("extensions", {}).get("tls")
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    if not chain:
        return None
    return thumbprint(ssl.PEM_cert_to_DER_cert(chain[0]))


def require_certificate(principal: Principal, scope: Scope) -> None:
    """A certificate-bound token is honoured only over a connection presenting that
    certificate (RFC 8705 §3): a stolen token is useless without the private key."""
    if principal.cert_thumbprint is None:
        return
    presented = presented_thumbprint(scope)
    if presented is None or not hmac.compare_digest(presented, principal.cert_thumbprint):
        raise Unauthorized("this token is bound to a client certificate that this connection "
                           "did not present", error="invalid_token")


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension of a connection (leaf certificate only: Python 3.11 does not
    expose the verified chain)."""
    der = ssl_object.getpeercert(binary_form=True)
    name = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else None
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class _WithTLS:
    """The app, with one connection's TLS extension added to each request's scope."""

    def __init__(self, app: ASGIApp, tls: dict[str, Any]) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        scope.setdefault("extensions", {})["tls"] = dict(self.tls)
        await self.app(scope, receive, send)


class ClientCertProtocol(HttpToolsProtocol):
    """Uvicorn's HTTP/1.1 protocol, adding the ASGI TLS extension on TLS connections.
    ``connection_made`` runs after the handshake, so the peer certificate is known."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = _WithTLS(self.app, tls_extension(ssl_object))


def server_options(certfile: Path | None, keyfile: Path | None,
                   client_ca: Path | None) -> dict[str, Any]:
    """``uvicorn.run`` keyword arguments for plain HTTP, HTTPS, or HTTPS requiring client
    certificates from ``client_ca``. Raises ``ValueError`` for an incomplete combination."""
    if certfile is None and keyfile is None and client_ca is None:
        return {}
    if certfile is None or keyfile is None:
        raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile "
                         "(--ssl-client-ca adds client certificates on top)")
    for path in (certfile, keyfile, client_ca):
        if path is not None and not path.is_file():
            raise ValueError(f"TLS file {path} does not exist")

    def context(config: Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        ctx = default()
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    options: dict[str, Any] = {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile),
                               "ssl_context_factory": context, "http": ClientCertProtocol}
    if client_ca is not None:
        options.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def token_binding(client: Client, scope: Scope) -> str | None:
    """The thumbprint to bind a new token to: the client's registered certificate, which
    this connection must present (else ``401 invalid_client``); None for an unbound client."""
    if client.cert_thumbprint is None:
        return None
    presented = presented_thumbprint(scope)
    if presented is None or not hmac.compare_digest(presented, client.cert_thumbprint):
        raise Unauthorized("this client is bound to a certificate: request tokens over mutual "
                           "TLS presenting it", error="invalid_client")
    return client.cert_thumbprint

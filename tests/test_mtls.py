"""Mutual TLS and certificate-bound tokens (RFC 8705) through a real ``tally serve`` with TLS,
with a CA, a server certificate and client certificates made here."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import httpx2 as httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tally import metadata
from tally.config import Settings
from tally.security.clients import authenticate, create_client
from tests.server import TALLY, cli, free_port
from tests.test_ingest_api import assert_problem
from tests.test_tokens import AUDIENCE, ISSUER, forge_for

pytestmark = pytest.mark.slow
GRANT = {"grant_type": "client_credentials"}


@dataclass
class Identity:
    cert: Path
    key: Path
    der: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> Identity:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Identity(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def _issue(directory: Path, stem: str, cn: str, issuer: tuple[x509.Certificate,
           ec.EllipticCurvePrivateKey] | None, *, ca: bool = False,
           server: bool = False) -> tuple[Identity, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer[0].subject if issuer else _name(cn))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]),
            critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return _write(directory, stem, cert, key), cert, key


@dataclass
class Pki:
    ca: Identity
    server: Identity
    alice: Identity  # from the CA
    bob: Identity  # from the CA
    mallory: Identity  # self-signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = _issue(d, "ca", "Tally test CA", None, ca=True)
    server, _, _ = _issue(d, "server", "localhost", (ca_cert, ca_key), server=True)
    alice, _, _ = _issue(d, "alice", "partner-alice", (ca_cert, ca_key))
    bob, _, _ = _issue(d, "bob", "partner-bob", (ca_cert, ca_key))
    mallory, _, _ = _issue(d, "mallory", "partner-alice", None)  # same name, not from the CA
    return Pki(ca, server, alice, bob, mallory)


def x5t(der: bytes) -> str:
    """RFC 8705 §3.1, computed here independently of the server."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


class TlsServer:
    def __init__(self, data_dir: Path, pki: Pki, via_env: bool = False) -> None:
        self.port, self.pki = free_port(), pki
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"serve-{self.port}.log"
        files = {"certfile": pki.server.cert, "keyfile": pki.server.key,
                 "client-ca": pki.ca.cert}
        args = [TALLY, "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        env = dict(os.environ)
        for name, path in files.items():
            if via_env:
                env[f"TALLY_SSL_{name.replace('-', '_').upper()}"] = str(path)
            else:
                args += [f"--ssl-{name}", str(path)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                with self.http(pki.alice) as http:
                    if http.get("/readyz").status_code == 200:
                        return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def http(self, identity: Identity | None) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        if identity is not None:
            ctx.load_cert_chain(identity.cert, identity.key)
        return httpx.Client(base_url=self.url, verify=ctx, timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[TlsServer,
                                                                                Path]]:
    data = tmp_path_factory.mktemp("mtls") / "data"
    assert cli("client", "create", "--name", "warmup", "--scopes", "admin",
               data_dir=data).returncode == 0  # the store exists before the server
    server = TlsServer(data, pki)
    yield server, data
    server.stop()


def new_client(data: Path, *extra: str) -> tuple[str, str]:
    out = cli("client", "create", "--name", "b2b", "--scopes", "analytics:read events:write",
              *extra, data_dir=data)
    assert out.returncode == 0, out.stderr
    creds = json.loads(out.stdout)
    return creds["client_id"], creds["client_secret"]


def claims_of(token: str) -> dict[str, object]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))  # type: ignore[no-any-return]


def handshake(server: TlsServer, identity: Identity | None) -> str:
    """A TLS 1.2 handshake (where the client certificate is checked inside the handshake;
    TLS 1.3 checks it after the client's last flight) and one request."""
    ctx = ssl.create_default_context(cafile=str(server.pki.ca.cert))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if identity is not None:
        ctx.load_cert_chain(identity.cert, identity.key)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        try:
            tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except ssl.SSLError as exc:
            return f"handshake failed: {exc}"
        with tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            return tls.recv(64).decode(errors="replace")


@pytest.mark.parametrize("who", ["no certificate", "a self-signed certificate"])
def test_the_handshake_fails_without_a_certificate_from_the_client_ca(served, pki, who):
    server, _ = served
    identity = None if who == "no certificate" else pki.mallory
    assert handshake(server, pki.alice).startswith("HTTP/1.1 200")  # the same path works
    assert handshake(server, identity).startswith("handshake failed")
    # over TLS 1.3 (what clients negotiate by default) no response ever comes either
    with pytest.raises(httpx.TransportError), server.http(identity) as http:
        http.get("/healthz")


def test_a_bound_client_gets_a_certificate_bound_token_usable_only_over_its_certificate(
        served, pki):
    server, data = served
    creds = new_client(data, "--cert-file", str(pki.alice.cert))
    with server.http(pki.alice) as alice, server.http(pki.bob) as bob:
        r = alice.post("/oauth/token", auth=creds, data=GRANT)
        assert r.status_code == 200, r.text
        token = r.json()["access_token"]
        assert claims_of(token)["cnf"] == {"x5t#S256": x5t(pki.alice.der)}
        auth = {"Authorization": f"Bearer {token}"}
        assert alice.get("/v1/schemas", headers=auth).status_code == 200
        assert alice.get("/v1/metrics", headers=auth).status_code == 200
        # the same token over a connection presenting another (valid) certificate
        body = assert_problem(bob.get("/v1/schemas", headers=auth), 401)
        assert "bound to a client certificate" in body["detail"]
        # and the bound client cannot get a token over another certificate either
        body = assert_problem(bob.post("/oauth/token", auth=creds, data=GRANT), 401)
        assert body["error"] == "invalid_client"


def test_binding_by_thumbprint_and_unbound_clients(served, pki):
    server, data = served
    bound = new_client(data, "--cert-thumbprint", x5t(pki.bob.der))
    unbound = new_client(data)
    with server.http(pki.alice) as alice, server.http(pki.bob) as bob:
        token = bob.post("/oauth/token", auth=bound, data=GRANT).json()["access_token"]
        assert claims_of(token)["cnf"] == {"x5t#S256": x5t(pki.bob.der)}
        assert assert_problem(alice.get("/v1/schemas", headers={
            "Authorization": f"Bearer {token}"}), 401)
        # an unbound client's token has no cnf and works over any client certificate
        plain = alice.post("/oauth/token", auth=unbound, data=GRANT).json()["access_token"]
        assert "cnf" not in claims_of(plain)
        for http in (alice, bob):
            assert http.get("/v1/schemas", headers={
                "Authorization": f"Bearer {plain}"}).status_code == 200


def test_tls_settings_from_the_environment(tmp_path, pki):
    data = tmp_path / "data"
    server = TlsServer(data, pki, via_env=True)
    try:
        with pytest.raises(httpx.TransportError), server.http(None) as http:
            http.get("/healthz")
        with server.http(pki.bob) as bob:
            assert bob.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_serve_refuses_an_incomplete_tls_configuration(tmp_path, pki):
    out = subprocess.run([TALLY, "serve", "--data-dir", str(tmp_path / "d"), "--port",
                          str(free_port()), "--ssl-client-ca", str(pki.ca.cert)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "--ssl-certfile" in out.stderr


def test_client_create_refuses_a_bad_binding(tmp_path, pki):
    data = tmp_path / "data"
    for extra in (["--cert-thumbprint", "not-a-thumbprint"],
                  ["--cert-file", str(pki.ca.key)],  # a key, not a certificate
                  ["--cert-file", str(tmp_path / "missing.pem")],
                  ["--cert-file", str(pki.alice.cert), "--cert-thumbprint", x5t(pki.alice.der)]):
        out = cli("client", "create", "--name", "x", "--scopes", "admin", *extra, data_dir=data)
        assert out.returncode != 0 and out.stderr.startswith("tally: "), extra
        assert out.stderr.strip().count("\n") == 0


# --------------------------------------------------------------------------- in process


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", issuer=ISSUER, audience=AUDIENCE)


def test_a_bound_token_over_a_connection_without_tls_is_401(client, settings):
    forge = forge_for(settings)
    bound = forge.sign(claims={**forge.claims(), "cnf": {"x5t#S256": "A" * 43}})
    assert client.get("/v1/schemas", headers={
        "Authorization": f"Bearer {forge.sign()}"}).status_code == 200
    assert_problem(client.get("/v1/schemas", headers={"Authorization": f"Bearer {bound}"}),
                   401)


def test_a_bound_client_cannot_get_a_token_without_mutual_tls(client, settings, pki):
    con = metadata.connect(settings.data_dir)
    creds = create_client(con, "b2b", "analytics:read", cert_thumbprint=x5t(pki.alice.der))
    con.close()
    body = assert_problem(client.post("/oauth/token", auth=creds, data=GRANT), 401)
    assert body["error"] == "invalid_client"


def test_an_older_metadata_store_gains_the_new_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "meta.sqlite3")  # the schema of the first release
    old.executescript("""
        CREATE TABLE clients (client_id TEXT PRIMARY KEY, name TEXT NOT NULL,
          secret_salt BLOB NOT NULL, secret_hash BLOB NOT NULL, scopes TEXT NOT NULL,
          brands TEXT, regions TEXT, metrics TEXT, created_at TEXT NOT NULL,
          disabled INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE signing_keys (kid TEXT PRIMARY KEY, algorithm TEXT NOT NULL,
          private_pem BLOB NOT NULL, created_at TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 1);
    """)
    old.close()
    con = metadata.connect(data)
    columns = {t: {r[1] for r in con.execute(f"PRAGMA table_info({t})")}
               for t in ("clients", "signing_keys")}
    assert "cert_thumbprint" in columns["clients"] and "retired_at" in columns["signing_keys"]
    cid, secret = create_client(con, "b2b", "admin", cert_thumbprint=x5t(b"der"))
    found = authenticate(con, cid, secret)
    assert found is not None and found.cert_thumbprint == x5t(b"der")
    con.close()
    metadata.connect(data).close()  # opening again is a no-op

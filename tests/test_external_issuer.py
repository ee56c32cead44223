"""An external issuer (``TALLY_JWKS_URL``): an identity provider's tokens verified against its
JWKS, served by a real HTTP server on loopback with keys made here."""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tally.api.app import create_app
from tally.config import Settings
from tests.conftest import make_event
from tests.server import free_port
from tests.test_ingest_api import assert_problem
from tests.test_tokens import b64, part

ISSUER, AUDIENCE = "https://idp.example/realms/tally", "tally-eu"


class IdP:
    """A JWKS endpoint and the private keys behind it."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (alg, private key)
        self.extra: list[dict[str, Any]] = []  # JWKS entries published as they are
        self.fetches = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                idp.fetches += 1
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, alg: str) -> str:
        kid = f"{alg.lower()}-{secrets.token_hex(4)}"
        key = {"EdDSA": Ed25519PrivateKey.generate, "ES256": lambda: ec.generate_private_key(
            ec.SECP256R1()), "RS256": lambda: rsa.generate_private_key(65537, 2048)}[alg]()
        self.keys[kid] = (alg, key)
        return kid

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, (alg, key) in self.keys.items():
            algo = {"EdDSA": OKPAlgorithm, "ES256": ECAlgorithm, "RS256": RSAAlgorithm}[alg]
            jwk = algo.to_jwk(key.public_key(), as_dict=True)  # type: ignore[attr-defined]
            out.append({**jwk, "kid": kid, "use": "sig", "alg": alg})
        return {"keys": out + self.extra}

    def token(self, kid: str, alg: str | None = None, **claims: Any) -> str:
        key_alg, key = self.keys[kid]
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc-1", "client_id": "partner-bi",
                "iat": now, "exp": now + 300, "jti": secrets.token_hex(8),
                "scope": "analytics:read"}
        body.update(claims)
        header = {"alg": alg or key_alg, "typ": "at+jwt", "kid": kid}
        data = f"{part(header)}.{part({k: v for k, v in body.items() if v is not None})}"
        return f"{data}.{b64(sign(key_alg, key, data.encode()))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sign(alg: str, key: Any, data: bytes) -> bytes:
    if alg == "EdDSA":
        return bytes(key.sign(data))
    if alg == "RS256":
        return bytes(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    yield server
    server.close()


def app_for(tmp_path: Path, jwks_url: str) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", regions="EU,LATAM", issuer=ISSUER,
                        audience=AUDIENCE, jwks_url=jwks_url, jwks_refresh_seconds=1)
    return TestClient(create_app(settings), raise_server_exceptions=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_of_each_allowed_algorithm_are_accepted_with_their_limits(tmp_path, idp):
    kids = {alg: idp.add(alg) for alg in ("EdDSA", "ES256", "RS256")}
    with app_for(tmp_path, idp.url) as client:
        for kid in kids.values():
            assert client.get("/v1/schemas", headers=bearer(idp.token(kid))).status_code == 200
        assert idp.fetches == 1  # fetched once, then cached
        # scopes come from `scope`; this token may not ingest
        events = [make_event()]
        assert_problem(client.post("/v1/events:batch", json=events,
                                   headers=bearer(idp.token(kids["EdDSA"]))), 403)
        writer = idp.token(kids["ES256"], scope="events:write", brands=["brand-9"])
        r = client.post("/v1/events:batch", json=events, headers=bearer(writer))
        assert r.status_code == 202 and r.json()["rejected"] == 1  # brand-7 outside brands
        assert "outside this client's brands" in r.json()["errors"][0]["detail"]
        ok = idp.token(kids["RS256"], scope="events:write", brands=["brand-7"])
        assert client.post("/v1/events:batch", json=[make_event()],
                           headers=bearer(ok)).json()["accepted"] == 1
        published = client.get("/.well-known/jwks.json").json()["keys"]
        assert {k["kid"] for k in published} == set(kids.values())
        assert not any("d" in k for k in published)


def test_this_deployment_issues_no_token_when_an_idp_does(tmp_path, idp):
    idp.add("EdDSA")
    with app_for(tmp_path, idp.url) as client:
        r = client.post("/oauth/token", auth=("cl_x", "y"),
                        data={"grant_type": "client_credentials"})
        body = assert_problem(r, 400)
        assert body["error"] == "unsupported_grant_type" and ISSUER in body["detail"]


def test_bad_idp_tokens_are_401(tmp_path, idp):
    ed, rs = idp.add("EdDSA"), idp.add("RS256")
    secret = secrets.token_bytes(32)
    idp.extra.append({"kty": "oct", "kid": "hmac", "k": b64(secret), "alg": "HS256"})
    rsa_pem = idp.keys[rs][1].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def hs(kid: str, key: bytes) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "client_id": "c", "iat": now,
                  "exp": now + 60, "jti": "j", "scope": "admin"}
        data = f"{part({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{part(claims)}"
        return f"{data}.{b64(hmac.new(key, data.encode(), 'sha256').digest())}"

    bad = {
        "HS256 keyed with the IdP's RSA public key": hs(rs, rsa_pem),
        "HS256 with a symmetric key the JWKS publishes": hs("hmac", secret),
        "alg none": f"{part({'alg': 'none', 'typ': 'at+jwt', 'kid': ed})}."
                    f"{idp.token(ed).split('.')[1]}.",
        "ES256 header on an RSA key": idp.token(rs, alg="ES256"),
        "RS256 header on an Ed25519 key": idp.token(ed, alg="RS256"),
        "another region's audience": idp.token(ed, aud="tally-uk"),
        "another issuer": idp.token(ed, iss="https://other-idp.example"),
        "expired": idp.token(ed, iat=int(time.time()) - 900, exp=int(time.time()) - 120),
        "no client_id": idp.token(ed, client_id=None),
    }
    with app_for(tmp_path, idp.url) as client:
        assert client.get("/v1/schemas", headers=bearer(idp.token(ed))).status_code == 200
        for what, token in bad.items():
            r = client.get("/v1/schemas", headers=bearer(token))
            assert r.status_code == 401, what
        published = {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
        assert "hmac" not in published  # a symmetric key is never a verification key


def test_unknown_kid_refetches_at_most_once_per_interval_and_follows_idp_rotation(tmp_path,
                                                                                  idp):
    first = idp.add("EdDSA")
    with app_for(tmp_path, idp.url) as client:
        assert client.get("/v1/schemas", headers=bearer(idp.token(first))).status_code == 200
        assert idp.fetches == 1
        time.sleep(1.1)
        second = idp.add("ES256")  # the IdP rotates
        assert client.get("/v1/schemas", headers=bearer(idp.token(second))).status_code == 200
        assert idp.fetches == 2  # the unknown kid made one refetch
        # a flood of invented kids costs at most one fetch per TALLY_JWKS_REFRESH_SECONDS
        for n in range(20):
            forged = idp.token(second).split(".")
            forged[0] = part({"alg": "ES256", "typ": "at+jwt", "kid": f"invented-{n}"})
            assert_problem(client.get("/v1/schemas", headers=bearer(".".join(forged))), 401)
        assert idp.fetches <= 3
        assert client.get("/v1/schemas", headers=bearer(idp.token(first))).status_code == 200


def test_an_unreachable_idp_is_503_not_401(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    with app_for(tmp_path, url) as client:
        r = client.get("/v1/schemas", headers=bearer(
            f"{part({'alg': 'EdDSA', 'typ': 'at+jwt', 'kid': 'k'})}.{part({})}.AAAA"))
        assert_problem(r, 503)
        assert r.headers["retry-after"] == "1"


def test_jwks_url_must_be_https_except_on_loopback():
    with pytest.raises(ValueError, match="https"):
        Settings(jwks_url="http://idp.example/jwks.json")
    assert Settings(jwks_url="http://127.0.0.1:9/jwks.json").jwks_url

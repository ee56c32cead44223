"""Token hardening (RFC 8725, RFC 9068): a corpus of bad tokens by class, every one ``401``
problem+json through the API; the clock-skew leeway at its edges; key rotation.

Tokens are assembled by hand (base64url, JSON, and the signature computed with
``cryptography`` or ``hmac``), not with the library the server verifies with, so a header or
claim the library would refuse to produce can still be sent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tests.server import cli
from tests.test_ingest_api import assert_problem

LEEWAY = 30  # documented in docs/api.md and docs/security.md
ISSUER, AUDIENCE = "tally-eu-issuer", "tally-eu"
URL = "/v1/schemas"  # any valid token may read it


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", regions="EU,LATAM", issuer=ISSUER,
                    audience=AUDIENCE)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def part(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


Signer = Callable[[bytes], bytes]


@dataclass
class Forge:
    """Builds tokens from parts; with no overrides, a token the server accepts."""

    key: Ed25519PrivateKey
    kid: str
    client_id: str
    now: int = field(default_factory=lambda: int(time.time()))

    def header(self, **over: Any) -> dict[str, Any]:
        base = {"alg": "EdDSA", "typ": "at+jwt", "kid": self.kid}
        return {k: v for k, v in {**base, **over}.items() if v is not None}

    def claims(self, **over: Any) -> dict[str, Any]:
        base = {"iss": ISSUER, "aud": AUDIENCE, "sub": self.client_id,
                "client_id": self.client_id, "iat": self.now, "nbf": self.now,
                "exp": self.now + 600, "jti": secrets.token_hex(8), "scope": "analytics:read"}
        return {k: v for k, v in {**base, **over}.items() if v is not None}

    def sign(self, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None,
             signer: Signer | None = None) -> str:
        signing_input = f"{part(header or self.header())}.{part(claims or self.claims())}"
        signature = (signer or self.key.sign)(signing_input.encode())
        return f"{signing_input}.{b64(signature)}"

    def public_raw(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hmac_signer(secret: bytes, digest: str = "sha256") -> Signer:
    return lambda data: hmac.new(secret, data, digest).digest()


_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC = ec.generate_private_key(ec.SECP256R1())
_ED_FOREIGN = Ed25519PrivateKey.generate()


def rs256(data: bytes) -> bytes:
    return _RSA.sign(data, padding.PKCS1v15(), hashes.SHA256())


def es256(data: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(_EC.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def tamper_payload(token: str, f: Forge) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{part(f.claims(scope='analytics:read events:write admin'))}.{sig}"


def tamper_header(token: str, f: Forge) -> str:
    _, body, sig = token.split(".")
    return f"{part(f.header(typ='at+JWT', x='1'))}.{body}.{sig}"


def flip_signature(token: str) -> str:
    head, body, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=="))
    raw[0] ^= 1
    return f"{head}.{body}.{b64(bytes(raw))}"


Builder = Callable[[Forge, str], str]  # (forge, JWKS text) -> token
# (class, what, builder): every one must be 401
CORPUS: list[tuple[str, str, Builder]] = [
    # alg none (RFC 8725 §3.1)
    ("none", "alg none, empty signature",
     lambda f, j: f"{part(f.header(alg='none'))}.{part(f.claims())}."),
    ("none", "alg None", lambda f, j: f"{part(f.header(alg='None'))}.{part(f.claims())}."),
    ("none", "alg NONE", lambda f, j: f"{part(f.header(alg='NONE'))}.{part(f.claims())}."),
    ("none", "alg none with a valid EdDSA signature", lambda f, j: f.sign(f.header(alg="none"))),
    ("none", "no alg at all", lambda f, j: f.sign(f.header(alg=None))),
    # algorithm confusion: HMAC keyed with public material, other asymmetric algorithms
    ("confusion", "HS256 keyed with the raw public key",
     lambda f, j: f.sign(f.header(alg="HS256"), signer=hmac_signer(f.public_raw()))),
    ("confusion", "HS256 keyed with the public key PEM",
     lambda f, j: f.sign(f.header(alg="HS256"), signer=hmac_signer(f.public_pem()))),
    ("confusion", "HS256 keyed with the JWKS document",
     lambda f, j: f.sign(f.header(alg="HS256"), signer=hmac_signer(j.encode()))),
    ("confusion", "HS256 keyed with the JWK's x member",
     lambda f, j: f.sign(f.header(alg="HS256"),
                         signer=hmac_signer(json.loads(j)["keys"][0]["x"].encode()))),
    ("confusion", "HS384 keyed with the public key PEM",
     lambda f, j: f.sign(f.header(alg="HS384"), signer=hmac_signer(f.public_pem(), "sha384"))),
    ("confusion", "HS512 keyed with the public key PEM",
     lambda f, j: f.sign(f.header(alg="HS512"), signer=hmac_signer(f.public_pem(), "sha512"))),
    ("confusion", "RS256 with a foreign RSA key, our kid",
     lambda f, j: f.sign(f.header(alg="RS256"), signer=rs256)),
    ("confusion", "ES256 with a foreign EC key, our kid",
     lambda f, j: f.sign(f.header(alg="ES256"), signer=es256)),
    ("confusion", "EdDSA with a foreign Ed25519 key, our kid",
     lambda f, j: f.sign(signer=_ED_FOREIGN.sign)),
    ("confusion", "attacker key embedded in a jwk header",
     lambda f, j: f.sign(f.header(jwk=json.loads(j)["keys"][0] | {
         "x": b64(_ED_FOREIGN.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw))}),
         signer=_ED_FOREIGN.sign)),
    ("confusion", "attacker JWKS by jku header, unknown kid",
     lambda f, j: f.sign(f.header(jku="https://attacker.example/jwks.json", kid="evil"),
                         signer=_ED_FOREIGN.sign)),
    # expiry, not-before, issued-at (leeway 30 s)
    ("expired", "exp beyond the leeway", lambda f, j: f.sign(
        claims=f.claims(iat=f.now - 900, nbf=f.now - 900, exp=f.now - LEEWAY - 5))),
    ("expired", "exp an hour ago", lambda f, j: f.sign(
        claims=f.claims(iat=f.now - 4500, nbf=f.now - 4500, exp=f.now - 3600))),
    ("expired", "exp not a number", lambda f, j: f.sign(claims=f.claims(exp="tomorrow"))),
    ("not yet valid", "nbf beyond the leeway",
     lambda f, j: f.sign(claims=f.claims(nbf=f.now + LEEWAY + 10))),
    ("not yet valid", "nbf in an hour", lambda f, j: f.sign(claims=f.claims(nbf=f.now + 3600))),
    ("not yet valid", "iat beyond the leeway",
     lambda f, j: f.sign(claims=f.claims(iat=f.now + LEEWAY + 10, nbf=None))),
    # issuer and audience (another region's audience included)
    ("wrong iss", "another issuer", lambda f, j: f.sign(claims=f.claims(iss="evil"))),
    ("wrong iss", "issuer in another case",
     lambda f, j: f.sign(claims=f.claims(iss=ISSUER.upper()))),
    ("wrong iss", "empty issuer", lambda f, j: f.sign(claims=f.claims(iss=""))),
    ("wrong aud", "another region's audience",
     lambda f, j: f.sign(claims=f.claims(aud="tally-uk"))),
    ("wrong aud", "audience list without ours",
     lambda f, j: f.sign(claims=f.claims(aud=["tally-uk", "tally-na"]))),
    ("wrong aud", "another service", lambda f, j: f.sign(claims=f.claims(aud="billing-api"))),
    ("wrong aud", "empty audience", lambda f, j: f.sign(claims=f.claims(aud=""))),
    # every RFC 9068 required claim
    *[("missing claim", f"no {name}", (lambda name: lambda f, j: f.sign(
        claims={k: v for k, v in f.claims().items() if k != name}))(name))
      for name in ("iss", "aud", "exp", "iat", "sub", "client_id", "jti")],
    ("malformed claim", "scope as a list",
     lambda f, j: f.sign(claims=f.claims(scope=["analytics:read"]))),
    ("malformed claim", "brands as a string",
     lambda f, j: f.sign(claims=f.claims(brands="brand-1"))),
    ("malformed claim", "client_id a number", lambda f, j: f.sign(claims=f.claims(client_id=7))),
    ("malformed claim", "cnf with a method we cannot check",
     lambda f, j: f.sign(claims=f.claims(cnf={"jkt": b64(hashlib.sha256(b"k").digest())}))),
    # typ (RFC 9068 §2.1, RFC 8725 §3.11)
    ("wrong typ", "typ JWT", lambda f, j: f.sign(f.header(typ="JWT"))),
    ("wrong typ", "no typ", lambda f, j: f.sign(f.header(typ=None))),
    ("wrong typ", "typ application/jwt", lambda f, j: f.sign(f.header(typ="application/jwt"))),
    ("wrong typ", "typ dpop+jwt", lambda f, j: f.sign(f.header(typ="dpop+jwt"))),
    # kid
    ("unknown kid", "a kid we never had", lambda f, j: f.sign(f.header(kid="0123456789abcdef"))),
    ("unknown kid", "no kid", lambda f, j: f.sign(f.header(kid=None))),
    ("unknown kid", "kid a number", lambda f, j: f.sign(f.header(kid=7))),
    ("unknown kid", "empty kid", lambda f, j: f.sign(f.header(kid=""))),
    ("unknown kid", "kid path traversal", lambda f, j: f.sign(f.header(kid="../../etc/passwd"))),
    # a valid token, altered
    ("tampered", "payload swapped, signature kept", lambda f, j: tamper_payload(f.sign(), f)),
    ("tampered", "header swapped, signature kept", lambda f, j: tamper_header(f.sign(), f)),
    ("tampered", "one signature bit flipped", lambda f, j: flip_signature(f.sign())),
    ("tampered", "crit header extension", lambda f, j: f.sign(f.header(crit=["exp"]))),
    ("tampered", "b64 false", lambda f, j: f.sign(f.header(b64=False, crit=["b64"]))),
    ("truncated", "last character cut", lambda f, j: f.sign()[:-1]),
    ("truncated", "no signature", lambda f, j: f.sign().rsplit(".", 1)[0] + "."),
    ("truncated", "header and payload only", lambda f, j: f.sign().rsplit(".", 1)[0]),
    ("truncated", "header only", lambda f, j: f.sign().split(".")[0]),
    ("truncated", "half the token", lambda f, j: (t := f.sign())[: len(t) // 2]),
    ("extra dots", "a fourth segment", lambda f, j: f.sign() + ".AAAA"),
    ("extra dots", "five segments (JWE shape)", lambda f, j: f.sign() + ".a.b"),
    ("extra dots", "doubled dot", lambda f, j: f.sign().replace(".", "..", 1)),
    ("garbage", "not a JWT", lambda f, j: "garbage"),
    ("garbage", "non-base64 segments", lambda f, j: "!!!.@@@.###"),
    ("garbage", "header not JSON", lambda f, j: f"{b64(b'not json')}.{part(f.claims())}.AAAA"),
    ("garbage", "header a JSON array", lambda f, j: f"{part(['EdDSA'])}.{part(f.claims())}.AAAA"),
    ("garbage", "payload not JSON",
     lambda f, j: (h := part(f.header())) + "." + b64(b"\x00\xff") + "." + b64(
         f.key.sign(f"{h}.{b64(bytes([0, 255]))}".encode()))),
    ("garbage", "payload a JSON array",
     lambda f, j: f.sign(claims=["not", "an", "object"])),  # type: ignore[arg-type]
]


def forge_for(settings: Settings) -> Forge:
    con = metadata.connect(settings.data_dir)
    client_id, _ = create_client(con, "forged", "analytics:read")
    kid, pem = con.execute("SELECT kid, private_pem FROM signing_keys WHERE active = 1").fetchone()
    con.close()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return Forge(key, kid, client_id)


@pytest.fixture
def forge(client: TestClient, settings: Settings) -> Forge:
    return forge_for(settings)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Forge]]:
    """One app for the whole corpus (each case is a request, not a new store)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("corpus") / "data", regions="EU,LATAM",
                        issuer=ISSUER, audience=AUDIENCE)
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client, forge_for(settings)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_clean_control_token_is_accepted(served):
    client, forge = served
    # the builder with no deviation is accepted: every 401 below is the deviation's doing
    assert client.get(URL, headers=bearer(forge.sign())).status_code == 200
    assert client.get("/v1/metrics", headers=bearer(forge.sign())).status_code == 200


@pytest.mark.parametrize(("kind", "what", "build"), CORPUS,
                         ids=[f"{k}: {w}" for k, w, _ in CORPUS])
def test_every_bad_token_is_401(served, kind, what, build):
    client, forge = served
    jwks = client.get("/.well-known/jwks.json").text
    token = build(forge, jwks)
    r = client.get(URL, headers=bearer(token))
    body = assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer"), what
    assert body["detail"]


def test_the_corpus_covers_every_class_the_issue_names():
    counts: dict[str, int] = {}
    for kind, _, _ in CORPUS:
        counts[kind] = counts.get(kind, 0) + 1
    assert set(counts) >= {"none", "confusion", "expired", "not yet valid", "wrong iss",
                           "wrong aud", "wrong typ", "unknown kid", "tampered", "truncated",
                           "missing claim", "extra dots", "garbage"}
    assert len(CORPUS) == sum(counts.values()) >= 60


@pytest.mark.parametrize(("claims", "status"), [
    ({"exp": -(LEEWAY - 5)}, 200),  # expired 25 s ago: inside the leeway
    ({"exp": -(LEEWAY + 5)}, 401),
    ({"nbf": LEEWAY - 5}, 200),  # valid in 25 s: inside the leeway
    ({"nbf": LEEWAY + 5}, 401),
    ({"iat": LEEWAY - 5}, 200),
    ({"iat": LEEWAY + 5}, 401),
])
def test_clock_skew_leeway_is_30_seconds_at_its_edges(client, forge, claims, status):
    now = int(time.time())
    over = {"iat": now - 100, "nbf": now - 100, "exp": now + 600}
    over.update({k: now + v for k, v in claims.items()})
    r = client.get(URL, headers=bearer(forge.sign(claims=forge.claims(**over))))
    assert r.status_code == status, r.text


def test_typ_is_case_insensitive_and_may_carry_the_application_prefix(client, forge):
    for typ in ("AT+JWT", "application/at+jwt"):
        assert client.get(URL, headers=bearer(forge.sign(forge.header(typ=typ)))).status_code \
            == 200


def test_issued_tokens_carry_this_deployments_audience_and_the_rfc_9068_claims(client,
                                                                                 settings):
    con = metadata.connect(settings.data_dir)
    cid, secret = create_client(con, "p", "analytics:read")
    con.close()
    token = client.post("/oauth/token", auth=(cid, secret),
                        data={"grant_type": "client_credentials"}).json()["access_token"]
    head, body, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=="))
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    assert header == {"alg": "EdDSA", "typ": "at+jwt", "kid": header["kid"]}
    assert claims["aud"] == AUDIENCE and claims["iss"] == ISSUER
    assert {"exp", "iat", "sub", "client_id", "jti"} <= claims.keys()
    assert 0 < claims["exp"] - claims["iat"] <= 900


# --------------------------------------------------------------------------- rotation


def _token(client: TestClient, creds: tuple[str, str]) -> str:
    r = client.post("/oauth/token", auth=creds, data={"grant_type": "client_credentials"})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def _kid(token: str) -> str:
    return str(json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"])


def _published(client: TestClient) -> set[str]:
    return {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}


def _rotate(data_dir: Path, *flags: str) -> dict[str, Any]:
    out = cli("keys", "rotate", *flags, "--json", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    time.sleep(1.2)  # the server checks for a rotation at most once a second
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_rotation_signs_with_the_new_key_and_old_tokens_live_out_their_life(client, settings):
    con = metadata.connect(settings.data_dir)
    creds = create_client(con, "p", "analytics:read")
    con.close()
    old = _token(client, creds)
    first = _kid(old)

    rotated = _rotate(settings.data_dir)  # a separate process, while the app serves
    assert rotated["retired"] == [first] and rotated["active"] != first
    new = _token(client, creds)
    assert _kid(new) == rotated["active"]
    assert _published(client) == {first, rotated["active"]}
    assert client.get(URL, headers=bearer(old)).status_code == 200  # still in its lifetime
    assert client.get(URL, headers=bearer(new)).status_code == 200

    # the old key's grace (900 s + 30 s leeway) is over: it verifies nothing and leaves JWKS
    meta = sqlite3.connect(settings.data_dir / "meta.sqlite3")
    meta.execute("UPDATE signing_keys SET retired_at = ? WHERE kid = ?",
                 ("2020-01-01T00:00:00+00:00", first))
    meta.commit()
    meta.close()
    time.sleep(1.2)
    assert_problem(client.get(URL, headers=bearer(old)), 401)
    assert _published(client) == {rotated["active"]}
    assert client.get(URL, headers=bearer(new)).status_code == 200
    listed = json.loads(cli("keys", "list", "--json", data_dir=settings.data_dir).stdout)
    assert {k["kid"]: k["state"] for k in listed} == {first: "expired",
                                                        rotated["active"]: "active"}
    again = _rotate(settings.data_dir)  # the next rotation deletes the expired key
    assert again["deleted"] == [first] and again["retired"] == [rotated["active"]]


def test_revoking_rotation_fails_every_older_token_at_once(client, settings):
    con = metadata.connect(settings.data_dir)
    creds = create_client(con, "p", "analytics:read")
    con.close()
    old = _token(client, creds)
    rotated = _rotate(settings.data_dir, "--revoke")
    assert rotated["retired"] == [] and rotated["deleted"] == [_kid(old)]
    assert_problem(client.get(URL, headers=bearer(old)), 401)
    assert _published(client) == {rotated["active"]}
    assert client.get(URL, headers=bearer(_token(client, creds))).status_code == 200


def test_a_remembered_token_is_checked_again_on_every_use(client, settings):
    """A token's signature is verified once and remembered (security/tokens.Verified), but
    what can change after — its client revoked, its key deleted — is checked on every use
    (and an expired token is forgotten: test_remembered_tokens_are_bounded)."""

    def issued() -> tuple[tuple[str, str], str]:
        con = metadata.connect(settings.data_dir)
        creds = create_client(con, "p", "analytics:read")
        con.close()
        token = _token(client, creds)
        assert client.get(URL, headers=bearer(token)).status_code == 200  # now remembered
        assert client.get(URL, headers=bearer(token)).status_code == 200
        return creds, token

    creds, revoked = issued()
    assert cli("client", "revoke", creds[0], data_dir=settings.data_dir).returncode == 0
    time.sleep(1.2)  # the server sees another process's commit within a second
    assert_problem(client.get(URL, headers=bearer(revoked)), 401)

    _, rekeyed = issued()
    _rotate(settings.data_dir, "--revoke")
    assert_problem(client.get(URL, headers=bearer(rekeyed)), 401)


def test_remembered_tokens_are_bounded():
    from tally.security.tokens import Principal, Verified, VerifiedToken

    verified = Verified(size=100)
    someone = Principal("cl", frozenset(), None, None, None, "t")
    for n in range(1000):
        verified.put(f"token-{n}", VerifiedToken(someone, "kid", 0, time.time() + 900))
    assert verified.get("token-0") is None and verified.get("token-999") is not None
    assert len(verified._tokens) == 100
    verified.put("stale", VerifiedToken(someone, "kid", 0, time.time() - 31))
    assert verified.get("stale") is None  # past its expiry and the leeway: forgotten

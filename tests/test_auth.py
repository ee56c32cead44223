"""OAuth2 client credentials, JWT/JWKS, scopes (CONTRACT §6 first bullet)."""

from __future__ import annotations

import base64
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tests.test_ingest_api import assert_problem

TOKEN = "/oauth/token"
GRANT = {"grant_type": "client_credentials"}


@pytest.fixture
def registered(settings: Settings, client: TestClient) -> tuple[str, str]:
    con = metadata.connect(settings.data_dir)
    ids = create_client(con, "partner", "analytics:read events:write", brands="brand-1,brand-2",
                        regions="EU")
    con.close()
    return ids


def test_token_by_basic_auth_is_a_signed_short_lived_jwt(client, registered):
    cid, secret = registered
    r = client.post(TOKEN, auth=(cid, secret), data=GRANT)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 900
    assert body["scope"] == "analytics:read events:write"
    # verify independently, with nothing but the published JWKS
    jwks = client.get("/.well-known/jwks.json").json()
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    assert "d" not in jwk  # public part only
    key = jwt.PyJWK(jwk).key
    claims = jwt.decode(body["access_token"], key, algorithms=["EdDSA"], audience="tally-api")
    assert claims["client_id"] == claims["sub"] == cid
    assert claims["brands"] == ["brand-1", "brand-2"] and claims["regions"] == ["EU"]
    assert claims["metrics"] is None
    assert claims["exp"] - claims["iat"] == body["expires_in"]


def test_token_by_form_secret_and_scope_subset(client, registered):
    cid, secret = registered
    r = client.post(TOKEN, data={**GRANT, "client_id": cid, "client_secret": secret,
                                 "scope": "analytics:read"})
    assert r.status_code == 200 and r.json()["scope"] == "analytics:read"
    token = r.json()["access_token"]
    # a token without events:write cannot ingest
    assert_problem(client.post("/v1/events:batch", json=[],
                               headers={"Authorization": f"Bearer {token}"}), 403)


def test_secret_with_url_encoded_characters_in_basic_auth(client, registered):
    cid, secret = registered
    raw = base64.b64encode(f"{cid}:{secret}".encode()).decode()
    r = client.post(TOKEN, data=GRANT, headers={"Authorization": f"Basic {raw}"})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"auth": ("cl_nobody", "x"), "data": GRANT}, 401, "invalid_client"),
        ({"data": GRANT}, 401, "invalid_client"),
        ({"auth": None, "data": {"grant_type": "password"}}, 400, "unsupported_grant_type"),
        ({"auth": None, "data": {**GRANT, "scope": "admin"}}, 400, "invalid_scope"),
        ({"auth": None, "json": GRANT}, 400, "invalid_request"),
    ],
)
def test_token_errors(client, registered, kwargs, status, error):
    cid, secret = registered
    if kwargs.get("auth", ()) is None:
        kwargs = {**kwargs, "auth": (cid, secret)}
    body = assert_problem(client.post(TOKEN, **kwargs), status)
    assert body["error"] == error


def test_wrong_secret_is_401(client, registered):
    cid, _ = registered
    assert_problem(client.post(TOKEN, auth=(cid, "wrong"), data=GRANT), 401)


def _signing_key(settings: Settings) -> tuple[str, object]:
    con = metadata.connect(settings.data_dir)
    kid, pem = con.execute("SELECT kid, private_pem FROM signing_keys").fetchone()
    return kid, serialization.load_pem_private_key(pem, password=None)


def _forge(settings: Settings, **claims: object) -> dict[str, str]:
    kid, key = _signing_key(settings)
    now = int(time.time())
    base = {"iss": "tally", "aud": "tally-api", "sub": "c", "client_id": "c", "iat": now,
            "exp": now + 60, "jti": "j", "scope": "admin"}
    base.update(claims)
    token = jwt.encode({k: v for k, v in base.items() if v is not None}, key, algorithm="EdDSA",
                       headers={"kid": kid, "typ": "at+jwt"})
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "claims",
    [{"exp": int(time.time()) - 120}, {"aud": "someone-else"}, {"iss": "evil"},
     {"jti": None}, {"client_id": None}],
)
def test_bad_tokens_are_401(client, settings, claims):
    # the forging helper itself yields accepted tokens, so each 401 is the claim's doing:
    assert client.get("/v1/schemas", headers=_forge(settings)).status_code == 200
    assert_problem(client.get("/v1/schemas", headers=_forge(settings, **claims)), 401)


def test_tokens_survive_a_restart(settings, client, registered):
    cid, secret = registered
    token = client.post(TOKEN, auth=(cid, secret), data=GRANT).json()["access_token"]
    client.__exit__(None, None, None)
    with TestClient(create_app(settings)) as again:
        r = again.get("/v1/schemas", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200

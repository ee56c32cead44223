"""An empty limit never means "all" (issue 9 item 7; CONTRACT §1: "an empty value is an error").

Through the real ``tally client create`` command: an empty or blank ``--brands``,
``--regions`` or ``--metrics`` is one line on stderr, exit 2, nothing on stdout and no client
stored. Behind it, defence in depth: a client whose *stored* limit is empty (written by
anything but ``tally client create``) gets no token, and a token whose limit claim is an empty
list (an external issuer's, or forged with our key) is refused — neither reads as "no limit".
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tally import metadata
from tally.api.app import create_app
from tally.config import Settings
from tally.security.clients import create_client
from tests.server import cli
from tests.test_tokens import bearer, forge_for

LIMITS = ("brands", "regions", "metrics")
# the three spellings for --brands; --regions and --metrics share the code, so one or
# two each (every CLI run costs ~1-2 s of start-up on the shared machine)
EMPTY_OPTIONS = [("brands", ""), ("brands", ","), ("brands", " "), ("regions", ""),
                 ("metrics", " , ,")]


def stored_clients(data_dir: Path) -> list[tuple[str, str | None, str | None, str | None]]:
    db = data_dir / "meta.sqlite3"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("SELECT client_id, brands, regions, metrics FROM clients").fetchall()


@pytest.mark.parametrize(("limit", "value"), EMPTY_OPTIONS, ids=lambda v: repr(v))
def test_client_create_refuses_an_empty_limit(tmp_path: Path, limit: str, value: str):
    out = cli("client", "create", "--name", "bi", "--scopes", "analytics:read admin",
              f"--{limit}", value, data_dir=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    assert out.stderr.startswith("tally: ") and out.stderr.count("\n") == 1, out.stderr
    assert f"--{limit}" in out.stderr and "never means all" in out.stderr
    assert "Traceback" not in out.stderr
    assert stored_clients(tmp_path) == []  # nothing registered, so nothing unrestricted


def test_client_create_keeps_the_limits_it_is_given(tmp_path: Path):
    """The control: real limits (spaces and a trailing comma tolerated) are stored as given."""
    out = cli("client", "create", "--name", "bi", "--scopes", "analytics:read",
              "--brands", " b2, b1,", "--regions", "EU", "--metrics", "ggr,ngr",
              data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    client_id = json.loads(out.stdout)["client_id"]
    assert stored_clients(tmp_path) == [(client_id, "b1,b2", "EU", "ggr,ngr")]


@pytest.fixture
def app(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


@pytest.mark.parametrize("stored", ["", ",", " "], ids=repr)
@pytest.mark.parametrize("limit", LIMITS)
def test_a_stored_empty_limit_gets_no_token(app, limit: str, stored: str):
    client, settings = app
    con = metadata.connect(settings.data_dir)
    client_id, secret = create_client(con, "bi", "analytics:read", **{limit: "x1"})
    ok = client.post("/oauth/token", auth=(client_id, secret),
                     data={"grant_type": "client_credentials"})
    assert ok.status_code == 200, ok.text  # the control: the same client, its limit intact
    con.execute(f"UPDATE clients SET {limit} = ?", (stored,))  # noqa: S608 - test constant
    con.close()  # the store altered behind Tally's back
    r = client.post("/oauth/token", auth=(client_id, secret),
                    data={"grant_type": "client_credentials"})
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["error"] == "invalid_client" and f"empty {limit} limit" in body["detail"]
    assert "access_token" not in r.text


@pytest.mark.parametrize("value", [[], [""], [" "], ["b1", ""]], ids=repr)
@pytest.mark.parametrize("limit", LIMITS)
def test_a_token_with_an_empty_limit_claim_is_refused(app, limit: str, value: list[str]):
    client, settings = app
    forge = forge_for(settings)
    forge_issuer = {"iss": settings.issuer, "aud": settings.audience}
    control = forge.sign(claims=forge.claims(**forge_issuer, **{limit: ["b1"]}))
    assert client.get("/v1/schemas", headers=bearer(control)).status_code == 200
    token = forge.sign(claims=forge.claims(**forge_issuer, **{limit: value}))
    r = client.get("/v1/schemas", headers=bearer(token))
    assert r.status_code == 401, r.text
    assert f"claim {limit!r} is empty" in r.json()["detail"]

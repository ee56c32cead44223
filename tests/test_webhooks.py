"""Webhooks out (CONTRACT §8): each client's signing secret and its rotation, Standard
Webhooks signatures checked by the independent ``standardwebhooks`` verifier, retries against
a real flaky receiver, and the SSRF guard — at registration and at every connection."""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tally import metadata
from tally.webhooks import secrets
from tally.webhooks.delivery import UnsafeDestination, check_url, deliver

SECRET = "/v1/webhook-secret"


class Receiver:
    """A real HTTP server on loopback answering each POST with the next of ``answers``
    (then 200), recording what it received."""

    def __init__(self, answers: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.answers = list(answers or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = outer.answers.pop(0) if outer.answers else (200, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_client_has_one_secret_until_it_rotates_it(client, auth, settings):
    mine, other = auth(scopes="analytics:read"), auth(scopes="exports:write")
    first = client.get(SECRET, headers=mine)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert client.get(SECRET, headers=mine).json()["secret"] == secret  # made once
    assert client.get(SECRET, headers=other).json()["secret"] != secret  # its own
    rotated = client.post(SECRET, headers=mine)
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != secret and client.get(SECRET, headers=mine).json()["secret"] == new
    con = metadata.connect(settings.data_dir)
    try:
        client_id = _client_id(client, mine)
        assert secrets.signing(con, client_id) == [new, secret]  # the old one signs 24 h more
    finally:
        con.close()
    assert client.get(SECRET).status_code == 401
    # a rotation takes no body: one is refused, and the secret stays
    refused = client.post(SECRET, headers=mine, content=b'{"secret": "mine"}')
    assert refused.status_code == 413, refused.text
    assert client.get(SECRET, headers=mine).json()["secret"] == new


def _client_id(client, headers: dict[str, str]) -> str:
    token = headers["Authorization"].split()[1]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return str(claims["sub"])


def test_a_delivery_is_signed_by_every_secret_that_signs_now(receiver: Receiver):
    old, new = _secret(), _secret()
    body = json.dumps({"type": "export.succeeded", "data": {"id": "exp_1"}}).encode()
    outcome = deliver(receiver.url, body, [new, old], allow_loopback=True)
    assert outcome.delivered and [a.status for a in outcome.attempts] == [200]
    headers, received = receiver.received[0]
    assert received == body and headers["webhook-id"] == outcome.message_id
    # an independent verifier accepts it with either secret (a receiver mid-rotation)
    for secret in (old, new):
        assert Webhook(secret).verify(received, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):  # tampered
        Webhook(new).verify(received.replace(b"exp_1", b"exp_2"), headers)
    with pytest.raises(WebhookVerificationError):  # signed by another secret
        Webhook(_secret()).verify(received, headers)


def test_a_failing_receiver_is_retried_with_backoff_under_one_message_id():
    flaky = Receiver([(500, {}), (503, {}), (200, {})])
    waits: list[float] = []
    try:
        outcome = deliver(flaky.url, b"{}", [_secret()], allow_loopback=True,
                          first_delay=0.01, sleep=waits.append)
    finally:
        flaky.close()
    assert outcome.delivered
    assert [(a.status, a.error is None) for a in outcome.attempts] == [
        (500, False), (503, False), (200, True)]
    assert len({h["webhook-id"] for h, _ in flaky.received}) == 1  # the receiver can dedup
    assert 0.0075 <= waits[0] <= 0.0125 and 0.015 <= waits[1] <= 0.025  # doubling, ±25 %
    dead = deliver("http://127.0.0.1:9/", b"{}", [_secret()], allow_loopback=True,
                   attempts=3, first_delay=0.0)
    assert not dead.delivered and len(dead.attempts) == 3
    assert all(a.status is None and a.error for a in dead.attempts)


def test_redirects_are_not_followed():
    target = Receiver()
    redirecting = Receiver([(302, {"Location": target.url})] * 2)
    try:
        outcome = deliver(redirecting.url, b"{}", [_secret()], allow_loopback=True,
                          attempts=2, first_delay=0.0)
    finally:
        redirecting.close()
        target.close()
    assert not outcome.delivered and [a.status for a in outcome.attempts] == [302, 302]
    assert target.received == []


@pytest.mark.parametrize(("url", "allow_loopback", "why"), [
    ("http://example.com/hook", False, "https"),
    ("ftp://example.com/hook", True, "https://"),
    ("https://user:pw@example.com/", False, "credentials"),
    ("https://127.0.0.1/hook", False, "loopback"),
    ("https://localhost/hook", False, "loopback"),  # a name resolving to loopback
    ("https://10.1.2.3/hook", False, "private"),
    ("https://192.168.0.7/hook", True, "private"),
    ("https://172.16.5.5/hook", True, "private"),
    ("https://100.64.0.1/hook", True, "private"),
    ("https://169.254.169.254/latest/meta-data", True, "link-local"),
    ("https://[fe80::1]/hook", True, "link-local"),
    ("https://[::ffff:10.0.0.1]/hook", True, "private"),
    ("https://[fd00::1]/hook", True, "private"),
    ("https://0.0.0.0/hook", True, "reserved"),
    ("https://224.0.0.1/hook", True, "reserved"),
    ("http://93.184.216.34/hook", True, "loopback addresses only"),
    ("https://example.com:99999/hook", False, "port"),
])
def test_unsafe_destinations_are_refused(url: str, allow_loopback: bool, why: str):
    with pytest.raises(UnsafeDestination, match=why):
        check_url(url, allow_loopback)


def test_loopback_is_allowed_only_when_the_setting_says_so():
    check_url("http://127.0.0.1:8080/hook", True)
    check_url("https://[::1]/hook", True)
    with pytest.raises(UnsafeDestination):
        check_url("http://127.0.0.1:8080/hook", False)


def test_the_guard_holds_at_the_connection_not_only_at_the_check(receiver: Receiver):
    """https to a name that resolves to loopback passes the check of the URL's form, and is
    refused where the connection is made (as a DNS answer changed after a check would be):
    nothing reaches the receiver, and the refusal is not retried."""
    port = receiver.url.split(":")[2].split("/")[0]
    outcome = deliver(f"https://localhost:{port}/hook", b"{}", [_secret()],
                      allow_loopback=False, first_delay=0.0)
    assert not outcome.delivered and len(outcome.attempts) == 1
    assert "loopback" in (outcome.attempts[0].error or "")
    assert receiver.received == []
    refused = deliver(receiver.url, b"{}", [_secret()], allow_loopback=False)
    assert not refused.delivered and "https" in (refused.attempts[0].error or "")
    assert receiver.received == []


def _secret() -> str:
    return secrets.PREFIX + base64.b64encode(os.urandom(32)).decode()

"""The HTTP edge (docs/security.md, "The HTTP edge"): bodies bounded and typed before any route
runs, timeouts and a connection limit against slow and idle clients, and what an
unauthenticated caller may see. Body and media-type rules through the real app in process;
timeouts, streaming bodies, memory, descriptors and proxies against real ``tally serve``
processes over raw sockets.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psutil
import pytest
from fastapi.testclient import TestClient

from tally.api.app import create_app
from tally.api.bodies import body_rules
from tally.config import Settings
from tests.conftest import bearer, make_event
from tests.server import Server, cli, free_port, new_client, token

BATCH = "/v1/events:batch"
JSON = {"Content-Type": "application/json"}
# the servers below time out after 1 s; a loaded CI machine may take this long to notice
SLACK = 6
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
MIB = 1024 * 1024


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    return body


@pytest.fixture
def small(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The app with a 4 KiB batch limit, and an all-scopes token."""
    settings = Settings(data_dir=tmp_path / "data", regions="EU,UK,LATAM", max_batch_bytes=4096)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, bearer(client, settings.data_dir)


# -- bodies and media types (in process) ---------------------------------------------------


def test_a_declared_body_over_its_route_limit_is_413_before_authentication(small):
    client, _ = small
    routes = [(BATCH, 4096, JSON), ("/oauth/token", 8 * 1024, FORM),
              ("/v1/analytics/funnel", 64 * 1024, JSON),
              ("/v1/analytics/retention", 64 * 1024, JSON),
              ("/v1/admin/fx-rates", 1024 * 1024, JSON)]
    for path, limit, headers in routes:
        # at the limit the route runs (and refuses: no token, or no grant_type)
        at = client.post(path, content=b" " * limit, headers=headers)
        assert at.status_code in (400, 401), (path, at.text)
        over = client.post(path, content=b" " * (limit + 1), headers=headers)
        body = assert_problem(over, 413)
        assert body["max_bytes"] == limit and f"is {limit + 1} bytes" in body["detail"], path
        assert over.headers["connection"] == "close"  # the rest of the body is never read
    # any other route: 64 KiB
    assert client.request("GET", "/healthz", content=b"x" * 65536).status_code == 200
    assert_problem(client.request("GET", "/healthz", content=b"x" * 65537), 413)


def test_json_routes_answer_415_unless_the_body_is_declared_json(small):
    client, headers = small
    event = make_event()
    batch = json.dumps([event])
    refused = ["text/plain", "application/xml", "multipart/form-data; boundary=b", None,
               "application/json; charset=latin-1", "text/json", "application/jsonl"]
    for content_type in refused:
        sent = {**headers, **({"Content-Type": content_type} if content_type else {})}
        body = assert_problem(client.post(BATCH, content=batch, headers=sent), 415)
        assert "application/json" in body["detail"]
    r = client.post(BATCH, content=batch, headers={**headers, **JSON})
    assert r.json()["accepted"] == 1  # nothing of the refused attempts was stored
    for content_type in ("application/json; charset=utf-8", 'Application/JSON;charset="UTF-8"',
                         "application/vnd.tally.batch+json"):
        r = client.post(BATCH, content=json.dumps([make_event()]),
                        headers={**headers, "Content-Type": content_type})
        assert r.status_code == 202 and r.json()["accepted"] == 1, content_type
    queries = [("/v1/analytics/funnel", {"steps": [{"event": "bet.settled"}],
                                         "window_sec": 60, "from": "2025-10-23",
                                         "to": "2025-10-24"}),
               ("/v1/analytics/retention", {"cohort": "registration",
                                            "start_date": "2025-10-01",
                                            "end_date": "2025-10-02"}),
               ("/v1/admin/fx-rates", [{"date": "2025-10-01", "currency": "GBP",
                                        "rate": "1.15"}])]
    for path, query in queries:
        content = json.dumps(query)
        assert_problem(client.post(path, content=content,
                                   headers={**headers, "Content-Type": "text/plain"}), 415)
        r = client.post(path, content=content, headers={**headers, **JSON})
        assert r.status_code == 200, (path, r.text)


def test_every_route_taking_a_body_has_its_rule():
    """A new POST route must say what body it takes (``api/bodies.py``: its limit, and
    whether it is JSON), or it silently gets 64 KiB of anything."""
    paths = create_app(Settings()).openapi()["paths"]
    posts = {("POST", path) for path, ops in paths.items() if "post" in ops}
    assert posts and posts <= set(body_rules(Settings())), posts - set(body_rules(Settings()))


# -- what an unauthenticated caller sees ---------------------------------------------------


def test_readyz_says_only_its_status(client, headers):
    assert client.post(BATCH, json=[make_event()], headers=headers).status_code == 202
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_metrics_token_when_set(tmp_path):
    with pytest.raises(ValueError, match="TALLY_METRICS_TOKEN"):
        Settings(metrics_token="short")
    secret = "scrape-" + "k" * 25
    settings = Settings(data_dir=tmp_path / "data", metrics_token=secret)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for sent in ({}, {"Authorization": "Bearer wrong-token-of-some-length"},
                     {"Authorization": f"Basic {secret}"}, {"Authorization": secret}):
            r = client.get("/metrics", headers=sent)
            assert_problem(r, 401)
            assert r.headers["www-authenticate"] == 'Bearer realm="tally"'
        r = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and "tally_http_request_duration_seconds" in r.text
        assert client.get("/healthz").status_code == client.get("/readyz").status_code == 200
    with TestClient(create_app(Settings(data_dir=tmp_path / "open")),
                    raise_server_exceptions=False) as client:
        assert client.get("/metrics").status_code == 200  # unset: open, as before


# -- a real server over raw sockets ----------------------------------------------------------


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ``tally serve`` with 1 s header, body and keep-alive timeouts, 400 bytes/s."""
    server = Server(tmp_path_factory.mktemp("edge") / "data", env={
        "TALLY_HEADER_TIMEOUT_SECONDS": "1", "TALLY_BODY_TIMEOUT_SECONDS": "1",
        "TALLY_BODY_MIN_RATE": "400", "TALLY_KEEPALIVE_TIMEOUT_SECONDS": "1"})
    yield server
    server.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and how long that took; fails
    if it keeps the connection open for 6 s."""
    started, data = time.monotonic(), b""
    sock.settimeout(6)
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"still open after 6 s; received {data!r}") from None
            if not chunk:
                break
            data += chunk
    return data, time.monotonic() - started


def response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: tally\r\n\r\n"


def test_idle_connections_and_slow_heads_are_closed_at_the_header_timeout(edge):
    idle, half, prompt = connect(edge), connect(edge), connect(edge)
    half.sendall(b"GET /healthz HTTP/1.1\r\nHost: tally\r\nX-Slow: ")
    prompt.sendall(HEALTHZ)
    assert response(prompt).startswith(b"HTTP/1.1 200")
    prompt.close()
    data, seconds = until_closed(idle)
    assert data == b"" and 0.8 <= seconds <= SLACK
    data, seconds = until_closed(half)
    assert data.startswith(b"HTTP/1.1 408") and b"application/problem+json" in data
    assert b"request-timeout" in data and seconds <= SLACK


def test_kept_alive_connections_close_when_idle_and_their_next_head_is_timed(edge):
    sock = connect(edge)
    sock.sendall(HEALTHZ)
    assert response(sock).startswith(b"HTTP/1.1 200")
    data, seconds = until_closed(sock)  # TALLY_KEEPALIVE_TIMEOUT_SECONDS
    assert data == b"" and 0.8 <= seconds <= SLACK
    sock = connect(edge)
    sock.sendall(HEALTHZ)
    assert response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # half of the next head, then nothing
    data, seconds = until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408") and seconds <= SLACK
    # blank lines begin no request, but they are bytes of the next head: timed too
    sock, started = connect(edge), time.monotonic()
    sock.sendall(HEALTHZ)
    assert response(sock).startswith(b"HTTP/1.1 200")
    try:
        while time.monotonic() - started < 6 and not readable(sock, 0.2):
            sock.sendall(b"\r\n")
    except OSError:  # closed while we wrote
        pass
    assert until_closed(sock)[0] == b"" and time.monotonic() - started <= SLACK + 1


def readable(sock: socket.socket, seconds: float) -> bool:
    """Whether ``sock`` has bytes (or its close) to read within ``seconds`` — by poll, which
    takes any descriptor (``select()`` refuses one past 1023, and a process holding chDB's
    files has that many)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def headers_of(kib: int) -> bytes:
    """``kib`` headers of about 1 KiB each."""
    return b"".join(b"X-P%d: %s\r\n" % (k, b"p" * 1000) for k in range(kib))


def test_request_heads_over_64_kib_are_431_and_cost_no_memory(edge):
    rss_before = psutil.Process(edge.proc.pid).memory_info().rss
    request_line = b"GET /healthz HTTP/1.1\r\nHost: tally\r\n"
    with connect(edge) as sock:
        sock.sendall(request_line + headers_of(60) + b"\r\n")  # under the limit: answered
        assert response(sock).startswith(b"HTTP/1.1 200")
    for head in (headers_of(300),  # 300 headers
                 b"X-Endless: " + b"e" * (300 * 1024),  # one header that never ends
                 b"X-" + b"n" * (300 * 1024)):  # one name that never ends
        sock = connect(edge)
        sock.sendall(request_line + head)  # refused while we write, and not reset
        data, _ = until_closed(sock)
        assert data.startswith(b"HTTP/1.1 431") and b"headers-too-large" in data, data[:80]
    # pipelined requests are heads one after another, not one head: 100 KiB of them pass
    with connect(edge) as sock, sock.makefile("rb") as answers:
        sock.sendall((request_line + b"X-Pad: " + b"p" * 50 + b"\r\n\r\n") * 1000)
        for _ in range(1000):
            assert answers.readline().startswith(b"HTTP/1.1 200")
            head = list(iter(answers.readline, b"\r\n"))
            answers.read(next(int(line.split(b":")[1]) for line in head
                              if line.lower().startswith(b"content-length")))
    assert psutil.Process(edge.proc.pid).memory_info().rss - rss_before < 32 * MIB


def test_a_refused_head_is_answered_to_a_client_still_sending_its_body(edge):
    """Lingering close: the 431 is sent while the client still writes its head and body;
    closing at once, with its bytes unread, made the kernel reset the connection, so the
    client got ECONNRESET in the middle of its write and never read the answer."""
    for _ in range(3):
        head = (b"POST /oauth/token HTTP/1.1\r\nHost: tally\r\nContent-Length: 300000\r\n"
                + b"Authorization: Basic " + b"QUFB" * 100000 + b"\r\n\r\n")
        with connect(edge) as sock:
            sock.sendall(head)
            time.sleep(0.2)  # the server has read the head, refused it and answered
            sock.sendall(b"g" * 300000)  # no reset while writing
            data, _ = until_closed(sock)
            assert data.startswith(b"HTTP/1.1 431") and b"headers-too-large" in data, data[:80]
    # what a client still sends is dropped up to 1 MiB, then the connection closes
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + headers_of(300))
        sent = 0
        with pytest.raises(OSError):
            while sent < 64 * MIB:
                sock.sendall(b"x" * 65536)
                sent += 65536
        assert sent < 8 * MIB


def form_head(length: int) -> bytes:
    return (b"POST /oauth/token HTTP/1.1\r\nHost: tally\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(length).encode() + b"\r\n\r\n")


def test_a_stalled_body_and_a_trickling_body_are_408(edge):
    stalled = connect(edge)
    stalled.sendall(form_head(100) + b"grant_type")
    data, seconds = until_closed(stalled)
    assert data.startswith(b"HTTP/1.1 408") and b"the request body stalled" in data
    assert b"connection: close" in data.lower() and 0.8 <= seconds <= SLACK
    # one byte every 0.2 s never waits 1 s for a byte, but is far below 400 bytes/s
    trickle, started = connect(edge), time.monotonic()
    trickle.sendall(form_head(1000))
    while time.monotonic() - started < 6 and not readable(trickle, 0.2):
        trickle.sendall(b"a")
    data, seconds = until_closed(trickle)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert time.monotonic() - started <= SLACK + 1


def test_a_client_that_stops_reading_answers_is_disconnected(edge):
    server = psutil.Process(edge.proc.pid)

    def held() -> int:  # the server's established connections to this client's port
        return sum(1 for c in server.net_connections("tcp")
                   if c.raddr and c.raddr.port == port and c.status == "ESTABLISHED")

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
        sock.connect(("127.0.0.1", edge.port))
        port = sock.getsockname()[1]
        # 3,000 pipelined requests, 21 MB of answers, and never a byte read
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: tally\r\n\r\n" * 3000)
        deadline = time.monotonic() + 4 * SLACK
        while not held() and time.monotonic() < deadline:  # the server has accepted it
            time.sleep(0.05)
        assert held() == 1
        while held() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held() == 0  # cut once its buffers stayed full for 1 s


class PeakRss:
    """The greatest resident size of a process while the block runs (sampled every 10 ms)."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def test_bodies_are_cut_as_they_stream_and_memory_stays_flat(edge):
    pulled = 0

    def body(megabytes: int) -> Iterator[bytes]:  # chunked: no Content-Length
        nonlocal pulled
        chunk = b"a" * MIB
        for _ in range(megabytes):
            pulled += len(chunk)
            yield chunk

    headers = token(edge.url, *new_client(edge.data_dir, "events:write"))
    rss_before = psutil.Process(edge.proc.pid).memory_info().rss
    with PeakRss(edge.proc.pid) as rss:
        started = time.monotonic()
        r = httpx.post(f"{edge.url}/oauth/token", content=body(300), headers=FORM, timeout=30)
        assert assert_problem(r, 413)["max_bytes"] == 8192
        assert time.monotonic() - started < 5 and pulled < 32 * MIB  # not 300 MiB
        r = httpx.post(f"{edge.url}{BATCH}", content=body(300), timeout=30,
                       headers={**JSON, "Content-Length": str(300 * MIB)})
        assert "is 314572800 bytes" in assert_problem(r, 413)["detail"]  # no token needed
        pulled = 0
        r = httpx.post(f"{edge.url}{BATCH}", content=body(11), headers={**headers, **JSON},
                       timeout=30)
        assert "exceeds the limit of 10485760" in assert_problem(r, 413)["detail"]
    assert rss.peak - rss_before < 64 * MIB, (rss_before >> 20, rss.peak >> 20)


# -- the connection limit and proxies (their own servers) ----------------------------------


def test_idle_connections_beyond_the_limit_make_room_and_descriptors_last(tmp_path):
    # soft 300, hard 400: the server raises its soft limit to 400 and, keeping 256 for
    # itself, holds at most 144 connections
    server = Server(tmp_path / "data", nofile=(300, 400),
                    env={"TALLY_HEADER_TIMEOUT_SECONDS": "30"})
    process = psutil.Process(server.proc.pid)
    socks: list[socket.socket] = []
    try:
        idle_fds = process.num_fds()
        socks = [connect(server) for _ in range(600)]  # a flood that sends nothing
        time.sleep(0.5)
        assert process.num_fds() <= idle_fds + 144 + 8
        assert process.rlimit(psutil.RLIMIT_NOFILE) == (400, 400)
        # a client that sends its request at once takes the place of the longest-waiting
        # idle connection: the flood cannot shut it out
        for _ in range(5):
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        evicted = [until_closed(sock)[0] for sock in socks[:400]]
        assert all(data == b"" for data in evicted)  # closed without an answer, not a 503
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_connections_beyond_the_limit_are_refused_when_none_is_idle(tmp_path):
    creds = new_client(tmp_path / "data", "events:write")
    server = Server(tmp_path / "data", nofile=(300, 400),
                    env={"TALLY_BODY_TIMEOUT_SECONDS": "30"})
    auth = token(server.url, *creds)["Authorization"].encode()
    socks: list[socket.socket] = []
    try:
        for _ in range(144):  # each past its head, its body awaited: busy, not idle
            sock = connect(server)
            sock.sendall(b"POST /v1/events:batch HTTP/1.1\r\nHost: t\r\nContent-Type: "
                         b"application/json\r\nAuthorization: " + auth +
                         b"\r\nContent-Length: 1000\r\n\r\n[")
            socks.append(sock)
        time.sleep(0.5)
        data, _ = until_closed(connect(server))
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_forwarded_addresses_are_believed_only_from_configured_proxies(tmp_path):
    server = Server(tmp_path / "data", env={"TALLY_FORWARDED_ALLOW_IPS": "127.0.0.2",
                                            "TALLY_RATE_TOKEN_SOURCE": "1/m burst 2"})
    direct = httpx.Client(base_url=server.url)
    proxy = httpx.Client(base_url=server.url,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))

    def ask(http: httpx.Client, forwarded_for: str) -> httpx.Response:
        return http.post("/oauth/token", auth=("cl_nobody", "x"), headers={
            "X-Forwarded-For": forwarded_for}, data={"grant_type": "client_credentials"})

    try:
        # from an address that is not a proxy, the header is ignored: one bucket
        statuses = [ask(direct, f"10.0.0.{k}").status_code for k in (1, 2, 3)]
        assert statuses == [401, 401, 429]
        # through the trusted proxy, each forwarded client has its own
        statuses = [ask(proxy, address).status_code
                    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2")]
        assert statuses == [401, 401, 401]
        r = ask(proxy, "10.0.0.1")
        assert r.status_code == 429 and "from 10.0.0.1" in r.json()["detail"]
    finally:
        direct.close()
        proxy.close()
        server.stop()


def test_serve_refuses_an_edge_configuration_it_cannot_keep(tmp_path):
    for env, words in ((  # more connections than descriptors: one line, nothing served
            {"TALLY_MAX_CONNECTIONS": "1000000"}, "TALLY_MAX_CONNECTIONS=1000000 does not fit"),
            ({"TALLY_FORWARDED_ALLOW_IPS": "10.0.0.1,proxy.local"}, "'proxy.local' is not an IP")):
        out = cli("serve", "--port", str(free_port()), data_dir=tmp_path / "data", env=env)
        assert out.returncode != 0 and words in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1

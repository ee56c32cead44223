"""Malformed and oversized input never gets a ``5xx`` (issue 9, defects 4 and 8).

Every input of ``tests/corpus/`` and of the generator (``corpus.py``) goes to a real server
with a valid token (unless the input says otherwise). Promised: no answer is ``5xx``, every
``4xx`` is ``application/problem+json``, and the server still serves afterwards. Then bodies
far over every limit go to each route that reads a body: refused (``413``, or the connection
closed early) while the server's peak memory grows by less than ``MEMORY_BOUND`` — a body is
bounded while it streams in, before any authentication work.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

from reliability.corpus import FORM, JSON, Input, generated, load_corpus
from reliability.events import bet, body, recent_hour
from reliability.findings import Findings
from reliability.promises import is_problem
from reliability.server import Deployment, RealServer

MIB = 1 << 20
OVERSIZED = 64 * MIB
MEMORY_BOUND = 32 * MIB  # peak RSS growth allowed while refusing OVERSIZED bodies
BODY_ROUTES = [("/oauth/token", FORM, False), ("/v1/analytics/funnel", JSON, True),
               ("/v1/admin/fx-rates", JSON, True), ("/v1/analytics/retention", JSON, True),
               ("/v1/events:batch", JSON, True)]


@dataclass(frozen=True)
class Size:
    stride: int  # every stride-th generated input (the whole corpus always)
    oversized: bool


SIZES = {"test": Size(2, True), "quick": Size(1, True), "full": Size(1, True)}


def peak_rss(server: RealServer) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
               ) * 1024


def _send(http: httpx.Client, item: Input, auth: dict[str, str]) -> tuple[int, bool, str]:
    """(status or 0, problem+json?, error)"""
    headers = {name.encode(): value if isinstance(value, bytes) else value.encode()
               for name, value in (*item.headers, *(auth.items() if item.auth else ()))}
    try:
        r = http.request(item.method, item.path, content=item.body or None, headers=headers)
    except httpx.HTTPError as exc:
        return 0, False, f"{type(exc).__name__}: {exc}"
    return r.status_code, is_problem(dict(r.headers)), r.text[:200]


def _try_all(server: RealServer, auth: dict[str, str], inputs: list[Input],
             findings: Findings) -> None:
    statuses: Counter[int] = Counter()
    broken: dict[str, list[str]] = {"5xx": [], "not problem+json": [], "no answer": []}
    fresh = httpx.Limits(max_keepalive_connections=0)  # one input cannot break the next's
    with httpx.Client(base_url=server.url, timeout=60, limits=fresh) as http:
        for item in inputs:
            status, problem, text = _send(http, item, auth)
            statuses[status] += 1
            if status >= 500:
                broken["5xx"].append(f"{item.name} → {status} {text[:120]}")
            elif 400 <= status < 500 and not problem:
                broken["not problem+json"].append(f"{item.name} → {status}")
            elif status == 0:
                broken["no answer"].append(f"{item.name}: {text[:120]}")
    findings.figure("inputs tried", len(inputs))
    findings.figure("5xx seen", len(broken["5xx"]))
    findings.figure("answers by status", ", ".join(f"{s}: {n}" for s, n in
                                                  sorted(statuses.items())))
    for what, cases in broken.items():
        findings.expect(not cases, f"{len(cases)} hostile inputs got {what}, e.g. {cases[:4]}")


def _oversized(server: RealServer, auth: dict[str, str], findings: Findings) -> None:
    before = peak_rss(server)
    blob = b"a=" + b"x" * (OVERSIZED - 2)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, headers, authenticated in BODY_ROUTES:
            item = Input(f"{OVERSIZED // MIB} MiB to {path}", "POST", path, blob,
                         tuple(headers.items()), authenticated)
            status, _, text = _send(http, item, auth)
            findings.expect(status in (0, 400, 413) and status < 500,
                            f"{item.name}: {status} {text[:120]}")
    grown = peak_rss(server) - before
    findings.figure("oversized bodies sent", len(BODY_ROUTES))
    findings.figure("peak RSS growth MiB", grown / MIB)
    findings.expect(grown < MEMORY_BOUND, f"refusing {OVERSIZED // MIB} MiB bodies grew the "
                                          f"server's peak memory by {grown / MIB:.0f} MiB")


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("hostile and oversized input")
    corpus = load_corpus()
    inputs = corpus + list(generated())[::size.stride]
    findings.figure("corpus inputs", len(corpus))
    deployment = Deployment.create(workdir / "data")
    try:
        server = deployment.start()
        auth = deployment.headers()
        _try_all(server, auth, inputs, findings)
        if size.oversized:
            _oversized(server, auth, findings)
        findings.expect(server.readiness() == 200, "not ready after the hostile inputs")
        after = httpx.post(f"{server.url}/v1/events:batch", headers=auth, timeout=30,
                           content=body([bet("after-hostile", recent_hour())]))
        findings.expect(after.status_code == 202,
                        f"a valid batch after the hostile inputs got {after.status_code}")
        deployment.stop()
    finally:
        deployment.kill()
    return findings.finish()

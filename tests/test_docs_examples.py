"""The docs' shell examples and the ``make run`` banner's run as printed.

Every fenced shell block of README.md and docs/*.md says whether it runs: ``<!-- runs -->`` on
the line before it, or ``<!-- not run: why -->``. The runnable blocks of a file run in order in
one ``bash`` (a tour builds on its earlier steps) against a real ``tally serve`` on a demo
store, from a directory holding ``data/demo-client.json`` as ``make run`` leaves it, with the
demo client's credentials in ``$CLIENT_ID``/``$CLIENT_SECRET``, the server's URL in ``$TALLY``
and a webhook receiver on loopback in ``$WEBHOOK_URL``. ``curl`` is the real curl behind a
wrapper that records each call's arguments, HTTP status and body: every call must get a 2xx,
and an answer the text shows after ``# →`` must be the answer (``"…"`` stands for any value).

The banner's examples come from ``banner`` in scripts/run.sh (sourced, so nothing starts) and
must also agree with each other: the sample event lies in the range the queries ask for, and
retention and LTV ask only for complete days.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tally import metadata
from tally.config import Settings
from tally.demo.load import load_demo
from tally.security.clients import create_client
from tests.conftest import ALL_SCOPES
from tests.server import Server
from tests.test_webhooks import Receiver

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
MARK = re.compile(r"<!--\s*(runs|not run:.+?)\s*-->\s*$")
ANSWER = re.compile(r"^\s*# → (?:(\d{3}) )?(.+)$", re.M)
CURL = """#!/usr/bin/env bash
# the real curl, and in $CURL_LOG each call's arguments, response head and body
set -o pipefail
call="$CURL_LOG/$(date +%s%N)"
printf '%s\\0' "$@" > "$call.args"
"$REAL_CURL" -D "$call.head" "$@" | tee "$call.body"
"""


@dataclass
class Call:
    args: list[str]
    status: int
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def url(self) -> str:
        return next(a for a in self.args if a.startswith("http"))


@dataclass
class Demo:
    work: Path
    url: str
    client_id: str
    secret: str
    webhook_url: str = ""

    def run(self, script: str, tmp: Path) -> list[Call]:
        """``script`` in bash from the demo's directory; the curl calls it made, in order."""
        wrapper, log = tmp / "bin", tmp / "curl-log"
        wrapper.mkdir()
        log.mkdir()
        (wrapper / "curl").write_text(CURL)
        (wrapper / "curl").chmod(0o755)
        env = {**os.environ, "PATH": f"{wrapper}:{os.environ['PATH']}", "TALLY": self.url,
               "CLIENT_ID": self.client_id, "CLIENT_SECRET": self.secret,
               "CURL_LOG": str(log), "REAL_CURL": str(shutil.which("curl")),
               "WEBHOOK_URL": self.webhook_url}
        out = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=self.work,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{script}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
        calls = []
        for args in sorted(log.glob("*.args"), key=lambda p: int(p.stem)):
            head = args.with_suffix(".head").read_text().splitlines()
            status = [line for line in head if line.startswith("HTTP/")][-1].split()[1]
            calls.append(Call(args.read_text().split("\0")[:-1], int(status),
                              args.with_suffix(".body").read_text()))
        failed = [(c.status, c.url, c.body) for c in calls if not 200 <= c.status < 300]
        assert calls and failed == []
        return calls


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """`make run` in small: a 30-day demo store, the demo client's file, `tally serve`."""
    work = tmp_path_factory.mktemp("make-run")
    data = work / "data"
    summary = load_demo(Settings(data_dir=data), events=8_000, days=30, seed=7)
    assert summary["rejected"] == 0
    con = metadata.connect(data)
    client_id, secret = create_client(con, "demo", ALL_SCOPES, None, None, None)
    con.close()
    creds = {"client_id": client_id, "client_secret": secret}  # as `tally client create` prints
    (data / "demo-client.json").write_text(json.dumps(creds))
    # docs/alerts.md's rules tell a real receiver on loopback ($WEBHOOK_URL)
    receiver = Receiver()
    server = Server(data, env={"TALLY_WEBHOOK_ALLOW_LOOPBACK": "1"})
    try:
        yield Demo(work, server.url, creds["client_id"], creds["client_secret"],
                   receiver.url)
    finally:
        server.stop()
        receiver.close()


def shell_blocks(path: Path) -> list[tuple[str | None, str, int]]:
    """(marker or None, code, offset of the code) of each fenced shell block of ``path``."""
    text = path.read_text()
    blocks = []
    for fence in FENCE.finditer(text):
        if fence.group(1) not in SHELL:
            continue
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        blocks.append((mark.group(1) if mark else None, fence.group(2), fence.start(2)))
    return blocks


def check_answers(script: str, calls: list[Call]) -> int:
    """Each ``# → [status] json`` is the answer of the last curl before it; returns how many."""
    for shown in ANSWER.finditer(script):
        call = calls[script[: shown.start()].count("curl ") - 1]
        if shown.group(1):
            assert call.status == int(shown.group(1)), (call.url, call.status)
        assert matches(call.json(), json.loads(shown.group(2))), (call.url, call.body)
    return len(ANSWER.findall(script))


def matches(actual: Any, shown: Any) -> bool:
    if shown == "…":
        return True
    if isinstance(shown, dict):
        return (isinstance(actual, dict) and actual.keys() == shown.keys()
                and all(matches(actual[k], v) for k, v in shown.items()))
    if isinstance(shown, list):
        return (isinstance(actual, list) and len(actual) == len(shown)
                and all(matches(a, s) for a, s in zip(actual, shown, strict=True)))
    return bool(actual == shown)


def test_every_shell_example_says_whether_it_runs():
    unmarked = [f"{path.name}:{path.read_text()[:offset].count(chr(10))}"
                for path in DOCS for mark, _, offset in shell_blocks(path) if mark is None]
    assert unmarked == []
    assert any(mark == "runs" for mark, _, _ in shell_blocks(ROOT / "README.md"))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in DOCS if any(m == "runs" for m, _, _ in
                                                          shell_blocks(p))],
                         ids=lambda p: p.name)
def test_docs_examples_run_as_printed(path: Path, demo: Demo, tmp_path: Path):
    script = "\n".join(code for mark, code, _ in shell_blocks(path) if mark == "runs")
    calls = demo.run(script, tmp_path)
    if path.name == "README.md":  # the tour: token, ingest, three answers shown
        assert len(calls) == 5 and check_answers(script, calls) == 4


def banner(demo: Demo, days: int = 30) -> str:
    out = subprocess.run(["bash", "-c", 'source scripts/run.sh && banner "$@"', "run.sh",
                          demo.url, str(demo.work / "data" / "demo-client.json"), str(days)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    return out.stdout


@pytest.mark.slow
def test_the_banner_examples_run_and_agree(demo: Demo, tmp_path: Path):
    text = banner(demo)
    assert f"Tally is starting at {demo.url}" in text and demo.secret in text
    commands = text.split("Try it:\n", 1)[1]
    script = "\n".join(line[2:] for line in commands.splitlines() if line.startswith("  "))
    calls = demo.run(script, tmp_path)
    assert len(calls) == 8

    def query(part: str) -> dict[str, str]:
        call = next(c for c in calls if part in c.url)
        return {k: v[0] for k, v in parse_qs(urlsplit(call.url).query).items()}

    def body(part: str) -> tuple[dict[str, Any], Call]:
        call = next(c for c in calls if part in c.url)
        return json.loads(call.args[call.args.index("-d") + 1]), call

    events, ingest = body("/v1/events:batch")
    assert ingest.json()["accepted"] == 1  # a new event every time the banner is printed
    sample = datetime.fromisoformat(events[0]["occurred_at"]).date()
    funnel, _ = body("/v1/analytics/funnel")
    for bounds in (query("timeseries"), query("slice"), funnel):
        assert date.fromisoformat(bounds["from"]) <= sample < date.fromisoformat(bounds["to"])

    retention, answer = body("/v1/analytics/retention")
    rows = answer.json()["rows"]
    assert rows and all(row["d1"] is not None and row["d7"] is not None for row in rows)
    ltv = query("/v1/analytics/ltv")
    assert (ltv["start_date"], ltv["end_date"]) == (retention["start_date"],
                                                      retention["end_date"])
    cohorts = next(c for c in calls if "/v1/analytics/ltv" in c.url).json()["cohorts"]
    assert cohorts and {len(c["ltv_minor"]) for c in cohorts} == {7}  # days 0..6, all over


@pytest.mark.slow
def test_a_short_demo_asks_for_cohorts_it_cannot_have_yet(demo: Demo):
    """With fewer than 10 days of demo data no cohort's day 7 is over: the banner asks for the
    one day 9 days ago (an empty answer) rather than for days whose shares are null."""
    text = banner(demo, days=3)
    retention = re.search(r'"start_date":"([\d-]+)","end_date":"([\d-]+)"', text)
    assert retention is not None and retention.group(1) == retention.group(2)
    assert (datetime.now(UTC).date() - date.fromisoformat(retention.group(1))).days == 9

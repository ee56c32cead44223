"""Start-up on a read-only data dir, journal or audit log: a clear refusal, never a traceback.

Each part is a tmpfs remounted read-only while no server runs (``volumes.py``). Promised:
``tally serve`` on a read-only data dir exits non-zero with one ``tally: …`` line on stderr
and no traceback. For the journal and the audit log alone, refusing the same way is right,
and so is serving *not ready* (``/readyz`` ``503``) until they can be written; serving ready
is not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

from reliability.findings import Findings
from reliability.server import register_client
from reliability.volumes import tmpfs
from tests.server import TALLY, free_port

MIB = 1 << 20
START_WITHIN = 60.0


@dataclass(frozen=True)
class Size:
    pass


SIZES = {"test": Size(), "quick": Size(), "full": Size()}
PARTS = ("data dir", "journal", "audit log")


@dataclass
class Attempt:
    part: str
    proc: subprocess.Popen[str]
    url: str


def _start(part: str, data: Path) -> Attempt:
    port = free_port()
    proc = subprocess.Popen([TALLY, "serve", "--port", str(port), "--data-dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    return Attempt(part, proc, f"http://127.0.0.1:{port}")


def _judge(attempt: Attempt, findings: Findings) -> None:
    deadline = time.monotonic() + START_WITHIN
    status = 0
    while attempt.proc.poll() is None and time.monotonic() < deadline and status == 0:
        with contextlib.suppress(httpx.TransportError):
            status = httpx.get(f"{attempt.url}/readyz", timeout=1).status_code
        time.sleep(0.1)
    if attempt.proc.poll() is None:  # it serves (or hangs): stop it, judge its readiness
        attempt.proc.kill()
        _, stderr = attempt.proc.communicate()
        findings.expect(status == 503, f"read-only {attempt.part}: the server started and "
                                       f"/readyz answered {status or 'nothing'} (want a "
                                       "refusal, or 503)")
        findings.figure(f"read-only {attempt.part}", f"served, /readyz {status}")
        return
    _, stderr = attempt.proc.communicate()
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    findings.figure(f"read-only {attempt.part}", f"exit {attempt.proc.returncode}: {last[:100]}")
    findings.expect(attempt.proc.returncode != 0, f"read-only {attempt.part}: exit 0")
    findings.expect("Traceback" not in stderr and last.startswith("tally: "),
                    f"read-only {attempt.part}: stderr is not one 'tally: …' line but "
                    f"{len(lines)} lines ending {stderr.strip()[-300:]!r}")


def run(workdir: Path, size: Size) -> Findings:
    findings = Findings("start-up on read-only storage")
    roots = {part: workdir / part.replace(" ", "-") / "data" for part in PARTS}
    with contextlib.ExitStack() as mounts:
        for part, data in roots.items():
            target = {"data dir": data, "journal": data / "journal",
                      "audit log": data / "audit"}[part]
            if part == "data dir":
                volume = mounts.enter_context(tmpfs(data, 16 * MIB))
                register_client(data)  # a deployment that existed before the disk went bad
            else:
                register_client(data)
                volume = mounts.enter_context(tmpfs(target, 16 * MIB))
            volume.remount(read_only=True)
        attempts = [_start(part, data) for part, data in roots.items()]
        try:
            for attempt in attempts:
                _judge(attempt, findings)
        finally:
            for attempt in attempts:
                if attempt.proc.poll() is None:
                    attempt.proc.kill()
                    attempt.proc.communicate()
    return findings.finish()

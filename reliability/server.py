"""A real ``tally serve`` for fault scenarios: ``tests/server.py``'s ``Server`` plus a measured
SIGTERM, readiness reads, and a deployment (data dir, env, a client) that outlives restarts."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

from reliability.findings import Findings
from tally import metadata
from tally.security.clients import create_client
from tests.server import Server, token

ALL_SCOPES = "events:write analytics:read exports:write admin"
REPLAY_WITHIN = 600.0  # seconds a start-up may take to apply what a forced stop left
# the fault suite measures the store, not the rate limiter: a 429 from a bucket would hide
# what the journal and the applier do under the same load
NO_RATE_LIMITS = {"TALLY_RATE_CLIENT": "off", "TALLY_RATE_BRAND": "off",
                  "TALLY_RATE_REGION": "off", "TALLY_RATE_TOKEN": "off"}


class RealServer(Server):
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 ready_within: float = 60) -> None:
        started = time.monotonic()
        try:
            super().__init__(data_dir, env, ready_within=ready_within)
        except BaseException:
            proc: subprocess.Popen[bytes] | None = getattr(self, "proc", None)
            if proc is not None and proc.poll() is None:  # never became ready: do not leak it
                proc.kill()
                proc.wait()
            raise
        self.startup_seconds = time.monotonic() - started

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, bound: float) -> float | None:
        """SIGTERM; the seconds until the process exited, or None (then SIGKILLed) if it was
        still running after ``bound`` seconds."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        return time.monotonic() - started

    def readiness(self) -> int:
        """The status of ``GET /readyz``; 0 when the server did not answer within 2 s."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code
        except httpx.TransportError:
            return 0

    def await_readiness(self, status: int, within: float) -> float | None:
        """Seconds until ``/readyz`` answered ``status``, or None if it did not within."""
        started = time.monotonic()
        while time.monotonic() - started < within:
            if self.readiness() == status:
                return time.monotonic() - started
            time.sleep(0.1)
        return None

    def metric(self, name: str) -> float | None:
        """The largest sample of a Prometheus metric family (None if absent or no answer)."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        return max(values) if values else None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def register_client(data: Path, scopes: str = ALL_SCOPES) -> tuple[str, str]:
    """What ``tally client create`` does, in-process (without the CLI's second of start-up
    per scenario); safe while a server runs (the metadata is SQLite in WAL mode)."""
    con = metadata.connect(data)
    try:
        return create_client(con, "reliability", scopes)
    finally:
        con.close()


@dataclass
class Deployment:
    """A data dir with one registered client (every scope), served by one process at a time."""

    data: Path
    creds: tuple[str, str]
    env: dict[str, str] = field(default_factory=dict)
    server: RealServer | None = None

    @classmethod
    def create(cls, data: Path, env: dict[str, str] | None = None) -> Deployment:
        return cls(data, register_client(data), {**NO_RATE_LIMITS, **(env or {})})

    def start(self, ready_within: float = 60) -> RealServer:
        self.server = RealServer(self.data, self.env, ready_within)
        return self.server

    def replay(self, findings: Findings) -> None:
        """Start and stop once more, so that every journalled record is in the store before
        it is read back: start-up applies the journal before the server answers (however
        long a backlog a forced stop left: REPLAY_WITHIN), and nothing arrives meanwhile."""
        server = self.start(REPLAY_WITHIN)
        findings.figure("replay start-up s", server.startup_seconds)
        findings.expect(self.stop() is not None, "the replaying server did not stop")

    @property
    def running(self) -> RealServer:
        assert self.server is not None, "the deployment is not serving"
        return self.server

    def headers(self, creds: tuple[str, str] | None = None) -> dict[str, str]:
        """A fresh bearer token from the running server (for ``creds``, default ours), with
        the JSON content type every body here is (a route answers 415 to anything else)."""
        return {**token(self.running.url, *(creds or self.creds)),
                "Content-Type": "application/json"}

    def kill(self) -> None:
        if self.server is not None and self.server.alive():
            self.server.kill()
        self.server = None

    def stop(self, bound: float = 60) -> float | None:
        """Graceful stop: seconds it took, None if it needed SIGKILL after ``bound``."""
        if self.server is None:
            return 0.0
        seconds = self.server.terminate(bound)
        self.server = None
        return seconds

"""Start and stop a real ``tally serve`` process for end-to-end tests."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

TALLY = str(Path(sys.executable).with_name("tally"))
# The TLS context of the suite's calls to its servers: httpx makes one (loading the system's
# CA certificates: ~25 ms of CPU) for each call not given one, and the pollers call often
VERIFY = ssl.create_default_context()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def cli(*args: str, data_dir: Path,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TALLY, *args, "--data-dir", str(data_dir)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None,
                 nofile: tuple[int, int] | None = None, ready_within: float = 60,
                 port: int | None = None) -> None:
        """``nofile``: the (soft, hard) file-descriptor limit the server starts with;
        ``ready_within``: seconds it may take to answer ``/readyz``; ``port``: a given port
        (a restart where clients wait for the server they knew), else a free one."""
        self.data_dir, self.port = data_dir, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"serve-{self.port}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [TALLY, "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
                if nofile else None,
            )
        deadline = time.monotonic() + ready_within  # start-up replays the journal first
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                answer = httpx.get(f"{self.url}/readyz", timeout=1, verify=VERIFY)
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:500]}"
                time.sleep(0.1)
            except httpx.TransportError:
                time.sleep(0.1)
        self.proc.kill()  # not left running behind the failure
        self.proc.wait(timeout=10)
        tail = self.log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"server did not become ready within {ready_within:.0f} s "
                           f"(/readyz: {last}); its log ends:\n{tail}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def new_client(data_dir: Path, scopes: str = "events:write analytics:read admin",
               **limits: str) -> tuple[str, str]:
    extra = [arg for key, value in limits.items() for arg in (f"--{key}", value)]
    out = cli("client", "create", "--name", "e2e", "--scopes", scopes, *extra, data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    creds = json.loads(out.stdout)
    return creds["client_id"], creds["client_secret"]


def token(url: str, client_id: str, secret: str) -> dict[str, str]:
    r = httpx.post(f"{url}/oauth/token", auth=(client_id, secret),
                   data={"grant_type": "client_credentials"}, verify=VERIFY)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['access_token']}"}

"""A private ``redis-server`` for the tests that need one.

It listens on a free loopback port, keeps its files (only its log: no snapshot, no append-only
file) in a temporary directory, and is stopped when the tests are done: nothing under /var,
nothing shared with the machine's Redis or with another xdist worker, which starts its own.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from tests.server import free_port, terminate

ATTEMPTS = 5  # a probed free port may be taken before redis-server binds it


class RedisServer:
    def __init__(self, directory: Path, ready_within: float = 20) -> None:
        self.directory = directory
        for _ in range(ATTEMPTS):
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(directory), "--logfile", str(directory / f"redis-{self.port}.log"),
                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            if self._ready(ready_within):
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start: see {directory}")

    def _ready(self, within: float) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    time.sleep(0.05)
            return False
        finally:
            client.close()

    def stop(self) -> None:
        terminate(self.proc)

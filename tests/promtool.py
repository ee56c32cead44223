"""Debian's ``promtool`` for the tests of what Tally ships to Prometheus (rules, dashboard
queries, the exposition). ``make test`` installs it first (``make promtool``); a test run
without it installs it here the same way, and fails if it cannot: never a skip."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMTOOL = Path(os.environ.get("TALLY_TEST_PROMTOOL", "/usr/bin/promtool"))


def promtool(*args: str | Path, stdin: str | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``promtool args…``, its output captured (the caller asserts on the return code)."""
    if not PROMTOOL.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "install-promtool.sh")], check=True)
    return subprocess.run([str(PROMTOOL), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120, cwd=cwd)

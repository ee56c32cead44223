"""Real file-system faults for tests: a small tmpfs (a disk that fills up), filled to the brim,
remounted read-only. Needs root (mount), as on the machines this project runs on."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"8m"``) mounted at ``path`` (created), always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def remount(path: Path, options: str) -> None:
    """``"ro"``, ``"rw"``, ``"size=64m"``…"""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True,
                   capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """A filler file taking all but ``leave`` bytes of the file system at ``path``."""
    filler = path / ".filler"
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("ab") as out:
        chunk = b"\0" * (1 << 20)
        remaining = max(0, free - leave)
        while remaining > 0:
            try:
                remaining -= out.write(chunk[:min(len(chunk), remaining)])
                out.flush()
            except OSError:
                break
    return filler

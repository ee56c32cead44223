"""Filesystems to break: a tmpfs or an ext4 image mounted at a directory, filled, made
read-only, freed — and always unmounted when the block ends (we are root).

Why two kinds: ``mount -o remount,ro`` is refused (``EBUSY``) while any file on the
filesystem is open for writing, so a tmpfs can be made read-only only when no server runs
(start-up checks). A filesystem that turns read-only *under* a running writer is what ext4
does on an I/O error with ``errors=remount-ro``; ``/sys/fs/ext4/<dev>/trigger_fs_error`` makes
it do exactly that, and every later write — on descriptors already open too — fails with
``EROFS``. Such a filesystem becomes writable again only after unmount and ``e2fsck``
(:meth:`Ext4Volume.repair`), as in production.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

BALLAST = ".ballast"
CHUNK = 1 << 20


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def unmount(path: Path) -> None:
    """Unmount, lazily if a process still holds it (it must not outlive the scenario)."""
    try:
        _run("umount", str(path))
    except OSError:
        _run("umount", "-l", str(path))


class Volume:
    """A mounted filesystem; ``fill`` and ``free`` move a ballast file in and out of it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Write ballast until at most ``leave`` bytes stay free (0: until ENOSPC); the bytes
        written. The ballast is fsynced, so the space is really taken."""
        written = 0
        fd = os.open(self.path / BALLAST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (CHUNK, 4096, 512):
                block = b"\0" * chunk
                while self.free_bytes() - chunk >= leave:
                    try:
                        written += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
            with contextlib.suppress(OSError):  # full: the sync may fail, the bytes are taken
                os.fsync(fd)
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Remove the ballast for good: synced, so a later I/O error (ext4 aborts its journal,
        dropping what it had not committed) cannot bring it back and fill the disk again."""
        (self.path / BALLAST).unlink(missing_ok=True)
        os.sync()


class Tmpfs(Volume):
    def remount(self, read_only: bool) -> None:
        """Raises OSError while a file on it is open for writing (see the module head)."""
        _run("mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(self.path))


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Tmpfs]:
    path.mkdir(parents=True, exist_ok=True)
    _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
    try:
        yield Tmpfs(path)
    finally:
        unmount(path)


class Ext4Volume(Volume):
    def __init__(self, path: Path, image: Path, commit: int | None = None) -> None:
        super().__init__(path)
        self.image = image
        self.commit = commit

    def mount(self) -> None:
        """``commit``: seconds between ext4's journal commits (default 5): what a simulated
        I/O error drops is what was written since the last one and not synced."""
        extra = f",commit={self.commit}" if self.commit else ""
        _run("mount", "-o", f"loop,errors=remount-ro{extra}", str(self.image), str(self.path))

    def device(self) -> str:
        source = subprocess.run(["findmnt", "-no", "SOURCE", str(self.path)],
                                capture_output=True, text=True, check=True).stdout.strip()
        return Path(source).name

    def trip_read_only(self) -> None:
        """Make ext4 take its ``errors=remount-ro`` path now, as on an I/O error."""
        Path(f"/sys/fs/ext4/{self.device()}/trigger_fs_error").write_text("fault suite\n")

    def read_only(self) -> bool:
        return bool(os.statvfs(self.path).f_flag & os.ST_RDONLY)

    def unmount(self) -> None:
        unmount(self.path)

    def check(self) -> None:
        """``e2fsck`` the unmounted image, correcting what it finds."""
        done = subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True,
                              text=True, timeout=120)
        if done.returncode not in (0, 1):  # 1: errors were corrected
            raise OSError(f"e2fsck {self.image}: {done.returncode} {done.stdout[-500:]}")

    def repair(self) -> None:
        """Unmount, check and remount writable (nothing may hold files on it, nor be mounted
        inside it)."""
        self.unmount()
        self.check()
        self.mount()


@contextlib.contextmanager
def ext4(path: Path, size: int, image: Path, commit: int | None = None) -> Iterator[Ext4Volume]:
    """An ext4 filesystem of ``size`` bytes in the file ``image``, mounted at ``path`` (with
    ``commit``, see :meth:`Ext4Volume.mount`). Its content survives
    :meth:`Ext4Volume.repair` (a tmpfs' would not)."""
    path.mkdir(parents=True, exist_ok=True)
    image.parent.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(size)
    _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    volume = Ext4Volume(path, image, commit)
    volume.mount()
    try:
        yield volume
    finally:
        if os.path.ismount(path):
            unmount(path)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def bind(source: Path, target: Path) -> Iterator[Path]:
    """``source`` seen at ``target``; its content outlives the mount."""
    source.mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True, exist_ok=True)
    _run("mount", "--bind", str(source), str(target))
    try:
        yield target
    finally:
        if os.path.ismount(target):
            unmount(target)

"""Verification of the audit log: the hash chain, every signed checkpoint's signature and
Merkle root, and the log's length against the checkpoints.

Read-only, so it runs while the server appends: checkpoints are read *before* the log (a
checkpoint is written only after the entries it covers are on disk, so every checkpoint read
covers entries already in the file), and a last line without its newline is re-read for a
moment before it is called torn (the server writes each entry with one ``write``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tally.audit import checkpoints as cp
from tally.audit.entry import GENESIS, BrokenEntry, check_line
from tally.audit.merkle import MerkleFrontier, leaf_hash
from tally.errors import StoreUnavailable

TORN_TAIL_RETRIES = 20
TORN_TAIL_WAIT = 0.05  # seconds: an append in flight completes well within a second


@dataclass(frozen=True)
class Finding:
    seq: int
    reason: str


@dataclass(frozen=True)
class Verdict:
    entries: int  # complete lines in the log
    checkpoints: int
    first_bad: Finding | None
    head: str  # hash of the last complete entry (GENESIS when empty)

    @property
    def intact(self) -> bool:
        return self.first_bad is None

    def summary(self) -> str:
        if self.first_bad is None:
            return f"intact: {self.entries} entries, {self.checkpoints} checkpoints"
        return f"entry {self.first_bad.seq}: {self.first_bad.reason}"

    def public(self) -> dict[str, object]:
        bad = self.first_bad
        return {"intact": self.intact, "entries": self.entries, "checkpoints": self.checkpoints,
                "first_bad": None if bad is None else {"seq": bad.seq, "reason": bad.reason},
                "head_hash": self.head}


def _trusted(checkpoints: list[cp.Checkpoint], keys: dict[str, Ed25519PublicKey],
             findings: list[Finding]) -> dict[int, cp.Checkpoint]:
    """Checkpoints whose signatures hold, up to the first that does not (reported)."""
    trusted: dict[int, cp.Checkpoint] = {}
    covered = 0
    for checkpoint in sorted(checkpoints, key=lambda c: c.tree_size):
        why = cp.check_signature(checkpoint, keys)
        if why is not None:
            findings.append(Finding(covered + 1,
                                    f"the checkpoint of {checkpoint.tree_size} entries {why}"))
            break
        trusted[checkpoint.tree_size] = checkpoint
        covered = checkpoint.tree_size
    return trusted


def verify_bytes(data: bytes, checkpoints: list[cp.Checkpoint],
                 keys: dict[str, Ed25519PublicKey],
                 written: tuple[int, str] | None = None) -> Verdict:
    """Verify a log's bytes. ``written`` is what the running server knows it appended
    (count, last hash): with it, truncation after the last checkpoint is caught too."""
    findings: list[Finding] = []
    trusted = _trusted(checkpoints, keys, findings)
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    frontier, prev, count, proven = MerkleFrontier(), GENESIS, 0, 0
    # a root mismatch at a checkpoint of S entries blames the range after the last proven
    # checkpoint; it waits one line, since entry S+1's link may pinpoint entry S itself
    mismatch: Finding | None = None
    for seq, line in enumerate(lines, start=1):
        try:
            prev = check_line(line, seq, prev)
        except BrokenEntry as broken:
            if mismatch is not None and broken.seq >= seq:  # no better than the range
                findings.append(mismatch)
            else:
                findings.append(Finding(broken.seq, broken.reason))
            mismatch = None
            break
        if mismatch is not None:
            break
        frontier.append(leaf_hash(line))
        count = seq
        checkpoint = trusted.get(seq)
        if checkpoint is not None:
            if frontier.root().hex() != checkpoint.root_hash:
                mismatch = Finding(proven + 1, f"entries {proven + 1}..{seq} do not match the "
                                   f"signed checkpoint of {seq} entries (rewritten)")
            proven = seq
    else:
        if mismatch is None:
            _check_length(data[end:], count, prev, trusted, written, findings)
    if mismatch is not None:
        findings.append(mismatch)
    first_bad = min(findings, key=lambda f: f.seq) if findings else None
    return Verdict(len(lines), len(checkpoints), first_bad, prev)


def _check_length(tail: bytes, count: int, head: str, trusted: dict[int, cp.Checkpoint],
                  written: tuple[int, str] | None, findings: list[Finding]) -> None:
    if tail:
        findings.append(Finding(count + 1, f"is incomplete: the log ends with {len(tail)} bytes "
                                "without a newline (torn or truncated last line)"))
    covered = max(trusted, default=0)
    if covered > count:
        findings.append(Finding(count + 1, f"is missing: the log ends after entry {count} but "
                                f"a signed checkpoint covers {covered} entries (truncated)"))
    if written is not None:
        size, last = written
        if size > count:
            findings.append(Finding(count + 1, f"is missing: the log ends after entry {count} "
                                    f"but this server wrote {size} (truncated)"))
        elif size == count and size and last != head:
            findings.append(Finding(count, "differs from the entry this server wrote"))


def read_settled(path: Path, retries: int = TORN_TAIL_RETRIES) -> bytes:
    """The log's bytes, re-read while its last line is still being written."""
    data = path.read_bytes()
    for _ in range(retries):
        if not data or data.endswith(b"\n"):
            break
        time.sleep(TORN_TAIL_WAIT)
        data = path.read_bytes()
    return data


def verify_data_dir(data_dir: Path, torn_tail_retries: int = TORN_TAIL_RETRIES) -> Verdict:
    """Verify ``DATA_DIR/audit/audit.log`` against the checkpoints in ``meta.sqlite3``;
    a last line without its newline is re-read ``torn_tail_retries`` times before it counts
    as torn (an append in flight)."""
    from tally.audit.log import log_path

    con = cp.connect_readonly(data_dir)
    try:
        checkpoints = cp.load(con) if con else []
        keys = cp.public_keys(con) if con else {}
    finally:
        if con is not None:
            con.close()
    path = log_path(data_dir)
    if not path.exists():
        if not checkpoints:
            raise StoreUnavailable(f"no audit log at {path}")
        data = b""  # deleted: the checkpoints say what is missing
    else:
        data = read_settled(path, torn_tail_retries)
    return verify_bytes(data, checkpoints, keys)

"""One audit entry: its canonical bytes, its hash and the checks a verifier makes on a line.

An entry is a JSON object written on one line in canonical form — keys sorted, no insignificant
whitespace, UTF-8, no floats (msgspec's ``order="sorted"`` encoding; for the values entries hold
it coincides with RFC 8785). ``hash`` is the hex SHA-256 of the canonical encoding of every
other member, ``prev`` included, so each entry commits to the whole chain before it. The Merkle
leaf of an entry is its whole line (``hash`` included) without the newline.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import msgspec

GENESIS = "0" * 64  # ``prev`` of entry 1


def canonical(value: dict[str, Any]) -> bytes:
    return msgspec.json.encode(value, order="sorted")


def entry_hash(body: dict[str, Any]) -> str:
    """The hash of an entry's members other than ``hash``."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seal(record: dict[str, Any], seq: int, prev: str) -> tuple[bytes, str]:
    """The line (without newline) and hash of ``record`` as entry ``seq`` after ``prev``."""
    body = {**record, "seq": seq, "time": utc_now(), "prev": prev}
    digest = entry_hash(body)
    return canonical({**body, "hash": digest}), digest


def stored_hash(line: bytes) -> str:
    """The ``hash`` member of a line, or the line's own digest when it has none readable
    (the next entry chains to what is written; verification reports the damage)."""
    try:
        value = msgspec.json.decode(line)
    except (msgspec.DecodeError, ValueError):  # ValueError: bad UTF-8
        value = None
    if isinstance(value, dict) and isinstance(value.get("hash"), str):
        return str(value["hash"])
    return hashlib.sha256(line).hexdigest()


class BrokenEntry(Exception):
    """A line that fails a check; ``seq`` is the entry to blame."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"entry {seq}: {reason}")
        self.seq, self.reason = seq, reason


def check_line(line: bytes, seq: int, prev: str) -> str:
    """Check the line at position ``seq`` (1-based) that should follow an entry whose hash is
    ``prev``; return its hash or raise ``BrokenEntry``. The checks run from the line's own
    bytes outwards, so damage inside an entry is blamed on that entry."""
    try:
        value = msgspec.json.decode(line)
    except (msgspec.DecodeError, ValueError):  # ValueError: bad UTF-8
        raise BrokenEntry(seq, "is not valid JSON (bytes altered, or lines merged)") from None
    if not isinstance(value, dict):
        raise BrokenEntry(seq, "is not a JSON object")
    if canonical(value) != line:
        raise BrokenEntry(seq, "is not in canonical form (bytes altered)")
    if value.get("seq") != seq:
        raise BrokenEntry(seq, f"holds seq {value.get('seq')!r} where entry {seq} belongs "
                               "(an entry was deleted, inserted or moved)")
    digest = value.get("hash")
    if digest != entry_hash(value):
        raise BrokenEntry(seq, "its hash does not match its content (entry altered)")
    if value.get("prev") != prev:
        # this entry is intact; the link to the one before is broken: that entry was altered
        # and given a matching hash (or replaced), so it is the first bad one
        blamed = max(seq - 1, 1)
        raise BrokenEntry(blamed, f"its hash is not the prev of entry {seq} (entry {blamed} "
                                  "was altered and re-hashed, or replaced)"
                          if seq > 1 else "prev is not the genesis value")
    return str(digest)

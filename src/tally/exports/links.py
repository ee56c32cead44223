"""Signed, expiring download links: HMAC-SHA256 over the job id and the expiry, with a key of
the deployment (made on first use in the metadata database). A link works without a bearer
token, for its one file, until it expires; a changed id, expiry or signature is refused, and
replacing the key (``tally keys rotate-link-key``) invalidates every link made before."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from datetime import datetime

from tally.exports.jobs import now
from tally.metadata import deployment_key

KEY_NAME = "export_links"


def signature(con: sqlite3.Connection, job_id: str, expires: int) -> str:
    message = f"{job_id}.{expires}".encode()
    return hmac.new(deployment_key(con, KEY_NAME), message, hashlib.sha256).hexdigest()


def link(con: sqlite3.Connection, job_id: str, until: datetime) -> str:
    """The path of the job's file, signed until ``until``."""
    expires = int(until.timestamp())
    return (f"/v1/exports/{job_id}/file?expires={expires}"
            f"&signature={signature(con, job_id, expires)}")


def valid(con: sqlite3.Connection, job_id: str, expires: int, given: str) -> str | None:
    """Why the link is refused (None: it is good)."""
    if not hmac.compare_digest(signature(con, job_id, expires), given):
        return "the link's signature does not match (tampered, or signed by a replaced key)"
    if expires < now().timestamp():
        return "the link has expired: ask GET /v1/exports/{id} for a fresh one"
    return None

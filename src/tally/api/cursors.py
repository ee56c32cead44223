"""Opaque cursors of the admin listings: a position in a stream, tagged with the stream's kind
so a cursor of one listing is refused by another."""

from __future__ import annotations

import base64

from tally.errors import BadRequest, InvalidCursor
from tally.insights.request import parse_bounded_int

MAX_POSITION = 2**63 - 1  # positions are BIGINT sequence numbers


def encode_cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, value = raw.partition(":")
        if tag != kind:
            raise ValueError(raw)
        return parse_bounded_int(value, "cursor", 0, MAX_POSITION, default=0)
    except (ValueError, BadRequest):
        raise InvalidCursor("cursor is not one this API issued") from None

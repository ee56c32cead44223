"""JSON sent by clients is decoded here, and only here, so every way a body can fail to be JSON
is one ``400`` problem that names the cause — never a ``500``:

- bytes that are not UTF-8 (RFC 8259 §8.1), a byte order mark included. msgspec checks UTF-8
  only in the strings it turns into ``str``; a ``msgspec.Raw`` value (the payload kept verbatim,
  the quarantined event) or a skipped unknown field passes unchecked, so the whole body is
  checked first (~0.1 ms per MiB of ASCII: the codec's fast path);
- malformed JSON, lone surrogate escapes (``"\\ud800"``: not text, RFC 8259 §8.2);
- nesting deeper than the decoder can follow: msgspec recurses once per level and stops at the
  interpreter's recursion limit (1,000 frames, less the server's own stack), raising
  ``RecursionError``; RFC 8259 §9 lets a parser limit depth;
- a number no integer or float can hold (``1e400``, a 5,000-digit integer) where any value is
  allowed: msgspec reports it as a ``ValidationError`` of an untyped decode.

A value that a *typed* decoder refuses (a wrong field type) is the caller's business: it is
re-raised as ``msgspec.ValidationError`` (ingestion turns it into a per-event rejection).
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from tally.errors import InvalidBody

T = TypeVar("T")
BOM = b"\xef\xbb\xbf"
ANY: msgspec.json.Decoder[Any] = msgspec.json.Decoder()


class MalformedJson(InvalidBody):
    """A body that is not JSON at all (as opposed to JSON of the wrong shape)."""


def check_utf8(data: bytes, what: str) -> None:
    """``data`` is UTF-8 text without a byte order mark, else :class:`MalformedJson`."""
    if data.startswith(BOM):
        raise MalformedJson(f"{what} starts with a byte order mark; JSON text must not "
                            "(RFC 8259 §8.1)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson(f"{what} is not UTF-8: byte {exc.start} (0x{data[exc.start]:02x}) "
                            f"is {exc.reason}") from None


def decode(data: bytes, what: str, decoder: msgspec.json.Decoder[T], *,
           checked: bool = False) -> T:
    """``data`` decoded by ``decoder``; ``checked``: :func:`check_utf8` already passed on the
    body ``data`` comes from (a slice of it need not be checked again)."""
    if not checked:
        check_utf8(data, what)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        if decoder.type is not Any:
            raise
        raise MalformedJson(f"{what} has a number out of range: {exc}") from None
    except msgspec.DecodeError as exc:
        raise MalformedJson(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJson(f"{what} nests JSON arrays or objects too deeply for this "
                            "server (keep it under 500 levels)") from None
    except UnicodeDecodeError as exc:  # only reachable with checked=True on unchecked bytes
        raise MalformedJson(f"{what} is not UTF-8: {exc.reason}") from None

"""Hostile inputs: the corpus of ``tests/corpus/`` plus inputs generated from valid seeds.

:func:`load_corpus` takes every item of the corpus as ``tests/test_corpus.py`` sends it to a
real server (one loader, one format: see ``tests/corpus/README.md``); :func:`generated` adds
deterministic mutations of valid requests: deep nesting, bytes that are not UTF-8, numbers
beyond any float, dates at the edges of the calendar, every field of a valid event given every
wrong type, huge ``limit`` strings, truncated and bit-flipped bodies.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from reliability.events import bet, body

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "corpus"
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ROUTES: dict[str, tuple[str, str, dict[str, str]]] = {  # directory → method, path, headers
    "events": ("POST", "/v1/events:batch", JSON),
    "ingest": ("POST", "/v1/events:batch", JSON),
    "batch": ("POST", "/v1/events:batch", JSON),
    "token": ("POST", "/oauth/token", FORM),
    "oauth": ("POST", "/oauth/token", FORM),
    "funnel": ("POST", "/v1/analytics/funnel", JSON),
    "retention": ("POST", "/v1/analytics/retention", JSON),
    "fx-rates": ("POST", "/v1/admin/fx-rates", JSON),
    "fx": ("POST", "/v1/admin/fx-rates", JSON),
}
QUERY_DIRS = ("query", "queries", "urls")


@dataclass(frozen=True)
class Input:
    name: str  # where it came from: a corpus path or a generator's label
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str | bytes], ...] = ()
    auth: bool = True


def load_corpus() -> list[Input]:
    from tests.test_corpus import corpus_requests

    inputs: list[Input] = []
    for item, method, target, extra, raw in corpus_requests():
        own_auth = any(name.lower() == "authorization" for name in extra)
        headers: dict[str, str | bytes] = {**JSON, **extra}
        inputs.append(Input(str(item), method, target, raw or b"",
                            tuple(headers.items()), auth=not own_auth))
    return inputs


def _event() -> dict[str, Any]:
    return bet("hostile-seed", datetime.now(UTC).replace(microsecond=0))


WRONG_VALUES: list[Any] = [None, [], {}, "", 0, -1, True, 1.5, "x" * 70_000, [[[]]],
                           {"$ne": 1}, "\u0000", "\ud800", 10**30, -(10**30)]
EDGE_DATES = ["0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z",
              "+275760-09-13T00:00:00Z", "2025-02-30T00:00:00Z", "2025-13-01", "1e309",
              "2025-01-01T25:61:61Z", "-0001-01-01", "99999999999999999999", ""]
QUERY_ROUTES = {
    "/v1/analytics/timeseries": {"metric": "bets", "granularity": "1h"},
    "/v1/analytics/slice": {"metric": "ggr", "dim": "game_id"},
    "/v1/analytics/ltv": {"cohort": "first_deposit", "metric": "ggr", "horizon": "30d"},
}
HOSTILE_PARAMS = ["99999999999999999999999", "-1", "0", "1e309", "NaN", "%00", "\u202e",
                  "a" * 5000, "2025-01-01T00:00:00+99:99"]


def generated(seed: int = 9) -> Iterator[Input]:
    """Deterministic hostile inputs for every route that takes one."""
    rng = random.Random(seed)
    batch = "/v1/events:batch"
    nested = "[" * 100_000 + "]" * 100_000
    yield Input("deep nesting: array", "POST", batch, nested.encode())
    for depth in (1_000, 100_000):
        text = json.dumps(_event())[:-1] + ', "payload2": ' + "[" * depth + "]" * depth + "}"
        yield Input(f"deep nesting in an unknown field ({depth})", "POST", batch,
                    f"[{text}]".encode())
    valid = body([_event()])
    assert b"studio_x" in valid and b'"stake_minor":500' in valid  # what the mutations edit
    yield Input("not UTF-8", "POST", batch, valid.replace(b"studio_x", b"studio\xff\xfe"))
    for number in ("1e400", "-1e400", "123456789012345678901234567890", "1" * 5000):
        yield Input(f"number {number[:20]}", "POST", batch,
                    valid.replace(b'"stake_minor":500', f'"stake_minor":{number}'.encode()))
    for when in EDGE_DATES:
        event = {**_event(), "occurred_at": when}
        yield Input(f"occurred_at {when!r}", "POST", batch, body([event]))
    yield from _wrong_types()
    for cut in sorted(rng.sample(range(1, len(valid)), 12)):
        yield Input(f"truncated at {cut}", "POST", batch, valid[:cut])
    for n in range(12):
        flipped = bytearray(valid)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        yield Input(f"bit flip {n}", "POST", batch, bytes(flipped))
    yield from _queries()
    for form in (b"grant_type=client_credentials&" + b"a=" + b"x" * 70_000, b"%ff%fe=\xff",
                 b"grant_type=" + b"&" * 10_000):
        yield Input(f"token form {form[:20]!r}", "POST", "/oauth/token", form,
                    tuple(FORM.items()), auth=False)


def _wrong_types() -> Iterator[Input]:
    event = _event()
    for field in [*event, *(f"payload.{k}" for k in event["payload"])]:
        for value in WRONG_VALUES:
            mutated = json.loads(json.dumps(event))
            if field.startswith("payload."):
                mutated["payload"][field.removeprefix("payload.")] = value
            else:
                mutated[field] = value
            text = json.dumps([mutated], ensure_ascii=False).encode("utf-8", "surrogatepass")
            yield Input(f"{field} = {str(value)[:20]!r}", "POST", "/v1/events:batch", text)


def _queries() -> Iterator[Input]:
    for route, base in QUERY_ROUTES.items():
        full = {**base, "from": "2025-01-01", "to": "2025-01-02"}
        for param in [*full, "limit", "cursor", "filters", "group_by", "currency"]:
            for value in HOSTILE_PARAMS + EDGE_DATES[:5]:
                query = urlencode({**full, param: value})
                yield Input(f"{route} {param}={value[:20]!r}", "GET", f"{route}?{query}")
    step = {"event": "bet.settled"}
    for funnel in ({"steps": [step] * 10_000}, {"steps": "x"},
                   {"steps": [step], "from": "0000-01-01", "to": "9999-12-31"},
                   {"steps": [step], "window_sec": 10**30}):
        yield Input(f"funnel {str(funnel)[:40]}", "POST", "/v1/analytics/funnel",
                    json.dumps(funnel).encode(), tuple(JSON.items()))

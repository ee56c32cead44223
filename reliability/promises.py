"""How an answer is judged against what Tally promises (CONTRACT §3, §4; issue 9).

Ingestion: ``202`` means durable; refusing is allowed only as push-back — ``503`` or ``429``
with ``Retry-After`` — and every error is ``application/problem+json``. Never a ``500``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping

from reliability.findings import Findings
from reliability.load import Outcome
from reliability.setcheck import EventSet

PUSH_BACK = (429, 503)
PROBLEM = "application/problem+json"


def is_push_back(status: int, headers: Mapping[str, str]) -> bool:
    lower = {k.lower(): v for k, v in headers.items()}
    return status in PUSH_BACK and lower.get("retry-after", "").strip().isdigit()


def is_problem(headers: Mapping[str, str]) -> bool:
    lower = {k.lower(): v for k, v in headers.items()}
    return lower.get("content-type", "").startswith(PROBLEM)


def accepted_keys(keys: list[tuple[str, str]], receipt: bytes) -> list[tuple[str, str]]:
    """The keys a ``202`` acknowledges as stored: all but those its receipt rejects (a
    rejected event is quarantined, not stored)."""
    try:
        rejected = {int(e["index"]) for e in json.loads(receipt).get("errors", [])}
    except (ValueError, TypeError, KeyError):
        return list(keys)
    return [key for i, key in enumerate(keys) if i not in rejected]


def judge_ingestion(outcomes: Iterable[Outcome], events: EventSet, findings: Findings,
                    what: str, answers_required: bool = True) -> Counter[str]:
    """Acknowledge the events of each ``202`` (their keys are the request's ``tag``); any
    answer but 202 or push-back is a broken promise, reported once per status with an
    example. ``answers_required``: no answer at all (reset, timeout) is broken too."""
    counts: Counter[str] = Counter()
    wrong: dict[int, tuple[int, str]] = {}  # status → (how many, first example)
    for o in outcomes:
        if o.status == 202:
            events.record_acknowledged(accepted_keys(o.request.tag, o.body))
            counts["acknowledged"] += 1
        elif is_push_back(o.status, o.headers):
            counts["pushed back"] += 1
        else:
            counts["no answer" if o.status == 0 else "wrong"] += 1
            if o.status == 0 and not answers_required:
                continue
            n, example = wrong.get(o.status, (0, o.error or repr(o.body[:160])))
            wrong[o.status] = (n + 1, example)
    for status, (n, example) in sorted(wrong.items()):
        answer = f"answered {status}" if status else "got no answer"
        findings.expect(False, f"{what}: {n} batches {answer} (neither 202 nor 503/429 with "
                               f"Retry-After), e.g. {example}")
    return counts

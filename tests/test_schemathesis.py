"""Schemathesis over every operation of ``/openapi.json`` against a real ``tally serve`` on a
demo store, with every check on: the document and the server cannot disagree (parameters,
bodies, statuses, content types, headers, response schemas), negative data is rejected,
and no route ignores its authentication.

Configuration, and why (``schemathesis.toml`` beside the suite would apply to every run; it
is given here instead):

- ``positive_data_acceptance`` also accepts ``400`` and ``422``: a query valid for the schema
  may still be refused for a reason JSON Schema cannot state — ``from`` after ``to``, a filter
  key that does not apply to the metric, a range past a size limit, a day before 1900 after a
  time-zone shift. Each such refusal is a problem+json naming the field, checked by the other
  checks.
- ``max_response_time`` is off: performance is measured in ``bench/``, not in tests.
- Ingestion (``POST /v1/events:batch``) keeps its data: generated events are rejected or
  accepted as the contract says, and either way the answer conforms.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from tally.config import Settings
from tally.demo.load import load_demo
from tests.server import Server, new_client, token

ALL = "events:write analytics:read exports:write admin"
EXAMPLES = 25  # per operation: ~20 operations × 25, positive and negative ≈ 1,000 requests
CONFIG = SchemathesisConfig.from_str("""
[generation]
mode = "all"

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429"]
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    data = tmp_path_factory.mktemp("schemathesis") / "data"
    load_demo(Settings(data_dir=data), events=3000, days=7, seed=7)
    admin = new_client(data, ALL)
    server = Server(data)
    try:
        yield server.url, token(server.url, *admin)
    finally:
        server.stop()


# the committed document (tests/test_openapi_doc.py: it is the one the server generates)
schema = schemathesis.openapi.from_path(Path(__file__).parent.parent / "openapi.json",
                                        config=CONFIG)


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_conforms(case: schemathesis.Case,
                                  served: tuple[str, dict[str, str]]) -> None:
    url, headers = served
    # a query string has only strings: a "negative" true/false/null for a string parameter
    # arrives as the text "true" (schemathesis serialises it before the case is seen here),
    # which is a valid value (a brand may be called that), not a negative case: such cases are
    # left out rather than blamed on the server
    hypothesis.assume(not any(_untyped(value) for value in (case.query or {}).values()))
    case.call_and_validate(base_url=url, headers=headers)


def _untyped(value: object) -> bool:
    if isinstance(value, list):
        return any(_untyped(item) for item in value)
    return value is None or isinstance(value, bool) or value in ("true", "false", "null")

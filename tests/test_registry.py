"""The schema registry and its semver rules."""

from __future__ import annotations

import msgspec
import pytest

from tally.events import payloads as p
from tally.events.registry import REGISTRY, EventSpec, SchemaVersion, check_history, parse_semver
from tally.storage.schema import EVENTS_SCHEMA

CONTRACT_TYPES = {
    "player.registered", "session.started", "session.ended", "bet.placed", "bet.settled",
    "wallet.debit", "wallet.credit", "payment.intent", "payment.authorized", "payment.captured",
    "payment.failed", "bonus.issued", "bonus.consumed", "rg.limit.hit", "rg.reality_check",
}


def test_registry_has_exactly_the_contract_types():
    assert set(REGISTRY) == CONTRACT_TYPES


@pytest.mark.parametrize("name", sorted(CONTRACT_TYPES))
def test_every_history_obeys_the_minor_version_rule(name):
    assert check_history(REGISTRY[name]) == []


def test_a_minor_version_adding_a_required_field_is_caught():
    bad = EventSpec("bet.placed", p.BetPlaced, True,
                    (SchemaVersion("1.0.0"), SchemaVersion("1.1.0", ("stake_minor",))))
    assert "adds required field" in check_history(bad)[0]


def test_versions_out_of_order_are_caught():
    bad = EventSpec("x", p.Bonus, True, (SchemaVersion("1.2.0"), SchemaVersion("1.1.0")))
    assert any("ascending" in problem for problem in check_history(bad))


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("1.3.0", (1, 3, 0)), ("10.0.1-rc.1+build5", (10, 0, 1)), ("1.3", None), ("01.0.0", None),
     ("v1.0.0", None), ("1.0.0.0", None)],
)
def test_semver_parsing(text, parsed):
    assert parse_semver(text) == parsed


def test_money_fields_are_integers_in_every_payload():
    for spec in REGISTRY.values():
        info = msgspec.inspect.type_info(spec.payload_type)
        for field in info.fields:  # type: ignore[attr-defined]
            if field.name.endswith("_minor"):
                types = getattr(field.type, "types", (field.type,))
                kinds = {type(t).__name__ for t in types} - {"NoneType"}
                assert kinds == {"IntType"}, (spec.name, field.name, kinds)


def test_schemas_endpoint_serves_every_type_with_a_json_schema(client, headers):
    body = client.get("/v1/schemas", headers=headers).json()
    served = {t["event_type"]: t for t in body["event_types"]}
    assert set(served) == CONTRACT_TYPES
    settled = served["bet.settled"]
    assert settled["current_version"] == "1.2.0" and settled["accepted_majors"] == [1]
    schema = settled["payload_schema"]
    props = schema["$defs"]["BetSettled"]["properties"]
    assert props["stake_minor"]["type"] == "integer"
    assert set(schema["$defs"]["BetSettled"]["required"]) == {
        "bet_id", "stake_minor", "win_minor", "currency", "game_id", "provider_id"}
    assert served["payment.intent"]["player_id_required"] is False


def test_every_payload_field_is_a_typed_column():
    """A batch whose payloads hold only their types' fields stores no payload text
    (``ingest/batch.py``): that is lossless only while every field is a column."""
    missing = {(name, f) for name, spec in REGISTRY.items()
               for f in spec.payload_type.__struct_fields__ if f not in EVENTS_SCHEMA.names}
    assert missing == set()

"""The semver schema registry: every event type, its payload type and its version history.

Rules (CONTRACT §2): a minor version may only add optional payload fields, so every
``1.x.y`` payload validates against the newest ``1.*`` type (fields it does not know are kept
verbatim in the raw payload). A major version the registry does not know is rejected per event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tally.events import payloads as p

SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"
)


@dataclass(frozen=True)
class SchemaVersion:
    version: str
    added_optional: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class EventSpec:
    name: str
    payload_type: type[p.Payload]
    player_required: bool = True
    history: tuple[SchemaVersion, ...] = field(default=())

    @property
    def current(self) -> str:
        return self.history[-1].version

    @property
    def field_names(self) -> tuple[str, ...]:
        """The payload type's fields, in its order."""
        return self.payload_type.__struct_fields__

    @property
    def majors(self) -> frozenset[int]:
        return frozenset(int(v.version.split(".")[0]) for v in self.history)


_BASE = (SchemaVersion("1.0.0", note="initial contract"),)
_BETS = (
    *_BASE,
    SchemaVersion("1.1.0", ("in_bonus",), "bonus-funded bets flagged"),
)
_SETTLED = (
    *_BETS,
    SchemaVersion(
        "1.2.0",
        ("jackpot_contribution_minor", "commission_minor"),
        "NGR deductions carried on the settlement",
    ),
)
_WITH_DEVICE = (*_BASE, SchemaVersion("1.1.0", ("device",), "device class"))


def _spec(name: str, payload: type[p.Payload], history: tuple[SchemaVersion, ...] = _BASE,
          player_required: bool = True) -> EventSpec:
    return EventSpec(name, payload, player_required, history)


REGISTRY: dict[str, EventSpec] = {
    s.name: s
    for s in (
        _spec("player.registered", p.PlayerRegistered, _WITH_DEVICE),
        _spec("session.started", p.SessionStarted, _WITH_DEVICE),
        _spec("session.ended", p.SessionEnded),
        _spec("bet.placed", p.BetPlaced, _BETS),
        _spec("bet.settled", p.BetSettled, _SETTLED),
        _spec("wallet.debit", p.WalletMove),
        _spec("wallet.credit", p.WalletMove),
        _spec("payment.intent", p.Payment, player_required=False),
        _spec("payment.authorized", p.Payment, player_required=False),
        _spec("payment.captured", p.Payment, player_required=False),
        _spec("payment.failed", p.Payment, player_required=False),
        _spec("bonus.issued", p.Bonus),
        _spec("bonus.consumed", p.Bonus),
        _spec("rg.limit.hit", p.ResponsibleGambling),
        _spec("rg.reality_check", p.ResponsibleGambling),
    )
}


def parse_semver(version: str) -> tuple[int, int, int] | None:
    match = SEMVER.match(version)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


def required_fields(payload_type: type[msgspec.Struct]) -> frozenset[str]:
    info = msgspec.inspect.type_info(payload_type)
    assert isinstance(info, msgspec.inspect.StructType)
    return frozenset(f.name for f in info.fields if f.required)


def check_history(spec: EventSpec) -> list[str]:
    """Problems with a spec's history: versions out of order, or a minor adding a required field."""
    problems: list[str] = []
    versions = [parse_semver(v.version) for v in spec.history]
    if any(v is None for v in versions):
        problems.append(f"{spec.name}: a version is not semver")
        return problems
    if versions != sorted(versions):  # type: ignore[type-var]
        problems.append(f"{spec.name}: versions are not in ascending order")
    required = required_fields(spec.payload_type)
    for version in spec.history[1:]:
        bad = required.intersection(version.added_optional)
        if bad:
            problems.append(f"{spec.name} {version.version}: adds required field(s) {sorted(bad)}")
        unknown = set(version.added_optional) - set(spec.field_names)
        if unknown:
            problems.append(
                f"{spec.name} {version.version}: names unknown field(s) {sorted(unknown)}"
            )
    return problems


def describe_registry() -> dict[str, Any]:
    """The registry as served at ``GET /v1/schemas``: versions plus a JSON Schema per payload."""
    types = []
    for spec in REGISTRY.values():
        types.append(
            {
                "event_type": spec.name,
                "current_version": spec.current,
                "accepted_majors": sorted(spec.majors),
                "player_id_required": spec.player_required,
                "versions": [
                    {"version": v.version, "added_optional_fields": list(v.added_optional),
                     "note": v.note}
                    for v in spec.history
                ],
                "payload_schema": msgspec.json.schema(spec.payload_type),
            }
        )
    return {
        "compatibility": (
            "semver: a minor version only adds optional payload fields; unknown payload fields "
            "are kept; an unknown major version is rejected per event"
        ),
        "event_types": types,
    }

"""One definition per rule (issue 11 item 2): what a deposit is and what makes a player
active are written once, in semantic/rules.py, and every query, rollup and cohort table
derives from them."""

from __future__ import annotations

import ast
from datetime import datetime
from pathlib import Path

from tally.cohorts.tables import derived_tables as cohort_tables
from tally.rollups import activity
from tally.semantic import rules
from tally.semantic.catalog import METRICS
from tally.semantic.compiler import Scope, compile_active, compile_measures
from tally.storage.dialects import render

SRC = Path(__file__).resolve().parent.parent / "src" / "tally"
RULES = SRC / "semantic" / "rules.py"
# the literals a rule is made of: its event types and the deposit reason
RULE_WORDS = ("deposit", "wallet.credit", "bet.placed", "session.started", "session.ended",
              "player.registered")
# places that name these words without defining a rule: the event registry and its payload
# schemas (what an event may carry), the demo's data generator (it writes such events), and
# the documented default return event of a retention request (the HTTP model)
NOT_RULES = ("events", "demo", "api/models.py")


def _literals(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text in RULE_WORDS or any(f"'{word}'" in text for word in RULE_WORDS):
                found.append((node.lineno, text))
    return found


def test_the_rules_literals_appear_only_in_the_rules_module() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if path == RULES or relative.startswith(NOT_RULES):
            continue
        offenders += [f"{relative}:{line}: {text[:60]!r}" for line, text in _literals(path)]
    assert offenders == []
    assert {text for _, text in _literals(RULES)} >= set(RULE_WORDS)


def test_the_scan_sees_a_rule_written_again(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("A = \"event_type = 'wallet.credit' AND reason = 'deposit'\"\n"
                      "B = ('wallet.credit', 'deposit')\n")
    assert len(_literals(module)) == 3


def _sql(tree: object) -> str:
    return render(tree, "duckdb")  # type: ignore[arg-type]


def test_every_query_and_table_derives_from_the_deposit_rule() -> None:
    deposit = _sql(rules.DEPOSIT.condition())
    scope = Scope(datetime(2025, 1, 1), datetime(2025, 1, 2), 3600, {}, ())
    assert deposit in compile_measures(METRICS["deposits"], scope, False).sql("duckdb")
    assert deposit in compile_active(scope, 60, True).sql("duckdb")
    firsts = next(t for t in cohort_tables("duckdb") if t.name == "player_firsts")
    assert deposit in firsts.from_batch[0] and deposit in firsts.from_all[0]
    for grain in activity.GRAINS:
        table = next(t for t in activity.derived_tables("duckdb")
                     if t.name == activity.table(grain))
        assert deposit in table.from_batch[0] and deposit in table.from_all[0]


def test_every_active_player_query_derives_from_the_active_rule() -> None:
    always = _sql(rules.always_active())
    scope = Scope(datetime(2025, 1, 1), datetime(2025, 1, 2), 3600, {}, ())
    assert _sql(rules.active(rules.SESSION_ENDED.condition())).startswith(always)
    assert always in compile_active(scope, 60, True).sql("duckdb")
    for table in activity.derived_tables("duckdb"):
        if table.name.startswith("active_"):
            assert always in table.from_batch[0] and always in table.from_all[0]
    assert set(rules.ALWAYS_ACTIVE) == {"bet", "deposit"}
    assert rules.ACTIVE_DEFINITION in METRICS["dau"].definition

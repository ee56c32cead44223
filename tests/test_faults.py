"""The fault suite (``reliability/``) at a bounded size: real server processes under SIGKILL,
full and read-only filesystems, a poison journal record, slow clients, overload, hostile
input and SIGTERM under backlog. Each test asserts that the scenario saw no broken promise;
the assertion message lists every one it saw, with its figures. ``make reliability`` runs
the same scenarios larger and writes docs/reliability.md. Needs root (mounts), as CI has."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability.findings import Findings
from reliability.scenarios import (
    crash,
    hostile,
    overload,
    poison,
    shutdown,
    slow,
    startup,
    storage,
)

pytestmark = pytest.mark.slow


def check(findings: Findings) -> None:
    print(findings.summary())  # the figures, in the output of a passing run too (-rA, -s)
    assert not findings.violations, findings.summary()


def test_sigkill_cycles_with_concurrent_writers_lose_and_double_nothing(tmp_path: Path):
    findings = crash.run(tmp_path, crash.SIZES["test"])
    check(findings)
    assert findings.figures["events acknowledged"] > 0  # the writers did get through


def test_full_and_read_only_journal_store_and_audit_log(tmp_path: Path):
    findings = storage.run(tmp_path, storage.SIZES["test"])
    check(findings)


def test_start_up_on_read_only_storage_is_a_clear_refusal(tmp_path: Path):
    findings = startup.run(tmp_path, startup.SIZES["test"])
    check(findings)


def test_a_poison_record_blocks_neither_later_records_nor_the_restart(tmp_path: Path):
    findings = poison.run(tmp_path, poison.SIZES["test"])
    check(findings)


def test_slow_and_idle_clients_do_not_starve_well_behaved_ones(tmp_path: Path):
    findings = slow.run(tmp_path, slow.SIZES["test"])
    check(findings)


def test_overload_is_pushed_back_and_answers_never_overclaim(tmp_path: Path):
    findings = overload.run(tmp_path, overload.SIZES["test"])
    check(findings)


def test_hostile_and_oversized_input_never_gets_a_5xx(tmp_path: Path):
    findings = hostile.run(tmp_path, hostile.SIZES["test"])
    check(findings)
    assert findings.figures["inputs tried"] > 300


def test_sigterm_under_backlog_is_bounded_and_loses_nothing(tmp_path: Path):
    findings = shutdown.run(tmp_path, shutdown.SIZES["test"])
    check(findings)

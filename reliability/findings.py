"""What a scenario measured and which promises it saw broken.

A scenario keeps going after a broken promise, so one run reports all of them (a lost batch
*and* a 500 *and* a stuck ``/readyz``), and the test asserts that the list is empty.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

Figure = int | float | str


@dataclass
class Findings:
    scenario: str
    figures: dict[str, Figure] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def expect(self, condition: bool, broken: str) -> bool:
        """Record ``broken`` (what was seen, with numbers) unless ``condition`` holds."""
        if not condition:
            self.violations.append(broken)
        return condition

    def figure(self, name: str, value: Figure) -> None:
        self.figures[name] = round(value, 3) if isinstance(value, float) else value

    def finish(self) -> Findings:
        self.figure("wall seconds", time.monotonic() - self.started)
        return self

    def summary(self) -> str:
        lines = [f"{self.scenario}: {len(self.violations)} broken promise(s)"]
        lines += [f"  - {v}" for v in self.violations]
        lines += [f"  {k}: {v}" for k, v in self.figures.items()]
        return "\n".join(lines)

"""The tally of the reliability suite: cases tried, faults injected, duplicates seen, data lost.

The tests add to one session-wide `Counts` (the `reliability_counts` fixture in conftest.py); at the
end of the session conftest.py writes it to `build/reliability-counts.json` and prints it, so the
figures in docs/reliability.md come from a real run, not from reading the tests.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Counts:
    """What the reliability tests did and saw; every figure is added by a test that asserted on it."""

    fuzz_cases: Counter[str] = field(default_factory=Counter)
    fuzz_statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    figures: Counter[str] = field(default_factory=Counter)

    def add_fuzz(self, category: str, *, cases: int, statuses: dict[int, int], launches: int) -> None:
        """One fuzz test's cases, the statuses they got and the launches they caused."""
        self.fuzz_cases[category] += cases
        self.fuzz_statuses.update(statuses)
        self.figures["launches_from_bad_requests"] += launches

    def fault(self, kind: str, count: int = 1) -> None:
        """A fault injected (a member stopped or killed, an API error, a hang, a restart...)."""
        self.faults[kind] += count

    def add(self, figure: str, value: int) -> None:
        """A figure measured by a test: duplicates seen, data lost, keys checked, ..."""
        self.figures[figure] += value

    def empty(self) -> bool:
        return not (self.fuzz_cases or self.faults or self.figures)

    def as_dict(self) -> dict[str, Any]:
        five_xx = sum(n for status, n in self.fuzz_statuses.items() if status >= 500)
        return {
            "fuzz_cases_total": sum(self.fuzz_cases.values()),
            "fuzz_cases": dict(sorted(self.fuzz_cases.items())),
            "fuzz_statuses": {str(k): v for k, v in sorted(self.fuzz_statuses.items())},
            "fuzz_5xx": five_xx,
            "faults_injected_total": sum(self.faults.values()),
            "faults_injected": dict(sorted(self.faults.items())),
            **dict(sorted(self.figures.items())),
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    def lines(self) -> list[str]:
        data = self.as_dict()
        out = [f"fuzz cases tried: {data['fuzz_cases_total']} ({data['fuzz_5xx']} answered 5xx)"]
        out += [f"  {name}: {n}" for name, n in data["fuzz_cases"].items()]
        out.append(f"faults injected: {data['faults_injected_total']}")
        out += [f"  {name}: {n}" for name, n in data["faults_injected"].items()]
        out += [f"{name.replace('_', ' ')}: {n}" for name, n in sorted(self.figures.items())]
        return out


COUNTS = Counts()

"""Pin coverage: which backings were exercised with which GUP flavour and pin provider.

The pin suites record, on every result, the properties `backing`, `gup` (GUP flavour),
`provider` and `pin_kind`. This module turns them into one row per (requirement, backing,
GUP flavour): how many tests passed, failed or were skipped, which providers actually ran, and
why the rest did not (distinct skip reasons). Results without those properties are ignored.
"""
from __future__ import annotations

import dataclasses

from cvmconf.gtest import FAIL, PASS, SKIP, TestResult


@dataclasses.dataclass
class CoverageRow:
    requirements: str          # "PIN-001" (space-separated when a test names several)
    backing: str
    gup: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    other: int = 0             # ERROR / TIMEOUT
    providers_run: set[str] = dataclasses.field(default_factory=set)
    skip_reasons: set[str] = dataclasses.field(default_factory=set)

    @property
    def exercised(self) -> bool:
        return self.passed + self.failed > 0


def pin_coverage(results: list[TestResult]) -> list[CoverageRow]:
    rows: dict[tuple[str, str, str], CoverageRow] = {}
    for r in results:
        backing, gup = r.properties.get("backing"), r.properties.get("gup")
        if not backing or not gup:
            continue
        reqs = " ".join(r.requirements)
        key = (reqs, backing, gup)
        row = rows.setdefault(key, CoverageRow(reqs, backing, gup))
        provider = r.properties.get("provider", "?")
        if r.outcome == PASS:
            row.passed += 1
            row.providers_run.add(provider)
        elif r.outcome == FAIL:
            row.failed += 1
            row.providers_run.add(provider)
        elif r.outcome == SKIP:
            row.skipped += 1
            if r.skip_reason:
                row.skip_reasons.add(r.skip_reason)
        else:
            row.other += 1
    return [rows[k] for k in sorted(rows)]


def format_pin_coverage(rows: list[CoverageRow], max_reason: int = 110) -> str:
    """A plain-text table (Markdown-compatible) of the coverage rows; '' when there are none."""
    if not rows:
        return ""
    lines = ["| requirement | backing | GUP flavour | pass | fail | skip | providers run | why not run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        why = "; ".join(sorted(r.skip_reasons))
        if len(why) > max_reason:
            why = why[: max_reason - 3] + "..."
        run = ", ".join(sorted(r.providers_run)) or "-"
        lines.append(f"| {r.requirements} | {r.backing} | {r.gup} | {r.passed} | {r.failed} | "
                     f"{r.skipped} | {run} | {why.replace('|', '/')} |")
    return "\n".join(lines)

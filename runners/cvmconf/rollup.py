"""Per-requirement roll-up of test outcomes: FAIL > ERROR > TIMEOUT > PASS > SKIP."""
from __future__ import annotations

import dataclasses

from cvmconf.catalogue import Catalogue
from cvmconf.gtest import ERROR, FAIL, PASS, SKIP, TIMEOUT, TestResult

PRIORITY = {FAIL: 4, ERROR: 3, TIMEOUT: 2, PASS: 1, SKIP: 0}
NOT_RUN = "NOT RUN"


@dataclasses.dataclass
class RequirementResult:
    id: str
    level: str
    outcome: str          # one of the test outcomes, or NOT_RUN when no test of it ran
    exercised: bool       # at least one of its tests executed (PASS or FAIL)
    tests: list[TestResult]
    reason: str           # why it was not exercised (skip reasons, untested_reason)


def roll_up(outcomes: list[str]) -> str:
    if not outcomes:
        return NOT_RUN
    return max(outcomes, key=lambda o: PRIORITY[o])


def requirement_results(cat: Catalogue, results: list[TestResult]) -> list[RequirementResult]:
    by_req: dict[str, list[TestResult]] = {}
    for r in results:
        for rid in r.requirements:
            by_req.setdefault(rid, []).append(r)
    out = []
    for req in cat.requirements:
        tests = by_req.get(req.id, [])
        outcome = roll_up([t.outcome for t in tests])
        exercised = any(t.outcome in (PASS, FAIL) for t in tests)
        if req.untested_reason and not tests:
            reason = req.untested_reason
        elif not tests:
            reason = "no test of it was run"
        elif not exercised:
            reasons = sorted({t.skip_reason or t.outcome for t in tests})
            reason = "; ".join(reasons)
        else:
            reason = ""
        out.append(RequirementResult(req.id, req.level, outcome, exercised, tests, reason))
    return out

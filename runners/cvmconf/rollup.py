"""Per-requirement roll-up of test outcomes: FAIL > ERROR > TIMEOUT > PASS > SKIP, whether the
requirement was exercised (a test of it ran to a verdict: PASS or FAIL), and, when it was not,
why."""
from __future__ import annotations

import dataclasses

from cvmconf.catalogue import Catalogue
from cvmconf.gtest import BROKEN, ERROR, FAIL, OUTCOMES, PASS, SKIP, TIMEOUT, TestResult

PRIORITY = {FAIL: 4, ERROR: 3, TIMEOUT: 2, PASS: 1, SKIP: 0}
NOT_RUN = "NOT RUN"
ORDER = (FAIL, ERROR, TIMEOUT, PASS, SKIP, NOT_RUN)   # for sorting reports: failures first


@dataclasses.dataclass
class RequirementResult:
    id: str
    level: str
    outcome: str          # one of the test outcomes, or NOT_RUN when no test of it ran
    exercised: bool       # at least one of its tests executed to a verdict (PASS or FAIL)
    tests: list[TestResult]
    reason: str           # why it was not exercised (skip reasons, untested_reason, filters)
    family: str = ""
    statement: str = ""
    seeds: tuple[str, ...] = ()
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    platforms: list[str] = dataclasses.field(default_factory=list)   # platforms it was exercised on
    flaky: int = 0

    def to_dict(self) -> dict:
        return {
            "id": self.id, "level": self.level, "family": self.family,
            "statement": self.statement, "seeds": list(self.seeds), "outcome": self.outcome,
            "exercised": self.exercised, "reason": self.reason, "counts": self.counts,
            "platforms": self.platforms, "flaky": self.flaky,
            "tests": [f"{t.binary}:{t.name}" for t in self.tests],
        }


def roll_up(outcomes: list[str]) -> str:
    if not outcomes:
        return NOT_RUN
    return max(outcomes, key=lambda o: PRIORITY[o])


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _reason_rank(reason: str) -> int:
    """Which skip reason a reader needs first: why the requirement does not fit a platform the
    kernel offers (`not applicable:`), then what such a platform lacks, and last the platforms
    the kernel does not offer at all (their reason says nothing about this requirement)."""
    if reason.startswith("not applicable:"):
        return 0
    if "not offered by this kernel" in reason:
        return 2
    return 1


def _skip_reasons(tests: list[TestResult]) -> str:
    reasons: dict[str, int] = {}
    for t in tests:
        if t.outcome == SKIP:
            key = t.skip_reason or "skipped without a reason"
            reasons[key] = reasons.get(key, 0) + 1
    return "; ".join(f"{r} ({_plural(n, 'test')})" for r, n in
                     sorted(reasons.items(), key=lambda kv: (_reason_rank(kv[0]), -kv[1], kv[0])))


def requirement_results(cat: Catalogue, results: list[TestResult],
                        available: dict[str, list[str]] | None = None,
                        selected: set[str] | None = None,
                        not_run_reason: str = "",
                        no_suites_reason: str = "") -> list[RequirementResult]:
    """Rolls results up per catalogue requirement.

    available: requirement ID -> tests of the built suites that name it (None: unknown);
    selected: names of the tests chosen to run (None: all available);
    not_run_reason: why selected tests have no result (e.g. the run was interrupted)."""
    by_req: dict[str, list[TestResult]] = {}
    for r in results:
        for rid in r.requirements:
            by_req.setdefault(rid, []).append(r)
    out = []
    for req in cat.requirements:
        tests = by_req.get(req.id, [])
        outcomes = [t.outcome for t in tests]
        outcome = roll_up(outcomes)
        exercised = any(o in (PASS, FAIL) for o in outcomes)
        counts = {o: outcomes.count(o) for o in OUTCOMES if outcomes.count(o)}
        platforms = sorted({t.properties.get("platform", "") for t in tests
                            if t.outcome in (PASS, FAIL)} - {""})
        have = (available or {}).get(req.id, [])
        if exercised:
            reason = ""
        elif not tests:
            if req.untested_reason and not req.tests:
                reason = f"no test: {req.untested_reason}"
            elif not req.tests:
                reason = "no test names it yet"
            elif no_suites_reason:
                reason = f"not run: {no_suites_reason}"
            elif available is not None and not have:
                reason = "none of its tests is in the suite binaries run here"
            elif selected is not None and not (set(have) & selected):
                reason = "not selected by the filters of this run"
            elif not_run_reason:
                reason = f"not run: {not_run_reason}"
            else:
                reason = "no test of it was run"
        elif all(o == SKIP for o in outcomes):
            reason = f"skipped: {_skip_reasons(tests)}"
        else:
            broken = [t for t in tests if t.outcome in BROKEN]
            parts = [f"{_plural(len(broken), 'test')} did not complete "
                     f"({', '.join(sorted({t.outcome for t in broken}))})"]
            skips = _skip_reasons(tests)
            if skips:
                parts.append(f"skipped: {skips}")
            reason = "; ".join(parts)
        out.append(RequirementResult(
            id=req.id, level=req.level, outcome=outcome, exercised=exercised, tests=tests,
            reason=reason, family=req.family, statement=req.statement, seeds=req.seeds,
            counts=counts, platforms=platforms, flaky=sum(1 for t in tests if t.flaky)))
    return out


def outcome_rank(outcome: str) -> int:
    """Sort key of an outcome in reports (ORDER: failures first, unknown outcomes last)."""
    return ORDER.index(outcome) if outcome in ORDER else len(ORDER)


def info_only(requirement_ids: list[str] | None, levels: dict[str, str | None]) -> bool:
    """Whether a test names only INFO requirements (levels: requirement ID -> level): such a
    test is listed but never counts towards conformance. A test naming none is not INFO-only."""
    ids = requirement_ids or []
    return bool(ids) and all(levels.get(i) == "INFO" for i in ids)

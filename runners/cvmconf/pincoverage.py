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


def _cell(r: CoverageRow, reasons: list[str]) -> str:
    if r.failed:
        return "FAIL" + (f" {r.failed}" if r.failed > 1 else "")
    if r.other:
        return "ERROR"
    if r.passed:
        return "pass" + (f" {r.passed}" if r.passed > 1 else "")
    refs = ",".join(str(reasons.index(x) + 1) for x in sorted(r.skip_reasons))
    return f"skip [{refs}]" if refs else "skip"


def format_pin_coverage(rows: list[CoverageRow], width: int = 80) -> str:
    """A fixed-width text table of the coverage rows, at most `width` columns: per requirement,
    one line per backing, one column per GUP flavour ('pass', 'FAIL', 'ERROR', 'skip [n]', '-'
    for a combination no test covers); then the providers that ran and each distinct skip
    reason once, numbered. '' when there are none."""
    if not rows:
        return ""
    import textwrap
    reasons = sorted({x for r in rows for x in r.skip_reasons})
    flavours = sorted({r.gup for r in rows})
    grid: dict[str, dict[str, dict[str, str]]] = {}
    for r in rows:
        grid.setdefault(r.requirements, {}).setdefault(r.backing, {})[r.gup] = _cell(r, reasons)
    labels = [f"({i})" for i in range(1, len(flavours) + 1)]
    cells = [c for b in grid.values() for fl in b.values() for c in fl.values()]
    cw = max([len(c) for c in cells] + [len(x) for x in labels])
    bw = max(len(b) for bs in grid.values() for b in bs)
    # The backing's name is never cut: when a row would be too wide, it gets its own line and
    # the cells go on the next one.
    split = 2 + bw + len(flavours) * (cw + 2) > width
    if split:
        bw = 2
    lines = textwrap.wrap("GUP flavours: " + "  ".join(f"{lab} {f}" for lab, f in
                                                     zip(labels, flavours)), width,
                          subsequent_indent="    ")
    if split:
        lines.append("  backing")
    lines.append(("  " + ("backing" if not split else "").ljust(bw)
                  + "".join("  " + lab.ljust(cw) for lab in labels)).rstrip())
    for req, backings in grid.items():
        lines.append(req)
        for backing, fl in backings.items():
            row = "".join("  " + fl.get(f, "-").ljust(cw) for f in flavours)
            if split:
                lines.append("  " + backing)
                lines.append(("  " + " " * bw + row).rstrip())
            else:
                lines.append(("  " + backing.ljust(bw) + row).rstrip())
    providers: dict[str, int] = {}
    for r in rows:
        for p in r.providers_run:
            providers[p] = providers.get(p, 0) + 1
    lines.append("")
    lines += textwrap.wrap("providers that ran: " + (", ".join(
        f"{p} ({n} row{'s' if n != 1 else ''})" for p, n in sorted(providers.items())) or "none"),
        width, subsequent_indent="    ")
    for i, why in enumerate(reasons, 1):
        lines += textwrap.wrap(f"[{i}] {why}", width, subsequent_indent="    ",
                               break_on_hyphens=False)
    return "\n".join(lines)

"""KTAP v1 (Documentation/dev-tools/ktap.rst): a small emitter and a parser of our own.

Rules implemented (the parser rejects violations with KtapError, one line naming the line):
  - a block starts with a version line "KTAP version 1" (also accepted: "TAP version 13/14");
  - the plan "1..N" follows the version line (diagnostic lines may come between); when a block
    has a plan, it must have exactly N result lines;
  - result lines: "ok|not ok <number> [- ][<description>][ # [<directive>] [<diagnostic>]]";
    numbers start at 1 and increase by one within each block; the description has no '#';
  - directives: SKIP, TODO, XFAIL, TIMEOUT, ERROR (case-insensitive); TIMEOUT and ERROR must be
    "not ok"; an unknown directive is diagnostic text and the ok/not ok result stands;
  - a subtest is a complete block (its own version line and plan) indented by two more spaces,
    followed by its parent's result line at the outer indentation; a parent that reports "ok"
    while a subtest reports "not ok" without SKIP/TODO/XFAIL is inconsistent;
  - a "# Subtest: <name>" line between a block's version line and its plan names the block; the
    parent's result line must carry the same name; other diagnostic lines there belong to the
    block (KtapDocument.diagnostics, KtapTest.header_diagnostics);
  - diagnostic lines start with "# "; any other line is an unknown line, allowed and ignored
    (kernel logs interleave).
"""
from __future__ import annotations

import dataclasses
import re

from cvmconf.rollup import NOT_RUN
from cvmconf.text import printable

VERSION_RE = re.compile(r"^(KTAP version 1|TAP version 1[34])$")
PLAN_RE = re.compile(r"^1\.\.(\d+)$")
RESULT_START_RE = re.compile(r"^(ok|not ok)( |$)")
RESULT_RE = re.compile(r"^(ok|not ok) ([0-9]+)(?:$| (?:- )?([^#]*?)\s*(?:#(.*))?$)")
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")
SUBTEST_RE = re.compile(r"^# Subtest: (.*)$")


class KtapError(ValueError):
    """Input that is not valid KTAP v1 (the message is one line)."""


@dataclasses.dataclass
class KtapTest:
    ok: bool
    number: int
    description: str
    directive: str | None = None       # SKIP, TODO, XFAIL, TIMEOUT, ERROR
    diagnostic: str = ""               # text after the directive (or after '#')
    diagnostics: list[str] = dataclasses.field(default_factory=list)  # "# " lines before it
    subtests: list["KtapTest"] = dataclasses.field(default_factory=list)
    subtest_name: str | None = None    # the "# Subtest:" header of its subtest block
    header_diagnostics: list[str] = dataclasses.field(default_factory=list)
    line: int = 0

    @property
    def status(self) -> str:
        """PASS, FAIL, SKIP, TIMEOUT, ERROR, XFAIL or TODO."""
        if self.directive in ("SKIP", "TIMEOUT", "ERROR", "XFAIL", "TODO"):
            return self.directive
        return "PASS" if self.ok else "FAIL"


@dataclasses.dataclass
class KtapDocument:
    version: str
    plan: int | None
    tests: list[KtapTest]
    unknown_lines: int = 0
    diagnostics: list[str] = dataclasses.field(default_factory=list)  # before the plan


# ---------------------------------------------------------------------------------------------
# Emitter

def clean_description(text: str) -> str:
    """Descriptions may not contain '#' or line breaks."""
    text = re.sub(r"[#\r\n]+", "_", text).strip()
    text = re.sub(r"^-(\s|$)", r"_\1", text)      # "ok 1 - x" would read as description "x"
    return text or "unnamed"


# kunit_parser.py (the kernel's) reads "# Subtest: X" anywhere as a subtest header and stops
# reading at these phrases anywhere in a line: diagnostic text must not contain them as such.
_SUBTEST_HEADER_RE = re.compile(r"^(\s*)Subtest:")
_KUNIT_END_RE = re.compile(r"(List of all partitions|Kernel panic - not syncing: VFS|"
                           r"reboot): ?(System halted)?")


def _defuse(line: str) -> str:
    line = _SUBTEST_HEADER_RE.sub(r"\1Subtest -", line)
    return _KUNIT_END_RE.sub(lambda m: m.group(0).replace(":", "\\x3a"), line)


def diagnostic_lines(text: str, indent: str) -> list[str]:
    """'# ' lines for text (blank lines dropped, control characters escaped); never a line a
    KTAP reader could take for a subtest header or the end of the output."""
    return [f"{indent}# {_defuse(printable(line))}".rstrip()
            for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class Node:
    """A test to emit: a leaf or a parent with subtests."""
    description: str
    ok: bool
    directive: str | None = None
    diagnostic: str = ""               # after the directive on the result line (one line)
    diagnostics: str = ""              # "# " lines before the result line
    subtests: list["Node"] = dataclasses.field(default_factory=list)


def emit(nodes: list[Node], indent: str = "", name: str | None = None,
         header: str = "") -> list[str]:
    """A block: version line, '# Subtest: name' (subtest blocks), header diagnostics, plan,
    then each test (its subtest block, its diagnostics, its result line)."""
    lines = [f"{indent}KTAP version 1"]
    if name is not None:
        lines.append(f"{indent}# Subtest: {clean_description(name)}")
    lines.extend(diagnostic_lines(header, indent))
    lines.append(f"{indent}1..{len(nodes)}")
    for i, n in enumerate(nodes, 1):
        if n.subtests:
            lines.extend(emit(n.subtests, indent + "  ", n.description))
        lines.extend(diagnostic_lines(n.diagnostics, indent))
        result = f"{indent}{'ok' if n.ok else 'not ok'} {i} {clean_description(n.description)}"
        if n.directive:
            d = _defuse(printable(" ".join(n.diagnostic.split())))
            result += f" # {n.directive}" + (f" {d}" if d else "")
        lines.append(result)
    return lines


def dumps(nodes: list[Node], header: str = "") -> str:
    return "\n".join(emit(nodes, header=header)) + "\n"


# ---------------------------------------------------------------------------------------------
# Parser

def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


@dataclasses.dataclass
class _Block:
    """A block being parsed: its version line, plan and results so far, and what waits for the
    next result line (diagnostics, a subtest block)."""
    indent: int
    start: int                          # line number of its version line
    version: str
    plan: int | None = None
    tests: list[KtapTest] = dataclasses.field(default_factory=list)
    name: str | None = None             # its '# Subtest:' header
    header: list[str] = dataclasses.field(default_factory=list)   # diagnostics before the plan
    pending_diag: list[str] = dataclasses.field(default_factory=list)
    pending_sub: "_Block | None" = None


class _Parser:
    def __init__(self, text: str):
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        self.i = 0
        self.unknown = 0

    def block(self, indent: int) -> _Block:
        """Parses the block whose version line is at self.i with the given indentation; returns
        after its last line (before the parent's result line or the end)."""
        b = _Block(indent=indent, start=self.i + 1, version=self.lines[self.i][indent:])
        self.i += 1
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            n = self.i + 1
            if "\t" in raw[:indent + 2]:
                raise KtapError(f"line {n}: tab in indentation")
            ind = _indent_of(raw)
            body = raw[ind:]
            if body and ind < indent:
                break            # belongs to an enclosing block
            if body and ind == indent + 2 and VERSION_RE.match(body):
                self.subtest_block(b, n)
                continue
            self.i += 1
            if not body:
                continue
            if ind == indent:
                self.line(b, body, n)
            else:
                self.deeper_line(body, ind - indent, n)
        self.finish(b)
        return b

    def subtest_block(self, b: _Block, n: int) -> None:
        if b.pending_sub is not None:
            raise KtapError(f"line {n}: subtest block follows a subtest block "
                            f"(line {b.pending_sub.start}) that has no result line")
        b.pending_sub = self.block(b.indent + 2)

    def deeper_line(self, body: str, deeper: int, n: int) -> None:
        """A line indented deeper than its block: allowed for unknown lines, but a version, plan
        or result line there would be a test outside any block (a silent pass)."""
        if VERSION_RE.match(body) or PLAN_RE.match(body) or RESULT_START_RE.match(body):
            raise KtapError(f"line {n}: indented {deeper} spaces deeper than its "
                            f"block without a subtest block of its own")
        self.unknown += 1

    def line(self, b: _Block, body: str, n: int) -> None:
        """A line at the block's own indentation."""
        if VERSION_RE.match(body):
            raise KtapError(f"line {n}: version line in the middle of a block")
        m = PLAN_RE.match(body)
        if m:
            self.plan_line(b, int(m.group(1)), n)
        elif body.startswith("#"):
            self.comment_line(b, body, n)
        elif RESULT_START_RE.match(body):
            self.result_line(b, body, n)
        else:
            self.unknown += 1

    @staticmethod
    def plan_line(b: _Block, plan: int, n: int) -> None:
        if b.plan is not None:
            raise KtapError(f"line {n}: second plan in one block")
        if b.tests:
            raise KtapError(f"line {n}: plan after result lines")
        b.plan = plan
        b.header, b.pending_diag = b.pending_diag, []

    def comment_line(self, b: _Block, body: str, n: int) -> None:
        sm = SUBTEST_RE.match(body)
        if sm and b.plan is None and not b.tests and not b.pending_diag and b.name is None:
            b.name = sm.group(1).strip()
        elif sm:
            raise KtapError(f"line {n}: '# Subtest:' header after the start of its block")
        elif body == "#" or body.startswith("# "):
            b.pending_diag.append(body[2:])
        else:
            self.unknown += 1

    def result_line(self, b: _Block, body: str, n: int) -> None:
        t = self.result(body, n, len(b.tests) + 1)
        t.diagnostics, b.pending_diag = b.pending_diag, []
        sub, b.pending_sub = b.pending_sub, None
        if sub is not None:
            t.subtests, t.subtest_name, t.header_diagnostics = sub.tests, sub.name, sub.header
            self.check_parent(t)
        b.tests.append(t)

    @staticmethod
    def finish(b: _Block) -> None:
        if b.pending_sub is not None:
            raise KtapError(f"line {b.pending_sub.start}: subtest block has no result line")
        if b.plan is not None and len(b.tests) != b.plan:
            raise KtapError(f"line {b.start}: plan 1..{b.plan} but {len(b.tests)} result line(s)")
        if b.plan is None and not b.tests and b.pending_diag:
            b.header = b.pending_diag

    @staticmethod
    def result(body: str, n: int, expected: int) -> KtapTest:
        m = RESULT_RE.match(body)
        if not m:
            raise KtapError(f"line {n}: malformed result line")
        number = int(m.group(2))
        if number != expected:
            raise KtapError(f"line {n}: test number {number}, expected {expected}")
        ok = m.group(1) == "ok"
        desc = (m.group(3) or "").strip()
        directive, diagnostic = None, ""
        after = m.group(4)
        if after is not None:
            after = after.strip()
            word, _, rest = after.partition(" ")
            if word.upper() in DIRECTIVES:
                directive, diagnostic = word.upper(), rest.strip()
            else:
                diagnostic = after
        if directive in ("TIMEOUT", "ERROR") and ok:
            raise KtapError(f"line {n}: {directive} on an 'ok' result")
        return KtapTest(ok=ok, number=number, description=desc, directive=directive,
                        diagnostic=diagnostic, line=n)

    @staticmethod
    def check_parent(t: KtapTest) -> None:
        if t.subtest_name is not None and t.subtest_name != t.description:
            raise KtapError(f"line {t.line}: result line names {t.description!r}, its subtest "
                            f"header names {t.subtest_name!r}")
        if t.ok and t.directive is None:
            for s in t.subtests:
                if not s.ok and s.directive not in ("SKIP", "TODO", "XFAIL"):
                    raise KtapError(f"line {t.line}: test {t.number} reports ok but its subtest "
                                    f"{s.number} failed")


def parse(text: str) -> KtapDocument:
    if not isinstance(text, str):
        raise KtapError("KTAP input is not text")
    p = _Parser(text)
    # Unknown lines may precede the version line (e.g. boot messages).
    while p.i < len(p.lines) and not VERSION_RE.match(p.lines[p.i]):
        if p.lines[p.i].strip():
            if VERSION_RE.match(p.lines[p.i].strip()):
                raise KtapError(f"line {p.i + 1}: the top-level version line is indented")
            if RESULT_START_RE.match(p.lines[p.i].strip()) or PLAN_RE.match(p.lines[p.i].strip()):
                raise KtapError(f"line {p.i + 1}: result or plan before the version line")
            p.unknown += 1
        p.i += 1
    if p.i >= len(p.lines):
        raise KtapError("no KTAP version line")
    top = p.block(0)
    if p.i < len(p.lines):
        raise KtapError(f"line {p.i + 1}: text after the end of the top-level block")
    if top.name is not None:
        raise KtapError("the top-level block has a '# Subtest:' header")
    return KtapDocument(version=top.version, plan=top.plan, tests=top.tests,
                        unknown_lines=p.unknown, diagnostics=top.header)


# ---------------------------------------------------------------------------------------------
# run.json -> KTAP (binary > test)

def _kernel_log(t: dict) -> list[str]:
    log = t.get("kernel_log") or []
    return ["kernel log:"] + [f"  {line}" for line in log] if log else []


def _leaf(t: dict) -> Node:
    """One GoogleTest test. PASS: ok; SKIP: ok # SKIP reason; FAIL: not ok; ERROR, TIMEOUT:
    not ok # ERROR|TIMEOUT first line; NOT RUN: not ok # SKIP not run: why. Requirement IDs,
    messages and (for FAIL, ERROR, TIMEOUT) the kernel-log lines are '# ' lines before it."""
    outcome = t["outcome"]
    diags = ["requirements: " + " ".join(t["requirements"])] if t.get("requirements") else []
    msgs = [m for m in t.get("messages", []) if m.strip()]
    if outcome == "PASS":
        return Node(t["name"], True, diagnostics="\n".join(diags))
    if outcome == "SKIP":
        return Node(t["name"], True, "SKIP", t.get("skip_reason", ""), "\n".join(diags))
    if outcome == "FAIL":
        return Node(t["name"], False, diagnostics="\n".join(diags + msgs + _kernel_log(t)))
    first = msgs[0].splitlines()[0] if msgs else outcome
    if outcome == NOT_RUN:
        if not first.startswith("not run"):
            first = f"not run: {first}"
        return Node(t["name"], False, "SKIP", first, "\n".join(diags))
    # ERROR, TIMEOUT
    rest = ["\n".join(msgs[0].splitlines()[1:])] + msgs[1:] if msgs else []
    exit_text = (t.get("evidence") or {}).get("exit")
    if exit_text:
        rest.append(f"exit: {exit_text}")
    directive = "TIMEOUT" if outcome == "TIMEOUT" else "ERROR"
    return Node(t["name"], False, directive, first, "\n".join(diags + rest + _kernel_log(t)))


def _parent(binary: str, subs: list[Node]) -> Node:
    """A suite binary: not ok when a test failed or broke; all skipped (or not run):
    '# SKIP <the common reason, or a count>', 'not ok' when some did not run; else ok."""
    bad = any(not s.ok and s.directive not in ("SKIP", "TODO", "XFAIL") for s in subs)
    if bad:
        return Node(binary, False, subtests=subs)
    if subs and all(s.directive == "SKIP" for s in subs):
        reasons = {s.diagnostic for s in subs}
        not_run = sum(1 for s in subs if not s.ok)
        if len(reasons) == 1:
            why = reasons.pop()
        elif not_run:
            why = f"{len(subs) - not_run} tests skipped, {not_run} not run"
        else:
            why = f"all {len(subs)} tests skipped"
        return Node(binary, not not_run, "SKIP", why, subtests=subs)
    return Node(binary, True, subtests=subs)


def from_run(run: dict) -> str:
    """The run as a nested KTAP v1 stream: one top-level test per suite binary (with a
    '# Subtest:' header), one subtest per GoogleTest test."""
    binaries: dict[str, list[dict]] = {}
    for t in run["tests"]:
        binaries.setdefault(t["binary"], []).append(t)
    top = [_parent(binary, [_leaf(t) for t in tests]) for binary, tests in binaries.items()]
    header = [f"cvmconf run {run.get('run_id', '')}"]
    verdict = (run.get("summary") or {}).get("verdict")
    if verdict:
        header.append(f"verdict: {verdict}")
    if not run.get("complete", True):
        header.append(f"incomplete run: {run.get('incomplete_reason') or 'unknown reason'}")
    return dumps(top, header="\n".join(header))

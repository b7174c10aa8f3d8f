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
  - diagnostic lines start with "# "; any other line is an unknown line, allowed and ignored
    (kernel logs interleave).
"""
from __future__ import annotations

import dataclasses
import re

VERSION_RE = re.compile(r"^(KTAP version 1|TAP version 1[34])$")
PLAN_RE = re.compile(r"^1\.\.(\d+)$")
RESULT_START_RE = re.compile(r"^(ok|not ok)( |$)")
RESULT_RE = re.compile(r"^(ok|not ok) ([0-9]+)(?:$| (?:- )?([^#]*?)\s*(?:#(.*))?$)")
DIRECTIVES = ("SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR")


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


# ---------------------------------------------------------------------------------------------
# Emitter

def clean_description(text: str) -> str:
    """Descriptions may not contain '#' or line breaks."""
    text = re.sub(r"[#\r\n]+", "_", text).strip()
    text = re.sub(r"^-(\s|$)", r"_\1", text)      # "ok 1 - x" would read as description "x"
    return text or "unnamed"


def diagnostic_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class Node:
    """A test to emit: a leaf or a parent with subtests."""
    description: str
    ok: bool
    directive: str | None = None
    diagnostic: str = ""               # after the directive on the result line (one line)
    diagnostics: str = ""              # "# " lines before the result line
    subtests: list["Node"] = dataclasses.field(default_factory=list)


def emit(nodes: list[Node], indent: str = "") -> list[str]:
    lines = [f"{indent}KTAP version 1", f"{indent}1..{len(nodes)}"]
    for i, n in enumerate(nodes, 1):
        if n.subtests:
            lines.extend(emit(n.subtests, indent + "  "))
        lines.extend(diagnostic_lines(n.diagnostics, indent))
        result = f"{indent}{'ok' if n.ok else 'not ok'} {i} {clean_description(n.description)}"
        if n.directive:
            d = " ".join(n.diagnostic.split())
            result += f" # {n.directive}" + (f" {d}" if d else "")
        lines.append(result)
    return lines


def dumps(nodes: list[Node]) -> str:
    return "\n".join(emit(nodes)) + "\n"


# ---------------------------------------------------------------------------------------------
# Parser

def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


class _Parser:
    def __init__(self, text: str):
        self.lines = text.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()
        self.i = 0
        self.unknown = 0

    def block(self, indent: int) -> tuple[str, int | None, list[KtapTest], int]:
        """Parses a block whose version line is at self.i with the given indentation; returns
        after its last line (before the parent's result line or the end)."""
        start = self.i + 1
        version = self.lines[self.i][indent:]
        self.i += 1
        plan: int | None = None
        seen_result = False
        tests: list[KtapTest] = []
        pending_diag: list[str] = []
        pending_sub: tuple[list[KtapTest], int] | None = None
        while self.i < len(self.lines):
            raw = self.lines[self.i]
            n = self.i + 1
            if "\t" in raw[:indent + 2]:
                raise KtapError(f"line {n}: tab in indentation")
            ind = _indent_of(raw)
            body = raw[ind:]
            if not body:
                self.i += 1
                continue
            if ind < indent:
                break            # belongs to an enclosing block
            if ind == indent + 2 and VERSION_RE.match(body):
                if pending_sub is not None:
                    raise KtapError(f"line {n}: subtest block follows a subtest block "
                                    f"(line {pending_sub[1]}) that has no result line")
                _, _, subs, sub_line = self.block(indent + 2)
                pending_sub = (subs, sub_line)
                continue
            if ind != indent:
                # Deeper than this block: allowed for unknown lines, but a version, plan or
                # result line there would be a test outside any block (a silent pass).
                if VERSION_RE.match(body) or PLAN_RE.match(body) or RESULT_START_RE.match(body):
                    raise KtapError(f"line {n}: indented {ind - indent} spaces deeper than its "
                                    f"block without a subtest block of its own")
                self.unknown += 1
                self.i += 1
                continue
            if VERSION_RE.match(body):
                raise KtapError(f"line {n}: version line in the middle of a block")
            m = PLAN_RE.match(body)
            if m:
                if plan is not None:
                    raise KtapError(f"line {n}: second plan in one block")
                if seen_result:
                    raise KtapError(f"line {n}: plan after result lines")
                plan = int(m.group(1))
                self.i += 1
                continue
            if body.startswith("#"):
                if body == "#" or body.startswith("# "):
                    pending_diag.append(body[2:])
                else:
                    self.unknown += 1
                self.i += 1
                continue
            if RESULT_START_RE.match(body):
                t = self.result(body, n, len(tests) + 1)
                t.diagnostics = pending_diag
                pending_diag = []
                if pending_sub is not None:
                    t.subtests = pending_sub[0]
                    pending_sub = None
                    self.check_parent(t)
                tests.append(t)
                seen_result = True
                self.i += 1
                continue
            self.unknown += 1
            self.i += 1
        if pending_sub is not None:
            raise KtapError(f"line {pending_sub[1]}: subtest block has no result line")
        if plan is not None and len(tests) != plan:
            raise KtapError(f"line {start}: plan 1..{plan} but {len(tests)} result line(s)")
        return version, plan, tests, start

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
    version, plan, tests, _ = p.block(0)
    if p.i < len(p.lines):
        raise KtapError(f"line {p.i + 1}: text after the end of the top-level block")
    return KtapDocument(version=version, plan=plan, tests=tests, unknown_lines=p.unknown)


# ---------------------------------------------------------------------------------------------
# run.json -> KTAP (binary > test)

def from_run(run: dict) -> str:
    """The run as a nested KTAP v1 stream: one top-level test per suite binary, one subtest per
    GoogleTest test."""
    binaries: dict[str, list[dict]] = {}
    for t in run["tests"]:
        binaries.setdefault(t["binary"], []).append(t)
    top: list[Node] = []
    for binary, tests in binaries.items():
        subs = []
        for t in tests:
            outcome = t["outcome"]
            diags = []
            if t.get("requirements"):
                diags.append("requirements: " + " ".join(t["requirements"]))
            if outcome == "PASS":
                subs.append(Node(t["name"], True, diagnostics="\n".join(diags)))
            elif outcome == "SKIP":
                subs.append(Node(t["name"], True, "SKIP", t.get("skip_reason", ""),
                                 "\n".join(diags)))
            elif outcome == "FAIL":
                diags += t.get("messages", [])
                subs.append(Node(t["name"], False, diagnostics="\n".join(diags)))
            else:   # ERROR, TIMEOUT, NOT RUN
                msgs = t.get("messages", [])
                diags += msgs[1:]
                directive = "TIMEOUT" if outcome == "TIMEOUT" else "ERROR"
                first = msgs[0].splitlines()[0] if msgs and msgs[0].strip() else outcome
                subs.append(Node(t["name"], False, directive, first, "\n".join(diags)))
        bad = any(not s.ok and s.directive not in ("SKIP", "TODO", "XFAIL") for s in subs)
        top.append(Node(binary, not bad, subtests=subs))
    return dumps(top)

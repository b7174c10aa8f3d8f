"""GoogleTest suite binaries: discovery, the listing of tests and their requirement IDs
(--cvm_list_requirements), and the JSON report (--gtest_output=json) turned into per-test
results. Every parser here raises ReportError with one line on input it cannot understand."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
from pathlib import Path

from cvmconf.errors import HarnessError, UsageError

SUITE_PREFIX = "cvm_suite_"

PASS, FAIL, ERROR, TIMEOUT, SKIP = "PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP"
OUTCOMES = (PASS, FAIL, ERROR, TIMEOUT, SKIP)
BROKEN = (ERROR, TIMEOUT)          # the test did not complete
BAD = (FAIL, ERROR, TIMEOUT)       # the test failed or did not complete


@dataclasses.dataclass
class TestResult:
    name: str                  # GoogleTest full name, e.g. Platforms/GmemFile.X/x86_default
    binary: str                # suite binary base name
    outcome: str
    duration: float = 0.0
    requirements: list[str] = dataclasses.field(default_factory=list)
    messages: list[str] = dataclasses.field(default_factory=list)
    skip_reason: str = ""
    kernel_log: list[str] = dataclasses.field(default_factory=list)
    properties: dict[str, str] = dataclasses.field(default_factory=dict)
    # Added by the runner:
    evidence: dict[str, str] = dataclasses.field(default_factory=dict)  # exit status, output tail...
    start_time: str = ""       # ISO 8601 wall clock, when known
    batch: str = ""            # label of the batch that produced this result
    attempts: list[dict] = dataclasses.field(default_factory=list)  # --retry-failed re-runs
    flaky: bool = False        # failed, then passed on a retry

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TestResult":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class ReportError(ValueError):
    """Output of a suite binary (test list, requirement list, JSON report) that cannot be
    understood. The message is one line."""


def suite_binaries(build_dir: str | os.PathLike) -> list[Path]:
    """The conformance suites of a build tree (build/suites/cvm_suite_*)."""
    return suite_binaries_in(Path(build_dir) / "suites")


def suite_binaries_in(suite_dir: str | os.PathLike) -> list[Path]:
    d = Path(suite_dir)
    if not d.is_dir():
        raise HarnessError(f"no suite binaries: {d} does not exist (build first: ./cvmconf build)")
    bins = sorted(p for p in d.iterdir()
                  if p.name.startswith(SUITE_PREFIX) and p.is_file() and os.access(p, os.X_OK))
    if not bins:
        raise HarnessError(f"no suite binaries ({SUITE_PREFIX}*) in {d}")
    return bins


def family_of(binary: str) -> str:
    """cvm_suite_gmem_mmap -> gmem_mmap"""
    return binary[len(SUITE_PREFIX):] if binary.startswith(SUITE_PREFIX) else binary


# ---------------------------------------------------------------------------------------------
# The listing: --cvm_list_requirements (hostlib gtest_support.cc) prints every registered test,
# in GoogleTest's execution order, with the requirement IDs it names:
#   {"tests": [{"name": "Suite.Test", "requirements": ["ID", ...], "file": ..., "line": ...}]}
# It is the runner's only listing of a binary: the tests to run and their requirements.

_NAME_RE = re.compile(r"^[A-Za-z0-9_/]+$")


@dataclasses.dataclass
class SuiteListing:
    tests: list[str]                    # full names in execution order, DISABLED_ tests left out
    requirements: dict[str, list[str]]  # every listed test (DISABLED_ too) -> requirement IDs


def _disabled(full_name: str) -> bool:
    suite, name = full_name.split(".", 1)
    return any(p.startswith("DISABLED_") for p in [*suite.split("/"), *name.split("/")[:1]])


def parse_listing(text: str) -> SuiteListing:
    """Parses the --cvm_list_requirements JSON; ReportError (one line) on anything else."""
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        raise ReportError("test list is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        raise ReportError("test list has no 'tests' list")
    listing = SuiteListing(tests=[], requirements={})
    for i, t in enumerate(data["tests"], 1):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or \
                not isinstance(t.get("requirements"), list) or \
                not all(isinstance(r, str) for r in t["requirements"]):
            raise ReportError(f"test list entry {i} is malformed")
        full = t["name"]
        suite, dot, name = full.partition(".")
        if not dot or not _NAME_RE.match(suite) or not _NAME_RE.match(name):
            raise ReportError(f"test list entry {i}: not a GoogleTest test name: {full[:80]!r}")
        if full in listing.requirements:
            raise ReportError(f"test list entry {i}: test {full[:120]} listed twice")
        listing.requirements[full] = list(t["requirements"])
        if not _disabled(full):
            listing.tests.append(full)
    return listing


def _run_listing(binary: str | os.PathLike, args: list[str]) -> str:
    try:
        out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60,
                             check=False, errors="replace")
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"{binary}: cannot list tests: {e}") from None
    if out.returncode != 0:
        raise HarnessError(f"{binary}: {' '.join(args)} exited {out.returncode}")
    return out.stdout


LIST_FLAG = "--cvm_list_requirements"


def list_suite(binary: str | os.PathLike) -> SuiteListing:
    """The binary's tests and their requirement IDs, from the binary itself (nothing runs)."""
    out = _run_listing(binary, [LIST_FLAG])
    try:
        return parse_listing(out)
    except ReportError as e:
        raise HarnessError(f"{Path(binary).name}: {LIST_FLAG}: {e}") from None


# ---------------------------------------------------------------------------------------------
# --gtest_output=json

def _seconds(value) -> float:
    v = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, str) and value.endswith("s"):
        try:
            v = float(value[:-1])
        except ValueError:
            v = None
    if v is None or not math.isfinite(v) or v < 0:
        raise ReportError(f"bad time value {str(value)[:40]!r}")
    return v


STANDARD_KEYS = {"name", "file", "line", "status", "result", "timestamp", "time", "classname",
                 "failures", "skipped", "value_param", "type_param"}


def outcome_of(failures: list[str], skipped: bool, props: dict[str, str] | None = None) -> str:
    """The one rule that turns GoogleTest's view of a test into an outcome (shared by the JSON
    report and the event stream): any failure is FAIL -- or ERROR when the test said it could
    not build its own environment (property `harness_error`, hostlib's testing::harness_error)
    and the kernel logged no splat meanwhile --, then SKIP, else PASS."""
    props = props or {}
    if failures:
        if props.get("harness_error") and not props.get("kernel_splats"):
            return ERROR
        return FAIL
    return SKIP if skipped else PASS


def split_properties(props: dict[str, str]) -> dict:
    """Separates the properties every suite records from the test-specific ones."""
    props = dict(props)
    return {
        "requirements": props.pop("requirements", "").split(),
        "skip_reason": props.pop("skip_reason", ""),
        "kernel_log": [l for l in props.pop("kernel_log", "").split("\n") if l],
        "properties": props,
    }


def _prop_value(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, bool)) or v is None:
        return json.dumps(v)
    raise ReportError(f"property value of type {type(v).__name__}")


def parse_report_data(data, binary: str) -> list[TestResult]:
    """Turns a parsed GoogleTest JSON report into TestResults. Raises ReportError on bad input."""
    if not isinstance(data, dict) or not isinstance(data.get("testsuites"), list):
        raise ReportError("not a GoogleTest JSON report (no 'testsuites' list)")
    results: list[TestResult] = []
    for suite in data["testsuites"]:
        if not isinstance(suite, dict) or not isinstance(suite.get("name"), str) \
                or not isinstance(suite.get("testsuite"), list):
            raise ReportError("malformed test suite entry")
        for t in suite["testsuite"]:
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise ReportError(f"malformed test entry in suite {suite['name'][:80]}")
            tname = f"{suite['name']}.{t['name']}"[:160]
            status = t.get("status")
            result = t.get("result", "COMPLETED")
            if status not in ("RUN", "NOTRUN") or not isinstance(result, str):
                raise ReportError(f"test {tname}: bad status/result")
            if status == "NOTRUN" or result == "SUPPRESSED":
                continue  # filtered out or disabled: not part of this run
            if result not in ("COMPLETED", "SKIPPED"):
                raise ReportError(f"test {tname}: unknown result {result[:40]!r}")
            failures = t.get("failures", [])
            if not isinstance(failures, list):
                raise ReportError(f"test {tname}: 'failures' must be a list")
            msgs = []
            for f in failures:
                if not isinstance(f, dict):
                    raise ReportError(f"test {tname}: malformed failure entry")
                m = f.get("failure", f.get("message", ""))
                if not isinstance(m, str):
                    raise ReportError(f"test {tname}: failure message is not text")
                msgs.append(m)
            props = {k: _prop_value(v) for k, v in t.items() if k not in STANDARD_KEYS}
            split = split_properties(props)
            results.append(TestResult(
                name=f"{suite['name']}.{t['name']}",
                binary=binary,
                outcome=outcome_of(msgs, result == "SKIPPED", props),
                duration=_seconds(t.get("time", "0s")),
                messages=msgs,
                start_time=t["timestamp"] if isinstance(t.get("timestamp"), str) else "",
                **split))
    return results


def parse_report_text(text: str, binary: str) -> list[TestResult]:
    try:
        data = json.loads(text)
    except (ValueError, TypeError, RecursionError) as e:
        raise ReportError(f"report is not JSON ({e.__class__.__name__})") from None
    return parse_report_data(data, binary)


def parse_report(path: str | os.PathLike, binary: str) -> list[TestResult]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ReportError(f"no report at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: unreadable ({e.__class__.__name__})") from None
    return parse_report_text(text, binary)


# ---------------------------------------------------------------------------------------------
# cvm-probe

def probe(build_dir: str | os.PathLike) -> dict:
    """The kernel capability probe (cvm-probe) as a dict."""
    exe = Path(build_dir) / "bin" / "cvm-probe"
    if not exe.exists():
        raise HarnessError(f"{exe} is missing (build first)")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, check=False)
    try:
        data = json.loads(out.stdout)
    except ValueError:
        raise HarnessError("cvm-probe printed malformed JSON") from None
    if not isinstance(data, dict):
        raise HarnessError("cvm-probe printed malformed JSON")
    return data


def require_kvm(caps: dict) -> None:
    if not caps.get("kvm_available"):
        raise UsageError(f"KVM unavailable: {caps.get('kvm_error', 'unknown error')}")

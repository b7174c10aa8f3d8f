"""GoogleTest suite binaries: discovery, the requirement listing (--cvm_list_requirements), and
the JSON report (--gtest_output=json) turned into per-test results."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

from cvmconf.errors import HarnessError, UsageError

SUITE_PREFIX = "cvm_suite_"

PASS, FAIL, ERROR, TIMEOUT, SKIP = "PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP"
OUTCOMES = (PASS, FAIL, ERROR, TIMEOUT, SKIP)


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


def suite_binaries(build_dir: str | os.PathLike) -> list[Path]:
    d = Path(build_dir) / "suites"
    if not d.is_dir():
        raise HarnessError(f"no suite binaries: {d} does not exist (build first: ./cvmconf build)")
    bins = sorted(p for p in d.iterdir()
                  if p.name.startswith(SUITE_PREFIX) and p.is_file() and os.access(p, os.X_OK))
    if not bins:
        raise HarnessError(f"no suite binaries in {d}")
    return bins


def list_requirements(binary: str | os.PathLike) -> dict[str, list[str]]:
    """Test full name -> requirement IDs, from the binary itself (nothing runs)."""
    try:
        out = subprocess.run([str(binary), "--cvm_list_requirements"], capture_output=True,
                             text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise HarnessError(f"{binary}: cannot list tests: {e}") from None
    if out.returncode != 0:
        raise HarnessError(f"{binary}: --cvm_list_requirements exited {out.returncode}")
    try:
        data = json.loads(out.stdout)
        return {t["name"]: list(t["requirements"]) for t in data["tests"]}
    except (ValueError, KeyError, TypeError):
        raise HarnessError(f"{binary}: --cvm_list_requirements printed malformed JSON") from None


class ReportError(ValueError):
    """A GoogleTest JSON report that cannot be understood."""


def _seconds(value) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.endswith("s"):
        try:
            return float(value[:-1])
        except ValueError:
            pass
    raise ReportError(f"bad time value {value!r}")


STANDARD_KEYS = {"name", "file", "line", "status", "result", "timestamp", "time", "classname",
                 "failures", "skipped", "value_param", "type_param"}


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
                raise ReportError(f"malformed test entry in suite {suite['name']}")
            status = t.get("status")
            result = t.get("result", "COMPLETED")
            if status not in ("RUN", "NOTRUN") or not isinstance(result, str):
                raise ReportError(f"test {suite['name']}.{t['name']}: bad status/result")
            if status == "NOTRUN" or result == "SUPPRESSED":
                continue  # filtered out or disabled: not part of this run
            failures = t.get("failures", [])
            if not isinstance(failures, list):
                raise ReportError(f"test {t['name']}: 'failures' must be a list")
            msgs = []
            for f in failures:
                if not isinstance(f, dict):
                    raise ReportError(f"test {t['name']}: malformed failure entry")
                msgs.append(str(f.get("failure", f.get("message", ""))))
            props = {k: str(v) for k, v in t.items() if k not in STANDARD_KEYS}
            if msgs:
                outcome = FAIL
            elif result == "SKIPPED":
                outcome = SKIP
            elif result == "COMPLETED":
                outcome = PASS
            else:
                raise ReportError(f"test {t['name']}: unknown result {result!r}")
            results.append(TestResult(
                name=f"{suite['name']}.{t['name']}",
                binary=binary,
                outcome=outcome,
                duration=_seconds(t.get("time", "0s")),
                requirements=props.pop("requirements", "").split(),
                messages=msgs,
                skip_reason=props.pop("skip_reason", ""),
                kernel_log=[l for l in props.pop("kernel_log", "").split("\n") if l],
                properties=props))
    return results


def parse_report(path: str | os.PathLike, binary: str) -> list[TestResult]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"no report at {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not JSON ({e.__class__.__name__})") from None
    return parse_report_data(data, binary)


def probe(build_dir: str | os.PathLike) -> dict:
    """The kernel capability probe (cvm-probe) as a dict."""
    exe = Path(build_dir) / "bin" / "cvm-probe"
    if not exe.exists():
        raise HarnessError(f"{exe} is missing (build first)")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise HarnessError("cvm-probe printed malformed JSON") from None


def require_kvm(caps: dict) -> None:
    if not caps.get("kvm_available"):
        raise UsageError(f"KVM unavailable: {caps.get('kvm_error', 'unknown error')}")

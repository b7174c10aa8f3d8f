"""results/<run-id>/run.json: the single record of a run, from which every other file of the run
(junit.xml, results.ktap, report.md, report.html, the KCIDB export) is derived.

It is shaped for KernelCI KCIDB v5: a `checkout` (the kernel source, with an optional patch-series
Message-ID and patchset hash) and a `build` (the kernel that ran) carry KCIDB field names; every
test carries a KCIDB `path` and `status` next to cvmconf's own outcome. cvmconf.kcidb converts it.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from cvmconf import gtest
from cvmconf.errors import UsageError
from cvmconf.gtest import BROKEN, ERROR, FAIL, PASS, SKIP, TIMEOUT, TestResult
from cvmconf.rollup import NOT_RUN, RequirementResult, info_only, outcome_rank

FORMAT = "cvmconf-run"
FORMAT_VERSION = 1
DEFAULT_ORIGIN = "cvmconf"
ORIGIN_RE = re.compile(r"^[a-z0-9_]+$")

# cvmconf outcome -> KCIDB status (FAIL, ERROR, MISS, PASS, DONE, SKIP).
KCIDB_STATUS = {PASS: "PASS", FAIL: "FAIL", ERROR: "ERROR", TIMEOUT: "ERROR", SKIP: "SKIP",
                NOT_RUN: "MISS"}

EXIT_MEANING = {0: "no MUST/SHOULD requirement failed (the verdict says how much was exercised)",
                1: "non-conformance: a requirement's test failed",
                3: "harness error: a test crashed or timed out, a batch broke, or the run is incomplete"}


def now_iso(timespec: str = "seconds") -> str:
    """The UTC wall clock in ISO 8601 (timespec as for datetime.isoformat)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec=timespec)


def path_component(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "_"


def test_path(binary: str, name: str) -> str:
    """KCIDB test path: cvmconf.<suite>.<gtest name split at '.' and '/'>, each component in
    [A-Za-z0-9_-] (KCIDB v5's path pattern)."""
    parts = ["cvmconf", path_component(gtest.family_of(binary))]
    parts += [path_component(p) for p in re.split(r"[./]", name) if p]
    return ".".join(parts)


def patchset_hash(patch_files: list[str]) -> str:
    """KCIDB's patchset_hash: sha256 over the newline-terminated sha256 of each patch, in order;
    "" when there are none."""
    if not patch_files:
        return ""
    h = hashlib.sha256()
    for p in patch_files:
        try:
            with open(p, "rb") as f:
                h.update((hashlib.sha256(f.read()).hexdigest() + "\n").encode())
        except OSError as e:
            raise UsageError(f"cannot read patch {p}: {e.strerror}") from None
    return h.hexdigest()


def _short_hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def checkout_and_build(fp: dict, origin: str, source: dict, started: str) -> tuple[dict, dict]:
    """KCIDB-shaped checkout and build objects for the kernel that ran."""
    k = fp.get("kernel", {})
    release, version = k.get("release") or "", k.get("version") or ""
    config = k.get("config_sha256") or ""
    msgid = (source.get("message_id") or "").strip().strip("<>")
    checkout = {"origin": origin,
                "id": f"{origin}:" + _short_hash(release, version, config, msgid,
                                                 source.get("git_commit_hash") or "",
                                                 source.get("patchset_hash") or ""),
                "comment": f"Linux {release}".strip(), "start_time": started, "valid": True,
                "misc": {"kernel_release": release, "kernel_version": version}}
    for key in ("tree_name", "git_repository_url", "git_commit_hash", "git_repository_branch"):
        if source.get(key):
            checkout[key] = source[key]
    if msgid:
        checkout["message_id"] = msgid
    if source.get("patchset_hash") is not None and source.get("patch_files"):
        checkout["patchset_hash"] = source["patchset_hash"]
        checkout["misc"]["patch_files"] = [os.path.basename(p) for p in source["patch_files"]]
    arch = re.sub(r"[^a-z0-9_]", "_", (fp.get("arch") or "").lower())
    build = {"origin": origin, "checkout_id": checkout["id"],
             "id": f"{origin}:" + _short_hash(checkout["id"], release, version, config, arch),
             "architecture": arch, "comment": f"{release} {version}".strip(),
             "status": "PASS",     # the kernel was built and booted: it is what ran the tests
             "misc": {"kernel_release": release, "config_sha256": config or None}}
    build["misc"] = {k2: v for k2, v in build["misc"].items() if v is not None}
    return checkout, build


def test_entry(r: TestResult) -> dict:
    d = r.to_dict()
    d["path"] = test_path(r.binary, r.name)
    d["status"] = KCIDB_STATUS.get(r.outcome, "MISS")
    return d


def not_run_entry(binary: str, name: str, requirements: list[str], reason: str) -> dict:
    r = TestResult(name=name, binary=binary, outcome=NOT_RUN, requirements=requirements,
                   messages=[reason])
    return test_entry(r)


def exercised_scope(reqs: list[RequirementResult]) -> str:
    """'4 of 55 requirements exercised; 51 not exercised: see below' (every level counted)."""
    n = sum(1 for r in reqs if r.exercised)
    text = f"{n} of {len(reqs)} requirements exercised"
    if n < len(reqs):
        text += f"; {len(reqs) - n} not exercised: see below"
    return text


def verdict(reqs: list[RequirementResult], tests: list[dict], complete: bool,
            problems: list[dict]) -> tuple[int, str]:
    """Exit code and verdict line, which always says how much was exercised:
    'CONFORMS (4 of 55 requirements exercised; 51 not exercised: see below)'.

    DOES NOT CONFORM (1): a MUST/SHOULD requirement, or a test naming one (or none), failed;
    HARNESS ERROR (3): a test crashed or timed out, a harness problem, or an incomplete run;
    NO MUST REQUIREMENT EXERCISED (0): nothing failed, but no MUST requirement was exercised;
    CONFORMS (0): every exercised MUST/SHOULD requirement passed."""
    levels = {r.id: r.level for r in reqs}
    nonconf = [r for r in reqs if r.level in ("MUST", "SHOULD") and r.outcome == FAIL]
    failing = [t for t in tests
               if t["outcome"] == FAIL and not info_only(t["requirements"], levels)]
    broken = [t for t in tests if t["outcome"] in BROKEN]
    scope = f"({exercised_scope(reqs)})"
    if nonconf or failing:
        n = len(nonconf)
        what = (f"{n} MUST/SHOULD requirement{'s' if n != 1 else ''} fail{'' if n != 1 else 's'}"
                if n else f"{len(failing)} test{'s' if len(failing) != 1 else ''} fail"
                f"{'' if len(failing) != 1 else 's'}")
        return 1, f"DOES NOT CONFORM: {what} {scope}"
    if broken or problems or not complete:
        why = []
        if broken:
            why.append(f"{len(broken)} test(s) crashed or timed out")
        if problems:
            why.append(f"{len(problems)} harness problem(s)")
        if not complete:
            why.append("the run is incomplete")
        return 3, f"HARNESS ERROR: {', '.join(why)}; no failing requirement among the rest {scope}"
    if not any(r.level == "MUST" and r.exercised for r in reqs):
        return 0, f"NO MUST REQUIREMENT EXERCISED {scope}"
    return 0, f"CONFORMS {scope}"


REFERENCE_KERNEL_COMMAND = "./cvmconf run --target qemu"


def advice(run: dict) -> list[dict]:
    """What the reader of a run should know before its results, each {"text", "command"}
    (command: a literal command line or ""): a local run on a kernel without guest_memfd
    points at the reference kernel under QEMU."""
    out = []
    fp = run.get("fingerprint") or {}
    kvm = fp.get("kvm") or {}
    caps = kvm.get("system_caps") or {}
    if (run.get("target") or {}).get("kind") == "local" and kvm.get("available", True) \
            and not caps.get("KVM_CAP_GUEST_MEMFD"):
        state = "absent" if "KVM_CAP_GUEST_MEMFD" not in caps else "0"
        out.append({"text": f"This host's kernel has no guest_memfd (KVM_CAP_GUEST_MEMFD "
                            f"{state}): guest_memfd, conversion and race requirements cannot be "
                            f"exercised here. To test the project's reference kernel under QEMU, "
                            f"run:", "command": REFERENCE_KERNEL_COMMAND})
    return out


def summary(reqs: list[RequirementResult], tests: list[dict]) -> dict:
    by_outcome: dict[str, int] = {}
    for t in tests:
        by_outcome[t["outcome"]] = by_outcome.get(t["outcome"], 0) + 1
    req_outcomes: dict[str, int] = {}
    for r in reqs:
        req_outcomes[r.outcome] = req_outcomes.get(r.outcome, 0) + 1
    def ordered(d: dict[str, int]) -> dict[str, int]:
        return {k: d[k] for k in sorted(d, key=outcome_rank)}
    return {
        "requirements": len(reqs),
        "requirements_exercised": sum(1 for r in reqs if r.exercised),
        "must_exercised": sum(1 for r in reqs if r.exercised and r.level == "MUST"),
        "must": sum(1 for r in reqs if r.level == "MUST"),
        "requirement_outcomes": ordered(req_outcomes),
        "tests": len(tests),
        "test_outcomes": ordered(by_outcome),
        "flaky": sum(1 for t in tests if t.get("flaky")),
    }


def write_json(path: Path, data: dict) -> None:
    """Writes JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


REQUIRED_KEYS = ("format", "format_version", "run_id", "complete", "fingerprint", "checkout",
                 "build", "requirements", "tests", "summary")


def load(run_dir: str | os.PathLike) -> dict:
    """Loads and checks results/<run-id>/run.json; one-line UsageError when it is not one."""
    p = Path(run_dir)
    f = p / "run.json" if p.is_dir() else p
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{p}: no run.json (not a cvmconf result directory)") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"{f}: not a readable run.json ({e.__class__.__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"{f}: not a cvmconf run record")
    if data.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{f}: run record version {data.get('format_version')!r}, "
                         f"this cvmconf reads {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UsageError(f"{f}: run record lacks {', '.join(missing)}")
    if not isinstance(data["tests"], list) or not isinstance(data["requirements"], list):
        raise UsageError(f"{f}: run record 'tests'/'requirements' must be lists")
    for i, t in enumerate(data["tests"]):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in
                                              ("binary", "name", "outcome", "path", "status")):
            raise UsageError(f"{f}: test entry {i + 1} is malformed")
    for i, r in enumerate(data["requirements"]):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or \
                not isinstance(r.get("outcome"), str):
            raise UsageError(f"{f}: requirement entry {i + 1} is malformed")
    return data

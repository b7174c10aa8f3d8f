"""The kernel's own KVM and mm selftests beside cvmconf: built from the same kernel source as the
reference kernel (or a user's tree), run in the same run and target, their KTAP parsed with the
project's parser, their cases mapped to catalogue requirements (suites/upstream-map.yaml), and a
per-requirement side-by-side with cvmconf's own outcome.

    ./cvmconf upstream build [--source debian:sid/linux-source-7.2 | DIR] [--arch x86_64|arm64]
    ./cvmconf run [--target qemu] --upstream [--upstream-source ...]

The build uses the kernel's own makefiles (tools/testing/selftests/{kvm,mm}, headers from
`make headers_install` of that tree), statically linked, only the programs the mapping names, in
a writable copy of the tree's tools/ (the mm makefile writes its local_config.* next to its
sources, so a packaged or read-only tree is never written to). The result is cached under
CACHE/upstream/<arch>-<hash of source, recipe, compiler, programs>/ with the layout the guest
sees: bin/cvm-upstream (the wrapper that runs one program) and upstream/<dir>/<path>.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from cvmconf import ktap, refkernel
from cvmconf.errors import HarnessError, UsageError
from cvmconf.gtest import ERROR, FAIL, PASS, SKIP, TIMEOUT, TestResult

ROOT = Path(__file__).resolve().parents[2]
MAP_PATH = ROOT / "suites" / "upstream-map.yaml"
RECIPE = 1               # bump when the build steps change the result
BINARY = "upstream"      # the family (and run.json "binary") of upstream results
WRAPPER = "cvm-upstream"
KSFT_SKIP = 4
SELFTESTS = "tools/testing/selftests"

# The program a batch runs is the wrapper: cvm-upstream OUTPUT HUGETLB_PAGES PROGRAM [ARGS...].
# It runs PROGRAM (relative to ../upstream/ beside the wrapper) with its output to OUTPUT (the
# file a target brings back whole, where a GoogleTest binary writes its JSON report), reserving
# HUGETLB_PAGES 2 MiB hugetlb pages meanwhile (under cvmconf's hugetlb lock when flock exists;
# the pool size is written back), and exits with the program's status.
WRAPPER_TEXT = """#!/bin/sh
# cvm-upstream: runs one upstream selftest for cvmconf (runners/cvmconf/upstream.py)
out=$1; pages=$2; prog=$3; shift 3
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/../upstream/$prog
[ -x "$bin" ] || { echo "cvm-upstream: $prog is not built" > "$out"; exit 127; }
pool=/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
old=
if [ "$pages" -gt 0 ] && [ -w "$pool" ]; then
  if command -v flock >/dev/null 2>&1 && [ -d /run/lock ]; then
    exec 9>/run/lock/cvmconf-hugetlb.lock && flock 9
  fi
  old=$(cat "$pool")
  [ "$old" -lt "$pages" ] && echo "$pages" > "$pool"
fi
cd "$(dirname "$bin")"
"$bin" "$@" > "$out" 2>&1
rc=$?
[ -n "$old" ] && echo "$old" > "$pool"
cat "$out"
exit $rc
"""


# --- the mapping ------------------------------------------------------------------------------
@dataclasses.dataclass
class Mapping:
    cases: list[str]
    requirements: list[str]
    covers: str = ""


@dataclasses.dataclass
class UpstreamTest:
    test: str                  # name in the run
    binary: str                # path below tools/testing/selftests
    args: list[str]
    arch: list[str]
    timeout: float
    hugetlb: int
    map: list[Mapping]
    note: str = ""

    @property
    def directory(self) -> str:
        return self.binary.split("/", 1)[0]

    def requirements(self) -> list[str]:
        return sorted({r for m in self.map for r in m.requirements})

    def requirements_of(self, case: str) -> list[str]:
        out: list[str] = []
        for m in self.map:
            if any(fnmatch.fnmatchcase(case, g) or g == "*" for g in m.cases):
                out += [r for r in m.requirements if r not in out]
        return out


def load_map(path: Path | None = None) -> list[UpstreamTest]:
    path = Path(path or MAP_PATH)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: cannot read the upstream mapping ({e.__class__.__name__})") \
            from None
    if not isinstance(data, dict) or not isinstance(data.get("tests"), list):
        raise UsageError(f"{path}: no 'tests' list")
    out, seen = [], set()
    for i, t in enumerate(data["tests"], 1):
        try:
            maps = [Mapping(cases=list(m["cases"]), requirements=list(m["requirements"]),
                            covers=str(m.get("covers", ""))) for m in t.get("map") or []]
            ut = UpstreamTest(test=str(t["test"]), binary=str(t["binary"]),
                              args=[str(a) for a in t.get("args", [])],
                              arch=list(t.get("arch", ["x86_64", "arm64"])),
                              timeout=float(t.get("timeout", 300)), hugetlb=int(t.get("hugetlb", 0)),
                              map=maps, note=" ".join(str(t.get("note", "")).split()))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{path}: test entry {i} is malformed ({e})") from None
        if ut.test in seen:
            raise UsageError(f"{path}: test {ut.test} listed twice")
        if ut.directory not in ("kvm", "mm") or ".." in ut.binary:
            raise UsageError(f"{path}: {ut.test}: binary must be under kvm/ or mm/")
        if not ut.map and not ut.note:
            raise UsageError(f"{path}: {ut.test} maps to no requirement and has no note saying why")
        seen.add(ut.test)
        out.append(ut)
    return out


def check_map(tests: list[UpstreamTest], known_ids: set[str], tree: Path | None) -> list[str]:
    """Problems: unknown requirement IDs; programs the tree's makefiles do not build."""
    problems = []
    for t in tests:
        for rid in t.requirements():
            if rid not in known_ids:
                problems.append(f"upstream-map: {t.test} names unknown requirement {rid}")
        if tree is not None:
            src = tree / SELFTESTS / f"{t.binary}.c"
            if not src.is_file():
                problems.append(f"upstream-map: {t.test}: {src} does not exist")
            elif not _in_makefiles(tree, t):
                problems.append(f"upstream-map: {t.test}: not a target of "
                                f"{SELFTESTS}/{t.directory}'s makefiles")
    return problems


def _in_makefiles(tree: Path, t: UpstreamTest) -> bool:
    d = tree / SELFTESTS / t.directory
    rel = t.binary.split("/", 1)[1]
    words = set()
    for mk in list(d.glob("Makefile*")):
        words.update(re.findall(r"[\w./-]+", mk.read_text(errors="replace")))
    return rel in words


# --- building ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    root: Path                 # holds bin/cvm-upstream and upstream/<dir>/<path>
    meta: dict

    @property
    def wrapper(self) -> Path:
        return self.root / "bin" / WRAPPER

    def program(self, t: UpstreamTest) -> Path:
        return self.root / "upstream" / t.binary


def _say(msg: str) -> None:
    refkernel._say(msg)


def selected(tests: list[UpstreamTest], arch: str) -> list[UpstreamTest]:
    return [t for t in tests if arch in t.arch]


def build(source_spec: str | None = None, arch: str = "x86_64", cache: Path | None = None,
          tests: list[UpstreamTest] | None = None, jobs: int = 2) -> Built:
    """Builds (or finds cached) the mapped upstream programs for arch."""
    cache = cache or refkernel.cache_root()
    if arch not in refkernel.KARCH:
        raise UsageError(f"unsupported --arch {arch} (x86_64 or arm64)")
    tests = selected(tests if tests is not None else load_map(), arch)
    programs = sorted({t.binary for t in tests})
    user_tree = source_spec is not None and Path(source_spec).is_dir()
    if not user_tree and source_spec in (None, refkernel.REFERENCE_SOURCE):
        hit = _find(cache, f"{refkernel.debian.parse_spec(refkernel.REFERENCE_SOURCE).name} "
                    f"{refkernel.REFERENCE_VERSION}", arch, programs)
        if hit:
            return hit
    source = refkernel.source_tree(source_spec, cache)
    key = _key(source.label, arch, programs)
    if user_tree:    # a user's tree changes under us: rebuild (make is incremental)
        key = f"tree-{hashlib.sha256(str(source.tree).encode()).hexdigest()[:12]}-{arch}"
    root = cache / "upstream" / key
    if not user_tree:
        hit = _load(root, programs)
        if hit:
            return hit
    work = cache / "upstream-build" / key
    shadow, hdr, out = work / "tree", work / "headers", work / "out"
    root.mkdir(parents=True, exist_ok=True)
    logpath = root / "build.log"
    t0 = time.monotonic()
    _say(f"building the upstream selftests ({', '.join(programs)}) for {arch} from "
         f"{source.label} (log {logpath})")
    cross = [f"ARCH={arch}", f"CROSS_COMPILE={refkernel.CROSS[arch]}"] \
        if arch != refkernel._host_arch() else []
    with open(logpath, "w") as log:
        # A writable copy of what the selftests' makefiles read from the tree.
        shadow.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["rsync", "-a", "--delete", f"{source.tree}/tools/", f"{shadow}/tools/"],
                           stdout=log, stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            raise HarnessError(f"copying {source.tree}/tools failed (needs rsync; log {logpath})")
        # Read from outside tools/: the arch list, gup_test's ioctls, arm64's sysreg generator.
        for rel in ("scripts/subarch.include", "mm/gup_test.h",
                    f"arch/{refkernel.KARCH[arch]}/tools"):
            src, dst = source.tree / rel, shadow / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)
        # A tree built in place refuses O= ("not clean"): its own objtree is used then.
        objdir = [] if (source.tree / ".config").exists() else [f"O={hdr}"]
        refkernel._make(["-C", str(source.tree), *objdir, f"ARCH={refkernel.KARCH[arch]}",
                         "headers_install", f"INSTALL_HDR_PATH={shadow / 'usr'}"],
                        log, "make headers_install")
        for d in sorted({t.directory for t in tests}):
            targets = [str(out / p) for p in programs if p.startswith(d + "/")]
            for tgt in targets:
                Path(tgt).parent.mkdir(parents=True, exist_ok=True)
            refkernel._make(["-C", str(shadow / SELFTESTS / d), f"-j{jobs}", *cross,
                             f"KHDR_INCLUDES=-isystem {shadow / 'usr' / 'include'}",
                             "LDFLAGS=-static", f"OUTPUT={out / d}", *targets],
                            log, f"building the upstream {d} selftests")
    for p in programs:
        dst = root / "upstream" / p
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / p, dst)
    wrapper = root / "bin" / WRAPPER
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(WRAPPER_TEXT)
    wrapper.chmod(0o755)
    meta = {"source": source.label, "source_version": source.version, "arch": arch,
            "programs": programs, "compiler": refkernel.compiler(arch), "recipe": RECIPE,
            "build_seconds": round(time.monotonic() - t0, 1)}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    if not user_tree:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"built the upstream selftests in {meta['build_seconds']} s: {root}")
    return Built(root=root, meta=meta)


def _key(label: str, arch: str, programs: list[str]) -> str:
    h = hashlib.sha256(f"recipe {RECIPE}\n{label}\n{arch}\n{refkernel.compiler(arch)}\n"
                       f"{' '.join(programs)}\n{WRAPPER_TEXT}".encode())
    return f"{arch}-{h.hexdigest()[:16]}"


def _find(cache: Path, label: str, arch: str, programs: list[str]) -> Built | None:
    return _load(cache / "upstream" / _key(label, arch, programs), programs)


def _load(root: Path, programs: list[str]) -> Built | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not (root / "bin" / WRAPPER).is_file() or \
            not all((root / "upstream" / p).is_file() for p in programs):
        return None
    return Built(root=root, meta=meta)


# --- interpreting one program's run ------------------------------------------------------------
def case_name(t: ktap.KtapTest) -> str:
    """A case's name: its description, else the '[RUN] ...' line before it, else its SKIP text
    (mm selftests print 'ok 7 # SKIP <name>')."""
    if t.description:
        return t.description
    for d in reversed(t.diagnostics):
        if d.startswith("[RUN] "):
            return d[len("[RUN] "):].strip()
    return t.diagnostic or f"case {t.number}"


def _case_reason(t: ktap.KtapTest) -> str:
    """What the program printed between '[RUN]' and the result (e.g. why it skipped)."""
    after, seen = [], False
    for d in t.diagnostics:
        if d.startswith("[RUN] "):
            after, seen = [], True
            continue
        if seen or not any(x.startswith("[RUN] ") for x in t.diagnostics):
            after.append(d)
    return "; ".join(a.strip() for a in after if a.strip())[:300]


STATUS = {"PASS": PASS, "XFAIL": PASS, "FAIL": FAIL, "SKIP": SKIP, "TODO": SKIP,
          "TIMEOUT": TIMEOUT, "ERROR": ERROR}
SKIP_PLAN_RE = re.compile(r"^1\.\.0 # SKIP\s*(.*)$", re.M)


def interpret(t: UpstreamTest, output: str, exit_code: int | None, broken: str | None,
              kernel_log: list[str], duration: float, started: str) -> list[TestResult]:
    """One program's results: a result per KTAP case when it printed KTAP, else one result named
    after the program (exit 0 PASS, 4 SKIP, else FAIL); a crash, timeout or dead guest (broken)
    makes the program's own result ERROR/TIMEOUT, keeping the cases it finished."""
    results: list[TestResult] = []
    doc, ktap_error = None, ""
    try:
        doc = ktap.parse(output)
    except ktap.KtapError as e:
        ktap_error = str(e)
        if broken:   # died mid-way: the cases it finished count (the plan cannot hold)
            try:
                doc = ktap.parse(re.sub(r"(?m)^1\.\.\d+$", "", output))
            except ktap.KtapError:
                doc = None
    evidence = {"exit": broken or f"exited with status {exit_code}",
                "command": f"{t.binary} {' '.join(t.args)}".strip()}
    if doc is not None and doc.tests:
        for c in doc.tests:
            name = case_name(c)
            outcome = STATUS.get(c.status, FAIL)
            r = TestResult(name=f"{t.test}: {name}", binary=BINARY, outcome=outcome,
                           requirements=t.requirements_of(name), start_time=started,
                           properties={"upstream_test": t.test, "ktap_status": c.status})
            why = _case_reason(c)
            if outcome == SKIP:
                r.skip_reason = c.diagnostic if c.description else (why or "skipped")
                if not r.skip_reason or r.skip_reason == name:
                    r.skip_reason = why or "skipped by the upstream test"
            elif outcome != PASS:
                r.messages = [why or f"not ok {c.number}"]
            results.append(r)
    whole = TestResult(name=t.test, binary=BINARY, outcome=PASS, duration=duration,
                       start_time=started, properties={"upstream_test": t.test},
                       kernel_log=kernel_log, evidence=dict(evidence))
    whole.evidence["output_tail"] = output[-6000:]
    if broken:
        whole.outcome = TIMEOUT if "timeout" in broken or "exceeded" in broken else ERROR
        whole.messages = [f"{t.test} did not finish: {broken}"]
    elif exit_code == KSFT_SKIP:
        whole.outcome = SKIP
        m = SKIP_PLAN_RE.search(output)
        lines = [l for l in output.strip().splitlines() if l.strip()]
        why = (m.group(1).strip() if m and m.group(1).strip() else
               (lines[-1].strip() if lines else "skipped (exit status 4)"))
        whole.skip_reason = re.sub(r"^-\s*", "", why)
    elif exit_code != 0:
        whole.outcome = FAIL
        lines = [l for l in output.strip().splitlines() if l.strip()]
        at = next((i for i, l in enumerate(lines) if "Test Assertion Failure" in l), None)
        assertion = [" ".join(l.split()) for l in lines[at + 1:at + 4]] if at is not None \
            else [l.strip() for l in lines[-3:]]
        whole.messages = [f"{t.test} exited with status {exit_code}"
                          + (": " + " | ".join(assertion) if assertion else "")]
        if ktap_error and "no KTAP version line" not in ktap_error:
            whole.messages.append(f"KTAP: {ktap_error}")
    elif ktap_error and "no KTAP version line" not in ktap_error:
        whole.outcome = ERROR
        whole.messages = [f"{t.test} printed malformed KTAP: {ktap_error}"]
    if not results:
        whole.requirements = t.requirements()   # the whole program carries the mapping
    elif whole.outcome in (ERROR, TIMEOUT) or \
            (whole.outcome == FAIL and not any(r.outcome == FAIL for r in results)):
        whole.requirements = t.requirements()   # broken, or failed without a failing case
    results.insert(0, whole)
    return results


# --- the side-by-side ---------------------------------------------------------------------------
VERDICTS = (PASS, FAIL)


def side_outcome(outcomes: list[str]) -> str:
    if not outcomes:
        return "NOT RUN"
    for o in (FAIL, ERROR, TIMEOUT, PASS, SKIP):
        if o in outcomes:
            return o
    return outcomes[0]


def agreement(cvm: str, up: str) -> str:
    """agree, disagree (one passed, the other failed), one-sided (one side exercised it, the
    other skipped or did not run it), incomplete (a side did not complete), or neither
    exercised. (side_by_side says "not selected" when this run's filters left cvmconf's tests
    of the requirement out.)"""
    if cvm in VERDICTS and up in VERDICTS:
        return "agree" if cvm == up else "disagree"
    if cvm in (ERROR, TIMEOUT) or up in (ERROR, TIMEOUT):
        return "incomplete"
    if cvm in VERDICTS or up in VERDICTS:
        return "one-sided"
    return "neither exercised"


def side_by_side(requirements: list[dict], up_results: list[dict],
                 tests: list[UpstreamTest]) -> list[dict]:
    """Per mapped requirement: cvmconf's outcome, upstream's (with its test names) and whether
    they agree."""
    mapped: dict[str, list[str]] = {}
    for t in tests:
        for rid in t.requirements():
            mapped.setdefault(rid, []).append(t.test)
    by_req: dict[str, list[dict]] = {}
    for r in up_results:
        for rid in r.get("requirements", []):
            by_req.setdefault(rid, []).append(r)
    cvm = {r["id"]: r for r in requirements}
    rows = []
    for rid in sorted(mapped, key=lambda i: (i.split("-")[0], i)):
        c = cvm.get(rid, {})
        c_out = c.get("outcome", "NOT RUN")
        ups = by_req.get(rid, [])
        u_out = side_outcome([u["outcome"] for u in ups])
        counts: dict[str, int] = {}
        for u in ups:
            counts[u["outcome"]] = counts.get(u["outcome"], 0) + 1
        failing = [u["name"] for u in ups if u["outcome"] in (FAIL, ERROR, TIMEOUT)][:8]
        skips = sorted({u.get("skip_reason", "") for u in ups if u["outcome"] == SKIP} - {""})
        a = agreement(c_out, u_out)
        if c_out == "NOT RUN" and "not selected by the filters" in c.get("reason", ""):
            a = "not selected"    # a filtered cvmconf run: no comparison, no disagreement
        rows.append({
            "id": rid, "level": c.get("level", ""), "cvmconf": c_out,
            "cvmconf_reason": c.get("reason", ""), "upstream": u_out,
            "upstream_tests": mapped[rid], "upstream_counts": counts,
            "upstream_failing": failing, "upstream_skip_reasons": skips[:4],
            "upstream_reason": (skips[0] if u_out == SKIP and skips else
                                "not run" if not ups else ""),
            "agreement": a,
        })
    return rows


def disagreements(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["agreement"] == "disagree":
            why = (f"cvmconf {r['cvmconf']}, upstream {r['upstream']}"
                   + (f" ({', '.join(r['upstream_failing'][:3])})" if r["upstream_failing"] else ""))
        elif r["agreement"] == "one-sided":
            if r["cvmconf"] in VERDICTS:
                why = (f"cvmconf exercised it ({r['cvmconf']}); upstream did not "
                       f"({r['upstream']}: {r['upstream_reason'] or 'see its tests'})")
            else:
                why = (f"upstream exercised it ({r['upstream']}); cvmconf did not "
                       f"({r['cvmconf']}: {r['cvmconf_reason'] or 'see its tests'})")
        else:
            continue
        out.append({**r, "why": why})
    return out


def summary(results: list[dict], rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    agree: dict[str, int] = {}
    for r in rows:
        agree[r["agreement"]] = agree.get(r["agreement"], 0) + 1
    return {"results": len(results), "outcomes": counts, "requirements": len(rows),
            "agreement": agree}


# --- running ------------------------------------------------------------------------------------
def plan_for(t: UpstreamTest, built: Built, label: str):
    from cvmconf.targets.base import BatchPlan, SuiteBinary
    return BatchPlan(binary=SuiteBinary(WRAPPER, built.wrapper), label=label, tests=[t.test],
                     gtest_filter="", shard=None, env={}, test_timeout=t.timeout,
                     idle_timeout=t.timeout, batch_timeout=t.timeout + 30,
                     args=["{report}", str(t.hugetlb), t.binary, *t.args])


def run(target, tests: list[UpstreamTest], built: Built, arch: str, record=None,
        progress=None) -> tuple[list[TestResult], list[dict]]:
    """Runs each mapped program for arch as its own batch on the target (same timeouts, kernel-log
    watching and guest-crash handling as the suites); returns results and harness problems."""
    from cvmconf.executor import BatchRecord, describe_exit
    results: list[TestResult] = []
    problems: list[dict] = []
    for i, t in enumerate(tests, 1):
        if arch not in t.arch:
            results.append(TestResult(
                name=t.test, binary=BINARY, outcome=SKIP, requirements=t.requirements(),
                skip_reason=f"not applicable: {t.test} is not built for {arch}",
                properties={"upstream_test": t.test}))
            continue
        if not built.program(t).is_file():
            results.append(TestResult(
                name=t.test, binary=BINARY, outcome=SKIP, requirements=t.requirements(),
                skip_reason=f"not built: {built.program(t)} is missing",
                properties={"upstream_test": t.test}))
            continue
        plan = plan_for(t, built, f"u{i:02d}-upstream-{re.sub(r'[^A-Za-z0-9_-]', '_', t.test)}")
        if progress:
            progress.batch_started(plan)
            progress.test_started(BINARY, t.test)
        try:
            out = target.run_batch(plan, None)
        except Exception as e:   # a target bug must not lose the run
            from cvmconf.targets.base import BatchOutput
            out = BatchOutput(plan=plan, launch_error=f"target failed: {e.__class__.__name__}: {e}")
        text = out.report_json if out.report_json is not None else out.output
        broken = None
        if out.launch_error or out.target_failure or out.killed or out.signal is not None:
            broken = describe_exit(out)
        got = interpret(t, text or "", out.exit_code, broken,
                        [l.render() for l in out.kernel_log][-200:], out.duration, out.started)
        results.extend(got)
        exit_text = describe_exit(out)
        probs = [f"could not run: {out.launch_error}"] if out.launch_error else []
        rec = BatchRecord(label=plan.label, binary=f"{BINARY}:{t.test}", filter="", shard=None,
                          tests=1, started=out.started, duration=round(out.duration, 3),
                          exit=exit_text, killed=out.killed, problems=probs,
                          command=plan.command_line())
        problems += [{"batch": plan.label, "binary": BINARY, "problem": p} for p in probs]
        if record:
            record(out, rec)
        if progress:
            progress.test_done(got[0])
    return results, problems


def section(requirements: list[dict], results: list[TestResult], tests: list[UpstreamTest],
            built: Built | None, problems: list[dict], batches: list[dict] | None = None,
            note: str = "") -> dict:
    """run.json's "upstream" object."""
    from cvmconf import results as results_mod
    entries = [results_mod.test_entry(r) for r in results]
    rows = side_by_side(requirements, entries, tests)
    return {"source": built.meta.get("source") if built else None,
            "build": {"root": str(built.root), **built.meta} if built else None,
            "mapping": str(MAP_PATH.relative_to(ROOT)), "note": note,
            "summary": summary(entries, rows), "tests": entries, "requirements": rows,
            "disagreements": disagreements(rows), "problems": problems,
            "batches": batches or []}


def check_built(tests: list[UpstreamTest]) -> list[str]:
    """Without a source tree: every mapped program must be in some cached build, if one exists."""
    cache = refkernel.cache_root() / "upstream"
    builds = [b for b in sorted(cache.glob("*/meta.json"))] if cache.is_dir() else []
    have: set[str] = set()
    for m in builds:
        try:
            have.update(json.loads(m.read_text()).get("programs", []))
        except (OSError, ValueError):
            continue
    if not builds:
        return []    # nothing to check against: neither a tree nor a build (said by the caller)
    return [f"upstream-map: {t.test}: {t.binary} is in no cached upstream build"
            for t in tests if t.binary not in have]


def compare(base: dict, new: dict) -> dict | None:
    """For `cvmconf compare`: the disagreements of each run and the requirements whose upstream
    outcome or agreement changed (None when neither run had upstream results)."""
    bu, nu = base.get("upstream"), new.get("upstream")
    if not bu and not nu:
        return None
    br = {r["id"]: r for r in (bu or {}).get("requirements", [])}
    nr = {r["id"]: r for r in (nu or {}).get("requirements", [])}
    changed = []
    for rid in sorted(set(br) | set(nr)):
        b, n = br.get(rid), nr.get(rid)
        bo, no = (b or {}).get("upstream"), (n or {}).get("upstream")
        ba, na = (b or {}).get("agreement"), (n or {}).get("agreement")
        if (bo, ba) != (no, na):
            changed.append({"id": rid, "base": bo, "new": no, "base_agreement": ba,
                            "new_agreement": na})
    return {"base_disagreements": (bu or {}).get("disagreements", []) if bu else None,
            "new_disagreements": (nu or {}).get("disagreements", []) if nu else None,
            "changed": changed}

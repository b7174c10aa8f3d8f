"""cvmconf command line (called by the ./cvmconf script after it installed and built).

  run               run the conformance suites through pytest, write results/<run-id>/
  list              list the tests and requirements (with the same filters) without running
  check-catalogue   check that the catalogue and the tests' requirement IDs agree
  compare BASE NEW  regressions, fixes, newly exercised/skipped, changed evidence
  export --kcidb    KernelCI KCIDB v5 JSON of a run

Exit codes: 0 every exercised requirement conforms (or: success), 1 non-conformance (compare:
a regression), 2 usage or environment error, 3 harness error (a test crashed or timed out, a batch
broke, the run is incomplete).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cvmconf import catalogue, gtest, pincoverage, procs
from cvmconf.errors import (EXIT_HARNESS, EXIT_NONCONFORMANCE, EXIT_OK, CvmconfError, HarnessError,
                            UsageError)

REPO = Path(__file__).resolve().parents[2]


def _build_dir(args) -> Path:
    return Path(args.build_dir or os.environ.get("CVMCONF_BUILD_DIR") or REPO / "build")


def _suite_dir(args) -> Path:
    return Path(args.suite_dir) if args.suite_dir else _build_dir(args) / "suites"


# ---------------------------------------------------------------------------------------------
# check-catalogue

def cmd_check_catalogue(args) -> int:
    cat = catalogue.load(args.catalogue, seeds_dir=args.seeds_dir)
    declared: dict[str, list[str]] = {}
    for b in gtest.suite_binaries_in(_suite_dir(args)):
        declared.update(gtest.list_suite(b).requirements)
    problems = catalogue.cross_check(cat, declared)
    problems += _check_upstream_map(args, cat)
    for p in problems:
        print(f"catalogue: {p}")
    musts = [r for r in cat.requirements if r.level == "MUST"]
    print(f"catalogue: {len(cat.requirements)} requirements ({len(musts)} MUST), "
          f"{len(declared)} tests, {len(problems)} problem(s)")
    return EXIT_NONCONFORMANCE if problems else EXIT_OK


def _check_upstream_map(args, cat) -> list[str]:
    """The upstream mapping names known requirement IDs and programs that exist: in the cached
    build when there is one, else in a kernel tree's makefiles (--upstream-source DIR or the
    unpacked reference source)."""
    from cvmconf import refkernel, upstream
    tests = upstream.load_map(getattr(args, "upstream_map", None))
    tree = None
    src = getattr(args, "upstream_source", None)
    if src and Path(src).is_dir():
        tree = Path(src)
    else:
        name = refkernel.debian.parse_spec(refkernel.REFERENCE_SOURCE).name
        ref = refkernel.cache_root() / "src" / f"{name}_{refkernel.REFERENCE_VERSION}" / name
        tree = ref if ref.is_dir() else None
    problems = upstream.check_map(tests, set(cat.by_id()), tree)
    if tree is None:
        problems += upstream.check_built(tests)
    return problems


# ---------------------------------------------------------------------------------------------
# collection through pytest (run and list)

def _validate_filters(args, cat: catalogue.Catalogue) -> None:
    ids = cat.by_id()
    for rid in args.requirement or []:
        if rid not in ids:
            raise UsageError(f"--requirement {rid}: no such requirement in {cat.path}")
    for fam in args.family or []:
        if fam not in cat.families:
            raise UsageError(f"--family {fam}: no such family (known: {', '.join(cat.families)})")
    if args.k:
        try:
            from _pytest.mark.expression import Expression, ParseError
        except ImportError:
            return
        try:
            Expression.compile(args.k)
        except ParseError as e:
            raise UsageError(f"-k {args.k!r}: not a valid expression ({e})") from None


def _selection_text(args) -> str:
    parts = []
    if args.k:
        parts.append(f"-k {args.k!r}")
    for rid in args.requirement or []:
        parts.append(f"--requirement {rid}")
    for fam in args.family or []:
        parts.append(f"--family {fam}")
    if args.filter:
        parts.append(f"--filter {args.filter!r}")
    return " ".join(parts)


def _pytest_session(args, plugin, suite_dir: Path, binaries, collect_only: bool) -> int:
    import pytest
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    with tempfile.TemporaryDirectory(prefix="cvmconf-pytest-") as tmp:
        procs.track_path(tmp, "pytest's configuration directory")
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        pargs = [str(b.host_path) for b in binaries] + [
            "-p", "no:terminal", "-p", "no:cacheprovider", "-p", "no:stepwise",
            "--capture=no", "--noconftest", "-c", str(ini), "--rootdir", str(suite_dir),
            "-W", "ignore::pytest.PytestAssertRewriteWarning"]
        if args.k:
            pargs += ["-k", args.k]
        if collect_only:
            pargs.append("--collect-only")
        return int(pytest.main(pargs, plugins=[plugin]))


QEMU_OPTIONS = ("kernel", "modules", "arch", "append", "pkvm", "accel", "max_reboots",
                "boot_timeout", "memory")


def _target_options(args) -> dict:
    """Options of the chosen target (the QEMU target's kernel, modules, architecture, ...). The
    QEMU options default to None on the command line: only those given are passed on, and
    QemuTarget owns the defaults."""
    given = {k: getattr(args, k) for k in QEMU_OPTIONS if getattr(args, k) is not None}
    if args.target != "qemu":
        if given:
            raise UsageError(f"{', '.join('--' + k.replace('_', '-') for k in given)} "
                             "only apply to --target qemu")
        return {}
    return {**given, "suite_dir": args.suite_dir}


def _collect(args, cat, target, executor=None):
    from cvmconf.plugin import CvmconfPlugin
    from cvmconf.targets.base import SuiteBinary
    suite_dir = Path(args.suite_dir) if args.suite_dir else \
        (target.default_suite_dir() or _suite_dir(args))
    try:
        paths = gtest.suite_binaries_in(suite_dir)
    except HarnessError:
        why = target.suites_missing_reason(suite_dir)
        if not why:
            raise
        paths = []
        args.suites_note = why
    binaries = [SuiteBinary(p.name, p.resolve()) for p in paths]
    fam_of = {r.id: r.family for r in cat.requirements}
    plugin = CvmconfPlugin(target, binaries, fam_of, executor, args.requirement, args.family,
                           args.filter)
    return suite_dir, binaries, plugin


# ---------------------------------------------------------------------------------------------
# list

def cmd_list(args) -> int:
    from cvmconf import targets
    cat = catalogue.load(args.catalogue)
    _validate_filters(args, cat)
    target = targets.create(args.target, build_dir=_build_dir(args), **_target_options(args))
    try:
        suite_dir, binaries, plugin = _collect(args, cat, target)
        rc = _pytest_session(args, plugin, suite_dir, binaries, collect_only=True)
    finally:
        target.close()      # a VM target may have booted a guest to list the tests
    if plugin.errors:
        raise HarnessError("; ".join(plugin.errors))
    if rc not in (0, 5):
        raise HarnessError(f"collecting the tests failed (pytest exit status {rc})")
    selected = [i for items in plugin.selected.values() for i in items]
    per_req: dict[str, int] = {}
    print("Tests (binary, test, requirements):")
    for it in selected:
        print(f"  {it.binary.name}  {it.test}  [{' '.join(it.requirements)}]")
        for rid in it.requirements:
            per_req[rid] = per_req.get(rid, 0) + 1
    print(f"\n{len(selected)} test(s) selected, {len(plugin.deselected)} deselected"
          + (f" by {_selection_text(args)}" if _selection_text(args) else ""))
    print("\nRequirements (ID, level, family, selected tests, statement):")
    for r in cat.requirements:
        n = per_req.get(r.id, 0)
        note = "" if n or not r.untested_reason else f"  (untested: {r.untested_reason})"
        print(f"  {r.id:11} {r.level:6} {r.family:24} {n:4}  {r.statement}{note}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# run

def _harness_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _file_sha256(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def _run_id(fp: dict) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    rel = re.sub(r"[^A-Za-z0-9._-]", "_", fp.get("kernel", {}).get("release") or "unknown")
    return f"{stamp}-{rel}-{secrets.token_hex(2)}"


def _saver(run_dir: Path):
    from cvmconf import results

    def save(out, rec) -> None:
        d = run_dir / "batches" / rec.label
        d.mkdir(parents=True, exist_ok=True)
        if out.report_json is not None:
            (d / "report.json").write_text(out.report_json, encoding="utf-8")
        if out.events:
            (d / "events.jsonl").write_text(out.events, encoding="utf-8")
        (d / "output.txt").write_text(out.output, encoding="utf-8")
        (d / "kernel.log").write_text("".join(l.render() + "\n" for l in out.kernel_log),
                                      encoding="utf-8")
        results.write_json(d / "batch.json", {**rec.__dict__, "kernel_log_error":
                                              out.kernel_log_error,
                                              "kernel_log_lost": out.kernel_log_lost,
                                              "premature_exit": out.premature_exit})
    return save


def _write_outputs(run: dict, run_dir: Path) -> None:
    from cvmconf import junit, ktap, report, results
    results.write_json(run_dir / "run.json", run)
    junit.write(run, run_dir / "junit.xml")
    (run_dir / "results.ktap").write_text(ktap.from_run(run), encoding="utf-8")
    report.write(run, run_dir)


class Stopper:
    """SIGINT, SIGTERM and SIGHUP during `cvmconf run`. The first one stops the run cleanly: a
    KeyboardInterrupt where the main thread is; running batches are killed, system state is
    restored, the results so far are written and the run is marked incomplete. Another one while
    that cleanup runs stops at once: every process group of the run is SIGKILLed, the state
    snapshot is put back (best effort), temporary paths are removed, run.json says so, exit 3.
    SIGINT is handled explicitly: a runner started as a background job of a non-interactive
    shell inherits SIGINT ignored, and Ctrl-C / kill -INT must still stop it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received: list[int] = []
        self.hooks: list = []          # callables run on the hard exit, in order
        self._old: dict = {}
        self._exiting = False

    def install(self) -> None:
        for s in self.SIGNALS:
            self._old[s] = signal.signal(s, self._handle)

    def uninstall(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def first_signal(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def _handle(self, signum, frame):
        self.received.append(signum)
        if len(self.received) == 1:
            raise KeyboardInterrupt
        self.hard_exit(signum)

    def hard_exit(self, signum: int) -> None:
        if self._exiting:
            os._exit(EXIT_HARNESS)
        self._exiting = True
        killed = procs.kill_all()
        for hook in self.hooks:
            try:
                hook()
            except Exception:   # noqa: BLE001 - the way out must not stop halfway
                pass
        left = procs.remove_paths()
        name = signal.Signals(signum).name
        msg = f"cvmconf: {name} again: stopped at once"
        if killed:
            msg += f"; killed {', '.join(killed)}"
        if left:
            msg += f"; could not remove {', '.join(left)}"
        try:
            sys.stdout.flush()
            os.write(2, (msg + "\n").encode())
        except OSError:
            pass
        os._exit(EXIT_HARNESS)


def cmd_run(args) -> int:
    """The run's lifecycle: signal handling from the first moment, the target closed and every
    process of the run gone on every exit path (results, usage errors such as a guest without
    KVM, boot failures, harness exceptions, signals)."""
    stopper = Stopper()
    stopper.install()
    procs.become_subreaper()     # orphans of our descendants come to us, for the final sweep
    ctx: dict = {"stopper": stopper}
    try:
        return _run(args, ctx)
    finally:
        stopper.uninstall()
        # Whatever _run did not get to (it raised before its own cleanup).
        target = ctx.get("target")
        if target is not None and not ctx.get("closed"):
            try:
                target.close()
            except Exception:   # noqa: BLE001 - the original error is the one to report
                pass
        for c in ctx.get("cleanups", []):
            try:
                c()
            except Exception:   # noqa: BLE001
                pass
        procs.sweep()
        if ctx.get("run_lock") is not None:
            ctx["run_lock"].release()


def _cleanup_run(ctx: dict, executor, progress, interrupted: bool) -> dict:
    """Stops the batches, closes the target, restores what the run changed and kills what it
    left; returns run.json's "system_state"."""
    if interrupted:
        executor.interrupt()
    executor.shutdown(cancel=interrupted)
    progress.close()
    target = ctx["target"]
    target.close()
    ctx["closed"] = True
    state = {"watched": [], "restored": [], "processes_killed": [], "mounts": [],
             "problems": []}
    guard = ctx.get("guard")
    if guard is not None:
        state["watched"] = sorted(guard.baseline or {})
        state["checks"] = guard.checks
        state["restored"] = guard.records
        state["problems"] += guard.problems
    dbg = ctx.get("debugfs")
    if dbg is not None:
        if dbg.error:
            state["mounts"].append(dbg.error)
        try:
            done = dbg.restore()
            if done:
                state["mounts"].append(done)
        except OSError as e:
            state["problems"].append({"batch": "-", "binary": "-", "problem": e.strerror or str(e)})
        ctx["debugfs"] = None
    killed = procs.sweep()
    if killed:
        state["processes_killed"] = killed
        state["problems"].append({"batch": "-", "binary": "-",
                                  "problem": f"process(es) left behind by the run, killed: "
                                             f"{'; '.join(killed)}"})
    lock = ctx.get("run_lock")
    if lock is not None:
        lock.release()
    return state


@dataclasses.dataclass
class _Execution:
    """What executing a run's tests left: the pytest status, the plugin (listings, selection,
    results), the executor (batches, problems), the upstream selftests and the restored state."""
    rc: int | None
    interrupted: bool
    plugin: object
    executor: object
    binaries: list
    up: dict | None
    system_state: dict


def _run(args, ctx: dict) -> int:
    """A run, step by step: options, target, run directory, execution, results."""
    cat = catalogue.load(args.catalogue)
    duration, source = _run_options(args, cat)
    target = _open_target(args, ctx)
    up = _upstream_prepare(args, target)
    target.check()                      # no KVM: one line, exit 2, nothing written
    suite_dir, binaries, _ = _collect(args, cat, target)
    fp = target.fingerprint()
    run_dir, base = _start_run_dir(args, ctx, cat, target, fp, source, duration, suite_dir)
    done = _execute(args, ctx, cat, target, fp, run_dir, base, duration, suite_dir, binaries, up)
    run, run_results, exit_code = _assemble_run(args, ctx, cat, base, done)
    return _write_and_report(run, run_dir, base, run_results, exit_code)


def _run_options(args, cat) -> tuple[int | None, dict]:
    """Checks the options of `run` (UsageError, one line); returns the stress duration and the
    kernel source's description."""
    from cvmconf import results
    _validate_filters(args, cat)
    for name in ("duration", "test_timeout", "idle_timeout"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.retry_failed < 0 or args.batch_size < 1 or args.jobs < 1:
        raise UsageError("--retry-failed must be >= 0, --batch-size and --jobs >= 1")
    if args.origin and not results.ORIGIN_RE.match(args.origin):
        raise UsageError(f"--origin {args.origin!r}: must match [a-z0-9_]+ (KCIDB origin)")
    source = {"message_id": args.message_id, "tree_name": args.tree_name,
              "git_repository_url": args.git_url, "git_commit_hash": args.git_commit,
              "git_repository_branch": args.git_branch, "patch_files": args.patch or []}
    source["patchset_hash"] = results.patchset_hash(source["patch_files"])
    duration = args.duration
    if duration is None and os.environ.get("CVMCONF_DURATION", "").isdigit():
        duration = int(os.environ["CVMCONF_DURATION"])
    if args.lock_wait < 0:
        raise UsageError("--lock-wait must be >= 0")
    if args.run_id and not re.match(r"^[A-Za-z0-9._-]+$", args.run_id):
        raise UsageError(f"--run-id {args.run_id!r}: use letters, digits, '.', '_' and '-'")
    return duration, source


def _open_target(args, ctx: dict):
    """Creates the target (ctx["target"], closed by cmd_run on every path); on the local host
    also takes the run lock and prepares debugfs, both put back by the cleanup."""
    from cvmconf import sysstate, targets
    target = targets.create(args.target, build_dir=_build_dir(args), **_target_options(args))
    ctx["target"] = target
    if args.target == "local":
        # One run at a time on this kernel: the runs' pools, settings and kernel-log lines would
        # mix. Taken before anything runs (the probe mounts debugfs; the snapshot must be ours).
        lock = sysstate.RunLock(args.run_id or "(unnamed)", args.lock_wait,
                                lambda m: print(m, file=sys.stderr, flush=True))
        try:
            lock.acquire()
        except sysstate.LockBusy as e:
            raise UsageError(str(e)) from None
        except OSError as e:
            raise UsageError(f"cannot take the run lock {lock.path}: {e.strerror or e}") from None
        ctx["run_lock"] = lock
        if os.geteuid() == 0:
            ctx["debugfs"] = sysstate.DebugfsMount()
            ctx.setdefault("cleanups", []).append(
                lambda: ctx["debugfs"] and ctx["debugfs"].restore())
    return target


def _start_run_dir(args, ctx: dict, cat, target, fp: dict, source: dict, duration,
                   suite_dir: Path) -> tuple[Path, dict]:
    """Creates results/<run-id>/ with a run.json that marks the run incomplete until the end;
    returns the directory and that first run.json (the base of the final one)."""
    from cvmconf import results
    started = results.now_iso()
    run_id = args.run_id or _run_id(fp)
    results_root = Path(args.results_dir) if args.results_dir else REPO / "results"
    run_dir = results_root / run_id
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise UsageError(f"{run_dir} already exists") from None
    except OSError as e:
        raise UsageError(f"cannot create {run_dir}: {e.strerror}") from None
    ctx["run_dir"] = run_dir

    origin = args.origin or results.DEFAULT_ORIGIN
    checkout, build = results.checkout_and_build(fp, origin, source, started)
    options = {"k": args.k, "requirement": args.requirement or [], "family": args.family or [],
               "filter": args.filter, "duration": duration, "test_timeout": args.test_timeout,
               "idle_timeout": args.idle_timeout, "retry_failed": args.retry_failed,
               "batch_size": args.batch_size, "jobs": args.jobs, "target": args.target,
               "suite_dir": str(suite_dir), "selection": _selection_text(args)}
    base = {
        "format": results.FORMAT, "format_version": results.FORMAT_VERSION, "run_id": run_id,
        "complete": False,
        "incomplete_reason": "the run did not finish (still running, or the runner was killed)",
        "started": started, "finished": None, "command": sys.argv, "options": options,
        "target": target.describe(), "fingerprint": fp, "checkout": checkout, "build": build,
        "harness": {"version": _harness_version(), "catalogue": cat.path,
                    "catalogue_sha256": _file_sha256(cat.path)},
        "seeds": cat.seed_titles, "summary": {}, "requirements": [], "tests": [],
        "batches": [], "problems": [],
    }
    try:
        results.write_json(run_dir / "run.json", base)  # marks the directory incomplete until the end
    except OSError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UsageError(f"cannot write {run_dir / 'run.json'}: {e.strerror or e}") from None
    return run_dir, base


def _execute(args, ctx: dict, cat, target, fp: dict, run_dir: Path, base: dict, duration,
             suite_dir: Path, binaries, up: dict | None) -> _Execution:
    """Runs the selected tests (pytest session, executor batches) and the upstream selftests,
    then cleans up (_cleanup_run) on every path, a signal included."""
    from cvmconf import executor as ex
    from cvmconf import results, sysstate
    from cvmconf.progress import Progress
    stopper: Stopper = ctx["stopper"]

    def mark_stopped_at_once() -> None:   # the hard exit: say so in run.json (small, atomic)
        results.write_json(run_dir / "run.json", {
            **base, "incomplete_reason": f"stopped at once by a second "
                                         f"{stopper.first_signal() or 'signal'} while cleaning up"})

    progress = Progress()
    if not fp.get("kmsg", {}).get("readable"):
        progress.note(f"cvmconf: kernel log not watched: {fp.get('kmsg', {}).get('error')}")
    opts = ex.Options(test_timeout=args.test_timeout, idle_timeout=args.idle_timeout,
                      duration=duration, batch_size=args.batch_size,
                      retry_failed=args.retry_failed, jobs=args.jobs)
    guard = sysstate.StateGuard(target.state_access(), where=args.target)
    ctx["guard"] = guard
    executor = ex.Executor(target, opts, progress, record=_saver(run_dir), state=guard)
    stopper.hooks += [guard.emergency_restore, mark_stopped_at_once,
                      lambda: ctx.get("debugfs") and ctx["debugfs"].restore()]
    _, _, plugin = _collect(args, cat, target, executor)
    plugin.progress = progress
    interrupted = False
    rc = None
    system_state: dict = {}
    try:
        if binaries:
            rc = _pytest_session(args, plugin, suite_dir, binaries, collect_only=False)
        else:
            rc = 0   # nothing to run here (e.g. suites not built for a VM's architecture)
        interrupted = rc == 2
        if up is not None and not interrupted:
            up["results"], up["problems"] = _upstream_run(up, target, run_dir, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        system_state = _cleanup_run(ctx, executor, progress, interrupted)
    return _Execution(rc=rc, interrupted=interrupted, plugin=plugin, executor=executor,
                      binaries=binaries, up=up, system_state=system_state)


def _test_entries(done: _Execution, selected: dict[str, list[str]]):
    """run.json's test entries of the selected tests (a test without a result: not run), the
    results among them, and how many did not run."""
    from cvmconf import results
    got = done.plugin.all_results()
    run_results: list[gtest.TestResult] = []
    entries: list[dict] = []
    not_run = 0
    not_run_reason = "the run was interrupted" if done.interrupted else "its batch never ran"
    for b in done.binaries:
        listing = done.plugin.listings.get(b.name)
        reqs_here = listing.requirements if listing else {}
        res = got.get(b.name, {})
        for t in selected.get(b.name, []):
            r = res.get(t)
            if r is None:
                not_run += 1
                entries.append(results.not_run_entry(b.name, t, reqs_here.get(t, []),
                                                      f"not run: {not_run_reason}"))
            else:
                run_results.append(r)
                entries.append(results.test_entry(r))
    return entries, run_results, not_run, not_run_reason


def _assemble_run(args, ctx: dict, cat, base: dict, done: _Execution):
    """The final run.json from the execution: test entries, requirement roll-up, problems,
    completeness and verdict. Returns it, the test results and the exit code."""
    from cvmconf import results, rollup
    stopper: Stopper = ctx["stopper"]
    plugin, rc, interrupted, up = done.plugin, done.rc, done.interrupted, done.up
    selected = {name: [i.test for i in items] for name, items in plugin.selected.items()}
    if rc == 5 and not plugin.errors and not any(selected.values()):
        shutil.rmtree(ctx["run_dir"], ignore_errors=True)
        raise UsageError("no test matches the filters" +
                         (f" ({_selection_text(args)})" if _selection_text(args) else ""))

    problems = list(done.executor.problems) + done.system_state.pop("problems")
    for e in plugin.errors:
        problems.append({"batch": "-", "binary": e.split(":", 1)[0], "problem": e})
    if rc not in (0, 1, 2, 5):
        problems.append({"batch": "-", "binary": "-",
                         "problem": f"pytest session ended with status {rc}"})
    entries, run_results, not_run, not_run_reason = _test_entries(done, selected)
    available: dict[str, list[str]] = {}
    for listing in plugin.listings.values():
        for t in listing.tests:
            for rid in listing.requirements.get(t, []):
                available.setdefault(rid, []).append(t)
    sel_names = {t for ts in selected.values() for t in ts}
    notes = [args.suites_note] if getattr(args, "suites_note", None) else []
    reqs = rollup.requirement_results(cat, run_results, available, sel_names,
                                      not_run_reason if not_run else "",
                                      no_suites_reason=notes[0] if notes else "")
    complete = not interrupted and not plugin.errors and not_run == 0 and rc in (0, 1)
    reasons = []
    if interrupted:
        reasons.append(f"interrupted ({stopper.first_signal()})" if stopper.first_signal()
                       else "interrupted")
    if plugin.errors:
        reasons.append("tests of some binaries could not be listed: " + "; ".join(plugin.errors))
    if not_run:
        reasons.append(f"{not_run} selected test(s) did not run")
    if rc not in (0, 1, 2, 5):
        reasons.append(f"the pytest session failed (status {rc})")
    if up is not None:
        problems += up.get("problems", [])
    exit_code, verdict = results.verdict(reqs, entries, complete, problems)
    summary = results.summary(reqs, entries)
    summary.update({"verdict": verdict, "exit_code": exit_code,
                    "exit_meaning": results.EXIT_MEANING[exit_code]})
    run = dict(base)
    run.update({
        "complete": complete, "incomplete_reason": "; ".join(reasons) if not complete else None,
        "finished": results.now_iso(), "summary": summary,
        "target": ctx["target"].describe(),   # again at the end: e.g. how often a VM was rebooted
        "notes": notes,
        "requirements": [r.to_dict() for r in reqs], "tests": entries,
        "batches": [rec.__dict__ for rec in done.executor.batches], "problems": problems,
        "system_state": done.system_state,
    })
    if up is not None:
        from cvmconf import upstream
        run["upstream"] = upstream.section(
            run["requirements"], up.get("results", []), up["tests"], up["built"],
            up.get("problems", []), up.get("batches", []),
            "" if "results" in up else "the upstream selftests did not run: the run was interrupted")
    return run, run_results, exit_code


def _write_and_report(run: dict, run_dir: Path, base: dict, run_results, exit_code: int) -> int:
    """Writes run.json and its renderings, prints the pin coverage and the summary."""
    written = _write_outputs_or_fallback(run, run_dir, base)
    if written != run_dir:
        exit_code = EXIT_HARNESS
    coverage = pincoverage.format_pin_coverage(pincoverage.pin_coverage(run_results))
    if coverage:
        print("\npin coverage (per backing and GUP flavour):")
        print(coverage)
    _print_summary(run, written)
    return exit_code


def _write_outputs_or_fallback(run: dict, run_dir: Path, base: dict) -> Path:
    """Writes run.json and its renderings into run_dir; returns run_dir. When that fails (disk
    full), run_dir keeps a run.json that is whole (the complete one, or a marker saying the run
    is incomplete and where its results went) and no half-written file, the results go to a
    fresh directory under $TMPDIR instead (returned), and the message names both."""
    from cvmconf import results

    def files() -> list[Path]:   # the run directory may be gone (removed under a running run)
        try:
            return list(run_dir.iterdir())
        except OSError:
            return []
    before = {p.name for p in files()}
    try:
        _write_outputs(run, run_dir)
        return run_dir
    except OSError as e:
        why = e.strerror or str(e)
    try:   # run.json is written first, atomically: is it the whole run?
        run_json_ok = json.loads((run_dir / "run.json").read_text()).get("finished") == \
            run["finished"]
    except (OSError, ValueError):
        run_json_ok = False
    for p in files():    # renderings cut short
        if p.name not in before and p.is_file():
            p.unlink(missing_ok=True)
    try:
        fallback = Path(tempfile.mkdtemp(prefix=f"cvmconf-results-{run['run_id']}-"))
        _write_outputs(run, fallback)
    except OSError as e2:
        print(f"cvmconf: could not write the results to {run_dir} ({why}) nor to a temporary "
              f"directory ({e2.strerror or e2}); run.json there says the run is incomplete",
              file=sys.stderr)
        raise HarnessError(f"results not written: {why}") from None
    if not run_json_ok:
        try:
            results.write_json(run_dir / "run.json", {
                **base, "incomplete_reason": f"the results could not be written here ({why}); "
                                             f"they are in {fallback}"})
        except OSError:
            pass    # the marker written at the start stays: incomplete, never truncated
    print(f"cvmconf: could not write the results to {run_dir} ({why}); they were written to "
          f"{fallback} instead", file=sys.stderr)
    return fallback


def _upstream_prepare(args, target) -> dict | None:
    """--upstream: builds (or finds) the mapped upstream selftests for the target's architecture
    and puts them where the target runs programs."""
    if not getattr(args, "upstream", False):
        if getattr(args, "upstream_source", None):
            raise UsageError("--upstream-source needs --upstream")
        return None
    from cvmconf import upstream
    from cvmconf.qemu.vm import HOST_ARCH
    arch = getattr(target, "arch", HOST_ARCH)
    tests = upstream.load_map()
    built = upstream.build(args.upstream_source, arch=arch, tests=tests)
    target.add_upstream(built.root)
    return {"tests": tests, "built": built, "arch": arch}


def _upstream_run(up: dict, target, run_dir: Path, progress):
    from cvmconf import upstream
    progress.total = (progress.total or 0) + len(up["tests"])
    save = _saver(run_dir)
    up["batches"] = []

    def record(out, rec):
        save(out, rec)
        up["batches"].append(rec.__dict__)
    return upstream.run(target, up["tests"], up["built"], up["arch"], record=record,
                        progress=progress)


def _print_summary(run: dict, run_dir: Path) -> None:
    from cvmconf import report, results
    s = run["summary"]
    print()
    print(f"cvmconf: {s['verdict']}")
    if not run["complete"]:
        print(f"cvmconf: INCOMPLETE RUN: {run['incomplete_reason']}")
    for a in results.advice(run):
        print(f"  note: {a['text']}")
        if a.get("command"):
            print(f"    {a['command']}")
    ro = ", ".join(f"{v} {k}" for k, v in s["requirement_outcomes"].items())
    print(f"  requirements: {s['requirements']} ({ro}); {s['requirements_exercised']} exercised")
    to = ", ".join(f"{v} {k}" for k, v in s["test_outcomes"].items())
    print(f"  tests: {s['tests']} ({to})" + (f", {s['flaky']} flaky" if s["flaky"] else ""))
    groups = report.not_exercised_groups(run)
    if groups:
        print("  not exercised, by reason:")
        shown = 6
        for g in groups[:shown]:
            ids = [rid for rid, _ in g["requirements"]]
            print(f"    {len(ids)} requirement{'s' if len(ids) != 1 else ''} "
                  f"({', '.join(ids[:8])}{', ...' if len(ids) > 8 else ''}):")
            for why in g["reasons"]:
                print(f"      {why}")
        if len(groups) > shown:
            print(f"    {len(groups) - shown} more reason group(s): see report.md")
    for t in run["tests"]:
        p = t.get("properties") or {}
        if "ops_per_sec" in p:
            print(f"  throughput: {t['name']}: {p['ops_per_sec']} ops/s"
                  + (f" over {p['iterations']} iterations" if p.get("iterations") else ""))
    st = run.get("system_state") or {}
    for r in st.get("restored", []):
        print(f"  restored{' ' + r['where'] if r['where'] != 'local' else ''}: {r['setting']} "
              f"{r['found']} -> {r['before']}" + ("" if r["restored"] else " FAILED")
              + f" ({', '.join(r['tests']) or ', '.join(r['batches'])}: {r['cause']})")
    for m in st.get("mounts", []):
        print(f"  {m}")
    for p in run["problems"]:
        print(f"  harness problem: {p['batch']} {p['binary']}: {p['problem']}")
    if run.get("upstream"):
        u = run["upstream"]["summary"]
        uo = ", ".join(f"{v} {k}" for k, v in u["outcomes"].items())
        ag = ", ".join(f"{v} {k}" for k, v in u["agreement"].items())
        print(f"  upstream selftests: {u['results']} results ({uo}); {u['requirements']} mapped "
              f"requirements ({ag})")
        for d in run["upstream"]["disagreements"]:
            print(f"  cvmconf and upstream disagree on {d['id']}: {d['why']}")
    try:
        shown_dir = run_dir.relative_to(Path.cwd())
    except ValueError:
        shown_dir = run_dir
    print(f"  results: {shown_dir}/ (run.json, junit.xml, results.ktap, report.md, report.html)")


# ---------------------------------------------------------------------------------------------
# compare, export

def cmd_kernel(args) -> int:
    """kernel build: the reference kernel (or a user's tree with the project's fragments)."""
    from cvmconf import refkernel
    from cvmconf.qemu.vm import HOST_ARCH
    built = refkernel.build(args.source, arch=args.arch or HOST_ARCH, flavour=args.flavour,
                            jobs=args.jobs)
    print(built.image)
    return EXIT_OK


def cmd_upstream(args) -> int:
    """upstream build: the kernel's KVM and mm selftests the mapping names, cached."""
    from cvmconf import upstream
    from cvmconf.qemu.vm import HOST_ARCH
    built = upstream.build(args.source, arch=args.arch or HOST_ARCH)
    for p in built.meta["programs"]:
        print(built.root / "upstream" / p)
    return EXIT_OK


def cmd_compare(args) -> int:
    from cvmconf import compare, results
    base = results.load(args.base)
    new = results.load(args.new)
    diff = compare.compare(base, new)
    compare.write(diff, args.markdown, args.json)
    if args.format == "json":
        sys.stdout.write(compare.render_json(diff))
    else:
        sys.stdout.write(compare.render_markdown(diff))
    return EXIT_NONCONFORMANCE if diff["regression"] else EXIT_OK


def cmd_export(args) -> int:
    from cvmconf import kcidb, results
    if not args.kcidb:
        raise UsageError("export: say which format (--kcidb)")
    run = results.load(args.run_dir)
    try:
        data = kcidb.export(run, args.origin)
    except kcidb.KcidbError as e:
        raise UsageError(f"KCIDB export: {e}") from None
    text = json.dumps(data, indent=1) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output) if args.output else Path(args.run_dir) / "kcidb.json"
    out.write_text(text, encoding="utf-8")
    print(f"cvmconf: wrote {out} ({len(data['tests'])} tests, KCIDB v{data['version']['major']}."
          f"{data['version']['minor']})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------

def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", metavar="EXPR",
                   help="pytest keyword expression over test names, requirement IDs and families")
    p.add_argument("--requirement", action="append", metavar="ID",
                   help="only tests that check this requirement (repeatable)")
    p.add_argument("--family", action="append", metavar="NAME",
                   help="only tests of this catalogue family (repeatable)")
    p.add_argument("--filter", metavar="GTEST_FILTER",
                   help="GoogleTest-style filter on test names ('POS:POS-NEG:NEG')")
    p.add_argument("--target", default="local", choices=("local", "qemu"),
                   help="where the suites run (default: local)")
    q = p.add_argument_group("QEMU target (--target qemu)")
    q.add_argument("--kernel", metavar="KERNEL",
                   help="kernel to boot: 'ref' (the project's reference kernel, built when "
                        "missing; the default), an image path, debian:SUITE/PACKAGE (e.g. "
                        "debian:sid/linux-image-amd64) or a package of the system's apt sources")
    q.add_argument("--modules", metavar="DIR_OR_DEB",
                   help="the kernel's modules: a directory holding lib/modules/<release>/, a "
                        "lib/modules/<release> directory, or a .deb")
    q.add_argument("--arch", choices=("x86_64", "arm64"), help="guest architecture (default: host)")
    q.add_argument("--append", metavar="ARGS", help="extra kernel command-line arguments")
    q.add_argument("--pkvm", action="store_true", default=None,
                   help="arm64: boot the kernel as a pKVM host (kvm-arm.mode=protected)")
    q.add_argument("--accel", choices=("kvm", "tcg"),
                   help="QEMU accelerator (default: kvm when it can run a full kernel here, else tcg)")
    q.add_argument("--max-reboots", type=int, metavar="N",
                   help="times a crashed guest is booted again before the rest is given up (default 3)")
    q.add_argument("--boot-timeout", type=float, metavar="S",
                   help="seconds the guest may take to boot (default 300)")
    q.add_argument("--memory", type=int, metavar="MB",
                   help="guest memory (default 2048); the 1 GiB hugetlb pin cases want 6144 with "
                        "--append 'hugepagesz=1G hugepages=2'")


def _add_run_options(r: argparse.ArgumentParser) -> None:
    """The options of `run`: selection, budgets and limits, where results go, KCIDB metadata."""
    _add_selection(r)
    r.add_argument("--duration", type=int, metavar="S",
                   help="stress budget in seconds for stress tests (CVMCONF_DURATION)")
    r.add_argument("--test-timeout", type=float, default=300.0, metavar="S",
                   help="seconds one test may run, plus 2x --duration (default 300)")
    r.add_argument("--idle-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a binary may run with no test running (default 120)")
    r.add_argument("--retry-failed", type=int, default=0, metavar="N",
                   help="re-run failing tests up to N times to mark flaky ones")
    r.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="tests per batch before a binary is sharded (default 256)")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="batches run at the same time (default 1: kernel-log lines stay "
                        "attributable to one test)")
    r.add_argument("--results-dir", help="where run directories go (default: results/)")
    r.add_argument("--run-id", help="name of the run directory (default: time-kernel-random)")
    r.add_argument("--message-id", help="Message-ID of the patch series under test (KCIDB)")
    r.add_argument("--patch", action="append", metavar="FILE",
                   help="a patch of the series, in order (for KCIDB's patchset_hash)")
    r.add_argument("--tree-name", help="kernel tree name, e.g. mainline, kvm-next (KCIDB)")
    r.add_argument("--git-url", help="kernel git repository URL (KCIDB)")
    r.add_argument("--git-commit", help="kernel commit hash (KCIDB)")
    r.add_argument("--git-branch", help="kernel branch (KCIDB)")
    r.add_argument("--origin", help="KCIDB origin (default: cvmconf)")
    r.add_argument("--lock-wait", type=float, default=3600.0, metavar="S",
                   help="seconds to wait for another cvmconf run on this kernel (local target) "
                        "to finish before giving up with exit 2 (default 3600)")
    r.add_argument("--upstream", action="store_true",
                   help="also run the kernel's own KVM and mm selftests (suites/upstream-map.yaml) "
                        "and report them per requirement beside cvmconf's outcome")
    r.add_argument("--upstream-source", metavar="SPEC_OR_DIR",
                   help="where the upstream selftests are built from (default: the reference "
                        "source; give your kernel tree to test your tree's selftests)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvmconf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-dir", help="build tree (default: ./build or $CVMCONF_BUILD_DIR)")
    p.add_argument("--catalogue", help="requirement catalogue (default: suites/requirements.yaml)")
    p.add_argument("--suite-dir", help="directory of cvm_suite_* binaries (default: BUILD/suites)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the conformance suites and write results/<run-id>/")
    _add_run_options(r)
    r.set_defaults(func=cmd_run)

    l = sub.add_parser("list", help="list tests and requirements without running anything")
    _add_selection(l)
    l.set_defaults(func=cmd_list)

    c = sub.add_parser("check-catalogue",
                       help="check that the catalogue and the tests' requirement IDs agree")
    c.add_argument("--seeds-dir", help="also check that cited seed files exist there")
    c.add_argument("--upstream-map", metavar="FILE",
                   help="upstream selftest mapping to check (default: suites/upstream-map.yaml)")
    c.add_argument("--upstream-source", metavar="DIR",
                   help="kernel tree whose selftest makefiles must build the mapped upstream "
                        "tests (default: the unpacked reference source, else the cached build)")
    c.set_defaults(func=cmd_check_catalogue)

    def source_and_arch(parser, arch_help):
        parser.add_argument("--source", metavar="SPEC_OR_DIR",
                            help="debian:SUITE/linux-source-X.Y or a kernel tree (default: the "
                                 "pinned reference source)")
        parser.add_argument("--arch", choices=("x86_64", "arm64"), help=arch_help)

    u = sub.add_parser("upstream", help="the kernel's own KVM and mm selftests")
    usub = u.add_subparsers(dest="upstream_command", required=True)
    ub = usub.add_parser("build", help="build (or find in the cache) the upstream selftests "
                                       "suites/upstream-map.yaml names; prints their paths")
    source_and_arch(ub, "architecture (default: host)")
    ub.set_defaults(func=cmd_upstream)

    k = sub.add_parser("kernel", help="the reference kernel")
    ksub = k.add_subparsers(dest="kernel_command", required=True)
    kb = ksub.add_parser("build", help="build (or find in the cache) a kernel with the project's "
                                       "config fragments; prints the image path")
    source_and_arch(kb, "kernel architecture (default: host)")
    kb.add_argument("--flavour", choices=("ref", "debug"), default="ref",
                    help="ref (default) or debug (adds lockdep and KASAN)")
    kb.add_argument("--jobs", type=int, metavar="N", help="make -j (default: number of CPUs)")
    kb.set_defaults(func=cmd_kernel)

    cp = sub.add_parser("compare", help="compare two result directories (BASE, NEW)")
    cp.add_argument("base", help="results/<run-id> of the baseline run")
    cp.add_argument("new", help="results/<run-id> of the run to judge")
    cp.add_argument("--format", choices=("markdown", "json"), default="markdown",
                    help="what to print on stdout (default markdown)")
    cp.add_argument("--markdown", metavar="FILE", help="also write the Markdown here")
    cp.add_argument("--json", metavar="FILE", help="also write the JSON here")
    cp.set_defaults(func=cmd_compare)

    e = sub.add_parser("export", help="export a run (KCIDB)")
    e.add_argument("--kcidb", action="store_true", help="KernelCI KCIDB v5 JSON")
    e.add_argument("run_dir", help="results/<run-id>")
    e.add_argument("-o", "--output", help="output file (default RUN_DIR/kcidb.json; '-' = stdout)")
    e.add_argument("--origin", help="KCIDB origin (default: the run's, cvmconf)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CvmconfError as e:
        print(f"cvmconf: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cvmconf: interrupted", file=sys.stderr)
        return EXIT_HARNESS
    except BrokenPipeError:
        return EXIT_OK

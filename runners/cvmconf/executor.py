"""Runs the selected tests of suite binaries through a target, in batches, and turns the raw batch
outputs into per-test results. Target-independent: a target only executes BatchPlans.

A batch that crashes, hangs or exits without its report does not lose the tests that finished:
their results come from the event stream; the test that was running becomes ERROR (crash, exit)
or TIMEOUT (its timeout expired) with the exit status, the tail of its output and the kernel-log
lines logged while it ran; the rest of the batch is run again in a new batch. A batch in which no
test made progress ends the chain (its tests become ERROR with the batch's evidence).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import signal as signal_mod
import threading
from typing import Callable, Protocol

from cvmconf import events, gtest, sysstate
from cvmconf.gtest import BAD, ERROR, FAIL, PASS, TIMEOUT, TestResult
from cvmconf.kmsg import KernelLine
from cvmconf.targets.base import (KILLED_BATCH_TIMEOUT, KILLED_IDLE_TIMEOUT, KILLED_INTERRUPTED,
                                  KILLED_TEST_TIMEOUT, BatchOutput, BatchPlan, SuiteBinary, Target)

OUTPUT_EVIDENCE_CHARS = 6000       # output tail kept as a broken test's evidence
KERNEL_LOG_SLACK_US = 50_000       # printk and CLOCK_MONOTONIC differ by a few ms
MAX_KERNEL_LINES = 200


@dataclasses.dataclass
class Options:
    test_timeout: float = 300.0     # seconds per test (plus 2x duration for stress budgets)
    idle_timeout: float = 120.0     # seconds with no test running (start-up, teardown)
    duration: int | None = None     # stress budget in seconds (CVMCONF_DURATION)
    batch_size: int = 256           # tests per batch before a binary is sharded
    retry_failed: int = 0           # re-runs of FAIL/ERROR/TIMEOUT tests to spot flaky ones
    jobs: int = 1                   # batches run at the same time

    def effective_test_timeout(self) -> float:
        return self.test_timeout + 2.0 * (self.duration or 0)

    def batch_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.duration is not None:
            env["CVMCONF_DURATION"] = str(self.duration)
        return env


class Progress(Protocol):
    def batch_started(self, plan: BatchPlan) -> None: ...
    def test_started(self, binary: str, test: str) -> None: ...
    def test_done(self, result: TestResult, retry: int = 0) -> None: ...


@dataclasses.dataclass
class BatchRecord:
    """What run.json keeps about each batch."""
    label: str
    binary: str
    filter: str
    shard: list[int] | None
    tests: int
    started: str
    duration: float
    exit: str
    killed: str | None
    problems: list[str]
    command: str


def describe_signal(sig: int) -> str:
    try:
        return f"{signal_mod.Signals(sig).name} (signal {sig})"
    except ValueError:
        return f"signal {sig}"


def describe_exit(out: BatchOutput) -> str:
    if out.launch_error:
        return out.launch_error
    parts = []
    if out.target_failure:
        parts.append(out.target_failure)
    if out.killed == KILLED_TEST_TIMEOUT:
        parts.append(f"killed by the runner: test {out.killed_test} exceeded its "
                     f"{out.plan.test_timeout:g} s timeout")
    elif out.killed == KILLED_IDLE_TIMEOUT:
        parts.append(f"killed by the runner: no test running for {out.plan.idle_timeout:g} s "
                     f"(hung in start-up or teardown)")
    elif out.killed == KILLED_BATCH_TIMEOUT:
        parts.append(f"killed by the runner: batch exceeded {out.plan.batch_timeout:g} s")
    elif out.killed == KILLED_INTERRUPTED:
        parts.append("killed by the runner: interrupted")
    if out.signal is not None and not out.killed:
        parts.append(f"killed by {describe_signal(out.signal)}")
    elif out.exit_code is not None:
        parts.append(f"exited with status {out.exit_code}")
    elif out.signal is None and out.exit_code is None and not out.killed and \
            not out.target_failure:
        parts.append("exit status unknown")
    return "; ".join(parts)


def gtest_filter(tests: list[str], all_tests: list[str]) -> str:
    """A --gtest_filter selecting exactly `tests` among `all_tests` (the binary's runnable tests):
    '*' for all, '*-A:B' when excluding is shorter, else 'A:B:C'."""
    chosen = set(tests)
    if chosen == set(all_tests):
        return "*"
    excluded = [t for t in all_tests if t not in chosen]
    if len(excluded) < len(tests):
        return "*-" + ":".join(excluded)
    return ":".join(tests)


def output_since_start(output: str, test: str) -> str:
    """The part of a batch's output from the test's "[ RUN      ] test" line on, bounded."""
    marker = f"[ RUN      ] {test}"
    i = output.rfind(marker)
    text = output[i:] if i >= 0 else output
    if len(text) > OUTPUT_EVIDENCE_CHARS:
        text = "[...]\n" + text[-OUTPUT_EVIDENCE_CHARS:]
    return text


def kernel_lines_since(lines: list[KernelLine], start_us: int | None) -> list[str]:
    if start_us is not None:
        lines = [l for l in lines if l.usec >= start_us - KERNEL_LOG_SLACK_US]
    rendered = [l.render() for l in lines]
    if len(rendered) > MAX_KERNEL_LINES:
        rendered = rendered[:MAX_KERNEL_LINES // 2] + ["[...]"] + rendered[-MAX_KERNEL_LINES // 2:]
    return rendered


@dataclasses.dataclass
class Interpretation:
    results: dict[str, TestResult]          # finished and broken tests of this batch
    problems: list[str]                     # harness-level problems (exit 3)
    interrupted: bool = False


def interpret(out: BatchOutput, requirements: dict[str, list[str]]) -> Interpretation:
    """Turns one batch output into results for the tests it finished or broke."""
    plan = out.plan
    binary = plan.binary.name
    expected = set(plan.tests)
    problems: list[str] = []
    exit_text = describe_exit(out)

    report = None
    if out.report_json is not None:
        try:
            report = gtest.parse_report_text(out.report_json, binary)
        except gtest.ReportError as e:
            problems.append(f"unreadable GoogleTest report: {e}")
    state = None
    try:
        state = events.parse(out.events)
    except events.EventStreamError as e:
        problems.append(f"unreadable event stream: {e}")

    results: dict[str, TestResult] = {}
    clean_exit = (not out.launch_error and not out.killed and out.exit_code in (0, 1))
    if report is not None and clean_exit:
        for r in report:
            if r.name in expected:
                results[r.name] = r
            else:
                problems.append(f"report lists {r.name}, which the batch was not meant to run")
        missing = [t for t in plan.tests if t not in results]
        for t in missing:
            results[t] = TestResult(
                name=t, binary=binary, outcome=ERROR,
                messages=[f"not in the report of its batch ({exit_text}): it did not run"],
                evidence={"exit": exit_text, "batch_command": plan.command_line()})
        # A harness ERROR is a failed GoogleTest assertion too: both make the binary exit 1.
        failed = any(r.outcome in (FAIL, ERROR) for r in results.values())
        if out.exit_code == 1 and not failed:
            problems.append("exited with status 1 although no test failed")
        elif out.exit_code == 0 and failed:
            problems.append("exited with status 0 although a test failed")
    else:
        # The binary died, hung, or left no readable report: the event stream tells which tests
        # finished and which one was running.
        if report is not None:
            problems.append(f"{exit_text} after writing its report")
            for r in report:
                if r.name in expected:
                    results[r.name] = r
        if state is not None:
            for name, ev in state.finished.items():
                if name in expected and name not in results:
                    results[name] = events.result_from_end(ev, binary)
                elif name not in expected:
                    problems.append(f"event stream names {name}, which the batch was not meant to run")
            running = state.running
            if out.killed == KILLED_INTERRUPTED:
                return Interpretation(_with_batch(results, plan, requirements), problems, True)
            if running is not None and running in expected and running not in results:
                results[running] = broken_result(out, running, state, exit_text, requirements)
            elif running is None and results and out.launch_error is None:
                # Everything that started also finished, yet the batch broke (start-up, teardown,
                # between tests) or left no report.
                if not state.program_ended or out.exit_code not in (0, 1) or out.killed:
                    problems.append(f"{exit_text} while no test was running")
                elif report is None:
                    problems.append(f"{exit_text} without writing its GoogleTest report")
        elif out.killed == KILLED_INTERRUPTED:
            return Interpretation(_with_batch(results, plan, requirements), problems, True)
    return Interpretation(_with_batch(results, plan, requirements), problems)


def _with_batch(results: dict[str, TestResult], plan: BatchPlan,
                requirements: dict[str, list[str]]) -> dict[str, TestResult]:
    for r in results.values():
        r.batch = plan.label
        if not r.requirements:
            r.requirements = list(requirements.get(r.name, []))
    return results


def broken_result(out: BatchOutput, test: str, state: events.StreamState, exit_text: str,
                  requirements: dict[str, list[str]]) -> TestResult:
    plan = out.plan
    timed_out = out.killed in (KILLED_TEST_TIMEOUT, KILLED_BATCH_TIMEOUT) and \
        out.killed_test in (None, test)
    if timed_out:
        limit = plan.test_timeout if out.killed == KILLED_TEST_TIMEOUT else plan.batch_timeout
        outcome = TIMEOUT
        msg = (f"did not finish within {limit:g} s; the runner killed the process group "
               f"of {plan.binary.name}")
        duration = float(limit)
    else:
        outcome = ERROR
        if out.signal is not None:
            msg = f"crashed: {plan.binary.name} was {exit_text} while this test ran"
        elif out.exit_code is not None:
            msg = (f"{plan.binary.name} {exit_text} while this test ran, without finishing it "
                   f"or writing its report")
        else:
            msg = f"did not finish: {exit_text}"
        duration = 0.0
    evidence = {"exit": exit_text, "batch_command": plan.command_line(),
                "output_tail": output_since_start(out.output, test)}
    if out.premature_exit:
        evidence["premature_exit"] = "GoogleTest's premature-exit file was left behind"
    if out.kernel_log_error:
        evidence["kernel_log"] = f"unavailable: {out.kernel_log_error}"
    return TestResult(
        name=test, binary=plan.binary.name, outcome=outcome, duration=duration,
        requirements=list(requirements.get(test, [])), messages=[msg],
        kernel_log=kernel_lines_since(out.kernel_log, state.started_us.get(test)),
        evidence=evidence, start_time=out.started)


def no_progress_result(out: BatchOutput, test: str, exit_text: str, problems: list[str],
                       requirements: dict[str, list[str]]) -> TestResult:
    why = "; ".join(problems) if problems else "no test started"
    return TestResult(
        name=test, binary=out.plan.binary.name, outcome=ERROR,
        requirements=list(requirements.get(test, [])),
        messages=[f"not run: its batch made no progress ({exit_text}; {why})"],
        kernel_log=kernel_lines_since(out.kernel_log, None),
        evidence={"exit": exit_text, "batch_command": out.plan.command_line(),
                  "output_tail": output_since_start(out.output, "")},
        batch=out.plan.label, start_time=out.started)


def batch_end(out: BatchOutput, plan: BatchPlan) -> sysstate.BatchEnd:
    """How a batch ended, for the system-state guard: broken or not, and which test ran."""
    clean = (not out.launch_error and not out.killed and not out.target_failure
             and out.exit_code in (0, 1) and out.report_json is not None)
    running: list[str] = []
    if not clean:
        if out.killed_test:
            running = [out.killed_test]
        else:
            try:
                r = events.parse(out.events).running
                running = [r] if r else []
            except events.EventStreamError:
                pass
    return sysstate.BatchEnd(plan.label, plan.binary.name, not clean, running,
                             describe_exit(out))


class Executor:
    """Runs batches for many binaries (optionally several at a time) and keeps every result."""

    def __init__(self, target: Target, options: Options, progress: Progress | None = None,
                 record: Callable[[BatchOutput, BatchRecord], None] | None = None,
                 state: sysstate.StateGuard | None = None):
        self.target = target
        self.state = state           # snapshots system-wide settings around batches, restores
        self.options = options
        self.progress = progress
        self.record = record
        self.batches: list[BatchRecord] = []
        self.problems: list[dict] = []      # {"batch", "binary", "problem"}
        self.interrupted = False
        self._lock = threading.Lock()
        self._counter = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs))

    # -- planning -------------------------------------------------------------------------------

    def _label(self, binary: SuiteBinary, suffix: str = "") -> str:
        with self._lock:
            self._counter += 1
            return f"{self._counter:03d}-{gtest.family_of(binary.name)}{suffix}"

    def _plan(self, binary: SuiteBinary, tests: list[str], all_tests: list[str],
              shard: tuple[int, int] | None, suffix: str = "", flt: str | None = None) -> BatchPlan:
        o = self.options
        per_test = o.effective_test_timeout()
        n = len(tests)
        return BatchPlan(
            binary=binary, label=self._label(binary, suffix), tests=list(tests),
            gtest_filter=flt if flt is not None else gtest_filter(tests, all_tests),
            shard=shard, env=o.batch_env(), test_timeout=per_test, idle_timeout=o.idle_timeout,
            batch_timeout=o.idle_timeout + n * per_test)

    def submit(self, binary: SuiteBinary, selected: list[str], all_tests: list[str],
               requirements: dict[str, list[str]]) -> list[concurrent.futures.Future]:
        """Starts running `selected` (in listing order) of one binary; each future resolves to
        {test: TestResult}."""
        n = len(selected)
        shards = max(1, math.ceil(n / max(1, self.options.batch_size)))
        futures = []
        if shards == 1:
            futures.append(self._pool.submit(self._guarded, binary, selected, all_tests, None,
                                             requirements))
        else:
            flt = gtest_filter(selected, all_tests)
            for i in range(shards):
                futures.append(self._pool.submit(self._guarded, binary, selected[i::shards],
                                                 all_tests, (i, shards), requirements, flt))
        return futures

    def _guarded(self, binary: SuiteBinary, *args) -> dict[str, TestResult]:
        """A bug in the runner must not lose the run: it becomes a harness problem."""
        if self.interrupted:
            return {}
        try:
            return self._chain(binary, *args)
        except Exception as e:
            with self._lock:
                self.problems.append({"batch": "-", "binary": binary.name,
                                      "problem": f"runner error: {e.__class__.__name__}: {e}"})
            return {}

    def shutdown(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)

    def interrupt(self) -> None:
        self.interrupted = True
        self.target.abort.set()

    # -- execution ------------------------------------------------------------------------------

    def _run_plan(self, plan: BatchPlan, announced: set[str], retry: int) -> BatchOutput:
        if self.progress:
            self.progress.batch_started(plan)

        def on_event(ev: dict) -> None:
            if not self.progress:
                return
            if ev["event"] == "start":
                self.progress.test_started(plan.binary.name, ev["test"])
            elif ev["event"] == "end" and ev["test"] in plan.tests and ev["test"] not in announced:
                announced.add(ev["test"])
                self.progress.test_done(events.result_from_end(ev, plan.binary.name), retry)

        try:
            return self.target.run_batch(plan, on_event)
        except Exception as e:  # a target bug must not lose the run
            return BatchOutput(plan=plan, launch_error=f"target {self.target.kind} failed: "
                                                      f"{e.__class__.__name__}: {e}")

    def _execute(self, plan: BatchPlan, requirements: dict[str, list[str]], announced: set[str],
                 retry: int = 0) -> tuple[dict[str, TestResult], bool, bool]:
        """Runs one batch; returns (results, progressed, interrupted)."""
        out: BatchOutput | None = None
        if self.state:
            self.state.before()
        try:
            out = self._run_plan(plan, announced, retry)
        finally:
            if self.state:
                # Even when the runner itself is interrupted here: what the batch changed goes back.
                self.state.after(batch_end(out, plan) if out is not None else sysstate.BatchEnd(
                    plan.label, plan.binary.name, True, [], "the runner was interrupted"))
        it = interpret(out, requirements)
        exit_text = describe_exit(out)
        progressed = bool(it.results)
        if not progressed and not it.interrupted:
            for t in plan.tests:
                it.results[t] = no_progress_result(out, t, exit_text, it.problems, requirements)
            it.problems.append(f"no test made progress ({exit_text})")
        rec = BatchRecord(label=plan.label, binary=plan.binary.name, filter=plan.gtest_filter,
                          shard=list(plan.shard) if plan.shard else None, tests=len(plan.tests),
                          started=out.started, duration=round(out.duration, 3), exit=exit_text,
                          killed=out.killed, problems=list(it.problems),
                          command=plan.command_line())
        with self._lock:
            self.batches.append(rec)
            for p in it.problems:
                self.problems.append({"batch": plan.label, "binary": plan.binary.name,
                                      "problem": p})
        if self.record:
            try:
                self.record(out, rec)
            except OSError as e:   # disk full: the results stay in memory for run.json
                with self._lock:
                    self.problems.append({"batch": plan.label, "binary": plan.binary.name,
                                          "problem": f"could not save the batch's files: "
                                                     f"{e.strerror or e}"})
        if self.progress:
            for t in plan.tests:
                r = it.results.get(t)
                if r is not None and t not in announced:
                    announced.add(t)
                    self.progress.test_done(r, retry)
        return it.results, progressed, it.interrupted

    def _run_until_done(self, binary: SuiteBinary, all_tests: list[str], first: BatchPlan,
                        requirements: dict[str, list[str]], retry: int,
                        suffix: str) -> dict[str, TestResult]:
        results: dict[str, TestResult] = {}
        announced: set[str] = set()
        plan = first
        while True:
            got, progressed, interrupted = self._execute(plan, requirements, announced, retry)
            results.update(got)
            if interrupted or self.interrupted or not progressed:
                break
            rest = [t for t in plan.tests if t not in results]
            if not rest:
                break
            # The batch broke: run the rest of it again, excluding what finished or broke.
            plan = self._plan(binary, rest, all_tests, None, suffix + "-rest")
        return results

    def _chain(self, binary: SuiteBinary, tests: list[str], all_tests: list[str],
               shard: tuple[int, int] | None, requirements: dict[str, list[str]],
               flt: str | None = None) -> dict[str, TestResult]:
        suffix = f"-shard{shard[0]}of{shard[1]}" if shard else ""
        first = self._plan(binary, tests, all_tests, shard, suffix, flt)
        results = self._run_until_done(binary, all_tests, first, requirements, 0, suffix)
        for k in range(1, self.options.retry_failed + 1):
            if self.interrupted:
                break
            again = [t for t in tests if t in results and results[t].outcome in BAD
                     and not results[t].flaky]
            if not again:
                break
            plan = self._plan(binary, again, all_tests, None, f"{suffix}-retry{k}")
            got = self._run_until_done(binary, all_tests, plan, requirements, k,
                                       f"{suffix}-retry{k}")
            for t in again:
                r = got.get(t)
                if r is None:
                    continue
                first_result = results[t]
                first_result.attempts.append({
                    "retry": k, "outcome": r.outcome, "duration": r.duration,
                    "messages": r.messages[:3], "batch": r.batch})
                if r.outcome == PASS:
                    first_result.flaky = True
        return results

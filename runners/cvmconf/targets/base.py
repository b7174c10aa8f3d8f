"""The target interface: where suite binaries run (this host, a QEMU guest, a libvirt domain).

A target executes *batch plans* (data: which binary, which GoogleTest filter or shard, which
environment, which timeouts) and hands back *raw batch outputs* (GoogleTest JSON text, event
stream text, output tail, kernel-log lines, exit status, why it was killed). Everything after that
(crash attribution, re-running the rest of a broken batch, outcomes, reports) is target-independent
and lives in cvmconf.executor and the report modules, so a new target plugs in by implementing the
methods below and nothing else. See ARCHITECTURE.md, "Runner".
"""
from __future__ import annotations

import abc
import dataclasses
import threading
from pathlib import Path
from typing import Callable

from cvmconf import gtest
from cvmconf.kmsg import KernelLine


@dataclasses.dataclass
class SuiteBinary:
    name: str          # e.g. cvm_suite_gmem_mmap
    host_path: Path    # where it was built on the host (a target may copy it elsewhere)


@dataclasses.dataclass
class BatchPlan:
    """One process of one suite binary."""
    binary: SuiteBinary
    label: str                       # unique in the run, e.g. "003-gmem_mmap"
    tests: list[str]                 # the tests this batch is expected to run, in order
    gtest_filter: str                # --gtest_filter value
    shard: tuple[int, int] | None    # (GTEST_SHARD_INDEX, GTEST_TOTAL_SHARDS), or None
    env: dict[str, str]              # extra environment (CVMCONF_DURATION, ...)
    test_timeout: float              # seconds one test may run (from its start event)
    idle_timeout: float              # seconds the binary may run with no test running
    batch_timeout: float             # seconds for the whole process (group)
    args: list[str] | None = None    # a non-GoogleTest program's arguments ("{report}": where it
                                     # writes the output the target brings back whole)

    def command_line(self) -> str:
        """How a developer re-runs this batch by hand (for reports)."""
        env = " ".join(f"{k}={v}" for k, v in sorted(self.env.items()))
        if self.args is not None:
            return f"{env + ' ' if env else ''}{self.binary.name} {' '.join(self.args)}"
        shard = (f"GTEST_SHARD_INDEX={self.shard[0]} GTEST_TOTAL_SHARDS={self.shard[1]} "
                 if self.shard else "")
        return f"{env + ' ' if env else ''}{shard}{self.binary.name} --gtest_filter='{self.gtest_filter}'"

    def gtest_args(self, report: str) -> list[str]:
        """The binary's arguments: the filter, and where GoogleTest writes its JSON report."""
        if self.args is not None:
            return [report if a == "{report}" else a for a in self.args]
        return [f"--gtest_filter={self.gtest_filter}", f"--gtest_output=json:{report}"]

    def gtest_env(self, events: str, premature: str) -> dict[str, str]:
        """The variables the batch's process gets (on top of what a target passes on): the plan's
        own, where the event stream and GoogleTest's premature-exit file go, no colour, and the
        shard."""
        env = dict(self.env)
        env["CVMCONF_EVENTS"] = events
        env["TEST_PREMATURE_EXIT_FILE"] = premature
        env["GTEST_COLOR"] = "no"
        if self.shard:
            env["GTEST_SHARD_INDEX"] = str(self.shard[0])
            env["GTEST_TOTAL_SHARDS"] = str(self.shard[1])
        return env


KILLED_TEST_TIMEOUT = "test-timeout"
KILLED_IDLE_TIMEOUT = "idle-timeout"
KILLED_BATCH_TIMEOUT = "batch-timeout"
KILLED_INTERRUPTED = "interrupted"


@dataclasses.dataclass
class BatchOutput:
    """What a target hands back for a plan: raw material, nothing interpreted."""
    plan: BatchPlan
    started: str = ""                    # ISO 8601 wall clock
    duration: float = 0.0                # seconds
    exit_code: int | None = None         # when the process exited by itself
    signal: int | None = None            # when a signal ended it
    launch_error: str | None = None      # the process could not be started at all
    target_failure: str | None = None    # the target itself failed under the process (a VM's
                                         # kernel died): no exit status exists
    killed: str | None = None            # KILLED_* when the target killed the process group
    killed_test: str | None = None       # the test whose timeout expired (test-timeout)
    report_json: str | None = None       # GoogleTest --gtest_output=json text, None if absent
    events: str = ""                     # event stream text ($CVMCONF_EVENTS), "" if none
    output: str = ""                     # tail of stdout+stderr
    kernel_log: list[KernelLine] = dataclasses.field(default_factory=list)
    kernel_log_error: str | None = None  # why kernel-log lines are unavailable
    kernel_log_lost: int = 0             # records overwritten before they were read
    premature_exit: bool | None = None   # GoogleTest's TEST_PREMATURE_EXIT_FILE was left behind


class Watchdog:
    """When a target kills a running batch, the same for every target. Fed the batch's events as
    they arrive (a start event starts the test's clock, an end event the idle clock), check()
    decides, in this order: interrupted (abort is set), the running test exceeded the plan's
    test_timeout, no test has run for idle_timeout, the whole batch exceeded batch_timeout. It
    records the decision in the BatchOutput (killed, killed_test) and returns it. Times are
    time.monotonic() values."""

    def __init__(self, out: BatchOutput, abort: threading.Event, started: float,
                 idle_since: float | None = None):
        self.out = out
        self.abort = abort
        self.started = started
        self.running: str | None = None           # the test started and not yet ended
        self.running_since: float | None = None
        self.idle_since = started if idle_since is None else idle_since

    def feed(self, ev: dict, now: float) -> None:
        if ev["event"] == "start":
            self.running = ev["test"]
            self.running_since = now
        elif ev["event"] == "end":
            self.running = None
            self.running_since = None
            self.idle_since = now

    def check(self, now: float) -> str | None:
        out, plan, running = self.out, self.out.plan, self.running
        if self.abort.is_set():
            out.killed = KILLED_INTERRUPTED
        elif running is not None and self.running_since is not None and \
                now - self.running_since > plan.test_timeout:
            out.killed, out.killed_test = KILLED_TEST_TIMEOUT, running
        elif running is None and now - self.idle_since > plan.idle_timeout:
            out.killed = KILLED_IDLE_TIMEOUT
        elif now - self.started > plan.batch_timeout:
            out.killed, out.killed_test = KILLED_BATCH_TIMEOUT, running
        return out.killed


# Called by a target for every event it sees while a batch runs (for live progress), with the
# parsed event dict (cvmconf.events). Targets that cannot stream may never call it.
EventCallback = Callable[[dict], None]


class Target(abc.ABC):
    """Where suite binaries run."""

    kind: str = "?"

    def __init__(self):
        self.abort = threading.Event()   # set to stop running batches (Ctrl-C)

    @abc.abstractmethod
    def check(self) -> None:
        """Raises cvmconf.errors.UsageError (one line) when the target cannot run suites at all,
        e.g. KVM is missing there."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """The environment the suites run in: see cvmconf.fingerprint.build()."""

    @abc.abstractmethod
    def list_suite(self, binary: SuiteBinary) -> gtest.SuiteListing:
        """The binary's tests in execution order and their requirement IDs, from one run of
        the binary with --cvm_list_requirements (gtest.parse_listing)."""

    @abc.abstractmethod
    def run_batch(self, plan: BatchPlan, on_event: EventCallback | None = None) -> BatchOutput:
        """Runs one batch to completion (or until a timeout or self.abort), enforcing the plan's
        timeouts on the whole process group. Never raises for a failing or crashing binary: that
        is described in the returned BatchOutput."""

    def default_suite_dir(self) -> Path | None:
        """Where this target's suite binaries are, when not the build tree's suites/ (a VM target
        of another architecture uses its cross build)."""
        return None

    def suites_missing_reason(self, suite_dir: Path) -> str | None:
        """When suite_dir has no suite binaries: the reason if that is an expected state of this
        target (reported as a note and as the requirements' reason), None if it is an error."""
        return None

    def state_access(self):
        """Where the system-wide settings the suites may change live (cvmconf.sysstate.Access),
        so the runner can snapshot them before a batch and restore them after it; None when
        this target has none to watch."""
        return None

    def add_upstream(self, root: Path) -> None:
        """Makes the upstream selftests built under root (bin/cvm-upstream, upstream/...) runnable
        there; before check(). The local target runs them where they were built."""

    def close(self) -> None:
        """Releases the target (shuts a VM down, removes its temporary files). Called on every
        exit path of a run, also after check() or a boot failed."""

    def describe(self) -> dict:
        """Short description for run.json ("target")."""
        return {"kind": self.kind}

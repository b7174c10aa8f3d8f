"""The local target: suite binaries run on this host, each batch in its own session (process
group), watched through its event stream and /dev/kmsg."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from cvmconf import events, fingerprint, gtest, kmsg
from cvmconf.results import now_iso
from cvmconf.targets.base import (BatchOutput, BatchPlan, EventCallback, SuiteBinary, Target,
                                  Watchdog)

POLL_INTERVAL = 0.05          # seconds between looks at the event stream and the kernel log
OUTPUT_TAIL_BYTES = 256 * 1024
KILL_GRACE = 10.0             # seconds to wait for a SIGKILLed group (a task stuck in the kernel)


def batch_environment(plan: BatchPlan, events_path: str, premature_path: str) -> dict[str, str]:
    """The process environment for a batch: inherited, minus anything that would change what
    GoogleTest runs or where it reports, plus the plan's variables (BatchPlan.gtest_env)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GTEST_") and k not in ("CVMCONF_EVENTS", "TEST_PREMATURE_EXIT_FILE")}
    env.update(plan.gtest_env(events_path, premature_path))
    return env


def _read_tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if size > limit:
        text = text.split("\n", 1)[-1]
    return text


def _exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it (its pid, and so its process group id,
    stays reserved until we kill the rest of the group)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class LocalTarget(Target):
    kind = "local"

    def __init__(self, build_dir: str | os.PathLike, kmsg_path: str | None = None):
        super().__init__()
        self.build_dir = Path(build_dir)
        self.kmsg_path = kmsg_path
        self._probe: dict | None = None

    def probe(self) -> dict:
        if self._probe is None:
            self._probe = gtest.probe(self.build_dir)
        return self._probe

    def check(self) -> None:
        gtest.require_kvm(self.probe())

    def fingerprint(self) -> dict:
        ok, why = kmsg.probe_readable(self.kmsg_path)
        return fingerprint.local(self.probe(), ok, why)

    def list_tests(self, binary: SuiteBinary) -> list[str]:
        return gtest.list_tests(binary.host_path)

    def list_requirements(self, binary: SuiteBinary) -> dict[str, list[str]]:
        return gtest.list_requirements(binary.host_path)

    def describe(self) -> dict:
        return {"kind": self.kind, "build_dir": str(self.build_dir)}

    def run_batch(self, plan: BatchPlan, on_event: EventCallback | None = None) -> BatchOutput:
        work = Path(tempfile.mkdtemp(prefix=f"cvmconf-{plan.label}-"))
        try:
            return self._run(plan, on_event, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run(self, plan: BatchPlan, on_event: EventCallback | None, work: Path) -> BatchOutput:
        out = BatchOutput(plan=plan, started=now_iso("milliseconds"))
        report = work / "report.json"
        events_path = work / "events.jsonl"
        premature = work / "premature-exit"
        log_path = work / "output.log"
        cmd = [str(plan.binary.host_path), *plan.gtest_args(str(report))]
        env = batch_environment(plan, str(events_path), str(premature))
        watcher = kmsg.KmsgReader(self.kmsg_path)
        out.kernel_log_error = watcher.error
        t0 = time.monotonic()
        try:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, env=env, cwd=work,
                                        start_new_session=True)
        except OSError as e:
            watcher.close()
            out.launch_error = f"cannot start {plan.binary.name}: {e.strerror or e}"
            out.duration = time.monotonic() - t0
            return out
        reader = events.LiveReader(events_path)
        watchdog = Watchdog(out, self.abort, started=t0)
        try:
            while True:
                exited = _exited(proc.pid)
                now = time.monotonic()
                for ev in reader.poll():
                    watchdog.feed(ev, now)
                    if on_event:
                        on_event(ev)
                out.kernel_log += watcher.drain()
                if exited:
                    break
                if watchdog.check(now):
                    break
                time.sleep(POLL_INTERVAL)
        finally:
            # Kill whatever is left of the group (the binary when it timed out, or children it
            # left behind), then reap it.
            _killpg(proc.pid)
            try:
                status = proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                status = None
                out.output = (f"cvmconf: {plan.binary.name} (pid {proc.pid}) did not die within "
                              f"{KILL_GRACE:.0f} s of SIGKILL (stuck in the kernel?)\n")
        out.duration = time.monotonic() - t0
        if status is not None:
            if status < 0:
                out.signal = -status
            else:
                out.exit_code = status
        for ev in reader.poll():
            if on_event:
                on_event(ev)
        out.kernel_log += watcher.drain()
        out.kernel_log_lost = watcher.lost
        if watcher.error and not out.kernel_log_error:
            out.kernel_log_error = watcher.error
        watcher.close()
        try:
            out.events = events_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            out.events = ""
        try:
            out.report_json = report.read_text(encoding="utf-8", errors="replace")
        except OSError:
            out.report_json = None
        out.premature_exit = premature.exists()
        out.output += _read_tail(log_path, OUTPUT_TAIL_BYTES)
        return out

"""The local target: suite binaries run on this host, each batch in its own session (process
group, started through cvmconf.procs so it dies with the runner), watched through its event
stream and /dev/kmsg. Its output goes through a pipe into a bounded buffer: a binary that floods
stdout costs neither memory nor disk."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cvmconf import events, fingerprint, gtest, kmsg, procs, sysstate
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


class OutputTail:
    """The last `limit` bytes of a stream, read by a thread as fast as the writer writes (so a
    flooding writer never blocks on a full pipe, and nothing but the tail is kept)."""

    def __init__(self, stream, limit: int = OUTPUT_TAIL_BYTES):
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0
        self._stream = stream
        self._thread = threading.Thread(target=self._read, name="cvmconf-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self._stream.read1(1 << 16)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            self.data += chunk
            if len(self.data) > 2 * self.limit:
                cut = len(self.data) - self.limit
                del self.data[:cut]
                self.dropped += cut

    def finish(self, timeout: float = 2.0) -> str:
        """Waits for the end of the stream (at most timeout: a descendant that escaped the
        process group may hold the pipe open) and returns the tail as text."""
        self._thread.join(timeout)
        try:
            self._stream.close()
        except OSError:
            pass
        data = bytes(self.data[-self.limit:])
        dropped = self.dropped + len(self.data) - len(data)
        text = data.decode("utf-8", "replace")
        if dropped:
            text = (f"[cvmconf: {dropped} bytes of earlier output dropped]\n"
                    + text.split("\n", 1)[-1])
        return text


def _exited(pid: int) -> bool:
    """Whether the process has exited, without reaping it (its pid, and so its process group id,
    stays reserved until we kill the rest of the group)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


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

    def list_suite(self, binary: SuiteBinary) -> gtest.SuiteListing:
        return gtest.list_suite(binary.host_path)

    def describe(self) -> dict:
        return {"kind": self.kind, "build_dir": str(self.build_dir)}

    def state_access(self):
        return sysstate.LocalAccess()

    def run_batch(self, plan: BatchPlan, on_event: EventCallback | None = None) -> BatchOutput:
        work = Path(tempfile.mkdtemp(prefix=f"cvmconf-{plan.label}-"))
        procs.track_path(work, f"work directory of batch {plan.label}")
        try:
            return self._run(plan, on_event, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            procs.untrack_path(work)

    def _run(self, plan: BatchPlan, on_event: EventCallback | None, work: Path) -> BatchOutput:
        out = BatchOutput(plan=plan, started=now_iso("milliseconds"))
        report = work / "report.json"
        events_path = work / "events.jsonl"
        premature = work / "premature-exit"
        cmd = [str(plan.binary.host_path), *plan.gtest_args(str(report))]
        env = batch_environment(plan, str(events_path), str(premature))
        watcher = kmsg.KmsgReader(self.kmsg_path)
        out.kernel_log_error = watcher.error
        t0 = time.monotonic()
        try:
            proc = procs.spawn(cmd, f"{plan.binary.name} (batch {plan.label})",
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=env, cwd=work)
        except OSError as e:
            watcher.close()
            out.launch_error = f"cannot start {plan.binary.name}: {e.strerror or e}"
            out.duration = time.monotonic() - t0
            return out
        tail = OutputTail(proc.stdout)
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
            procs.killpg(proc.pid)
            try:
                status = proc.wait(timeout=KILL_GRACE)
                procs.release(proc)
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
        out.output += tail.finish()
        return out

"""A QEMU guest running cvm-agent: boot with a timeout, run batches, detect guest kernel crashes.

Channels: the serial console goes to a file (boot diagnostics, panic detection); the agent
talks JSON lines over a virtio-serial port ("cvmconf.agent") connected to a unix socket this
process listens on; the guest's init reports the agent's exit over a second port
("cvmconf.status"). A QEMU exit status of 0 alone never counts as success: only the agent's
messages do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import selectors
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from cvmconf.errors import HarnessError, UsageError
from cvmconf.kmsg import KernelLine
from cvmconf import procs
from cvmconf.qemu import cpustate

AGENT_PORT = "cvmconf.agent"
EVENTS_PORT = "cvmconf.events"   # suite binaries' event lines, written directly (see gtest_support)
KILL_ANSWER = 30.0   # seconds the agent has to report a killed batch before the guest is wedged
STATUS_PORT = "cvmconf.status"   # the guest's init reports the agent's exit (initramfs.INIT)
# This host's architecture in cvmconf's (and Debian's kernel) naming: x86_64, arm64, ...
HOST_ARCH = {"x86_64": "x86_64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)

# Console lines that mean the guest kernel is broken. A panic ends the guest (panic=-1 and
# -no-reboot make QEMU exit); an oops or BUG may leave it running but the test that was running
# when it appeared is attributed the crash.
CRASH_RE = re.compile(r"Kernel panic - not syncing|\bOops\b|^\[[ 0-9.]+\] BUG: |"
                      r"general protection fault|Unable to handle kernel", re.MULTILINE)
PANIC_RE = re.compile(r"Kernel panic - not syncing.*")


class BootError(HarnessError):
    pass


@dataclasses.dataclass
class BatchOutcome:
    exit: int | None = None
    signal: int | None = None
    timed_out: bool = False
    output_tail: str = ""
    report: str | None = None
    events: list[str] = dataclasses.field(default_factory=list)
    kmsg: list[KernelLine] = dataclasses.field(default_factory=list)
    guest_crashed: bool = False    # the guest kernel died (panic) or became unreachable
    crash_lines: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    cpu_state: str = ""            # where the vCPUs of a guest that stopped answering were


def host_has_hw_virt() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE))


def choose_accel(arch: str, requested: str | None = None) -> str:
    """kvm when it can run a full guest kernel here, else tcg. A paravirtual KVM without
    VMX/SVM (like this project's development hosts) only runs tiny payloads: use tcg."""
    if requested:
        if requested not in ("kvm", "tcg"):
            raise UsageError(f"--accel must be kvm or tcg, not {requested}")
        return requested
    if HOST_ARCH == arch and os.access("/dev/kvm", os.R_OK | os.W_OK):
        if arch == "arm64" or host_has_hw_virt():
            return "kvm"
    return "tcg"


# Guest memory. The memfd hugetlb 1 GiB pin cases (PIN-001..003) need two 1 GiB pages: each
# takes 60-120 s under TCG (clearing and copying 1 GiB), so by default the guest is too small
# for them and they SKIP naming the pool; `--append "hugepagesz=1G hugepages=2"` with a bigger
# guest runs them (measured on the reference kernel: they PASS).
GUEST_MEMORY_MB = {"x86_64": 2048, "arm64": 2048}

# The emulated CPU of arm64 TCG guests: a Cortex-A76 (ARMv8.2 with EL2 and VHE, 40-bit physical
# addresses, no pointer authentication). With "max" (48-bit and wider physical addresses) every
# VM a pKVM host destroyed cost 10-40 s of guest CPU: pKVM sizes each VM's IPA space to the CPU's
# PARange whatever the VMM asks for (7.2 kvm_init_ipa_range), and tearing the VM down walks that
# space in 1 GiB steps (stage2_destroy_range), 2^18 steps at 48 bits, each one slow under TCG.
# At 40 bits it is 2^10 steps. Pointer authentication (QARMA) is slow under TCG as well.
ARM64_TCG_CPU = "cortex-a76"


def qemu_command(arch: str, image: Path, initrd: Path, agent_sock: Path, status_file: Path,
                 console_file: Path, accel: str, append: str = "", pkvm: bool = False,
                 memory_mb: int | None = None, smp: int = 2, events_file: Path | None = None,
                 qmp_sock: Path | None = None) -> list[str]:
    common_append = "panic=-1 loglevel=7 printk.devkmsg=on"
    if arch == "x86_64":
        # Single-threaded TCG for x86 guests: with multi-threaded TCG, a guest kernel patching
        # text with int3 (static keys flipped when KVM loads/creates a VM) was seen to leave
        # every vCPU looping in exc_int3 for good (3 to 13 runs in); with thread=single 200
        # runs in a row had no stall and took the same time.
        cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=single" if accel == "tcg" else accel,
               # max: SVM for nested KVM; pdpe1gb: 1 GiB pages, for the memfd hugetlb 1 GiB
               # backing of the R/O long-term pin cases (PIN-001..003)
               "-cpu", "host" if accel == "kvm" else "max,pdpe1gb=on",
               "-machine", "q35"]
        # 1 GiB hugetlb pages: the guest has pdpe1gb and 6 GiB, but finds at most one free GiB
        # at run time; `--append "hugepagesz=1G hugepages=2"` reserves two at boot for the memfd
        # hugetlb 1 GiB pin cases, each of which then takes 60-120 s under TCG (clearing and
        # copying 1 GiB pages), so the default run leaves them to that option.
        console = "console=ttyS0"
    elif arch == "arm64":
        cmd = ["qemu-system-aarch64", "-accel", accel,
               "-machine", "virt,virtualization=on,gic-version=3" if accel == "tcg" else "virt,gic-version=3",
               "-cpu", ARM64_TCG_CPU if accel == "tcg" else "host"]
        console = "console=ttyAMA0"
        if pkvm:
            common_append += " kvm-arm.mode=protected"
    else:
        raise UsageError(f"unsupported --arch {arch}")
    cmd += ["-m", str(memory_mb or GUEST_MEMORY_MB[arch]), "-smp", str(smp), "-nodefaults", "-no-reboot",
            "-display", "none", "-nic", "none",
            "-serial", f"file:{console_file}",
            "-kernel", str(image), "-initrd", str(initrd),
            "-append", " ".join(x for x in (console, common_append, append) if x),
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={agent_sock},server=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
            "-chardev", f"file,id=status,path={status_file}",
            "-device", f"virtserialport,chardev=status,name={STATUS_PORT}"]
    if events_file is not None:
        cmd += ["-chardev", f"file,id=events,path={events_file}",
                "-device", f"virtserialport,chardev=events,name={EVENTS_PORT}"]
    if qmp_sock is not None:   # read vCPU registers of a wedged guest (cpustate)
        cmd += ["-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    return cmd


class QemuVm:
    def __init__(self, arch: str, image: Path, initrd: Path, workdir: Path, accel: str,
                 append: str = "", pkvm: bool = False, boot_timeout: float = 300.0,
                 memory_mb: int | None = None, smp: int = 2):
        self.arch, self.image, self.initrd, self.workdir = arch, image, initrd, workdir
        self.accel, self.append, self.pkvm = accel, append, pkvm
        self.boot_timeout, self.memory_mb, self.smp = boot_timeout, memory_mb, smp
        self.proc: subprocess.Popen | None = None
        self.conn: socket.socket | None = None
        self.hello: dict | None = None
        self.boots = 0
        self._buf = b""
        self._eof = False
        self._next_id = 1
        self.symbols: cpustate.Symbols | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    # --- files -------------------------------------------------------------------------------
    @property
    def console_file(self) -> Path:
        return self.workdir / f"console-{self.boots}.log"

    @property
    def status_file(self) -> Path:
        return self.workdir / f"status-{self.boots}.log"

    @property
    def events_file(self) -> Path:
        return self.workdir / f"events-{self.boots}.log"

    @property
    def qmp_sock(self) -> Path:
        return self.workdir / f"qmp-{os.getpid()}-{self.boots}.sock"

    def cpu_state(self) -> str:
        """Where each vCPU is, sampled a few times over QMP and named with the guest's symbols;
        '' when QEMU is gone or does not answer."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        return cpustate.sample(self.qmp_sock, self.arch, self.symbols)

    def last_batch_events(self) -> list[str]:
        """Event lines the suite binaries wrote straight to the events port, from the last
        program_start on: the batch that was running when the guest died."""
        try:
            lines = self.events_file.read_text(errors="replace").split("\n")
        except OSError:
            return []
        complete = [l for l in lines[:-1] if l.strip()]
        start = max((i for i, l in enumerate(complete) if '"program_start"' in l), default=None)
        return complete[start:] if start is not None else []

    def console_text(self) -> str:
        try:
            return self.console_file.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def crash_lines(self) -> list[str]:
        text = self.console_text()
        out = []
        for m in CRASH_RE.finditer(text):
            line_start = text.rfind("\n", 0, m.start()) + 1
            line_end = text.find("\n", m.end())
            out.append(text[line_start:line_end if line_end >= 0 else None].strip())
        return out

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> dict:
        """Boots the guest and waits for the agent's hello. Raises BootError with the console
        tail on timeout or early exit."""
        self.boots += 1
        sock_path = self.workdir / f"agent-{os.getpid()}-{self.boots}.sock"
        if sock_path.exists():
            sock_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(sock_path))
        listener.listen(1)
        self.qmp_sock.unlink(missing_ok=True)
        cmd = qemu_command(self.arch, self.image, self.initrd, sock_path, self.status_file,
                           self.console_file, self.accel, self.append, self.pkvm,
                           self.memory_mb, self.smp, events_file=self.events_file,
                           qmp_sock=self.qmp_sock)
        (self.workdir / f"qemu-cmd-{self.boots}.txt").write_text(" ".join(cmd) + "\n")
        try:
            # Its own session and the parent-death signal (procs): it never outlives the runner.
            with open(self.workdir / f"qemu-{self.boots}.log", "w") as log:
                self.proc = procs.spawn(cmd, f"{cmd[0]} (boot {self.boots})",
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        except FileNotFoundError:
            listener.close()
            raise UsageError(f"{cmd[0]} is not installed (Debian package "
                             f"{'qemu-system-x86' if self.arch == 'x86_64' else 'qemu-system-arm'})") from None
        deadline = time.monotonic() + self.boot_timeout
        listener.settimeout(1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise BootError(self._boot_failure(f"QEMU exited with status {self.proc.returncode} "
                                                       "before the agent connected"))
                if time.monotonic() > deadline:
                    raise BootError(self._boot_failure(f"no agent connection within {self.boot_timeout:.0f} s"))
                try:
                    self.conn, _ = listener.accept()
                    break
                except socket.timeout:
                    continue
        finally:
            listener.close()
            sock_path.unlink(missing_ok=True)
        self._buf = b""
        self._eof = False
        self.hello = None
        while self.hello is None:
            msg = self._recv(deadline)
            if msg is None:
                raise BootError(self._boot_failure(f"the guest did not say hello within {self.boot_timeout:.0f} s"))
            if "hello" in msg:
                self.hello = msg
        # The guest's symbols now, while it answers: a wedged guest's PCs are named with them.
        self.symbols = cpustate.Symbols(self.read("/proc/kallsyms") or "")
        return self.hello

    def _boot_failure(self, why: str) -> str:
        self.kill()
        tail = self.console_tail(15)
        crash = self.crash_lines()
        detail = f"; guest kernel: {crash[0]}" if crash else ""
        return f"boot failed: {why}{detail} (console: {self.console_file}" + (
            ")\n--- console tail ---\n" + tail if tail else ", empty)")

    def kill(self) -> None:
        self.qmp_sock.unlink(missing_ok=True)
        if self.conn:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None
        if self.proc and self.proc.poll() is None:
            procs.killpg(self.proc.pid)
            self.proc.wait(timeout=30)
        if self.proc and self.proc.poll() is not None:
            procs.release(self.proc)

    def shutdown(self, timeout: float = 30.0) -> str | None:
        """Asks the agent to power off; returns the status-channel line, if any."""
        if self.conn:
            try:
                self._send({"op": "poweroff"})
                self._recv(time.monotonic() + timeout)  # {"bye": 1}
            except OSError:
                pass
        if self.proc:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        try:
            return self.status_file.read_text().strip() or None
        except OSError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.conn is not None

    # --- protocol ------------------------------------------------------------------------------
    def _send(self, obj: dict) -> None:
        assert self.conn is not None
        self.conn.sendall((json.dumps(obj) + "\n").encode())

    def _recv(self, deadline: float) -> dict | None:
        """Next message, or None if the guest went away or the deadline passed."""
        assert self.conn is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sel = selectors.DefaultSelector()
            sel.register(self.conn, selectors.EVENT_READ)
            ready = sel.select(timeout=min(left, 1.0))
            sel.close()
            if not ready:
                if self.proc is not None and self.proc.poll() is not None:
                    return None
                continue
            try:
                chunk = self.conn.recv(65536)
            except OSError:
                self._eof = True
                return None
            if not chunk:
                self._eof = True
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            return {"error": "malformed agent message"}
        return msg if isinstance(msg, dict) else {"error": "malformed agent message"}

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600.0,
            events: str = "", report: str = "",
            on_event: Callable[[str], None] | None = None,
            should_kill: Callable[[], str | None] | None = None,
            output_max: int | None = None) -> BatchOutcome:
        """Runs one batch in the guest. Never raises for guest failures: a dead guest comes back
        as guest_crashed with the console's crash lines."""
        out = BatchOutcome()
        if not self.alive():
            out.guest_crashed = True
            out.error = "the guest is not running"
            return out
        rid = self._next_id
        self._next_id += 1
        try:
            cmd = {"op": "run", "id": rid, "argv": argv, "env": env or {}, "cwd": "/",
                   "timeout": timeout, "events": events, "report": report}
            if output_max:
                cmd["output_max"] = output_max
            self._send(cmd)
        except OSError as e:
            out.guest_crashed, out.error = True, f"agent connection lost: {e}"
            return out
        # The agent enforces `timeout` itself; the margin covers a guest too slow or wedged to.
        deadline = time.monotonic() + timeout + 60
        kill_sent = False
        while True:
            if should_kill and not kill_sent and should_kill():
                try:
                    self._send({"op": "kill", "id": rid})
                except OSError:
                    pass
                kill_sent = True
                # A guest that does not answer a kill within KILL_ANSWER seconds is wedged.
                deadline = min(deadline, time.monotonic() + KILL_ANSWER)
            msg = self._recv(min(deadline, time.monotonic() + 0.2))
            if msg is None and time.monotonic() < deadline and self.alive() and \
                    self.proc is not None and self.proc.poll() is None and not self._eof:
                continue  # nothing yet
            if msg is None:
                out.guest_crashed = True
                out.crash_lines = self.crash_lines()
                if kill_sent and time.monotonic() >= deadline:
                    out.error = (f"the guest did not answer a kill within {KILL_ANSWER:.0f} s "
                                 "(wedged)")
                elif time.monotonic() >= deadline:
                    out.timed_out = True
                    out.error = f"the guest did not answer within {timeout + 60:.0f} s"
                else:
                    out.error = "the guest went away (kernel crash or QEMU exit)"
                where = self.cpu_state()
                if where:
                    out.cpu_state = where
                    out.error += f"; {where}"
                self.kill()
                return out
            if msg.get("id") != rid:
                continue
            if "event" in msg:
                out.events.append(msg["event"])
                if on_event:
                    on_event(msg["event"])
            elif "kmsg" in msg:
                out.kmsg.append(KernelLine(int(msg.get("usec", 0)), str(msg["kmsg"])))
            elif msg.get("done"):
                out.exit, out.signal = msg.get("exit"), msg.get("signal")
                out.timed_out = bool(msg.get("timed_out"))
                out.output_tail = msg.get("output_tail", "")
                out.report = msg.get("report")
                out.error = msg.get("error")
                return out

    def read(self, path: str, timeout: float = 60.0) -> str | None:
        rid = self._next_id
        self._next_id += 1
        self._send({"op": "read", "id": rid, "path": path})
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                return None
            if msg.get("id") == rid:
                return msg.get("content")

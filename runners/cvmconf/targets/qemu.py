"""The QEMU target: suite binaries run inside a guest booted from the kernel under test.

The guest boots an initramfs (busybox-static, cvm-agent, the statically linked suite binaries,
the kernel's KVM and virtio modules); cvm-agent runs each batch and streams its event lines and
kernel-log records back over virtio-serial, so when the guest kernel dies the runner knows which
test was running. A dead guest is booted again (at most max_reboots times) and the executor
re-runs the rest of the batch there. Everything after run_batch (outcomes, reports) is shared
with the local target.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from cvmconf import events, fingerprint, gtest, refkernel, sysstate
from cvmconf.errors import HarnessError, UsageError
from cvmconf.kmsg import KernelLine
from cvmconf.qemu import initramfs, kernel, vm
from cvmconf.qemu.vm import HOST_ARCH
from cvmconf.results import now_iso
from cvmconf.targets.base import (BatchOutput, BatchPlan, EventCallback, SuiteBinary, Target,
                                  Watchdog)

CONSOLE_LINE_RE = re.compile(r"^\[\s*(\d+)\.(\d{1,6})\]\s?(.*)$")
GUEST_BIN = "/cvmconf/bin"
LISTING_MAX = 64 << 20   # test lists and probe output come back whole


def cross_build_dir(build_dir: Path, arch: str) -> Path:
    """Where the binaries for arch are built: the main tree for the host's architecture, a
    cross tree inside it otherwise (the ./cvmconf script builds both)."""
    return build_dir if arch == HOST_ARCH else build_dir / f"cross-{arch}"


def is_static_elf(path: Path) -> bool:
    """True when the ELF file has no program interpreter (statically linked)."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    little = data[5] == 1
    order = "little" if little else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            break
        if int.from_bytes(data[off:off + 4], order) == 3:  # PT_INTERP
            return False
    return True


class GuestAccess:
    """The guest's system-wide settings (cvmconf.sysstate.Access), read and written through the
    agent with the guest's busybox; None/unavailable while no guest runs (a guest that died took
    its state with it, and the next one boots with the defaults). The runner is the only user of
    its guest: no lock."""

    def __init__(self, target: "QemuTarget"):
        self.target = target

    def _vm(self) -> vm.QemuVm | None:
        v = self.target.vm
        return v if v is not None and v.alive() else None

    def read_settings(self) -> dict[str, str] | None:
        v = self._vm()
        if v is None:
            return None
        pats = " ".join(sysstate.PATTERNS)
        script = (f"mountpoint -q {sysstate.DEBUGFS} || "
                  f"mount -t debugfs debugfs {sysstate.DEBUGFS} 2>/dev/null; "
                  f"for f in {pats}; do [ -f \"$f\" ] && v=$(head -n 1 \"$f\" 2>/dev/null) && "
                  "printf '%s\\t%s\\n' \"$f\" \"$v\"; done; exit 0")
        o = v.run(["/bin/busybox", "sh", "-c", script], timeout=60, output_max=LISTING_MAX)
        if o.guest_crashed or o.exit != 0:
            return None
        out = {}
        for line in o.output_tail.splitlines():
            path, sep, value = line.partition("\t")
            if sep:
                out[path] = sysstate.setting_value(value)
        return out

    def write_setting(self, path: str, value: str) -> str | None:
        v = self._vm()
        if v is None:
            return "the guest is not running"
        o = v.run(["/bin/busybox", "sh", "-c", 'printf %s "$2" > "$1"', "sh", path, value],
                  timeout=60)
        if o.guest_crashed or o.exit != 0:
            return f"write {value!r} in the guest: {vm_exit(o)}: {o.output_tail.strip()[-200:]}"
        return None

    def locked(self):
        return contextlib.nullcontext()


def console_kernel_lines(text: str) -> list[KernelLine]:
    """Kernel lines from the serial console (for what the guest printed as it died)."""
    out = []
    for line in text.splitlines():
        m = CONSOLE_LINE_RE.match(line.strip("\r"))
        if m:
            usec = int(m.group(1)) * 1_000_000 + int(m.group(2).ljust(6, "0"))
            out.append(KernelLine(usec, m.group(3)))
    return out


class QemuTarget(Target):
    kind = "qemu"

    def __init__(self, build_dir, kernel: str | None = None, modules: str | None = None,
                 arch: str | None = None, append: str = "", pkvm: bool = False,
                 accel: str | None = None, max_reboots: int = 3, boot_timeout: float = 300.0,
                 suite_dir: str | None = None, memory: int | None = None):
        super().__init__()
        self.arch = arch or HOST_ARCH
        if self.arch not in ("x86_64", "arm64"):
            raise UsageError(f"unsupported --arch {self.arch} (x86_64 or arm64)")
        if pkvm and self.arch != "arm64":
            raise UsageError("--pkvm needs --arch arm64")
        if max_reboots < 0:
            raise UsageError("--max-reboots must be >= 0")
        if memory is not None and memory < 512:
            raise UsageError(f"--memory {memory}: a guest needs at least 512 MB")
        self.memory = memory
        self.main_build = Path(build_dir)
        self.tree = cross_build_dir(self.main_build, self.arch)
        self.kernel_spec, self.modules_spec = kernel, modules
        self.append, self.pkvm = append, pkvm
        self.accel = vm.choose_accel(self.arch, accel)
        self.max_reboots, self.boot_timeout = max_reboots, boot_timeout
        self._suite_dir = Path(suite_dir) if suite_dir else None
        self.cache = refkernel.cache_root()   # downloads and kernels, outside the clone
        self.workdir = self.main_build / "qemu-work" / f"{os.getpid()}"
        self.bundle: kernel.KernelBundle | None = None
        self.initrd: Path | None = None
        self.vm: vm.QemuVm | None = None
        self.reboots = 0
        self._probe: dict | None = None
        self._lists: dict[str, str] = {}
        self.keep_workdir: str | None = None   # why the work directory is kept as evidence
        self.workdir_kept: str | None = None
        self.upstream_root: Path | None = None

    # --- where the binaries are --------------------------------------------------------------
    def suite_dir(self) -> Path:
        return self._suite_dir or self.tree / "suites"

    def default_suite_dir(self) -> Path | None:
        return self.suite_dir()

    def suites_missing_reason(self, suite_dir: Path) -> str | None:
        if self.arch == HOST_ARCH:
            return None
        return (f"the {self.arch} suites are not built ({suite_dir} has no {gtest.SUITE_PREFIX}* "
                f"binaries; build them with './cvmconf build --arch {self.arch}'). Only the "
                f"guest's fingerprint was taken. The {self.arch} guest runtime for payload tests "
                f"does not exist yet.")

    def _binaries(self, suite_binaries: list[Path]) -> list[Path]:
        tools = [self.tree / "bin" / "cvm-agent", self.tree / "bin" / "cvm-probe"]
        for b in tools + suite_binaries:
            if not b.exists():
                raise HarnessError(f"{b} is missing (the ./cvmconf script builds it for --arch {self.arch})")
            if not is_static_elf(b):
                raise UsageError(f"{b} is dynamically linked: the QEMU target needs binaries built "
                                 "with -DCVMCONF_STATIC=ON")
        return tools + suite_binaries

    def add_upstream(self, root: Path) -> None:
        self.upstream_root = Path(root)

    # --- the guest ------------------------------------------------------------------------------
    def _reference_kernel(self, arch: str) -> tuple[Path, Path]:
        """--kernel ref (or none): the project's reference kernel, built when missing."""
        built = refkernel.build(arch=arch, cache=self.cache)
        return built.image, built.config

    def _prepare(self) -> None:
        if self.initrd is not None:
            return
        self.bundle = kernel.resolve(self.kernel_spec, self.arch, self.cache, self.modules_spec,
                                     build_reference=self._reference_kernel)
        suites = sorted(p for p in self.suite_dir().glob(gtest.SUITE_PREFIX + "*")
                        if p.is_file() and os.access(p, os.X_OK)) if self.suite_dir().is_dir() else []
        self.workdir.mkdir(parents=True, exist_ok=True)
        trees = [(self.upstream_root / "bin", "cvmconf/bin"),
                 (self.upstream_root / "upstream", "cvmconf/upstream")] if self.upstream_root else []
        self.initrd = initramfs.build(self.bundle, self._binaries(suites),
                                      self.workdir / "initramfs.cpio", self.cache, trees)

    def _boot(self) -> None:
        self._prepare()
        assert self.bundle and self.initrd
        if self.vm is None:
            self.vm = vm.QemuVm(self.arch, self.bundle.image, self.initrd, self.workdir, self.accel,
                                append=self.append, pkvm=self.pkvm, boot_timeout=self.boot_timeout,
                                memory_mb=self.memory)
        try:
            self.vm.start()
        except vm.BootError as e:
            self.keep_workdir = "the guest failed to boot"
            raise HarnessError(str(e)) from None

    def _ensure_guest(self) -> str | None:
        """Boots the guest if it is not running; returns why it cannot, or None."""
        if self.vm is not None and self.vm.alive():
            return None
        if self.vm is not None:  # it ran before and died: this is a reboot
            if self.reboots >= self.max_reboots:
                return (f"the guest kernel died and was booted again {self.reboots} time(s); "
                        f"--max-reboots {self.max_reboots} reached")
            self.reboots += 1
        try:
            self._boot()
        except HarnessError as e:
            return str(e).splitlines()[0]
        return None

    def _run_simple(self, argv: list[str], timeout: float = 300.0) -> vm.BatchOutcome:
        """Runs a helper command in the guest and returns its whole output."""
        why = self._ensure_guest()
        if why:
            raise HarnessError(why)
        assert self.vm
        return self.vm.run(argv, timeout=timeout, output_max=LISTING_MAX)

    def probe(self) -> dict:
        if self._probe is None:
            o = self._run_simple([f"{GUEST_BIN}/cvm-probe"], timeout=300)
            try:
                self._probe = json.loads(o.output_tail)
            except ValueError:
                raise HarnessError(f"cvm-probe in the guest printed no JSON ({vm_exit(o)})") from None
        return self._probe

    # --- Target ----------------------------------------------------------------------------------
    def check(self) -> None:
        self._boot()   # UsageError for bad input, HarnessError (with the console tail) otherwise
        p = self.probe()
        if not p.get("kvm_available"):
            raise UsageError(f"KVM unavailable in the guest (kernel {self.vm.hello.get('kernel')}): "
                             f"{p.get('kvm_error', 'unknown error')}")

    def fingerprint(self) -> dict:
        assert self.vm is not None and self.bundle is not None
        rel = self.vm.hello.get("kernel", "")
        ver = self._run_simple(["/bin/busybox", "uname", "-v"]).output_tail.strip()
        cpuinfo = self.vm.read("/proc/cpuinfo") or ""
        nproc = self._run_simple(["/bin/busybox", "nproc"]).output_tail.strip()
        sizes = [int(m) for m in re.findall(r"hugepages-(\d+)kB",
                                            self._run_simple(["/bin/busybox", "ls", "/sys/kernel/mm/hugepages"]).output_tail)]
        sha = source = err = None
        cfg = self.bundle.config
        if cfg and cfg.is_file():
            sha = hashlib.sha256(cfg.read_bytes()).hexdigest()
            source = "reference kernel build" if self.bundle.source == "ref" else f"package ({cfg.name})"
        else:
            o = self._run_simple(["/bin/busybox", "sh", "-c", "zcat /proc/config.gz | sha256sum"])
            m = re.match(r"^([0-9a-f]{64})\s", o.output_tail)
            if m:
                sha, source = m.group(1), "/proc/config.gz (guest)"
            else:
                err = "no config in the kernel package and no /proc/config.gz in the guest"
        return fingerprint.build(
            probe=self.probe(), kernel_release=rel, kernel_version=ver, arch=self.vm.hello.get("arch", self.arch),
            cpuinfo=cpuinfo, cpus=int(nproc) if nproc.isdigit() else None, config_sha256=sha,
            config_source=source, config_error=err, hugetlb_sizes_kib=sizes, kmsg_readable=True,
            kmsg_error="", extra={"qemu": self.describe()})

    def describe(self) -> dict:
        d = {"kind": self.kind, "arch": self.arch, "accel": self.accel, "kernel": self.kernel_spec or "ref",
             "pkvm": self.pkvm, "reboots": self.reboots, "max_reboots": self.max_reboots}
        if self.bundle:
            d["kernel_image"] = str(self.bundle.image)
            d["kernel_release_from_modules"] = self.bundle.release
            if self.bundle.packages:
                d["kernel_packages"] = self.bundle.packages
        if self.modules_spec:
            d["modules"] = self.modules_spec
        if self.append:
            d["append"] = self.append
        d["workdir"] = str(self.workdir)
        if self.workdir_kept:
            d["workdir_kept"] = self.workdir_kept
        return d

    def _list(self, binary: SuiteBinary, flag: str) -> str:
        key = f"{binary.name} {flag}"
        if key not in self._lists:
            o = self._run_simple([f"{GUEST_BIN}/{binary.name}", flag], timeout=120)
            if o.exit != 0:
                raise HarnessError(f"{binary.name} {flag} in the guest: {vm_exit(o)}")
            self._lists[key] = o.output_tail
        return self._lists[key]

    def list_suite(self, binary: SuiteBinary) -> gtest.SuiteListing:
        try:
            return gtest.parse_listing(self._list(binary, gtest.LIST_FLAG))
        except gtest.ReportError as e:
            raise HarnessError(f"{binary.name} {gtest.LIST_FLAG} in the guest: {e}") from None

    def run_batch(self, plan: BatchPlan, on_event: EventCallback | None = None) -> BatchOutput:
        out = BatchOutput(plan=plan, started=now_iso("milliseconds"))
        t0 = time.monotonic()
        why = self._ensure_guest()
        if why:
            out.launch_error = why
            return out
        assert self.vm is not None
        report = f"/tmp/{plan.label}.json"
        events_path = f"/tmp/{plan.label}.events"
        premature = f"/tmp/{plan.label}.premature"
        env = plan.gtest_env(events_path, premature)
        env["PATH"] = "/bin:/cvmconf/bin"
        argv = [f"{GUEST_BIN}/{plan.binary.name}", *plan.gtest_args(report)]
        stream = events.LiveState()
        # The batch clock started before the guest was (re)booted; the idle clock starts now.
        watchdog = Watchdog(out, self.abort, started=t0, idle_since=time.monotonic())

        def event(line: str) -> None:
            ev = stream.feed(line)
            if ev is None:
                return
            watchdog.feed(ev, time.monotonic())
            if on_event:
                on_event(ev)

        r = self.vm.run(argv, env=env, timeout=plan.batch_timeout + 30, events=events_path,
                        report=report, on_event=event,
                        should_kill=lambda: watchdog.check(time.monotonic()))
        out.duration = time.monotonic() - t0
        out.events = "\n".join(r.events) + ("\n" if r.events else "")
        out.output = r.output_tail
        out.report_json = r.report
        out.kernel_log = list(r.kmsg)
        out.exit_code, out.signal = r.exit, r.signal
        if r.guest_crashed:
            self.keep_workdir = "the guest died during a batch (its console logs are there)"
            # The suite binary wrote its events straight to the events port too: that copy has
            # the start event of a test that killed the guest before the agent could forward it.
            direct = self.vm.last_batch_events()
            if len(direct) > len(r.events):
                out.events = "\n".join(direct) + "\n"
            # What the guest kernel printed as it died is the evidence; the agent could not send it.
            last = out.kernel_log[-1].usec if out.kernel_log else -1
            out.kernel_log += [l for l in console_kernel_lines(self.vm.console_text()) if l.usec > last]
            if r.crash_lines:
                out.target_failure = f"the guest kernel died ({r.crash_lines[0]})"
            elif r.cpu_state:   # alive but silent: say where its vCPUs were
                out.target_failure = f"the guest stopped answering ({r.error})"
            else:
                out.target_failure = f"the guest kernel died ({r.error or 'the guest went away'})"
            if self.vm.alive():
                self.vm.kill()
        if r.error and not r.guest_crashed:
            out.launch_error = f"cvm-agent: {r.error}"
        if not r.guest_crashed:
            pre = self.vm.read(premature)
            out.premature_exit = pre is not None
        return out

    def state_access(self):
        return GuestAccess(self)

    def close(self) -> None:
        """Shuts the guest down (QEMU is killed if it does not power off) and removes the work
        directory (initramfs, console logs, sockets), unless a guest failed to boot or died:
        then it stays as evidence and describe() names it (workdir_kept)."""
        try:
            if self.vm is not None:
                self.vm.shutdown()
        finally:
            if self.vm is not None:
                self.vm.kill()
            self.vm = None
            if self.workdir.exists():
                if self.keep_workdir:
                    self.workdir_kept = f"{self.workdir} ({self.keep_workdir})"
                else:
                    shutil.rmtree(self.workdir, ignore_errors=True)


def vm_exit(o: vm.BatchOutcome) -> str:
    if o.guest_crashed:
        return o.error or "the guest died"
    if o.signal is not None:
        return f"killed by signal {o.signal}"
    if o.timed_out:
        return "timed out"
    return f"exit status {o.exit}"

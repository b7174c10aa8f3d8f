"""System-wide kernel state a suite may change, snapshotted and restored by the runner.

A suite that grows a hugetlb pool or configures fault injection puts the old values back itself,
but only if it lives to do so: a test killed by SIGKILL, stopped until its timeout, or running in
a guest that went away cannot. So the runner snapshots every such setting before a batch and,
after it, puts back whatever differs (recording what, from which batch and test). Watched:

  - hugetlb pools of every size: nr_hugepages, nr_overcommit_hugepages;
  - THP: enabled, defrag, shmem_enabled, the huge zeropage (use_zero_page), khugepaged's knobs,
    and the per-size (mTHP) enabled/shmem_enabled;
  - fault injection: the failslab and fail_page_alloc debugfs attributes (debugfs is mounted for
    the run when it is not, and unmounted at its end: see DebugfsMount);
  - gup_test has no state that outlives its file descriptor (the pinned set is released when
    the process that opened it dies): nothing to restore.

On the host, cvmconf processes change hugetlb pools only under the flock lock
/run/lock/cvmconf-hugetlb.lock (hostlib SystemLock): snapshots and restores take the same lock,
so they see the pools at rest, never another process's temporarily grown pool. Whole runs on one
kernel are serialised by RunLock (/run/lock/cvmconf-run.lock).

`Access` is where the settings live: LocalAccess reads and writes this host's files (under a
root directory, for tests on a fake sysfs); the QEMU target gives one that goes through the
guest's agent (targets/qemu.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import glob
import os
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

HUGETLB = "/sys/kernel/mm/hugepages"
THP = "/sys/kernel/mm/transparent_hugepage"
DEBUGFS = "/sys/kernel/debug"
FAULT_POINTS = ("failslab", "fail_page_alloc")
FAULT_ATTRS = ("probability", "interval", "times", "space", "verbose", "task-filter",
               "ignore-gfp-wait", "ignore-gfp-highmem", "cache-filter", "min-order",
               "stacktrace-depth", "require-start", "require-end", "reject-start", "reject-end",
               "verbose_ratelimit_interval_ms", "verbose_ratelimit_burst")
KHUGEPAGED = ("defrag", "pages_to_scan", "scan_sleep_millisecs", "alloc_sleep_millisecs",
              "max_ptes_none", "max_ptes_swap", "max_ptes_shared")

# The settings, as glob patterns; only writable attributes (counters such as khugepaged's
# full_scans change by themselves and are not settings).
PATTERNS: tuple[str, ...] = (
    f"{HUGETLB}/hugepages-*/nr_hugepages",
    f"{HUGETLB}/hugepages-*/nr_overcommit_hugepages",
    f"{THP}/enabled", f"{THP}/defrag", f"{THP}/shmem_enabled", f"{THP}/use_zero_page",
    *(f"{THP}/khugepaged/{k}" for k in KHUGEPAGED),
    f"{THP}/hugepages-*/enabled", f"{THP}/hugepages-*/shmem_enabled",
    *(f"{DEBUGFS}/{p}/{a}" for p in FAULT_POINTS for a in FAULT_ATTRS),
)

LOCK_WAIT = 300.0     # seconds to wait for the hugetlb lock (a test may hold a pool that long)


def setting_value(text: str) -> str:
    """The value to compare and write back: the selected word of a choice file ("always
    [madvise] never" -> "madvise"), else the first line."""
    first = text.split("\n", 1)[0].strip()
    if "[" in first and "]" in first:
        return first[first.index("[") + 1:first.index("]")]
    return first


def is_pool(path: str) -> bool:
    return path.startswith(HUGETLB + "/")


class Access(Protocol):
    def read_settings(self) -> dict[str, str] | None:
        """path -> setting_value of every PATTERNS file present; None when the place is gone
        (a guest that died)."""

    def write_setting(self, path: str, value: str) -> str | None:
        """Writes value; returns None or why it failed."""

    def locked(self) -> contextlib.AbstractContextManager:
        """Held while reading or restoring (the hugetlb lock on a host)."""


# --- locks ------------------------------------------------------------------------------------

def lock_path(name: str) -> str:
    """Same place as hostlib's SystemLock: /run/lock/cvmconf-<name>.lock, else $TMPDIR."""
    d = "/run/lock"
    if not os.access(d, os.W_OK):
        d = os.environ.get("TMPDIR") or "/tmp"
    return f"{d}/cvmconf-{name}.lock"


class LockBusy(Exception):
    pass


def _open_lock(path: str) -> int:
    """The lock file, created 0666 like hostlib's (every user of the machine may lock it)."""
    old = os.umask(0)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    finally:
        os.umask(old)


def _flock_wait(fd: int, timeout: float, waiting: Callable[[], None] | None = None,
                poll: float = 0.02) -> bool:
    """flock(LOCK_EX) on fd, polling for at most timeout seconds (calling `waiting` once when it
    has to wait); False when it did not get the lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if waiting:
                waiting()
                waiting = None
            time.sleep(poll)


@contextlib.contextmanager
def flocked(name: str, timeout: float):
    """flock(LOCK_EX) on lock_path(name), waiting at most timeout seconds (LockBusy then)."""
    path = lock_path(name)
    fd = _open_lock(path)
    try:
        if not _flock_wait(fd, timeout):
            raise LockBusy(f"{path} held by another process for more than {timeout:g} s")
        yield
    finally:
        os.close(fd)


class RunLock:
    """One `cvmconf run` at a time on a kernel (the local target): the second waits, saying
    who it waits for, and gives up after `wait` seconds with one line. The lock file keeps the
    holder's pid and run id; the flock is released when the holder exits, however it exits."""

    NAME = "run"

    def __init__(self, run_id: str, wait: float, note: Callable[[str], None]):
        self.run_id, self.wait, self.note = run_id, wait, note
        self.fd: int | None = None
        self.path = lock_path(self.NAME)

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def acquire(self) -> None:
        fd = _open_lock(self.path)

        def waiting() -> None:
            self.note(f"cvmconf: waiting for another cvmconf run on this kernel to finish "
                      f"({self.holder()})")
        if not _flock_wait(fd, self.wait, waiting, poll=0.2):
            os.close(fd)
            raise LockBusy(f"another cvmconf run is using this kernel ({self.holder()}; "
                           f"lock {self.path}); waited {self.wait:g} s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, run {self.run_id}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


# --- this host ----------------------------------------------------------------------------------

class LocalAccess:
    """Settings in this host's files. `root` prefixes every path (a fake sysfs in tests);
    `lock` is taken around reads and restores (None: no lock)."""

    def __init__(self, root: str = "", lock: str | None = "hugetlb", lock_wait: float = LOCK_WAIT):
        self.root = root.rstrip("/")
        self.lock, self.lock_wait = lock, lock_wait

    def read_settings(self) -> dict[str, str] | None:
        out: dict[str, str] = {}
        for pat in PATTERNS:
            for real in sorted(glob.glob(self.root + pat)):
                try:
                    st = os.stat(real)
                    if not st.st_mode & 0o222:
                        continue
                    with open(real, encoding="utf-8", errors="replace") as f:
                        out[real[len(self.root):]] = setting_value(f.read(4096))
                except OSError:
                    continue
        return out

    def write_setting(self, path: str, value: str) -> str | None:
        try:
            with open(self.root + path, "w", encoding="utf-8") as f:
                f.write(value)
        except OSError as e:
            return f"write {value!r}: {e.strerror or e}"
        return None

    def locked(self):
        if not self.lock:
            return contextlib.nullcontext()
        return flocked(self.lock, self.lock_wait)


# --- snapshot, compare, restore ------------------------------------------------------------------

@dataclasses.dataclass
class Change:
    setting: str
    before: str
    found: str
    restored: bool = False
    now: str | None = None       # the value read back after the restore
    error: str | None = None


def restore(access: Access, before: dict[str, str]) -> list[Change] | None:
    """Puts back every setting of `before` that differs now and reads it back; returns the
    changes found (None when the place is gone). Call under access.locked()."""
    now = access.read_settings()
    if now is None:
        return None
    changes = [Change(k, v, now[k]) for k, v in before.items() if k in now and now[k] != v]
    if not changes:
        return []
    for c in changes:
        c.error = access.write_setting(c.setting, c.before)
    after = access.read_settings() or {}
    for c in changes:
        c.now = after.get(c.setting)
        c.restored = c.now == c.before
        if not c.restored and c.error is None:
            c.error = (f"wrote {c.before!r}, it reads {c.now!r}"
                       + (" (huge pages still in use?)" if is_pool(c.setting) else ""))
    return changes


@dataclasses.dataclass
class BatchEnd:
    label: str
    binary: str
    broken: bool            # crashed, timed out, killed, or its target died
    tests: list[str]        # the test(s) that were running when it broke
    cause: str              # describe_exit(...)


class StateGuard:
    """Snapshots the settings before a batch and restores them after it, for one target.

    With several batches at a time (--jobs), a setting can only be judged when none of them
    runs (a running test may hold a grown pool or fault-injection knobs on purpose): the
    snapshot is taken when the first batch starts from quiet, and the check happens when the
    last one ends, attributed to every batch that ended since. With --jobs 1 that is simply
    before and after each batch. A snapshot is not renewed after a failed restore (the value
    from before stays the one to go back to)."""

    def __init__(self, access: Access | None, where: str):
        self.access, self.where = access, where
        self.baseline: dict[str, str] | None = None
        self.records: list[dict] = []        # for run.json ("system_state"."restored")
        self.problems: list[dict] = []       # failed restores, unreadable state
        self._mu = threading.Lock()
        self._running = 0
        self._ended: list[BatchEnd] = []
        self._keep_baseline = False
        self.checks = 0

    def _read(self) -> dict[str, str] | None:
        assert self.access is not None
        try:
            with self.access.locked():
                return self.access.read_settings()
        except Exception as e:   # noqa: BLE001 - a lock that stays busy, an agent that broke
            self.problems.append({"batch": "-", "binary": "-",
                                  "problem": f"{self.where} system state not snapshotted: "
                                             f"{e.__class__.__name__}: {e}"})
            return None

    def before(self) -> None:
        if self.access is None:
            return
        with self._mu:
            if self._running == 0 and not self._keep_baseline:
                snap = self._read()
                if snap is not None:          # a guest that is down keeps the old baseline
                    self.baseline = snap
            self._running += 1

    def after(self, end: BatchEnd) -> None:
        if self.access is None:
            return
        with self._mu:
            self._running -= 1
            self._ended.append(end)
            if self._running == 0:
                self._check()

    def _check(self) -> None:
        ended, self._ended = self._ended, []
        if self.baseline is None:
            return
        try:
            with self.access.locked():
                changes = restore(self.access, self.baseline)
        except Exception as e:   # noqa: BLE001 - the batch's results must not be lost to it
            self.problems.append({"batch": ended[-1].label, "binary": ended[-1].binary,
                                  "problem": f"{self.where} system state not checked after "
                                             f"{', '.join(e2.label for e2 in ended)}: "
                                             f"{e.__class__.__name__}: {e}"})
            self._keep_baseline = True
            return
        self.checks += 1
        if not changes:
            self._keep_baseline = False
            return
        broken = [e for e in ended if e.broken] or ended
        failed = False
        for c in changes:
            rec = {"where": self.where, "setting": c.setting, "before": c.before,
                   "found": c.found, "restored": c.restored,
                   "batches": [e.label for e in broken],
                   "tests": [t for e in broken for t in e.tests],
                   "cause": "; ".join(f"{e.label}: {e.cause}" for e in broken)
                   if any(e.broken for e in broken) else "changed by a batch that ended normally"}
            if c.error:
                rec["error"] = c.error
            self.records.append(rec)
            if not c.restored:
                failed = True
                self.problems.append({
                    "batch": broken[-1].label, "binary": broken[-1].binary,
                    "problem": f"could not restore {self.where} {c.setting} to {c.before!r} "
                               f"(found {c.found!r} after {', '.join(rec['tests']) or 'the batch'}): "
                               f"{c.error}"})
        self._keep_baseline = failed

    def emergency_restore(self) -> None:
        """The hard-exit path (a second Ctrl-C): restore at once, without waiting long for the
        lock and without bookkeeping."""
        if self.access is None or self.baseline is None:
            return
        if isinstance(self.access, LocalAccess):
            self.access.lock_wait = min(self.access.lock_wait, 5.0)
        try:
            with self.access.locked():
                restore(self.access, self.baseline)
        except Exception:   # noqa: BLE001 - best effort on the way out
            pass


# --- debugfs ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def is_mounted(path: str, fstype: str, mounts: str = "/proc/self/mounts") -> bool:
    try:
        with open(mounts, encoding="utf-8") as f:
            return any(l.split()[1:3] == [path, fstype] for l in f if len(l.split()) > 2)
    except OSError:
        return False


class DebugfsMount:
    """debugfs at /sys/kernel/debug for the run (the fault-injection knobs live there; suites
    mount it themselves when they need it): mounted at the start when it is not, unmounted at
    the end when it was not mounted before the run."""

    def __init__(self):
        self.was_mounted = is_mounted(DEBUGFS, "debugfs")
        self.error: str | None = None
        if not self.was_mounted and os.path.isdir(DEBUGFS):
            if _libc.mount(b"debugfs", DEBUGFS.encode(), b"debugfs", 0, None) != 0:
                e = ctypes.get_errno()
                if e != errno.EBUSY:
                    self.error = f"mount debugfs at {DEBUGFS}: {os.strerror(e)}"

    def restore(self) -> str | None:
        """Unmounts it when the run mounted it; returns what was done, or raises OSError."""
        if self.was_mounted or not is_mounted(DEBUGFS, "debugfs"):
            return None
        if _libc.umount2(DEBUGFS.encode(), 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"unmount debugfs at {DEBUGFS} (mounted during the run): "
                             f"{os.strerror(e)}")
        return f"unmounted debugfs at {DEBUGFS} (not mounted before the run)"


def pool_sizes(root: str = "") -> dict[str, int]:
    """nr_hugepages of every size ("2048kB" -> N), for tests and messages."""
    out = {}
    for p in sorted(Path(root + HUGETLB).glob("hugepages-*")):
        try:
            out[p.name[len("hugepages-"):]] = int((p / "nr_hugepages").read_text())
        except (OSError, ValueError):
            pass
    return out

"""The processes and temporary paths a run owns, so that none outlives it.

Every long-lived child of the runner (a batch's suite binary, QEMU) is started by spawn():
  - in its own session, so the runner can kill it together with everything it forked
    (os.killpg on its process group);
  - with PR_SET_PDEATHSIG = SIGKILL, so it dies when the runner dies, even by SIGKILL. The
    signal is tied to the *thread* that forked the child, so every spawn happens on one
    long-lived spawner thread (a child started from an executor worker would otherwise be
    killed when that worker exits);
  - registered until it is reaped: kill_all() SIGKILLs every registered group at once (the
    second Ctrl-C, a harness exception), and sweep() at the end of a run kills whatever is
    still there.
become_subreaper() makes orphans of the runner's descendants (a helper that left its process
group with setsid, then lost its parent) children of the runner instead of init, so sweep()
finds and kills them too. Temporary paths registered with track_path() are removed by
remove_paths() on the hard exit path (normal paths remove their own).
"""
from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_lock = threading.Lock()
_groups: dict[int, str] = {}        # pgid -> what it is ("cvm_suite_pins batch 003-pins", "QEMU")
_paths: dict[str, str] = {}         # path -> what it is
_spawner: "_Spawner | None" = None


def _child_setup(parent: int) -> None:
    """Runs in the forked child before exec (keep it to async-signal-safe work)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:      # the runner died before the prctl: die now
        os.kill(os.getpid(), signal.SIGKILL)


class _Spawner(threading.Thread):
    """The one thread that forks the runner's long-lived children (see the module doc)."""

    def __init__(self):
        super().__init__(name="cvmconf-spawner", daemon=True)
        self.requests: queue.Queue = queue.Queue()

    def run(self) -> None:
        while True:
            fn, box, done = self.requests.get()
            try:
                box["value"] = fn()
            except BaseException as e:   # handed back to the caller's thread
                box["error"] = e
            done.set()


def _on_spawner(fn):
    global _spawner
    with _lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = _Spawner()
            _spawner.start()
        sp = _spawner
    if threading.current_thread() is sp:
        return fn()
    box: dict = {}
    done = threading.Event()
    sp.requests.put((fn, box, done))
    done.wait()
    if "error" in box:
        raise box["error"]
    return box["value"]


def spawn(cmd: list[str], what: str, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(cmd, **kwargs) in a new session, with the parent-death signal, registered
    as `what` until release() (or reap). Raises what Popen raises."""
    parent = os.getpid()
    kwargs["start_new_session"] = True
    kwargs["preexec_fn"] = lambda: _child_setup(parent)

    def start() -> subprocess.Popen:
        p = subprocess.Popen(cmd, **kwargs)
        with _lock:
            _groups[p.pid] = what
        return p
    return _on_spawner(start)


def release(proc: subprocess.Popen) -> None:
    """The child was reaped and its group killed: forget it."""
    with _lock:
        _groups.pop(proc.pid, None)


def killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _dead(pid: int) -> bool:
    """Gone or a zombie (a zombie has released its memory, huge pages included)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_all(wait: float = 5.0) -> list[str]:
    """SIGKILLs every registered process group and waits (at most `wait` seconds) until their
    leaders are dead; returns what was killed."""
    with _lock:
        groups = dict(_groups)
    killed = []
    for pgid, what in groups.items():
        try:
            os.killpg(pgid, signal.SIGKILL)
            killed.append(f"{what} (process group {pgid})")
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not all(_dead(p) for p in groups):
        time.sleep(0.02)
    return killed


def track_path(path: str | os.PathLike, what: str) -> None:
    with _lock:
        _paths[str(path)] = what


def untrack_path(path: str | os.PathLike) -> None:
    with _lock:
        _paths.pop(str(path), None)


def remove_paths() -> list[str]:
    """Removes every tracked temporary path; returns those that could not be removed."""
    with _lock:
        paths = dict(_paths)
        _paths.clear()
    left = []
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
        except OSError as e:
            left.append(f"{p} ({e.strerror or e})")
    return left


def become_subreaper() -> bool:
    """Orphaned descendants become children of this process (for sweep()); False if refused."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of the processes whose parent is pid, from /proc."""
    out = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for e in entries:
        if not e.isdigit():
            continue
        try:
            stat = Path(f"/proc/{e}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        close = stat.rfind(")")
        fields = stat[close + 2:].split()
        if len(fields) >= 2 and int(fields[1]) == pid:
            out.append((int(e), stat[stat.find("(") + 1:close]))
    return out


def sweep() -> list[str]:
    """Kills every process group still registered and every remaining child of the runner
    (orphans it adopted as subreaper), and reaps them. Call when nothing of the run should be
    left (the end of a run). Returns a description of each process that had to be killed."""
    killed = kill_all()
    me = os.getpid()
    with _lock:
        known = set(_groups)
    for pid, comm in _children(me):
        state = ""
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            pass
        if state == "Z":            # already dead: only reap it
            _reap(pid)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            if pid not in known:
                killed.append(f"{comm} (pid {pid}, left behind by a child of the run)")
            # Its own group too, when it leads one (a helper that called setsid).
            if os.getpgid(pid) == pid:
                killpg(pid)
        except (ProcessLookupError, PermissionError):
            pass
        _reap(pid)
    with _lock:
        _groups.clear()
    return killed


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass

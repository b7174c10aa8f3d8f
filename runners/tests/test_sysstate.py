"""The system-state guard on a fake sysfs (no kernel state touched): what is watched, what a
restore writes, how it is attributed, and what a failed restore becomes. The real thing, on this
host's pools, is in test_reliability.py."""
import os
import threading

import pytest

from cvmconf import procs, sysstate
from cvmconf.sysstate import HUGETLB, THP, DEBUGFS, BatchEnd, LocalAccess, StateGuard


def fake_sysfs(root, writable=True):
    files = {
        f"{HUGETLB}/hugepages-2048kB/nr_hugepages": "0\n",
        f"{HUGETLB}/hugepages-2048kB/nr_overcommit_hugepages": "0\n",
        f"{HUGETLB}/hugepages-1048576kB/nr_hugepages": "0\n",
        f"{HUGETLB}/hugepages-1048576kB/nr_overcommit_hugepages": "0\n",
        f"{HUGETLB}/hugepages-2048kB/free_hugepages": "0\n",     # a counter: not a setting
        f"{THP}/enabled": "always [madvise] never\n",
        f"{THP}/use_zero_page": "1\n",
        f"{THP}/khugepaged/pages_to_scan": "4096\n",
        f"{THP}/khugepaged/full_scans": "12\n",                  # not a setting
        f"{THP}/hugepages-64kB/enabled": "always inherit madvise [never]\n",
        f"{DEBUGFS}/failslab/probability": "0\n",
        f"{DEBUGFS}/failslab/ignore-gfp-wait": "Y\n",
    }
    for path, text in files.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(0o644 if writable else 0o444)
    return files


def write(root, path, text):
    (root / path.lstrip("/")).write_text(text)


def test_snapshot_covers_every_pool_size_thp_and_fault_knobs_but_no_counters(tmp_path):
    fake_sysfs(tmp_path)
    snap = LocalAccess(str(tmp_path), lock=None).read_settings()
    assert snap[f"{HUGETLB}/hugepages-1048576kB/nr_hugepages"] == "0"
    assert snap[f"{HUGETLB}/hugepages-2048kB/nr_overcommit_hugepages"] == "0"
    assert snap[f"{THP}/enabled"] == "madvise"              # the selected word
    assert snap[f"{THP}/hugepages-64kB/enabled"] == "never"
    assert snap[f"{THP}/khugepaged/pages_to_scan"] == "4096"
    assert snap[f"{DEBUGFS}/failslab/ignore-gfp-wait"] == "Y"
    assert not any(k.endswith(("free_hugepages", "full_scans")) for k in snap)


def test_a_broken_batch_gets_its_changes_restored_and_recorded(tmp_path):
    fake_sysfs(tmp_path)
    g = StateGuard(LocalAccess(str(tmp_path), lock=None), "local")
    g.before()
    write(tmp_path, f"{HUGETLB}/hugepages-1048576kB/nr_hugepages", "2\n")
    write(tmp_path, f"{THP}/enabled", "[always] madvise never\n")
    g.after(BatchEnd("001-x", "cvm_suite_x", True, ["X.GrowsPool"], "killed by SIGKILL (signal 9)"))
    assert (tmp_path / HUGETLB.lstrip("/") / "hugepages-1048576kB/nr_hugepages").read_text() == "0"
    assert (tmp_path / THP.lstrip("/") / "enabled").read_text() == "madvise"
    recs = {r["setting"]: r for r in g.records}
    pool = recs[f"{HUGETLB}/hugepages-1048576kB/nr_hugepages"]
    assert pool["before"] == "0" and pool["found"] == "2" and pool["restored"] is True
    assert pool["tests"] == ["X.GrowsPool"] and pool["batches"] == ["001-x"]
    assert "SIGKILL" in pool["cause"]
    assert g.problems == []


def test_a_clean_batch_that_changed_nothing_records_nothing(tmp_path):
    fake_sysfs(tmp_path)
    g = StateGuard(LocalAccess(str(tmp_path), lock=None), "local")
    g.before()
    g.after(BatchEnd("001-x", "b", False, [], "exited with status 0"))
    assert g.records == [] and g.problems == [] and g.checks == 1


def test_a_restore_that_does_not_take_is_a_harness_problem_and_the_baseline_stays(tmp_path):
    fake_sysfs(tmp_path)

    class Stubborn(LocalAccess):      # nr_hugepages cannot be shrunk (pages still in use)
        def write_setting(self, path, value):
            if path.endswith("nr_hugepages"):
                return None           # "succeeds", yet the value does not change
            return super().write_setting(path, value)
    g = StateGuard(Stubborn(str(tmp_path), lock=None), "local")
    g.before()
    write(tmp_path, f"{HUGETLB}/hugepages-2048kB/nr_hugepages", "3\n")
    g.after(BatchEnd("001-x", "cvm_suite_x", True, ["X.T"], "killed by SIGSTOP"))
    assert len(g.problems) == 1
    p = g.problems[0]["problem"]
    assert "could not restore local" in p and "hugepages-2048kB/nr_hugepages" in p
    assert "found '3'" in p and "X.T" in p and "in use" in p
    assert g.records[0]["restored"] is False
    # The next batch does not adopt the leaked value as its "before".
    g.before()
    assert g.baseline[f"{HUGETLB}/hugepages-2048kB/nr_hugepages"] == "0"


def test_with_parallel_batches_the_check_waits_for_the_last_one(tmp_path):
    fake_sysfs(tmp_path)
    g = StateGuard(LocalAccess(str(tmp_path), lock=None), "local")
    g.before()
    g.before()                                     # a second batch starts meanwhile
    write(tmp_path, f"{HUGETLB}/hugepages-2048kB/nr_hugepages", "1\n")   # held on purpose
    g.after(BatchEnd("001-a", "a", True, ["A.Dies"], "killed by SIGKILL"))
    assert (tmp_path / HUGETLB.lstrip("/") / "hugepages-2048kB/nr_hugepages").read_text() == "1\n"
    g.after(BatchEnd("002-b", "b", False, [], "exited with status 0"))
    assert (tmp_path / HUGETLB.lstrip("/") / "hugepages-2048kB/nr_hugepages").read_text() == "0"
    assert g.records[0]["tests"] == ["A.Dies"] and g.records[0]["batches"] == ["001-a"]


def test_a_place_that_is_gone_is_not_checked(tmp_path):
    class Gone:
        def read_settings(self):
            return None

        def write_setting(self, path, value):
            raise AssertionError("no write to a dead guest")

        def locked(self):
            import contextlib
            return contextlib.nullcontext()
    g = StateGuard(Gone(), "qemu")
    g.before()
    g.after(BatchEnd("001-x", "b", True, ["T"], "the guest kernel died"))
    assert g.records == [] and g.problems == []


def test_lock_is_the_one_hostlib_uses_and_waits_for_its_holder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    path = sysstate.lock_path("hugetlb")
    assert path in ("/run/lock/cvmconf-hugetlb.lock", f"{tmp_path}/cvmconf-hugetlb.lock")
    name = "selftest-" + str(os.getpid())
    with sysstate.flocked(name, 1.0):
        got = []

        def other():
            try:
                with sysstate.flocked(name, 0.2):
                    got.append("taken")
            except sysstate.LockBusy as e:
                got.append(str(e))
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert "held by another process for more than 0.2 s" in got[0]
    with sysstate.flocked(name, 0.2):
        pass
    os.unlink(sysstate.lock_path(name))


def test_run_lock_refuses_a_second_run_with_the_holder_named(tmp_path, monkeypatch):
    monkeypatch.setattr(sysstate.RunLock, "NAME", f"selftest-run-{os.getpid()}")
    notes = []
    a = sysstate.RunLock("first", 10, notes.append)
    a.acquire()
    try:
        b = sysstate.RunLock("second", 0.5, notes.append)
        with pytest.raises(sysstate.LockBusy) as e:
            b.acquire()
        assert f"pid {os.getpid()}, run first" in str(e.value)
        assert notes and "waiting for another cvmconf run" in notes[0]
    finally:
        a.release()
    b.acquire()
    b.release()
    os.unlink(a.path)


def test_setting_value_parses_choice_files():
    assert sysstate.setting_value("always defer defer+madvise [madvise] never\n") == "madvise"
    assert sysstate.setting_value("12\n") == "12"
    assert sysstate.setting_value("") == ""


def test_spawned_children_get_their_own_session_and_are_registered_until_released():
    p = procs.spawn(["/bin/sleep", "30"], "sleep (test)")
    try:
        assert os.getpgid(p.pid) == p.pid and os.getsid(p.pid) == p.pid
        assert procs._groups[p.pid] == "sleep (test)"
    finally:
        procs.killpg(p.pid)
        p.wait()
        procs.release(p)
    assert p.pid not in procs._groups


def test_a_child_dies_with_the_runner_even_when_the_runner_is_sigkilled(tmp_path):
    """A Python 'runner' spawns a sleeper through procs from a worker thread that then ends,
    and is SIGKILLed: the sleeper must die with it (PR_SET_PDEATHSIG on the spawner thread)."""
    import subprocess
    import sys
    import time
    pidfile = tmp_path / "pid"
    code = (
        "import sys, threading, time\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from cvmconf import procs\n"
        "def worker():\n"
        "    p = procs.spawn(['/bin/sleep', '300'], 'sleeper')\n"
        "    open(sys.argv[2], 'w').write(str(p.pid))\n"
        "t = threading.Thread(target=worker); t.start(); t.join()\n"
        "time.sleep(300)\n")
    runner = subprocess.Popen([sys.executable, "-c", code,
                               str(os.path.dirname(os.path.dirname(procs.__file__))),
                               str(pidfile)])
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    sleeper = int(pidfile.read_text())
    time.sleep(0.3)     # the worker thread has ended: the sleeper must still be alive
    assert procs._dead(sleeper) is False
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while not procs._dead(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs._dead(sleeper), "the child outlived its SIGKILLed parent"


def test_a_broken_place_is_a_harness_problem_not_a_lost_batch(tmp_path):
    """An exception while checking (a lock that stays busy, an agent that broke) must not
    escape into the executor, where it would cost the batch its results."""
    fake_sysfs(tmp_path)

    class Breaks(LocalAccess):
        broken = False

        def read_settings(self):
            if self.broken:
                raise sysstate.LockBusy("/run/lock/cvmconf-hugetlb.lock held for more than 1 s")
            return super().read_settings()
    acc = Breaks(str(tmp_path), lock=None)
    g = StateGuard(acc, "local")
    g.before()
    acc.broken = True
    g.after(BatchEnd("001-x", "b", True, ["T"], "killed by SIGKILL"))
    assert len(g.problems) == 1
    assert "system state not checked after 001-x: LockBusy" in g.problems[0]["problem"]
    acc.broken = False
    g.before()                                  # the old snapshot stays the one to go back to
    assert g.baseline is not None

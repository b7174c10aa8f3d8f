"""Fault injection against the runner, for real (issue 14): the purpose-built fault suite
(runners/tests/fault_suite) grows this host's hugetlb pool or changes a khugepaged knob and then
dies by SIGKILL, stops, hangs, aborts, floods stdout or leaves a daemon; the runner itself gets
SIGINT/SIGTERM/SIGHUP (twice), a full results directory, and a second run at the same time.

After every case: the run ended with its documented exit code; run.json parses and says what
happened (restored settings with the test that changed them, killed processes, incomplete and
why); no process the run started is left (every one carries the test's token in its
environment: /proc/PID/environ is searched for it); the hugetlb pools and the knob equal their
values from before (read under the hugetlb lock, so another developer's test holding a grown
pool at that moment is waited for); no mount is left below the test's directory."""
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, leftovers
from cvmconf import sysstate

FAULT_CATALOGUE = REPO / "runners" / "tests" / "fault_suite" / "requirements.yaml"
KNOB = f"{sysstate.THP}/khugepaged/pages_to_scan"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="changes kernel state: needs root")


@pytest.fixture(scope="module")
def fault_dir(build_dir) -> Path:
    d = build_dir / "runner-tests" / "fault_suite"
    if not (d / "cvm_suite_faults").exists():
        pytest.fail(f"no fault suite binary in {d}: run ./cvmconf build first")
    return d


def system_state() -> dict:
    """Pools of every size and the knob the fault suite changes, read at rest."""
    with sysstate.flocked("hugetlb", 600):
        state = {f"pool {k}": v for k, v in sysstate.pool_sizes().items()}
    if os.path.exists(KNOB):
        state[KNOB] = Path(KNOB).read_text().strip()
    return state


def mounts(under: Path) -> list[str]:
    """Mounts below the test's own directory (other test runs on this machine mount and unmount
    elsewhere, debugfs among them, at any time)."""
    return [l for l in Path("/proc/self/mounts").read_text().splitlines()
            if len(l.split()) > 1 and l.split()[1].startswith(str(under))]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Run:
    """One `python3 -m cvmconf run` of the fault suite, armed, with its own token."""

    def __init__(self, build_dir, suite_dir, results, run_id, *args, env=None, catalogue=None):
        self.token = secrets.token_hex(8)
        self.run_dir = Path(results) / run_id
        e = dict(os.environ, PYTHONPATH=str(REPO / "runners"), FAULTS_ARMED="1",
                 CVMCONF_TEST_TOKEN=self.token, **(env or {}))
        cmd = ["/usr/bin/python3", "-m", "cvmconf", "--build-dir", str(build_dir),
               "--suite-dir", str(suite_dir), "--catalogue", str(catalogue or FAULT_CATALOGUE),
               "run", "--results-dir", str(results), "--run-id", run_id, *args]
        self.p = subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.out = self.err = ""

    def wait(self, timeout=300):
        self.out, self.err = self.p.communicate(timeout=timeout)
        return self.p.returncode

    def data(self) -> dict:
        return json.loads((self.run_dir / "run.json").read_text())

    def binary_running(self):
        return [l for l in leftovers(self.token) if "cvm_suite_fault" in l]

    def text(self) -> str:
        return self.out[-3000:] + self.err[-3000:]


@pytest.fixture
def clean(tmp_path):
    """State before; after the test: equal, no mount left below the test's directory, and
    nothing of the runs left."""
    before = system_state()
    runs: list[Run] = []
    yield runs
    for r in runs:
        if r.p.poll() is None:
            r.p.kill()
            r.p.wait()
    left = [l for r in runs for l in leftovers(r.token)]
    assert left == [], f"processes of the run left behind: {left}"
    assert system_state() == before
    assert mounts(tmp_path) == []


def outcomes(data) -> dict:
    return {t["name"]: t["outcome"] for t in data["tests"]}


def restored(data) -> dict:
    return {(r["setting"], tuple(r["tests"])): r for r in data["system_state"]["restored"]}


def pool_setting(kb: int = 2048) -> str:
    return f"{sysstate.HUGETLB}/hugepages-{kb}kB/nr_hugepages"


def test_killed_stopped_and_aborted_tests_get_their_state_restored(build_dir, fault_dir,
                                                                   tmp_path, clean):
    r = Run(build_dir, fault_dir, tmp_path, "kill-stop", "--test-timeout", "3", "-k",
            "GrowsPoolThenKillsItself or GrowsPoolThenStops or ChangesThpThenAborts or Passes")
    clean.append(r)
    assert r.wait() == 3, r.text()
    d = r.data()
    assert d["complete"] is True
    assert outcomes(d) == {
        "Faults.Passes1": "PASS", "Faults.GrowsPoolThenKillsItself": "ERROR",
        "Faults.Passes2": "PASS", "Faults.GrowsPoolThenStops": "TIMEOUT",
        "Faults.ChangesThpThenAborts": "ERROR", "Faults.Passes3": "PASS"}
    rec = restored(d)
    killed = rec[(pool_setting(), ("Faults.GrowsPoolThenKillsItself",))]
    assert killed["restored"] and "SIGKILL" in killed["cause"]
    assert int(killed["found"]) == int(killed["before"]) + 1
    stopped = rec[(pool_setting(), ("Faults.GrowsPoolThenStops",))]
    assert stopped["restored"] and "exceeded its 3 s timeout" in stopped["cause"]
    thp = rec[(KNOB, ("Faults.ChangesThpThenAborts",))]
    assert thp["restored"] and "SIGABRT" in thp["cause"]
    assert d["system_state"]["processes_killed"] == []
    assert pool_setting() in d["system_state"]["watched"]
    assert "restored: " + pool_setting() in r.out     # the summary says it too


@pytest.mark.parametrize("sig, outcome", [(signal.SIGKILL, "ERROR"), (signal.SIGSTOP, "TIMEOUT")])
def test_a_suite_binary_killed_or_stopped_from_outside_gets_its_pool_restored(
        build_dir, fault_dir, tmp_path, clean, sig, outcome):
    """The issue's case as it happened: someone SIGKILLs or SIGSTOPs the binary while its test
    holds a grown pool."""
    r = Run(build_dir, fault_dir, tmp_path, "outside", "--test-timeout", "4", "-k",
            "GrowsPoolThenHangs or Passes3")
    clean.append(r)
    pid = int(wait_for(r.binary_running, 60, "the fault suite to start")[0].split()[0])
    time.sleep(1.5)                        # it grows the pool and hangs
    os.kill(pid, sig)
    assert r.wait(60) == 3, r.text()
    d = r.data()
    assert d["complete"] is True
    assert outcomes(d) == {"Faults.GrowsPoolThenHangs": outcome, "Faults.Passes3": "PASS"}
    rec = restored(d)[(pool_setting(), ("Faults.GrowsPoolThenHangs",))]
    assert rec["restored"] and int(rec["found"]) == int(rec["before"]) + 1


def huge_sizes_kb() -> list[int]:
    return sorted(int(p.name[len("hugepages-"):-2])
                  for p in Path(sysstate.HUGETLB).glob("hugepages-*kB"))


@pytest.mark.parametrize("kb", [k for k in huge_sizes_kb() if k != 2048])
def test_a_killed_test_that_grew_a_large_page_pool_gets_it_restored(build_dir, fault_dir,
                                                                     tmp_path, clean, kb):
    """The case of the issue: a 1 GiB pool left at 2 pages by a killed test."""
    r = Run(build_dir, fault_dir, tmp_path, f"kill-{kb}", "--test-timeout", "30", "-k",
            "GrowsPoolThenKillsItself", env={"FAULTS_POOL_KB": str(kb)})
    clean.append(r)
    rc = r.wait()
    d = r.data()
    t = d["tests"][0]
    if t["outcome"] == "FAIL" and "could not allocate" in " ".join(t["messages"]):
        pytest.skip(f"the kernel could not allocate a {kb} kB page now: {t['messages'][0]}")
    assert rc == 3 and t["outcome"] == "ERROR", r.text()
    rec = restored(d)[(pool_setting(kb), ("Faults.GrowsPoolThenKillsItself",))]
    assert rec["restored"] is True


def test_a_test_that_floods_stdout_costs_bounded_memory_and_disk(build_dir, fault_dir, tmp_path,
                                                                 clean):
    r = Run(build_dir, fault_dir, tmp_path, "flood", "--test-timeout", "3", "-k",
            "FloodsStdout or Passes3")
    clean.append(r)
    assert r.wait() == 3, r.text()
    d = r.data()
    assert outcomes(d) == {"Faults.FloodsStdout": "TIMEOUT", "Faults.Passes3": "PASS"}
    flood = d["tests"][0]
    assert "xxxx" in flood["evidence"]["output_tail"]
    sizes = [p.stat().st_size for p in r.run_dir.glob("batches/*/output.txt")]
    assert sizes and max(sizes) <= 300 * 1024, sizes
    assert "bytes of earlier output dropped" in (r.run_dir / "batches" / "001-faults" /
                                                  "output.txt").read_text()[:200]


def test_a_daemon_left_by_a_test_is_killed_and_reported(build_dir, fault_dir, tmp_path, clean):
    r = Run(build_dir, fault_dir, tmp_path, "daemon", "-k", "LeavesADaemon")
    clean.append(r)
    assert r.wait() == 3, r.text()
    d = r.data()
    assert outcomes(d) == {"Faults.LeavesADaemon": "PASS"}
    killed = d["system_state"]["processes_killed"]
    assert len(killed) == 1 and "left behind" in killed[0], killed
    assert any("left behind by the run" in p["problem"] for p in d["problems"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_runner_restores_state_and_leaves_nothing(build_dir, fault_dir, tmp_path,
                                                                  clean, sig):
    r = Run(build_dir, fault_dir, tmp_path, "signalled", "--test-timeout", "60", "-k",
            "GrowsPoolThenHangs or Passes3")
    clean.append(r)
    wait_for(r.binary_running, 60, "the fault suite to start")
    time.sleep(1.5)                        # it grows the pool and hangs
    r.p.send_signal(sig)
    t0 = time.monotonic()
    assert r.wait(60) == 3, r.text()
    assert time.monotonic() - t0 < 20
    d = r.data()
    assert d["complete"] is False
    assert d["incomplete_reason"].startswith(f"interrupted ({sig.name})"), d["incomplete_reason"]
    assert outcomes(d)["Faults.GrowsPoolThenHangs"] == "NOT RUN"
    rec = restored(d)[(pool_setting(), ("Faults.GrowsPoolThenHangs",))]
    assert rec["restored"] and "interrupted" in rec["cause"]
    assert "INCOMPLETE RUN" in r.out


def test_a_sigkilled_runner_takes_its_batch_with_it(build_dir, fault_dir, tmp_path, clean):
    """SIGKILL leaves the runner no say: its batch dies of the parent-death signal, and run.json
    stays the whole marker written at the start (incomplete). (The flood changes no state: a
    SIGKILLed runner restores nothing.)"""
    r = Run(build_dir, fault_dir, tmp_path, "sigkill", "--test-timeout", "60", "-k", "FloodsStdout")
    clean.append(r)
    wait_for(r.binary_running, 60, "the fault suite to start")
    r.p.kill()
    r.wait(30)
    wait_for(lambda: not leftovers(r.token), 10, "the batch to die with the runner")
    d = r.data()
    assert d["complete"] is False and "did not finish" in d["incomplete_reason"]


def test_a_second_sigint_stops_at_once(build_dir, fault_dir, tmp_path, clean):
    """The first SIGINT's cleanup waits for the batch; this test makes it wait long (it holds the
    hugetlb lock the runner needs before the batch), so the second SIGINT surely arrives during
    the cleanup: the runner must stop at once, say so, and leave run.json whole."""
    with sysstate.flocked("hugetlb", 600):
        r = Run(build_dir, fault_dir, tmp_path, "twice", "-k", "Passes1")
        clean.append(r)
        wait_for(lambda: (r.run_dir / "run.json").exists(), 60, "the run to start")
        time.sleep(1.0)
        r.p.send_signal(signal.SIGINT)
        time.sleep(1.0)
        assert r.p.poll() is None, "the first SIGINT's cleanup should still wait for the lock"
        r.p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        assert r.wait(30) == 3, r.text()
        assert time.monotonic() - t0 < 10
    assert "SIGINT again: stopped at once" in r.err, r.text()
    d = r.data()
    assert d["complete"] is False
    assert "stopped at once by a second SIGINT" in d["incomplete_reason"]


def test_a_full_results_directory_keeps_run_json_whole_and_the_results_elsewhere(
        build_dir, fault_dir, tmp_path, clean):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20k", "cvmconf-test", str(small)],
                   check=True)
    fallback = None
    try:
        r = Run(build_dir, fault_dir, small, "full", "--test-timeout", "2", "-k",
                "FloodsStdout or Passes1")
        clean.append(r)
        assert r.wait() == 3, r.text()
        assert "No space left on device" in r.err, r.text()
        line = next(l for l in r.err.splitlines() if "written to" in l)
        fallback = Path(line.split("written to ", 1)[1].split(" instead")[0])
        whole = json.loads((fallback / "run.json").read_text())
        assert outcomes(whole) == {"Faults.Passes1": "PASS", "Faults.FloodsStdout": "TIMEOUT"}
        assert any("could not save the batch's files" in p["problem"] for p in whole["problems"])
        for f in ("junit.xml", "results.ktap", "report.md", "report.html"):
            assert (fallback / f).is_file()
            assert not (r.run_dir / f).exists(), f"{f} half-written in the full directory"
        marker = json.loads((r.run_dir / "run.json").read_text())   # parses: never truncated
        assert marker["complete"] is False

        # Full before anything runs: one line, exit 2, nothing left.
        for i in range(100):
            try:
                with open(small / f"filler{i}", "wb") as f:
                    f.write(b"\0" * 4096)
            except OSError:
                break
        r2 = Run(build_dir, fault_dir, small, "full2", "-k", "Passes1")
        clean.append(r2)
        assert r2.wait() == 2, r2.text()
        assert r2.err.strip().splitlines() == [
            f"cvmconf: cannot write {small}/full2/run.json: No space left on device"], r2.err
        assert not (small / "full2").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)
        if fallback is not None:
            subprocess.run(["rm", "-rf", str(fallback)], check=False)


def test_two_runs_at_once_serialise_and_a_third_refuses(build_dir, fault_dir, tmp_path, clean):
    a = Run(build_dir, fault_dir, tmp_path, "a", "--test-timeout", "4", "-k",
            "GrowsPoolThenHangs or Passes1")
    clean.append(a)
    wait_for(a.binary_running, 120, "run a's batch to start")
    b = Run(build_dir, fault_dir, tmp_path, "b", "--test-timeout", "4", "-k",
            "GrowsPoolThenKillsItself or Passes2")
    c = Run(build_dir, fault_dir, tmp_path, "c", "--lock-wait", "1", "-k", "Passes3")
    clean += [b, c]
    assert c.wait(60) == 2, c.text()
    err = c.err.strip().splitlines()
    assert len(err) == 2 and "waiting for another cvmconf run" in err[0], c.err
    assert err[1].startswith("cvmconf: another cvmconf run is using this kernel (pid "), c.err
    assert not (tmp_path / "c").exists()
    assert a.wait(120) == 3, a.text()
    assert b.wait(120) == 3, b.text()
    assert "waiting for another cvmconf run" in b.err
    da, db = a.data(), b.data()
    assert da["complete"] and db["complete"]
    assert da["finished"] <= db["started"], "the runs overlapped"
    assert outcomes(da) == {"Faults.Passes1": "PASS", "Faults.GrowsPoolThenHangs": "TIMEOUT"}
    assert outcomes(db) == {"Faults.GrowsPoolThenKillsItself": "ERROR", "Faults.Passes2": "PASS"}
    assert (pool_setting(), ("Faults.GrowsPoolThenHangs",)) in restored(da)
    assert (pool_setting(), ("Faults.GrowsPoolThenKillsItself",)) in restored(db)


# --- the QEMU target: few cases, tight timeouts (each boots Debian's 6.1 kernel under TCG) ------

X86_KERNEL = "linux-image-cloud-amd64"


def need_qemu():
    import shutil
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed: ./cvmconf test installs the QEMU packages")


def test_qemu_environment_error_in_the_guest_leaves_no_qemu(build_dir, fault_dir, tmp_path, clean):
    """The issue's leaked QEMU: a guest without /dev/kvm is a usage error (exit 2, one line), and
    QEMU and its work directory are gone when cvmconf returns."""
    need_qemu()
    r = Run(build_dir, fault_dir, tmp_path, "nokvm", "--target", "qemu", "--kernel", X86_KERNEL,
            "--append", "module_blacklist=kvm_amd,kvm_intel", "--boot-timeout", "120")
    clean.append(r)
    assert r.wait(600) == 2, r.text()
    assert r.err.strip().splitlines()[-1].startswith("cvmconf: KVM unavailable in the guest"), r.err
    assert not (build_dir / "qemu-work" / str(r.p.pid)).exists()


QEMU_SIGNAL_CASES = {
    # signal: (selection, test timeout, expected outcomes, restored (setting, test) pairs)
    signal.SIGTERM: ("GrowsPoolThenKillsItself or ChangesThpThenAborts or GrowsPoolThenHangs", 120,
                     {"Faults.GrowsPoolThenKillsItself": "ERROR",
                      "Faults.ChangesThpThenAborts": "ERROR",
                      "Faults.GrowsPoolThenHangs": "NOT RUN"},
                     [(pool_setting(), "Faults.GrowsPoolThenKillsItself"),
                      (KNOB, "Faults.ChangesThpThenAborts")]),
    signal.SIGINT: ("GrowsPoolThenKillsItself or FloodsStdout or GrowsPoolThenHangs", 10,
                    {"Faults.GrowsPoolThenKillsItself": "ERROR", "Faults.FloodsStdout": "TIMEOUT",
                     "Faults.GrowsPoolThenHangs": "NOT RUN"},
                    [(pool_setting(), "Faults.GrowsPoolThenKillsItself")]),
}


@pytest.mark.parametrize("sig", list(QEMU_SIGNAL_CASES))
def test_qemu_run_signalled_restores_guest_state_and_leaves_no_qemu(build_dir, fault_dir,
                                                                    tmp_path, clean, sig):
    """In the guest, a test grows its hugetlb pool and dies, another changes a khugepaged knob
    and aborts (SIGTERM case) or floods stdout (SIGINT case: the agent keeps the output bounded):
    the runner restores the guest's state through the agent and says so; then the runner gets
    the signal while a third test hangs: it stops, and QEMU with it."""
    need_qemu()
    selection, timeout, expected, pairs = QEMU_SIGNAL_CASES[sig]
    r = Run(build_dir, fault_dir, tmp_path, "qsig", "--target", "qemu", "--kernel", X86_KERNEL,
            "--append", "cvmconf.fault_test=1", "--boot-timeout", "120", "--test-timeout",
            str(timeout), "--idle-timeout", "60", "-k", selection)
    clean.append(r)
    # The first two batches are saved when they end; the third runs the hanging test.
    wait_for(lambda: len(list(r.run_dir.glob("batches/*"))) >= 2, 400, "two finished batches")
    time.sleep(2)
    r.p.send_signal(sig)
    t0 = time.monotonic()
    assert r.wait(120) == 3, r.text()
    assert time.monotonic() - t0 < 60
    d = r.data()
    assert d["complete"] is False and d["incomplete_reason"].startswith(f"interrupted ({sig.name})")
    assert outcomes(d) == expected
    rec = restored(d)
    for setting, test in pairs:
        got = rec[(setting, (test,))]
        assert got["where"] == "qemu" and got["restored"], got
    if "Faults.FloodsStdout" in expected:
        flood = next(t for t in d["tests"] if t["name"] == "Faults.FloodsStdout")
        assert "xxxx" in flood["evidence"]["output_tail"]
        out = (r.run_dir / "batches" / flood["batch"] / "output.txt").read_text()
        assert out.startswith("[cvm-agent: ") and "bytes of earlier output dropped" in out
        assert len(out) < 64 * 1024
    assert not (build_dir / "qemu-work" / str(r.p.pid)).exists()


def test_qemu_dies_with_a_sigkilled_runner(build_dir, fault_dir, tmp_path, clean):
    """The runner is SIGKILLed while its guest runs a batch: QEMU gets the parent-death signal
    (it was forked by procs' long-lived spawner thread, not by a worker that may end)."""
    need_qemu()
    r = Run(build_dir, fault_dir, tmp_path, "qkill", "--target", "qemu", "--kernel", X86_KERNEL,
            "--append", "cvmconf.fault_test=1", "--boot-timeout", "120", "--test-timeout", "120",
            "-k", "GrowsPoolThenHangs")
    clean.append(r)
    qemu = wait_for(lambda: [l for l in leftovers(r.token) if "qemu-system" in l], 300,
                    "QEMU to start")
    wait_for(lambda: (r.run_dir / "run.json").exists(), 300, "the batch to start")
    time.sleep(2)
    r.p.kill()
    r.wait(30)
    wait_for(lambda: not leftovers(r.token), 15, f"QEMU ({qemu}) to die with the runner")
    import shutil
    shutil.rmtree(build_dir / "qemu-work" / str(r.p.pid), ignore_errors=True)   # SIGKILL: no cleanup

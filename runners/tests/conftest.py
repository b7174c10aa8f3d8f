import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "runners"))

# Hypothesis caches Unicode tables in its storage directory (./.hypothesis by default): keep the
# source tree clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), "cvmconf-hypothesis"))
try:
    from hypothesis import HealthCheck, settings
    # No example database on disk (the tests run from a read-only or shared tree); no deadline
    # (the machine is shared with other test runs).
    settings.register_profile("cvmconf", database=None, deadline=None, max_examples=200,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("cvmconf")
except ImportError:  # pragma: no cover - python3-hypothesis is in the package list
    pass

BROKEN_CATALOGUE = REPO / "runners" / "tests" / "broken_suite" / "requirements.yaml"


@pytest.fixture(scope="session")
def build_dir() -> Path:
    d = Path(os.environ.get("CVMCONF_BUILD_DIR", REPO / "build"))
    if not (d / "suites").is_dir():
        pytest.fail(f"no build tree at {d}: run ./cvmconf build first")
    return d


@pytest.fixture(scope="session")
def broken_dir(build_dir) -> Path:
    d = build_dir / "runner-tests" / "broken_suite"
    if not (d / "cvm_suite_broken").exists():
        pytest.fail(f"no broken suite binary in {d}: run ./cvmconf build first")
    return d


def cvmconf(*args, env=None, prefix=(), timeout=600):
    """Runs `python3 -m cvmconf ARGS` as a user would (a separate process)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO / "runners")
    e.update(env or {})
    return subprocess.run([*prefix, "/usr/bin/python3", "-m", "cvmconf", *args], env=e,
                          capture_output=True, text=True, timeout=timeout)


def run_broken(build_dir, broken_dir, results_dir, run_id, *extra, env=None):
    r = cvmconf("--build-dir", str(build_dir), "--suite-dir", str(broken_dir),
                "--catalogue", str(BROKEN_CATALOGUE), "run", "--test-timeout", "3",
                "--results-dir", str(results_dir), "--run-id", run_id, *extra, env=env)
    run_dir = Path(results_dir) / run_id
    data = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else None
    return r, run_dir, data


@pytest.fixture(scope="session")
def broken_run(build_dir, broken_dir, tmp_path_factory):
    """One run of the purpose-built broken suite, shared by the format tests."""
    results = tmp_path_factory.mktemp("results")
    r, run_dir, data = run_broken(build_dir, broken_dir, results, "broken")
    assert data is not None, r.stdout[-3000:] + r.stderr[-3000:]
    return r, run_dir, data


@pytest.fixture(scope="session")
def real_run(build_dir, tmp_path_factory):
    """A run of the real conformance suites on this host, filtered to one platform to stay fast."""
    results = tmp_path_factory.mktemp("results")
    r = cvmconf("--build-dir", str(build_dir), "run", "-k", "x86_default or arm64_default",
                "--duration", "1", "--results-dir", str(results), "--run-id", "real",
                "--message-id", "<20250101.test@example.org>")
    run_dir = results / "real"
    assert (run_dir / "run.json").exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, run_dir, json.loads((run_dir / "run.json").read_text())


def record_timing(name: str, seconds: float) -> None:
    """Adds a line to the timing breakdown ./cvmconf test prints at its end ($CVMCONF_TIMINGS)."""
    path = os.environ.get("CVMCONF_TIMINGS")
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {seconds:.0f}\n")


def timed_cvmconf(name: str, *args, **kw):
    """cvmconf(*args) whose wall time goes into the timing breakdown under `name`."""
    import time
    t0 = time.monotonic()
    try:
        return cvmconf(*args, **kw)
    finally:
        record_timing(name, time.monotonic() - t0)


@pytest.fixture(scope="session")
def every_outcome_run(build_dir, broken_dir, tmp_path_factory):
    """A run of the broken suite holding every outcome: PASS, FAIL, SKIP, ERROR, TIMEOUT and
    NOT RUN. Broken.PassesOrBlocks, the last test, blocks (BROKEN_BLOCK_FILE); the run is
    interrupted (SIGINT) while it does, so it is NOT RUN and the run incomplete."""
    import signal
    import time
    results = tmp_path_factory.mktemp("results")
    marker = results / "blocking"
    env = dict(os.environ, PYTHONPATH=str(REPO / "runners"), BROKEN_BLOCK_FILE=str(marker))
    p = subprocess.Popen(["/usr/bin/python3", "-m", "cvmconf", "--build-dir", str(build_dir),
                          "--suite-dir", str(broken_dir), "--catalogue", str(BROKEN_CATALOGUE),
                          "run", "--test-timeout", "8", "--results-dir", str(results),
                          "--run-id", "every"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    run_dir = results / "every"
    assert (run_dir / "run.json").exists(), out[-3000:] + err[-3000:]
    data = json.loads((run_dir / "run.json").read_text())
    outcomes = {t["outcome"] for t in data["tests"]}
    assert outcomes == {"PASS", "FAIL", "SKIP", "ERROR", "TIMEOUT", "NOT RUN"}, \
        (outcomes, out[-3000:], err[-3000:])
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), run_dir, data


def fake_bzimage(path: Path) -> Path:
    """A file with a bzImage's header magic and nothing else: enough for resolving, not booting."""
    path.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 16)
    return path


def leftovers(token: str) -> list[str]:
    """Live processes whose environment carries CVMCONF_TEST_TOKEN=token: a test passes a fresh
    token to a run, and every process the run starts (suite binaries, QEMU, their children)
    inherits it, so this finds what a run left behind and nothing of anyone else's."""
    needle = f"CVMCONF_TEST_TOKEN={token}".encode()
    found = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{e}/environ").read_bytes()
            comm = Path(f"/proc/{e}/comm").read_text().strip()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(f"{e} {comm}")
    return found

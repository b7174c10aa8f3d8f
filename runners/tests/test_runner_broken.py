"""The runner against a purpose-built broken GoogleTest binary (runners/tests/broken_suite): tests
that pass, fail, skip, abort, segfault, hang, take an unexpected SIGBUS and _exit(0) without a
report. The run completes, the other tests' results are kept, and every broken test is ERROR or
TIMEOUT with evidence."""
import json
import os

import pytest

from conftest import run_broken

EXPECTED = {
    "Broken.Passes1": "PASS",
    "Broken.FailsWithMarkup": "FAIL",
    "Broken.Skips": "SKIP",
    "Broken.Aborts": "ERROR",
    "Broken.Passes2": "PASS",
    "Broken.Segfaults": "ERROR",
    "Broken.Passes3": "PASS",
    "Broken.Hangs": "TIMEOUT",
    "Broken.Passes4": "PASS",
    "Broken.UnexpectedSigbus": "ERROR",
    "Broken.Passes5": "PASS",
    "Broken.ExitsWithoutReport": "ERROR",
    "Broken.Passes6": "PASS",
    "Broken.FailsOnlyTheFirstTime": "PASS",
    "Broken.HarnessSetupFails": "ERROR",
    "Broken.PassesOrBlocks": "PASS",
}


def kmsg_watchable() -> bool:
    return os.access("/dev/kmsg", os.R_OK | os.W_OK)


def by_name(data):
    return {t["name"]: t for t in data["tests"]}


def test_run_completes_and_keeps_every_result(broken_run):
    r, run_dir, data = broken_run
    assert data["complete"] is True, data["incomplete_reason"]
    tests = by_name(data)
    assert {n: t["outcome"] for n, t in tests.items()} == EXPECTED
    # A failing conformance test makes the run non-conforming (exit 1), not a harness error.
    assert r.returncode == 1, r.stderr
    assert data["summary"]["exit_code"] == 1
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    for f in ("run.json", "junit.xml", "results.ktap", "report.md", "report.html"):
        assert (run_dir / f).is_file(), f


def test_results_come_from_several_batches_with_the_rest_rerun(broken_run):
    _, run_dir, data = broken_run
    batches = data["batches"]
    # Four crashes/exits and one hang: the first batch plus one re-run per broken test.
    assert len(batches) == 6, [b["exit"] for b in batches]
    assert batches[0]["filter"] == "*"
    for b in batches[1:]:
        assert b["label"].endswith("-rest")
    # Later batches exclude (or no longer name) what already finished or broke.
    assert "Broken.Aborts" not in batches[1]["filter"].split("-", 1)[0] or \
        "Broken.Aborts" in batches[1]["filter"].split("-", 1)[1]
    for b in batches:
        assert (run_dir / "batches" / b["label"] / "output.txt").exists()


def test_a_harness_setup_failure_is_error_not_fail(broken_run):
    _, _, data = broken_run
    t = by_name(data)["Broken.HarnessSetupFails"]
    assert t["outcome"] == "ERROR"
    assert any("harness set-up failed" in m and "mapping the test's memory" in m
               for m in t["messages"]), t["messages"]
    assert t["properties"]["harness_error"].startswith("mapping the test's memory")
    # The requirement it names is not declared non-conforming.
    req = {r["id"]: r for r in data["requirements"]}["BROKEN-011"]
    assert req["outcome"] == "ERROR", req


@pytest.mark.parametrize("test, exit_text", [
    ("Broken.Aborts", "killed by SIGABRT (signal 6)"),
    ("Broken.Segfaults", "killed by SIGSEGV (signal 11)"),
    ("Broken.UnexpectedSigbus", "killed by SIGBUS (signal 7)"),
    ("Broken.ExitsWithoutReport", "exited with status 0"),
    ("Broken.Hangs", "exceeded its 3 s timeout"),
])
def test_broken_tests_carry_evidence(broken_run, test, exit_text):
    _, _, data = broken_run
    t = by_name(data)[test]
    assert exit_text in t["evidence"]["exit"]
    assert f"[ RUN      ] {test}" in t["evidence"]["output_tail"]
    assert t["messages"] and t["messages"][0]
    assert t["requirements"], "requirement IDs come from the listing when the test died"
    assert t["status"] == "ERROR"          # KCIDB: TIMEOUT maps to ERROR


@pytest.mark.skipif(not kmsg_watchable(), reason="/dev/kmsg is not readable and writable here: "
                                                 "no kernel-log lines to attribute")
@pytest.mark.parametrize("test, marker", [
    ("Broken.Aborts", "about to abort"),
    ("Broken.Segfaults", "about to segfault"),
    ("Broken.UnexpectedSigbus", "about to take SIGBUS"),
    ("Broken.ExitsWithoutReport", "about to _exit(0)"),
    ("Broken.Hangs", "about to hang"),
])
def test_broken_tests_carry_their_kernel_log_lines(broken_run, test, marker):
    _, _, data = broken_run
    t = by_name(data)[test]
    assert any(marker in line for line in t["kernel_log"]), t["kernel_log"]
    if test == "Broken.Segfaults":
        assert any("segfault at 0" in line for line in t["kernel_log"]), t["kernel_log"]


def test_timeout_is_reported_with_its_limit(broken_run):
    _, _, data = broken_run
    t = by_name(data)["Broken.Hangs"]
    assert t["outcome"] == "TIMEOUT"
    assert t["duration"] == pytest.approx(3.0)
    assert "did not finish within 3 s" in t["messages"][0]


def test_finished_tests_keep_their_own_evidence(broken_run):
    _, _, data = broken_run
    tests = by_name(data)
    fail = tests["Broken.FailsWithMarkup"]
    assert "<script>alert('x')</script>" in fail["messages"][0]
    assert fail["properties"]["observation"] == "<i>value</i> & more"
    assert tests["Broken.Skips"]["skip_reason"] == \
        "not applicable: the broken suite skips this on purpose"
    assert tests["Broken.Passes6"]["properties"]["ops_per_sec"] == "1234.5"


def test_requirements_roll_up_and_say_why_not_exercised(broken_run):
    _, _, data = broken_run
    reqs = {r["id"]: r for r in data["requirements"]}
    assert reqs["BROKEN-001"]["outcome"] == "PASS" and reqs["BROKEN-001"]["exercised"]
    assert reqs["BROKEN-002"]["outcome"] == "FAIL" and reqs["BROKEN-002"]["exercised"]
    assert reqs["BROKEN-003"]["outcome"] == "SKIP" and not reqs["BROKEN-003"]["exercised"]
    assert "not applicable" in reqs["BROKEN-003"]["reason"]
    assert reqs["BROKEN-006"]["outcome"] == "TIMEOUT"
    assert "did not complete" in reqs["BROKEN-006"]["reason"]
    assert reqs["BROKEN-009"]["outcome"] == "NOT RUN"
    assert "nothing can check it" in reqs["BROKEN-009"]["reason"]


def test_markdown_report_lists_failures_first_and_every_requirement(broken_run):
    _, run_dir, data = broken_run
    md = (run_dir / "report.md").read_text()
    fail_at = md.index("Failures\n")
    assert md.index("BROKEN-002 (MUST, harness-selftest): FAIL") > fail_at
    assert md.index("BROKEN-002 (MUST, harness-selftest): FAIL") < md.index("Requirements\n---")
    for r in data["requirements"]:
        assert r["id"] in md
    assert "Not exercised" in md and "nothing can check it in the broken suite" in md
    assert "\x1b" not in md, "control characters are shown as escapes"
    assert "throughput" not in md or "1234.5" in md
    assert "1234.5" in md      # stress-test throughput table


def test_progress_is_one_plain_line_per_test_when_not_a_tty(broken_run):
    r, _, _ = broken_run
    lines = [l for l in r.stdout.splitlines() if l.split(" ", 1)[0] in
             ("PASS", "FAIL", "SKIP", "ERROR", "TIMEOUT")]
    assert len(lines) == len(EXPECTED)
    assert "\x1b" not in r.stdout and "\r" not in r.stdout
    assert "DOES NOT CONFORM" in r.stdout
    assert "throughput: Broken.Passes6: 1234.5 ops/s" in r.stdout


def test_sharded_parallel_run_gives_the_same_outcomes(build_dir, broken_dir, tmp_path):
    r, _, data = run_broken(build_dir, broken_dir, tmp_path, "sharded", "--batch-size", "5",
                            "--jobs", "3")
    assert data is not None, r.stderr
    assert {t["name"]: t["outcome"] for t in data["tests"]} == EXPECTED
    shards = [b for b in data["batches"] if "shard" in b["label"] and "rest" not in b["label"]]
    n = -(-len(EXPECTED) // 5)            # shards of at most 5 tests
    assert sorted(b["shard"][0] for b in shards) == list(range(n))
    assert all(b["shard"][1] == n for b in shards)


def test_retry_marks_a_test_that_passes_later_as_flaky(build_dir, broken_dir, tmp_path):
    flag = tmp_path / "flaky-flag"
    r, _, data = run_broken(build_dir, broken_dir, tmp_path, "retry", "--retry-failed", "2",
                            "-k", "FailsOnlyTheFirstTime or FailsWithMarkup or Passes1",
                            env={"BROKEN_FLAKY_FILE": str(flag)})
    assert data is not None, r.stderr
    tests = by_name(data)
    flaky = tests["Broken.FailsOnlyTheFirstTime"]
    assert flaky["outcome"] == "FAIL" and flaky["flaky"] is True
    assert [a["outcome"] for a in flaky["attempts"]] == ["PASS"]
    steady = tests["Broken.FailsWithMarkup"]
    assert steady["flaky"] is False
    assert [a["outcome"] for a in steady["attempts"]] == ["FAIL", "FAIL"]
    assert tests["Broken.Passes1"]["attempts"] == []
    assert data["summary"]["flaky"] == 1
    assert "retry 1:" in r.stdout


def test_crash_before_the_first_test_makes_every_test_error(build_dir, broken_dir, tmp_path):
    r, _, data = run_broken(build_dir, broken_dir, tmp_path, "crash-start", "-k", "Passes",
                            env={"BROKEN_AT_START": "crash"})
    assert r.returncode == 3, r.stdout[-2000:]
    assert data["tests"] and all(t["outcome"] == "ERROR" for t in data["tests"])
    assert all("made no progress" in t["messages"][0] for t in data["tests"])
    assert any("SIGABRT" in p["problem"] for p in data["problems"])


def test_hang_outside_any_test_hits_the_idle_timeout(build_dir, broken_dir, tmp_path):
    r, _, data = run_broken(build_dir, broken_dir, tmp_path, "hang-start", "-k", "Passes1",
                            "--idle-timeout", "1", env={"BROKEN_AT_START": "hang"})
    assert r.returncode == 3
    t = data["tests"][0]
    assert t["outcome"] == "ERROR"
    assert "no test running for 1 s" in t["evidence"]["exit"]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGINT-inherited-ignored"])
def test_interrupted_run_is_marked_incomplete(build_dir, broken_dir, tmp_path, signame):
    """While a run is going, run.json says it is incomplete (a runner killed outright leaves it
    so); an interrupted run kills its batch and says what did not run."""
    import signal
    import subprocess
    import time
    from conftest import BROKEN_CATALOGUE, REPO
    env = dict(os.environ, PYTHONPATH=str(REPO / "runners"))
    p = subprocess.Popen(["/usr/bin/python3", "-m", "cvmconf", "--build-dir", str(build_dir),
                          "--suite-dir", str(broken_dir), "--catalogue", str(BROKEN_CATALOGUE),
                          "run", "-k", "Hangs or Passes6", "--test-timeout", "60",
                          "--results-dir", str(tmp_path), "--run-id", "stopped"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # A background job of a non-interactive shell starts with SIGINT
                         # ignored; the runner must still stop on it.
                         preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                         if signame.endswith("ignored") else None)
    run_dir = tmp_path / "stopped"
    deadline = time.monotonic() + 60
    while not (run_dir / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    early = json.loads((run_dir / "run.json").read_text())
    assert early["complete"] is False and "did not finish" in early["incomplete_reason"]
    time.sleep(2.0)                       # the Hangs test is running now (60 s timeout)
    p.send_signal(getattr(signal, signame.split("-")[0]))
    out, err = p.communicate(timeout=60)
    assert p.returncode == 3, out[-2000:] + err[-2000:]
    data = json.loads((run_dir / "run.json").read_text())
    assert data["complete"] is False
    assert "interrupted" in data["incomplete_reason"]
    outcomes = {t["name"]: t["outcome"] for t in data["tests"]}
    assert outcomes["Broken.Hangs"] == "NOT RUN"
    assert "INCOMPLETE RUN" in (run_dir / "report.md").read_text()
    assert "INCOMPLETE RUN" in out


def test_a_binary_that_cannot_list_its_tests_leaves_the_run_incomplete(build_dir, broken_dir,
                                                                       tmp_path):
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "cvm_suite_broken").symlink_to(broken_dir / "cvm_suite_broken")
    bad = suites / "cvm_suite_garbage"
    bad.write_text("#!/bin/sh\necho 'this is not a test list'\n")
    bad.chmod(0o755)
    r, _, data = run_broken(build_dir, suites, tmp_path, "garbage", "-k", "Passes1")
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert data["complete"] is False
    assert "could not be listed" in data["incomplete_reason"]
    assert "cvm_suite_garbage" in data["incomplete_reason"]
    assert [(t["name"], t["outcome"]) for t in data["tests"]] == [("Broken.Passes1", "PASS")]


def test_results_are_written_when_the_run_directory_is_gone(broken_run, tmp_path):
    # Removed under a running run (a cleanup job): the results are written all the same, no
    # traceback (the directory listing of what was there before must not fail).
    from cvmconf import cli
    _, _, data = broken_run
    gone = tmp_path / "gone"
    written = cli._write_outputs_or_fallback(data, gone, {"format": data["format"]})
    assert (written / "run.json").is_file() and (written / "report.md").is_file()
    assert json.loads((written / "run.json").read_text())["run_id"] == data["run_id"]

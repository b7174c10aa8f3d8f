"""The executor's interpretation of raw batch outputs, independent of any real binary: a target
(here a scripted one, as a QEMU target would be) only returns BatchOutputs."""
import json

import pytest

from cvmconf import executor as ex
from cvmconf import gtest
from cvmconf.kmsg import KernelLine
from cvmconf.targets.base import (KILLED_INTERRUPTED, KILLED_TEST_TIMEOUT, BatchOutput, BatchPlan,
                                  SuiteBinary, Target)

BIN = SuiteBinary("cvm_suite_fake", None)
ALL = ["S.a", "S.b", "S.c", "S.d"]
REQS = {t: ["FAKE-001"] for t in ALL}


def plan(tests=ALL, label="001-fake"):
    return BatchPlan(binary=BIN, label=label, tests=list(tests),
                     gtest_filter=ex.gtest_filter(list(tests), ALL), shard=None, env={},
                     test_timeout=5, idle_timeout=5, batch_timeout=30)


def ev_lines(*evs):
    return "".join(json.dumps(e) + "\n" for e in evs)


def start(t, us):
    return {"event": "start", "test": t, "mono_us": us}


def end(t, us, failures=(), skipped=False):
    return {"event": "end", "test": t, "mono_us": us, "skipped": skipped,
            "failures": list(failures), "elapsed_ms": 3, "properties": {"requirements": "FAKE-001"}}


def report(*tests):
    return json.dumps({"testsuites": [{"name": "S", "testsuite": [
        {"name": n.split(".")[1], "status": "RUN", "result": "COMPLETED", "time": "0.01s",
         "requirements": "FAKE-001", **({"failures": [{"failure": "f"}]} if fail else {})}
        for n, fail in tests]}]})


def test_filters():
    assert ex.gtest_filter(ALL, ALL) == "*"
    assert ex.gtest_filter(["S.a"], ALL) == "S.a"
    assert ex.gtest_filter(["S.b", "S.c", "S.d"], ALL) == "*-S.a"


def test_clean_batch_uses_the_report():
    out = BatchOutput(plan=plan(), exit_code=1,
                      report_json=report(("S.a", False), ("S.b", True), ("S.c", False),
                                         ("S.d", False)),
                      events=ev_lines(start("S.a", 1), end("S.a", 2)))
    it = ex.interpret(out, REQS)
    assert {k: r.outcome for k, r in it.results.items()} == \
        {"S.a": "PASS", "S.b": "FAIL", "S.c": "PASS", "S.d": "PASS"}
    assert it.problems == []


def test_test_missing_from_a_clean_report_is_an_error_not_a_pass():
    out = BatchOutput(plan=plan(), exit_code=0, report_json=report(("S.a", False)))
    it = ex.interpret(out, REQS)
    assert it.results["S.a"].outcome == "PASS"
    for t in ("S.b", "S.c", "S.d"):
        assert it.results[t].outcome == "ERROR"
        assert "not in the report" in it.results[t].messages[0]


def test_inconsistent_exit_status_is_a_problem():
    out = BatchOutput(plan=plan(["S.a"]), exit_code=1, report_json=report(("S.a", False)))
    assert ex.interpret(out, REQS).problems == ["exited with status 1 although no test failed"]


def test_harness_error_is_a_failed_test_for_the_exit_status():
    # A set-up failure (ERROR, not FAIL) still made GoogleTest exit 1: that is consistent.
    doc = json.loads(report(("S.a", True)))
    doc["testsuites"][0]["testsuite"][0]["harness_error"] = "mapping the test's memory: ENOMEM"
    out = BatchOutput(plan=plan(["S.a"]), exit_code=1, report_json=json.dumps(doc))
    it = ex.interpret(out, REQS)
    assert it.results["S.a"].outcome == "ERROR"
    assert it.problems == []


def test_crash_keeps_finished_tests_and_blames_the_running_one():
    lines = [KernelLine(900_000, "before the test"), KernelLine(1_000_500, "during c"),
             KernelLine(1_200_000, "oops c")]
    out = BatchOutput(plan=plan(), signal=11, premature_exit=True,
                      events=ev_lines(start("S.a", 10), end("S.a", 20),
                                      start("S.b", 30), end("S.b", 40, failures=["boom"]),
                                      start("S.c", 1_000_000)),
                      output="[ RUN      ] S.b\nboom\n[ RUN      ] S.c\nlast words\n",
                      kernel_log=lines)
    it = ex.interpret(out, REQS)
    assert it.results["S.a"].outcome == "PASS"
    assert it.results["S.b"].outcome == "FAIL" and it.results["S.b"].messages == ["boom"]
    c = it.results["S.c"]
    assert c.outcome == "ERROR"
    assert "SIGSEGV" in c.messages[0] and c.requirements == ["FAKE-001"]
    assert c.evidence["output_tail"] == "[ RUN      ] S.c\nlast words\n"
    assert [l.split("] ", 1)[1] for l in c.kernel_log] == ["during c", "oops c"]
    assert "premature_exit" in c.evidence
    assert "S.d" not in it.results           # the caller runs it again


def test_per_test_timeout_is_timeout():
    out = BatchOutput(plan=plan(), killed=KILLED_TEST_TIMEOUT, killed_test="S.b", signal=9,
                      events=ev_lines(start("S.a", 1), end("S.a", 2), start("S.b", 3)))
    it = ex.interpret(out, REQS)
    assert it.results["S.b"].outcome == "TIMEOUT"
    assert it.results["S.b"].duration == 5


def test_unreadable_event_stream_is_a_problem_and_no_progress():
    out = BatchOutput(plan=plan(), signal=6, events="garbage\n")
    it = ex.interpret(out, REQS)
    assert it.results == {}
    assert any("unreadable event stream" in p for p in it.problems)


def test_interrupted_batch_blames_nobody():
    out = BatchOutput(plan=plan(), killed=KILLED_INTERRUPTED, signal=9,
                      events=ev_lines(start("S.a", 1), end("S.a", 2), start("S.b", 3)))
    it = ex.interpret(out, REQS)
    assert it.interrupted and set(it.results) == {"S.a"}


class ScriptedTarget(Target):
    """A target that replays canned outputs: enough to drive the executor's chain logic."""
    kind = "scripted"

    def __init__(self, script):
        super().__init__()
        self.script = script
        self.plans = []

    def check(self):
        pass

    def fingerprint(self):
        return {}

    def list_suite(self, binary):
        return gtest.SuiteListing(tests=list(ALL), requirements=dict(REQS))

    def run_batch(self, plan, on_event=None):
        self.plans.append(plan)
        return self.script(plan)


def test_chain_reruns_the_rest_after_each_crash():
    def script(p):
        first = p.tests[0]
        if first in ("S.a", "S.c"):   # crash in the first test of these batches
            return BatchOutput(plan=p, signal=11, events=ev_lines(start(first, 1)))
        return BatchOutput(plan=p, exit_code=0,
                           report_json=report(*[(t, False) for t in p.tests]))
    target = ScriptedTarget(script)
    e = ex.Executor(target, ex.Options())
    (fut,) = e.submit(BIN, ALL, ALL, REQS)
    res = fut.result()
    e.shutdown()
    assert {k: r.outcome for k, r in res.items()} == \
        {"S.a": "ERROR", "S.b": "PASS", "S.c": "PASS", "S.d": "PASS"}
    assert [p.gtest_filter for p in target.plans] == ["*", "*-S.a"]


def test_chain_stops_when_a_batch_makes_no_progress():
    target = ScriptedTarget(lambda p: BatchOutput(plan=p, signal=6, output="died early"))
    e = ex.Executor(target, ex.Options())
    (fut,) = e.submit(BIN, ALL, ALL, REQS)
    res = fut.result()
    e.shutdown()
    assert len(target.plans) == 1
    assert all(r.outcome == "ERROR" and "made no progress" in r.messages[0] for r in res.values())
    assert any("no test made progress" in p["problem"] for p in e.problems)


def test_a_target_that_raises_does_not_lose_the_run():
    def script(p):
        raise RuntimeError("VM died")
    e = ex.Executor(ScriptedTarget(script), ex.Options())
    (fut,) = e.submit(BIN, ALL, ALL, REQS)
    res = fut.result()
    e.shutdown()
    assert all(r.outcome == "ERROR" for r in res.values())
    assert "target scripted failed: RuntimeError: VM died" in res["S.a"].messages[0]


def test_sharding_plans_disjoint_shards_covering_everything():
    seen = []

    def script(p):
        seen.append((p.shard, p.tests, p.gtest_filter))
        return BatchOutput(plan=p, exit_code=0, report_json=report(*[(t, False) for t in p.tests]))
    e = ex.Executor(ScriptedTarget(script), ex.Options(batch_size=2, jobs=2))
    futs = e.submit(BIN, ALL, ALL, REQS)
    res = {}
    for f in futs:
        res.update(f.result())
    e.shutdown()
    assert set(res) == set(ALL)
    shards = sorted(seen)
    assert [s[0] for s in shards] == [(0, 2), (1, 2)]
    assert shards[0][1] == ["S.a", "S.c"] and shards[1][1] == ["S.b", "S.d"]
    assert all(s[2] == "*" for s in shards)      # GoogleTest splits the same filter


def test_duration_extends_timeouts_and_reaches_the_binary():
    o = ex.Options(test_timeout=10, duration=20)
    assert o.effective_test_timeout() == 50
    assert o.batch_env() == {"CVMCONF_DURATION": "20"}


@pytest.mark.parametrize("sig, text", [(11, "SIGSEGV (signal 11)"), (7, "SIGBUS (signal 7)"),
                                       (99, "signal 99")])
def test_signals_are_named(sig, text):
    assert ex.describe_signal(sig) == text

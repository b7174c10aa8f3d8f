"""Small pieces of the runner: the kernel-log reader, platform detection, the progress display,
the roll-up, the verdict and the comparison rules."""
import io
import os

import pytest

from cvmconf import catalogue, compare, fingerprint, gtest, kmsg, results, rollup
from cvmconf.progress import Progress

# ---------------------------------------------------------------------------------------------
# kmsg


def test_kmsg_records_parse():
    line = kmsg.parse_record(b"6,1234,5000123,-;hello world\n SUBSYSTEM=x\n")
    assert line == kmsg.KernelLine(5000123, "hello world")
    assert line.render() == "[    5.000123] hello world"
    assert kmsg.parse_record(b"garbage") is None
    assert kmsg.parse_record(b"6,1;x") is None
    assert kmsg.parse_record(b"a,b,c,-;x") is None


def test_unreadable_kernel_log_says_why():
    r = kmsg.KmsgReader("/nonexistent/kmsg")
    assert not r.available and r.drain() == []
    assert "No such file or directory (ENOENT)" in r.error
    ok, why = kmsg.probe_readable("/nonexistent/kmsg")
    assert ok is False and "ENOENT" in why


@pytest.mark.skipif(not os.access("/dev/kmsg", os.R_OK | os.W_OK), reason="needs /dev/kmsg (root)")
def test_kernel_log_reader_sees_new_lines_only():
    marker = f"cvmconf runner kmsg test {os.getpid()}"
    with kmsg.KmsgReader() as r:
        assert r.available
        with open("/dev/kmsg", "w") as f:
            f.write(marker + "\n")
        lines = r.drain()
    assert any(l.text == marker for l in lines)
    with kmsg.KmsgReader() as r2:
        assert all(l.text != marker for l in r2.drain())     # opened at the end


# ---------------------------------------------------------------------------------------------
# fingerprint

def vm(name, t, creatable, err=""):
    d = {"name": name, "type": t, "creatable": creatable}
    if not creatable:
        d["create_error"] = err
    return d


def test_platforms_detected_from_creatable_vm_types():
    probe = {"kvm_available": True,
             "vm_types": [vm("x86-default", 0, True), vm("x86-sw-protected", 1, True),
                          vm("x86-snp", 4, True), vm("x86-tdx", 5, False, "not advertised")],
             "host_hints": {"kvm_amd.sev_snp": "Y", "kvm_intel.tdx": "", "kvm-arm.mode": ""}}
    p = fingerprint.detect_platforms(probe)
    assert p["labels"] == ["non-CoCo", "SW_PROTECTED", "SNP"]
    assert p["unavailable"] == [{"platform": "TDX", "vm_type": "x86-tdx",
                                 "reason": "not advertised"}]
    assert p["notes"] == []


def test_host_hint_without_a_usable_vm_is_noted():
    probe = {"kvm_available": True, "vm_types": [vm("arm64-default", 0, True),
                                                 vm("arm64-pkvm-protected", 31, False, "EINVAL")],
             "host_hints": {"kvm-arm.mode": "protected"}}
    p = fingerprint.detect_platforms(probe)
    assert p["labels"] == ["non-CoCo"]
    assert p["notes"] == ["host has kvm-arm.mode=protected but no pKVM VM could be created"]


def test_pkvm_host_mode_says_whether_protected_vms_were_created():
    hints = {"kvm-arm.mode": "protected", "arm64_pkvm_initialized": True}
    ok = {"kvm_available": True, "host_hints": hints,
          "vm_types": [vm("arm64-default", 0, True), vm("arm64-pkvm-protected", 2**31, True)]}
    assert fingerprint.host_mode(ok) == ("pKVM host (kvm-arm.mode=protected, protected mode "
                                         "initialized; protected VMs available)")
    bad = dict(ok, vm_types=[vm("arm64-pkvm-protected", 2**31, False, "KVM_CREATE_VM: EINVAL")])
    assert fingerprint.host_mode(bad).endswith("protected VMs not creatable: KVM_CREATE_VM: EINVAL)")
    requested = {"kvm_available": True, "host_hints": {"kvm-arm.mode": "protected"}}
    assert "not initialized" in fingerprint.host_mode(requested)


def test_unknown_vm_types_and_probe_fields_flow_through():
    probe = {"kvm_available": True, "vm_types": [vm("x86-future", 9, True)],
             "conversion_backends": [{"name": "in-place", "available": False}]}
    fp = fingerprint.build(probe=probe, kernel_release="r", kernel_version="v", arch="x86_64",
                           cpuinfo="model name\t: Some CPU\n", cpus=2, config_sha256=None,
                           config_source=None, config_error="absent", hugetlb_sizes_kib=[2048],
                           kmsg_readable=False, kmsg_error="EACCES")
    assert fp["platforms"]["labels"] == ["x86-future"]
    assert fp["probe"]["conversion_backends"] == probe["conversion_backends"]
    assert fp["cpu_model"] == "Some CPU"
    assert fp["kmsg"] == {"readable": False, "error": "EACCES"}


def test_local_host_facts(tmp_path):
    assert all(isinstance(s, int) and s > 0 for s in fingerprint.hugetlb_sizes())
    for d in ("hugepages-1048576kB", "hugepages-2048kB", "not-hugepages", "hugepages-xkB"):
        (tmp_path / d).mkdir()
    assert fingerprint.hugetlb_sizes(str(tmp_path)) == [2048, 1048576]
    assert fingerprint.hugetlb_sizes(str(tmp_path / "absent")) == []
    sha, source, err = fingerprint.kernel_config_hash(os.uname().release)
    assert (sha and source and not err) or (not sha and err)


# ---------------------------------------------------------------------------------------------
# progress

def res(name, outcome, **kw):
    return gtest.TestResult(name=name, binary="cvm_suite_x", outcome=outcome, **kw)


def test_progress_plain_lines():
    out = io.StringIO()
    p = Progress(out, live=False, total=2)
    p.test_started("cvm_suite_x", "S.a")
    p.test_done(res("S.a", "PASS", duration=0.5))
    p.test_done(res("S.b", "SKIP", skip_reason="capability absent: \x1bthing"))
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("PASS ") and "[1/2] x S.a" in lines[0]
    assert "capability absent: \\x1bthing" in lines[1]
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_progress_live_lines_have_colour_and_a_status_line():
    out = io.StringIO()
    p = Progress(out, live=True, total=1)
    p.test_started("cvm_suite_x", "S.a")
    assert "running: x S.a" in out.getvalue()
    p.test_done(res("S.a", "FAIL", messages=["f.cc:1\nFailed\nthe kernel said yes"]))
    p.close()
    text = out.getvalue()
    assert "\x1b[31;1mFAIL" in text and "the kernel said yes" in text
    assert "\r\x1b[K" in text


# ---------------------------------------------------------------------------------------------
# roll-up and verdict

CAT = catalogue.Catalogue(path="x", families={"f": {}}, platforms={}, capabilities={}, requirements=[
    catalogue.Requirement(id=i, family="f", level=lvl, statement="s", seeds=("a",), refs=(),
                          platforms=(), needs=(), tests=("*",), untested_reason=None)
    for i, lvl in (("A-001", "MUST"), ("A-002", "MUST"), ("A-003", "INFO"), ("A-004", "MUST"))])


@pytest.mark.parametrize("outcomes, want", [
    (["PASS", "SKIP"], "PASS"), (["PASS", "FAIL", "ERROR"], "FAIL"),
    (["PASS", "TIMEOUT", "ERROR"], "ERROR"), (["PASS", "TIMEOUT"], "TIMEOUT"),
    (["SKIP"], "SKIP"), ([], "NOT RUN")])
def test_roll_up_order(outcomes, want):
    assert rollup.roll_up(outcomes) == want


def test_requirement_reasons():
    rs = [res("S.a", "PASS", requirements=["A-001"], properties={"platform": "x86-default"}),
          res("S.b", "SKIP", requirements=["A-001"], skip_reason="capability absent: y"),
          res("S.c", "SKIP", requirements=["A-002"], skip_reason="capability absent: y"),
          res("S.d", "SKIP", requirements=["A-002"], skip_reason="capability absent: y"),
          res("S.e", "ERROR", requirements=["A-003"])]
    rr = {r.id: r for r in rollup.requirement_results(
        CAT, rs, available={"A-001": ["S.a"], "A-002": ["S.c"], "A-003": ["S.e"],
                            "A-004": ["S.z"]}, selected={"S.a", "S.b", "S.c", "S.d", "S.e"})}
    assert rr["A-001"].exercised and rr["A-001"].platforms == ["x86-default"]
    assert rr["A-002"].reason == "skipped: capability absent: y (2 tests)"
    assert rr["A-003"].outcome == "ERROR" and "did not complete" in rr["A-003"].reason
    assert rr["A-004"].reason == "not selected by the filters of this run"


def test_skip_reason_of_an_offered_platform_comes_first():
    """CONV-005 on 7.2: two platforms the kernel does not offer (SNP, TDX) must not hide why
    the one it offers skipped."""
    rs = [res("S.snp", "SKIP", requirements=["A-001"],
              skip_reason="capability absent: VM type 4 (x86-snp) not offered by this kernel: x"),
          res("S.tdx", "SKIP", requirements=["A-001"],
              skip_reason="capability absent: VM type 5 (x86-tdx) not offered by this kernel: x"),
          res("S.def", "SKIP", requirements=["A-001"], skip_reason="capability absent: z"),
          res("S.sw", "SKIP", requirements=["A-001"],
              skip_reason="not applicable: per-VM attributes keep shared memory apart")]
    rr = {r.id: r for r in rollup.requirement_results(CAT, rs)}
    reason = rr["A-001"].reason
    assert reason.startswith("skipped: not applicable: per-VM attributes"), reason
    assert reason.index("capability absent: z") < reason.index("x86-snp"), reason


def entries(*pairs):
    return [{"outcome": o, "requirements": r} for o, r in pairs]


def test_verdicts_and_exit_codes():
    def reqs(**outcomes):
        return [rollup.RequirementResult(i, lvl, outcomes.get(i.replace("-", "_"), "PASS"),
                                         outcomes.get(i.replace("-", "_"), "PASS") in ("PASS", "FAIL"),
                                         [], "")
                for i, lvl in (("A-001", "MUST"), ("A-003", "INFO"))]
    assert results.verdict(reqs(), entries(("PASS", ["A-001"])), True, [])[0] == 0
    assert results.verdict(reqs(A_001="FAIL"), entries(("FAIL", ["A-001"])), True, [])[0] == 1
    # A failing INFO requirement never makes the kernel non-conforming.
    assert results.verdict(reqs(A_003="FAIL"), entries(("FAIL", ["A-003"])), True, [])[0] == 0
    assert results.verdict(reqs(), entries(("ERROR", ["A-001"])), True, [])[0] == 3
    assert results.verdict(reqs(), entries(("PASS", ["A-001"])), False, [])[0] == 3
    assert results.verdict(reqs(), [], True, [{"problem": "x"}])[0] == 3
    # Non-conformance wins over harness errors.
    assert results.verdict(reqs(A_001="FAIL"), entries(("FAIL", ["A-001"]), ("ERROR", [])),
                           False, [])[0] == 1
    code, text = results.verdict(reqs(A_001="SKIP"), entries(("SKIP", ["A-001"])), True, [])
    assert code == 0 and text == ("NO MUST REQUIREMENT EXERCISED (1 of 2 requirements exercised; "
                                  "1 not exercised: see below)")
    # Only the INFO requirement exercised: still no MUST exercised, still exit 0.
    code, text = results.verdict(reqs(A_001="SKIP", A_003="PASS"),
                                 entries(("SKIP", ["A-001"]), ("PASS", ["A-003"])), True, [])
    assert code == 0 and text.startswith("NO MUST REQUIREMENT EXERCISED (1 of 2 requirements")


def test_verdict_line_says_how_much_was_exercised():
    def rr(rid, level, outcome):
        return rollup.RequirementResult(rid, level, outcome, outcome in ("PASS", "FAIL"), [], "")
    reqs = [rr("A-001", "MUST", "PASS"), rr("A-002", "SHOULD", "PASS"), rr("A-003", "INFO", "PASS"),
            rr("A-004", "MUST", "PASS")] + [rr(f"B-{i:03}", "MUST", "SKIP") for i in range(51)]
    assert results.verdict(reqs, entries(("PASS", ["A-001"])), True, []) == \
        (0, "CONFORMS (4 of 55 requirements exercised; 51 not exercised: see below)")
    reqs[0] = rr("A-001", "MUST", "FAIL")
    assert results.verdict(reqs, entries(("FAIL", ["A-001"])), True, []) == \
        (1, "DOES NOT CONFORM: 1 MUST/SHOULD requirement fails (4 of 55 requirements exercised; "
            "51 not exercised: see below)")
    every = [rr("A-001", "MUST", "PASS")]
    assert results.verdict(every, entries(("PASS", ["A-001"])), True, [])[1] == \
        "CONFORMS (1 of 1 requirements exercised)"


def test_kcidb_paths_and_patchset_hash(tmp_path):
    assert results.test_path("cvm_suite_gmem_mmap", "Platforms/GmemFile.Flags/x86_default") == \
        "cvmconf.gmem_mmap.Platforms.GmemFile.Flags.x86_default"
    assert results.test_path("cvm_suite_x", "A.b c+d") == "cvmconf.x.A.b_c_d"
    assert results.patchset_hash([]) == ""
    p1, p2 = tmp_path / "1.patch", tmp_path / "2.patch"
    p1.write_text("one\n")
    p2.write_text("two\n")
    import hashlib
    inner = "".join(hashlib.sha256(p.read_bytes()).hexdigest() + "\n" for p in (p1, p2))
    assert results.patchset_hash([str(p1), str(p2)]) == hashlib.sha256(inner.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# compare

def run_of(tests, reqs=()):
    return {"run_id": "r", "complete": True, "fingerprint": {}, "checkout": {}, "summary": {},
            "tests": [{"binary": "b", "name": n, "outcome": o, "requirements": r,
                       "messages": m, "skip_reason": "", "properties": p}
                      for n, o, r, m, p in tests],
            "requirements": [{"id": i, "level": lvl, "outcome": o, "exercised": o in ("PASS", "FAIL")}
                             for i, lvl, o in reqs]}


def test_compare_categories():
    base = run_of([("a", "PASS", ["A-001"], [], {}), ("b", "FAIL", ["A-001"], ["x"], {}),
                   ("c", "SKIP", ["A-001"], [], {}), ("d", "PASS", ["A-001"], [], {}),
                   ("e", "FAIL", ["A-001"], ["old"], {}), ("f", "PASS", [], [], {"k": "1"}),
                   ("g", "PASS", [], [], {"ops_per_sec": "1"}), ("gone", "PASS", [], [], {})],
                  [("A-001", "MUST", "FAIL")])
    new = run_of([("a", "TIMEOUT", ["A-001"], ["t"], {}), ("b", "PASS", ["A-001"], [], {}),
                  ("c", "PASS", ["A-001"], [], {}), ("d", "SKIP", ["A-001"], [], {}),
                  ("e", "FAIL", ["A-001"], ["new"], {}), ("f", "PASS", [], [], {"k": "2"}),
                  ("g", "PASS", [], [], {"ops_per_sec": "2"}), ("added", "PASS", [], [], {})],
                 [("A-001", "MUST", "TIMEOUT")])
    d = compare.compare(base, new)
    names = {k: [e["test"] for e in d[k]] for k in d["counts"]}
    assert names == {"regressions": ["a"], "fixes": ["b"], "newly_exercised": ["added", "c"],
                     "newly_skipped": ["d"], "changed_evidence": ["e", "f"], "added": [],
                     "removed": ["gone"]}
    assert d["regression"] is True
    assert d["requirements"] == [{"id": "A-001", "level": "MUST", "base": "FAIL",
                                  "new": "TIMEOUT", "kind": "newly not exercised", "reason": ""}]


def test_compare_info_only_regression_does_not_count():
    base = run_of([("a", "PASS", ["I-001"], [], {})], [("I-001", "INFO", "PASS")])
    new = run_of([("a", "FAIL", ["I-001"], ["x"], {})], [("I-001", "INFO", "FAIL")])
    d = compare.compare(base, new)
    assert [e["test"] for e in d["regressions"]] == ["a"] and d["regressions"][0]["info_only"]
    assert d["regression"] is False
    assert "INFO only" in compare.render_markdown(d)


# ---------------------------------------------------------------------------------------------
# the kill rule and process set-up every target shares (targets.base)

def _plan(**kw):
    from cvmconf.targets.base import BatchPlan, SuiteBinary
    args = dict(binary=SuiteBinary("cvm_suite_x", "/x"), label="001-x", tests=["S.a", "S.b"],
                gtest_filter="*", shard=None, env={}, test_timeout=10.0, idle_timeout=5.0,
                batch_timeout=100.0)
    args.update(kw)
    return BatchPlan(**args)


def test_watchdog_kills_in_order_interrupt_test_idle_batch():
    import threading
    from cvmconf.targets import base
    start = {"event": "start", "test": "S.a", "mono_us": 1}
    end = {"event": "end", "test": "S.a", "mono_us": 2}

    def dog(idle_since=None):
        out = base.BatchOutput(plan=_plan())
        return out, base.Watchdog(out, threading.Event(), started=1000.0, idle_since=idle_since)

    out, w = dog()
    assert w.check(1004.0) is None and out.killed is None
    assert w.check(1005.5) == base.KILLED_IDLE_TIMEOUT and out.killed_test is None
    out, w = dog(idle_since=1003.0)          # the idle clock may start later than the batch's
    assert w.check(1005.5) is None
    out, w = dog()
    w.feed(start, 1004.0)                    # a running test: its own clock, no idle timeout
    assert w.check(1013.9) is None
    assert w.check(1014.1) == base.KILLED_TEST_TIMEOUT and out.killed_test == "S.a"
    out, w = dog()
    w.feed(start, 1001.0)
    w.feed(end, 1009.0)                      # idle again from its end
    assert w.check(1013.9) is None
    assert w.check(1014.1) == base.KILLED_IDLE_TIMEOUT
    out, w = dog()
    for t in range(0, 100, 4):               # tests come and go, none too long: the batch limit
        w.feed(dict(start, test=f"S.t{t}"), 1000.0 + t)
        w.feed(dict(end, test=f"S.t{t}"), 1003.0 + t)
    w.feed(dict(start, test="S.last"), 1100.0)
    assert w.check(1100.5) == base.KILLED_BATCH_TIMEOUT and out.killed_test == "S.last"
    out, w = dog()
    w.abort.set()
    assert w.check(1000.0) == base.KILLED_INTERRUPTED


def test_batch_plan_gtest_arguments_and_environment():
    p = _plan(gtest_filter="S.a:S.b", shard=(1, 3), env={"CVMCONF_DURATION": "5"})
    assert p.gtest_args("/tmp/r.json") == ["--gtest_filter=S.a:S.b", "--gtest_output=json:/tmp/r.json"]
    assert p.gtest_env("/tmp/e", "/tmp/p") == {
        "CVMCONF_DURATION": "5", "CVMCONF_EVENTS": "/tmp/e", "TEST_PREMATURE_EXIT_FILE": "/tmp/p",
        "GTEST_COLOR": "no", "GTEST_SHARD_INDEX": "1", "GTEST_TOTAL_SHARDS": "3"}
    assert "GTEST_SHARD_INDEX" not in _plan().gtest_env("/tmp/e", "/tmp/p")

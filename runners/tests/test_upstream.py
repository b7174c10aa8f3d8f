"""The upstream selftests beside cvmconf (runners/cvmconf/upstream.py): the mapping, the reading
of their output (KTAP cases, exit status 4 = skip, crashes), the side-by-side and the reports.
The programs' outputs here are written for these tests (KTAP v1/TAP 13 shapes the kernel's
selftests print); the real programs run in test_upstream_e2e.py."""
from pathlib import Path

import pytest

from cvmconf import catalogue, compare, report, upstream
from cvmconf.errors import UsageError


def mapped():
    return {t.test: t for t in upstream.load_map()}


def test_mapping_names_only_catalogue_requirements():
    ids = set(catalogue.load().by_id())
    assert upstream.check_map(upstream.load_map(), ids, None) == []


def test_mapping_check_reports_unknown_ids_and_missing_programs(tmp_path):
    t = upstream.UpstreamTest(test="kvm/nope", binary="kvm/nope", args=[], arch=["x86_64"],
                              timeout=1, hugetlb=0,
                              map=[upstream.Mapping(cases=["*"], requirements=["MMAP-999"])])
    tree = tmp_path / "tree"
    (tree / upstream.SELFTESTS / "kvm").mkdir(parents=True)
    (tree / upstream.SELFTESTS / "kvm" / "Makefile").write_text("TEST_GEN_PROGS += other\n")
    problems = upstream.check_map([t], {"MMAP-001"}, tree)
    assert any("unknown requirement MMAP-999" in p for p in problems)
    assert any("nope.c does not exist" in p for p in problems)
    (tree / upstream.SELFTESTS / "kvm" / "nope.c").write_text("int main(void){return 0;}\n")
    problems = upstream.check_map([t], {"MMAP-999"}, tree)
    assert problems == ["upstream-map: kvm/nope: not a target of tools/testing/selftests/kvm's "
                        "makefiles"]


def test_mapping_without_requirements_needs_a_note(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("tests:\n  - test: kvm/x\n    binary: kvm/x\n    map: []\n")
    with pytest.raises(UsageError, match="no note"):
        upstream.load_map(p)


KTAP_CASES = """TAP version 13
# [INFO] something about the machine
1..4
# [RUN] R/O longterm GUP pin ... with memfd
ok 1 R/O longterm GUP pin ... with memfd
# [RUN] R/O longterm GUP pin ... with tmpfile
# gup_test not available
ok 2 # SKIP R/O longterm GUP pin ... with tmpfile
# [RUN] vmsplice() + unmap in child ... with base page
# Leak from parent into child
not ok 3 vmsplice() + unmap in child ... with base page
# [RUN] vmsplice() + unmap in child ... with hugetlb (2048 kB)
ok 4 # XFAIL vmsplice() + unmap in child ... with hugetlb (2048 kB)
# Totals: pass:1 fail:1 xfail:1 xpass:0 skip:1 error:0
"""


def test_ktap_cases_become_results_with_their_requirements():
    t = mapped()["mm/cow"]
    rs = upstream.interpret(t, KTAP_CASES, 1, None, [], 2.0, "now")
    by = {r.name: r for r in rs}
    assert by["mm/cow"].outcome == "PASS" or by["mm/cow"].requirements == []
    memfd = by["mm/cow: R/O longterm GUP pin ... with memfd"]
    assert (memfd.outcome, memfd.requirements) == ("PASS", ["PIN-001"])
    tmp = by["mm/cow: R/O longterm GUP pin ... with tmpfile"]
    assert tmp.outcome == "SKIP" and tmp.skip_reason == "gup_test not available"
    bad = by["mm/cow: vmsplice() + unmap in child ... with base page"]
    assert (bad.outcome, bad.requirements) == ("FAIL", ["PIN-005"])
    assert bad.messages == ["Leak from parent into child"]
    assert by["mm/cow: vmsplice() + unmap in child ... with hugetlb (2048 kB)"].outcome == "PASS"
    # exit status 1 with a failing case: the case carries the failure, not every requirement
    assert by["mm/cow"].outcome == "FAIL" and by["mm/cow"].requirements == []


def test_exit_status_4_is_skip_with_the_programs_reason():
    t = mapped()["kvm/guest_memfd_test"]
    rs = upstream.interpret(t, "Random seed: 0x1\n1..0 # SKIP - Requirement not met: cap\n", 4,
                            None, [], 0.1, "now")
    assert len(rs) == 1
    assert rs[0].outcome == "SKIP" and rs[0].skip_reason == "Requirement not met: cap"
    assert "MMAP-006" in rs[0].requirements


def test_program_without_ktap_passes_or_fails_by_its_exit_status():
    t = mapped()["kvm/x86/private_mem_kvm_exits_test"]
    ok = upstream.interpret(t, "Random seed: 0x1\n", 0, None, [], 0.1, "now")
    assert [(r.outcome, r.requirements) for r in ok] == [("PASS", ["CONV-011"])]
    bad = upstream.interpret(t, "==== Test Assertion Failure ====\n  x.c:12: ret == 0\n  errno=22\n", 254,
                             None, [], 0.1, "now")
    assert bad[0].outcome == "FAIL" and "status 254" in bad[0].messages[0]
    assert "x.c:12" in bad[0].messages[0]


def test_a_crash_keeps_finished_cases_and_marks_the_program_error():
    t = mapped()["mm/cow"]
    partial = "\n".join(KTAP_CASES.splitlines()[:6]) + "\n"   # died during case 2
    rs = upstream.interpret(t, partial, None, "the guest kernel died (Oops)", ["[1.0] Oops"], 1,
                            "now")
    assert rs[0].outcome == "ERROR" and "Oops" in rs[0].messages[0]
    assert set(rs[0].requirements) == set(t.requirements())
    assert rs[0].kernel_log == ["[1.0] Oops"]


def test_timeout_is_timeout():
    t = mapped()["mm/gup_longterm"]
    rs = upstream.interpret(t, "", None, "killed by the runner: batch exceeded 5 s", [], 5, "x")
    assert rs[0].outcome == "TIMEOUT"


@pytest.mark.parametrize("cvm,up,want", [
    ("PASS", "PASS", "agree"), ("FAIL", "FAIL", "agree"), ("PASS", "FAIL", "disagree"),
    ("FAIL", "PASS", "disagree"), ("PASS", "SKIP", "one-sided"), ("SKIP", "PASS", "one-sided"),
    ("NOT RUN", "FAIL", "one-sided"), ("SKIP", "SKIP", "neither exercised"),
    ("ERROR", "PASS", "incomplete")])
def test_agreement(cvm, up, want):
    assert upstream.agreement(cvm, up) == want


def fake_run(cvm_outcomes: dict, up_results: list) -> dict:
    from cvmconf import results
    tests = upstream.load_map()
    reqs = [{"id": rid, "level": "MUST", "outcome": o, "reason": "skipped: x" if o == "SKIP" else "",
             "exercised": o in ("PASS", "FAIL"), "tests": [], "seeds": [], "statement": "s", "platforms": [], "counts": {}, "flaky": 0,
             "family": "f"} for rid, o in cvm_outcomes.items()]
    run = {"run_id": "r", "complete": True, "fingerprint": {"kernel": {"release": "7.2"}},
           "checkout": {}, "build": {}, "requirements": reqs, "tests": [], "summary": {
               "verdict": "CONFORMS", "exit_code": 0, "exit_meaning": "ok", "requirements": len(reqs), "requirements_exercised": 0,
               "requirement_outcomes": {}, "tests": 0, "test_outcomes": {}, "flaky": 0},
           "format": results.FORMAT, "format_version": results.FORMAT_VERSION,
           "harness": {"version": "t", "catalogue": "c", "catalogue_sha256": ""}, "options": {},
           "target": {"kind": "local"}, "seeds": {}, "problems": [], "notes": [], "batches": [],
           "started": "", "finished": ""}
    built = upstream.Built(root=Path("/nonexistent"), meta={"source": "linux-source-7.2 t"})
    run["upstream"] = upstream.section(reqs, up_results, tests, built, [])
    return run


def _r(name, outcome, reqs, skip=""):
    from cvmconf.gtest import TestResult
    return TestResult(name=name, binary="upstream", outcome=outcome, requirements=reqs,
                      skip_reason=skip)


def test_side_by_side_and_disagreements_in_every_output():
    run = fake_run({"PIN-001": "PASS", "MMAP-006": "SKIP", "CONV-011": "PASS"},
                   [_r("mm/cow: R/O longterm GUP pin ... with memfd", "FAIL", ["PIN-001"]),
                    _r("kvm/guest_memfd_test", "PASS", ["MMAP-006"]),
                    _r("kvm/x86/private_mem_kvm_exits_test", "PASS", ["CONV-011"])])
    u = run["upstream"]
    rows = {r["id"]: r for r in u["requirements"]}
    assert rows["PIN-001"]["agreement"] == "disagree"
    assert rows["MMAP-006"]["agreement"] == "one-sided"
    assert rows["CONV-011"]["agreement"] == "agree"
    assert rows["CONV-002"]["upstream"] == "NOT RUN"
    assert {d["id"] for d in u["disagreements"]} == {"PIN-001", "MMAP-006"}
    md = report.render_markdown(run)
    i_fail, i_dis, i_req = (md.index("\nFailures\n"), md.index("cvmconf and upstream disagree"),
                            md.index("\nRequirements\n"))
    assert i_fail < i_dis < i_req          # right after the failures
    assert "PIN-001" in md[i_dis:i_req] and "cvmconf PASS, upstream FAIL" in md
    html = report.render_html(run)
    assert 'id="upstream-disagree"' in html and "upstream exercised it (PASS)" in html
    base = fake_run({"PIN-001": "PASS"}, [_r("mm/cow: R/O longterm GUP pin ... with memfd",
                                              "PASS", ["PIN-001"])])
    diff = compare.compare(base, run)
    assert {d["id"] for d in diff["upstream"]["new_disagreements"]} == {"PIN-001", "MMAP-006"}
    assert "cvmconf and upstream disagree" in compare.render_markdown(diff)


def test_report_without_upstream_has_no_section():
    run = fake_run({"PIN-001": "PASS"}, [])
    del run["upstream"]
    assert "upstream disagree" not in report.render_markdown(run)


def test_check_catalogue_rejects_a_mapping_with_an_unknown_id(build_dir, tmp_path):
    from conftest import cvmconf
    bad = tmp_path / "map.yaml"
    bad.write_text("tests:\n  - test: mm/cow\n    binary: mm/cow\n    map:\n"
                   "      - cases: ['*']\n        requirements: [PIN-999]\n")
    r = cvmconf("--build-dir", str(build_dir), "check-catalogue", "--upstream-map", str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "upstream-map: mm/cow names unknown requirement PIN-999" in r.stdout


def test_a_filtered_cvmconf_side_is_not_a_disagreement():
    run = fake_run({"PIN-006": "NOT RUN"}, [_r("mm/gup_longterm: x", "PASS", ["PIN-006"])])
    run["requirements"][0]["reason"] = "not selected by the filters of this run"
    rows = upstream.side_by_side(run["requirements"], run["upstream"]["tests"], upstream.load_map())
    row = next(r for r in rows if r["id"] == "PIN-006")
    assert row["agreement"] == "not selected"
    assert upstream.disagreements([row]) == []

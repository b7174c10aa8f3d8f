"""The upstream selftests beside cvmconf, for real: the reference kernel under QEMU TCG, the
kernel's own KVM and mm selftests built from the reference source (./cvmconf test builds them
before pytest; `./cvmconf upstream build`), one run with --upstream and a selection of cvmconf's
tests covering the same requirements. The run must carry both sides' outcomes per requirement."""
import json
import shutil

import pytest

from conftest import timed_cvmconf
from cvmconf import upstream

# The requirements the e2e selection covers on cvmconf's side (the mapped ones; -k matches IDs).
SELECTION = " or ".join(["MMAP-001", "MMAP-002", "MMAP-003", "MMAP-004", "MMAP-006", "MMAP-007",
                         "MMAP-011", "MMAP-012", "PIN-001", "PIN-002", "PIN-004", "PIN-005",
                         "PIN-006", "CONV-002", "CONV-004", "CONV-006", "CONV-009", "CONV-010",
                         "CONV-011"])
MUST_EXECUTE = ["kvm/guest_memfd_test", "kvm/x86/private_mem_conversions_test",
                "kvm/x86/private_mem_kvm_exits_test"]
MUST_EXECUTE_CASES = {
    "mm/cow": ["R/O longterm GUP pin ... with memfd", "R/O longterm GUP-fast pin ... with memfd"],
    "mm/gup_longterm": ["R/W longterm GUP pin in MAP_SHARED file mapping ... with memfd"],
}


@pytest.fixture(scope="module")
def up_run(build_dir, tmp_path_factory):
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail("qemu-system-x86_64 is not installed: ./cvmconf test installs it")
    results = tmp_path_factory.mktemp("upstream")
    r = timed_cvmconf("e2e upstream", "--build-dir", str(build_dir), "run", "--target", "qemu",
                      "--kernel", "ref", "--upstream", "-k", SELECTION, "--test-timeout", "120",
                      "--idle-timeout", "60", "--results-dir", str(results), "--run-id", "up",
                      timeout=2400)
    path = results / "up" / "run.json"
    assert path.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    return r, results / "up", json.loads(path.read_text())


def test_upstream_run_is_complete_and_builds_from_the_reference_source(up_run):
    r, _, data = up_run
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    assert data["complete"] is True, data["incomplete_reason"]
    u = data["upstream"]
    assert u["problems"] == []
    assert u["source"].startswith("linux-source-7.2 ")


def test_named_upstream_tests_executed(up_run):
    _, _, data = up_run
    tests = {t["name"]: t for t in data["upstream"]["tests"]}
    for name in MUST_EXECUTE:
        assert tests[name]["outcome"] in ("PASS", "FAIL"), tests[name]
    for prog, cases in MUST_EXECUTE_CASES.items():
        assert tests[prog]["outcome"] in ("PASS", "FAIL"), tests[prog]
        for c in cases:
            t = tests[f"{prog}: {c}"]
            assert t["outcome"] in ("PASS", "FAIL"), t
            assert t["requirements"], t
    assert all(t["binary"] == "upstream" for t in data["upstream"]["tests"])
    assert all(t["path"].startswith("cvmconf.upstream.") for t in data["upstream"]["tests"])


def test_every_mapped_requirement_has_both_sides_and_an_agreement(up_run):
    _, run_dir, data = up_run
    rows = {r["id"]: r for r in data["upstream"]["requirements"]}
    mapped = {rid for t in upstream.load_map() if "x86_64" in t.arch for rid in t.requirements()}
    assert set(rows) == mapped
    for rid, row in rows.items():
        assert row["cvmconf"] in ("PASS", "FAIL", "SKIP", "ERROR", "TIMEOUT", "NOT RUN"), row
        assert row["upstream"] in ("PASS", "FAIL", "SKIP", "ERROR", "TIMEOUT", "NOT RUN"), row
        assert row["agreement"] == upstream.agreement(row["cvmconf"], row["upstream"])
    md = (run_dir / "report.md").read_text()
    i_fail, i_dis, i_side = (md.index("\nFailures\n"), md.index("cvmconf and upstream disagree"),
                             md.index("Side by side: cvmconf and the upstream selftests"))
    assert i_fail < i_dis < i_side < md.index("\nRequirements\n")
    for rid in rows:
        assert rid in md[i_side:]
    html = (run_dir / "report.html").read_text()
    assert 'id="upstream-disagree"' in html and 'id="upstream"' in html
    # every disagreement in run.json is in the report with its reason
    for d in data["upstream"]["disagreements"]:
        assert d["id"] in md[i_dis:i_side] and d["why"][:40] in md


def test_compare_shows_the_disagreements(build_dir, up_run, tmp_path):
    _, run_dir, data = up_run
    r = timed_cvmconf("e2e upstream compare", "--build-dir", str(build_dir), "compare",
                      str(run_dir), str(run_dir), "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cvmconf and upstream disagree" in r.stdout
    c = json.loads((tmp_path / "c.json").read_text())
    assert len(c["upstream"]["new_disagreements"]) == len(data["upstream"]["disagreements"])

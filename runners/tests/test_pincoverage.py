"""Pin coverage roll-up: per requirement, backing and GUP flavour, from test properties."""
import json

from cvmconf import gtest, pincoverage


def result(name, outcome, reqs, backing, gup, provider, skip_reason=""):
    return gtest.TestResult(name=name, binary="cvm_suite_pins", outcome=outcome, requirements=reqs,
                            skip_reason=skip_reason,
                            properties={"backing": backing, "gup": gup, "provider": provider})


def test_rows_per_requirement_backing_and_flavour():
    rs = [
        result("a", gtest.PASS, ["PIN-004"], "memfd", "GUP (kernel's choice)", "io_uring"),
        result("b", gtest.SKIP, ["PIN-004"], "memfd", "GUP", "gup_test_rw",
               "capability absent: /sys/kernel/debug/gup_test absent"),
        result("c", gtest.SKIP, ["PIN-001"], "memfd", "GUP-fast", "none", "capability absent: x"),
        result("d", gtest.FAIL, ["PIN-004"], "memfd", "GUP (kernel's choice)", "io_uring"),
        gtest.TestResult(name="e", binary="x", outcome=gtest.PASS, requirements=["MMAP-001"]),
    ]
    rows = pincoverage.pin_coverage(rs)
    assert [(r.requirements, r.backing, r.gup) for r in rows] == [
        ("PIN-001", "memfd", "GUP-fast"),
        ("PIN-004", "memfd", "GUP"),
        ("PIN-004", "memfd", "GUP (kernel's choice)"),
    ]
    ro, rw_gup, rw_io = rows
    assert not ro.exercised and ro.skip_reasons == {"capability absent: x"}
    assert rw_io.passed == 1 and rw_io.failed == 1 and rw_io.providers_run == {"io_uring"}
    assert not rw_gup.exercised
    text = pincoverage.format_pin_coverage(rows)
    lines = text.splitlines()
    assert lines[0] == "GUP flavours: (1) GUP  (2) GUP (kernel's choice)  (3) GUP-fast"
    assert lines[1].split() == ["backing", "(1)", "(2)", "(3)"]
    assert lines[2:6] == ["PIN-001", "  memfd  -         -         skip [2]",
                          "PIN-004", "  memfd  skip [1]  FAIL      -"]
    assert "[1] capability absent: /sys/kernel/debug/gup_test absent" in lines
    assert "[2] capability absent: x" in lines
    assert "providers that ran: io_uring (1 row)" in lines
    assert max(len(line) for line in lines) <= 80
    assert pincoverage.format_pin_coverage([]) == ""


def test_real_pin_suite_records_backing_and_flavour(build_dir, tmp_path):
    """The pin suite's results carry the properties the coverage needs (a real, fast subset)."""
    import subprocess
    binary = build_dir / "suites" / "cvm_suite_pins"
    report = tmp_path / "pins.json"
    subprocess.run([str(binary), "--gtest_filter=*RoPinReliabilityNonAnon*memfd_gup*:"
                    "*RwPinReliabilityNonAnon*/memfd_io_uring:*Pinnability*/memfd_shared_*",
                    f"--gtest_output=json:{report}"], capture_output=True, timeout=300, check=False)
    results = gtest.parse_report(report, binary.name)
    assert results, "no results"
    for r in results:
        assert r.properties.get("backing"), r.name
        assert r.properties.get("gup"), r.name
        assert r.properties.get("provider"), r.name
        assert r.properties.get("pin_kind"), r.name
    rows = pincoverage.pin_coverage(results)
    flavours = {(r.backing, r.gup) for r in rows}
    assert ("memfd", "GUP") in flavours and ("memfd", "GUP-fast") in flavours
    assert any(r.exercised and "io_uring" in r.providers_run for r in rows)

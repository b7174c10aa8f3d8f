"""Every output of a run is checked by reading it back: KTAP with our own parser, JUnit with
ElementTree, KCIDB against the schema facts, the HTML report for escaping and self-containedness."""
import json
import re
import xml.etree.ElementTree as ET

import pytest

from conftest import cvmconf
from cvmconf import kcidb, ktap, report


def test_ktap_parses_back_nested_binary_then_test(broken_run):
    _, run_dir, data = broken_run
    doc = ktap.parse((run_dir / "results.ktap").read_text())
    assert doc.version == "KTAP version 1"
    assert doc.plan == 1 and len(doc.tests) == 1
    top = doc.tests[0]
    assert top.description == "cvm_suite_broken"
    assert top.subtest_name == "cvm_suite_broken"    # its '# Subtest:' header
    assert top.ok is False                      # a subtest failed
    subs = {s.description: s for s in top.subtests}
    want = {t["name"]: t["outcome"] for t in data["tests"]}
    assert {n: s.status for n, s in subs.items()} == want
    assert subs["Broken.Hangs"].directive == "TIMEOUT"
    assert subs["Broken.Aborts"].directive == "ERROR"
    assert "SIGABRT" in subs["Broken.Aborts"].diagnostic
    assert subs["Broken.Skips"].diagnostic.startswith("not applicable:")
    assert any("requirements: BROKEN-002" in d for d in subs["Broken.FailsWithMarkup"].diagnostics)
    assert any(d.startswith("verdict: DOES NOT CONFORM") for d in doc.diagnostics)


def test_junit_parses_back_with_requirements_in_system_out(broken_run):
    _, run_dir, data = broken_run
    root = ET.parse(run_dir / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["cvm_suite_broken"]
    suite = suites[0]
    assert int(suite.get("tests")) == len(data["tests"])
    assert int(suite.get("failures")) == 1
    assert int(suite.get("errors")) == sum(1 for t in data["tests"]
                                           if t["outcome"] in ("ERROR", "TIMEOUT"))
    assert int(suite.get("skipped")) == 1
    assert suite.get("timestamp") == data["batches"][0]["started"][:19]   # its own start
    assert {c.get("classname") for c in suite.findall("testcase")} == {"cvm_suite_broken.Broken"}
    cases = {f"Broken.{c.get('name')}": c for c in suite.findall("testcase")}
    assert set(cases) == {t["name"] for t in data["tests"]}
    fail = cases["Broken.FailsWithMarkup"]
    assert fail.find("properties") is None            # the schema has none on a testcase
    out = fail.find("system-out").text.splitlines()
    assert "requirement: BROKEN-002" in out and "outcome: FAIL" in out
    assert "property observation: <i>value</i> & more" in out
    f = fail.find("failure")
    assert f is not None and "<script>" in f.text
    assert "\\x1b" in f.text                       # control characters escaped, file stays valid
    hang = cases["Broken.Hangs"].find("error")
    assert hang.get("type") == "TIMEOUT"
    assert cases["Broken.Skips"].find("skipped").get("message").startswith("not applicable")
    assert cases["Broken.Skips"].find("skipped").get("type") == "SKIP"
    assert cases["Broken.Passes1"].find("failure") is None


def test_kcidb_export_has_required_fields_and_valid_statuses(broken_run, tmp_path):
    _, run_dir, data = broken_run
    out = tmp_path / "kcidb.json"
    r = cvmconf("export", "--kcidb", str(run_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    k = json.loads(out.read_text())
    kcidb.validate(k)                                 # our checker of the schema facts
    assert k["version"]["major"] == 5
    (co,), (b,) = k["checkouts"], k["builds"]
    assert co["id"].startswith("cvmconf:") and co["origin"] == "cvmconf"
    assert b["checkout_id"] == co["id"] and b["architecture"]
    tests = [t for t in k["tests"] if not t["path"].startswith("cvmconf.requirements.")]
    assert len(tests) == len(data["tests"])
    for t in tests:
        assert t["build_id"] == b["id"] and t["origin"] == "cvmconf"
        assert re.match(r"^[a-z0-9_]+:.+$", t["id"])
        assert t["status"] in kcidb.STATUSES
        assert re.match(r"^[a-zA-Z0-9_-]+(\.[a-zA-Z0-9_-]+)*$", t["path"])
        assert t["path"].startswith("cvmconf.broken.")
    statuses = {t["comment"].split(": ", 1)[1]: t["status"] for t in tests}
    assert statuses["Broken.Hangs"] == "ERROR"
    assert statuses["Broken.FailsWithMarkup"] == "FAIL"
    assert statuses["Broken.Skips"] == "SKIP"
    reqs = {t["path"]: t for t in k["tests"] if t["path"].startswith("cvmconf.requirements.")}
    assert reqs["cvmconf.requirements.BROKEN-002"]["status"] == "FAIL"
    numbers = [t["number"] for t in tests if "number" in t]
    assert numbers == [{"value": 1234.5, "unit": "ops/s", "prefix": "metric"}]
    text = out.read_text()
    assert "null" not in text                         # KCIDB forbids nulls
    assert len({t["id"] for t in k["tests"]}) == len(k["tests"])


def test_kcidb_export_to_stdout_with_origin(broken_run):
    _, run_dir, _ = broken_run
    r = cvmconf("export", "--kcidb", str(run_dir), "-o", "-", "--origin", "mylab")
    assert r.returncode == 0, r.stderr
    k = json.loads(r.stdout)
    assert all(o["origin"] == "mylab" and o["id"].startswith("mylab:")
               for kind in ("checkouts", "builds", "tests") for o in k[kind])
    r = cvmconf("export", "--kcidb", str(run_dir), "-o", "-", "--origin", "Bad-Origin")
    assert r.returncode == 2 and r.stderr.count("\n") == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda k: k["tests"][0].pop("build_id"), "tests/0: 'build_id' is a required property"),
    (lambda k: k["checkouts"][0].pop("origin"), "checkouts/0: 'origin' is a required property"),
    (lambda k: k["tests"][0].update(status="BROKEN"), "tests/0/status: 'BROKEN' is not one of"),
    (lambda k: k["tests"][0].update(path="a/b"), "tests/0/path: 'a/b' does not match"),
    (lambda k: k["tests"][0].update(id="nocolon"), "tests/0/id: 'nocolon' does not match"),
    (lambda k: k["tests"][0].update(comment=None), "tests/0/comment: None is not of type"),
    (lambda k: k["tests"][0].update(waived=True), "tests/0: Additional properties are not "
                                                   "allowed ('waived' was unexpected)"),
    (lambda k: k["builds"][0].update(architecture="X86-64"), "builds/0/architecture: 'X86-64'"),
    (lambda k: k.update(version={"major": 4}), "version/major: 5 was expected"),
    (lambda k: k["tests"][0].update(start_time="2026-11-21 09:17:49"),
     "tests/0/start_time: '2026-11-21 09:17:49' is not a 'date-time'"),
    (lambda k: k["tests"][0].update(start_time="2026-02-30T09:17:49Z"), "is not a 'date-time'"),
    (lambda k: k["tests"][0].update(build_id="cvmconf:elsewhere"), "names no build"),
    (lambda k: k["tests"].append(dict(k["tests"][0])), "duplicate id"),
])
def test_kcidb_checker_rejects_what_the_schema_rejects(broken_run, mutate, message):
    _, run_dir, data = broken_run
    k = kcidb.export(data)
    mutate(k)
    with pytest.raises(kcidb.KcidbError, match=re.escape(message)):
        kcidb.validate(k)


def test_html_report_shows_markup_as_text(broken_run):
    _, run_dir, _ = broken_run
    html = (run_dir / "report.html").read_text()
    # The failure message and a property carry markup: both are escaped, never live.
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(" in html
    assert "<b>no</b>" not in html and "&lt;b&gt;no&lt;/b&gt;" in html
    assert "<i>value</i>" not in html and "&lt;i&gt;value&lt;/i&gt;" in html
    # Self-contained: no external resources.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html
    # Exactly one script element: ours.
    assert html.count("<script>") == 1


def test_html_report_escapes_every_injected_string(broken_run):
    """A run record whose every free-text field carries markup renders with none of it live."""
    _, _, data = broken_run
    evil = '<img src=x onerror="alert(1)">'
    d = json.loads(json.dumps(data))
    d["run_id"] = evil
    d["incomplete_reason"], d["complete"] = evil, False
    d["fingerprint"]["cpu_model"] = evil
    d["fingerprint"]["kernel"]["release"] = evil
    d["checkout"]["message_id"] = evil
    for t in d["tests"]:
        t["messages"] = [evil]
        t["kernel_log"] = [evil]
        t["properties"] = {evil: evil}
        t["skip_reason"] = evil
        t["evidence"] = {evil: evil}
    for r in d["requirements"]:
        r["statement"] = r["reason"] = evil
    html = report.render_html(d)
    assert "<img" not in html
    assert html.count("&lt;img src=x onerror=") > 10


def test_html_report_has_the_matrix_and_filters(broken_run):
    _, run_dir, data = broken_run
    html = (run_dir / "report.html").read_text()
    for r in data["requirements"]:
        assert f'<td>{r["id"]}</td>' in html
    assert 'id="f-text"' in html and 'class="f-outcome"' in html
    assert html.count('class="req"') == len(data["requirements"])


def test_outputs_are_rendered_from_run_json_alone(broken_run, tmp_path):
    """Reports depend only on run.json, so any target that yields a run.json gets the same."""
    _, run_dir, data = broken_run
    assert report.render_markdown(data) == (run_dir / "report.md").read_text()
    assert ktap.from_run(data) == (run_dir / "results.ktap").read_text()

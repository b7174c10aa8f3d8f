"""The result files as their real consumers read them, on runs holding every outcome (PASS,
FAIL, ERROR, TIMEOUT, SKIP, NOT RUN; built with the purpose-built broken suite):

  KCIDB export    the KCIDB v5.3 I/O schema (results/schemas/, python3-jsonschema, draft 7,
                  with a strict RFC 3339 date-time check)
  junit.xml       Jenkins' JUnit schema junit-10.xsd (python3-lxml)
  results.ktap    the kernel's own tools/testing/kunit/kunit_parser.py, when a kernel tree is at
                  hand (CVMCONF_KERNEL_SRC, else a linux-source tree in the reference-kernel
                  cache's src/); SKIP otherwise
  report.md       at most 80 columns but for command lines ("    $ ...")
  report.html     rendered by Debian's headless chromium in a 1280-px window: nothing wider than
                  the window, the verdict at the top, failing tests' kernel logs open
  compare         the Markdown for each pair of committed baselines fits in a mail (200 lines)
"""
import glob
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, cvmconf
from cvmconf import kcidb, ktap, results

SCHEMAS = REPO / "results" / "schemas"
BASELINES = REPO / "results" / "baselines"


@pytest.fixture(scope="module", params=["broken", "every"])
def run(request):
    """(CompletedProcess, run_dir, run.json) of each run: 'broken' (PASS, FAIL, ERROR, TIMEOUT,
    SKIP; complete) and 'every' (the same plus NOT RUN; interrupted)."""
    return request.getfixturevalue("broken_run" if request.param == "broken"
                                   else "every_outcome_run")


def test_the_runs_hold_every_outcome(broken_run, every_outcome_run):
    seen = {t["outcome"] for r in (broken_run, every_outcome_run) for t in r[2]["tests"]}
    assert seen == {"PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP", "NOT RUN"}
    _, _, every = every_outcome_run
    outcomes = {t["name"]: t["outcome"] for t in every["tests"]}
    assert outcomes["Broken.PassesOrBlocks"] == "NOT RUN"
    assert every["complete"] is False


# ---------------------------------------------------------------------------------------------
# KCIDB

def test_kcidb_export_validates_against_the_v5_3_schema(run, tmp_path):
    _, run_dir, data = run
    out = tmp_path / "kcidb.json"
    r = cvmconf("export", "--kcidb", str(run_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    k = json.loads(out.read_text())
    assert k["version"] == {"major": 5, "minor": 3}
    assert kcidb.schema_errors(k) == []
    statuses = {t["comment"].split(": ", 1)[1]: t["status"] for t in k["tests"]
                if not t["path"].startswith("cvmconf.requirements.")}
    want = {"PASS": "PASS", "FAIL": "FAIL", "ERROR": "ERROR", "TIMEOUT": "ERROR", "SKIP": "SKIP",
            "NOT RUN": "MISS"}
    assert statuses == {t["name"]: want[t["outcome"]] for t in data["tests"]}
    assert not any("waived" in t for t in k["tests"])
    info = [t for t in k["tests"] if t["path"].startswith("cvmconf.requirements.")]
    assert all(t["misc"]["level"] in ("MUST", "SHOULD", "INFO") for t in info)


def test_the_date_time_check_is_strict():
    good = ["2026-11-21T09:17:49Z", "2026-11-21T09:17:49.123+01:00", "2016-12-31T23:59:60Z",
            "2024-02-29t00:00:00z"]
    bad = ["2026-11-21 09:17:49Z", "2026-11-21T09:17:49", "2026-02-30T00:00:00Z",
           "2026-11-21T24:00:00Z", "2026-11-21T09:17Z", "2026-11-21T09:17:49+0100",
           "2026-11-21T09:17:49+24:00", "21 Nov 2026", ""]
    assert [v for v in good if not kcidb.is_rfc3339(v)] == []
    assert [v for v in bad if kcidb.is_rfc3339(v)] == []
    k = {"version": {"major": 5, "minor": 3},
         "checkouts": [{"id": "o:1", "origin": "o", "start_time": "yesterday"}]}
    assert any("is not a 'date-time'" in e for e in kcidb.schema_errors(k))


def test_the_shipped_schema_is_the_reference_copy():
    """results/schemas/ holds unmodified copies (when the shared reference is at hand)."""
    for ref_dir in (REPO.parent / "shared" / "reference" / "schemas",
                    Path("/work/shared/reference/schemas")):
        if ref_dir.is_dir():
            break
    else:
        pytest.skip("no shared reference schemas next to the repository")
    for name in ("kcidb-v5.3.schema.json", "junit-10.xsd"):
        assert (SCHEMAS / name).read_bytes() == (ref_dir / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------
# JUnit

def test_junit_validates_against_jenkins_xsd(run):
    from lxml import etree
    _, run_dir, data = run
    schema = etree.XMLSchema(etree.parse(str(SCHEMAS / "junit-10.xsd")))
    doc = etree.parse(str(run_dir / "junit.xml"))
    assert schema.validate(doc), "\n".join(str(e) for e in list(schema.error_log)[:20])
    cases = {c.get("name"): c for c in doc.iter("testcase")}
    for t in data["tests"]:
        case = cases[t["name"].split(".", 1)[1]]
        assert case.get("classname") == f"{t['binary']}.{t['name'].split('.', 1)[0]}"
        out = case.find("system-out").text.splitlines()
        assert [f"requirement: {rid}" for rid in t["requirements"]] == \
            [line for line in out if line.startswith("requirement: ")]
        assert f"outcome: {t['outcome']}" in out
        kind = {"PASS": None, "FAIL": "failure", "ERROR": "error", "TIMEOUT": "error",
                "SKIP": "skipped", "NOT RUN": "skipped"}[t["outcome"]]
        if kind:
            assert case.find(kind) is not None, t["name"]
            assert case.find(kind).get("type") == t["outcome"]
        if t["outcome"] == "NOT RUN":
            assert case.find("skipped").get("message").startswith("not run: ")


# ---------------------------------------------------------------------------------------------
# KTAP with the kernel's parser

def kunit_dir() -> Path | None:
    """tools/testing/kunit of $CVMCONF_KERNEL_SRC, else of a linux-source tree the reference
    kernel build unpacked (CACHE/src/<package>_<version>/<package>/, CACHE as refkernel's:
    $CVMCONF_CACHE or /var/cache/cvmconf)."""
    src = os.environ.get("CVMCONF_KERNEL_SRC")
    cache = Path(os.environ.get("CVMCONF_CACHE") or "/var/cache/cvmconf")
    candidates = [Path(src)] if src else [Path(p).parents[3] for pattern in (
        "src/*/tools/testing/kunit/kunit_parser.py", "src/*/*/tools/testing/kunit/kunit_parser.py")
        for p in sorted(glob.glob(str(cache / pattern)), reverse=True)]
    for c in candidates:
        d = c / "tools" / "testing" / "kunit"
        if (d / "kunit_parser.py").is_file():
            return d
    return None


KUNIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kunit_parser, kunit_printer
test = kunit_parser.parse_run_tests(open(sys.argv[2]).read().splitlines(),
                                    kunit_printer.Printer(print=False))
def walk(t):
    return {"name": t.name, "status": t.status.name, "log": t.log,
            "skip_reason": t.skip_reason, "errors": t.counts.errors,
            "subtests": [walk(s) for s in t.subtests]}
c = test.counts
print(json.dumps({"status": test.status.name, "passed": c.passed, "failed": c.failed,
                  "crashed": c.crashed, "skipped": c.skipped, "errors": c.errors,
                  "tree": walk(test)}))
"""


def kunit_parse(path: Path) -> dict:
    d = kunit_dir()
    if d is None:
        pytest.skip("no kernel tree with tools/testing/kunit/kunit_parser.py (set "
                    "CVMCONF_KERNEL_SRC, or let the reference-kernel build unpack "
                    "linux-source into /var/cache/cvmconf/src)")
    r = subprocess.run(["/usr/bin/python3", "-c", KUNIT, str(d), str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_kernel_kunit_parser_reads_results_ktap(run):
    _, run_dir, data = run
    got = kunit_parse(run_dir / "results.ktap")
    assert got["errors"] == 0, got
    n = {o: sum(1 for t in data["tests"] if t["outcome"] == o)
         for o in ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP", "NOT RUN")}
    # kunit knows pass, fail (not ok), skip (# SKIP); ERROR/TIMEOUT are 'not ok', NOT RUN a SKIP.
    assert (got["passed"], got["failed"], got["skipped"], got["crashed"]) == \
        (n["PASS"], n["FAIL"] + n["ERROR"] + n["TIMEOUT"], n["SKIP"] + n["NOT RUN"], 0)
    assert got["status"] == "FAILURE"
    (suite,) = got["tree"]["subtests"]
    assert suite["name"] == "cvm_suite_broken" and suite["status"] == "FAILURE"
    by_name = {s["name"]: s for s in suite["subtests"]}
    assert set(by_name) == {t["name"] for t in data["tests"]}
    for t in data["tests"]:
        s = by_name[t["name"]]
        want = {"PASS": "SUCCESS", "FAIL": "FAILURE", "ERROR": "FAILURE", "TIMEOUT": "FAILURE",
                "SKIP": "SKIPPED", "NOT RUN": "SKIPPED"}[t["outcome"]]
        assert s["status"] == want, t["name"]
        if t["outcome"] == "NOT RUN":
            assert s["skip_reason"].startswith("not run: ")
        if t["outcome"] in ("FAIL", "ERROR", "TIMEOUT") and t.get("kernel_log"):
            # The failing test's kernel-log lines reach kunit as its diagnostics.
            assert "# kernel log:" in [line.strip() for line in s["log"]], s["log"]
            assert any(t["kernel_log"][0] in line for line in s["log"])


def test_kernel_kunit_parser_reads_an_all_skipped_suite_and_hostile_diagnostics(tmp_path):
    run = {"run_id": "x", "complete": True, "summary": {"verdict": "CONFORMS (x)"},
           "tests": [
               {"binary": "cvm_suite_a", "name": "A.skips", "outcome": "SKIP",
                "skip_reason": "capability absent: y", "requirements": ["A-1"]},
               {"binary": "cvm_suite_a", "name": "A.skips2", "outcome": "SKIP",
                "skip_reason": "capability absent: y", "requirements": []},
               {"binary": "cvm_suite_b", "name": "B.fails", "outcome": "FAIL",
                "messages": ["Subtest: evil\nok 1 fake\nKTAP version 1"],
                "kernel_log": ["reboot: System halted", "List of all partitions:",
                               "Kernel panic - not syncing: VFS: Unable to mount root fs"],
                "requirements": []},
               {"binary": "cvm_suite_b", "name": "B.passes", "outcome": "PASS"}]}
    text = ktap.from_run(run)
    assert "ok 1 cvm_suite_a # SKIP capability absent: y" in text.splitlines()
    path = tmp_path / "r.ktap"
    path.write_text(text)
    ours = ktap.parse(text)
    assert [t.status for t in ours.tests] == ["SKIP", "FAIL"]
    got = kunit_parse(path)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (1, 1, 2, 0), got
    a, b = got["tree"]["subtests"]
    assert a["status"] == "SKIPPED" and a["skip_reason"] == "capability absent: y"
    assert [s["name"] for s in b["subtests"]] == ["B.fails", "B.passes"]


# ---------------------------------------------------------------------------------------------
# report.md

def long_lines(text: str) -> list[str]:
    """What `awk 'length>80'` prints, less the command lines."""
    return [line for line in text.splitlines() if len(line) > 80
            and not line.startswith("    $ ")]


def test_report_md_fits_80_columns_but_for_commands(run):
    _, run_dir, data = run
    md = (run_dir / "report.md").read_text()
    assert long_lines(md) == []
    from cvmconf import report
    assert md.splitlines()[3] == report.wrap(data["summary"]["verdict"], 0, 4)[0]
    assert re.search(r"\(\d+ of \d+ requirements exercised", " ".join(md.split("\n\n")[1].split()))
    for t in data["tests"]:
        if t["outcome"] in ("FAIL", "ERROR", "TIMEOUT"):
            assert f"    $ {t['binary']} --gtest_filter='{t['name']}'" in md.splitlines()


@pytest.mark.parametrize("baseline", sorted(p.name for p in BASELINES.iterdir()
                                            if (p / "run.json").is_file()))
def test_report_md_of_the_baselines_fits_80_columns(baseline):
    from cvmconf import report
    data = results.load(BASELINES / baseline)
    md = report.render_markdown(data)
    assert long_lines(md) == []
    # Identical skip reasons appear once in "Not exercised", each with its requirements.
    groups = report.not_exercised_groups(data)
    reasons = [why for g in groups for why in g["reasons"]]
    assert reasons and len(reasons) == len(set(reasons))
    section = " ".join(md.split("\nNot exercised\n", 1)[1].split("\n\n\n", 1)[0].split())
    for g in groups:
        for why in g["reasons"]:
            assert section.count("- " + " ".join(why.split()) + " ") == 1, why
    assert {rid for g in groups for rid, _ in g["requirements"]} == \
        {r["id"] for r in data["requirements"] if not r["exercised"]}
    # The environment is a few lines: no KVM capability or pin-provider dump.
    head = md.split("\nFailures\n", 1)[0]
    assert "KVM_CAP_" not in head.replace("KVM_CAP_GUEST_MEMFD", "")
    assert "Pin providers" not in head


def test_local_run_without_guest_memfd_names_the_reference_kernel_command(broken_run):
    from cvmconf import report
    _, _, data = broken_run
    d = json.loads(json.dumps(data))
    d["target"] = {"kind": "local"}
    d["fingerprint"].setdefault("kvm", {})["available"] = True
    d["fingerprint"]["kvm"]["system_caps"] = {"KVM_CAP_GUEST_MEMFD": 0}
    md = report.render_markdown(d)
    assert "has no guest_memfd (KVM_CAP_GUEST_MEMFD 0)" in md
    assert "    $ ./cvmconf run --target qemu" in md.splitlines()
    d["fingerprint"]["kvm"]["system_caps"] = {"KVM_CAP_GUEST_MEMFD": 1}
    assert "./cvmconf run --target qemu" not in report.render_markdown(d)
    d["fingerprint"]["kvm"]["system_caps"] = {}
    d["target"] = {"kind": "qemu"}
    assert "./cvmconf run --target qemu" not in report.render_markdown(d)


# ---------------------------------------------------------------------------------------------
# report.html in a headless browser

PROBE = """<script>
(function () {
  var d = document.documentElement, v = document.getElementById("verdict");
  var f = document.getElementById("failures");
  var logs = document.querySelectorAll("details.kernel-log");
  var open = 0; logs.forEach(function (x) { if (x.open) open++; });
  document.body.setAttribute("data-probe", JSON.stringify({
    scrollWidth: d.scrollWidth, innerWidth: window.innerWidth,
    verdictTop: v.getBoundingClientRect().top, verdictText: v.textContent,
    failuresTop: f.getBoundingClientRect().top,
    envTop: document.getElementById("environment").getBoundingClientRect().top,
    kernelLogs: logs.length, kernelLogsOpen: open}));
})();
</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed (./cvmconf test installs it)")


def chromium_run(html: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,800",
         "--hide-scrollbars", *args, html.as_uri()],
        capture_output=True, text=True, timeout=180)


def test_html_report_fits_1280_px_and_leads_with_the_verdict(run, tmp_path):
    _, run_dir, data = run
    page = tmp_path / "report.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    r = chromium_run(page, tmp_path / "profile", "--dump-dom")
    m = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert m, r.stderr[-3000:]
    import html as htmlmod
    probe = json.loads(htmlmod.unescape(m.group(1)))
    assert probe["innerWidth"] == 1280
    assert probe["scrollWidth"] <= 1280, probe          # long names and commands wrap
    assert probe["verdictText"] == data["summary"]["verdict"]
    assert probe["verdictTop"] < 200                     # at the top of the first screen
    assert probe["failuresTop"] < probe["envTop"]        # failures first, environment last
    assert probe["kernelLogs"] == probe["kernelLogsOpen"]  # failing tests' logs are open
    if any(t.get("kernel_log") and t["outcome"] in ("FAIL", "ERROR", "TIMEOUT")
           for t in data["tests"]):
        assert probe["kernelLogs"] > 0
    shot = tmp_path / "shot.png"
    r = chromium_run(run_dir / "report.html", tmp_path / "profile2", f"--screenshot={shot}")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", r.stderr[-2000:]
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1280, 800)


# ---------------------------------------------------------------------------------------------
# compare

def baseline_pairs():
    """Pairs of baselines of one architecture: a reviewer compares a kernel with and without a
    patch series, or two kernels of one machine; test names differ across architectures."""
    def arch(name):
        return json.loads((BASELINES / name / "run.json").read_text())["fingerprint"]["arch"]
    runs = sorted(p.name for p in BASELINES.iterdir() if (p / "run.json").is_file())
    return [(a, b) for a in runs for b in runs if a != b and arch(a) == arch(b)]


@pytest.mark.parametrize("base, new", baseline_pairs())
def test_compare_of_baselines_fits_in_a_mail(base, new, tmp_path):
    r = cvmconf("compare", str(BASELINES / base), str(BASELINES / new),
                "--json", str(tmp_path / "d.json"))
    assert r.returncode in (0, 1), r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) <= 200, f"{len(lines)} lines"
    assert long_lines(r.stdout) == []
    # The requirement changes come first, then regressions and fixes.
    order = [r.stdout.index(h) for h in ("Requirements whose outcome changed", "Regressions",
                                         "Fixes")]
    assert order == sorted(order)
    # The JSON keeps everything.
    d = json.loads((tmp_path / "d.json").read_text())
    assert len(d["changed_evidence"]) == d["counts"]["changed_evidence"]


# ---------------------------------------------------------------------------------------------
# The verdict line

def test_verdict_says_how_much_was_exercised_everywhere(broken_run):
    r, run_dir, data = broken_run
    verdict = data["summary"]["verdict"]
    n = sum(1 for x in data["requirements"] if x["exercised"])
    assert verdict.startswith("DOES NOT CONFORM: ")
    assert f"({n} of {len(data['requirements'])} requirements exercised; " \
           f"{len(data['requirements']) - n} not exercised: see below)" in verdict
    assert f"cvmconf: {verdict}" in r.stdout.splitlines()
    assert verdict in " ".join((run_dir / "report.md").read_text().split())
    assert f'<p class="verdict" id="verdict">{verdict}</p>' in (run_dir / "report.html").read_text()
    caps = (data["fingerprint"].get("kvm") or {}).get("system_caps") or {}
    if not caps.get("KVM_CAP_GUEST_MEMFD"):
        # This host has no guest_memfd: the summary and report.md point at the reference kernel.
        assert "    ./cvmconf run --target qemu" in r.stdout.splitlines()
        assert "    $ ./cvmconf run --target qemu" in (run_dir / "report.md").read_text()


def test_a_run_that_exercised_no_must_requirement_says_so_and_exits_0(build_dir, broken_dir,
                                                                       tmp_path):
    from conftest import run_broken
    r, run_dir, data = run_broken(build_dir, broken_dir, tmp_path, "skips", "-k", "Skips")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    verdict = data["summary"]["verdict"]
    n = len(data["requirements"])
    assert verdict == (f"NO MUST REQUIREMENT EXERCISED (0 of {n} requirements exercised; "
                       f"{n} not exercised: see below)")
    assert "CONFORMS (" not in r.stdout
    assert f"cvmconf: {verdict}" in r.stdout.splitlines()
    assert (run_dir / "report.md").read_text().splitlines()[3].startswith(
        f"NO MUST REQUIREMENT EXERCISED (0 of {n} requirements exercised;")

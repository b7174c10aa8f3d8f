"""`cvmconf run` on this host with the real suite binaries (filtered to the default platform to
stay fast), `cvmconf list`, and `cvmconf compare` between real runs."""
import json
import os
import shutil

from conftest import REPO, cvmconf
from cvmconf import catalogue, ktap


def host_has_guest_memfd(data) -> bool:
    return data["fingerprint"]["probe"]["system"].get("KVM_CAP_GUEST_MEMFD", 0) > 0


def test_real_run_writes_every_file(real_run):
    r, run_dir, data = real_run
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    for f in ("run.json", "junit.xml", "results.ktap", "report.md", "report.html"):
        assert (run_dir / f).stat().st_size > 0, f
    assert data["complete"] is True
    assert data["tests"], "the filter selected nothing"
    assert all(t["binary"].startswith("cvm_suite_") for t in data["tests"])
    # Every binary built here ran at least one batch.
    assert {b["binary"] for b in data["batches"]} >= {t["binary"] for t in data["tests"]}
    ktap.parse((run_dir / "results.ktap").read_text())


def test_real_run_report_lists_every_requirement_with_outcome_or_reason(real_run):
    _, run_dir, data = real_run
    md = (run_dir / "report.md").read_text()
    cat = catalogue.load()
    reqs = {r["id"]: r for r in data["requirements"]}
    assert set(reqs) == {r.id for r in cat.requirements}
    table = md.split("\nRequirements\n", 1)[1].split("\nNot exercised\n", 1)[0]
    not_ex = md.split("\nNot exercised\n", 1)[1]
    for rid, r in reqs.items():
        assert f"    {rid} " in table, rid            # one row per requirement
        if not r["exercised"]:
            assert r["reason"], rid
            assert f"{rid} ({r['level']})" in " ".join(not_ex.split())
    # What this host exercises follows from what its kernel says (cvm-probe), not from which
    # machine this is: host kernels differ (one 6.18 has guest_memfd, another none).
    if host_has_guest_memfd(data):
        assert reqs["MMAP-001"]["exercised"] and reqs["MMAP-001"]["outcome"] == "PASS"
    else:
        assert reqs["MMAP-001"]["outcome"] == "SKIP" and not reqs["MMAP-001"]["exercised"]
        assert "KVM_CAP_GUEST_MEMFD absent" in reqs["MMAP-001"]["reason"], reqs["MMAP-001"]
    # Platforms this host lacks are not exercised, and the report says exactly why.
    cite = catalogue.load().seed_titles["004_76853d6ea7349862.txt"]
    assert cite in md


def test_real_run_fingerprint(real_run):
    _, _, data = real_run
    fp = data["fingerprint"]
    assert fp["kernel"]["release"] and fp["arch"]
    assert fp["probe"]["kvm_available"] is True
    assert "non-CoCo" in fp["platforms"]["labels"]
    names = {p["name"] for p in fp["pin_providers"]}
    assert {"io_uring", "vmsplice"} <= names
    assert all("available" in p and "kind" in p for p in fp["pin_providers"])
    assert isinstance(fp["hugetlb_sizes_kib"], list)
    assert fp["kmsg"]["readable"] is os.access("/dev/kmsg", os.R_OK)
    if not fp["kmsg"]["readable"]:
        assert fp["kmsg"]["error"]
    assert fp["guest_memfd_flags"] == fp["probe"]["system"]["KVM_CAP_GUEST_MEMFD_FLAGS"]
    assert data["checkout"]["message_id"] == "20250101.test@example.org"
    assert data["options"]["duration"] == 1
    assert all(b["command"].startswith("CVMCONF_DURATION=1 ") for b in data["batches"])


# The race fixtures of cvm_suite_races (suites/races), named for what they race.
RACE_FIXTURES = ("/PunchRace.", "/MemslotRace.", "/ConversionRace.")


def is_race(test):
    return any(f in test["name"] for f in RACE_FIXTURES)


def test_duration_makes_the_races_run_that_long_and_reports_their_throughput(real_run):
    r, run_dir, data = real_run
    if not host_has_guest_memfd(data):
        # Nothing to race on this host: every race says why. The throughput path is checked on
        # the reference kernel (test_reference_kernels.py, --duration there).
        races = [t for t in data["tests"] if is_race(t)]
        assert races and all(t["outcome"] == "SKIP" for t in races), races
        assert all("KVM_CAP_GUEST_MEMFD absent" in t["skip_reason"] for t in races)
        return
    races = [t for t in data["tests"] if is_race(t) and t["outcome"] == "PASS"]
    assert races, "no race ran on this host"
    for t in races:
        props = t["properties"]
        assert int(props["duration_ms"]) >= 900, (t["name"], props)   # --duration 1
        assert float(props["ops_per_sec"]) > 0 and int(props["iterations"]) > 0
    for text in (r.stdout, (run_dir / "report.md").read_text()):
        assert "ops/s" in text


def test_list_shows_tests_and_requirements_without_running(build_dir, tmp_path):
    r = cvmconf("--build-dir", str(build_dir), "list", "--requirement", "MMAP-001")
    assert r.returncode == 0, r.stderr
    assert "FlagsAcceptedIffAdvertised/x86_default" in r.stdout
    assert "InvalidSizesRejected" not in r.stdout.split("Requirements")[0]
    assert "MMAP-002" in r.stdout.split("Requirements")[1]     # every requirement listed
    r = cvmconf("--build-dir", str(build_dir), "list", "--family", "gmem-mmap", "-k", "x86_default")
    assert r.returncode == 0 and "deselected" in r.stdout


def test_bad_selection_is_a_usage_error(build_dir, tmp_path):
    for args, msg in ((("--requirement", "NOPE-001"), "no such requirement"),
                      (("--family", "nope"), "no such family"),
                      (("-k", "and and"), "not a valid expression"),
                      (("-k", "no_such_test_anywhere"), "no test matches")):
        r = cvmconf("--build-dir", str(build_dir), "run", "--results-dir", str(tmp_path), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is left behind by a run that did not start"


def test_compare_same_kernel_has_no_regression(real_run, tmp_path):
    _, run_dir, _ = real_run
    other = tmp_path / "again"
    shutil.copytree(run_dir, other)
    r = cvmconf("compare", str(run_dir), str(other), "--json", str(tmp_path / "d.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no regression" in r.stdout
    d = json.loads((tmp_path / "d.json").read_text())
    assert d["regression"] is False and d["counts"]["regressions"] == 0


def test_compare_finds_a_regression_and_exits_non_zero(real_run, tmp_path):
    _, run_dir, data = real_run
    base = json.loads(json.dumps(data))
    new = json.loads(json.dumps(data))
    # Two real tests, whatever this host made of them: in BASE the first passed, the second was
    # skipped; in NEW the first fails and the second passes.
    assert len(new["tests"]) >= 2
    regressed, newly = new["tests"][0], new["tests"][1]
    for t in base["tests"]:
        if t["name"] == regressed["name"]:
            t["outcome"], t["status"], t["skip_reason"] = "PASS", "PASS", ""
    newly["outcome"], newly["status"], newly["skip_reason"] = "PASS", "PASS", ""
    regressed["outcome"], regressed["status"] = "FAIL", "FAIL"
    regressed["messages"] = ["the patched kernel accepted the flag"]
    for req in new["requirements"]:
        if f"{regressed['binary']}:{regressed['name']}" in req["tests"]:
            req["outcome"] = "FAIL"
    for t in base["tests"]:           # in BASE this one was skipped
        if t["name"] == newly["name"]:
            t["outcome"], t["status"], t["skip_reason"] = "SKIP", "SKIP", "capability absent: x"
    for name, d in (("base", base), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(d))
    r = cvmconf("compare", str(tmp_path / "base"), str(tmp_path / "new"), "--markdown",
                str(tmp_path / "d.md"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REGRESSION" in r.stdout
    regressions = r.stdout.split("Regressions (1)")[1].split("Fixes")[0]
    assert regressed["name"] in regressions
    assert "the patched kernel accepted the flag" in regressions
    assert newly["name"] in r.stdout.split("Newly exercised (1)")[1]
    assert (tmp_path / "d.md").read_text() == r.stdout
    j = cvmconf("compare", str(tmp_path / "base"), str(tmp_path / "new"), "--format", "json")
    d = json.loads(j.stdout)
    assert d["counts"]["regressions"] == 1 and d["counts"]["newly_exercised"] == 1
    assert any(x["kind"] == "regression" for x in d["requirements"])
    # And the other way round it is a fix, not a regression.
    back = cvmconf("compare", str(tmp_path / "new"), str(tmp_path / "base"), "--format", "json")
    assert back.returncode == 0
    d = json.loads(back.stdout)
    assert d["counts"]["fixes"] == 1 and d["counts"]["newly_skipped"] == 1


def test_compare_rejects_what_is_not_a_run(tmp_path):
    (tmp_path / "x").mkdir()
    r = cvmconf("compare", str(tmp_path / "x"), str(tmp_path / "x"))
    assert r.returncode == 2 and "no run.json" in r.stderr
    (tmp_path / "x" / "run.json").write_text("{broken")
    r = cvmconf("compare", str(tmp_path / "x"), str(tmp_path / "x"))
    assert r.returncode == 2 and "not a readable run.json" in r.stderr
    assert "Traceback" not in r.stderr


def test_committed_baselines_are_current_run_records(tmp_path):
    """results/baselines/ holds real runs to compare against: each must still load, cover the
    catalogue as it is now (refresh it when requirements change), and compare clean with itself."""
    base_dir = REPO / "results" / "baselines"
    runs = sorted(p for p in base_dir.iterdir() if (p / "run.json").is_file())
    assert runs, f"no baseline in {base_dir}"
    ids = {r.id for r in catalogue.load().requirements}
    for run in runs:
        data = json.loads((run / "run.json").read_text())
        assert data["complete"] is True, run
        assert {r["id"] for r in data["requirements"]} == ids, f"{run.name} is stale: re-run it"
        r = cvmconf("compare", str(run), str(run))
        assert r.returncode == 0 and "no regression" in r.stdout, r.stdout + r.stderr

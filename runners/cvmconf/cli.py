"""cvmconf command line (called by the ./cvmconf script after it installed and built)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cvmconf import catalogue, gtest, pincoverage, rollup
from cvmconf.errors import EXIT_HARNESS, EXIT_NONCONFORMANCE, EXIT_OK, CvmconfError, HarnessError

REPO = Path(__file__).resolve().parents[2]


def _build_dir(args) -> Path:
    return Path(args.build_dir or os.environ.get("CVMCONF_BUILD_DIR") or REPO / "build")


def cmd_check_catalogue(args) -> int:
    cat = catalogue.load(args.catalogue, seeds_dir=args.seeds_dir)
    declared: dict[str, list[str]] = {}
    for b in gtest.suite_binaries(_build_dir(args)):
        declared.update(gtest.list_requirements(b))
    problems = catalogue.cross_check(cat, declared)
    for p in problems:
        print(f"catalogue: {p}")
    musts = [r for r in cat.requirements if r.level == "MUST"]
    print(f"catalogue: {len(cat.requirements)} requirements ({len(musts)} MUST), "
          f"{len(declared)} tests, {len(problems)} problem(s)")
    return EXIT_NONCONFORMANCE if problems else EXIT_OK


def cmd_list(args) -> int:
    cat = catalogue.load(args.catalogue)
    by_id = cat.by_id()
    for b in gtest.suite_binaries(_build_dir(args)):
        for name, ids in sorted(gtest.list_requirements(b).items()):
            print(f"{b.name}  {name}  [{' '.join(ids)}]")
    print()
    for r in cat.requirements:
        print(f"{r.id:11} {r.level:6} {r.family:24} {r.statement}")
    del by_id
    return EXIT_OK


def cmd_run(args) -> int:
    cat = catalogue.load(args.catalogue)
    build = _build_dir(args)
    caps = gtest.probe(build)
    gtest.require_kvm(caps)
    results: list[gtest.TestResult] = []
    with tempfile.TemporaryDirectory(prefix="cvmconf-run-") as tmp:
        for b in gtest.suite_binaries(build):
            report = Path(tmp) / f"{b.name}.json"
            cmd = [str(b), f"--gtest_output=json:{report}"]
            if args.filter:
                cmd.append(f"--gtest_filter={args.filter}")
            try:
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=args.timeout, check=False)
            except subprocess.TimeoutExpired:
                raise HarnessError(f"{b.name} did not finish within {args.timeout} s") from None
            try:
                results += gtest.parse_report(report, b.name)
            except gtest.ReportError as e:
                raise HarnessError(f"{b.name}: {e}") from None
    reqs = rollup.requirement_results(cat, results)
    print(f"kernel: {os.uname().release}  arch: {caps.get('arch')}  "
          f"VM types: {', '.join(caps.get('vm_types_creatable', []))}")
    print(f"{'requirement':11} {'level':6} {'outcome':8} {'exercised':9} tests  reason")
    for r in reqs:
        print(f"{r.id:11} {r.level:6} {r.outcome:8} {'yes' if r.exercised else 'no':9} "
              f"{len(r.tests):5}  {r.reason}")
    coverage = pincoverage.format_pin_coverage(pincoverage.pin_coverage(results))
    if coverage:
        print("\npin coverage (per backing and GUP flavour):")
        print(coverage)
    counted = [r for r in reqs if r.level != "INFO" and r.exercised]
    bad = [r for r in counted if r.outcome in (gtest.FAIL,)]
    broken = [r for r in reqs if r.outcome in (gtest.ERROR, gtest.TIMEOUT)]
    print(f"\n{len(counted)} MUST/SHOULD requirements exercised, {len(bad)} do not conform, "
          f"{len(broken)} with harness errors, "
          f"{sum(1 for r in reqs if not r.exercised)} not exercised")
    if broken:
        return EXIT_HARNESS
    return EXIT_NONCONFORMANCE if bad else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cvmconf", description=__doc__)
    p.add_argument("--build-dir", help="build tree (default: ./build or $CVMCONF_BUILD_DIR)")
    p.add_argument("--catalogue", help="requirement catalogue (default: suites/requirements.yaml)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the conformance suites on this host")
    r.add_argument("--filter", help="GoogleTest filter")
    r.add_argument("--timeout", type=int, default=1800, help="seconds per suite binary")
    r.set_defaults(func=cmd_run)
    l = sub.add_parser("list", help="list tests and requirements without running anything")
    l.set_defaults(func=cmd_list)
    c = sub.add_parser("check-catalogue",
                       help="check that the catalogue and the tests' requirement IDs agree")
    c.add_argument("--seeds-dir", help="also check that cited seed files exist there")
    c.set_defaults(func=cmd_check_catalogue)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CvmconfError as e:
        print(f"cvmconf: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cvmconf: interrupted", file=sys.stderr)
        return EXIT_HARNESS

"""report.md and report.html from run.json, rendered with jinja2 templates in results/templates/
(HTML with autoescaping: every string from a test, a kernel log or a probe is shown as text)."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import jinja2

from cvmconf import gtest, pincoverage, results
from cvmconf.gtest import BAD, SKIP
from cvmconf.rollup import ORDER, outcome_rank
from cvmconf.text import printable

TEMPLATES = Path(__file__).resolve().parents[2] / "results" / "templates"
WIDTH = 80               # report.md: every line but literal command lines ("    $ ...")
_BREAK_AFTER = "/._-:,=)"


def _split_long(line: str, width: int, indent: str) -> list[str]:
    """A line longer than width (one long token) cut after a '/', '.', '_' ... near the end,
    the rest continued with indent; hard-cut when there is no such character."""
    out = []
    while len(line) > width:
        lo = len(indent) + 8
        cut = max((i + 1 for i in range(lo, width) if line[i] in _BREAK_AFTER), default=width)
        out.append(line[:cut])
        line = indent + line[cut:]
    out.append(line)
    return out


def wrap(text, indent: int | str = 0, subsequent: int | str | None = None,
         width: int = WIDTH) -> list[str]:
    """text (one paragraph; line breaks are kept) as lines of at most width columns."""
    first = " " * indent if isinstance(indent, int) else indent
    rest = first if subsequent is None else (" " * subsequent if isinstance(subsequent, int)
                                             else subsequent)
    out: list[str] = []
    for para in str(text).splitlines() or [""]:
        lines = textwrap.wrap(para, width, initial_indent=first, subsequent_indent=rest,
                              break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
        for line in lines:
            out.extend(_split_long(line, width, rest))
        first = rest
    return out


def describe_target(t: dict) -> str:
    """"local", or "qemu (x86_64, tcg, kernel linux-image-cloud-amd64, 1 reboot)"."""
    kind = t.get("kind", "?")
    if kind != "qemu":
        return kind
    parts = [t.get("arch", "?"), t.get("accel", "?"), f"kernel {t.get('kernel', '?')}"]
    if t.get("pkvm"):
        parts.append("pKVM")
    if t.get("append"):
        parts.append(f"append {t['append']!r}")
    n = t.get("reboots", 0)
    parts.append(f"{n} reboot{'s' if n != 1 else ''} after guest crashes")
    return f"qemu ({', '.join(parts)})"


def seed_tag(seed: str) -> str:
    m = re.match(r"^(\d+)_", seed)
    return m.group(1) if m else seed


def counts_text(c: dict) -> str:
    return "/".join(str(c.get(o, 0)) for o in ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP"))


def _first_lines(text: str, n: int = 40) -> list[str]:
    lines = printable(text.rstrip()).splitlines()
    return lines if len(lines) <= n else lines[:n] + [f"[... {len(lines) - n} more lines]"]


def test_view(t: dict) -> dict:
    props = dict(t.get("properties") or {})
    evidence = dict(t.get("evidence") or {})
    rerun = f"{t['binary']} --gtest_filter='{t['name']}'"
    output = evidence.pop("output_tail", "")
    return {
        "binary": t["binary"], "family": gtest.family_of(t["binary"]), "name": t["name"],
        "outcome": t["outcome"], "duration": float(t.get("duration") or 0),
        "requirements": t.get("requirements", []),
        "messages": [_first_lines(m) for m in t.get("messages", [])],
        "skip_reason": printable(t.get("skip_reason", "")),
        "kernel_log": [printable(l) for l in t.get("kernel_log", [])],
        "properties": sorted((k, printable(v)) for k, v in props.items()),
        "evidence": sorted((k, printable(v)) for k, v in evidence.items()),
        "output": _first_lines(output, 60) if output else [], "rerun": rerun,
        "platform": props.get("platform", ""), "flaky": bool(t.get("flaky")),
        "attempts": t.get("attempts") or [],
    }


def short_environment(run: dict) -> list[tuple[str, str]]:
    """The few environment lines report.md shows (the rest is in run.json and report.html)."""
    fp = run.get("fingerprint", {})
    k = fp.get("kernel", {})
    rows = [("Kernel", f"{k.get('release', '?')} ({fp.get('arch', '?')})"
                       + (f", config sha256 {k['config_sha256'][:16]}"
                          if k.get("config_sha256") else ""))]
    rows.append(("Target", describe_target(run.get("target", {}))))
    plat = fp.get("platforms", {})
    det = ", ".join(f"{d['platform']} ({d['vm_type']})" for d in plat.get("detected", [])) or "none"
    un = sorted({u["platform"] for u in plat.get("unavailable", [])})
    if plat.get("host"):
        rows.append(("Host", plat["host"]))
    rows.append(("Platforms", det + (f"; not offered: {', '.join(un)}" if un else "")))
    km = fp.get("kmsg", {})
    if not km.get("readable"):
        rows.append(("Kernel log", f"NOT watched: {km.get('error')}"))
    co = run.get("checkout", {})
    if co.get("message_id"):
        rows.append(("Series", f"Message-ID <{co['message_id']}>"))
    if co.get("git_commit_hash"):
        rows.append(("Commit", co["git_commit_hash"]))
    sel = (run.get("options") or {}).get("selection")
    if sel:
        rows.append(("Selection", sel))
    for note in list(run.get("notes", []) or []) + list(plat.get("notes", []) or []):
        rows.append(("Note", note))
    return rows


def not_exercised_groups(run: dict) -> list[dict]:
    """Requirements not exercised, grouped by reason: each distinct skip reason (or other
    reason) once, reasons affecting the same requirements together, with those requirements:
    [{"reasons": [...], "requirements": [(id, level)]}], the most widespread first."""
    tests = {f"{t['binary']}:{t['name']}": t for t in run["tests"]}
    groups: dict[str, list[tuple[str, str, int]]] = {}
    for r in run["requirements"]:
        if r.get("exercised"):
            continue
        rtests = [tests[k] for k in r.get("tests", []) if k in tests]
        skipped: dict[str, int] = {}
        for t in rtests:
            if t["outcome"] == SKIP:
                why = t.get("skip_reason") or "skipped without a reason"
                skipped[why] = skipped.get(why, 0) + 1
        broken = [t for t in rtests if t["outcome"] in BAD]
        not_run = [t for t in rtests if t["outcome"] not in BAD and t["outcome"] != SKIP]
        items = list(skipped.items())
        if broken:
            items.append(("did not complete: " + ", ".join(sorted({t["outcome"] for t in broken}))
                          + " (see Failures)", len(broken)))
        if not_run:
            items.append(("not run: " + (not_run[0].get("messages") or ["no result"])[0]
                          .removeprefix("not run: "), len(not_run)))
        if not items:
            items = [(r.get("reason") or "no test of it ran", 0)]
        for why, n in items:
            groups.setdefault(printable(why), []).append((r["id"], r.get("level", ""), n))
    # Reasons that affect the same requirements are listed together, the requirements once.
    merged: dict[tuple, list[str]] = {}
    for why, reqs in groups.items():
        merged.setdefault(tuple((rid, level) for rid, level, _ in reqs), []).append(why)
    return [{"reasons": sorted(whys), "requirements": list(reqs)}
            for reqs, whys in sorted(merged.items(), key=lambda kv: (-len(kv[0]), kv[1]))]


def environment(run: dict) -> list[tuple[str, str]]:
    fp = run.get("fingerprint", {})
    k = fp.get("kernel", {})
    rows = []
    cfg = (f"config sha256 {k['config_sha256'][:16]} ({k.get('config_source')})"
           if k.get("config_sha256") else f"config unknown ({k.get('config_error') or 'unreadable'})")
    rows.append(("Kernel", f"{k.get('release', '?')} ({fp.get('arch', '?')}), {cfg}"))
    if k.get("version"):
        rows.append(("Build", k["version"]))
    plat = fp.get("platforms", {})
    det = ", ".join(f"{d['platform']} ({d['vm_type']})" for d in plat.get("detected", [])) or "none"
    if plat.get("host"):
        rows.append(("Host", plat["host"]))
    for note in run.get("notes", []) or []:
        rows.append(("Note", note))
    rows.append(("Platform", det))
    un = sorted({u["platform"] for u in plat.get("unavailable", [])})
    if un:
        rows.append(("Not offered", ", ".join(un)))
    for note in plat.get("notes", []):
        rows.append(("Note", note))
    if fp.get("cpu_model"):
        rows.append(("CPU", f"{fp['cpu_model']} ({fp.get('cpus')} CPUs)"))
    kvm = fp.get("kvm", {})
    caps = kvm.get("system_caps", {}) or {}
    if caps:
        rows.append(("KVM caps", ", ".join(f"{k2.replace('KVM_CAP_', '')}={v}"
                                             for k2, v in sorted(caps.items()))))
    pins = fp.get("pin_providers", [])
    if pins:
        rows.append(("Pin providers", "; ".join(
            f"{p.get('name')}: {'available' if p.get('available') else 'absent'}"
            f" ({p.get('kind') if p.get('available') else p.get('reason', '')})" for p in pins)))
    if fp.get("hugetlb_sizes_kib") is not None:
        rows.append(("hugetlb sizes", ", ".join(f"{s} kB" for s in fp["hugetlb_sizes_kib"]) or "none"))
    km = fp.get("kmsg", {})
    rows.append(("Kernel log", "watched" if km.get("readable") else f"NOT watched: {km.get('error')}"))
    co = run.get("checkout", {})
    if co.get("message_id"):
        rows.append(("Patch series", f"Message-ID <{co['message_id']}>"))
    if co.get("patchset_hash"):
        rows.append(("Patchset hash", co["patchset_hash"]))
    for key, label in (("tree_name", "Tree"), ("git_commit_hash", "Commit"),
                       ("git_repository_branch", "Branch"), ("git_repository_url", "Repository")):
        if co.get(key):
            rows.append((label, co[key]))
    rows.append(("Target", describe_target(run.get("target", {}))))
    o = run.get("options", {})
    if o.get("duration") is not None:
        rows.append(("Stress budget", f"{o['duration']} s per stress test"))
    sel = o.get("selection")
    if sel:
        rows.append(("Selection", sel))
    return rows


def pin_coverage(run: dict) -> list:
    """The pin suites' coverage rows (requirement x backing x GUP flavour), from run.json."""
    results = [gtest.TestResult.from_dict(t) for t in run["tests"]]
    return pincoverage.pin_coverage(results)


def view(run: dict) -> dict:
    tests = {f"{t['binary']}:{t['name']}": t for t in run["tests"]}
    reqs = sorted(run["requirements"], key=lambda r: (outcome_rank(r["outcome"]), r["id"]))
    seeds_cited: list[str] = []
    for r in reqs:
        for s in r.get("seeds", []):
            if s not in seeds_cited:
                seeds_cited.append(s)
    titles = run.get("seeds", {})
    req_rows = []
    for r in reqs:
        rtests = [test_view(tests[k]) for k in r.get("tests", []) if k in tests]
        req_rows.append({
            **r, "counts_text": counts_text(r.get("counts", {})),
            "seed_tags": [seed_tag(s) for s in r.get("seeds", [])],
            "tests_view": rtests,
            "bad_tests": [t for t in rtests if t["outcome"] in BAD],
            "statement_wrapped": textwrap.wrap(r.get("statement", ""), 88),
            "reason_wrapped": textwrap.wrap(r.get("reason", ""), 88),
        })
    linked = {k for r in reqs for k in r.get("tests", [])}
    orphans = [test_view(t) for k, t in tests.items() if k not in linked and t["outcome"] in BAD]
    stress = []
    for t in run["tests"]:
        p = t.get("properties") or {}
        if "ops_per_sec" in p or "iterations" in p:
            stress.append({"binary": t["binary"], "name": t["name"], "outcome": t["outcome"],
                           "iterations": p.get("iterations", ""),
                           "ops_per_sec": p.get("ops_per_sec", ""), "seed": p.get("seed", ""),
                           "duration": float(t.get("duration") or 0)})
    s = run["summary"]
    pin_rows = pin_coverage(run)
    return {
        "run": run, "env": environment(run), "reqs": req_rows,
        "failing": [r for r in req_rows if r["outcome"] in BAD], "orphans": orphans,
        "not_exercised": [r for r in req_rows if not r["exercised"]],
        "seeds": [{"file": sd, "tag": seed_tag(sd), "title": titles.get(sd, "")}
                  for sd in sorted(seeds_cited)],
        "stress": stress, "problems": run.get("problems", []), "summary": s,
        "flaky": [test_view(t) for t in run["tests"] if t.get("flaky")],
        "pin_rows": pin_rows,
        "pin_table": pincoverage.format_pin_coverage(pin_rows),
        "outcomes": list(ORDER),
        "short_env": short_environment(run), "advice": results.advice(run),
        "not_exercised_groups": not_exercised_groups(run),
        "disagreements": disagreements(run, req_rows),
        "upstream": run.get("upstream"),
    }


def disagreements(run: dict, req_rows: list[dict]) -> list[str]:
    """Where the run disagrees with itself: a requirement whose tests reached both PASS and
    FAIL (e.g. on different platforms), a flaky test, a harness problem."""
    out = []
    for r in req_rows:
        c = r.get("counts") or {}
        if c.get("PASS") and c.get("FAIL"):
            out.append(f"{r['id']}: {c['PASS']} test(s) pass and {c['FAIL']} fail"
                       + (f" (exercised on {', '.join(r['platforms'])})" if r.get("platforms")
                          else ""))
    for t in run["tests"]:
        if t.get("flaky"):
            tries = ", ".join(f"retry {a.get('retry')} {a.get('outcome')}"
                              for a in t.get("attempts") or [])
            out.append(f"{t['name']}: {t['outcome']} first, then {tries} (flaky)")
    for p in run.get("problems", []):
        out.append(f"harness problem in {p.get('batch')} ({p.get('binary')}): {p.get('problem')}")
    return [printable(x) for x in out]


def jinja_env(autoescape: bool) -> jinja2.Environment:
    """The templates' environment (report.*.j2, compare.md.j2); HTML wants autoescape."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=autoescape, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["pad"] = lambda v, n: str(v).ljust(n)
    env.filters["wrap"] = wrap
    env.filters["format_seed"] = lambda tag: f"[{tag}]"
    env.filters["format_req"] = lambda r: f"{r[0]} ({r[1]})"
    return env


def render_markdown(run: dict) -> str:
    return jinja_env(False).get_template("report.md.j2").render(**view(run))


def render_html(run: dict) -> str:
    return jinja_env(True).get_template("report.html.j2").render(**view(run))


def write(run: dict, run_dir: Path) -> None:
    (run_dir / "report.md").write_text(render_markdown(run), encoding="utf-8")
    (run_dir / "report.html").write_text(render_html(run), encoding="utf-8")

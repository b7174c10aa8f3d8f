"""`cvmconf compare BASE NEW`: what changed between two runs (e.g. a kernel without and with a
patch series), per test and per requirement.

  regressions       a test that passed in BASE fails, errors or times out in NEW; or a test that
                    did not fail in BASE (skipped, absent, broken) fails in NEW
  fixes             a test that failed, errored or timed out in BASE passes in NEW
  newly exercised   a test skipped or absent in BASE that ran to a verdict in NEW
  newly skipped     a test that ran to a verdict in BASE and is skipped in NEW (lost coverage)
  changed evidence  same outcome, different failure messages, skip reason or properties
  added / removed   tests present on one side only (and not counted above)

A test marked flaky in NEW (it failed, then passed on a retry) stays a regression, marked flaky.
Regressions say what broke: "kernel FAIL" (the kernel did not do what the requirement says) or
"harness ERROR"/"harness TIMEOUT" (the test did not complete: the harness or the test broke, the
kernel's behaviour is unknown); a requirement whose roll-up went to ERROR/TIMEOUT is a "harness
error", not a "regression".

The exit status is 1 when there is a regression (of a test, or of a MUST/SHOULD requirement's
roll-up), else 0; a test that names only INFO requirements is listed but does not count.

The Markdown is meant for a mail: requirement changes first, then regressions and fixes in
full; newly exercised / newly skipped tests grouped by requirement when there are many; changed
evidence as counts by kind, listing only the tests of requirements whose outcome changed. The
JSON keeps every entry.
"""
from __future__ import annotations

import json
from pathlib import Path

from cvmconf.gtest import BAD, BROKEN, FAIL, PASS, SKIP
from cvmconf.report import jinja_env
from cvmconf.rollup import NOT_RUN, info_only

VERDICT = (PASS, FAIL)
# Properties that legitimately differ from run to run; not "changed evidence".
VOLATILE_PROPERTIES = {"kernel_log", "kmsg_lost", "ops_per_sec", "iterations", "seed",
                       "elapsed", "timestamp"}


def _key(t: dict) -> str:
    return f"{t['binary']}:{t['name']}"


def _evidence(t: dict) -> dict:
    props = {k: v for k, v in (t.get("properties") or {}).items() if k not in VOLATILE_PROPERTIES}
    return {"messages": [m for m in t.get("messages", [])],
            "skip_reason": t.get("skip_reason", ""), "properties": props}


def _entry(b: dict | None, n: dict | None) -> dict:
    t = n or b
    return {"test": t["name"], "binary": t["binary"], "requirements": t.get("requirements", []),
            "base": b["outcome"] if b else None, "new": n["outcome"] if n else None,
            "flaky": bool(n and n.get("flaky")), "new_message": _message(n)}


def _message(t: dict | None) -> str:
    if not t:
        return ""
    msgs = [m for m in t.get("messages", []) if m.strip()]
    text = msgs[0] if msgs else t.get("skip_reason", "")
    return " ".join(text.split())[:300]


def _regression(bo: str | None, no: str | None) -> bool:
    """BASE outcome -> NEW outcome is a regression: a pass turned bad, or anything but a failure
    turned into one."""
    return (bo == PASS and no in BAD) or (bo != FAIL and no == FAIL)


def _fix(bo: str | None, no: str | None) -> bool:
    return bo in BAD and no == PASS


def _compare_tests(base: dict, new: dict, levels: dict) -> dict:
    """The tests of both runs sorted into regressions, fixes, newly exercised/skipped, changed
    evidence, added and removed."""
    bt = {_key(t): t for t in base["tests"]}
    nt = {_key(t): t for t in new["tests"]}
    out = {k: [] for k in ("regressions", "fixes", "newly_exercised", "newly_skipped",
                           "changed_evidence", "added", "removed")}
    for key in sorted(set(bt) | set(nt)):
        b, n = bt.get(key), nt.get(key)
        bo = b["outcome"] if b else None
        no = n["outcome"] if n else None
        e = _entry(b, n)
        e["info_only"] = info_only((n or b).get("requirements"), levels)
        if n is None:
            out["removed"].append(e)
            continue
        if _regression(bo, no):
            e["kind"] = "kernel FAIL" if no == FAIL else f"harness {no}"
            out["regressions"].append(e)
        elif _fix(bo, no):
            out["fixes"].append(e)
        elif bo in (SKIP, NOT_RUN, None) and no in VERDICT:
            out["newly_exercised"].append(e)
        elif bo in VERDICT and no == SKIP:
            out["newly_skipped"].append(e)
        elif b is None:
            out["added"].append(e)
        elif bo == no and _evidence(b) != _evidence(n):
            eb, en = _evidence(b), _evidence(n)
            e["changes"] = sorted(k for k in eb if eb[k] != en[k])
            out["changed_evidence"].append(e)
    return out


def _compare_requirements(base: dict, new: dict) -> list[dict]:
    """The requirements whose roll-up outcome differs, each with the kind of change."""
    br = {r["id"]: r for r in base["requirements"]}
    nr = {r["id"]: r for r in new["requirements"]}
    reqs = []
    for rid in sorted(set(br) | set(nr)):
        b, n = br.get(rid), nr.get(rid)
        bo = b["outcome"] if b else None
        no = n["outcome"] if n else None
        if bo == no:
            continue
        kind = ("harness error" if _regression(bo, no) and no in BROKEN else
                "regression" if _regression(bo, no) else
                "fix" if _fix(bo, no) else
                "newly exercised" if (not (b and b.get("exercised")) and n and n.get("exercised")) else
                "newly not exercised" if (b and b.get("exercised") and not (n and n.get("exercised")))
                else "changed")
        reqs.append({"id": rid, "level": (n or b).get("level"), "base": bo, "new": no,
                     "kind": kind, "reason": (n or {}).get("reason", "")})
    return reqs


def _side(run: dict) -> dict:
    fp = run.get("fingerprint", {})
    k = fp.get("kernel", {})
    return {"run_id": run["run_id"], "complete": run.get("complete"),
            "incomplete_reason": run.get("incomplete_reason"),
            "kernel": k.get("release"), "kernel_version": k.get("version"),
            "config_sha256": k.get("config_sha256"), "arch": fp.get("arch"),
            "platforms": fp.get("platforms", {}).get("labels", []),
            "message_id": run.get("checkout", {}).get("message_id"),
            "verdict": run.get("summary", {}).get("verdict")}


def _notes(b: dict, n: dict) -> list[str]:
    """What a reader must know before trusting the comparison of sides b and n."""
    notes = []
    if b["arch"] != n["arch"]:
        notes.append("the runs are on different architectures")
    if set(b["platforms"]) != set(n["platforms"]):
        notes.append("the runs detected different platforms: "
                     f"{', '.join(b['platforms']) or 'none'} vs "
                     f"{', '.join(n['platforms']) or 'none'}")
    for name, s in (("BASE", b), ("NEW", n)):
        if not s["complete"]:
            notes.append(f"{name} run is incomplete: {s['incomplete_reason']}")
    return notes


def compare(base: dict, new: dict) -> dict:
    levels = {r["id"]: r.get("level") for r in base["requirements"]}
    levels.update({r["id"]: r.get("level") for r in new["requirements"]})
    out = _compare_tests(base, new, levels)
    reqs = out["requirements"] = _compare_requirements(base, new)
    out["base"], out["new"] = _side(base), _side(new)
    out["notes"] = _notes(out["base"], out["new"])
    from cvmconf import upstream
    out["upstream"] = upstream.compare(base, new)
    # INFO requirements never count towards conformance: their tests are listed, not counted.
    req_regressions = [r for r in reqs if r["kind"] == "regression"
                       and r.get("level") in ("MUST", "SHOULD")]
    out["regression"] = bool([e for e in out["regressions"] if not e["info_only"]]
                             or req_regressions)
    out["counts"] = {k: len(out[k]) for k in ("regressions", "fixes", "newly_exercised",
                                              "newly_skipped", "changed_evidence", "added",
                                              "removed")}
    kinds: dict[str, int] = {}
    for e in out["changed_evidence"]:
        k = " and ".join(x.replace("_", " ") for x in e["changes"])
        kinds[k] = kinds.get(k, 0) + 1
    out["changed_evidence_kinds"] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    moved = {r["id"] for r in reqs}
    out["changed_evidence_moved"] = [e for e in out["changed_evidence"]
                                     if set(e["requirements"]) & moved]
    return out


LIST_IN_FULL = 15     # Markdown: longer lists of tests are grouped by requirement
MOVED_IN_FULL = 10    # Markdown: changed-evidence entries listed at most
REQUIREMENT_ROWS_IN_FULL = 4   # Markdown: a longer run of one requirement transition is a paragraph


def by_requirement(entries: list[dict]) -> list[dict]:
    """[{"id", "n", "transitions": "SKIP -> PASS 3, ...", "kinds": "SKIP -> PASS, ..."}] of
    entries, per requirement named."""
    groups: dict[str, dict[str, int]] = {}
    for e in entries:
        for rid in e["requirements"] or ["(no requirement)"]:
            t = f"{e['base'] or 'absent'} -> {e['new'] or 'absent'}"
            groups.setdefault(rid, {})[t] = groups.setdefault(rid, {}).get(t, 0) + 1
    return [{"id": rid, "n": sum(ts.values()),
             "transitions": ", ".join(f"{t} {n}" for t, n in sorted(ts.items())),
             "kinds": ", ".join(sorted(ts))}
            for rid, ts in sorted(groups.items())]


def requirement_groups(rows: list[dict]) -> list[dict]:
    """The changed requirements in runs of one transition ({"transition", "rows"}), in their
    order, so that 40 requirements gone from PASS to SKIP take a paragraph, not 40 lines."""
    groups: list[dict] = []
    for r in rows:
        t = f"{r['base'] or 'absent'} -> {r['new'] or 'absent'}  ({r['kind']})"
        if groups and groups[-1]["transition"] == t:
            groups[-1]["rows"].append(r)
        else:
            groups.append({"transition": t, "rows": [r]})
    return groups


def render_markdown(diff: dict) -> str:
    return jinja_env(False).get_template("compare.md.j2").render(
        d=diff, list_in_full=LIST_IN_FULL, moved_in_full=MOVED_IN_FULL,
        by_requirement=by_requirement, requirement_groups=requirement_groups,
        rows_in_full=REQUIREMENT_ROWS_IN_FULL)


def render_json(diff: dict) -> str:
    return json.dumps(diff, indent=1) + "\n"


def write(diff: dict, markdown: str | None, json_path: str | None) -> None:
    if markdown:
        Path(markdown).write_text(render_markdown(diff), encoding="utf-8")
    if json_path:
        Path(json_path).write_text(render_json(diff), encoding="utf-8")

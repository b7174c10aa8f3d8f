"""KernelCI KCIDB v5 export of a run (`cvmconf export --kcidb RUN_DIR`), and a checker of the
schema facts cvmconf relies on (required fields, id and path patterns, status values; taken from
kcidb-io's schema v5.0, which has no Debian package).

Objects: one checkout (the kernel source, optional patch-series Message-ID / patchset hash), one
build (the kernel that ran), one test per GoogleTest test (path cvmconf.<suite>.<name parts>) and
one per requirement (path cvmconf.requirements.<ID>, status = the requirement's roll-up).
"""
from __future__ import annotations

import re

from cvmconf.results import KCIDB_STATUS, ORIGIN_RE, path_component
from cvmconf.rollup import NOT_RUN

VERSION = {"major": 5, "minor": 0}
STATUSES = ("FAIL", "ERROR", "MISS", "PASS", "DONE", "SKIP")
ID_RE = re.compile(r"^[a-z0-9_]+:.*$")
PATH_RE = re.compile(r"^([a-zA-Z0-9_-]+(\.[a-zA-Z0-9_-]+)*)?$")
ARCH_RE = re.compile(r"^[a-z0-9_]*$")
LOG_EXCERPT_MAX = 16384
REQUIRED = {"checkouts": ("id", "origin"), "builds": ("checkout_id", "id", "origin"),
            "tests": ("build_id", "id", "origin")}
ALLOWED = {
    "checkouts": {"id", "origin", "tree_name", "git_repository_url", "git_commit_hash",
                  "git_commit_name", "git_commit_tags", "git_commit_message",
                  "git_repository_branch", "git_repository_branch_tip", "patchset_files",
                  "patchset_hash", "message_id", "comment", "start_time", "log_url",
                  "log_excerpt", "valid", "misc"},
    "builds": {"checkout_id", "id", "origin", "comment", "start_time", "duration",
               "architecture", "command", "compiler", "input_files", "output_files",
               "config_name", "config_url", "log_url", "log_excerpt", "status", "misc"},
    "tests": {"build_id", "id", "origin", "environment", "path", "comment", "log_url",
              "log_excerpt", "status", "number", "waived", "start_time", "duration",
              "output_files", "misc"},
}


class KcidbError(ValueError):
    """Data that does not satisfy the KCIDB v5 facts checked here (one line)."""


def _excerpt(t: dict) -> str:
    parts = list(t.get("messages") or [])
    if t.get("skip_reason"):
        parts.append(t["skip_reason"])
    ev = t.get("evidence") or {}
    for k in ("exit", "output_tail"):
        if ev.get(k):
            parts.append(f"{k}: {ev[k]}")
    if t.get("kernel_log"):
        parts.append("kernel log:\n" + "\n".join(t["kernel_log"]))
    text = "\n".join(parts)
    if len(text) > LOG_EXCERPT_MAX:
        text = text[: LOG_EXCERPT_MAX - 6] + "\n[...]"
    return text


def _number(t: dict) -> dict | None:
    """A throughput measurement of a stress test, when it recorded one."""
    v = (t.get("properties") or {}).get("ops_per_sec")
    try:
        value = float(v)
    except (TypeError, ValueError):
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return {"value": value, "unit": "ops/s", "prefix": "metric"}


def _drop_none(d: dict) -> dict:
    """KCIDB forbids nulls: a missing value is an absent field."""
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        out[k] = _drop_none(v) if isinstance(v, dict) else v
    return out


def export(run: dict, origin: str | None = None) -> dict:
    origin = origin or run["checkout"]["origin"]
    if not ORIGIN_RE.match(origin):
        raise KcidbError(f"origin {origin!r} must match [a-z0-9_]+")

    def reorigin(obj_id: str) -> str:
        return f"{origin}:{obj_id.split(':', 1)[1]}" if ":" in obj_id else f"{origin}:{obj_id}"

    checkout = dict(run["checkout"], origin=origin, id=reorigin(run["checkout"]["id"]))
    build = dict(run["build"], origin=origin, id=reorigin(run["build"]["id"]),
                 checkout_id=checkout["id"])
    fp = run.get("fingerprint", {})
    environment = {
        "comment": f"{run.get('target', {}).get('kind', '?')} target, "
                   f"{fp.get('cpu_model') or fp.get('arch', '')}".strip(", "),
        "misc": {"platforms": fp.get("platforms", {}).get("labels", []),
                 "hostname": fp.get("hostname"),
                 "vm_types": fp.get("kvm", {}).get("vm_types_creatable", []),
                 "guest_memfd_flags": fp.get("guest_memfd_flags")},
    }
    run_local = path_component(run["run_id"])
    tests = []
    for i, t in enumerate(run["tests"], 1):
        obj = {
            "build_id": build["id"], "origin": origin, "id": f"{origin}:{run_local}.{i}",
            "path": t["path"], "status": t["status"],   # set by results.test_entry
            "comment": f"{t['binary']}: {t['name']}", "environment": environment,
            "duration": float(t.get("duration") or 0.0),
            "start_time": t.get("start_time") or None,
            "log_excerpt": _excerpt(t) or None,
            "number": _number(t),
            "misc": {"cvmconf_outcome": t["outcome"], "requirements": t.get("requirements", []),
                     "properties": t.get("properties", {}), "flaky": bool(t.get("flaky")),
                     "attempts": t.get("attempts") or None, "run_id": run["run_id"],
                     "batch": t.get("batch") or None},
        }
        tests.append(_drop_none(obj))
    for r in run["requirements"]:
        if r["outcome"] == NOT_RUN and not r.get("tests"):
            continue   # no test of it exists or was selected: nothing to report
        status = KCIDB_STATUS.get(r["outcome"], "MISS")
        tests.append(_drop_none({
            "build_id": build["id"], "origin": origin,
            "id": f"{origin}:{run_local}.req.{path_component(r['id'])}",
            "path": f"cvmconf.requirements.{path_component(r['id'])}", "status": status,
            "comment": f"{r['id']} ({r.get('level')}): {r.get('statement', '')}"[:1000],
            "environment": environment,
            "log_excerpt": r.get("reason") or None,
            "waived": r.get("level") == "INFO",
            "misc": {"cvmconf_outcome": r["outcome"], "exercised": r.get("exercised"),
                     "seeds": r.get("seeds", []), "tests": r.get("tests", []),
                     "run_id": run["run_id"]},
        }))
    data = {"version": dict(VERSION), "checkouts": [_drop_none(checkout)],
            "builds": [_drop_none(build)], "tests": tests}
    validate(data)
    return data


def validate(data) -> None:
    """Checks the KCIDB v5 facts: version, required fields, no nulls, no unknown fields, id,
    origin, path and architecture patterns, status values, links between objects."""
    if not isinstance(data, dict):
        raise KcidbError("top level must be an object")
    v = data.get("version")
    if not isinstance(v, dict) or v.get("major") != 5 or not isinstance(v.get("minor", 0), int):
        raise KcidbError("version must be {major: 5, minor: N}")
    unknown = set(data) - {"version", "checkouts", "builds", "tests", "issues", "incidents"}
    if unknown:
        raise KcidbError(f"unknown top-level field(s): {', '.join(sorted(unknown))}")
    ids: dict[str, set[str]] = {}
    for kind in ("checkouts", "builds", "tests"):
        objs = data.get(kind, [])
        if not isinstance(objs, list):
            raise KcidbError(f"'{kind}' must be a list")
        ids[kind] = set()
        for i, o in enumerate(objs):
            where = f"{kind}[{i}]"
            if not isinstance(o, dict):
                raise KcidbError(f"{where}: must be an object")
            for f in REQUIRED[kind]:
                if f not in o:
                    raise KcidbError(f"{where}: missing required field '{f}'")
            extra = set(o) - ALLOWED[kind]
            if extra:
                raise KcidbError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
            _no_nulls(o, where)
            if not isinstance(o["origin"], str) or not ORIGIN_RE.match(o["origin"]):
                raise KcidbError(f"{where}: origin must match [a-z0-9_]+")
            for f in ("id", "checkout_id", "build_id"):
                if f in o and (not isinstance(o[f], str) or not ID_RE.match(o[f])):
                    raise KcidbError(f"{where}: {f} must look like '<origin>:<local id>'")
            if not o["id"].startswith(o["origin"] + ":"):
                raise KcidbError(f"{where}: id does not start with its origin")
            if o["id"] in ids[kind]:
                raise KcidbError(f"{where}: duplicate id {o['id']}")
            ids[kind].add(o["id"])
            if "status" in o and o["status"] not in STATUSES:
                raise KcidbError(f"{where}: status {o['status']!r} not one of {', '.join(STATUSES)}")
            if "path" in o and (not isinstance(o["path"], str) or not PATH_RE.match(o["path"])):
                raise KcidbError(f"{where}: path {str(o['path'])[:80]!r} is not a dot-separated "
                                 f"path of [a-zA-Z0-9_-] components")
            if "architecture" in o and not ARCH_RE.match(str(o["architecture"])):
                raise KcidbError(f"{where}: architecture must match [a-z0-9_]*")
            if "log_excerpt" in o and (not isinstance(o["log_excerpt"], str)
                                       or len(o["log_excerpt"]) > LOG_EXCERPT_MAX):
                raise KcidbError(f"{where}: log_excerpt must be a string of at most "
                                 f"{LOG_EXCERPT_MAX} characters")
            if "duration" in o and (not isinstance(o["duration"], (int, float))
                                    or isinstance(o["duration"], bool)):
                raise KcidbError(f"{where}: duration must be a number")
            if "number" in o and (not isinstance(o["number"], dict) or "value" not in o["number"]):
                raise KcidbError(f"{where}: number needs a value")
    for i, b in enumerate(data.get("builds", [])):
        if ids["checkouts"] and b["checkout_id"] not in ids["checkouts"]:
            raise KcidbError(f"builds[{i}]: checkout_id names no checkout in this data")
    for i, t in enumerate(data.get("tests", [])):
        if ids["builds"] and t["build_id"] not in ids["builds"]:
            raise KcidbError(f"tests[{i}]: build_id names no build in this data")


def _no_nulls(o, where: str) -> None:
    if o is None:
        raise KcidbError(f"{where}: null value (KCIDB forbids nulls)")
    if isinstance(o, dict):
        for k, v in o.items():
            _no_nulls(v, f"{where}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            _no_nulls(v, f"{where}[{i}]")

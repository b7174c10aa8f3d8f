"""KernelCI KCIDB v5.3 export of a run (`cvmconf export --kcidb RUN_DIR`), validated against the
KCIDB I/O JSON schema shipped in results/schemas/ (kernelci/kcidb-io, draft 7) with Debian's
python3-jsonschema, plus a strict RFC 3339 `date-time` check (Debian's jsonschema has none) and
the links between objects the schema cannot express.

Objects: one checkout (the kernel source, optional patch-series Message-ID / patchset hash), one
build (the kernel that ran), one test per GoogleTest test (path cvmconf.<suite>.<name parts>) and
one per requirement (path cvmconf.requirements.<ID>, status = the requirement's roll-up). What the
schema has no field for goes into `misc` (cvmconf's outcome, requirement IDs and level, whether a
result counts towards conformance).
"""
from __future__ import annotations

import datetime
import functools
import json
import re
from pathlib import Path

from cvmconf.results import KCIDB_STATUS, ORIGIN_RE, path_component
from cvmconf.rollup import NOT_RUN
from cvmconf.text import escape_chars

SCHEMA = Path(__file__).resolve().parents[2] / "results" / "schemas" / "kcidb-v5.3.schema.json"
VERSION = {"major": 5, "minor": 3}
STATUSES = ("FAIL", "ERROR", "MISS", "PASS", "DONE", "SKIP")
LOG_EXCERPT_MAX = 16384
_NUL = re.compile("\x00")
RFC3339_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
                        r"([Zz]|[+-](\d{2}):(\d{2}))$")


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
    text = _nul_free("\n".join(parts))
    if len(text) > LOG_EXCERPT_MAX:
        text = text[: LOG_EXCERPT_MAX - 6] + "\n[...]"
    return text


def _nul_free(text: str) -> str:
    """KCIDB text fields may hold anything but NUL: written as \\x00."""
    return escape_chars(text, _NUL)


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
            "comment": _nul_free(f"{t['binary']}: {t['name']}"), "environment": environment,
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
            "comment": _nul_free(f"{r['id']} ({r.get('level')}): {r.get('statement', '')}")[:1000],
            "environment": environment,
            "log_excerpt": _nul_free(r.get("reason") or "")[:LOG_EXCERPT_MAX] or None,
            "misc": {"cvmconf_outcome": r["outcome"], "level": r.get("level"),
                     "counts_towards_conformance": r.get("level") in ("MUST", "SHOULD"),
                     "exercised": r.get("exercised"),
                     "seeds": r.get("seeds", []), "tests": r.get("tests", []),
                     "run_id": run["run_id"]},
        }))
    data = {"version": dict(VERSION), "checkouts": [_drop_none(checkout)],
            "builds": [_drop_none(build)], "tests": tests}
    validate(data)
    return data


def is_rfc3339(value) -> bool:
    """RFC 3339 date-time (section 5.6): full date, 'T', full time with seconds, optional
    fraction, and a mandatory offset ('Z' or +hh:mm); the fields must name a real instant."""
    if not isinstance(value, str):
        return True            # a format applies to strings only; 'type' checks the rest
    m = RFC3339_RE.match(value)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if m.group(9) is not None and (int(m.group(9)) > 23 or int(m.group(10)) > 59):
        return False
    try:
        # A leap second (:60) is valid RFC 3339; datetime cannot hold it, so check :59.
        datetime.datetime(year, month, day, hour, minute, 59 if second == 60 else second)
    except ValueError:
        return False
    return second <= 60


@functools.lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema
    except ImportError:
        raise KcidbError("python3-jsonschema is not installed (./cvmconf export installs it)") \
            from None
    try:
        schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KcidbError(f"cannot read the KCIDB schema {SCHEMA}: {e}") from None
    checker = jsonschema.FormatChecker(formats=())
    checker.checks("date-time")(is_rfc3339)
    return jsonschema.Draft7Validator(schema, format_checker=checker)


def schema_errors(data) -> list[str]:
    """Every violation of the KCIDB v5.3 schema, one line each: 'tests/3: <message>'."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.path)))
    return [f"{'/'.join(map(str, e.path)) or '(top level)'}: {e.message}" for e in errors]


def validate(data) -> None:
    """Checks data against the KCIDB v5.3 schema, then what the schema cannot say: ids unique
    per object type, and every build/test linked to a checkout/build of this data."""
    errors = schema_errors(data)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise KcidbError(errors[0][:300] + more)
    for kind in ("checkouts", "builds", "tests"):
        seen: set[str] = set()
        for i, o in enumerate(data.get(kind, [])):
            if o["id"] in seen:
                raise KcidbError(f"{kind}/{i}: duplicate id {o['id']}")
            seen.add(o["id"])
            if not o["id"].startswith(o["origin"] + ":"):
                raise KcidbError(f"{kind}/{i}: id does not start with its origin")
    checkouts = {c["id"] for c in data.get("checkouts", [])}
    builds = {b["id"] for b in data.get("builds", [])}
    for i, b in enumerate(data.get("builds", [])):
        if checkouts and b["checkout_id"] not in checkouts:
            raise KcidbError(f"builds/{i}: checkout_id names no checkout in this data")
    for i, t in enumerate(data.get("tests", [])):
        if builds and t["build_id"] not in builds:
            raise KcidbError(f"tests/{i}: build_id names no build in this data")

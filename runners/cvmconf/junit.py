"""junit.xml from run.json, written with xml.etree.ElementTree: one <testsuite> per suite binary,
one <testcase> per test, requirement IDs as <property name="requirement"> (one per ID)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from cvmconf import gtest
from cvmconf.text import escape_chars

# Characters XML 1.0 cannot carry at all (ElementTree would write them and produce a file no
# parser accepts): C0 controls other than tab/newline/CR, surrogates, U+FFFE/U+FFFF.
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(s: str) -> str:
    return escape_chars(s, _INVALID_XML)


def _el(parent, tag: str, text: str | None = None, **attrs) -> ET.Element:
    e = ET.SubElement(parent, tag, {k: xml_text(str(v)) for k, v in attrs.items()})
    if text:
        e.text = xml_text(text)
    return e


def _first_line(msgs: list[str]) -> str:
    for m in msgs:
        for line in m.splitlines():
            if line.strip():
                return line.strip()[:200]
    return ""


def build(run: dict) -> ET.ElementTree:
    tests = run["tests"]
    binaries: dict[str, list[dict]] = {}
    for t in tests:
        binaries.setdefault(t["binary"], []).append(t)
    fp = run.get("fingerprint", {})

    def counts(ts):
        return {"tests": len(ts),
                "failures": sum(1 for t in ts if t["outcome"] == gtest.FAIL),
                "errors": sum(1 for t in ts if t["outcome"] in gtest.BROKEN),
                "skipped": sum(1 for t in ts if t["outcome"] != gtest.PASS and
                               t["outcome"] not in gtest.BAD),
                "time": f"{sum(float(t.get('duration') or 0) for t in ts):.3f}"}

    root = ET.Element("testsuites", {"name": f"cvmconf {run['run_id']}",
                                     **{k: str(v) for k, v in counts(tests).items()}})
    for binary, ts in binaries.items():
        suite = _el(root, "testsuite", name=binary, timestamp=run.get("started", ""),
                    hostname=fp.get("hostname", "") or "", **counts(ts))
        props = _el(suite, "properties")
        _el(props, "property", name="kernel_release", value=fp.get("kernel", {}).get("release", ""))
        _el(props, "property", name="arch", value=fp.get("arch", ""))
        _el(props, "property", name="platforms",
            value=" ".join(fp.get("platforms", {}).get("labels", [])))
        _el(props, "property", name="run_complete", value=str(run.get("complete")).lower())
        for t in ts:
            classname, _, name = t["name"].rpartition(".")
            case = _el(suite, "testcase", classname=classname or binary, name=name or t["name"],
                       time=f"{float(t.get('duration') or 0):.3f}")
            cprops = _el(case, "properties")
            for rid in t.get("requirements", []):
                _el(cprops, "property", name="requirement", value=rid)
            _el(cprops, "property", name="outcome", value=t["outcome"])
            _el(cprops, "property", name="kcidb_path", value=t["path"])
            if t.get("flaky"):
                _el(cprops, "property", name="flaky", value="true")
            for k, v in sorted((t.get("properties") or {}).items()):
                _el(cprops, "property", name=k, value=v)
            msgs = t.get("messages", [])
            evidence = t.get("evidence") or {}
            if t["outcome"] == gtest.FAIL:
                _el(case, "failure", "\n\n".join(msgs), message=_first_line(msgs), type="FAIL")
            elif t["outcome"] in gtest.BROKEN:
                body = "\n\n".join(msgs + [f"{k}: {v}" for k, v in evidence.items()])
                _el(case, "error", body, message=_first_line(msgs), type=t["outcome"])
            elif t["outcome"] == gtest.SKIP:
                _el(case, "skipped", message=t.get("skip_reason", ""))
            elif t["outcome"] != gtest.PASS:
                _el(case, "skipped", message=_first_line(msgs) or t["outcome"])
            if t.get("kernel_log"):
                _el(case, "system-out", "kernel log:\n" + "\n".join(t["kernel_log"]))
            if evidence.get("output_tail"):
                _el(case, "system-err", evidence["output_tail"])
    ET.indent(root)
    return ET.ElementTree(root)


def write(run: dict, path) -> None:
    build(run).write(path, encoding="utf-8", xml_declaration=True)

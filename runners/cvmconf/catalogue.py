"""The requirement catalogue (suites/requirements.yaml): loading, validation, and the cross-check
with the requirement IDs the suite binaries declare (--cvm_list_requirements)."""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re

import yaml

from cvmconf.errors import UsageError

LEVELS = ("MUST", "SHOULD", "INFO")
ID_RE = re.compile(r"^[A-Z]+-[0-9]{3}$")
KNOWN_KEYS = {"id", "family", "level", "statement", "seeds", "refs", "platforms", "needs",
              "tests", "untested_reason"}
REQUIRED_KEYS = {"id", "family", "level", "statement", "seeds", "platforms", "needs", "tests"}


@dataclasses.dataclass(frozen=True)
class Requirement:
    id: str
    family: str
    level: str
    statement: str
    seeds: tuple[str, ...]
    refs: tuple[str, ...]
    platforms: tuple[str, ...]
    needs: tuple[str, ...]
    tests: tuple[str, ...]
    untested_reason: str | None

    def matches(self, test_name: str) -> bool:
        return any(fnmatch.fnmatchcase(test_name, pat) for pat in self.tests)


@dataclasses.dataclass
class Catalogue:
    path: str
    requirements: list[Requirement]
    families: dict[str, dict]
    platforms: dict[str, str]
    capabilities: dict[str, str]
    seed_titles: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> thread title

    def by_id(self) -> dict[str, Requirement]:
        return {r.id: r for r in self.requirements}


def default_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "suites", "requirements.yaml"))


def load(path: str | None = None, seeds_dir: str | None = None) -> Catalogue:
    """Loads and validates the catalogue. Raises UsageError with one line on any problem."""
    path = path or default_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"requirement catalogue not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"requirement catalogue {path}{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise UsageError(f"requirement catalogue {path}: top level must be a mapping")
    for key in ("platforms", "capabilities", "families", "requirements"):
        if key not in data:
            raise UsageError(f"requirement catalogue {path}: missing '{key}'")
    platforms = data["platforms"]
    capabilities = data["capabilities"]
    families = data["families"]
    if not all(isinstance(x, dict) for x in (platforms, capabilities, families)):
        raise UsageError(f"requirement catalogue {path}: platforms/capabilities/families must be mappings")
    if not isinstance(data["requirements"], list):
        raise UsageError(f"requirement catalogue {path}: 'requirements' must be a list")
    seed_titles = data.get("seeds", {})
    if not isinstance(seed_titles, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in seed_titles.items()):
        raise UsageError(f"requirement catalogue {path}: 'seeds' must map seed files to titles")
    reqs: list[Requirement] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["requirements"]):
        where = f"requirement catalogue {path}, entry {i + 1}"
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: must be a mapping")
        rid = raw.get("id", "?")
        where = f"requirement catalogue {path}, {rid}"
        unknown = set(raw) - KNOWN_KEYS
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        missing = REQUIRED_KEYS - set(raw)
        if missing:
            raise UsageError(f"{where}: missing key(s) {', '.join(sorted(missing))}")
        if not isinstance(rid, str) or not ID_RE.match(rid):
            raise UsageError(f"{where}: id must look like FAMILY-NNN")
        if rid in seen:
            raise UsageError(f"{where}: duplicate id")
        seen.add(rid)
        if raw["family"] not in families:
            raise UsageError(f"{where}: unknown family '{raw['family']}'")
        if raw["level"] not in LEVELS:
            raise UsageError(f"{where}: level must be one of {', '.join(LEVELS)}")
        if not isinstance(raw["statement"], str) or not raw["statement"].strip():
            raise UsageError(f"{where}: statement must be a non-empty string")
        for key in ("seeds", "refs", "platforms", "needs", "tests"):
            val = raw.get(key, [])
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise UsageError(f"{where}: '{key}' must be a list of strings")
        if not raw["seeds"]:
            raise UsageError(f"{where}: cites no seed thread")
        for sd in raw["seeds"]:
            if seed_titles and sd not in seed_titles:
                raise UsageError(f"{where}: seed {sd} is not listed under 'seeds'")
        for p in raw["platforms"]:
            if p not in platforms:
                raise UsageError(f"{where}: unknown platform '{p}'")
        for n in raw["needs"]:
            if n not in capabilities:
                raise UsageError(f"{where}: unknown capability '{n}'")
        reason = raw.get("untested_reason")
        if reason is not None and (not isinstance(reason, str) or not reason.strip()):
            raise UsageError(f"{where}: untested_reason must be a non-empty string")
        if raw["level"] in ("MUST", "SHOULD") and not raw["tests"] and not reason:
            raise UsageError(f"{where}: a {raw['level']} requirement needs tests or an untested_reason")
        if raw["tests"] and reason:
            raise UsageError(f"{where}: has tests and an untested_reason; keep one")
        if seeds_dir:
            for s in raw["seeds"]:
                if not os.path.exists(os.path.join(seeds_dir, s)):
                    raise UsageError(f"{where}: seed file {s} not found in {seeds_dir}")
        reqs.append(Requirement(
            id=rid, family=raw["family"], level=raw["level"], statement=raw["statement"].strip(),
            seeds=tuple(raw["seeds"]), refs=tuple(raw.get("refs", [])),
            platforms=tuple(raw["platforms"]), needs=tuple(raw["needs"]),
            tests=tuple(raw["tests"]), untested_reason=reason))
    return Catalogue(path=path, requirements=reqs, families=families, platforms=platforms,
                     capabilities=capabilities, seed_titles=dict(seed_titles))


def cross_check(cat: Catalogue, declared: dict[str, list[str]]) -> list[str]:
    """Compares the catalogue with what the tests declare.

    declared maps each GoogleTest full name of the conformance suites to the requirement IDs its
    CVM_TEST* macro names. Returns a list of problems (empty when both sides agree):
      - a test names no requirement, or an ID the catalogue does not have;
      - a test names an ID whose catalogue entry does not list it (no pattern matches);
      - a catalogue pattern matches no test that names that ID.
    """
    problems: list[str] = []
    by_id = cat.by_id()
    for test, ids in sorted(declared.items()):
        if not ids:
            problems.append(f"{test}: names no requirement (use CVM_TEST*(…, \"ID\"))")
        for rid in ids:
            req = by_id.get(rid)
            if req is None:
                problems.append(f"{test}: names unknown requirement {rid}")
            elif not req.matches(test):
                problems.append(f"{test}: names {rid}, but {rid}'s 'tests' in the catalogue do not match it")
    for req in cat.requirements:
        for pat in req.tests:
            hits = [t for t, ids in declared.items() if fnmatch.fnmatchcase(t, pat) and req.id in ids]
            if not hits:
                problems.append(f"{req.id}: test pattern '{pat}' matches no test that names {req.id}")
    return problems

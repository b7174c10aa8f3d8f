"""The requirement catalogue (suites/requirements.yaml): loading, validation, and the cross-check
with the requirement IDs the suite binaries declare (--cvm_list_requirements)."""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os

import yaml

from cvmconf.errors import UsageError

LEVELS = ("MUST", "SHOULD", "INFO")   # the schema's enum, in this order


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


def schema_path() -> str:
    return os.path.join(os.path.dirname(default_path()), "requirements.schema.json")


@functools.lru_cache(maxsize=1)
def _validator():
    try:
        import jsonschema
    except ImportError:
        raise UsageError("python3-jsonschema is not installed (./cvmconf installs it)") from None
    try:
        with open(schema_path(), encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the catalogue schema {schema_path()}: {e}") from None
    return jsonschema.Draft7Validator(schema)


def _message(root: dict, error) -> str:
    """One line for a schema violation: the failing schema's errorMessage (a string, or one per
    keyword), else the missing or unexpected keys, else the nearest enclosing errorMessage."""
    own = error.schema.get("errorMessage") if isinstance(error.schema, dict) else None
    if isinstance(own, dict):
        own = own.get(error.validator)
    if own:
        return own
    if error.validator == "required":
        missing = sorted(set(error.validator_value) - set(error.instance))
        return f"missing key(s) {', '.join(missing)}"
    if error.validator == "additionalProperties":
        unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"unknown key(s) {', '.join(unknown)}"
    enclosing, node = None, root
    for key in list(error.absolute_schema_path)[:-1]:
        node = node[key]
        if isinstance(node, dict) and isinstance(node.get("errorMessage"), str):
            enclosing = node["errorMessage"]
    return enclosing or error.message[:200]


def _shape_error(data, path: str) -> str | None:
    """The first violation of suites/requirements.schema.json, as one line naming the file and
    the entry (its id, or its position when it has none), or None."""
    v = _validator()
    errors = sorted(v.iter_errors(data), key=lambda e: [
        (0, x, "") if isinstance(x, int) else (1, 0, str(x)) for x in e.absolute_path])
    if not errors:
        return None
    e = errors[0]
    where = f"requirement catalogue {path}"
    p = list(e.absolute_path)
    if len(p) >= 2 and p[0] == "requirements":
        raw = data["requirements"][p[1]]
        rid = raw.get("id") if isinstance(raw, dict) else None
        where += f", {rid}" if isinstance(rid, str) else f", entry {p[1] + 1}"
    return f"{where}: {_message(v.schema, e)}"


def load(path: str | None = None, seeds_dir: str | None = None) -> Catalogue:
    """Loads and validates the catalogue. Raises UsageError with one line on any problem: its
    shape against suites/requirements.schema.json, then what the entries refer to."""
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
    problem = _shape_error(data, path)
    if problem:
        raise UsageError(problem)
    platforms, capabilities = data["platforms"], data["capabilities"]
    families, seed_titles = data["families"], data.get("seeds", {})
    reqs: list[Requirement] = []
    seen: set[str] = set()
    for raw in data["requirements"]:
        rid = raw["id"]
        where = f"requirement catalogue {path}, {rid}"
        if rid in seen:
            raise UsageError(f"{where}: duplicate id")
        seen.add(rid)
        if raw["family"] not in families:
            raise UsageError(f"{where}: unknown family '{raw['family']}'")
        for sd in raw["seeds"]:
            if seed_titles and sd not in seed_titles:
                raise UsageError(f"{where}: seed {sd} is not listed under 'seeds'")
            if seeds_dir and not os.path.exists(os.path.join(seeds_dir, sd)):
                raise UsageError(f"{where}: seed file {sd} not found in {seeds_dir}")
        for p in raw["platforms"]:
            if p not in platforms:
                raise UsageError(f"{where}: unknown platform '{p}'")
        for n in raw["needs"]:
            if n not in capabilities:
                raise UsageError(f"{where}: unknown capability '{n}'")
        reqs.append(Requirement(
            id=rid, family=raw["family"], level=raw["level"], statement=raw["statement"].strip(),
            seeds=tuple(raw["seeds"]), refs=tuple(raw.get("refs", [])),
            platforms=tuple(raw["platforms"]), needs=tuple(raw["needs"]),
            tests=tuple(raw["tests"]), untested_reason=raw.get("untested_reason")))
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

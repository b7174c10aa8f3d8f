"""The requirement catalogue: the real one loads and agrees with the suites; malformed ones are
rejected with one clear line."""
import textwrap

import pytest

from cvmconf import catalogue, gtest
from cvmconf.errors import UsageError

HEADER = textwrap.dedent("""\
    version: 1
    platforms: {x86-default: d, host: h}
    capabilities: {kvm: k}
    families: {gmem-mmap: {title: t, suite: s}}
    requirements:
    """)

GOOD = textwrap.dedent("""\
      - id: MMAP-001
        family: gmem-mmap
        level: MUST
        statement: something holds
        seeds: [000_x.txt]
        platforms: [x86-default]
        needs: [kvm]
        tests: ["*Suite.Test*"]
    """)


def write(tmp_path, text):
    p = tmp_path / "req.yaml"
    p.write_text(text)
    return str(p)


def test_real_catalogue_loads():
    cat = catalogue.load()
    ids = [r.id for r in cat.requirements]
    assert len(ids) == len(set(ids))
    assert {r.family for r in cat.requirements} == set(cat.families)
    assert all(r.seeds for r in cat.requirements)


def test_real_catalogue_agrees_with_suites(build_dir):
    cat = catalogue.load()
    declared = {}
    for b in gtest.suite_binaries(build_dir):
        declared.update(gtest.list_suite(b).requirements)
    assert declared, "no tests declared by the suites"
    assert catalogue.cross_check(cat, declared) == []


def test_minimal_catalogue_loads(tmp_path):
    cat = catalogue.load(write(tmp_path, HEADER + GOOD))
    assert cat.requirements[0].matches("P/Suite.Test/x")


@pytest.mark.parametrize("mutation, message", [
    (("level: MUST", "level: MAYBE"), "level must be one of"),
    (("family: gmem-mmap", "family: nope"), "unknown family"),
    (("seeds: [000_x.txt]", "seeds: []"), "cites no seed"),
    (("platforms: [x86-default]", "platforms: [mars]"), "unknown platform"),
    (("needs: [kvm]", "needs: [warp]"), "unknown capability"),
    (('tests: ["*Suite.Test*"]', "tests: []"), "needs tests or an untested_reason"),
    (("id: MMAP-001", "id: mmap1"), "FAMILY-NNN"),
    (("statement: something holds", "statement: something holds\n  colour: blue"),
     r"MMAP-001: unknown key\(s\) colour$"),
    (("  level: MUST\n", ""), r"MMAP-001: missing key\(s\) level$"),
    (("statement: something holds", "statement: '  '"), "statement must be a non-empty string"),
    (("needs: [kvm]", "needs: kvm"), "'needs' must be a list of strings"),
    (("needs: [kvm]", "needs: [kvm]\n  refs: [1]"), "'refs' must be a list of strings"),
    (("needs: [kvm]", "needs: [kvm]\n  untested_reason: x"), "has tests and an untested_reason"),
    (("- id: MMAP-001", "- id: 7"), r"entry 1: id must look like FAMILY-NNN$"),
])
def test_malformed_entries_are_rejected(tmp_path, mutation, message):
    old, new = mutation
    with pytest.raises(UsageError, match=message):
        catalogue.load(write(tmp_path, HEADER + GOOD.replace(old, new)))


@pytest.mark.parametrize("text, message", [
    ("[1, 2]\n", r"req.yaml: top level must be a mapping$"),
    (HEADER.replace("capabilities: {kvm: k}\n", ""), r"req.yaml: missing key\(s\) capabilities$"),
    (HEADER.replace("{kvm: k}", "[kvm]"), "platforms/capabilities/families must be mappings$"),
    (HEADER + "  - just a string\n", r"req.yaml, entry 1: must be a mapping$"),
    (HEADER.replace("requirements:\n", "requirements: {}\n"), "'requirements' must be a list$"),
])
def test_malformed_catalogues_are_one_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=message) as e:
        catalogue.load(write(tmp_path, text))
    assert "\n" not in str(e.value) and str(e.value).startswith("requirement catalogue ")


def test_schema_is_a_valid_draft7_schema():
    import json
    import jsonschema
    with open(catalogue.schema_path(), encoding="utf-8") as f:
        jsonschema.Draft7Validator.check_schema(json.load(f))


def test_duplicate_ids_rejected(tmp_path):
    with pytest.raises(UsageError, match="duplicate id"):
        catalogue.load(write(tmp_path, HEADER + GOOD + GOOD))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not valid YAML"):
        catalogue.load(write(tmp_path, "a: [unclosed"))
    with pytest.raises(UsageError, match="not found"):
        catalogue.load(str(tmp_path / "absent.yaml"))


def test_cross_check_reports_each_kind_of_disagreement(tmp_path):
    cat = catalogue.load(write(tmp_path, HEADER + GOOD))
    assert catalogue.cross_check(cat, {"P/Suite.Test/x": ["MMAP-001"]}) == []
    problems = catalogue.cross_check(cat, {
        "P/Suite.Test/x": ["MMAP-001", "MMAP-999"],   # unknown ID
        "P/Other.Test/x": ["MMAP-001"],               # not listed under MMAP-001
        "P/Bare.Test/x": [],                          # names nothing
    })
    text = "\n".join(problems)
    assert "unknown requirement MMAP-999" in text
    assert "P/Other.Test/x: names MMAP-001" in text
    assert "P/Bare.Test/x: names no requirement" in text
    problems = catalogue.cross_check(cat, {"P/Else.Test/x": ["MMAP-001"]})
    assert any("matches no test" in p for p in problems)


def test_seed_titles_must_cover_every_cited_seed(tmp_path):
    titled = HEADER.replace("requirements:\n", "seeds: {000_x.txt: a thread}\nrequirements:\n")
    cat = catalogue.load(write(tmp_path, titled + GOOD))
    assert cat.seed_titles == {"000_x.txt": "a thread"}
    other = HEADER.replace("requirements:\n", "seeds: {001_y.txt: other}\nrequirements:\n")
    with pytest.raises(UsageError, match="not listed under 'seeds'"):
        catalogue.load(write(tmp_path, other + GOOD))
    with pytest.raises(UsageError, match="must map seed files to titles"):
        catalogue.load(write(tmp_path, HEADER.replace("requirements:\n", "seeds: [a]\nrequirements:\n") + GOOD))


def test_real_catalogue_titles_every_seed():
    cat = catalogue.load()
    assert {s for r in cat.requirements for s in r.seeds} <= set(cat.seed_titles)

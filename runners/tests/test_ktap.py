"""Our KTAP v1 parser against the rules of Documentation/dev-tools/ktap.rst, and property-based
tests: emitted documents parse back to what was emitted; mutated or arbitrary input gives a
KtapError (one line) or a document, never another exception and never a silent pass."""
import re
import textwrap

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cvmconf import ktap
from cvmconf.ktap import KtapError, Node


def parse(text):
    return ktap.parse(textwrap.dedent(text))


# ---------------------------------------------------------------------------------------------
# The rules, one by one

def test_minimal_document():
    doc = parse("""\
        KTAP version 1
        1..2
        ok 1 first
        not ok 2 second
        """)
    assert doc.plan == 2
    assert [(t.number, t.description, t.status) for t in doc.tests] == \
        [(1, "first", "PASS"), (2, "second", "FAIL")]


def test_tap_version_lines_are_accepted():
    for v in ("TAP version 13", "TAP version 14"):
        assert ktap.parse(f"{v}\n1..1\nok 1 x\n").version == v


def test_missing_version_line_is_an_error():
    with pytest.raises(KtapError, match="no KTAP version line"):
        ktap.parse("just text\nmore text\n")
    with pytest.raises(KtapError, match="result or plan before the version line"):
        ktap.parse("ok 1 x\nKTAP version 1\n1..1\nok 1 x\n")


def test_unknown_lines_are_allowed_and_ignored():
    doc = parse("""\
        [    1.234] booting
        KTAP version 1
        1..1
        [    2.000] kernel: some log line
        random noise
        ok 1 only
        """)
    assert [t.status for t in doc.tests] == ["PASS"]
    assert doc.unknown_lines == 3


def test_plan_count_must_match():
    with pytest.raises(KtapError, match="plan 1..3 but 2 result"):
        parse("""\
            KTAP version 1
            1..3
            ok 1 a
            ok 2 b
            """)


def test_plan_is_optional_then_uncounted():
    doc = parse("""\
        KTAP version 1
        ok 1 a
        """)
    assert doc.plan is None and len(doc.tests) == 1


def test_plan_after_results_or_twice_is_an_error():
    with pytest.raises(KtapError, match="plan after result"):
        parse("KTAP version 1\nok 1 a\n1..1\n")
    with pytest.raises(KtapError, match="second plan"):
        parse("KTAP version 1\n1..1\n1..1\nok 1 a\n")


def test_numbers_start_at_one_and_increase_by_one():
    with pytest.raises(KtapError, match="test number 2, expected 1"):
        parse("KTAP version 1\n1..1\nok 2 a\n")
    with pytest.raises(KtapError, match="test number 3, expected 2"):
        parse("KTAP version 1\n1..2\nok 1 a\nok 3 b\n")


@pytest.mark.parametrize("line, status, diag", [
    ("ok 1 t # SKIP no hardware", "SKIP", "no hardware"),
    ("not ok 1 t # SKIP not applicable", "SKIP", "not applicable"),
    ("not ok 1 t # TODO later", "TODO", "later"),
    ("ok 1 t # XFAIL known bug", "XFAIL", "known bug"),
    ("not ok 1 t # TIMEOUT 30 seconds", "TIMEOUT", "30 seconds"),
    ("not ok 1 t # ERROR crashed", "ERROR", "crashed"),
    ("ok 1 t # skip lower case", "SKIP", "lower case"),
    ("not ok 1 t # WHATEVER text", "FAIL", "WHATEVER text"),   # unknown: result stands
    ("ok 1 - t", "PASS", ""),
    ("ok 1", "PASS", ""),
])
def test_directives(line, status, diag):
    t = ktap.parse(f"KTAP version 1\n1..1\n{line}\n").tests[0]
    assert t.status == status
    assert t.diagnostic == diag


@pytest.mark.parametrize("directive", ["TIMEOUT", "ERROR"])
def test_timeout_and_error_must_be_not_ok(directive):
    with pytest.raises(KtapError, match=f"{directive} on an 'ok' result"):
        ktap.parse(f"KTAP version 1\n1..1\nok 1 t # {directive} x\n")


def test_malformed_result_line_is_an_error():
    with pytest.raises(KtapError, match="malformed result line"):
        ktap.parse("KTAP version 1\n1..1\nok one\n")
    with pytest.raises(KtapError, match="malformed result line"):
        ktap.parse("KTAP version 1\n1..1\nnot ok\n")


def test_diagnostic_lines_attach_to_the_next_result():
    doc = parse("""\
        KTAP version 1
        1..1
        # first diagnostic
        # second
        not ok 1 t
        """)
    assert doc.tests[0].diagnostics == ["first diagnostic", "second"]


def test_nested_subtests_with_their_own_version_and_plan():
    doc = parse("""\
        KTAP version 1
        1..2
          KTAP version 1
          1..2
          ok 1 a
          ok 2 b # SKIP nope
        ok 1 parent
          KTAP version 1
          1..1
          not ok 1 c
        not ok 2 other
        """)
    assert [t.status for t in doc.tests] == ["PASS", "FAIL"]
    assert [s.status for s in doc.tests[0].subtests] == ["PASS", "SKIP"]
    assert [s.status for s in doc.tests[1].subtests] == ["FAIL"]


def test_three_levels():
    nodes = [Node("top", False, subtests=[
        Node("mid", False, subtests=[Node("leaf", False), Node("leaf2", True)])])]
    doc = ktap.parse(ktap.dumps(nodes))
    assert doc.tests[0].subtests[0].subtests[0].status == "FAIL"


def test_subtest_numbering_is_per_level():
    with pytest.raises(KtapError, match="test number 2, expected 1"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              1..1
              ok 2 a
            ok 1 parent
            """)


def test_subtest_plan_is_checked():
    with pytest.raises(KtapError, match="plan 1..2 but 1"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              1..2
              ok 1 a
            ok 1 parent
            """)


def test_subtest_block_needs_its_parent_result_line():
    with pytest.raises(KtapError, match="subtest block has no result line"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              1..1
              ok 1 a
            """)


def test_parent_ok_with_a_failed_subtest_is_inconsistent():
    with pytest.raises(KtapError, match="reports ok but its subtest 1 failed"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              1..1
              not ok 1 a
            ok 1 parent
            """)


def test_skipped_subtests_do_not_fail_the_parent():
    doc = parse("""\
        KTAP version 1
        1..1
          KTAP version 1
          1..1
          not ok 1 a # SKIP n/a
        ok 1 parent
        """)
    assert doc.tests[0].ok


def test_indented_results_outside_a_block_are_an_error():
    """A nested result without its own version line would otherwise be silently ignored."""
    with pytest.raises(KtapError, match="deeper than its block"):
        parse("""\
            KTAP version 1
            1..1
              not ok 1 hidden failure
            ok 1 parent
            """)


def test_version_line_in_the_middle_is_an_error():
    with pytest.raises(KtapError, match="version line in the middle"):
        parse("KTAP version 1\n1..1\nKTAP version 1\nok 1 a\n")


def test_emitter_cleans_descriptions_and_diagnostics():
    text = ktap.dumps([Node("a # b\nc", False, "ERROR", "multi\nline diag", "line1\nline2")])
    assert "a _ b_c" in text
    doc = ktap.parse(text)
    t = doc.tests[0]
    assert t.directive == "ERROR" and t.diagnostic == "multi line diag"
    assert t.diagnostics == ["line1", "line2"]


# ---------------------------------------------------------------------------------------------
# Property-based

DIRECTIVES = st.sampled_from([None, "SKIP", "TODO", "XFAIL", "TIMEOUT", "ERROR"])
WORDS = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")),
                max_size=30)


@st.composite
def nodes(draw, depth=0):
    n = draw(st.integers(min_value=0, max_value=4))
    out = []
    for _ in range(n):
        directive = draw(DIRECTIVES)
        ok = draw(st.booleans())
        if directive in ("TIMEOUT", "ERROR"):
            ok = False
        subs = draw(nodes(depth + 1)) if depth < 2 and draw(st.booleans()) else []
        if any(not s.ok and s.directive not in ("SKIP", "TODO", "XFAIL") for s in subs) \
                and directive is None:
            ok = False
        out.append(Node(draw(WORDS), ok, directive, draw(WORDS) if directive else "",
                        draw(WORDS), subs))
    return out


def _shape(n: Node):
    return (n.ok, n.directive, [_shape(s) for s in n.subtests])


def _parsed_shape(t: ktap.KtapTest):
    return (t.ok, t.directive, [_parsed_shape(s) for s in t.subtests])


@pytest.mark.parametrize("desc", ["- x", "-", "  padded  ", "", "a#b"])
def test_awkward_descriptions_round_trip(desc):
    doc = ktap.parse(ktap.dumps([Node(desc, True)]))
    assert doc.tests[0].description == ktap.clean_description(desc)


@given(nodes())
def test_emitted_documents_parse_back(doc_nodes):
    text = ktap.dumps(doc_nodes)
    doc = ktap.parse(text)
    assert doc.plan == len(doc_nodes)
    assert [_parsed_shape(t) for t in doc.tests] == [_shape(n) for n in doc_nodes]
    for t, n in zip(doc.tests, doc_nodes):
        assert t.description == ktap.clean_description(n.description)


@given(nodes(), st.data())
def test_dropping_a_result_line_is_never_a_silent_pass(doc_nodes, data):
    text = ktap.dumps(doc_nodes)
    lines = text.splitlines()
    results = [i for i, l in enumerate(lines) if l.lstrip().startswith(("ok ", "not ok "))]
    assume(results)
    i = data.draw(st.sampled_from(results))
    mutated = "\n".join(lines[:i] + lines[i + 1:]) + "\n"
    with pytest.raises(KtapError):
        ktap.parse(mutated)


@given(st.text(max_size=400))
def test_arbitrary_text_gives_a_document_or_a_clear_error(text):
    try:
        ktap.parse(text)
    except KtapError as e:
        assert "\n" not in str(e)


@given(nodes(), st.data())
def test_mutated_documents_give_a_document_or_a_clear_error(doc_nodes, data):
    lines = ktap.dumps(doc_nodes).splitlines()
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["del", "dup", "indent", "dedent", "junk"]),
                                       st.integers(min_value=0, max_value=max(0, len(lines) - 1))),
                             max_size=3))
    for op, i in ops:
        if not lines:
            break
        i %= len(lines)
        if op == "del":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i][2:] if lines[i].startswith("  ") else lines[i]
        else:
            lines.insert(i, data.draw(WORDS))
    try:
        doc = ktap.parse("\n".join(lines) + "\n")
    except KtapError as e:
        assert "\n" not in str(e)
    else:
        assert doc.version


# ---------------------------------------------------------------------------------------------
# '# Subtest:' headers and block diagnostics

def test_subtest_header_names_the_block_and_must_match_the_result_line():
    doc = parse("""\
        KTAP version 1
        # run header
        1..1
          KTAP version 1
          # Subtest: suite
          # about the suite
          1..1
          ok 1 t
        ok 1 suite
        """)
    assert doc.diagnostics == ["run header"]
    (suite,) = doc.tests
    assert suite.subtest_name == "suite" and suite.header_diagnostics == ["about the suite"]
    assert suite.subtests[0].diagnostics == []
    with pytest.raises(KtapError, match="result line names 'other', its subtest header names"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              # Subtest: suite
              1..1
              ok 1 t
            ok 1 other
            """)
    with pytest.raises(KtapError, match="'# Subtest:' header after the start of its block"):
        parse("""\
            KTAP version 1
            1..1
              KTAP version 1
              1..1
              # Subtest: suite
              ok 1 t
            ok 1 suite
            """)


def test_emitter_writes_subtest_headers_and_skipped_parents():
    text = ktap.dumps([Node("suite", True, "SKIP", "all skipped",
                            subtests=[Node("t", True, "SKIP", "why")])], header="hello")
    assert text.splitlines() == ["KTAP version 1", "# hello", "1..1", "  KTAP version 1",
                                 "  # Subtest: suite", "  1..1", "  ok 1 t # SKIP why",
                                 "ok 1 suite # SKIP all skipped"]
    assert ktap.parse(text).tests[0].status == "SKIP"


def test_diagnostics_never_look_like_a_subtest_header_or_kunit_s_end_marker():
    lines = ktap.diagnostic_lines("Subtest: evil\n  Subtest: x\nreboot: System halted\n"
                                  "List of all partitions:\nKernel panic - not syncing: VFS: x",
                                  "")
    assert not any(re.match(r"^\s*# Subtest: ", line) for line in lines)
    assert not any(re.search(r"List of all partitions:|Kernel panic - not syncing: VFS:|"
                             r"reboot: System halted", line) for line in lines)
    assert lines[0] == "# Subtest - evil"

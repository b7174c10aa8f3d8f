"""Parsers of external formats (GoogleTest JSON report, the suites' test listing,
the event stream), property-based: valid input round-trips; malformed input gives the parser's
own error with a one-line message, never a traceback and never a silent pass."""
import json
import subprocess

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cvmconf import events, gtest
from cvmconf.events import EventStreamError
from cvmconf.gtest import ReportError

# ---------------------------------------------------------------------------------------------
# GoogleTest JSON report

NAME = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_]{0,12}(/[a-z0-9_]{1,8})?\Z")
PROP_KEY = st.from_regex(r"\A[a-z][a-z_]{0,10}\Z").filter(
    lambda k: k not in gtest.STANDARD_KEYS | {"requirements", "skip_reason", "kernel_log"})
TEXT = st.text(max_size=40)


@st.composite
def gtest_tests(draw):
    result = draw(st.sampled_from(["COMPLETED", "SKIPPED"]))
    failures = draw(st.lists(TEXT, max_size=2))
    t = {"name": draw(NAME), "status": "RUN", "result": result,
         "time": f"{draw(st.floats(min_value=0, max_value=1e4, allow_nan=False)):.3f}s",
         "timestamp": "2025-01-01T00:00:00Z", "classname": "S"}
    if failures:
        t["failures"] = [{"failure": f, "type": ""} for f in failures]
    props = draw(st.dictionaries(PROP_KEY, TEXT, max_size=3))
    t.update(props)
    reqs = draw(st.lists(st.from_regex(r"\A[A-Z]{2,5}-[0-9]{3}\Z"), max_size=3))
    if reqs:
        t["requirements"] = " ".join(reqs)
    return t, failures, result, props, reqs


@st.composite
def reports(draw):
    suites, expected = [], []
    for s in range(draw(st.integers(min_value=0, max_value=3))):
        sname = f"Suite{s}"
        tests = []
        seen = set()
        for t, failures, result, props, reqs in draw(st.lists(gtest_tests(), max_size=4)):
            if t["name"] in seen:
                continue
            seen.add(t["name"])
            tests.append(t)
            outcome = "FAIL" if failures else ("SKIP" if result == "SKIPPED" else "PASS")
            expected.append((f"{sname}.{t['name']}", outcome, failures, props, reqs))
        suites.append({"name": sname, "testsuite": tests})
    return {"testsuites": suites}, expected


@given(reports())
def test_valid_reports_parse_to_the_right_outcomes(rep):
    data, expected = rep
    results = gtest.parse_report_text(json.dumps(data), "cvm_suite_x")
    got = [(r.name, r.outcome, r.messages, r.properties, r.requirements) for r in results]
    assert got == expected


def test_notrun_and_suppressed_tests_are_not_results():
    data = {"testsuites": [{"name": "S", "testsuite": [
        {"name": "a", "status": "NOTRUN", "result": "SUPPRESSED"},
        {"name": "b", "status": "RUN", "result": "SUPPRESSED"},
        {"name": "c", "status": "RUN", "result": "COMPLETED", "time": "0.1s"}]}]}
    assert [r.name for r in gtest.parse_report_data(data, "x")] == ["S.c"]


@pytest.mark.parametrize("data, message", [
    ([], "no 'testsuites' list"),
    ({"testsuites": {}}, "no 'testsuites' list"),
    ({"testsuites": [1]}, "malformed test suite entry"),
    ({"testsuites": [{"name": "S", "testsuite": [{"x": 1}]}]}, "malformed test entry"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "DONE"}]}]},
     "bad status/result"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "result": "EXPLODED"}]}]}, "unknown result"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "failures": "boom"}]}]}, "must be a list"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "failures": [{"failure": 3}]}]}]},
     "failure message is not text"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "time": "-1s"}]}]}, "bad time value"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "time": "nans"}]}]}, "bad time value"),
    ({"testsuites": [{"name": "S", "testsuite": [{"name": "a", "status": "RUN",
                                                   "requirements": ["A-001"]}]}]},
     "property value of type list"),
])
def test_malformed_reports_are_rejected_with_one_line(data, message):
    with pytest.raises(ReportError, match=message) as e:
        gtest.parse_report_data(data, "x")
    assert "\n" not in str(e.value)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.sampled_from(["testsuites", "testsuite", "name", "status", "result",
                                     "time", "failures", "failure", "message", "requirements",
                                     "skip_reason", "kernel_log", "x"]), children, max_size=5),
    max_leaves=25)


@given(JSONISH)
def test_arbitrary_json_gives_results_or_a_report_error(data):
    try:
        results = gtest.parse_report_data(data, "x")
    except ReportError as e:
        assert "\n" not in str(e)
        return
    # Whatever parsed is a well-formed result with a known outcome.
    for r in results:
        assert r.outcome in gtest.OUTCOMES
        assert r.duration >= 0


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_a_report_error(raw):
    text = raw.decode("utf-8", "replace")
    try:
        json.loads(text)
        assume(False)     # valid JSON is covered above
    except ValueError:
        pass
    with pytest.raises(ReportError):
        gtest.parse_report_text(text, "x")


def test_a_failed_test_is_never_read_as_a_pass():
    """Failures win over a COMPLETED result (GoogleTest writes both for a failing test)."""
    data = {"testsuites": [{"name": "S", "testsuite": [
        {"name": "a", "status": "RUN", "result": "COMPLETED", "failures": [{"failure": "x"}]},
        {"name": "b", "status": "RUN", "result": "SKIPPED", "failures": [{"failure": "y"}]}]}]}
    assert [r.outcome for r in gtest.parse_report_data(data, "x")] == ["FAIL", "FAIL"]


def test_real_report_of_a_suite_binary_parses(build_dir, tmp_path):
    import subprocess
    out = tmp_path / "r.json"
    subprocess.run([str(build_dir / "suites" / "cvm_suite_gmem_mmap"),
                    "--gtest_filter=*GmemFile.*", f"--gtest_output=json:{out}"],
                   capture_output=True, timeout=300, check=False)
    results = gtest.parse_report(out, "cvm_suite_gmem_mmap")
    assert results and all(r.requirements for r in results)
    assert {r.outcome for r in results} <= {"PASS", "SKIP", "FAIL"}


# ---------------------------------------------------------------------------------------------
# The listing (--cvm_list_requirements): tests in execution order and their requirement IDs

def _listing(entries) -> str:
    return json.dumps({"tests": [{"name": n, "requirements": r, "file": "x_test.cc", "line": 1}
                                 for n, r in entries]})


@given(st.lists(st.tuples(st.from_regex(r"\A[A-Z][A-Za-z0-9_]{0,8}(/[A-Za-z0-9_]{1,8})?\Z"),
                          st.lists(st.from_regex(r"\A[a-z][A-Za-z0-9_]{0,8}(/[a-z0-9_]{1,6})?\Z"),
                                   min_size=1, max_size=4, unique=True)),
                max_size=4, unique_by=lambda s: s[0]),
       st.lists(st.from_regex(r"\A[A-Z]{2,6}-[0-9]{3}\Z"), max_size=3))
def test_listings_parse_in_order(suites, ids):
    entries = [(f"{suite}.{n}", ids) for suite, names in suites for n in names]
    got = gtest.parse_listing(_listing(entries))
    assert got.tests == [n for n, _ in entries]
    assert got.requirements == {n: ids for n, _ in entries}


def test_disabled_tests_are_not_run_but_keep_their_requirements():
    text = _listing([("S.a", ["X-001"]), ("S.DISABLED_b", ["X-002"]), ("DISABLED_T.c", []),
                     ("P/DISABLED_U.d/x", []), ("P/V.DISABLED_e/0", []), ("P/V.f/0", [])])
    got = gtest.parse_listing(text)
    assert got.tests == ["S.a", "P/V.f/0"]
    assert got.requirements["S.DISABLED_b"] == ["X-002"]


@pytest.mark.parametrize("text, message", [
    ("", "not JSON"),
    ("{", "not JSON"),
    ("Running main() from gtest_main.cc\n", "not JSON"),
    ("[]", "no 'tests' list"),
    ('{"tests": 1}', "no 'tests' list"),
    ('{"tests": [{"name": 1}]}', "entry 1 is malformed"),
    ('{"tests": [{"name": "a", "requirements": [1]}]}', "entry 1 is malformed"),
    (_listing([("Suite", [])]), "not a GoogleTest test name"),
    (_listing([("Suite.a b", [])]), "not a GoogleTest test name"),
    (_listing([("S.a", []), ("S.a", [])]), "entry 2: test S.a listed twice"),
])
def test_malformed_listings_are_rejected(text, message):
    with pytest.raises(ReportError, match=message):
        gtest.parse_listing(text)


@given(st.text(max_size=200))
def test_arbitrary_listings_give_names_or_a_clear_error(text):
    try:
        got = gtest.parse_listing(text)
    except ReportError as e:
        assert "\n" not in str(e)
    else:
        assert all("." in n and " " not in n for n in got.tests)


def test_real_binaries_list_their_tests(build_dir, tmp_path):
    for b in gtest.suite_binaries(build_dir):
        got = gtest.list_suite(b)
        assert got.tests and set(got.tests) <= set(got.requirements)
        # The same tests, in the same order, as GoogleTest's own listing (its JSON form).
        out = tmp_path / f"{b.name}.json"
        subprocess.run([str(b), "--gtest_list_tests", f"--gtest_output=json:{out}"],
                       check=True, capture_output=True, timeout=60)
        own = [f"{s['name']}.{t['name']}" for s in json.loads(out.read_text())["testsuites"]
               for t in s["testsuite"]]
        assert got.tests == [n for n in own if not gtest._disabled(n)]


# ---------------------------------------------------------------------------------------------
# Event stream

def _start(t, us=1):
    return {"event": "start", "test": t, "mono_us": us}


def _end(t, us=2, skipped=False, failures=(), props=None):
    return {"event": "end", "test": t, "mono_us": us, "skipped": skipped,
            "failures": list(failures), "elapsed_ms": 1, "properties": props or {}}


@st.composite
def streams(draw):
    names = draw(st.lists(NAME, max_size=5, unique=True))
    evs = [{"event": "program_start", "pid": 1, "mono_us": 0}]
    finished = {}
    for n in names:
        failures = draw(st.lists(TEXT, max_size=2))
        skipped = draw(st.booleans())
        evs += [_start(n), _end(n, skipped=skipped, failures=failures,
                               props=draw(st.dictionaries(PROP_KEY, TEXT, max_size=2)))]
        finished[n] = "FAIL" if failures else ("SKIP" if skipped else "PASS")
    running = draw(st.none() | NAME.filter(lambda x: x not in names))
    if running:
        evs.append(_start(running, 5))
    else:
        evs.append({"event": "program_end", "passed": True, "mono_us": 9})
    return evs, finished, running


@given(streams(), st.integers(min_value=0, max_value=60))
def test_streams_parse_and_tolerate_a_torn_last_line(s, cut):
    evs, finished, running = s
    text = "".join(json.dumps(e) + "\n" for e in evs)
    st_ = events.parse(text)
    assert {k: events.result_from_end(v, "b").outcome for k, v in st_.finished.items()} == finished
    assert st_.running == running
    # The writer died in the middle of its last line: everything before it still counts.
    last = json.dumps(evs[-1])
    torn = "".join(json.dumps(e) + "\n" for e in evs[:-1]) + last[:max(1, min(cut, len(last) - 1))]
    st2 = events.parse(torn)
    assert st2.torn_tail
    assert set(st2.finished) == set(finished)


@pytest.mark.parametrize("lines, message", [
    (["not json"], "not JSON"),
    (['{"event": "start", "mono_us": 1}'], "without a test name"),
    (['{"event": "bogus", "mono_us": 1}'], "unknown event"),
    (['{"event": "start", "test": "a", "mono_us": -1}'], "non-negative"),
    ([json.dumps(_start("a")), json.dumps(_start("b"))], "started while"),
    ([json.dumps(_end("a"))], "ended but was not running"),
    ([json.dumps(_start("a")), json.dumps({**_end("a"), "failures": "x"})], "list of strings"),
    ([json.dumps(_start("a")), json.dumps({**_end("a"), "skipped": 1})], "true or false"),
    ([json.dumps(_start("a")), json.dumps({**_end("a"), "properties": {"k": 1}})],
     "map names to strings"),
    ([json.dumps(_start("a")), json.dumps(_end("a")), json.dumps(_start("a"))], "started twice"),
    (["[1, 2]"], "not a JSON object"),
])
def test_malformed_streams_are_rejected(lines, message):
    with pytest.raises(EventStreamError, match=message) as e:
        events.parse("\n".join(lines) + "\n")
    assert "\n" not in str(e.value)


@given(st.text(max_size=300))
def test_arbitrary_streams_give_a_state_or_a_clear_error(text):
    try:
        events.parse(text)
    except EventStreamError as e:
        assert "\n" not in str(e)


@settings(max_examples=40)
@given(streams(), st.data())
def test_live_reader_agrees_with_the_whole_stream(tmp_path_factory, s, data):
    evs, finished, running = s
    text = "".join(json.dumps(e) + "\n" for e in evs)
    path = tmp_path_factory.mktemp("ev") / "events.jsonl"
    reader = events.LiveReader(path)
    assert reader.poll() == []                 # file not there yet
    pos = 0
    seen = []
    with open(path, "w") as f:
        while pos < len(text):
            step = data.draw(st.integers(min_value=1, max_value=40))
            f.write(text[pos:pos + step])
            f.flush()
            pos += step
            seen += reader.poll()
    assert seen == evs
    assert reader.state.running == running and set(reader.state.finished) == set(finished)

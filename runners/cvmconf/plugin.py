"""The pytest collector plugin: one pytest item per GoogleTest test of every suite binary.

pytest collects (each binary is a pytest File whose items come from its listing,
--cvm_list_requirements: tests in execution order with their requirement IDs), applies
`-k`, and then this plugin applies --requirement/--family/--filter. Execution is not one process
per item: when the test loop starts, the Executor runs every selected test of a binary in batches
(GoogleTest sharding and filters), and each item reports the result of its own test.
"""
from __future__ import annotations

import concurrent.futures
import fnmatch
from pathlib import Path

import pytest

from cvmconf import gtest
from cvmconf.executor import Executor
from cvmconf.gtest import TestResult
from cvmconf.targets.base import SuiteBinary, Target


class GTestFailure(Exception):
    """A test whose outcome is FAIL, ERROR or TIMEOUT (pytest only knows 'failed')."""


def gtest_filter_matches(flt: str, name: str) -> bool:
    """GoogleTest filter semantics: 'POS1:POS2-NEG1:NEG2' with * and ? globs."""
    pos, _, neg = flt.partition("-")
    positives = [p for p in pos.split(":") if p] or ["*"]
    negatives = [p for p in neg.split(":") if p]
    return any(fnmatch.fnmatchcase(name, p) for p in positives) and \
        not any(fnmatch.fnmatchcase(name, p) for p in negatives)


class GTestItem(pytest.Item):
    def __init__(self, *, binary: SuiteBinary, test: str, requirements: list[str],
                 families: list[str], plugin: "CvmconfPlugin", **kw):
        super().__init__(**kw)
        self.binary = binary
        self.test = test
        self.requirements = requirements
        self.families = families
        self.plugin = plugin
        self.extra_keyword_matches.update(requirements)
        self.extra_keyword_matches.update(families)
        self.extra_keyword_matches.add(gtest.family_of(binary.name))
        for rid in requirements:
            self.user_properties.append(("requirement", rid))

    def runtest(self) -> None:
        r = self.plugin.result_of(self)
        if r is None:
            pytest.skip("not run: the run was interrupted")
        self.user_properties.append(("outcome", r.outcome))
        if r.outcome == gtest.SKIP:
            pytest.skip(r.skip_reason or "skipped")
        if r.outcome != gtest.PASS:
            raise GTestFailure(f"{r.outcome}: " + "\n".join(r.messages))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, GTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.binary.host_path, None, f"{self.binary.name}: {self.test}"


class SuiteFile(pytest.File):
    def __init__(self, *, binary: SuiteBinary, plugin: "CvmconfPlugin", **kw):
        super().__init__(**kw)
        self.binary = binary
        self.plugin = plugin

    def collect(self):
        listing = self.plugin.listing(self.binary)
        if listing is None:
            return
        for t in listing.tests:
            ids = listing.requirements.get(t, [])
            yield GTestItem.from_parent(self, name=t, binary=self.binary, test=t,
                                        requirements=ids, plugin=self.plugin,
                                        families=self.plugin.families_of(ids))


class CvmconfPlugin:
    def __init__(self, target: Target, binaries: list[SuiteBinary], families: dict[str, str],
                 executor: Executor | None, requirement_ids: list[str] | None = None,
                 family_names: list[str] | None = None, gtest_filter: str | None = None):
        self.target = target
        self.binaries = {str(b.host_path.resolve()): b for b in binaries}
        self.family_of_req = families          # requirement ID -> catalogue family
        self.executor = executor
        self.requirement_ids = set(requirement_ids or [])
        self.family_names = set(family_names or [])
        self.gtest_filter = gtest_filter
        self.errors: list[str] = []
        self.listings: dict[str, gtest.SuiteListing] = {}
        self.selected: dict[str, list[GTestItem]] = {}
        self.deselected: list[GTestItem] = []
        self.futures: dict[str, list[concurrent.futures.Future]] = {}
        self.progress = None   # set by the CLI: told how many tests will run
        self._results: dict[str, dict[str, TestResult]] = {}

    # -- collection -----------------------------------------------------------------------------

    def listing(self, binary: SuiteBinary):
        if binary.name not in self.listings:
            try:
                listing = self.target.list_suite(binary)
            except Exception as e:  # one line in the run's problems, not a pytest traceback
                self.errors.append(f"{binary.name}: {e}")
                return None
            self.listings[binary.name] = listing
        return self.listings[binary.name]

    def families_of(self, ids: list[str]) -> list[str]:
        return sorted({self.family_of_req[i] for i in ids if i in self.family_of_req})

    def pytest_collect_file(self, file_path: Path, parent):
        b = self.binaries.get(str(Path(file_path).resolve()))
        if b is not None:
            return SuiteFile.from_parent(parent, path=file_path, binary=b, plugin=self)
        return None

    def _wanted(self, item: GTestItem) -> bool:
        if self.requirement_ids and not self.requirement_ids.intersection(item.requirements):
            return False
        if self.family_names and not self.family_names.intersection(item.families):
            return False
        if self.gtest_filter and not gtest_filter_matches(self.gtest_filter, item.test):
            return False
        return True

    @pytest.hookimpl(trylast=True)   # after pytest's own -k deselection
    def pytest_collection_modifyitems(self, session, config, items):
        kept, dropped = [], []
        for it in items:
            (kept if isinstance(it, GTestItem) and self._wanted(it) else dropped).append(it)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept
        for it in kept:
            self.selected.setdefault(it.binary.name, []).append(it)

    def pytest_deselected(self, items):
        self.deselected.extend(i for i in items if isinstance(i, GTestItem))

    # -- execution ------------------------------------------------------------------------------

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtestloop(self, session):
        if self.executor is not None and not session.config.option.collectonly:
            if self.progress is not None:
                self.progress.total = sum(len(v) for v in self.selected.values())
            for name, items in self.selected.items():
                b = items[0].binary
                listing = self.listings[name]
                self.futures[name] = self.executor.submit(b, [i.test for i in items], listing.tests,
                                                          listing.requirements)
        yield

    def result_of(self, item: GTestItem) -> TestResult | None:
        name = item.binary.name
        if name not in self._results:
            merged: dict[str, TestResult] = {}
            for f in self.futures.get(name, []):
                merged.update(f.result())
            self._results[name] = merged
        return self._results[name].get(item.test)

    def all_results(self) -> dict[str, dict[str, TestResult]]:
        """Every result, also of binaries whose items pytest did not reach (interrupt)."""
        out: dict[str, dict[str, TestResult]] = {}
        for name, futs in self.futures.items():
            merged: dict[str, TestResult] = {}
            for f in futs:
                if f.done() and not f.cancelled() and f.exception() is None:
                    merged.update(f.result())
            out[name] = merged
        return out

// Tests of the race framework (suites/common/race.h): seeded schedules, budgets, and above all
// the invariant checker: a stale value injected into a comparison must be caught and reported
// with the seed, the iteration and a replay command line, both in-process and in a real race of
// cvm_suite_races run as a child process.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

#include "cvmconf/gtest_support.h"
#include "cvmconf/platform.h"
#include "platform_fixture.h"
#include "race.h"

namespace cvm::suites {
namespace {

RaceDefaults fixed(uint64_t seed, uint64_t iterations) {
  RaceDefaults d;
  d.seed = seed;
  d.max_iterations = iterations;
  d.duration = std::chrono::seconds(60);
  return d;
}

std::vector<uint64_t> draw(std::mt19937_64 g, int n) {
  std::vector<uint64_t> v;
  for (int i = 0; i < n; i++) v.push_back(g());
  return v;
}

TEST(RaceFramework, SameSeedSameScheduleChoices) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  Race a(fixed(4242, 1), "a"), b(fixed(4242, 1), "b"), c(fixed(4243, 1), "c");
  EXPECT_EQ(a.seed(), 4242u);
  EXPECT_EQ(draw(a.rng(0), 16), draw(b.rng(0), 16));
  EXPECT_EQ(draw(a.rng(3), 16), draw(b.rng(3), 16));
  EXPECT_NE(draw(a.rng(0), 16), draw(a.rng(1), 16)) << "streams must differ";
  EXPECT_NE(draw(a.rng(0), 16), draw(c.rng(0), 16)) << "seeds must differ";
  // Workers get stream 1 + their index.
  std::vector<uint64_t> got;
  a.spawn("w0", [&](RaceWorker& me) { got = draw(me.rng(), 16); });
  a.join();
  EXPECT_EQ(got, draw(b.rng(1), 16));
}

TEST(RaceFramework, IterationBudgetIsExact) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  Race r(fixed(1, 5), "r");
  std::vector<uint64_t> seen;
  while (r.next_iteration()) seen.push_back(r.iteration());
  EXPECT_EQ(seen, (std::vector<uint64_t>{0, 1, 2, 3, 4}));
  RaceSummary s = r.finish();
  EXPECT_EQ(s.iterations, 5u);
  EXPECT_EQ(s.stopped_by, "iterations");
  EXPECT_EQ(s.violations, 0u);
}

TEST(RaceFramework, DurationBoundsTheRaceAndStopsWorkers) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  RaceDefaults d;
  d.seed = 7;
  d.duration = std::chrono::milliseconds(50);
  auto t0 = std::chrono::steady_clock::now();
  Race r(d, "r");
  std::atomic<uint64_t> spins{0};
  r.spawn("spinner", [&](RaceWorker& me) {
    while (!r.stopping()) {
      spins++;
      me.ops();
    }
  });
  while (r.next_iteration()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  RaceSummary s = r.finish();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0);
  EXPECT_GE(ms.count(), 50);
  EXPECT_LT(ms.count(), 5000);
  EXPECT_EQ(s.stopped_by, "duration");
  EXPECT_GT(s.iterations, 0u);
  EXPECT_EQ(s.ops, spins.load());
  EXPECT_GT(s.ops_per_sec, 0.0);
}

// A check of the kind the races make: the range must read zeroes after a punch.
void zero_check(Race& r, const std::vector<uint64_t>& page, uint64_t it, const std::string& who) {
  for (size_t i = 0; i < page.size(); i++) {
    uint64_t v = r.observe(page[i], 0x5a00000300000007ull, it);
    if (v != 0) {
      r.violation(it, who, "word " + std::to_string(i) + " reads " + std::to_string(v) +
                               " after the punch (stale data)");
      return;
    }
  }
}

// Runs a race of `iterations` whose driver and two workers check a zeroed page; returns the
// summary and the failures finish() reported (intercepted).
struct CheckedRun {
  RaceSummary s;
  std::vector<std::string> failures;
};
CheckedRun checked_race(uint64_t seed, uint64_t iterations, std::optional<uint64_t> inject) {
  CheckedRun out;
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter rep(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ALL_THREADS, &results);
    Race r(fixed(seed, iterations), "RaceFrameworkInner.Checked");
    if (inject) r.inject_stale_at(*inject);
    const std::vector<uint64_t> page(512, 0);
    for (int w = 0; w < 2; w++)
      r.spawn("worker " + std::to_string(w), [&](RaceWorker& me) {
        while (!r.stopping()) {
          // Workers compare too, but only at iterations below the injection point, so which
          // check the stale value lands in is decided by the driver's iteration alone.
          uint64_t it = r.iteration();
          if (!inject || it + 1 < *inject) zero_check(r, page, it, me.name());
          me.ops();
          std::this_thread::yield();
        }
      });
    while (r.next_iteration()) {
      zero_check(r, page, r.iteration(), "driver");
      r.ops();
    }
    out.s = r.finish();
  }
  for (int i = 0; i < results.size(); i++) out.failures.push_back(results.GetTestPartResult(i).message());
  return out;
}

TEST(RaceChecker, CleanRaceReportsNothing) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  CheckedRun run = checked_race(99, 40, std::nullopt);
  EXPECT_EQ(run.s.violations, 0u);
  EXPECT_TRUE(run.failures.empty()) << run.failures.front();
  EXPECT_EQ(run.s.iterations, 40u);
  EXPECT_FALSE(run.s.injected_stale_at.has_value());
}

TEST(RaceChecker, InjectedStaleValueIsCaughtWithSeedAndIteration) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  CheckedRun run = checked_race(31337, 40, 17);
  ASSERT_TRUE(run.s.injected_stale_at.has_value());
  EXPECT_EQ(*run.s.injected_stale_at, 17u);
  EXPECT_EQ(run.s.violations, 1u);
  ASSERT_EQ(run.s.kept.size(), 1u);
  EXPECT_EQ(run.s.kept[0].seed, 31337u);
  EXPECT_EQ(run.s.kept[0].iteration, 17u);
  EXPECT_EQ(run.s.kept[0].actor, "driver");
  EXPECT_NE(run.s.kept[0].what.find(std::to_string(0x5a00000300000007ull)), std::string::npos)
      << run.s.kept[0].what;
  // The test fails, once, naming seed and iteration and the command that replays them.
  ASSERT_EQ(run.failures.size(), 1u);
  const std::string& f = run.failures[0];
  EXPECT_NE(f.find("seed 31337, iteration 17, driver: word 0 reads"), std::string::npos) << f;
  EXPECT_NE(f.find("--gtest_filter='RaceFrameworkInner.Checked' --cvm_seed=31337 --cvm_iterations=18"),
            std::string::npos)
      << f;
  EXPECT_EQ(run.s.replay.substr(run.s.replay.find("--gtest_filter")),
            "--gtest_filter='RaceFrameworkInner.Checked' --cvm_seed=31337 --cvm_iterations=18");
}

TEST(RaceChecker, ViolationsFromWorkersAreCountedAndTheFirstAreKept) {
  if (testing::stress_budget().given()) GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
  ::testing::TestPartResultArray results;
  RaceSummary s;
  {
    ::testing::ScopedFakeTestPartResultReporter rep(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ALL_THREADS, &results);
    Race r(fixed(5, 3), "RaceFrameworkInner.Many");
    for (int w = 0; w < 4; w++)
      r.spawn("w" + std::to_string(w), [&](RaceWorker& me) {
        for (int i = 0; i < 10; i++) r.violation(r.iteration(), me.name(), "v" + std::to_string(i));
      });
    r.join();
    while (r.next_iteration()) {
    }
    s = r.finish();
  }
  EXPECT_EQ(s.violations, 40u);
  EXPECT_EQ(s.kept.size(), Race::kMaxKept);
  ASSERT_EQ(results.size(), 1);
  EXPECT_NE(std::string(results.GetTestPartResult(0).message()).find("violated 40 time(s)"), std::string::npos);
}

// ---- a real race with a stale value injected (child process) ----

struct ChildRun {
  int status = -1;
  nlohmann::json test;  // the test's object in the JSON report
};

ChildRun run_suite(const std::string& filter, const std::string& env, const std::string& args) {
  char tmpl[] = "/tmp/cvmconf-race-selftest-XXXXXX";
  int fd = mkstemp(tmpl);
  if (fd >= 0) close(fd);
  // The child's budget comes from args alone, whatever this process was given.
  std::string cmd = "env -u CVMCONF_DURATION -u CVMCONF_ITERATIONS -u CVMCONF_SEED " + env +
                    " '" CVM_RACES_SUITE_BINARY "' --gtest_filter='" + filter + "' " + args +
                    " --gtest_output=json:" + tmpl + " >/dev/null 2>&1";
  ChildRun out;
  out.status = std::system(cmd.c_str());
  std::ifstream f(tmpl);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  unlink(tmpl);
  if (j.is_discarded()) return out;
  for (const auto& suite : j["testsuites"])
    for (const auto& t : suite["testsuite"]) out.test = t;
  return out;
}

std::string failure_text(const nlohmann::json& t) {
  std::string s;
  if (t.contains("failures"))
    for (const auto& f : t["failures"]) s += f.value("failure", "") + "\n";
  return s;
}

std::string host_faults_test_name() {
  return "Platforms/PunchRace.HostFaults/" +
         platform_param_name(::testing::TestParamInfo<const Platform*>(&default_platform(), 0));
}

TEST(RaceChecker, StaleValueInARealRaceIsReportedAndReplayable) {
  const std::string name = host_faults_test_name();
  const uint64_t seed = 20250607;
  ChildRun bad = run_suite(name, "CVMCONF_SELFTEST_INJECT_STALE=3",
                           "--cvm_seed=" + std::to_string(seed) + " --cvm_iterations=400");
  ASSERT_FALSE(bad.test.is_null()) << "the race produced no JSON report";
  if (bad.test.value("result", "") == "SKIPPED")
    GTEST_SKIP() << bad.test.value("skip_reason", "the race was skipped");
  EXPECT_NE(bad.status, 0) << "the race with a stale value must fail";
  const std::string f = failure_text(bad.test);
  ASSERT_TRUE(bad.test.contains("injected_stale_at")) << "the stale value was never injected: " << bad.test.dump(1);
  const uint64_t at = std::stoull(bad.test.value("injected_stale_at", "0"));
  EXPECT_GE(at, 3u);
  EXPECT_EQ(bad.test.value("seed", ""), std::to_string(seed));
  EXPECT_NE(f.find("seed " + std::to_string(seed) + ", iteration " + std::to_string(at) + ", puncher:"),
            std::string::npos)
      << f;
  EXPECT_NE(f.find("after the punch returned (expected 0: stale data)"), std::string::npos) << f;
  const std::string replay_args = "--cvm_seed=" + std::to_string(seed) +
                                  " --cvm_iterations=" + std::to_string(at + 1);
  EXPECT_NE(f.find("replay: '"), std::string::npos) << f;
  EXPECT_NE(f.find("--gtest_filter='" + name + "' " + replay_args), std::string::npos) << f;

  // The replay command (without the injection) runs the same seed for exactly that many
  // iterations, and on a correct kernel passes.
  ChildRun replay = run_suite(name, "", replay_args);
  ASSERT_FALSE(replay.test.is_null());
  EXPECT_EQ(replay.status, 0) << failure_text(replay.test);
  EXPECT_EQ(replay.test.value("seed", ""), std::to_string(seed));
  EXPECT_EQ(replay.test.value("iterations", ""), std::to_string(at + 1));
  EXPECT_EQ(replay.test.value("stopped_by", ""), "iterations");
}

}  // namespace
}  // namespace cvm::suites

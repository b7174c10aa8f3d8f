#include "race.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "cvmconf/gtest_support.h"

namespace cvm::suites {
namespace {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::mt19937_64 stream_rng(uint64_t seed, uint64_t stream) {
  return std::mt19937_64(splitmix64(seed ^ splitmix64(stream + 1)));
}

uint64_t fresh_seed() {
  std::random_device rd;
  uint64_t s = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  // Keep seeds short enough to type.
  return s % 1000000000000ull;
}

std::string current_test_name() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (!info) return "";
  return std::string(info->test_suite_name()) + "." + info->name();
}

std::string self_exe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("<suite binary>");
}

bool env_u64(const char* name, uint64_t& out) {
  const char* v = std::getenv(name);
  if (!v || !*v) return false;
  char* end = nullptr;
  errno = 0;
  unsigned long long x = std::strtoull(v, &end, 0);
  if (errno || !end || *end) return false;
  out = x;
  return true;
}

}  // namespace

std::string RaceViolation::describe() const {
  return "seed " + std::to_string(seed) + ", iteration " + std::to_string(iteration) + ", " +
         actor + ": " + what;
}

RaceWorker::RaceWorker(int index, std::string name, uint64_t seed)
    : name_(std::move(name)),
      rng_(stream_rng(seed, static_cast<uint64_t>(index) + 1)) {}

Race::Race(RaceDefaults d, std::string test_name) : test_name_(std::move(test_name)) {
  if (test_name_.empty()) test_name_ = current_test_name();
  const auto& b = testing::stress_budget();
  seed_ = b.seed ? *b.seed : d.seed ? *d.seed : fresh_seed();
  start_ = std::chrono::steady_clock::now();
  if (b.duration.count() > 0) {
    deadline_ = start_ + b.duration;
    max_iterations_ = b.iterations;
  } else if (b.iterations > 0) {
    deadline_ = start_ + d.iteration_time_cap;
    deadline_reason_ = "time cap";
    max_iterations_ = b.iterations;
  } else {
    deadline_ = start_ + d.duration;
    max_iterations_ = d.max_iterations;
  }
  uint64_t inject = 0;
  if (env_u64("CVMCONF_SELFTEST_INJECT_STALE", inject)) inject_stale_at(inject);
  std::printf("[ RACE     ] %s: seed %llu\n", test_name_.c_str(),
              static_cast<unsigned long long>(seed_));
  std::fflush(stdout);
}

Race::~Race() {
  join();
}

void Race::inject_stale_at(uint64_t iteration) {
  inject_at_ = iteration;
  inject_armed_.store(true);
}

std::mt19937_64 Race::rng(uint64_t stream) const { return stream_rng(seed_, stream); }

uint64_t Race::pick(std::mt19937_64& g, uint64_t lo, uint64_t hi) {
  if (hi <= lo) return lo;
  return std::uniform_int_distribution<uint64_t>(lo, hi)(g);
}

Race::Range Race::pick_range(std::mt19937_64& g, uint64_t lo, uint64_t hi, uint64_t max_n) {
  Range r;
  r.first = pick(g, lo, hi - 1);
  r.n = pick(g, 1, std::min(max_n, hi - r.first));
  return r;
}

bool Race::chance(std::mt19937_64& g, uint64_t num, uint64_t den) {
  return pick(g, 0, den - 1) < num;
}

void Race::jitter(std::mt19937_64& g, uint64_t max_us) {
  uint64_t us = pick(g, 0, max_us);
  if (us == 0) {
    std::this_thread::yield();
  } else if (us < 50) {
    // Short delays spin: sleeping would round them up to the timer slack.
    auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    while (std::chrono::steady_clock::now() < until) {
    }
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
}

bool Race::next_iteration() {
  if (stopping()) return false;
  uint64_t done = started_ ? iteration() + 1 : 0;
  if (max_iterations_ && done >= max_iterations_) {
    stop("iterations");
    return false;
  }
  if (std::chrono::steady_clock::now() >= deadline_) {
    stop(deadline_reason_);
    return false;
  }
  if (started_) iteration_.fetch_add(1, std::memory_order_acq_rel);
  started_ = true;
  return true;
}

void Race::stop(const char* why) {
  const char* expected = nullptr;
  stopped_by_.compare_exchange_strong(expected, why);
  stop_.store(true, std::memory_order_release);
  std::call_once(on_stop_once_, [this] {
    std::vector<std::function<void()>> fns;
    {
      std::lock_guard<std::mutex> g(mu_);
      fns = on_stop_;
    }
    for (auto& f : fns) f();
  });
}

void Race::on_stop(std::function<void()> fn) {
  std::lock_guard<std::mutex> g(mu_);
  on_stop_.push_back(std::move(fn));
}

void Race::spawn(std::string name, std::function<void(RaceWorker&)> fn) {
  std::lock_guard<std::mutex> g(mu_);
  int index = static_cast<int>(workers_.size());
  workers_.push_back(std::unique_ptr<RaceWorker>(new RaceWorker(index, std::move(name), seed_)));
  RaceWorker* w = workers_.back().get();
  threads_.emplace_back([w, fn = std::move(fn)] { fn(*w); });
}

void Race::join() {
  stop("the driver");
  std::vector<std::thread> ts;
  {
    std::lock_guard<std::mutex> g(mu_);
    ts.swap(threads_);
  }
  for (auto& t : ts)
    if (t.joinable()) t.join();
}

void Race::violation(uint64_t iteration, std::string actor, std::string what) {
  uint64_t n = violations_.fetch_add(1) + 1;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (kept_.size() < kMaxKept) kept_.push_back({seed_, iteration, std::move(actor), std::move(what)});
  }
  if (n >= kStopAfterViolations) stop("violations");
}

uint64_t Race::observe_slow(uint64_t observed, uint64_t stale, uint64_t iteration) {
  if (iteration < inject_at_) return observed;
  int64_t none = -1;
  if (!injected_at_.compare_exchange_strong(none, static_cast<int64_t>(iteration))) return observed;
  inject_armed_.store(false);
  return stale;
}

std::string Race::replay_command(uint64_t upto) const {
  return "'" + self_exe() + "' --gtest_filter='" + test_name_ + "' --cvm_seed=" +
         std::to_string(seed_) + " --cvm_iterations=" + std::to_string(upto + 1);
}

RaceSummary Race::finish() {
  if (finished_) return summary_;
  finished_ = true;
  join();
  auto elapsed = std::chrono::steady_clock::now() - start_;
  RaceSummary& s = summary_;
  s.seed = seed_;
  s.iterations = started_ ? iteration() + 1 : 0;
  s.ops = driver_ops_.load();
  for (const auto& w : workers_) s.ops += w->op_count();
  s.duration_ms = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count());
  double secs = std::chrono::duration<double>(elapsed).count();
  s.ops_per_sec = secs > 0 ? static_cast<double>(s.ops) / secs : 0;
  s.violations = violations_.load();
  s.stopped_by = stopped_by_.load() ? stopped_by_.load() : "";
  {
    std::lock_guard<std::mutex> g(mu_);
    s.kept = kept_;
  }
  if (injected_at_.load() >= 0) s.injected_stale_at = static_cast<uint64_t>(injected_at_.load());

  char rate[32];
  std::snprintf(rate, sizeof rate, "%.1f", s.ops_per_sec);
  ::testing::Test::RecordProperty("seed", std::to_string(s.seed));
  ::testing::Test::RecordProperty("iterations", std::to_string(s.iterations));
  ::testing::Test::RecordProperty("ops", std::to_string(s.ops));
  ::testing::Test::RecordProperty("ops_per_sec", rate);
  ::testing::Test::RecordProperty("duration_ms", std::to_string(s.duration_ms));
  ::testing::Test::RecordProperty("violations", std::to_string(s.violations));
  ::testing::Test::RecordProperty("stopped_by", s.stopped_by);
  if (s.injected_stale_at)
    ::testing::Test::RecordProperty("injected_stale_at", std::to_string(*s.injected_stale_at));

  std::printf("[ RACE     ] %s: seed %llu, %llu iterations, %llu ops in %llu ms (%s ops/s), "
              "%llu violation(s), stopped by %s\n",
              test_name_.c_str(), static_cast<unsigned long long>(s.seed),
              static_cast<unsigned long long>(s.iterations),
              static_cast<unsigned long long>(s.ops),
              static_cast<unsigned long long>(s.duration_ms), rate,
              static_cast<unsigned long long>(s.violations), s.stopped_by.c_str());
  std::fflush(stdout);

  if (s.violations) {
    uint64_t first = s.kept.empty() ? s.iterations : s.kept.front().iteration;
    for (const auto& v : s.kept) first = std::min(first, v.iteration);
    s.replay = replay_command(first);
    ::testing::Test::RecordProperty("replay", s.replay);
    std::ostringstream os;
    os << "race invariant violated " << s.violations << " time(s) (seed " << s.seed << ", "
       << s.iterations << " iterations); the first " << s.kept.size() << ":";
    for (const auto& v : s.kept) os << "\n  " << v.describe();
    os << "\nreplay: " << s.replay;
    ADD_FAILURE() << os.str();
  }
  return s;
}

}  // namespace cvm::suites

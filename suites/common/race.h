// A small framework for bounded, seeded race tests.
//
//  - Budget: a race runs until its duration or its iteration count is used up, whichever comes
//    first. Both come from the stress budget (--cvm_duration / --cvm_iterations, or
//    CVMCONF_DURATION / CVMCONF_ITERATIONS); without them the test's short defaults apply, so
//    ctest stays fast, and `--cvm_duration=S` turns every race into an S-second soak.
//  - Seed: --cvm_seed / CVMCONF_SEED, or a fresh random seed that is printed and recorded. Every
//    schedule choice (ranges, offsets, which operation, short delays) is drawn from rng(stream),
//    std::mt19937_64 streams derived from the seed, so the same seed replays the same sequence
//    of choices (the thread interleaving is, of course, the kernel's).
//  - Threads: the test thread is the driver (next_iteration() advances the iteration); workers
//    started with spawn() loop until stopping(); finish() and the destructor stop and join them.
//  - Invariants: violation() records what a check found, with the seed and the iteration; the
//    first kMaxKept are kept, all are counted. finish() records the properties iterations,
//    ops, ops_per_sec, seed, duration_ms and violations, and fails the test with the kept
//    violations and the command line that replays the same seed up to the failing iteration.
//  - Self-test hook: observe(value, stale, iteration) is how checks read the value they compare.
//    With CVMCONF_SELFTEST_INJECT_STALE=<iteration> in the environment it returns `stale`
//    instead, once, at the first observation at or after that iteration (recorded as the
//    property injected_stale_at), so a test of the checker can prove that a stale value in the
//    comparison is caught and reported with seed and iteration. Never set it for real runs.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace cvm::suites {

struct RaceDefaults {
  // Used when the stress budget names no duration (and no iteration count).
  std::chrono::milliseconds duration{300};
  // Upper bound on iterations when the budget names none (0: bounded by time only).
  uint64_t max_iterations = 0;
  // Hard time cap when only an iteration count is given (replays must not hang ctest).
  std::chrono::milliseconds iteration_time_cap{120000};
  // Seed when the stress budget names none (for tests of the framework; races leave it unset
  // and get a fresh random seed).
  std::optional<uint64_t> seed;
};

struct RaceViolation {
  uint64_t seed = 0;
  uint64_t iteration = 0;
  std::string actor;  // "puncher", "reader 1", "vcpu 0", ...
  std::string what;
  std::string describe() const;  // "seed 42, iteration 7, reader 1: ..."
};

struct RaceSummary {
  uint64_t seed = 0;
  uint64_t iterations = 0;
  uint64_t ops = 0;
  double ops_per_sec = 0;
  uint64_t duration_ms = 0;
  uint64_t violations = 0;
  std::vector<RaceViolation> kept;
  std::string stopped_by;  // "duration", "iterations", "time cap", "violations", "the driver"
  std::string replay;      // command line replaying this seed (set when there were violations)
  std::optional<uint64_t> injected_stale_at;
};

class Race;

// A worker thread's view: its name, its schedule stream (by index) and its operation counter.
class RaceWorker {
 public:
  const std::string& name() const { return name_; }
  std::mt19937_64& rng() { return rng_; }
  // Counts n completed operations (for ops_per_sec).
  void ops(uint64_t n = 1) { ops_ += n; }
  uint64_t op_count() const { return ops_; }

 private:
  friend class Race;
  RaceWorker(int index, std::string name, uint64_t seed);
  std::string name_;
  std::mt19937_64 rng_;
  uint64_t ops_ = 0;
};

class Race {
 public:
  static constexpr size_t kMaxKept = 16;
  static constexpr uint64_t kStopAfterViolations = 1000;

  // Resolves the budget and the seed. test_name is the full GoogleTest name used in the replay
  // command line ("" = the current test's).
  explicit Race(RaceDefaults defaults = {}, std::string test_name = "");
  ~Race();
  Race(const Race&) = delete;
  Race& operator=(const Race&) = delete;

  uint64_t seed() const { return seed_; }
  // The schedule stream `stream` (0 is the driver's, workers get 1 + their index).
  std::mt19937_64 rng(uint64_t stream) const;
  // Uniform integer in [lo, hi] from g.
  static uint64_t pick(std::mt19937_64& g, uint64_t lo, uint64_t hi);
  // True with probability num/den.
  static bool chance(std::mt19937_64& g, uint64_t num, uint64_t den);
  // A range [first, first + n) inside [lo, hi) (hi > lo) with 1 <= n <= max_n. Draws from g in
  // this order: first = pick(g, lo, hi - 1), then n = pick(g, 1, min(max_n, hi - first)).
  struct Range {
    uint64_t first = 0, n = 0;
  };
  static Range pick_range(std::mt19937_64& g, uint64_t lo, uint64_t hi, uint64_t max_n);

  // Driver: true when one more iteration should run; the first call starts iteration 0.
  bool next_iteration();
  // The driver's current iteration (0-based; checks snapshot it when they start).
  uint64_t iteration() const { return iteration_.load(std::memory_order_acquire); }
  bool stopping() const { return stop_.load(std::memory_order_acquire); }
  void stop(const char* why = "stop()");
  // Runs fn (once, on whichever thread stops the race first) when the race stops: for workers
  // that cannot poll stopping(), e.g. a guest that watches a flag in its own memory.
  void on_stop(std::function<void()> fn);
  // Absolute deadline of this race (for bounded waits inside iterations).
  std::chrono::steady_clock::time_point deadline() const { return deadline_; }
  // Sleeps a seeded number of microseconds in [0, max_us] (0: just yields).
  static void jitter(std::mt19937_64& g, uint64_t max_us);

  // Starts a worker thread running fn until stopping() (fn must poll it).
  void spawn(std::string name, std::function<void(RaceWorker&)> fn);
  // Counts operations done by the driver.
  void ops(uint64_t n = 1) { driver_ops_.fetch_add(n, std::memory_order_relaxed); }

  // Records an invariant violation found at `iteration` by `actor`.
  void violation(uint64_t iteration, std::string actor, std::string what);

  // The value a check compares: `observed`, unless the stale-value self-test hook fires.
  uint64_t observe(uint64_t observed, uint64_t stale, uint64_t iteration) {
    if (!inject_armed_.load(std::memory_order_relaxed)) return observed;
    return observe_slow(observed, stale, iteration);
  }
  // Arms the self-test hook in-process (what CVMCONF_SELFTEST_INJECT_STALE does).
  void inject_stale_at(uint64_t iteration);

  // Stops and joins the workers; the driver may make final checks before finish().
  void join();

  // Stops and joins the workers, records the GoogleTest properties, prints the summary and
  // fails the current test (non-fatally) if a violation was recorded. Idempotent.
  RaceSummary finish();

  // The replay command line for the current test up to iteration `upto` (inclusive).
  std::string replay_command(uint64_t upto) const;

 private:
  uint64_t observe_slow(uint64_t observed, uint64_t stale, uint64_t iteration);

  std::string test_name_;
  uint64_t seed_ = 0;
  uint64_t max_iterations_ = 0;  // 0: unbounded
  std::chrono::steady_clock::time_point start_, deadline_;
  const char* deadline_reason_ = "duration";
  std::atomic<uint64_t> iteration_{0};
  bool started_ = false;
  std::atomic<bool> stop_{false};
  std::atomic<const char*> stopped_by_{nullptr};
  std::atomic<uint64_t> driver_ops_{0};
  std::vector<std::function<void()>> on_stop_;
  std::once_flag on_stop_once_;

  std::mutex mu_;
  std::vector<std::unique_ptr<RaceWorker>> workers_;
  std::vector<std::thread> threads_;
  std::vector<RaceViolation> kept_;
  std::atomic<uint64_t> violations_{0};

  std::atomic<bool> inject_armed_{false};
  uint64_t inject_at_ = 0;
  std::atomic<int64_t> injected_at_{-1};

  bool finished_ = false;
  RaceSummary summary_;
};

}  // namespace cvm::suites

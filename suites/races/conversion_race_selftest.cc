// Tests of the conversion races' own logic (not conformance tests; they name no requirements):
//  - the page-state model: which states an access bracketed by two snapshots can have seen
//    (table of cases, and a concurrent property test against a simulated kernel whose page
//    state changes at arbitrary moments inside each conversion), begin/end transitions;
//  - the content rules (what a reader, a writer's read-back and a round trip may see);
//  - the race itself against this kernel with a back-end the kernel refuses: everything but
//    the conversions runs for real (host readers and writers on the environment's memory, the
//    puncher, the punch_race guest, the checked iterations, the state observers), and the only
//    violations it may report are the refused conversions, each with seed and iteration;
//  - the race with an emulated in-place back-end (a test double: MAP_FIXED remaps onto a
//    guest_memfd page that really raises SIGBUS), so page states really change under the racing
//    threads: a correct emulation must race clean, and broken ones (a page left unconverted,
//    spurious EAGAIN, contents zeroed where they must be kept, a foreign page) must be caught,
//    and so must a stale value injected into the zero check of a punch while converting.
#include <fcntl.h>
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/mman.h>

#include <thread>
#include <tuple>

#include "conversion_model.h"
#include "conversion_race.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/platform.h"
#include "cvmconf/uapi.h"
#include "page_model.h"
#include "platform_fixture.h"

namespace cvm {
// Parameter values as GoogleTest (and so ctest's test names) print them.
inline void PrintTo(ConversionAbi a, std::ostream* os) { *os << conversion_abi_name(a); }
}  // namespace cvm

namespace cvm::suites {
namespace {

constexpr PageState S = PageState::Shared;
constexpr PageState P = PageState::Private;

StateSnapshot snap(uint64_t seq, PageState state, PageState target) {
  StateSnapshot s;
  s.seq = seq;
  s.state = state;
  s.target = seq & 1 ? target : state;
  return s;
}

std::string window_text(const StateWindow& w) { return w.describe(); }

// An access bracketed by the snapshots before and after, and the states it may have seen.
struct WindowCase {
  StateSnapshot before, after;
  const char* seen;
};

void expect_windows(std::initializer_list<WindowCase> cases) {
  int i = 0;
  for (const WindowCase& c : cases) {
    EXPECT_EQ(window_text(state_window(c.before, c.after)), c.seen)
        << "case " << i++ << ": snapshots at seq " << c.before.seq << " and " << c.after.seq;
  }
}

TEST(ConversionModelWindow, NoConversionDuringTheAccessIsDefinitive) {
  expect_windows({{snap(4, S, S), snap(4, S, S), "shared"},  //
                  {snap(4, P, P), snap(4, P, P), "private"}});
  EXPECT_TRUE(state_window(snap(0, S, S), snap(0, S, S)).definitive());
}

TEST(ConversionModelWindow, AConversionInFlightAllowsBothItsEnds) {
  expect_windows({
      // In flight throughout.
      {snap(5, S, P), snap(5, S, P), "shared or private"},
      // A conversion to the state the page already has is no window at all.
      {snap(5, P, P), snap(5, P, P), "private"},
      // Began during the access.
      {snap(4, S, S), snap(5, S, P), "shared or private"},
      {snap(4, P, P), snap(5, P, P), "private"},
      // Ended during the access (successfully, or not).
      {snap(5, S, P), snap(6, P, P), "shared or private"},
      {snap(5, S, P), snap(6, S, S), "shared or private"},
      // The end already visible in the first snapshot's state: the access came after it.
      {snap(5, P, P), snap(6, P, P), "private"},
  });
}

TEST(ConversionModelWindow, OneConversionEntirelyInsideIsCoveredByTheStateAfter) {
  expect_windows({
      {snap(4, S, S), snap(6, P, P), "shared or private"},
      // S -> S (a no-op, or a failure) leaves only shared.
      {snap(4, S, S), snap(6, S, S), "shared"},
      // In flight at the start, one more began and ended: the first one's outcome is hidden in
      // {state, target}, the second's is the state after.
      {snap(5, S, S), snap(8, S, S), "shared"},
      {snap(5, S, P), snap(8, S, S), "shared or private"},
      // Ended, then another one began and is in flight at the end.
      {snap(5, P, P), snap(7, P, P), "private"},
  });
}

TEST(ConversionModelWindow, TwoConversionsEntirelyInsideHideAState) {
  expect_windows({
      // S -> P -> S entirely inside the access: it may have seen private.
      {snap(4, S, S), snap(8, S, S), "shared or private"},
      {snap(5, S, S), snap(10, S, S), "shared or private"},
  });
  EXPECT_FALSE(state_window(snap(4, S, S), snap(8, S, S)).definitive());
}

TEST(ConversionModel, BeginAndEndMoveStateAndSequence) {
  ConversionModel m(4, S);
  EXPECT_EQ(m.snapshot(1).seq, 0u);
  m.begin(1, 2, P);
  for (uint64_t p : {1u, 2u}) {
    StateSnapshot s = m.snapshot(p);
    EXPECT_TRUE(s.in_flight());
    EXPECT_EQ(s.state, S) << "the old state until the conversion returned";
    EXPECT_EQ(s.target, P);
  }
  EXPECT_FALSE(m.snapshot(0).in_flight()) << "pages outside the range are untouched";
  EXPECT_FALSE(m.snapshot(3).in_flight());
  m.end(1, 2, true);
  EXPECT_EQ(m.state(1), P);
  EXPECT_EQ(m.state(2), P);
  EXPECT_EQ(m.snapshot(1).seq, 2u);
  EXPECT_EQ(m.snapshot(1).target, P);
  EXPECT_TRUE(m.all(1, 2, P));
  EXPECT_FALSE(m.all(0, 2, P));
  EXPECT_EQ(m.conversions(1), 1u);
  // A failed conversion changes nothing but the sequence.
  m.begin(0, 2, P);
  m.end(0, 2, false);
  EXPECT_EQ(m.state(0), S);
  EXPECT_EQ(m.state(1), P);
  EXPECT_EQ(m.snapshot(0).seq, 2u);
  EXPECT_EQ(m.snapshot(1).seq, 4u);
  EXPECT_EQ(m.conversions(1), 2u);
}

// A simulated kernel: each conversion changes each page's true state at its own random moment
// strictly between begin() and end() (or never, when it fails). Observers read the true state
// between two snapshots; the window computed from the snapshots must always contain what they
// read. This is the property the races rely on for "SIGBUS only on private pages".
TEST(ConversionModel, WindowsAlwaysContainTheTrueStateUnderConcurrency) {
  constexpr uint64_t kPages = 4;
  ConversionModel m(kPages, S);
  std::atomic<int> truth[kPages];
  for (auto& t : truth) t.store(static_cast<int>(S));
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> observations{0}, definitive{0}, windows{0}, wrong{0};
  std::string first_wrong;
  std::mutex mu;
  std::vector<std::thread> observers;
  for (int o = 0; o < 2; o++)
    observers.emplace_back([&, o] {
      std::mt19937_64 g(1000 + o);
      while (!stop.load()) {
        const uint64_t p = g() % kPages;
        StateSnapshot b = m.snapshot(p);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        const auto seen = static_cast<PageState>(truth[p].load());
        for (uint64_t spin = g() % 64; spin; spin--)
          std::atomic_signal_fence(std::memory_order_seq_cst);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        StateSnapshot a = m.snapshot(p);
        StateWindow w = state_window(b, a);
        observations++;
        (w.definitive() ? definitive : windows)++;
        if (!w.allows(seen)) {
          if (wrong++ == 0) {
            std::lock_guard<std::mutex> l(mu);
            first_wrong = "page " + std::to_string(p) + " seen " + state_char(seen) +
                          " in window " + w.describe() + " (seq " + std::to_string(b.seq) + " -> " +
                          std::to_string(a.seq) + ")";
          }
        }
      }
    });
  std::mt19937_64 g(7);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  uint64_t conversions = 0;
  while (std::chrono::steady_clock::now() < until || conversions < 50) {
    const uint64_t first = g() % kPages;
    const uint64_t n = 1 + g() % (kPages - first);
    const PageState to = g() % 2 ? P : S;
    const bool ok = g() % 8 != 0;
    m.begin(first, n, to);
    for (uint64_t p = first; p < first + n; p++) {
      if (g() % 2) std::this_thread::yield();
      if (ok) truth[p].store(static_cast<int>(to));
    }
    if (g() % 2) std::this_thread::yield();
    m.end(first, n, ok);
    if (g() % 4 == 0) std::this_thread::yield();
    conversions++;
  }
  stop = true;
  for (auto& t : observers) t.join();
  EXPECT_EQ(wrong.load(), 0u) << first_wrong;
  EXPECT_GT(definitive.load(), 0u);
  EXPECT_GT(windows.load(), 0u) << "no observation overlapped a conversion: the test did not race";
  for (uint64_t p = 0; p < kPages; p++)
    EXPECT_EQ(static_cast<int>(m.state(p)), truth[p].load())
        << "the model ends where the kernel ends";
}

TEST(ConversionModelContent, WordClassification) {
  const uint64_t t3 = PageModel::tag(5, 3);
  EXPECT_EQ(classify_word(5, 0, 3), WordKind::Zero);
  EXPECT_EQ(classify_word(5, t3, 3), WordKind::Current);
  EXPECT_EQ(classify_word(5, PageModel::tag(5, 2), 3), WordKind::Older);
  EXPECT_EQ(classify_word(5, PageModel::tag(5, 4), 3), WordKind::Future);
  EXPECT_EQ(classify_word(5, PageModel::tag(5, 0), 3), WordKind::Future);
  EXPECT_EQ(classify_word(5, PageModel::tag(6, 3), 3), WordKind::Foreign);
  EXPECT_EQ(classify_word(5, 0xa5a5a5a5a5a5a5a5ull, 3), WordKind::Garbage);
  EXPECT_NE(describe_word(5, PageModel::tag(6, 3), 3).find("the pattern of page 6"),
            std::string::npos);
  EXPECT_NE(describe_word(5, PageModel::tag(5, 2), 3).find("stale data"), std::string::npos);
}

TEST(ConversionModelContent, ReadersSeeZeroOrTheirPageOnly) {
  EXPECT_TRUE(read_value_ok(5, 0, 3, false));
  EXPECT_TRUE(read_value_ok(5, PageModel::tag(5, 3), 3, false));
  EXPECT_TRUE(read_value_ok(5, PageModel::tag(5, 1), 3, false)) << "a read may race a newer write";
  EXPECT_FALSE(read_value_ok(5, PageModel::tag(5, 4), 3, false));
  EXPECT_FALSE(read_value_ok(5, PageModel::tag(4, 3), 3, false));
  EXPECT_FALSE(read_value_ok(5, 0x1234, 3, false));
  // While a punched range is published, only zeroes.
  EXPECT_TRUE(read_value_ok(5, 0, 3, true));
  EXPECT_FALSE(read_value_ok(5, PageModel::tag(5, 3), 3, true));
}

TEST(ConversionModelContent, ReadBackRules) {
  const uint64_t now = PageModel::tag(2, 9), older = PageModel::tag(2, 8);
  ReadbackRules exact, punched, converted;
  punched.punched = true;
  converted.conversion_may_change = true;
  EXPECT_TRUE(readback_ok(2, now, 9, exact));
  EXPECT_FALSE(readback_ok(2, 0, 9, exact)) << "a lost write";
  EXPECT_FALSE(readback_ok(2, older, 9, exact)) << "stale data";
  EXPECT_TRUE(readback_ok(2, 0, 9, punched));
  EXPECT_FALSE(readback_ok(2, older, 9, punched))
      << "a punch zeroes, it never brings back old data";
  EXPECT_TRUE(readback_ok(2, 0, 9, converted));
  EXPECT_TRUE(readback_ok(2, older, 9, converted));
  EXPECT_FALSE(readback_ok(2, PageModel::tag(3, 9), 9, converted)) << "never foreign data";
  EXPECT_FALSE(readback_ok(2, 0xdead, 9, converted)) << "never garbage";
}

TEST(ConversionModelContent, RoundTripRules) {
  const uint64_t v = PageModel::tag(1, 4), older = PageModel::tag(1, 3);
  RoundTripRules kept, kept_punched, not_kept;
  kept.contents_preserved = true;
  kept_punched.contents_preserved = true;
  kept_punched.punched = true;
  EXPECT_TRUE(round_trip_ok(v, v, kept));
  EXPECT_FALSE(round_trip_ok(v, 0, kept)) << "contents must be kept";
  EXPECT_TRUE(round_trip_ok(v, 0, kept_punched));
  EXPECT_TRUE(round_trip_ok(v, 0, not_kept));
  EXPECT_TRUE(round_trip_ok(v, v, not_kept));
  EXPECT_FALSE(round_trip_ok(v, older, not_kept)) << "an older generation is stale data";
  EXPECT_FALSE(round_trip_ok(v, older, kept_punched));
  EXPECT_TRUE(round_trip_ok(0, 0, kept));
}

// ---- the race against this kernel ----

// What one race of the harness did, with the failures finish() reported (intercepted).
struct HarnessRun {
  RaceSummary s;
  std::vector<std::string> failures;
  uint64_t conversions = 0, conversion_failures = 0, state_checks = 0, reads = 0, writes = 0,
           punches = 0, checked = 0, trips = 0, definitive_private = 0, definitive_shared = 0,
           window = 0, min_passes = 0;
  bool guest = false;
  // Whether a kept violation's text contains one of `needles`.
  bool kept_mentions(std::initializer_list<const char*> needles) const {
    for (const auto& v : s.kept)
      for (const char* n : needles)
        if (v.what.find(n) != std::string::npos) return true;
    return false;
  }
  std::string kept_text() const {
    std::string t;
    for (const auto& v : s.kept) t += "\n  " + v.describe();
    return t;
  }
};

HarnessRun run_harness_race(ConversionEnv& env, bool punch, bool preserved, uint64_t seed,
                            const std::string& inner_name,
                            std::optional<uint64_t> inject_stale_at = std::nullopt,
                            uint64_t iterations = 40) {
  RaceDefaults d;
  d.seed = seed;
  d.max_iterations = iterations;
  d.duration = std::chrono::seconds(60);
  HarnessRun out;
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter rep(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ALL_THREADS, &results);
    Race race(d, inner_name);
    if (inject_stale_at) race.inject_stale_at(*inject_stale_at);
    ConversionRaceOptions ro;
    ro.punch = punch;
    ro.contents_preserved = preserved;
    ConversionRaceDriver cr(race, env, ro);
    cr.run();
    out.s = race.finish();
    cr.record();
    const auto& st = cr.stats();
    out.conversions = st.conversions;
    out.conversion_failures = st.failures;
    out.state_checks = st.state_checks;
    out.reads = st.reads;
    out.writes = st.writes;
    out.punches = st.punches;
    out.checked = st.checked_punches;
    out.trips = st.round_trips;
    out.definitive_private = st.definitive_private;
    out.definitive_shared = st.definitive_shared;
    out.window = st.window_completed + st.window_sigbus;
    out.guest = cr.has_guest();
    out.min_passes = std::min(st.guest_passes[1], st.guest_passes[2]);
  }
  for (int i = 0; i < results.size(); i++)
    out.failures.push_back(results.GetTestPartResult(i).message());
  return out;
}

// The default platform's capabilities and an environment for `abi`; leaves env empty after a
// SKIP or a failure.
struct HarnessEnv {
  std::optional<Kvm> kvm;
  const VmTypeCaps* caps = nullptr;
  std::unique_ptr<ConversionEnv> env;
};
void make_harness_env(ConversionAbi abi, bool want_guest, HarnessEnv& h) {
  auto k = Kvm::open();
  if (!k) GTEST_SKIP() << testing::kCapabilityAbsent << k.error().message();
  h.kvm.emplace(std::move(k.value()));
  const Platform& p = default_platform();
  h.caps = cached_capabilities().vm(p.vm_type());
  if (!h.caps || h.caps->guest_memfd <= 0)
    GTEST_SKIP() << testing::kCapabilityAbsent << "KVM_CAP_GUEST_MEMFD on " << p.id();
  const bool guest = (want_guest && !payloads_unsupported(p)) || conversion_env_needs_guest(abi);
  make_conversion_env(h.env, *h.kvm, p, *h.caps, abi, ConversionRaceDriver::env_options(guest));
}

// (back-end, with the puncher: ConversionRace.VsPunch's race, or without: ConversionRace.VsFaults's
// race)
class ConversionRaceHarness : public ::testing::TestWithParam<std::tuple<ConversionAbi, bool>> {
 protected:
  ConversionAbi abi() const { return std::get<0>(GetParam()); }
  bool punch() const { return std::get<1>(GetParam()); }

  // An environment for abi() on this kernel (with the guest where payloads run), or SKIPs --
  // also when the kernel converts with abi(): the conformance races race it for real then.
  void SetUp() override {
    if (testing::stress_budget().given())
      GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
    make_harness_env(abi(), true, h_);
    if (IsSkipped()) return;
    ASSERT_TRUE(h_.env);
    for (ConversionAbi a : h_.caps->conversion.available)
      if (a == abi())
        GTEST_SKIP() << testing::kNotApplicable << default_platform().id() << " converts with "
                     << conversion_abi_name(a)
                     << " on this kernel, so the conformance races (ConversionRace.*) race it "
                        "for real";
  }
  HarnessEnv h_;
};

// The kernel refuses the back-end: everything but the conversions runs for real, and the refused
// conversions must be the only violations.
TEST_P(ConversionRaceHarness, RefusedConversionsAreTheOnlyViolations) {
  HarnessRun run = run_harness_race(*h_.env, punch(), false, 6006, "ConversionRaceInner.Refused");
  EXPECT_EQ(run.s.iterations, 40u);
  EXPECT_GT(run.conversions, 0u);
  EXPECT_EQ(run.conversion_failures, run.conversions) << "this kernel refuses every conversion";
  EXPECT_EQ(run.s.violations, run.conversion_failures)
      << "only the refused conversions may be violations; kept:" << run.kept_text();
  for (const auto& v : run.s.kept) {
    EXPECT_EQ(v.actor, "converter") << v.describe();
    EXPECT_NE(v.what.find(" failed: "), std::string::npos) << v.describe();
    EXPECT_EQ(v.seed, 6006u);
  }
  ASSERT_EQ(run.failures.size(), 1u) << "finish() fails the test once";
  EXPECT_NE(run.failures[0].find("replay: '"), std::string::npos) << run.failures[0];
  EXPECT_NE(run.failures[0].find("--gtest_filter='ConversionRaceInner.Refused' --cvm_seed=6006 "
                                 "--cvm_iterations="),
            std::string::npos)
      << run.failures[0];
  // Everything else ran for real.
  EXPECT_GT(run.state_checks, 0u);
  EXPECT_GT(run.reads, 0u);
  EXPECT_GT(run.writes, 0u);
  EXPECT_GT(run.trips, 0u)
      << "no round trip completed (a refused conversion leaves the range shared)";
  if (punch()) {
    EXPECT_GT(run.punches, 0u);
    // Per-VM, a checked punch starts by making the range private, which this kernel refuses.
    if (abi() != ConversionAbi::PerVmAttributes) {
      EXPECT_GT(run.checked, 0u) << "no checked punch completed";
    }
  } else {
    EXPECT_EQ(run.punches, 0u);
  }
  if (run.guest) {
    EXPECT_GT(run.min_passes, 0u) << "the punch_race guest made no pass";
  }
  RecordProperty("guest", run.guest ? "yes" : "no");
}

INSTANTIATE_TEST_SUITE_P(Backends, ConversionRaceHarness,
                         ::testing::Combine(::testing::Values(ConversionAbi::GmemAttributesIoctl,
                                                              ConversionAbi::PerVmAttributes),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<std::tuple<ConversionAbi, bool>>& i) {
                           return std::string(std::get<0>(i.param) == ConversionAbi::GmemAttributesIoctl
                                                  ? "GmemAttributesIoctl"
                                                  : "PerVmAttributes") +
                                  (std::get<1>(i.param) ? "_VsPunch" : "_VsFaults");
                         });

// ---- an emulated in-place back-end: the race with page states that really change ----

// Emulates in-place conversion on a kernel without it, for tests of the harness only (it is a
// test double, not a kernel): private page p is page p of the host mapping replaced (MAP_FIXED)
// by a mapping of a guest_memfd created without INIT_SHARED, on which every host access raises
// a real SIGBUS; shared page p is the guest_memfd's own page p mapped back. Contents are kept
// (the guest_memfd never sees the remaps). The flaws make broken back-ends that the race must
// catch. Host-side only: the environment has no guest.
enum class Flaw {
  None,
  SkipLastPage,     // to private: returns success but leaves the range's last page shared
  SpuriousEagain,   // every 5th call fails with EAGAIN, converting nothing
  ZeroOnShared,     // to shared: the page's contents are zeroed
  ForeignOnShared,  // to shared: maps the neighbouring page (p ^ 1) instead of page p
};

class RemapBackend final : public ConversionBackend {
 public:
  RemapBackend(uint8_t* base, int gmem_fd, GuestMemfd sigbus, Flaw f)
      : base_(base), gmem_fd_(gmem_fd), sigbus_(std::move(sigbus)), flaw_(f) {}
  ConversionAbi abi() const override { return ConversionAbi::GmemAttributesIoctl; }
  int issue(const ConversionRequest& r, uint64_t* raw_error_offset) const override {
    *raw_error_offset = kErrorOffsetUnset;
    const uint64_t ps = page_size();
    if (flaw_ == Flaw::SpuriousEagain && calls_.fetch_add(1) % 5 == 4) {
      *raw_error_offset = r.range.offset;
      return EAGAIN;
    }
    const uint64_t first = r.range.offset / ps, n = r.range.size / ps;
    for (uint64_t p = first; p < first + n; p++) {
      void* at = base_ + p * ps;
      void* m;
      if (r.to_private) {
        if (flaw_ == Flaw::SkipLastPage && p == first + n - 1) continue;
        m = ::mmap(at, ps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, sigbus_.fd(), 0);
      } else {
        uint64_t src = p;
        if (flaw_ == Flaw::ForeignOnShared) src = p ^ 1;
        if (flaw_ == Flaw::ZeroOnShared)
          (void)::fallocate(gmem_fd_, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                            static_cast<off_t>(p * ps), static_cast<off_t>(ps));
        m = ::mmap(at, ps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, gmem_fd_,
                   static_cast<off_t>(src * ps));
      }
      if (m == MAP_FAILED) return errno;
    }
    return 0;
  }
  std::string describe_request(const ConversionRequest& r) const override {
    return std::string("emulated conversion to ") + (r.to_private ? "private" : "shared") +
           "(offset=" + hex(r.range.offset) + ", size=" + hex(r.range.size) + ")";
  }

 private:
  uint8_t* base_;
  int gmem_fd_;
  GuestMemfd sigbus_;
  Flaw flaw_;
  mutable std::atomic<uint64_t> calls_{0};
};

struct EmulatedCase {
  const char* name;
  Flaw flaw;
  bool punch;
  bool preserved;             // the race's expectation: contents kept across conversion
  bool inject_stale = false;  // a stale value injected into the first zero check (iteration 0)
};

void PrintTo(const EmulatedCase& c, std::ostream* os) { *os << c.name; }

class EmulatedConversionRace : public ::testing::TestWithParam<EmulatedCase> {
 protected:
  // An in-place environment on this kernel with the emulated back-end, or SKIPs.
  void SetUp() override {
    if (testing::stress_budget().given())
      GTEST_SKIP() << "not applicable: a stress budget was given on the command line";
    // Host-only: KVM on some hosts (PVM) reaches guest_memfd memslots through their host
    // mapping too, which the emulation remaps, so a guest would see the emulation, not memory.
    make_harness_env(ConversionAbi::GmemAttributesIoctl, false, h_);
    if (IsSkipped()) return;
    ASSERT_TRUE(h_.env);
    auto sig = h_.env->vm().create_guest_memfd(page_size(), uapi::kGmemFlagMmap);
    ASSERT_TRUE(sig.ok())
        << testing::harness_error("creating the SIGBUS guest_memfd", sig.error());
    // The emulation's "private" page must really raise SIGBUS on this kernel.
    auto m = sig->map(page_size());
    ASSERT_TRUE(m.ok()) << testing::harness_error("mapping the SIGBUS guest_memfd", m.error());
    FaultResult f = probe_read(m->data());
    if (!f.sigbus())
      GTEST_SKIP()
          << testing::kCapabilityAbsent
          << "a guest_memfd without INIT_SHARED does not raise SIGBUS on host access here ("
          << f.describe() << "): nothing to emulate private pages with";
    h_.env->replace_backend_for_harness_test(std::make_unique<RemapBackend>(
        h_.env->shared_hva(0), h_.env->gmem().fd(), std::move(sig.value()), GetParam().flaw));
  }
  HarnessEnv h_;
};

TEST_P(EmulatedConversionRace, Run) {
  const EmulatedCase& c = GetParam();
  // Clean runs race long enough (a few hundred ms) that readers surely meet private pages.
  const bool clean = c.flaw == Flaw::None || (c.flaw == Flaw::ZeroOnShared && !c.preserved);
  const uint64_t iterations = clean && !c.inject_stale ? 400 : 40;
  HarnessRun run = run_harness_race(
      *h_.env, c.punch, c.preserved, 7007, std::string("EmulatedConversionRaceInner.") + c.name,
      c.inject_stale ? std::optional<uint64_t>(0) : std::nullopt, iterations);
  if (c.inject_stale) {
    // The checker of a punch while converting (iteration 0 always makes one) sees the stale
    // value and reports it with seed and iteration, and nothing else is wrong.
    ASSERT_TRUE(run.s.injected_stale_at.has_value()) << "the stale value was never injected";
    EXPECT_EQ(*run.s.injected_stale_at, 0u);
    EXPECT_EQ(run.s.violations, 1u) << run.kept_text();
    ASSERT_EQ(run.s.kept.size(), 1u);
    EXPECT_EQ(run.s.kept[0].iteration, 0u);
    EXPECT_EQ(run.s.kept[0].actor, "converter");
    EXPECT_NE(run.s.kept[0].what.find("after it was punched while converting"), std::string::npos)
        << run.s.kept[0].what;
    EXPECT_NE(run.s.kept[0].what.find("(expected 0: stale data)"), std::string::npos)
        << run.s.kept[0].what;
    ASSERT_EQ(run.failures.size(), 1u);
    EXPECT_NE(run.failures[0].find("seed 7007, iteration 0, converter: page "), std::string::npos)
        << run.failures[0];
    EXPECT_NE(run.failures[0].find("--cvm_seed=7007 --cvm_iterations=1"), std::string::npos)
        << run.failures[0];
    return;
  }
  EXPECT_GT(run.conversions, 0u);
  EXPECT_GT(run.state_checks, 0u);
  if (clean) {
    EXPECT_EQ(run.s.iterations, iterations);
    // A correct back-end (or contents that may be zeroed, when nobody promised to keep them):
    // the race must find nothing, and must have seen both states for sure and the window.
    EXPECT_EQ(run.s.violations, 0u) << run.kept_text();
    EXPECT_TRUE(run.failures.empty()) << (run.failures.empty() ? "" : run.failures[0]);
    EXPECT_GT(run.definitive_private, 0u) << "no access hit a page that was surely private";
    EXPECT_GT(run.definitive_shared, 0u);
    EXPECT_GT(run.trips, 0u);
    if (c.punch) {
      EXPECT_GT(run.checked, 0u) << "no range was punched while converting";
    }
    return;
  }
  // A broken back-end: caught, with what was wrong.
  EXPECT_GT(run.s.violations, 0u) << "the race did not notice a broken back-end";
  ASSERT_EQ(run.failures.size(), 1u);
  EXPECT_NE(run.failures[0].find("--cvm_seed=7007"), std::string::npos) << run.failures[0];
  switch (c.flaw) {
    case Flaw::SkipLastPage:
      EXPECT_TRUE(run.kept_mentions({"but it was last set private",
                                     "completed without SIGBUS although the page was private"}))
          << run.kept_text();
      break;
    case Flaw::SpuriousEagain:
      EXPECT_TRUE(run.kept_mentions({"EAGAIN although this race holds no pin"})) << run.kept_text();
      break;
    case Flaw::ZeroOnShared:
      EXPECT_TRUE(run.kept_mentions({"before a round trip through private", "a lost write"}))
          << run.kept_text();
      break;
    case Flaw::ForeignOnShared:
      EXPECT_TRUE(run.kept_mentions({"foreign data", "not vCPU"})) << run.kept_text();
      break;
    case Flaw::None:
      break;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Backends, EmulatedConversionRace,
    ::testing::Values(EmulatedCase{"CorrectVsPunch", Flaw::None, true, true},
                      EmulatedCase{"CorrectVsFaults", Flaw::None, false, true},
                      EmulatedCase{"ZeroingAllowedVsPunch", Flaw::ZeroOnShared, true, false},
                      EmulatedCase{"SkipsAPageIsCaught", Flaw::SkipLastPage, false, true},
                      EmulatedCase{"SpuriousEagainIsCaught", Flaw::SpuriousEagain, false, true},
                      EmulatedCase{"ZeroingWhenKeptIsCaught", Flaw::ZeroOnShared, false, true},
                      EmulatedCase{"ForeignPageIsCaught", Flaw::ForeignOnShared, false, true},
                      EmulatedCase{"InjectedStaleValueIsCaught", Flaw::None, true, true, true}),
    [](const ::testing::TestParamInfo<EmulatedCase>& i) { return std::string(i.param.name); });

}  // namespace
}  // namespace cvm::suites

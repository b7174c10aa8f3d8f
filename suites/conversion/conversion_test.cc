// Conversion semantics (seeds 000, 002, 004): initial state, per-page indexing, conversion before
// and partly after allocation, hole punching, remote zap on to-private, lazy faults after
// to-shared, contents across conversion (recorded), guest access, conversion while vCPUs fault,
// and the memory-fault exit behind implicit conversion.
// Requirements: CONV-001 .. CONV-009, CONV-011 (suites/requirements.yaml).
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <iostream>
#include <random>
#include <thread>

#include "conversion_fixture.h"
#include "race.h"
#include "cvmconf/fault.h"
#include "cvmconf/uapi.h"

namespace cvm::suites {
namespace {

using namespace std::chrono_literals;

class Conversion : public ConversionTest {};

class ConversionGuest : public ConversionTest {
 protected:
  void SetUp() override {
    ConversionTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CVM_SKIP_IF(payloads_unsupported());
  }
};

// How a page's bytes compare with candidates: "preserved" / "zeroed" / "other (first byte 0x..)".
std::string classify(const std::string& check_preserved, const std::string& check_zero,
                     const std::string& other) {
  if (check_preserved.empty()) return "preserved";
  if (check_zero.empty()) return "zeroed";
  return "other (" + other + ")";
}

CVM_TEST_P(Conversion, InitialState, "CONV-001") {
  for (bool init_shared : {true, false}) {
    SCOPED_TRACE(init_shared ? "file created to start shared" : "file created to start private");
    const ConversionEnvOptions o{.pages = 2,
                                 .init_shared = init_shared,
                                 .raw_initial_state = true,
                                 .guest = payloads_ok()};
    CVM_SKIP_IF(env_unsupported(o));
    CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
    const bool shared = conversion_initially_shared(abi(), init_shared);
    EXPECT_EQ(env->states(), shared ? "SS" : "PP") << env->describe();
    if (!env->cmd()) continue;
    // The guest uses the pages in that state: shared pages are the host's, private ones only its.
    if (shared) {
      EXPECT_EQ(env->host_fill(0, 0x11), "");
      EXPECT_EQ(env->guest_check(0, 0x11), "") << "a shared page shows the host's data to the guest";
      EXPECT_EQ(env->guest_fill(1, 0x22), "");
      EXPECT_EQ(env->host_check(1, 0x22), "") << "and the guest's data to the host";
    } else {
      EXPECT_EQ(env->guest_fill(0, 0x33), "");
      EXPECT_EQ(env->guest_check(0, 0x33), "") << "the guest uses a private page";
      EXPECT_EQ(env->states(), "PP") << "guest use leaves the pages private";
    }
  }
  if (abi() == ConversionAbi::PerVmAttributes)
    RecordProperty("observation",
                   "per-vm-attributes: attributes start shared whatever the guest_memfd's flags; "
                   "the file only backs private pages");
}

CVM_TEST_P(Conversion, OnePageLeavesNeighbours, "CONV-002") {
  const ConversionEnvOptions o{.pages = 4};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  for (uint64_t i = 0; i < 4; i++) ASSERT_EQ(env->host_fill(i, static_cast<uint8_t>(0x10 + i)), "");
  // Highest index first, as the v8 selftest does, so off-by-one indexing shows.
  for (int t = 3; t >= 0; t--) {
    const uint64_t tp = static_cast<uint64_t>(t);
    SCOPED_TRACE("converting page " + std::to_string(t));
    ASSERT_TRUE(ok(env->to_private(tp)));
    std::string want = "SSSS";
    want[tp] = 'P';
    EXPECT_EQ(env->states(), want);
    for (uint64_t i = 0; i < 4; i++)
      if (i != tp) {
        EXPECT_EQ(env->host_check(i, static_cast<uint8_t>(0x10 + i)), "") << "neighbour " << i;
      }
    ASSERT_TRUE(ok(env->to_shared(tp)));
    EXPECT_EQ(env->states(), "SSSS");
    for (uint64_t i = 0; i < 4; i++)
      if (i != tp) {
        EXPECT_EQ(env->host_check(i, static_cast<uint8_t>(0x10 + i)), "") << "neighbour " << i;
      }
    // The converted page's own contents are CONV-008's subject; rewrite them for the next round.
    ASSERT_EQ(env->host_fill(tp, static_cast<uint8_t>(0x10 + tp)), "");
  }
}

CVM_TEST_P(Conversion, BeforeAllocation, "CONV-003") {
  const uint64_t ps = page_size();
  {
    SCOPED_TRACE("never-touched shared page to private and back");
    const ConversionEnvOptions o{.pages = 2};
    CVM_SKIP_IF(env_unsupported(o));
    CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
    ASSERT_TRUE(ok(env->to_private(0)));
    EXPECT_EQ(env->states(), "PS");
    // Allocating the page after the conversion gives it the converted state.
    ASSERT_TRUE(ok(env->gmem().allocate(0, ps)));
    EXPECT_EQ(env->states(), "PS") << "a page allocated after conversion is private";
    ASSERT_TRUE(ok(env->to_shared(0)));
    EXPECT_EQ(env->states(), "SS");
    EXPECT_EQ(env->host_check(0, 0), "") << "a page never written reads zero";
  }
  {
    SCOPED_TRACE("never-touched private page to shared");
    const ConversionEnvOptions o{.pages = 2, .init_shared = false};
    CVM_SKIP_IF(env_unsupported(o));
    CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
    ASSERT_TRUE(ok(env->to_shared(0)));
    EXPECT_EQ(env->states(), "SP");
    EXPECT_EQ(env->host_check(0, 0), "") << "a page never written reads zero";
    ASSERT_TRUE(ok(env->gmem().allocate(ps, ps)));
    EXPECT_EQ(env->states(), "SP") << "allocating the private page does not share it";
  }
}

CVM_TEST_P(Conversion, PartlyAllocated, "CONV-003") {
  const ConversionEnvOptions o{.pages = 8};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  ASSERT_EQ(env->host_fill(1, 'A'), "");
  ASSERT_EQ(env->host_fill(4, 'A'), "");
  ASSERT_TRUE(ok(env->to_private(0, 8)));
  EXPECT_EQ(env->states(), "PPPPPPPP");
  std::string touched;
  for (uint64_t p = 0; p < 8; p++) {
    SCOPED_TRACE("page " + std::to_string(p));
    ASSERT_TRUE(ok(env->to_shared(p)));
    CVM_ASSIGN_OR_FAIL(const PageState st, env->state(p));
    EXPECT_EQ(st, PageState::Shared);
    if (p == 1 || p == 4) {
      touched += (touched.empty() ? "" : ", ") + std::string("page ") + std::to_string(p) + ": " +
                 classify(env->host_check(p, 'A'), env->host_check(p, 0), env->host_check(p, 'A'));
    } else {
      EXPECT_EQ(env->host_check(p, 0), "") << "a page that was never allocated reads zero";
    }
  }
  EXPECT_EQ(env->states(), "SSSSSSSS");
  RecordProperty("observation", std::string(conversion_abi_name(abi())) + " on " + platform().id() +
                                    ": allocated pages after shared->private->shared: " + touched);
  if (preserves_content()) {
    EXPECT_EQ(touched, "page 1: preserved, page 4: preserved");
  }
}

CVM_TEST_P(Conversion, PunchHoleKeepsState, "CONV-004") {
  const uint64_t ps = page_size();
  const ConversionEnvOptions o{.pages = 2, .guest = payloads_ok()};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  ASSERT_EQ(env->host_fill(0, 0x77), "");
  ASSERT_EQ(env->host_fill(1, 0x78), "");
  ASSERT_TRUE(ok(env->gmem().punch_hole(0, ps)));
  EXPECT_EQ(env->states(), "SS") << "punching a shared page keeps it shared";
  if (env->in_place()) {
    EXPECT_EQ(env->host_check(0, 0), "") << "and it reads zero";
  }
  EXPECT_EQ(env->host_check(1, 0x78), "") << "the neighbour keeps its data";
  ASSERT_TRUE(ok(env->to_private(0)));
  if (env->cmd()) {
    ASSERT_EQ(env->guest_fill(0, 0x99), "");
  }
  ASSERT_TRUE(ok(env->gmem().punch_hole(0, ps)));
  EXPECT_EQ(env->states(), "PS") << "punching a private page keeps it private";
  if (env->cmd()) {
    EXPECT_EQ(env->guest_check(0, 0), "") << "and the guest reads zero from it";
  }
  ASSERT_TRUE(ok(env->to_shared(0)));
  EXPECT_EQ(env->states(), "SS");
  if (env->in_place() && !env->cmd()) {
    EXPECT_EQ(env->host_check(0, 0), "") << "nothing wrote it since the punch";
  }
}

// Sends one byte over a pipe; waits for one (with a deadline).
bool send_byte(int fd, char c) { return write(fd, &c, 1) == 1; }
bool wait_byte(int fd, char want, int ms) {
  pollfd pf{fd, POLLIN, 0};
  char c = 0;
  return poll(&pf, 1, ms) == 1 && read(fd, &c, 1) == 1 && c == want;
}

CVM_TEST_P(Conversion, ToPrivateZapsHostMappings, "CONV-005") {
  if (!in_place())
    GTEST_SKIP() << testing::kNotApplicable
                 << "the per-vm-attributes back-end keeps shared memory outside guest_memfd, so "
                    "conversion to private unmaps nothing from the host (api.rst 4.141)";
  const size_t ps = page_size();
  const ConversionEnvOptions o{.pages = 2};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  ASSERT_EQ(env->host_fill(0, 0x5a), "");
  ASSERT_EQ(env->host_fill(1, 0x5b), "");
  CVM_ASSIGN_OR_FAIL(const bool before, pte_present(env->shared_hva(0)));
  EXPECT_TRUE(before) << "the written page is mapped in this process";

  int to_child[2], from_child[2];
  ASSERT_EQ(pipe2(to_child, O_CLOEXEC), 0);
  ASSERT_EQ(pipe2(from_child, O_CLOEXEC), 0);
  const int fd = env->gmem().fd();
  // Another process maps the same file and faults the page in before the conversion.
  auto child = ChildProcess::spawn([&](const ChildReport& rep) -> int {
    void* p = mmap(nullptr, 2 * ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return rep.write(std::string("mmap: ") + strerror(errno)), 10;
    auto* c = static_cast<volatile uint8_t*>(p);
    if (c[0] != 0x5a || c[ps] != 0x5b) return rep.write("the child does not see the data"), 11;
    c[1] = 0x5a;  // a write fault too
    if (!send_byte(from_child[1], 'r') || !wait_byte(to_child[0], 'g', 20000)) return 12;
    if (c[ps] != 0x5b) return rep.write("the still-shared page changed"), 13;
    rep.write("reading the converted page");
    (void)c[0];  // must raise SIGBUS (default action: the child dies)
    rep.write(": no SIGBUS");
    return 14;
  });
  const bool ready = wait_byte(from_child[0], 'r', 20000);
  EXPECT_TRUE(ready) << "the child never mapped the page";
  if (ready) {
    ASSERT_TRUE(ok(env->to_private(0)));
    CVM_ASSIGN_OR_FAIL(const bool after, pte_present(env->shared_hva(0)));
    EXPECT_FALSE(after) << "conversion to private must tear down this process's mapping";
    FaultResult r = probe_read(env->shared_hva(0));
    EXPECT_TRUE(r.sigbus()) << "host read of the private page: " << r.describe();
    FaultResult w = probe_write(env->shared_hva(0), 1);
    EXPECT_TRUE(w.sigbus()) << "host write of the private page: " << w.describe();
    EXPECT_EQ(env->host_check(1, 0x5b), "") << "the other page stays accessible";
    send_byte(to_child[1], 'g');
  }
  ChildOutcome out = child.wait(std::chrono::seconds(20));
  for (int f : {to_child[0], to_child[1], from_child[0], from_child[1]}) close(f);
  EXPECT_TRUE(out.killed_by(SIGBUS)) << "the other process must get SIGBUS on the converted page: "
                                     << out.describe() << ": " << out.output;
}

CVM_TEST_P(Conversion, ToSharedIsLazilyAccessible, "CONV-007") {
  if (!in_place())
    GTEST_SKIP() << testing::kNotApplicable
                 << "the per-vm-attributes back-end never unmaps the host's separate shared "
                    "memory, so there is nothing to fault back in (api.rst 4.141)";
  const ConversionEnvOptions o{.pages = 2, .init_shared = false};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  EXPECT_EQ(env->states(), "PP");
  ASSERT_TRUE(ok(env->to_shared(0)));
  CVM_ASSIGN_OR_FAIL(const bool eager, pte_present(env->shared_hva(0)));
  EXPECT_FALSE(eager) << "conversion to shared must not map the page into the host eagerly";
  EXPECT_EQ(env->host_fill(0, 0x42), "") << "the host can write the page again";
  EXPECT_EQ(env->host_check(0, 0x42), "") << "and read it";
  CVM_ASSIGN_OR_FAIL(const bool lazy, pte_present(env->shared_hva(0)));
  EXPECT_TRUE(lazy) << "the access faulted the page in";
  CVM_ASSIGN_OR_FAIL(const PageState other, env->state(1));
  EXPECT_EQ(other, PageState::Private) << "the other page is still private";
}

CVM_TEST_P(Conversion, ContentAcrossConversionRecorded, "CONV-008") {
  const ConversionEnvOptions o{.pages = 1, .guest = payloads_ok()};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  ASSERT_EQ(env->host_fill(0, 0xab), "");
  if (env->cmd()) {
    ASSERT_EQ(env->guest_check(0, 0xab), "") << "shared: the guest sees the host's data";
  }
  ASSERT_TRUE(ok(env->to_private(0)));
  std::string to_private = "not observed (no guest)";
  if (env->cmd()) {
    to_private = classify(env->guest_check(0, 0xab), env->guest_check(0, 0), env->guest_check(0, 0xab));
    ASSERT_EQ(env->guest_fill(0, 0xcd), "");
  }
  ASSERT_TRUE(ok(env->to_shared(0)));
  const uint8_t last = env->cmd() ? 0xcd : 0xab;  // the last value written to the page
  std::string to_shared = classify(env->host_check(0, last), env->host_check(0, 0), env->host_check(0, last));
  if (!env->in_place() && env->host_check(0, 0xab).empty())
    to_shared = "the host's separate shared copy, untouched (0xab)";
  const std::string obs = std::string(conversion_abi_name(abi())) + " on " + platform().id() +
                          ": shared->private, guest sees the host's data: " + to_private +
                          "; private->shared, host sees the last data written: " + to_shared;
  RecordProperty("observation", obs);
  std::cout << "[ OBSERVED ] " << obs << std::endl;
  if (preserves_content()) {
    if (env->cmd()) {
      EXPECT_EQ(to_private, "preserved");
    }
    EXPECT_EQ(to_shared, "preserved") << "in-place SW_PROTECTED conversion keeps contents";
  }
}

CVM_TEST_P(ConversionGuest, GuestAccessAfterConversion, "CONV-006") {
  const ConversionEnvOptions o{.pages = 2, .guest = true};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  ASSERT_EQ(env->guest_fill(0, 0x11), "");
  EXPECT_EQ(env->host_check(0, 0x11), "") << "shared: the host sees the guest's write";
  ASSERT_TRUE(ok(env->to_private(0)));
  EXPECT_EQ(env->guest_fill(0, 0x22), "") << "the guest writes the private page";
  EXPECT_EQ(env->guest_check(0, 0x22), "") << "and reads it back";
  if (env->in_place()) {
    FaultResult r = probe_read(env->shared_hva(0));
    EXPECT_TRUE(r.sigbus()) << "the host cannot read it: " << r.describe();
  } else {
    EXPECT_EQ(env->host_check(0, 0x11), "") << "the host's shared copy never sees private data";
  }
  ASSERT_TRUE(ok(env->to_shared(0)));
  EXPECT_EQ(env->guest_fill(0, 0x33), "") << "the guest writes the page shared again";
  EXPECT_EQ(env->guest_check(0, 0x33), "");
  EXPECT_EQ(env->host_check(0, 0x33), "") << "and the host sees it";
  ASSERT_EQ(env->host_fill(0, 0x44), "");
  EXPECT_EQ(env->guest_check(0, 0x44), "") << "the guest sees the host's write";
  EXPECT_EQ(env->guest_fill(1, 0x55), "");
  EXPECT_EQ(env->host_check(1, 0x55), "") << "the neighbour was shared throughout";
}

CVM_TEST_P(ConversionGuest, WhileVcpusFault, "CONV-009") {
  constexpr int kWorkers = 2;
  constexpr uint64_t kPages = 16;
  const uint64_t stop_gpa = CVM_SCRATCH_GPA + 0x800;
  auto count_gpa = [&](int w) { return CVM_SCRATCH_GPA + 0x808 + 8 * static_cast<uint64_t>(w); };
  // One second of conversions unless the stress budget says otherwise (race.h).
  RaceDefaults budget;
  budget.duration = 1000ms;
  // The vCPUs' watchdog outlasts the longest the race may run.
  const auto watchdog =
      std::max({budget.duration, budget.iteration_time_cap, testing::stress_budget().duration}) + 60s;
  const ConversionEnvOptions o{.pages = kPages, .guest = true, .vcpus = 1 + kWorkers};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  GuestVm& g = *env->guest();
  // A conversion racing a fault may make KVM_RUN exit with KVM_EXIT_MEMORY_FAULT: re-entered.
  auto memory_fault_exits = std::make_shared<std::atomic<uint64_t>>(0);
  reenter_conversion_memory_faults(g, env->gpa(0), env->gpa(0) + kPages * page_size(),
                                   memory_fault_exits);
  auto word = [&](uint64_t gpa) { return reinterpret_cast<volatile uint64_t*>(g.boot_hva(gpa)); };
  *word(stop_gpa) = 0;
  std::vector<std::thread> threads;
  std::vector<UcallEvent> ends(kWorkers + 1);
  for (int w = 1; w <= kWorkers; w++) {
    *word(count_gpa(w)) = 0;
    auto started = g.start(w, "touch_until_stopped",
                           {env->gpa(0), kPages * page_size(), stop_gpa, count_gpa(w)});
    ASSERT_TRUE(started.ok()) << testing::harness_error("starting vCPU " + std::to_string(w), started);
  }
  for (int w = 1; w <= kWorkers; w++)
    threads.emplace_back([&, w] { ends[static_cast<size_t>(w)] = g.run(w, watchdog); });
  auto started = std::chrono::steady_clock::now();
  while ((*word(count_gpa(1)) == 0 || *word(count_gpa(2)) == 0) &&
         std::chrono::steady_clock::now() - started < 10s)
    std::this_thread::sleep_for(1ms);

  // The test thread converts seeded ranges while the vCPUs fault the pages; every conversion
  // must succeed (a failure is a violation, reported with the seed and the replay command).
  Race race(budget);
  std::mt19937_64 rng = race.rng(0);
  std::vector<bool> priv(kPages, false);
  while (race.next_iteration()) {
    const uint64_t first = Race::pick(rng, 0, kPages - 1);
    const uint64_t n = std::min<uint64_t>(Race::pick(rng, 1, 4), kPages - first);
    const bool to_private = !priv[first];
    ConversionResult r = to_private ? env->to_private(first, n) : env->to_shared(first, n);
    race.ops();
    if (!r.ok()) {
      race.violation(race.iteration(), "converter",
                     std::string(to_private ? "to private" : "to shared") + " of pages " +
                         std::to_string(first) + ".." + std::to_string(first + n - 1) +
                         " failed while vCPUs faulted the pages: " + r.describe());
      continue;
    }
    for (uint64_t p = first; p < first + n; p++) priv[p] = to_private;
  }
  *word(stop_gpa) = 1;
  for (auto& t : threads) t.join();
  g.set_exit_handler(nullptr);
  const RaceSummary summary = race.finish();  // fails the test when a conversion failed
  RecordProperty("conversions", std::to_string(summary.iterations));
  RecordProperty("memory_fault_exits_reentered", std::to_string(memory_fault_exits->load()));
  EXPECT_GT(summary.iterations, 0u);
  for (int w = 1; w <= kWorkers; w++) {
    SCOPED_TRACE("vCPU " + std::to_string(w));
    const UcallEvent& ev = ends[static_cast<size_t>(w)];
    CVM_EXPECT_SYNC(ev, 1);
    EXPECT_GT(ev.args.size() > 1 ? ev.args[1] : 0, 0u) << "the vCPU made no progress";
  }
  ASSERT_TRUE(ok(env->to_shared(0, kPages)));
  EXPECT_EQ(env->states(), std::string(kPages, 'S'));
}

CVM_TEST_P(ConversionGuest, ImplicitConversionViaMemoryFault, "CONV-011") {
  if (abi() != ConversionAbi::PerVmAttributes)
    GTEST_SKIP() << testing::kNotApplicable << "with " << conversion_abi_name(abi()) << " on "
                 << platform().id()
                 << " a guest access always takes the page's own state (it lives in "
                    "guest_memfd), so no access kind can mismatch; SNP/TDX guests, whose accesses "
                    "carry a private/shared bit, cannot be booted by cvmconf yet";
  const uint64_t ps = page_size();
  std::vector<ExitInfo> faults;           // outlive the environment (its exit handler uses them)
  std::vector<ConversionResult> fixes;
  const ConversionEnvOptions o{.pages = 1, .guest = true};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  // A memslot of ordinary memory: it can back shared accesses only.
  const uint64_t gpa = CVM_TEST_MEM_GPA + 0x40000000;
  CVM_ASSIGN_OR_FAIL(auto mem, Mapping::map(ps, PROT_READ | PROT_WRITE,
                                            MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  std::memset(mem.data(), 0x42, ps);
  MemslotSpec s;
  s.slot = 9;
  s.gpa = gpa;
  s.size = ps;
  s.hva = reinterpret_cast<uint64_t>(mem.data());
  ASSERT_TRUE(ok(env->vm().set_memslot(s)));
  // The page is private by attribute: the guest's access is private and mismatches the slot.
  ASSERT_TRUE(ok(env->apply({GmemRange{-1, 0, ps, gpa}, true})));
  env->guest()->set_exit_handler([&](int, Vcpu&, const ExitInfo& e) {
    auto req = decode_memory_fault(e);
    if (!req || !faults.empty()) return false;
    faults.push_back(e);
    // Implicit conversion: make the range what the memory behind it can serve (shared).
    fixes.push_back(env->apply({GmemRange{-1, 0, req->size, req->gpa}, false}));
    return fixes.back().ok();
  });
  GuestCmd::Outcome r = env->cmd()->read8(gpa + 5);
  ASSERT_EQ(faults.size(), 1u) << "expected exactly one KVM_EXIT_MEMORY_FAULT; guest: "
                               << (r.ok ? "completed" : r.event.describe());
  const ExitInfo& f = faults[0];
  EXPECT_EQ(f.memory_fault.flags & uapi::kMemoryExitFlagPrivate, uapi::kMemoryExitFlagPrivate)
      << "the access was private: " << f.describe();
  EXPECT_EQ(f.memory_fault.gpa, gpa) << f.describe();
  EXPECT_EQ(f.memory_fault.size, ps) << f.describe();
  ASSERT_EQ(fixes.size(), 1u);
  EXPECT_TRUE(fixes[0].ok()) << fixes[0].describe();
  ASSERT_TRUE(r.ok) << "after the host converted the page the access must complete: "
                    << r.event.describe();
  EXPECT_EQ(r.value, 0x42u) << "and read the shared memory";
  env->guest()->set_exit_handler(nullptr);
  RecordProperty("observation", "memory fault exit: " + f.describe());
}

CVM_INSTANTIATE_FOR_PLATFORMS(Conversion);
CVM_INSTANTIATE_FOR_PLATFORMS(ConversionGuest);

}  // namespace
}  // namespace cvm::suites

// Undo on failure (seed 003): after a failed conversion -- a pinned page in the middle or at the
// end of the range, a range spanning two memslots, invalid requests, allocation failures
// injected mid-conversion -- every page keeps its state, shared pages keep their data and stay
// usable from the host and the guest, a retry after removing the cause succeeds, and the kernel
// logs no WARN/BUG (the kernel-log listener fails the test on a splat).
// Requirements: UNDO-001 .. UNDO-006 (suites/requirements.yaml).
#include <sys/mman.h>

#include "conversion_fixture.h"
#include "cvmconf/uapi.h"
#include "fault_injection.h"

namespace cvm::suites {
namespace {

// The tests that start from a failed conversion of 8 pages to private: page `private_page` is
// private, every other page i is shared and holds 0x20 + i, and converting [0, 8) failed.
// In-place back-ends fail it because the host pinned `pinned_page` (the conversion refuses to
// drop a page someone holds a reference to); the per-VM back-end has no such check, so these
// tests do not apply to it -- except the guest test, which fails it with an unknown attribute.
struct FailedConversionCase {
  const char* test;
  uint64_t private_page;
  uint64_t pinned_page;
  int slots = 1;
  bool guest = false;           // with the payload guest (when payloads run here)
  bool per_vm_invalid = false;  // per-VM back-end: fail the conversion with an unknown attribute
};

constexpr FailedConversionCase kFailedConversions[] = {
    {"PinnedPageMidRangeStateUnchanged", 5, 3},
    {"PinnedPageAtEndStateUnchanged", 2, 7},
    {"FailedConversionSharedDataIntact", 5, 3},
    {"FailedConversionRetrySucceeds", 5, 3},
    {"SpanningTwoMemslotsStateUnchanged", 1, 6, 2, true},  // page 6 is in the second memslot
    {"GuestRunsAfterFailedConversion", 5, 3, 1, true, true},
};

// The running test's entry of kFailedConversions, or nullptr.
const FailedConversionCase* failed_conversion_case() {
  std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  name = name.substr(0, name.find('/'));  // "Test/platform" -> "Test"
  for (const FailedConversionCase& c : kFailedConversions)
    if (name == c.test) return &c;
  return nullptr;
}

class Undo : public ConversionTest {
 protected:
  void SetUp() override {
    ConversionTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    ASSERT_EQ(unknown_case_names(), "") << testing::harness_error(
        "the Undo case table", "it names tests this suite does not have (renamed?)");
    fail_conversion();
  }

  // Names in kFailedConversions that no test of this binary has: a renamed test would
  // otherwise run without its prepared situation.
  static std::string unknown_case_names() {
    const ::testing::UnitTest* all = ::testing::UnitTest::GetInstance();
    std::string unknown;
    for (const FailedConversionCase& c : kFailedConversions) {
      bool found = false;
      for (int s = 0; s < all->total_test_suite_count() && !found; s++) {
        const ::testing::TestSuite* suite = all->GetTestSuite(s);
        for (int i = 0; i < suite->total_test_count() && !found; i++) {
          std::string name = suite->GetTestInfo(i)->name();
          found = name.substr(0, name.find('/')) == c.test;
        }
      }
      if (!found) unknown += std::string(unknown.empty() ? "" : " ") + c.test;
    }
    return unknown;
  }

  // Pins are the failure cause for in-place back-ends only.
  std::optional<std::string> pins_cannot_fail_conversion() const {
    if (in_place()) return std::nullopt;
    return std::string(testing::kNotApplicable) +
           "a pin cannot make a per-vm-attributes conversion fail (shared memory is separate "
           "host memory and there is no reference-count check); Undo.InvalidRequest* and "
           "UndoInjection.InjectedAllocationFailure cover this back-end";
  }

  // For a test of kFailedConversions (others have nothing to prepare): builds its situation in
  // env_, pin_ and failed_ (the result of the failed conversion), or SKIPs.
  void fail_conversion() {
    case_ = failed_conversion_case();
    if (!case_) return;
    if (!case_->per_vm_invalid) CVM_SKIP_IF(pins_cannot_fail_conversion());
    const ConversionEnvOptions o{
        .pages = 8, .guest = case_->guest && payloads_ok(), .slots = case_->slots};
    CVM_SKIP_IF(env_unsupported(o));
    CVM_ASSIGN_OR_FAIL(env_, new_env(o));
    for (uint64_t i = 0; i < 8; i++)
      ASSERT_EQ(env_->host_fill(i, static_cast<uint8_t>(0x20 + i)), "") << "page " << i;
    ASSERT_TRUE(ok(env_->to_private(case_->private_page)));
    if (!in_place()) {
      ConversionRequest bad{env_->range(0, 8), true};
      bad.extra_attributes = 1ULL << 5;
      failed_ = env_->apply(bad);
      return;
    }
    std::string why, provider;
    pin_ = pin_page_any(*env_, case_->pinned_page, &why, &provider);
    if (!pin_) GTEST_SKIP() << why;
    RecordProperty("pin_provider", provider);
    failed_ = env_->to_private(0, 8);
  }

  // The states before the failed conversion: page `private_page` private, the others shared.
  std::string states_before() const {
    std::string s(8, 'S');
    s[case_->private_page] = 'P';
    return s;
  }

  // Every shared page of env still holds 0x20 + i (host view).
  static void expect_shared_data(ConversionEnv& env, uint64_t private_page) {
    for (uint64_t i = 0; i < env.pages(); i++) {
      if (i != private_page) {
        EXPECT_EQ(env.host_check(i, static_cast<uint8_t>(0x20 + i)), "") << "page " << i;
      }
    }
  }

  const FailedConversionCase* case_ = nullptr;
  std::unique_ptr<ConversionEnv> env_;
  std::unique_ptr<Pin> pin_;  // released before env_ is destroyed
  ConversionResult failed_;
};

// Conversions failed by fault injection: a skip for want of a back-end also names what the
// injection lacks.
class UndoInjection : public Undo {
 protected:
  std::optional<std::string> also_missing() const override {
    return ThreadFaultInjection::unavailable();
  }
};

class UndoGuest : public Undo {
 protected:
  void SetUp() override {
    ConversionTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CVM_SKIP_IF(payloads_unsupported());
    ASSERT_EQ(unknown_case_names(), "") << testing::harness_error(
        "the Undo case table", "it names tests this suite does not have (renamed?)");
    fail_conversion();
  }
};

CVM_TEST_P(Undo, PinnedPageMidRangeStateUnchanged, "UNDO-001") {
  EXPECT_EQ(failed_.err, EAGAIN) << failed_.describe();
  EXPECT_EQ(env_->states(), states_before()) << "the failed conversion changed page states";
  EXPECT_TRUE(ok(pin_->release()));
}

CVM_TEST_P(Undo, PinnedPageAtEndStateUnchanged, "UNDO-001") {
  EXPECT_EQ(failed_.err, EAGAIN) << failed_.describe();
  EXPECT_EQ(env_->states(), states_before()) << "pages before the pinned one must not stay converted";
  EXPECT_TRUE(ok(pin_->release()));
}

CVM_TEST_P(Undo, FailedConversionSharedDataIntact, "UNDO-002") {
  ASSERT_EQ(failed_.err, EAGAIN) << failed_.describe();
  expect_shared_data(*env_, case_->private_page);
  // And writable: the host writes new data and reads it back.
  for (uint64_t i = 0; i < 8; i++) {
    if (i == case_->private_page) continue;
    EXPECT_EQ(env_->host_fill(i, static_cast<uint8_t>(0x90 + i)), "") << "page " << i;
    EXPECT_EQ(env_->host_check(i, static_cast<uint8_t>(0x90 + i)), "") << "page " << i;
  }
  EXPECT_TRUE(ok(pin_->release()));
}

CVM_TEST_P(Undo, FailedConversionRetrySucceeds, "UNDO-004") {
  ASSERT_EQ(failed_.err, EAGAIN) << failed_.describe();
  ASSERT_TRUE(ok(pin_->release()));
  ASSERT_TRUE(ok(env_->to_private(0, 8)));
  EXPECT_EQ(env_->states(), "PPPPPPPP");
  ASSERT_TRUE(ok(env_->to_shared(0, 8)));
  EXPECT_EQ(env_->states(), "SSSSSSSS");
}

CVM_TEST_P(Undo, SpanningTwoMemslotsStateUnchanged, "UNDO-001", "UNDO-004") {
  EXPECT_EQ(failed_.err, EAGAIN) << failed_.describe();
  EXPECT_EQ(env_->states(), states_before()) << "neither memslot's pages may stay converted";
  expect_shared_data(*env_, case_->private_page);
  if (env_->cmd()) {
    for (uint64_t i : {0, 3, 4, 7})
      EXPECT_EQ(env_->guest_check(i, static_cast<uint8_t>(0x20 + i)), "") << "guest, page " << i;
  }
  ASSERT_TRUE(ok(pin_->release()));
  ASSERT_TRUE(ok(env_->to_private(0, 8)));
  EXPECT_EQ(env_->states(), "PPPPPPPP") << "the retry converts both memslots' pages";
}

CVM_TEST_P(Undo, InvalidRequestRejectedStateUnchanged, "UNDO-006", "UNDO-001") {
  const uint64_t ps = page_size();
  const ConversionEnvOptions o{.pages = 4};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  for (uint64_t i = 0; i < 4; i++) ASSERT_EQ(env->host_fill(i, static_cast<uint8_t>(0x20 + i)), "");
  ASSERT_TRUE(ok(env->to_private(1)));
  const std::string before = env->states();
  ASSERT_EQ(before, "SPSS");
  struct Case {
    std::string what;
    ConversionRequest req;
  };
  std::vector<Case> cases;
  auto add = [&](std::string what, GmemRange r, uint64_t flags = 0, uint64_t attrs = 0,
                 bool reserved = false) {
    for (bool to_private : {true, false}) {
      ConversionRequest q{r, to_private};
      q.extra_flags = flags;
      q.extra_attributes = attrs;
      q.nonzero_reserved = reserved;
      cases.push_back({what + (to_private ? " (to private)" : " (to shared)"), q});
    }
  };
  GmemRange whole = env->range(0, 4);
  GmemRange r = whole;
  r.offset += 1, r.gpa += 1;
  add("unaligned start", r);
  r = whole, r.size = ps / 2;
  add("unaligned size", r);
  r = whole, r.size = 0;
  add("zero size", r);
  if (env->in_place()) {
    r = env->range(3, 2);
    add("past the end of the guest_memfd", r);
  }
  r = whole, r.offset = ~0ULL & ~(ps - 1), r.gpa = ~0ULL & ~(ps - 1), r.size = 2 * ps;
  add("start + size overflows", r);
  if (abi() != ConversionAbi::GmemConvertIoctls) {
    add("unknown flag", whole, 1ULL << 0);
    add("unknown attribute", whole, 0, 1ULL << 5);
  }
  if (abi() != ConversionAbi::PerVmAttributes) add("reserved word set", whole, 0, 0, true);
  std::string summary;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    ConversionResult res = env->apply(c.req);
    EXPECT_EQ(res.err, EINVAL) << res.describe();
    EXPECT_EQ(env->states(), before) << "a refused request changed page states";
    summary += c.what + ": " + (res.ok() ? "accepted" : errno_name(res.err)) + "; ";
  }
  expect_shared_data(*env, 1);
  RecordProperty("observation", summary);
}

// One direction of InjectedAllocationFailure on the 4-page env: fails the 1st, 2nd, ...
// fault-injection point the conversion reaches, until it reaches no more, and checks that each
// conversion failed that way changed nothing and that a retry without injection works.
class InjectionLeg {
 public:
  InjectionLeg(ConversionEnv& env, ThreadFaultInjection& fi, bool to_private, bool in_place)
      : env_(env), fi_(fi), to_private_(to_private),
        // Start states: "SPSS" for to-private, "PSPP" for to-shared; shared page i holds
        // 0x20 + i. Per-VM attributes live in an xarray, and KVM reserves every entry of the
        // range before it changes any (7.2 kvm_vm_set_mem_attributes): only a range whose
        // xarray node does not exist yet allocates. A private neighbour keeps that node, so the
        // per-VM to-private leg starts from all-shared pages (the node was freed with its last
        // entry).
        start_(to_private ? (in_place ? "SPSS" : "SSSS") : "PSPP"),
        after_(to_private ? "PPPP" : "SSSS") {}

  // Fails injection point after injection point; `summary` says how deep the conversion went.
  void run(std::string& summary) {
    unsigned n = 1;
    for (; n <= kMaxPoints; n++) {
      SCOPED_TRACE("failing injection point " + std::to_string(n));
      ASSERT_TRUE(reset()) << "could not set up " << start_;
      ASSERT_TRUE(ok(fi_.arm(n)));
      ConversionResult r = issue();
      CVM_ASSIGN_OR_FAIL(const bool injected, fi_.disarm());
      if (!injected) {
        // The conversion reached fewer than n points: it ran unharmed and must have worked.
        EXPECT_TRUE(ok(r));
        EXPECT_EQ(env_.states(), after_);
        break;
      }
      if (r.ok()) {
        // The kernel coped with the failed allocation and converted anyway.
        EXPECT_EQ(env_.states(), after_);
        continue;
      }
      check_failed(r);
    }
    summary = std::string(to_private_ ? "to private" : "to shared") + ": " +
              (n > kMaxPoints ? "64 injection points tried (the limit; the conversion reaches more)"
                              : std::to_string(n - 1) + " injection points");
    // The kernel coped with every single failure (e.g. a sleeping retry after a failed atomic
    // allocation): fail every allocation of this thread during one conversion instead.
    if (failures_ > 0 || n == 1) return;
    SCOPED_TRACE("failing every injection point");
    ASSERT_TRUE(reset()) << "could not set up " << start_;
    ASSERT_TRUE(ok(fi_.arm_all()));
    ConversionResult r = issue();
    ASSERT_TRUE(ok(fi_.disarm_all()));
    if (r.ok()) {
      EXPECT_EQ(env_.states(), after_);
    } else {
      check_failed(r);
    }
    summary += r.ok() ? ", converted with every allocation failing"
                      : ", failed with every allocation failing (" +
                            std::string(errno_name(r.err)) + ")";
  }

  // Conversions this leg saw fail by injection.
  unsigned failures() const { return failures_; }

 private:
  static constexpr unsigned kMaxPoints = 64;

  bool reset() {
    bool done = env_.to_shared(0, 4).ok();
    for (uint64_t i = 0; i < 4; i++)
      if (start_[i] == 'S') done = done && env_.host_fill(i, static_cast<uint8_t>(0x20 + i)).empty();
    for (uint64_t i = 0; i < 4; i++)
      if (start_[i] == 'P') done = done && env_.to_private(i).ok();
    return done && env_.states() == start_;
  }

  ConversionResult convert() { return to_private_ ? env_.to_private(0, 4) : env_.to_shared(0, 4); }

  // The request issued while armed: the only call in between.
  ConversionResult issue() {
    const ConversionRequest req{env_.range(0, 4), to_private_};
    uint64_t raw_offset = kErrorOffsetUnset;
    const int err = env_.backend().issue(req, &raw_offset);
    return interpret_conversion(env_.abi(), req, err, raw_offset,
                                env_.backend().describe_request(req));
  }

  // A conversion failed by injection changed nothing, and a retry without injection works.
  void check_failed(const ConversionResult& r) {
    failures_++;
    EXPECT_TRUE(r.err == ENOMEM || r.err == EAGAIN || r.err == EINTR)
        << "unexpected errno for an allocation failure: " << r.describe();
    EXPECT_EQ(env_.states(), start_) << "the failed conversion changed page states: " << r.describe();
    for (uint64_t i = 0; i < 4; i++) {
      if (start_[i] == 'S') {
        EXPECT_EQ(env_.host_check(i, static_cast<uint8_t>(0x20 + i)), "")
            << "shared page " << i << " after " << r.describe();
      }
    }
    ConversionResult again = convert();
    EXPECT_TRUE(again.ok()) << "retry without injection: " << again.describe();
    EXPECT_EQ(env_.states(), after_);
  }

  ConversionEnv& env_;
  ThreadFaultInjection& fi_;
  const bool to_private_;
  const std::string start_, after_;
  unsigned failures_ = 0;
};

CVM_TEST_P(UndoInjection, InjectedAllocationFailure, "UNDO-005", "UNDO-001", "UNDO-002",
           "UNDO-004") {
  CVM_SKIP_IF(ThreadFaultInjection::unavailable());   // SetUp only asks when there is no back-end
  const ConversionEnvOptions o{.pages = 4};
  CVM_SKIP_IF(env_unsupported(o));
  CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  CVM_ASSIGN_OR_FAIL(auto fi, ThreadFaultInjection::setup());
  RecordProperty("fault_injection", fi->points());
  unsigned injected_failures = 0;
  std::string depths;
  for (bool to_private : {true, false}) {
    SCOPED_TRACE(to_private ? "to private" : "to shared");
    InjectionLeg leg(*env, *fi, to_private, in_place());
    std::string summary;
    ASSERT_NO_FATAL_FAILURE(leg.run(summary));
    injected_failures += leg.failures();
    depths += std::string(depths.empty() ? "" : "; ") + summary;
  }
  RecordProperty("observation", std::to_string(injected_failures) +
                                    " conversions failed by injection (" + depths + ")");
  // Conversions that coped with every injected failure never took the undo path.
  if (injected_failures == 0)
    GTEST_SKIP() << testing::kNotApplicable
                 << "no injected allocation failure made a conversion fail (" << depths
                 << "): the undo path did not run";
}

CVM_TEST_P(UndoGuest, GuestRunsAfterFailedConversion, "UNDO-003") {
  // In place a pin made the conversion fail; per-VM, an unknown attribute.
  EXPECT_EQ(failed_.err, in_place() ? EAGAIN : EINVAL) << failed_.describe();
  RecordProperty("failure_cause", failed_.describe());
  ASSERT_FALSE(failed_.ok());
  for (uint64_t i = 0; i < 8; i++) {
    SCOPED_TRACE("page " + std::to_string(i));
    if (i == case_->private_page) {
      EXPECT_EQ(env_->guest_fill(i, 0x55), "") << "the private page stays usable by the guest";
      EXPECT_EQ(env_->guest_check(i, 0x55), "");
      continue;
    }
    EXPECT_EQ(env_->guest_check(i, static_cast<uint8_t>(0x20 + i)), "") << "old data, seen by the guest";
    EXPECT_EQ(env_->guest_fill(i, static_cast<uint8_t>(0xa0 + i)), "");
    EXPECT_EQ(env_->host_check(i, static_cast<uint8_t>(0xa0 + i)), "") << "the host sees the guest's write";
  }
  if (pin_) {
    ASSERT_TRUE(ok(pin_->release()));
  }
  ASSERT_TRUE(ok(env_->to_private(0, 8)));
  EXPECT_EQ(env_->guest_fill(0, 0x77), "") << "and after the retry too";
}

CVM_INSTANTIATE_FOR_PLATFORMS(Undo);
CVM_INSTANTIATE_FOR_PLATFORMS(UndoInjection);
CVM_INSTANTIATE_FOR_PLATFORMS(UndoGuest);

}  // namespace
}  // namespace cvm::suites

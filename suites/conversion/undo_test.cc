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

class Undo : public ConversionTest {
 protected:
  // Pins are the failure cause for in-place back-ends only.
  std::optional<std::string> pins_cannot_fail_conversion() const {
    if (in_place()) return std::nullopt;
    return std::string(testing::kNotApplicable) +
           "a pin cannot make a per-vm-attributes conversion fail (shared memory is separate "
           "host memory and there is no reference-count check); Undo.InvalidRequest* and "
           "UndoInjection.InjectedAllocationFailure cover this back-end";
  }

  // An 8-page environment, page i holding 0x20 + i, with `private_page` converted to private.
  void mixed_env(std::unique_ptr<ConversionEnv>& env, uint64_t private_page, int slots = 1,
                 bool guest = false) {
    ConversionEnvOptions o;
    o.pages = 8;
    o.slots = slots;
    o.guest = guest;
    make_env(env, o);
    if (!env) return;
    for (uint64_t i = 0; i < 8; i++) ASSERT_EQ(env->host_fill(i, static_cast<uint8_t>(0x20 + i)), "");
    CVM_ASSERT_CONVERTED(env->to_private(private_page));
  }

  // The states string with page `p` private and every other page shared.
  static std::string one_private(uint64_t pages, uint64_t p) {
    std::string s(pages, 'S');
    s[p] = 'P';
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
    Undo::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CVM_SKIP_IF(payloads_unsupported());
  }
};

// Pins `page` of env with the first provider that can; SKIPs when none can.
#define CVM_PIN_OR_SKIP(var, env, page)                              \
  std::string var##_why, var##_who;                                  \
  auto var = pin_page_any((env), (page), &var##_why, &var##_who);    \
  if (!var) GTEST_SKIP() << var##_why;                               \
  RecordProperty("pin_provider", var##_who)

CVM_TEST_P(Undo, PinnedPageMidRangeStateUnchanged, "UNDO-001") {
  CVM_SKIP_IF(pins_cannot_fail_conversion());
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 5);
  if (!env || HasFatalFailure()) return;
  CVM_PIN_OR_SKIP(pin, *env, 3);
  ConversionResult r = env->to_private(0, 8);
  EXPECT_EQ(r.err, EAGAIN) << r.describe();
  EXPECT_EQ(env->states(), one_private(8, 5)) << "the failed conversion changed page states";
  EXPECT_TRUE(pin->release().ok());
}

CVM_TEST_P(Undo, PinnedPageAtEndStateUnchanged, "UNDO-001") {
  CVM_SKIP_IF(pins_cannot_fail_conversion());
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 2);
  if (!env || HasFatalFailure()) return;
  CVM_PIN_OR_SKIP(pin, *env, 7);
  ConversionResult r = env->to_private(0, 8);
  EXPECT_EQ(r.err, EAGAIN) << r.describe();
  EXPECT_EQ(env->states(), one_private(8, 2)) << "pages before the pinned one must not stay converted";
  EXPECT_TRUE(pin->release().ok());
}

CVM_TEST_P(Undo, FailedConversionSharedDataIntact, "UNDO-002") {
  CVM_SKIP_IF(pins_cannot_fail_conversion());
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 5);
  if (!env || HasFatalFailure()) return;
  CVM_PIN_OR_SKIP(pin, *env, 3);
  ConversionResult r = env->to_private(0, 8);
  ASSERT_EQ(r.err, EAGAIN) << r.describe();
  expect_shared_data(*env, 5);
  // And writable: the host writes new data and reads it back.
  for (uint64_t i = 0; i < 8; i++) {
    if (i == 5) continue;
    EXPECT_EQ(env->host_fill(i, static_cast<uint8_t>(0x90 + i)), "") << "page " << i;
    EXPECT_EQ(env->host_check(i, static_cast<uint8_t>(0x90 + i)), "") << "page " << i;
  }
  EXPECT_TRUE(pin->release().ok());
}

CVM_TEST_P(Undo, FailedConversionRetrySucceeds, "UNDO-004") {
  CVM_SKIP_IF(pins_cannot_fail_conversion());
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 5);
  if (!env || HasFatalFailure()) return;
  CVM_PIN_OR_SKIP(pin, *env, 3);
  ConversionResult r = env->to_private(0, 8);
  ASSERT_EQ(r.err, EAGAIN) << r.describe();
  ASSERT_TRUE(pin->release().ok());
  CVM_ASSERT_CONVERTED(env->to_private(0, 8));
  EXPECT_EQ(env->states(), "PPPPPPPP");
  CVM_ASSERT_CONVERTED(env->to_shared(0, 8));
  EXPECT_EQ(env->states(), "SSSSSSSS");
}

CVM_TEST_P(Undo, SpanningTwoMemslotsStateUnchanged, "UNDO-001", "UNDO-004") {
  CVM_SKIP_IF(pins_cannot_fail_conversion());
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 1, /*slots=*/2, /*guest=*/payloads_ok());
  if (!env || HasFatalFailure()) return;
  CVM_PIN_OR_SKIP(pin, *env, 6);  // in the second memslot
  ConversionResult r = env->to_private(0, 8);
  EXPECT_EQ(r.err, EAGAIN) << r.describe();
  EXPECT_EQ(env->states(), one_private(8, 1)) << "neither memslot's pages may stay converted";
  expect_shared_data(*env, 1);
  if (env->cmd()) {
    for (uint64_t i : {0, 3, 4, 7})
      EXPECT_EQ(env->guest_check(i, static_cast<uint8_t>(0x20 + i)), "") << "guest, page " << i;
  }
  ASSERT_TRUE(pin->release().ok());
  CVM_ASSERT_CONVERTED(env->to_private(0, 8));
  EXPECT_EQ(env->states(), "PPPPPPPP") << "the retry converts both memslots' pages";
}

CVM_TEST_P(Undo, InvalidRequestRejectedStateUnchanged, "UNDO-006", "UNDO-001") {
  const uint64_t ps = page_size();
  ConversionEnvOptions o;
  o.pages = 4;
  CVM_ENV(env, o);
  for (uint64_t i = 0; i < 4; i++) ASSERT_EQ(env->host_fill(i, static_cast<uint8_t>(0x20 + i)), "");
  CVM_ASSERT_CONVERTED(env->to_private(1));
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

CVM_TEST_P(UndoInjection, InjectedAllocationFailure, "UNDO-005", "UNDO-001", "UNDO-002",
           "UNDO-004") {
  CVM_SKIP_IF(ThreadFaultInjection::unavailable());   // SetUp only asks when there is no back-end
  ConversionEnvOptions o;
  o.pages = 4;
  CVM_ENV(env, o);
  auto fi = ThreadFaultInjection::setup();
  ASSERT_TRUE(fi.ok()) << fi.error();
  RecordProperty("fault_injection", fi.value()->points());
  unsigned injected_failures = 0;
  std::string depths;
  for (bool to_private : {true, false}) {
    SCOPED_TRACE(to_private ? "to private" : "to shared");
    // Start states: "SPSS" for to-private, "PSPP" for to-shared; shared page i holds 0x20 + i.
    // Per-VM attributes live in an xarray, and KVM reserves every entry of the range before it
    // changes any (7.2 kvm_vm_set_mem_attributes): only a range whose xarray node does not
    // exist yet allocates. A private neighbour keeps that node, so the per-VM to-private leg
    // starts from all-shared pages (the node was freed with its last entry).
    const std::string start = to_private ? (in_place() ? "SPSS" : "SSSS") : "PSPP";
    const std::string after = to_private ? "PPPP" : "SSSS";
    auto reset = [&] {
      bool ok = env->to_shared(0, 4).ok();
      for (uint64_t i = 0; i < 4; i++)
        if (start[i] == 'S') ok = ok && env->host_fill(i, static_cast<uint8_t>(0x20 + i)).empty();
      for (uint64_t i = 0; i < 4; i++)
        if (start[i] == 'P') ok = ok && env->to_private(i).ok();
      return ok && env->states() == start;
    };
    auto convert = [&] { return to_private ? env->to_private(0, 4) : env->to_shared(0, 4); };
    // A conversion failed by injection changed nothing, and a retry without injection works.
    auto check_failed = [&](const ConversionResult& r) {
      injected_failures++;
      EXPECT_TRUE(r.err == ENOMEM || r.err == EAGAIN || r.err == EINTR)
          << "unexpected errno for an allocation failure: " << r.describe();
      EXPECT_EQ(env->states(), start) << "the failed conversion changed page states: " << r.describe();
      for (uint64_t i = 0; i < 4; i++) {
        if (start[i] == 'S') {
          EXPECT_EQ(env->host_check(i, static_cast<uint8_t>(0x20 + i)), "")
              << "shared page " << i << " after " << r.describe();
        }
      }
      ConversionResult again = convert();
      EXPECT_TRUE(again.ok()) << "retry without injection: " << again.describe();
      EXPECT_EQ(env->states(), after);
    };
    // The request issued while armed: the only call in between.
    auto issue = [&] {
      const ConversionRequest req{env->range(0, 4), to_private};
      uint64_t raw_offset = kErrorOffsetUnset;
      const int err = env->backend().issue(req, &raw_offset);
      return interpret_conversion(env->abi(), req, err, raw_offset,
                                  env->backend().describe_request(req));
    };
    // Fail the 1st, 2nd, ... injection point the conversion reaches, until it reaches no more.
    const unsigned failed_before = injected_failures;
    unsigned n = 1;
    for (; n <= 64; n++) {
      SCOPED_TRACE("failing injection point " + std::to_string(n));
      ASSERT_TRUE(reset()) << "could not set up " << start;
      ASSERT_TRUE(fi.value()->arm(n).ok());
      ConversionResult r = issue();
      auto injected = fi.value()->disarm();
      ASSERT_TRUE(injected.ok()) << injected.error();
      if (!injected.value()) {
        // The conversion reached fewer than n points: it ran unharmed and must have worked.
        EXPECT_TRUE(r.ok()) << r.describe();
        EXPECT_EQ(env->states(), after);
        break;
      }
      if (r.ok()) {
        // The kernel coped with the failed allocation and converted anyway.
        EXPECT_EQ(env->states(), after);
        continue;
      }
      check_failed(r);
      if (HasFatalFailure()) return;
    }
    std::string leg = std::string(to_private ? "to private" : "to shared") + ": " +
                      (n > 64 ? "64 injection points tried (the limit; the conversion reaches more)"
                              : std::to_string(n - 1) + " injection points");
    // The kernel coped with every single failure (e.g. a sleeping retry after a failed atomic
    // allocation): fail every allocation of this thread during one conversion instead.
    if (injected_failures == failed_before && n > 1) {
      SCOPED_TRACE("failing every injection point");
      ASSERT_TRUE(reset()) << "could not set up " << start;
      ASSERT_TRUE(fi.value()->arm_all().ok());
      ConversionResult r = issue();
      ASSERT_TRUE(fi.value()->disarm_all().ok());
      if (r.ok()) {
        EXPECT_EQ(env->states(), after);
      } else {
        check_failed(r);
        if (HasFatalFailure()) return;
      }
      leg += r.ok() ? ", converted with every allocation failing"
                    : ", failed with every allocation failing (" + std::string(errno_name(r.err)) + ")";
    }
    depths += std::string(depths.empty() ? "" : "; ") + leg;
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
  std::unique_ptr<ConversionEnv> env;
  mixed_env(env, 5, 1, /*guest=*/true);
  if (!env || HasFatalFailure()) return;
  std::unique_ptr<Pin> pin;
  ConversionResult r;
  if (in_place()) {
    std::string why;
    pin = pin_page_any(*env, 3, &why);
    if (!pin) GTEST_SKIP() << why;
    r = env->to_private(0, 8);
    EXPECT_EQ(r.err, EAGAIN) << r.describe();
  } else {
    ConversionRequest bad{env->range(0, 8), true};
    bad.extra_attributes = 1ULL << 5;
    r = env->apply(bad);
    EXPECT_EQ(r.err, EINVAL) << r.describe();
  }
  RecordProperty("failure_cause", r.describe());
  ASSERT_FALSE(r.ok());
  for (uint64_t i = 0; i < 8; i++) {
    SCOPED_TRACE("page " + std::to_string(i));
    if (i == 5) {
      EXPECT_EQ(env->guest_fill(i, 0x55), "") << "the private page stays usable by the guest";
      EXPECT_EQ(env->guest_check(i, 0x55), "");
      continue;
    }
    EXPECT_EQ(env->guest_check(i, static_cast<uint8_t>(0x20 + i)), "") << "old data, seen by the guest";
    EXPECT_EQ(env->guest_fill(i, static_cast<uint8_t>(0xa0 + i)), "");
    EXPECT_EQ(env->host_check(i, static_cast<uint8_t>(0xa0 + i)), "") << "the host sees the guest's write";
  }
  if (pin) {
    ASSERT_TRUE(pin->release().ok());
  }
  CVM_ASSERT_CONVERTED(env->to_private(0, 8));
  EXPECT_EQ(env->guest_fill(0, 0x77), "") << "and after the retry too";
}

CVM_INSTANTIATE_FOR_PLATFORMS(Undo);
CVM_INSTANTIATE_FOR_PLATFORMS(UndoInjection);
CVM_INSTANTIATE_FOR_PLATFORMS(UndoGuest);

}  // namespace
}  // namespace cvm::suites

// GoogleTest support shared by every suite binary:
//  - CVM_TEST / CVM_TEST_F / CVM_TEST_P: a test that names the catalogue requirements it checks
//    (suites/requirements.yaml). The IDs are recorded as the test property "requirements" and
//    can be listed without running anything (--cvm_list_requirements).
//  - a kernel-log listener: a splat in /dev/kmsg during a test fails that test, lines attached.
//  - guest-event assertions: a guest CVM_GUEST_ASSERT becomes a failure at the guest's file:line.
//  - asserting forms of calls that must succeed: CVM_ASSIGN_OR_FAIL and testing::ok (the raw
//    Result stays for negative tests, which check the errno).
//  - main(): flags for stress budgets (--cvm_duration, --cvm_seed, --cvm_iterations).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cvmconf/guest.h"

namespace cvm::testing {

// Registers the requirement IDs of the test `suite.name` (the unparameterised names).
struct Covers {
  Covers(const char* suite, const char* name, std::initializer_list<const char*> ids);
};
// Requirement IDs of a (possibly parameterised) test; empty when it names none.
std::vector<std::string> requirements_of(const ::testing::TestInfo& info);

// Skip-reason prefixes the runner understands (the text after them travels into reports).
inline constexpr const char* kCapabilityAbsent = "capability absent: ";
inline constexpr const char* kNotApplicable = "not applicable: ";
inline constexpr const char* kNotImplemented = "not implemented: ";

// Stress budget for race and soak tests, from --cvm_duration / --cvm_iterations / --cvm_seed
// (or CVMCONF_DURATION / CVMCONF_ITERATIONS / CVMCONF_SEED).
struct StressBudget {
  std::chrono::milliseconds duration{0};  // 0: use the test's default
  uint64_t iterations = 0;                // 0: use the test's default
  std::optional<uint64_t> seed;           // fixed seed for replay
  // True when the command line set any of them (tests tuned to the defaults then do not apply).
  bool given() const { return seed || iterations || duration.count(); }
};
const StressBudget& stress_budget();

// Declares that kernel-log lines containing `substring` are provoked on purpose by the current
// test: they are recorded but do not fail it. Cleared when the next test starts.
void expect_kernel_log(const std::string& substring);

// The test could not build its own environment (create its VM or vCPUs, map set-up memory, boot
// its guest payload): records the property "harness_error" and returns the text of the failure.
// The runner reports such a test as ERROR, never FAIL -- the kernel was not shown to be wrong --
// unless the kernel also logged a splat during it. Use it where the failure message is built, so
// it runs only on failure:  ASSERT_TRUE(g.ok()) << testing::harness_error("GuestVm::create", g);
std::string harness_error(const std::string& step, const std::string& cause);
template <typename R>
std::string harness_error(const std::string& step, const R& failed_result) {
  std::ostringstream os;
  os << failed_result;
  return harness_error(step, os.str());
}

// Asserting form of a call that returns Result<void> and must succeed:
//   ASSERT_TRUE(ok(vm.set_memslot(spec)));
// fails with the call's error ("KVM_SET_USER_MEMORY_REGION2(...): Invalid argument (EINVAL)").
template <typename T>
::testing::AssertionResult ok(const Result<T>& r) {
  if (r.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << r.error();
}

// Reports ev as a failure unless it is of `kind` (and, for SYNC, at `stage`). A guest assertion
// is reported at the guest's file:line. Returns whether ev was as expected.
bool check_event(const UcallEvent& ev, UcallEvent::Kind kind, std::optional<uint64_t> stage,
                 const char* file, int line, bool fatal);

// Reports ev as a failure (at the guest's file:line for a guest assertion).
void report_event(const UcallEvent& ev, const char* what, const char* file, int line, bool fatal);

int main(int argc, char** argv);

}  // namespace cvm::testing

#define CVM_CAT_(a, b) a##b
#define CVM_CAT(a, b) CVM_CAT_(a, b)

// A test that checks catalogue requirements: CVM_TEST_P(Fixture, Name, "REQ-ID", ...) { body }
#define CVM_TEST(suite, name, ...)                                                        \
  static const ::cvm::testing::Covers CVM_CAT(cvm_covers_, CVM_CAT(suite, CVM_CAT(_, name)))( \
      #suite, #name, {__VA_ARGS__});                                                      \
  TEST(suite, name)
#define CVM_TEST_F(suite, name, ...)                                                      \
  static const ::cvm::testing::Covers CVM_CAT(cvm_covers_, CVM_CAT(suite, CVM_CAT(_, name)))( \
      #suite, #name, {__VA_ARGS__});                                                      \
  TEST_F(suite, name)
#define CVM_TEST_P(suite, name, ...)                                                      \
  static const ::cvm::testing::Covers CVM_CAT(cvm_covers_, CVM_CAT(suite, CVM_CAT(_, name)))( \
      #suite, #name, {__VA_ARGS__});                                                      \
  TEST_P(suite, name)

// Asserting form of a call that returns Result<T> and must succeed, like kvm_util's
// vm_create_guest_memfd() beside __vm_create_guest_memfd(): declares (or assigns) lhs from the
// value, or fails the test fatally -- an ASSERT_ -- naming the call and its error:
//   CVM_ASSIGN_OR_FAIL(auto gmem, vm.create_guest_memfd(size, flags));
#define CVM_ASSIGN_OR_FAIL(lhs, expr) CVM_ASSIGN_OR_FAIL_(CVM_CAT(cvm_result_, __LINE__), lhs, expr)
#define CVM_ASSIGN_OR_FAIL_(tmp, lhs, expr)                    \
  auto tmp = (expr);                                           \
  ASSERT_TRUE(tmp.ok()) << #expr << ": " << tmp.error();       \
  lhs = std::move(tmp).value()

// Guest-event assertions (fatal: return from the test on failure).
#define CVM_ASSERT_SYNC(ev, stage)                                                       \
  do {                                                                                   \
    if (!::cvm::testing::check_event((ev), ::cvm::UcallEvent::Kind::Sync, (stage), __FILE__, \
                                     __LINE__, true))                                    \
      return;                                                                            \
  } while (0)
#define CVM_ASSERT_DONE(ev)                                                                 \
  do {                                                                                      \
    if (!::cvm::testing::check_event((ev), ::cvm::UcallEvent::Kind::Done, std::nullopt,     \
                                     __FILE__, __LINE__, true))                             \
      return;                                                                               \
  } while (0)
#define CVM_EXPECT_SYNC(ev, stage)                                                           \
  ::cvm::testing::check_event((ev), ::cvm::UcallEvent::Kind::Sync, (stage), __FILE__, __LINE__, \
                              false)

// GuestCmd outcome assertion: evaluates to nothing, returns from the test if the guest did not
// complete the operation.
#define CVM_ASSERT_CMD(outcome)                                                             \
  do {                                                                                      \
    const auto& cvm_o_ = (outcome);                                                         \
    if (!cvm_o_.ok) {                                                                       \
      ::cvm::testing::report_event(cvm_o_.event, "guest command failed", __FILE__, __LINE__, \
                                   true);                                                   \
      return;                                                                               \
    }                                                                                       \
  } while (0)

// Skips the test when reason holds a value.
#define CVM_SKIP_IF(reason_opt)                       \
  do {                                                \
    if (auto cvm_r_ = (reason_opt)) GTEST_SKIP() << *cvm_r_; \
  } while (0)

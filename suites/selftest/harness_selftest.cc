// Self-tests of the harness: the kernel-log listener and guest-assertion reporting.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "cvmconf/gtest_support.h"
#include "cvmconf/guest_vm.h"
#include "cvmconf/kmsg.h"

namespace cvm {
namespace {

std::string self_exe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

// Runs one DISABLED_ test of this binary in a child process and returns its JSON test object.
nlohmann::json run_inner(const std::string& test, const std::string& env = "") {
  char tmpl[] = "/tmp/cvmconf-selftest-XXXXXX";
  int fd = mkstemp(tmpl);
  if (fd >= 0) close(fd);
  std::string cmd = env + " '" + self_exe() + "' --gtest_also_run_disabled_tests --gtest_filter='" +
                    test + "' --gtest_output=json:" + tmpl + " >/dev/null 2>&1";
  int rc = std::system(cmd.c_str());
  (void)rc;
  std::ifstream f(tmpl);
  nlohmann::json j = nlohmann::json::parse(f, nullptr, false);
  unlink(tmpl);
  if (j.is_discarded()) return {};
  for (const auto& suite : j["testsuites"])
    for (const auto& t : suite["testsuite"]) return t;
  return {};
}

std::string failure_text(const nlohmann::json& t) {
  std::string s;
  if (t.contains("failures"))
    for (const auto& f : t["failures"]) s += f.value("failure", "") + "\n";
  return s;
}

// ---- inner tests: fail on purpose, only run through run_inner() ----

TEST(KmsgInner, DISABLED_WritesWarning) {
  const char* line = std::getenv("CVM_SELFTEST_LINE");
  ASSERT_NE(line, nullptr);
  ASSERT_TRUE(kmsg_write(line).ok());
}

TEST(KmsgInner, DISABLED_WritesHarmlessLine) {
  const char* line = std::getenv("CVM_SELFTEST_LINE");
  ASSERT_NE(line, nullptr);
  ASSERT_TRUE(kmsg_write(line).ok());
}

// Writes a self-test marker line that belongs to some other cvmconf process.
TEST(KmsgInner, DISABLED_WritesAnotherRunsMarker) {
  const char* line = std::getenv("CVM_SELFTEST_FOREIGN_LINE");
  ASSERT_NE(line, nullptr);
  ASSERT_TRUE(kmsg_write(line).ok());
}

TEST(GuestInner, DISABLED_GuestAssertionFails) {
  auto kvm = Kvm::open();
  ASSERT_TRUE(kvm.ok()) << kvm.error();
  auto g = GuestVm::create(kvm.value());
  ASSERT_TRUE(g.ok()) << g.error();
  ASSERT_TRUE(g.value()->start(0, "assert_fail", {7}).ok());
  CVM_ASSERT_DONE(g.value()->run(0));
}

// ---- outer tests ----

bool kmsg_writable() { return access("/dev/kmsg", W_OK) == 0 && access("/dev/kmsg", R_OK) == 0; }

TEST(KmsgListenerSelftest, WarningInKernelLogFailsTheTestWithTheLineAttached) {
  if (!kmsg_writable()) GTEST_SKIP() << "capability absent: /dev/kmsg read/write (needs root)";
  std::string line = "WARNING: cvmconf selftest " + std::to_string(getpid()) + "-" +
                     std::to_string(time(nullptr));
  testing::expect_kernel_log(line);  // this outer test must not fail on the inner test's line
  auto t = run_inner("KmsgInner.DISABLED_WritesWarning", "CVM_SELFTEST_LINE='" + line + "'");
  ASSERT_FALSE(t.is_null()) << "the inner run produced no JSON report";
  std::string failures = failure_text(t);
  EXPECT_NE(failures.find("kernel log splat during this test"), std::string::npos) << failures;
  EXPECT_NE(failures.find(line), std::string::npos) << "the line must be attached: " << failures;
  EXPECT_NE(t.value("kernel_splats", "").find(line), std::string::npos) << t.dump(1);
}

TEST(KmsgListenerSelftest, HarmlessKernelLogLineIsRecordedButPasses) {
  if (!kmsg_writable()) GTEST_SKIP() << "capability absent: /dev/kmsg read/write (needs root)";
  std::string line = "cvmconf selftest harmless line " + std::to_string(getpid());
  auto t = run_inner("KmsgInner.DISABLED_WritesHarmlessLine", "CVM_SELFTEST_LINE='" + line + "'");
  ASSERT_FALSE(t.is_null());
  EXPECT_EQ(failure_text(t), "");
  EXPECT_NE(t.value("kernel_log", "").find(line), std::string::npos) << t.dump(1);
}

TEST(KmsgListenerSelftest, AnotherRunsSelftestMarkerDoesNotFailATest) {
  if (!kmsg_writable()) GTEST_SKIP() << "capability absent: /dev/kmsg read/write (needs root)";
  std::string mine = "WARNING: cvmconf selftest mine-" + std::to_string(getpid());
  std::string foreign = "WARNING: cvmconf selftest foreign-" + std::to_string(getpid());
  testing::expect_kernel_log(foreign);
  auto t = run_inner("KmsgInner.DISABLED_WritesAnotherRunsMarker",
                     "CVM_SELFTEST_LINE='" + mine + "' CVM_SELFTEST_FOREIGN_LINE='" + foreign + "'");
  ASSERT_FALSE(t.is_null());
  EXPECT_EQ(failure_text(t), "") << "another run's self-test line must not fail this test";
  EXPECT_NE(t.value("kernel_log", "").find(foreign), std::string::npos) << "but it is recorded";
}

// The pKVM probe reads the boot log this way: a watcher opened now sees nothing old until
// rewind() takes it back to the oldest record.
TEST(KmsgWatcherSelftest, RewindReadsRecordsLoggedBeforeTheWatcherOpened) {
  if (!kmsg_writable()) GTEST_SKIP() << "capability absent: /dev/kmsg read/write (needs root)";
  std::string line = "cvmconf selftest rewind " + std::to_string(getpid());
  ASSERT_TRUE(kmsg_write(line).ok());
  auto w = KmsgWatcher::open();
  ASSERT_TRUE(w.ok()) << w.error();
  auto has_line = [&](const std::vector<KmsgRecord>& rs) {
    for (const auto& r : rs)
      if (r.text == line) return true;
    return false;
  };
  EXPECT_FALSE(has_line(w->drain())) << "a new watcher starts after the newest record";
  w->rewind();
  EXPECT_TRUE(has_line(w->drain())) << "rewind() must reach records logged before open()";
}

// The guest file and line of the assertion in assert_fail (marked CVM-SELFTEST-ASSERT-LINE).
int guest_assert_line() {
  std::ifstream src(CVM_GUEST_SELFTEST_SOURCE);
  std::string l;
  for (int n = 1; std::getline(src, l); n++)
    if (l.find("CVM-SELFTEST-ASSERT-LINE") != std::string::npos) return n;
  return -1;
}

TEST(GuestAssertSelftest, GuestAssertionBecomesAFailureAtTheGuestFileAndLine) {
  auto kvm = Kvm::open();
  if (!kvm) GTEST_SKIP() << "capability absent: " << kvm.error();
  if (auto why = default_platform().cannot_run_payloads()) GTEST_SKIP() << *why;
  int line = guest_assert_line();
  ASSERT_GT(line, 0) << "marker not found in " << CVM_GUEST_SELFTEST_SOURCE;
  auto t = run_inner("GuestInner.DISABLED_GuestAssertionFails");
  ASSERT_FALSE(t.is_null());
  std::string failures = failure_text(t);
  std::string where = "guests/common/payloads/selftest.c:" + std::to_string(line);
  EXPECT_EQ(failures.rfind(where, 0), 0u) << "failure must be reported at " << where << ":\n"
                                          << failures;
  EXPECT_NE(failures.find("guest assertion failed: x == 42"), std::string::npos) << failures;
  EXPECT_NE(failures.find("left 0x7, right 0x2a"), std::string::npos) << failures;
}

}  // namespace
}  // namespace cvm

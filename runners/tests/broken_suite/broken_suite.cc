// A GoogleTest binary that breaks on purpose, for the runner's own tests (runners/tests): tests
// that pass, fail (with markup and a control character in the message), skip, abort, segfault,
// hang, take an unexpected SIGBUS, _exit(0) without writing the report, and block on request. Between the broken
// tests sit passing ones, so a runner that loses the rest of a batch after a crash is caught.
// It links cvm_gtest (the same listeners as the real suites) and names requirement IDs from
// runners/tests/broken_suite/requirements.yaml. It is built outside build/suites/, so real
// conformance runs never pick it up; the tests point the runner at it with --suite-dir.
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "cvmconf/gtest_support.h"
#include "cvmconf/kmsg.h"

namespace {

// Leaves a harmless marker in the kernel log (when /dev/kmsg is writable) so a broken test's
// evidence can be checked to include the kernel-log lines logged while it ran.
void kmsg_marker(const char* what) {
  if (access("/dev/kmsg", W_OK) != 0) return;
  std::string line = std::string("cvmconf broken_suite: ") + what + " pid " +
                     std::to_string(getpid());
  (void)cvm::kmsg_write(line);
}

volatile uintptr_t g_null = 0;

// BROKEN_AT_START=crash|hang breaks the binary before its first test (in a global environment),
// for the runner's "no test made progress" and idle-timeout paths.
class BreakAtStart : public ::testing::Environment {
  void SetUp() override {
    const char* how = std::getenv("BROKEN_AT_START");
    if (!how) return;
    if (std::string(how) == "crash") std::abort();
    if (std::string(how) == "hang")
      for (;;) pause();
  }
};
[[maybe_unused]] ::testing::Environment* const g_break_at_start =
    ::testing::AddGlobalTestEnvironment(new BreakAtStart);

CVM_TEST(Broken, Passes1, "BROKEN-001") { EXPECT_EQ(1 + 1, 2); }

CVM_TEST(Broken, FailsWithMarkup, "BROKEN-002") {
  ::testing::Test::RecordProperty("observation", "<i>value</i> & more");
  ADD_FAILURE() << "kernel said <b>no</b> & <script>alert('x')</script> \x1b[31mred\x1b[0m";
}

CVM_TEST(Broken, Skips, "BROKEN-003") {
  GTEST_SKIP() << "not applicable: the broken suite skips this on purpose";
}

CVM_TEST(Broken, Aborts, "BROKEN-004") {
  kmsg_marker("about to abort");
  std::abort();
}

CVM_TEST(Broken, Passes2, "BROKEN-001") { SUCCEED(); }

CVM_TEST(Broken, Segfaults, "BROKEN-005") {
  kmsg_marker("about to segfault");
  *reinterpret_cast<volatile int*>(g_null) = 1;
}

CVM_TEST(Broken, Passes3, "BROKEN-001") { SUCCEED(); }

CVM_TEST(Broken, Hangs, "BROKEN-006") {
  kmsg_marker("about to hang");
  for (;;) pause();
}

CVM_TEST(Broken, Passes4, "BROKEN-001") { SUCCEED(); }

CVM_TEST(Broken, UnexpectedSigbus, "BROKEN-007") {
  // A one-page file mapped over two pages: touching the second page is past the end of the file.
  kmsg_marker("about to take SIGBUS");
  int fd = memfd_create("cvmconf-broken", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  long page = sysconf(_SC_PAGESIZE);
  ASSERT_EQ(ftruncate(fd, page), 0);
  auto* p = static_cast<volatile char*>(
      mmap(nullptr, 2 * page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ASSERT_NE(p, MAP_FAILED);
  p[page] = 1;
  ADD_FAILURE() << "no SIGBUS past the end of the file";
}

CVM_TEST(Broken, Passes5, "BROKEN-001") { SUCCEED(); }

CVM_TEST(Broken, ExitsWithoutReport, "BROKEN-008") {
  kmsg_marker("about to _exit(0)");
  _exit(0);
}

CVM_TEST(Broken, Passes6, "BROKEN-001") {
  ::testing::Test::RecordProperty("ops_per_sec", "1234.5");
  ::testing::Test::RecordProperty("iterations", "100");
}

}  // namespace

namespace {

// Fails the first time it runs with BROKEN_FLAKY_FILE set (creating that file), passes after:
// for --retry-failed. Without the variable it passes.
CVM_TEST(Broken, FailsOnlyTheFirstTime, "BROKEN-010") {
  const char* flag = std::getenv("BROKEN_FLAKY_FILE");
  if (!flag) return;
  int fd = open(flag, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  if (fd >= 0) {
    close(fd);
    ADD_FAILURE() << "first run: failing once on purpose";
  }
}

// With BROKEN_BLOCK_FILE set, creates that file and blocks until the runner kills it: a test
// can interrupt the run while it is running, so it (and nothing else) is NOT RUN. Without the
// variable it passes.
CVM_TEST(Broken, PassesOrBlocks, "BROKEN-001") {
  const char* marker = std::getenv("BROKEN_BLOCK_FILE");
  if (!marker) return;
  int fd = open(marker, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  close(fd);
  for (;;) pause();
}

}  // namespace

namespace {

// A test whose own environment cannot be built (here: a mapping the kernel refuses, length 0):
// it fails through testing::harness_error, and the runner must report ERROR, not FAIL.
CVM_TEST(Broken, HarnessSetupFails, "BROKEN-011") {
  void* p = mmap(nullptr, 0, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(p, MAP_FAILED) << cvm::testing::harness_error("mapping the test's memory",
                                                          std::string("mmap of 0 bytes refused"));
  munmap(p, 4096);
}

}  // namespace

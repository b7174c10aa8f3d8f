// Faults for the runner's reliability tests (runners/tests/test_reliability.py): tests that
// change system-wide kernel state (a hugetlb pool, a khugepaged knob) and then die by SIGKILL,
// stop with SIGSTOP, hang or abort -- so only the runner can put the state back -- plus a test
// that floods stdout and one that leaves a daemon behind. They act only when armed
// (FAULTS_ARMED=1 in the environment, or cvmconf.fault_test=1 on the kernel command line of a
// QEMU guest); otherwise they SKIP, so running this binary by mistake changes nothing.
// FAULTS_POOL_KB picks the huge page size (default 2048).
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "cvmconf/gtest_support.h"
#include "cvmconf/mm.h"

namespace {

bool armed() {
  const char* e = std::getenv("FAULTS_ARMED");
  if (e && std::string(e) == "1") return true;
  std::ifstream f("/proc/cmdline");
  std::string cmdline;
  std::getline(f, cmdline);
  return cmdline.find("cvmconf.fault_test=1") != std::string::npos;
}

#define FAULTS_SKIP_UNLESS_ARMED() \
  if (!armed()) GTEST_SKIP() << "not applicable: the fault suite acts only when armed (FAULTS_ARMED=1)"

size_t pool_bytes() {
  const char* e = std::getenv("FAULTS_POOL_KB");
  return (e ? std::strtoull(e, nullptr, 10) : 2048) * 1024;
}

// Grows the pool by one page (under the hugetlb lock, like the pin suites) and says so. The
// returned pool would put it back on destruction; the callers make sure it never gets to.
cvm::HugetlbPool* grow_pool() {
  const size_t bytes = pool_bytes();
  auto c = cvm::hugetlb_counters(bytes);
  if (!c) {
    ADD_FAILURE() << c.error().message();
    return nullptr;
  }
  auto pool = cvm::HugetlbPool::reserve(bytes, c->free - c->resv + 1);
  if (!pool) {
    ADD_FAILURE() << "cannot grow the hugetlb pool: " << pool.error().message();
    return nullptr;
  }
  auto now = cvm::hugetlb_counters(bytes);
  std::printf("faults: hugetlb-%s nr_hugepages %ld -> %ld\n",
              cvm::hugetlb_size_name(bytes).c_str(), pool->original_nr(), now ? now->nr : -1L);
  std::fflush(stdout);
  return new cvm::HugetlbPool(std::move(pool.value()));  // leaked on purpose
}

CVM_TEST(Faults, Passes1, "FAULTS-001") { SUCCEED(); }

CVM_TEST(Faults, GrowsPoolThenKillsItself, "FAULTS-002") {
  FAULTS_SKIP_UNLESS_ARMED();
  if (!grow_pool()) return;
  raise(SIGKILL);
}

CVM_TEST(Faults, ChangesThpThenAborts, "FAULTS-003") {
  FAULTS_SKIP_UNLESS_ARMED();
  const std::string knob = std::string(cvm::kThpSysfs) + "/khugepaged/pages_to_scan";
  auto old = cvm::read_text(knob);
  if (!old) GTEST_SKIP() << "capability absent: " << old.error().message();
  const long v = std::strtol(old->c_str(), nullptr, 10) + 1;
  auto w = cvm::write_text(knob, std::to_string(v));
  ASSERT_TRUE(w) << w.error().message();
  std::printf("faults: %s %ld -> %ld\n", knob.c_str(), v - 1, v);
  std::fflush(stdout);
  std::abort();
}

CVM_TEST(Faults, Passes2, "FAULTS-001") { SUCCEED(); }

CVM_TEST(Faults, FloodsStdout, "FAULTS-004") {
  FAULTS_SKIP_UNLESS_ARMED();
  static char line[4096];
  std::memset(line, 'x', sizeof line - 1);
  line[sizeof line - 1] = '\n';
  for (;;)
    if (write(1, line, sizeof line) < 0) break;
}

CVM_TEST(Faults, GrowsPoolThenStops, "FAULTS-002") {
  FAULTS_SKIP_UNLESS_ARMED();
  if (!grow_pool()) return;
  raise(SIGSTOP);  // until the runner's test timeout kills the process group
}

CVM_TEST(Faults, GrowsPoolThenHangs, "FAULTS-002") {
  FAULTS_SKIP_UNLESS_ARMED();
  if (!grow_pool()) return;
  for (;;) pause();
}

CVM_TEST(Faults, LeavesADaemon, "FAULTS-005") {
  FAULTS_SKIP_UNLESS_ARMED();
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {  // leaves the batch's process group and session, keeps nothing open
    setsid();
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0);
    dup2(null, 1);
    dup2(null, 2);
    for (;;) pause();
  }
  std::printf("faults: left daemon pid %d behind\n", pid);
}

CVM_TEST(Faults, Passes3, "FAULTS-001") { SUCCEED(); }

}  // namespace

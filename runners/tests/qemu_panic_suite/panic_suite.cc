// Injects a guest kernel panic for the QEMU runner's tests (runners/tests/test_qemu_e2e.py):
// Panic.Before passes, Panic.TriggerSysrqCrash writes 'c' to /proc/sysrq-trigger, Panic.After
// passes (after the runner booted the guest again). The crash only happens inside a guest whose
// kernel command line carries cvmconf.panic_test=1 (the runner's --append): anywhere else the
// test SKIPs, so this binary can never take down the host it is built on.
#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "cvmconf/gtest_support.h"

namespace {

bool inside_panic_test_guest() {
  std::ifstream f("/proc/cmdline");
  std::string cmdline;
  std::getline(f, cmdline);
  return cmdline.find("cvmconf.panic_test=1") != std::string::npos &&
         access("/cvmconf/bin/cvm-agent", X_OK) == 0;
}

CVM_TEST(Panic, Before, "PANIC-001") { EXPECT_EQ(access("/proc/self", F_OK), 0); }

CVM_TEST(Panic, TriggerSysrqCrash, "PANIC-002") {
  if (!inside_panic_test_guest())
    GTEST_SKIP() << "not applicable: only crashes a cvmconf QEMU guest booted with "
                    "cvmconf.panic_test=1";
  int fd = open("/proc/sys/kernel/sysrq", O_WRONLY);
  if (fd >= 0) {
    (void)!write(fd, "1", 1);
    close(fd);
  }
  fd = open("/proc/sysrq-trigger", O_WRONLY);
  ASSERT_GE(fd, 0);
  (void)!write(fd, "c", 1);  // the guest kernel panics here
  ADD_FAILURE() << "the guest kernel survived sysrq-c";
}

CVM_TEST(Panic, After, "PANIC-001") { EXPECT_EQ(access("/proc/self", F_OK), 0); }

}  // namespace

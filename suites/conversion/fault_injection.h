// Kernel fault injection for one thread: makes the N-th fault-injection point the calling thread
// reaches fail (/proc/thread-self/fail-nth), with failslab and fail_page_alloc configured in
// debugfs so that ordinary sleeping allocations (GFP_KERNEL, order 0) are eligible. Every
// debugfs setting changed is restored on destruction. Needs CONFIG_FAULT_INJECTION (fail-nth)
// and CONFIG_FAILSLAB and/or CONFIG_FAIL_PAGE_ALLOC (debugfs attributes), and root.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cvmconf/fd.h"
#include "cvmconf/result.h"

namespace cvm::suites {

class ThreadFaultInjection {
 public:
  // nullopt when usable; otherwise "capability absent: fault injection: ..." (mounts debugfs at
  // /sys/kernel/debug when it is not mounted).
  static std::optional<std::string> unavailable();
  // Configures the injection points and opens this thread's fail-nth file.
  static Result<std::unique_ptr<ThreadFaultInjection>> setup();
  ~ThreadFaultInjection();

  // "failslab, fail_page_alloc": the points configured.
  std::string points() const;
  // The nth injection point reached by this thread from now on fails (n >= 1).
  Result<void> arm(unsigned n);
  // Disarms; returns true when the armed failure was injected (the count was used up).
  Result<bool> disarm();
  // Every injection point this thread reaches fails until disarm_all(), the kernel's fallbacks
  // included (e.g. the sleeping retry after a failed atomic allocation).
  Result<void> arm_all();
  Result<void> disarm_all();

 private:
  ThreadFaultInjection() = default;
  UniqueFd fail_nth_;
  UniqueFd make_it_fail_;
  std::vector<std::pair<std::string, std::string>> saved_;  // debugfs file -> old value
  std::vector<std::string> points_;
};

}  // namespace cvm::suites

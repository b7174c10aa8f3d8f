// Fault probes: touch memory and learn whether the access raised SIGBUS or SIGSEGV, from any
// thread (also while vCPU threads run), and run an action in a child process to see how it ends.
//
// How: process-wide SIGBUS/SIGSEGV handlers are installed once. A probe arms a thread-local
// sigjmp_buf; a fault on an armed thread jumps back into the probe. A fault on a thread that is
// not probing restores the default action, so a real bug still crashes (and the runner sees it).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace cvm {

enum class Access { Read, Write };

struct FaultResult {
  int signo = 0;           // 0: no fault; SIGBUS or SIGSEGV otherwise
  int si_code = 0;         // e.g. BUS_ADRERR, SEGV_ACCERR
  uintptr_t fault_addr = 0;
  size_t bytes_done = 0;   // bytes accessed before the fault (== len when no fault)

  bool faulted() const { return signo != 0; }
  bool sigbus() const { return signo == SIGBUS_VALUE; }
  bool sigsegv() const { return signo == SIGSEGV_VALUE; }
  std::string describe() const;

  static constexpr int SIGBUS_VALUE = 7;   // Linux, every architecture we support
  static constexpr int SIGSEGV_VALUE = 11;
};

// Reads len bytes at addr (into out when given). Stops at the first fault.
FaultResult probe_read(const void* addr, size_t len = 1, uint8_t* out = nullptr);
// Writes len bytes of value at addr. Stops at the first fault.
FaultResult probe_write(void* addr, uint8_t value, size_t len = 1);
// Touches one byte per page over [addr, addr+len) (reads, or writes value).
FaultResult probe_pages(void* addr, size_t len, Access access, uint8_t value = 0);
// Runs fn with faults caught (any signal-raising access inside fn is reported, not fatal).
FaultResult probe_call(const std::function<void()>& fn);

// How a child process ended.
struct ChildOutcome {
  enum Kind { Exited, Signaled, TimedOut, ForkFailed } kind = ForkFailed;
  int code = 0;        // exit status (Exited) or signal (Signaled)
  std::string output;  // what the child wrote to its report pipe (see ChildReport)
  std::string describe() const;
  bool exited_with(int c) const { return kind == Exited && code == c; }
  bool killed_by(int sig) const { return kind == Signaled && code == sig; }
};

// A writable pipe end given to the child to report details back to the parent.
struct ChildReport {
  int fd = -1;
  void write(const std::string& s) const;  // async-signal-safe enough: plain write(2)
};

// A forked child running fn; fn's return value is its exit status. The child's SIGBUS/SIGSEGV
// are reset to default so a fault kills it visibly. Destroying a running child kills it.
class ChildProcess {
 public:
  static ChildProcess spawn(const std::function<int(const ChildReport&)>& fn);
  ChildProcess(ChildProcess&& o) noexcept;
  ChildProcess& operator=(ChildProcess&&) = delete;
  ~ChildProcess();
  pid_t pid() const { return pid_; }
  // Waits at most timeout, then kills the child (TimedOut). Collects its report. Once the child
  // is reaped, every later wait() (also on the object it was moved to) returns the same outcome;
  // ForkFailed when there never was a child (or on a moved-from object).
  ChildOutcome wait(std::chrono::milliseconds timeout = std::chrono::seconds(30));

 private:
  ChildProcess() = default;
  pid_t pid_ = -1;
  int report_fd_ = -1;
  bool reaped_ = false;
  std::optional<ChildOutcome> outcome_;  // set when wait() reaped the child
};

// spawn + wait: runs fn in a child and waits for it.
ChildOutcome run_in_child(const std::function<int(const ChildReport&)>& fn,
                          std::chrono::milliseconds timeout = std::chrono::seconds(30));

}  // namespace cvm

#include "cvmconf/fault.h"

#include <fcntl.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <utility>

namespace cvm {
namespace {

static_assert(FaultResult::SIGBUS_VALUE == SIGBUS);
static_assert(FaultResult::SIGSEGV_VALUE == SIGSEGV);

struct ProbeState {
  sigjmp_buf env;
  volatile sig_atomic_t armed = 0;
  volatile int signo = 0;
  volatile int code = 0;
  volatile uintptr_t addr = 0;
};
thread_local ProbeState tl_probe;

void fault_handler(int sig, siginfo_t* info, void*) {
  ProbeState& st = tl_probe;
  if (st.armed) {
    st.armed = 0;
    st.signo = sig;
    st.code = info ? info->si_code : 0;
    st.addr = info ? reinterpret_cast<uintptr_t>(info->si_addr) : 0;
    siglongjmp(st.env, 1);
  }
  // Not probing: this is a real fault. Restore the default action and return; the faulting
  // instruction re-executes and the process dies with the right signal.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(sig, &dfl, nullptr);
}

void install_fault_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, nullptr);
    sigaction(SIGSEGV, &sa, nullptr);
  });
}

// Runs body(progress) with the thread's probe armed. progress counts completed bytes.
template <typename Body>
FaultResult guarded(size_t len_in, Body body) {
  install_fault_handlers();
  volatile size_t len = len_in;  // survives siglongjmp
  FaultResult r;
  volatile size_t done = 0;
  ProbeState& st = tl_probe;
  st.signo = 0;
  if (sigsetjmp(st.env, 1) == 0) {
    st.armed = 1;
    body(done);
    st.armed = 0;
    r.bytes_done = len;
  } else {
    r.signo = st.signo;
    r.si_code = st.code;
    r.fault_addr = st.addr;
    r.bytes_done = done;
  }
  return r;
}

}  // namespace

std::string FaultResult::describe() const {
  if (!signo) return "no fault (" + std::to_string(bytes_done) + " bytes accessed)";
  char b[160];
  std::snprintf(b, sizeof b, "%s (si_code %d) at %#lx after %zu bytes",
                signo == SIGBUS ? "SIGBUS" : signo == SIGSEGV ? "SIGSEGV" : "signal", si_code,
                static_cast<unsigned long>(fault_addr), bytes_done);
  return b;
}

FaultResult probe_read(const void* addr, size_t len, uint8_t* out) {
  const volatile uint8_t* p = static_cast<const volatile uint8_t*>(addr);
  return guarded(len, [&](volatile size_t& done) {
    for (size_t i = 0; i < len; i++) {
      uint8_t v = p[i];
      if (out) out[i] = v;
      done = i + 1;
    }
  });
}

FaultResult probe_write(void* addr, uint8_t value, size_t len) {
  volatile uint8_t* p = static_cast<volatile uint8_t*>(addr);
  return guarded(len, [&](volatile size_t& done) {
    for (size_t i = 0; i < len; i++) {
      p[i] = value;
      done = i + 1;
    }
  });
}

FaultResult probe_pages(void* addr, size_t len, Access access, uint8_t value) {
  const size_t ps = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  volatile uint8_t* p = static_cast<volatile uint8_t*>(addr);
  return guarded(len, [&](volatile size_t& done) {
    for (size_t off = 0; off < len; off += ps) {
      if (access == Access::Read)
        (void)p[off];
      else
        p[off] = value;
      done = off + ps < len ? off + ps : len;
    }
  });
}

FaultResult probe_call(const std::function<void()>& fn) {
  return guarded(0, [&](volatile size_t&) { fn(); });
}

// --- child processes -----------------------------------------------------------------------------
void ChildReport::write(const std::string& s) const {
  if (fd < 0) return;
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

std::string ChildOutcome::describe() const {
  switch (kind) {
    case Exited: return "exited with status " + std::to_string(code);
    case Signaled: return std::string("killed by signal ") + std::to_string(code) + " (" +
                          strsignal(code) + ")";
    case TimedOut: return "timed out (killed)";
    case ForkFailed: return "fork failed";
  }
  return "?";
}

ChildProcess ChildProcess::spawn(const std::function<int(const ChildReport&)>& fn) {
  ChildProcess c;
  int pfd[2];
  if (pipe2(pfd, O_CLOEXEC) < 0) return c;
  pid_t pid = fork();
  if (pid < 0) {
    close(pfd[0]);
    close(pfd[1]);
    return c;
  }
  if (pid == 0) {
    close(pfd[0]);
    signal(SIGBUS, SIG_DFL);
    signal(SIGSEGV, SIG_DFL);
    int rc = fn(ChildReport{pfd[1]});
    _exit(rc);
  }
  close(pfd[1]);
  c.pid_ = pid;
  c.report_fd_ = pfd[0];
  return c;
}

ChildProcess::ChildProcess(ChildProcess&& o) noexcept
    : pid_(std::exchange(o.pid_, -1)),
      report_fd_(std::exchange(o.report_fd_, -1)),
      reaped_(std::exchange(o.reaped_, true)),
      outcome_(std::exchange(o.outcome_, std::nullopt)) {}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !reaped_) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
  if (report_fd_ >= 0) close(report_fd_);
}

ChildOutcome ChildProcess::wait(std::chrono::milliseconds timeout) {
  if (outcome_) return *outcome_;
  ChildOutcome out;
  if (pid_ <= 0 || reaped_) return out;  // ForkFailed
  int pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid_, 0));
  auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  bool pipe_open = true;
  char buf[4096];
  while (!reaped_) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                    deadline - std::chrono::steady_clock::now())
                    .count();
    if (left <= 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      out.kind = ChildOutcome::TimedOut;
      reaped_ = true;
      break;
    }
    struct pollfd fds[2];
    int n = 0;
    if (pipe_open) fds[n++] = {report_fd_, POLLIN, 0};
    if (pidfd >= 0) fds[n++] = {pidfd, POLLIN, 0};
    poll(fds, static_cast<nfds_t>(n), pidfd >= 0 ? static_cast<int>(left > 1000 ? 1000 : left) : 20);
    if (pipe_open && (fds[0].revents & (POLLIN | POLLHUP))) {
      ssize_t r = read(report_fd_, buf, sizeof buf);
      if (r > 0)
        out.output.append(buf, static_cast<size_t>(r));
      else
        pipe_open = false;
    }
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      reaped_ = true;
      if (WIFEXITED(status)) {
        out.kind = ChildOutcome::Exited;
        out.code = WEXITSTATUS(status);
      } else if (WIFSIGNALED(status)) {
        out.kind = ChildOutcome::Signaled;
        out.code = WTERMSIG(status);
      }
    }
  }
  fcntl(report_fd_, F_SETFL, O_NONBLOCK);
  for (;;) {
    ssize_t r = read(report_fd_, buf, sizeof buf);
    if (r <= 0) break;
    out.output.append(buf, static_cast<size_t>(r));
  }
  if (pidfd >= 0) close(pidfd);
  outcome_ = out;
  return out;
}

ChildOutcome run_in_child(const std::function<int(const ChildReport&)>& fn,
                          std::chrono::milliseconds timeout) {
  return ChildProcess::spawn(fn).wait(timeout);
}

}  // namespace cvm

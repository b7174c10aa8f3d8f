// Typed results: every call into the kernel returns either a value or a SysError carrying the
// errno and the operation that failed. hostlib never decides whether an errno is "expected":
// the tests do.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <string>
#include <utility>
#include <variant>

namespace cvm {

struct SysError {
  int err = 0;         // errno value (0 only for harness-level errors without an errno)
  std::string op;      // what was attempted, e.g. "KVM_CREATE_GUEST_MEMFD(size=4096, flags=0x3)"
  // EIO from a VM or vCPU ioctl, and the VM answers every ioctl with EIO since: KVM has killed
  // the VM (kvm_vm_dead / KVM_BUG_ON). message() names the VM and points at the kernel log.
  int dead_vm_fd = -1;

  std::string message() const;  // "op: strerror (ENAME)"
};

// Symbolic name of an errno value ("EINVAL"); "E<n>" for unknown values.
const char* errno_name(int err);

std::ostream& operator<<(std::ostream& os, const SysError& e);

// "0x1f": how addresses, flags and sizes appear in messages.
std::string hex(uint64_t v);

// Builds a SysError from the current errno.
inline SysError last_error(std::string op) { return SysError{errno, std::move(op)}; }

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}               // NOLINT: implicit by design
  Result(SysError error) : v_(std::move(error)) {}        // NOLINT
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  T& operator*() & { return value(); }
  const SysError& error() const { return std::get<1>(v_); }
  // errno of the failure, 0 on success: lets tests write EXPECT_EQ(r.err(), EINVAL).
  int err() const { return ok() ? 0 : error().err; }

 private:
  std::variant<T, SysError> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(SysError error) : error_(std::move(error)), ok_(false) {}  // NOLINT
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const SysError& error() const { return error_; }
  int err() const { return ok_ ? 0 : error_.err; }

 private:
  SysError error_;
  bool ok_ = true;
};

template <typename T>
std::ostream& operator<<(std::ostream& os, const Result<T>& r) {
  if (r.ok()) return os << "ok";
  return os << r.error();
}

}  // namespace cvm

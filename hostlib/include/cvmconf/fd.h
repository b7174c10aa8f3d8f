// RAII owners for file descriptors and memory mappings: nothing in hostlib leaks either.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>

#include "cvmconf/result.h"

namespace cvm {

// The one path of every ioctl hostlib issues (KVM, guest_memfd, gup_test; KVM_RUN aside: its
// EINTR is an exit, see Vcpu::run). Retries EINTR: a signal (a vCPU kick, a watchdog, io_uring
// task work) arrived before the call did anything. Returns the ioctl's value, or -errno.
long ioctl_retrying(int fd, unsigned long request, unsigned long arg);
inline long ioctl_retrying(int fd, unsigned long request, const void* arg) {
  return ioctl_retrying(fd, request, reinterpret_cast<unsigned long>(arg));
}

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// A region from mmap(). Unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t len) : addr_(static_cast<uint8_t*>(addr)), len_(len) {}
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  // mmap(nullptr, len, prot, flags, fd, offset) as a Result.
  static Result<Mapping> map(size_t len, int prot, int flags, int fd, off_t offset = 0);
  // Anonymous private read/write memory.
  static Result<Mapping> anonymous(size_t len, int extra_flags = 0);

  uint8_t* data() const { return addr_; }
  size_t size() const { return len_; }
  bool valid() const { return addr_ != nullptr; }
  std::span<uint8_t> bytes() const { return {addr_, len_}; }
  // Forgets the region without unmapping (e.g. after the test unmapped it on purpose).
  void release() { addr_ = nullptr, len_ = 0; }
  void reset();

 private:
  uint8_t* addr_ = nullptr;
  size_t len_ = 0;
};

size_t page_size();

}  // namespace cvm

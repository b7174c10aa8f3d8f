// KVM objects: the system fd, VMs, vCPUs, memslots and guest_memfd files.
// All kernel failures come back as Result<...> carrying errno; nothing here asserts.
#pragma once

#include <linux/kvm.h>
#include <pthread.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "cvmconf/fd.h"
#include "cvmconf/result.h"
#include "cvmconf/uapi.h"

namespace cvm {

class Vm;
class Vcpu;
class GuestMemfd;

// Path of the KVM device; /dev/kvm unless CVMCONF_KVM_DEVICE names another (documented in the
// README: lets a lab point at a renamed node and lets tests show the "absent" path).
const char* kvm_device_path();

// The one path of every KVM ioctl (KVM_RUN aside: its EINTR is an exit, see Vcpu::run):
// ioctl_retrying (fd.h) as a Result: the error names `what`; an EIO on a VM that now refuses every
// ioctl is reported as a VM KVM has killed (SysError::dead_vm_fd). vm_fd: the VM that `fd`
// belongs to (itself for a VM ioctl), -1 for /dev/kvm.
Result<long> kvm_ioctl(int fd, int vm_fd, unsigned long request, unsigned long arg,
                       const std::string& what);
inline Result<long> kvm_ioctl(int fd, int vm_fd, unsigned long request, const void* arg,
                              const std::string& what) {
  return kvm_ioctl(fd, vm_fd, request, reinterpret_cast<unsigned long>(arg), what);
}
// Whether the VM answers KVM_CHECK_EXTENSION with EIO: KVM has killed it.
bool vm_is_dead(int vm_fd);

class Kvm {
 public:
  // Opens the KVM device. ENOENT/EACCES come back as errors, with the path in op.
  static Result<Kvm> open();
  static Result<Kvm> open(const char* path);

  int fd() const { return fd_.get(); }
  // KVM_CHECK_EXTENSION on the system fd: >= 0 value, or -errno.
  long check_extension(long cap) const;
  Result<int> api_version() const;
  Result<int> vcpu_mmap_size() const;
  Result<Vm> create_vm(unsigned long type) const;

 private:
  explicit Kvm(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};

// A memslot description for KVM_SET_USER_MEMORY_REGION2.
struct MemslotSpec {
  uint32_t slot = 0;
  uint32_t flags = 0;  // uapi::kMemGuestMemfd etc.
  uint64_t gpa = 0;
  uint64_t size = 0;
  uint64_t hva = 0;    // userspace_addr (0 allowed for a gmem-only slot)
  int gmem_fd = -1;
  uint64_t gmem_offset = 0;
};

class GuestMemfd {
 public:
  GuestMemfd() = default;
  GuestMemfd(UniqueFd fd, uint64_t size, uint64_t flags)
      : fd_(std::move(fd)), size_(size), flags_(flags) {}
  int fd() const { return fd_.get(); }
  uint64_t size() const { return size_; }
  uint64_t flags() const { return flags_; }
  bool valid() const { return fd_.valid(); }
  void close() { fd_.reset(); }
  UniqueFd take_fd() { return std::move(fd_); }

  // fallocate(fd, KEEP_SIZE, ...) / fallocate(fd, KEEP_SIZE|PUNCH_HOLE, ...)
  Result<void> allocate(uint64_t offset, uint64_t len) const;
  Result<void> punch_hole(uint64_t offset, uint64_t len) const;
  // fallocate with an arbitrary mode, for tests of the mode rules.
  Result<void> fallocate_raw(int mode, uint64_t offset, uint64_t len) const;
  // mmap of [offset, offset+len) MAP_SHARED with prot (and extra mmap flags).
  Result<Mapping> map(uint64_t len, int prot = PROT_READ | PROT_WRITE, uint64_t offset = 0,
                      int flags = MAP_SHARED) const;

 private:
  UniqueFd fd_;
  uint64_t size_ = 0;
  uint64_t flags_ = 0;
};

class Vm {
 public:
  Vm(UniqueFd fd, unsigned long type, int vcpu_mmap_size)
      : fd_(std::move(fd)), type_(type), vcpu_mmap_size_(vcpu_mmap_size) {}
  int fd() const { return fd_.get(); }
  unsigned long type() const { return type_; }

  // KVM_CHECK_EXTENSION on the VM fd: >= 0 value, or -errno.
  long check_extension(long cap) const;
  Result<void> enable_cap(uint32_t cap, uint64_t arg0, uint64_t arg1 = 0) const;
  Result<void> set_memslot(const MemslotSpec& spec) const;  // KVM_SET_USER_MEMORY_REGION2
  Result<void> delete_memslot(uint32_t slot) const;         // size 0 via REGION2
  // A guest_memfd memslot (KVM_MEM_GUEST_MEMFD): `size` bytes of gmem from `offset` at gpa;
  // hva is the address of the file's mapping (the shared view), nullptr for none.
  Result<void> bind_gmem(uint32_t slot, uint64_t gpa, const GuestMemfd& gmem, uint64_t offset,
                         uint64_t size, const void* hva = nullptr) const;
  Result<void> set_user_memory_region(uint32_t slot, uint32_t flags, uint64_t gpa,
                                      uint64_t size, uint64_t hva) const;  // legacy ioctl
  // KVM_SET_USER_MEMORY_REGION2, or the legacy KVM_SET_USER_MEMORY_REGION when the VM lacks
  // KVM_CAP_USER_MEMORY2 (kernels before 6.8) and the slot involves no guest_memfd.
  Result<void> set_memslot_compat(const MemslotSpec& spec) const;
  Result<GuestMemfd> create_guest_memfd(uint64_t size, uint64_t flags) const;
  // KVM_SET_MEMORY_ATTRIBUTES (per-VM, 6.8).
  Result<void> set_memory_attributes(uint64_t gpa, uint64_t size, uint64_t attributes,
                                     uint64_t flags = 0) const;
  Result<Vcpu> create_vcpu(int id) const;
  // Raw VM ioctl for platform back-ends (SEV/TDX command ioctls).
  Result<long> ioctl(unsigned long request, void* arg, const char* what) const;

 private:
  UniqueFd fd_;
  unsigned long type_ = 0;
  int vcpu_mmap_size_ = 0;
};

enum class ExitKind {
  Io,
  Mmio,
  Hlt,
  Hypercall,
  MemoryFault,
  Shutdown,
  InternalError,
  FailEntry,
  SystemEvent,
  Interrupted,  // KVM_RUN returned EINTR (signal, watchdog or kick)
  RunError,     // KVM_RUN failed with another errno and no meaningful exit reason
  Other,
};
const char* exit_kind_name(ExitKind k);
inline std::ostream& operator<<(std::ostream& os, ExitKind k) { return os << exit_kind_name(k); }

// A decoded KVM_RUN exit. Pure data: built by decode_exit() from a struct kvm_run.
struct ExitInfo {
  ExitKind kind = ExitKind::Other;
  uint32_t reason = 0;  // raw kvm_run.exit_reason
  int run_errno = 0;    // errno of KVM_RUN (0 if it returned 0)
  bool vm_dead = false; // KVM_RUN failed with EIO and the VM refuses every ioctl: KVM killed it
  struct {
    bool out = false;
    uint16_t port = 0;
    uint8_t size = 0;
    uint32_t count = 0;
    uint64_t value = 0;  // first element, little endian, for size <= 8
  } io;
  struct {
    uint64_t gpa = 0;
    bool write = false;
    uint32_t len = 0;
    uint64_t value = 0;
  } mmio;
  struct {
    uint64_t nr = 0;
    uint64_t args[6] = {};
    uint64_t flags = 0;
  } hypercall;
  struct {
    uint64_t flags = 0;
    uint64_t gpa = 0;
    uint64_t size = 0;
  } memory_fault;
  struct {
    uint32_t suberror = 0;
    uint32_t ndata = 0;
    uint64_t data[16] = {};
  } internal;
  struct {
    uint64_t reason = 0;
    uint32_t cpu = 0;
  } fail_entry;
  struct {
    uint32_t type = 0;
    uint32_t ndata = 0;
    uint64_t data[16] = {};
  } system_event;

  std::string describe() const;
};

// Decodes kvm_run after KVM_RUN returned rc (0 or -1) with errno err.
ExitInfo decode_exit(const struct kvm_run& run, int rc, int err);

class Vcpu {
 public:
  Vcpu(UniqueFd fd, int id, Mapping run_map, int vm_fd = -1);
  Vcpu(Vcpu&&) noexcept;
  Vcpu& operator=(Vcpu&&) noexcept;
  ~Vcpu();

  int fd() const { return fd_.get(); }
  int id() const { return id_; }
  int vm_fd() const { return vm_fd_; }
  struct kvm_run* run_struct() const { return reinterpret_cast<struct kvm_run*>(run_map_.data()); }

  // One KVM_RUN, decoded. If timeout is set, a watchdog timer interrupts a vCPU that does not
  // exit in time: the result is then ExitKind::Interrupted and last_run_timed_out() is true.
  ExitInfo run(std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  bool last_run_timed_out() const { return timed_out_; }
  // True when the last run was interrupted by kick(). An Interrupted exit that is neither a
  // timeout nor a kick is spurious (another signal, io_uring task_work): just run again.
  bool last_run_kicked() const { return kicked_; }
  // Makes the KVM_RUN in progress on another thread (or the next one) return EINTR.
  // Thread-safe; used to stop guest loops in race tests.
  void kick();

#if defined(__x86_64__)
  Result<kvm_regs> get_regs() const;
  Result<void> set_regs(const kvm_regs& r) const;
  Result<kvm_sregs> get_sregs() const;
  Result<void> set_sregs(const kvm_sregs& s) const;
#elif defined(__aarch64__)
  // KVM_GET_ONE_REG / KVM_SET_ONE_REG of a 64-bit register (core or system register id).
  Result<uint64_t> get_one_reg(uint64_t id) const;
  Result<void> set_one_reg(uint64_t id, uint64_t value) const;
  // The guest's PC, for reports (nullopt when it cannot be read).
  std::optional<uint64_t> pc() const;
#endif
  Result<long> ioctl(unsigned long request, void* arg, const char* what) const;

 private:
  struct RunState;
  UniqueFd fd_;
  int id_ = 0;
  Mapping run_map_;
  int vm_fd_ = -1;  // the VM's fd (not owned): to tell a killed VM from a failed ioctl
  bool timed_out_ = false;
  bool kicked_ = false;
  std::unique_ptr<RunState> state_;  // thread running KVM_RUN, for kick()
};

}  // namespace cvm

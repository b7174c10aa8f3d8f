#include "cvmconf/kvm.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

namespace cvm {
namespace {


// --- vCPU kick / watchdog signal --------------------------------------------------------------
// One real-time signal interrupts KVM_RUN. The handler sets kvm_run.immediate_exit of the vCPU
// this thread is running, which closes the window where the signal lands just before KVM_RUN
// is entered (KVM then returns EINTR at once).
thread_local struct kvm_run* tl_current_run = nullptr;
thread_local volatile sig_atomic_t tl_watchdog_fired = 0;
constexpr int kWatchdogCookie = 0x57d0;

int kick_signal() { return SIGRTMIN + 3; }

void kick_handler(int, siginfo_t* info, void*) {
  if (info && info->si_code == SI_TIMER && info->si_value.sival_int == kWatchdogCookie)
    tl_watchdog_fired = 1;
  if (tl_current_run) tl_current_run->immediate_exit = 1;
}

void install_kick_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = kick_handler;
    sa.sa_flags = SA_SIGINFO;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&sa.sa_mask);
    sigaction(kick_signal(), &sa, nullptr);
  });
}

}  // namespace

const char* kvm_device_path() {
  const char* p = std::getenv("CVMCONF_KVM_DEVICE");
  return (p && *p) ? p : "/dev/kvm";
}

// --- the one ioctl path ------------------------------------------------------------------------
bool vm_is_dead(int vm_fd) {
  return vm_fd >= 0 && ioctl_retrying(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) == -EIO;
}

Result<long> kvm_ioctl(int fd, int vm_fd, unsigned long request, unsigned long arg,
                       const std::string& what) {
  const long r = ioctl_retrying(fd, request, arg);
  if (r >= 0) return r;
  SysError e{static_cast<int>(-r), what};
  if (e.err == EIO && vm_is_dead(vm_fd)) e.dead_vm_fd = vm_fd;
  return e;
}

// --- Kvm ---------------------------------------------------------------------------------------
Result<Kvm> Kvm::open() { return open(kvm_device_path()); }

Result<Kvm> Kvm::open(const char* path) {
  int fd = ::open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + path);
  UniqueFd ufd(fd);
  auto v = kvm_ioctl(fd, -1, KVM_GET_API_VERSION, 0ul, std::string("KVM_GET_API_VERSION on ") + path);
  if (!v) return v.error();
  if (v.value() != KVM_API_VERSION)
    return SysError{0, std::string(path) + ": KVM API version " + std::to_string(v.value()) +
                           ", expected " + std::to_string(KVM_API_VERSION)};
  return Kvm(std::move(ufd));
}

long Kvm::check_extension(long cap) const {
  return ioctl_retrying(fd_.get(), KVM_CHECK_EXTENSION, static_cast<unsigned long>(cap));
}

Result<int> Kvm::api_version() const {
  auto r = kvm_ioctl(fd_.get(), -1, KVM_GET_API_VERSION, 0ul, "KVM_GET_API_VERSION");
  if (!r) return r.error();
  return static_cast<int>(r.value());
}

Result<int> Kvm::vcpu_mmap_size() const {
  auto r = kvm_ioctl(fd_.get(), -1, KVM_GET_VCPU_MMAP_SIZE, 0ul, "KVM_GET_VCPU_MMAP_SIZE");
  if (!r) return r.error();
  return static_cast<int>(r.value());
}

Result<Vm> Kvm::create_vm(unsigned long type) const {
  auto sz = vcpu_mmap_size();
  if (!sz) return sz.error();
  auto fd = kvm_ioctl(fd_.get(), -1, KVM_CREATE_VM, type,
                      "KVM_CREATE_VM(type=" + std::to_string(type) + ")");
  if (!fd) return fd.error();
  return Vm(UniqueFd(static_cast<int>(fd.value())), type, sz.value());
}

// --- GuestMemfd --------------------------------------------------------------------------------
Result<void> GuestMemfd::fallocate_raw(int mode, uint64_t offset, uint64_t len) const {
  int r;
  do {
    r = ::fallocate(fd_.get(), mode, static_cast<off_t>(offset), static_cast<off_t>(len));
  } while (r < 0 && errno == EINTR);
  if (r < 0)
    return last_error("fallocate(mode=" + hex(static_cast<unsigned>(mode)) + ", off=" +
                      hex(offset) + ", len=" + hex(len) + ")");
  return {};
}

Result<void> GuestMemfd::allocate(uint64_t offset, uint64_t len) const {
  return fallocate_raw(FALLOC_FL_KEEP_SIZE, offset, len);
}

Result<void> GuestMemfd::punch_hole(uint64_t offset, uint64_t len) const {
  return fallocate_raw(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, len);
}

Result<Mapping> GuestMemfd::map(uint64_t len, int prot, uint64_t offset, int flags) const {
  return Mapping::map(len, prot, flags, fd_.get(), static_cast<off_t>(offset));
}

// --- Vm ----------------------------------------------------------------------------------------
long Vm::check_extension(long cap) const {
  return ioctl_retrying(fd_.get(), KVM_CHECK_EXTENSION, static_cast<unsigned long>(cap));
}

Result<void> Vm::enable_cap(uint32_t cap, uint64_t arg0, uint64_t arg1) const {
  struct kvm_enable_cap ec {};
  ec.cap = cap;
  ec.args[0] = arg0;
  ec.args[1] = arg1;
  auto r = kvm_ioctl(fd_.get(), fd_.get(), KVM_ENABLE_CAP, &ec,
                     "KVM_ENABLE_CAP(cap=" + std::to_string(cap) + ", arg0=" + hex(arg0) + ")");
  if (!r) return r.error();
  return {};
}

Result<void> Vm::set_memslot(const MemslotSpec& s) const {
  uapi::kvm_userspace_memory_region2 r{};
  r.slot = s.slot;
  r.flags = s.flags;
  r.guest_phys_addr = s.gpa;
  r.memory_size = s.size;
  r.userspace_addr = s.hva;
  r.guest_memfd_offset = s.gmem_offset;
  r.guest_memfd = static_cast<__u32>(s.gmem_fd);
  auto rc = kvm_ioctl(fd_.get(), fd_.get(), uapi::kSetUserMemoryRegion2, &r,
                      "KVM_SET_USER_MEMORY_REGION2(slot=" + std::to_string(s.slot) +
                          ", flags=" + hex(s.flags) + ", gpa=" + hex(s.gpa) + ", size=" +
                          hex(s.size) + ", gmem_fd=" + std::to_string(s.gmem_fd) +
                          ", gmem_off=" + hex(s.gmem_offset) + ")");
  if (!rc) return rc.error();
  return {};
}

Result<void> Vm::delete_memslot(uint32_t slot) const {
  MemslotSpec s;
  s.slot = slot;
  return set_memslot(s);
}

Result<void> Vm::bind_gmem(uint32_t slot, uint64_t gpa, const GuestMemfd& gmem, uint64_t offset,
                           uint64_t size, const void* hva) const {
  MemslotSpec s;
  s.slot = slot;
  s.flags = uapi::kMemGuestMemfd;
  s.gpa = gpa;
  s.size = size;
  s.hva = reinterpret_cast<uint64_t>(hva);
  s.gmem_fd = gmem.fd();
  s.gmem_offset = offset;
  return set_memslot(s);
}

Result<void> Vm::set_user_memory_region(uint32_t slot, uint32_t flags, uint64_t gpa,
                                        uint64_t size, uint64_t hva) const {
  struct kvm_userspace_memory_region r {};
  r.slot = slot;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = size;
  r.userspace_addr = hva;
  auto rc = kvm_ioctl(fd_.get(), fd_.get(), KVM_SET_USER_MEMORY_REGION, &r,
                      "KVM_SET_USER_MEMORY_REGION(slot=" + std::to_string(slot) + ")");
  if (!rc) return rc.error();
  return {};
}

Result<void> Vm::set_memslot_compat(const MemslotSpec& s) const {
  if (s.gmem_fd < 0 && !(s.flags & uapi::kMemGuestMemfd) &&
      check_extension(uapi::cap::kUserMemory2) <= 0)
    return set_user_memory_region(s.slot, s.flags, s.gpa, s.size, s.hva);
  return set_memslot(s);
}

Result<GuestMemfd> Vm::create_guest_memfd(uint64_t size, uint64_t flags) const {
  uapi::kvm_create_guest_memfd c{};
  c.size = size;
  c.flags = flags;
  auto fd = kvm_ioctl(fd_.get(), fd_.get(), uapi::kCreateGuestMemfd, &c,
                      "KVM_CREATE_GUEST_MEMFD(size=" + hex(size) + ", flags=" + hex(flags) + ")");
  if (!fd) return fd.error();
  return GuestMemfd(UniqueFd(static_cast<int>(fd.value())), size, flags);
}

Result<void> Vm::set_memory_attributes(uint64_t gpa, uint64_t size, uint64_t attributes,
                                       uint64_t flags) const {
  uapi::kvm_memory_attributes a{gpa, size, attributes, flags};
  auto rc = kvm_ioctl(fd_.get(), fd_.get(), uapi::kSetMemoryAttributes, &a,
                      "KVM_SET_MEMORY_ATTRIBUTES(gpa=" + hex(gpa) + ", size=" + hex(size) +
                          ", attrs=" + hex(attributes) + ")");
  if (!rc) return rc.error();
  return {};
}

Result<Vcpu> Vm::create_vcpu(int id) const {
  auto fd = kvm_ioctl(fd_.get(), fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id),
                      "KVM_CREATE_VCPU(" + std::to_string(id) + ")");
  if (!fd) return fd.error();
  UniqueFd ufd(static_cast<int>(fd.value()));
  auto m = Mapping::map(static_cast<size_t>(vcpu_mmap_size_), PROT_READ | PROT_WRITE, MAP_SHARED,
                        ufd.get(), 0);
  if (!m) return m.error();
  return Vcpu(std::move(ufd), id, std::move(m.value()), fd_.get());
}

Result<long> Vm::ioctl(unsigned long request, void* arg, const char* what) const {
  return kvm_ioctl(fd_.get(), fd_.get(), request, arg, what);
}

// --- exits ---------------------------------------------------------------------------------------
const char* exit_kind_name(ExitKind k) {
  switch (k) {
    case ExitKind::Io: return "IO";
    case ExitKind::Mmio: return "MMIO";
    case ExitKind::Hlt: return "HLT";
    case ExitKind::Hypercall: return "HYPERCALL";
    case ExitKind::MemoryFault: return "MEMORY_FAULT";
    case ExitKind::Shutdown: return "SHUTDOWN";
    case ExitKind::InternalError: return "INTERNAL_ERROR";
    case ExitKind::FailEntry: return "FAIL_ENTRY";
    case ExitKind::SystemEvent: return "SYSTEM_EVENT";
    case ExitKind::Interrupted: return "INTERRUPTED";
    case ExitKind::RunError: return "RUN_ERROR";
    case ExitKind::Other: return "OTHER";
  }
  return "?";
}

ExitInfo decode_exit(const struct kvm_run& run, int rc, int err) {
  ExitInfo e;
  e.reason = run.exit_reason;
  e.run_errno = rc < 0 ? err : 0;
  const auto* base = reinterpret_cast<const uint8_t*>(&run);
  if (rc < 0) {
    // KVM reports a memory fault as -1/EFAULT with exit_reason MEMORY_FAULT (api.rst
    // KVM_EXIT_MEMORY_FAULT).
    if (err == EFAULT && run.exit_reason == uapi::kExitMemoryFault) {
      e.kind = ExitKind::MemoryFault;
      const auto* mf = reinterpret_cast<const uapi::kvm_run_memory_fault*>(
          base + uapi::kKvmRunExitUnionOffset);
      e.memory_fault = {mf->flags, mf->gpa, mf->size};
    } else if (err == EINTR) {
      e.kind = ExitKind::Interrupted;
    } else {
      e.kind = ExitKind::RunError;
    }
    return e;
  }
  switch (run.exit_reason) {
    case KVM_EXIT_IO: {
      e.kind = ExitKind::Io;
      e.io.out = run.io.direction == KVM_EXIT_IO_OUT;
      e.io.port = run.io.port;
      e.io.size = run.io.size;
      e.io.count = run.io.count;
      uint64_t v = 0;
      if (run.io.size <= 8) std::memcpy(&v, base + run.io.data_offset, run.io.size);
      e.io.value = v;
      break;
    }
    case KVM_EXIT_MMIO: {
      e.kind = ExitKind::Mmio;
      e.mmio.gpa = run.mmio.phys_addr;
      e.mmio.write = run.mmio.is_write;
      e.mmio.len = run.mmio.len;
      uint64_t v = 0;
      std::memcpy(&v, run.mmio.data, run.mmio.len <= 8 ? run.mmio.len : 8);
      e.mmio.value = v;
      break;
    }
    case KVM_EXIT_HLT:
      e.kind = ExitKind::Hlt;
      break;
    case KVM_EXIT_HYPERCALL:
      e.kind = ExitKind::Hypercall;
      e.hypercall.nr = run.hypercall.nr;
      for (int i = 0; i < 6; i++) e.hypercall.args[i] = run.hypercall.args[i];
      // 6.1 names this word "longmode"; 6.10+ widened it to u64 flags at the same offset.
      std::memcpy(&e.hypercall.flags, &run.hypercall.longmode, sizeof(uint64_t));
      break;
    case uapi::kExitMemoryFault: {
      e.kind = ExitKind::MemoryFault;
      const auto* mf = reinterpret_cast<const uapi::kvm_run_memory_fault*>(
          base + uapi::kKvmRunExitUnionOffset);
      e.memory_fault = {mf->flags, mf->gpa, mf->size};
      break;
    }
    case KVM_EXIT_SHUTDOWN:
      e.kind = ExitKind::Shutdown;
      break;
    case KVM_EXIT_INTERNAL_ERROR:
      e.kind = ExitKind::InternalError;
      e.internal.suberror = run.internal.suberror;
      e.internal.ndata = run.internal.ndata;
      for (uint32_t i = 0; i < run.internal.ndata && i < 16; i++)
        e.internal.data[i] = run.internal.data[i];
      break;
    case KVM_EXIT_FAIL_ENTRY:
      e.kind = ExitKind::FailEntry;
      e.fail_entry.reason = run.fail_entry.hardware_entry_failure_reason;
      e.fail_entry.cpu = run.fail_entry.cpu;
      break;
    case KVM_EXIT_SYSTEM_EVENT:
      e.kind = ExitKind::SystemEvent;
      e.system_event.type = run.system_event.type;
      e.system_event.ndata = run.system_event.ndata;
      for (uint32_t i = 0; i < run.system_event.ndata && i < 16; i++)
        e.system_event.data[i] = run.system_event.data[i];
      break;
    case KVM_EXIT_INTR:
      e.kind = ExitKind::Interrupted;
      break;
    default:
      e.kind = ExitKind::Other;
  }
  return e;
}

std::string ExitInfo::describe() const {
  std::ostringstream os;
  os << exit_kind_name(kind) << " (exit_reason " << reason;
  if (run_errno) os << ", KVM_RUN errno " << errno_name(run_errno);
  os << ")";
  if (vm_dead) os << ": KVM has killed the VM (every ioctl on it fails with EIO), the kernel log says why";
  switch (kind) {
    case ExitKind::Io:
      os << " port " << hex(io.port) << (io.out ? " out" : " in") << " size " << int(io.size)
         << " value " << hex(io.value);
      break;
    case ExitKind::Mmio:
      os << " gpa " << hex(mmio.gpa) << (mmio.write ? " write" : " read") << " len " << mmio.len
         << " value " << hex(mmio.value);
      break;
    case ExitKind::Hypercall:
      os << " nr " << hypercall.nr << " args " << hex(hypercall.args[0]) << ","
         << hex(hypercall.args[1]) << "," << hex(hypercall.args[2]) << " flags "
         << hex(hypercall.flags);
      break;
    case ExitKind::MemoryFault:
      os << " flags " << hex(memory_fault.flags) << " gpa " << hex(memory_fault.gpa) << " size "
         << hex(memory_fault.size);
      break;
    case ExitKind::InternalError:
      os << " suberror " << internal.suberror;
      for (uint32_t i = 0; i < internal.ndata && i < 16; i++) os << " " << hex(internal.data[i]);
      break;
    case ExitKind::FailEntry:
      os << " hardware_entry_failure_reason " << hex(fail_entry.reason) << " cpu "
         << fail_entry.cpu;
      break;
    case ExitKind::SystemEvent:
      os << " type " << system_event.type;
      for (uint32_t i = 0; i < system_event.ndata && i < 16; i++)
        os << " " << hex(system_event.data[i]);
      break;
    default:
      break;
  }
  return os.str();
}

// --- Vcpu --------------------------------------------------------------------------------------
struct Vcpu::RunState {
  std::mutex mu;
  bool running = false;
  bool kick_pending = false;
  pthread_t thread{};
};

Vcpu::Vcpu(UniqueFd fd, int id, Mapping run_map, int vm_fd)
    : fd_(std::move(fd)), id_(id), run_map_(std::move(run_map)), vm_fd_(vm_fd),
      state_(std::make_unique<RunState>()) {}
Vcpu::Vcpu(Vcpu&&) noexcept = default;
Vcpu& Vcpu::operator=(Vcpu&&) noexcept = default;
Vcpu::~Vcpu() = default;

ExitInfo Vcpu::run(std::optional<std::chrono::milliseconds> timeout) {
  install_kick_handler();
  struct kvm_run* r = run_struct();
  timed_out_ = false;
  kicked_ = false;
  tl_watchdog_fired = 0;

  timer_t timer{};
  bool have_timer = false;
  if (timeout) {
    struct sigevent sev {};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = kick_signal();
    sev.sigev_value.sival_int = kWatchdogCookie;
    sev._sigev_un._tid = static_cast<pid_t>(::syscall(SYS_gettid));
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer) == 0) {
      have_timer = true;
      struct itimerspec its {};
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(*timeout).count();
      its.it_value.tv_sec = ns / 1000000000;
      its.it_value.tv_nsec = ns % 1000000000;
      if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0) its.it_value.tv_nsec = 1;
      timer_settime(timer, 0, &its, nullptr);
    }
  }
  {
    std::lock_guard<std::mutex> g(state_->mu);
    state_->running = true;
    state_->thread = pthread_self();
  }
  tl_current_run = r;
  int rc = ::ioctl(fd_.get(), KVM_RUN, 0);
  int err = errno;
  tl_current_run = nullptr;
  {
    std::lock_guard<std::mutex> g(state_->mu);
    state_->running = false;
    kicked_ = state_->kick_pending;
    state_->kick_pending = false;
  }
  if (have_timer) timer_delete(timer);
  ExitInfo e = decode_exit(*r, rc, err);
  e.vm_dead = rc < 0 && err == EIO && vm_is_dead(vm_fd_);
  if (r->immediate_exit) {
    r->immediate_exit = 0;
    if (rc < 0 && err == EINTR) e.kind = ExitKind::Interrupted;
  }
  if (tl_watchdog_fired && e.kind == ExitKind::Interrupted) timed_out_ = true;
  tl_watchdog_fired = 0;
  return e;
}

void Vcpu::kick() {
  install_kick_handler();
  std::lock_guard<std::mutex> g(state_->mu);
  state_->kick_pending = true;
  run_struct()->immediate_exit = 1;
  if (state_->running) pthread_kill(state_->thread, kick_signal());
}

#if defined(__x86_64__)
Result<kvm_regs> Vcpu::get_regs() const {
  kvm_regs r{};
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_GET_REGS, &r, "KVM_GET_REGS"); !rc) return rc.error();
  return r;
}
Result<void> Vcpu::set_regs(const kvm_regs& r) const {
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_SET_REGS, &r, "KVM_SET_REGS"); !rc) return rc.error();
  return {};
}
Result<kvm_sregs> Vcpu::get_sregs() const {
  kvm_sregs s{};
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_GET_SREGS, &s, "KVM_GET_SREGS"); !rc) return rc.error();
  return s;
}
Result<void> Vcpu::set_sregs(const kvm_sregs& s) const {
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_SET_SREGS, &s, "KVM_SET_SREGS"); !rc) return rc.error();
  return {};
}
#elif defined(__aarch64__)
Result<uint64_t> Vcpu::get_one_reg(uint64_t id) const {
  uint64_t v = 0;
  kvm_one_reg r{id, reinterpret_cast<uint64_t>(&v)};
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_GET_ONE_REG, &r, "KVM_GET_ONE_REG"); !rc) return rc.error();
  return v;
}
Result<void> Vcpu::set_one_reg(uint64_t id, uint64_t value) const {
  kvm_one_reg r{id, reinterpret_cast<uint64_t>(&value)};
  if (auto rc = kvm_ioctl(fd_.get(), vm_fd_, KVM_SET_ONE_REG, &r, "KVM_SET_ONE_REG"); !rc) return rc.error();
  return {};
}
std::optional<uint64_t> Vcpu::pc() const {
  const uint64_t id = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE |
                      (offsetof(struct kvm_regs, regs.pc) / sizeof(__u32));
  auto v = get_one_reg(id);
  if (!v) return std::nullopt;
  return v.value();
}
#endif
Result<long> Vcpu::ioctl(unsigned long request, void* arg, const char* what) const {
  return kvm_ioctl(fd_.get(), vm_fd_, request, arg, what);
}

}  // namespace cvm

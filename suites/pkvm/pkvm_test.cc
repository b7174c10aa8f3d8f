// pKVM protected VMs (arm64, Linux 7.2 KVM_VM_TYPE_ARM_PROTECTED): the memory model of
// Documentation/virt/kvm/arm/pkvm.rst, tested against a running protected guest.
//
// Pages the guest touched are donated to it; the host must not be able to read or write them
// (SIGSEGV for the accessing process, never a host crash), syscalls touching them fail with
// EFAULT or reclaim them, pages the guest shares back are the host's to read until it unshares
// them, memslots are fixed once the pVM ran, file-backed memory cannot back it, and donated
// pages count against RLIMIT_MEMLOCK. Requirements PKVM-001..008 (seed 004; seed 000 for the
// SIGBUS alternative). The fixture compiles everywhere (stable names) and SKIPs off arm64.
#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "cvmconf/fault.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/guest_vm.h"
#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"

namespace cvm::suites {
namespace {

using namespace std::chrono_literals;
using Kind = UcallEvent::Kind;
using testing::ok;

constexpr uint32_t kTestSlot = 1;
constexpr uint64_t kPages = 8;
// Words in vCPU 0's comm page (shared by the guest at entry) past struct cvm_ucall.
constexpr uint64_t kStopOff = CVM_COMM_WORDS_OFF, kCountOff = CVM_COMM_WORDS_OFF + 8;
static_assert(sizeof(cvm_ucall) <= kStopOff);

// Why the pKVM tests cannot run here, or nullopt.
std::optional<std::string> pkvm_unavailable() {
#if !defined(__aarch64__)
  return std::string(testing::kNotApplicable) + "arm64 pKVM protected VMs only";
#else
  const Platform* p = find_platform("arm64-pkvm");
  if (!p) return std::string(testing::kNotImplemented) + "no arm64-pkvm platform";
  if (auto why = p->unavailable(cached_capabilities())) return why;
  if (auto why = p->cannot_run_payloads()) return "arm64-pkvm: " + *why;
  return std::nullopt;
#endif
}

// A protected guest running cmd_loop on vCPU 0, with kPages of anonymous test memory at
// CVM_TEST_MEM_GPA (slot 1). Nothing of the test memory is donated until the guest touches it.
struct Pvm {
  std::unique_ptr<GuestVm> gvm;
  Mapping mem;
  std::optional<GuestCmd> cmd;

  static Result<Pvm> create(const Kvm& kvm, int vcpus = 1, Mapping mem = {}) {
    Pvm p;
    GuestVmOptions o;
    o.platform = find_platform("arm64-pkvm");
    o.vcpus = vcpus;
    auto g = GuestVm::create(kvm, o);
    if (!g) return g.error();
    p.gvm = std::move(g.value());
    if (!mem.valid()) {
      auto m = Mapping::anonymous(kPages * page_size());
      if (!m) return m.error();
      mem = std::move(m.value());
    }
    p.mem = std::move(mem);
    MemslotSpec s;
    s.slot = kTestSlot;
    s.gpa = CVM_TEST_MEM_GPA;
    s.size = p.mem.size();
    s.hva = reinterpret_cast<uint64_t>(p.mem.data());
    if (auto r = p.gvm->vm().set_memslot_compat(s); !r) return r.error();
    auto c = GuestCmd::start(*p.gvm, 0);
    if (!c) return c.error();
    p.cmd.emplace(std::move(c.value()));
    return p;
  }
  uint64_t gpa(uint64_t page, uint64_t off = 0) const {
    return CVM_TEST_MEM_GPA + page * page_size() + off;
  }
  uint8_t* hva(uint64_t page, uint64_t off = 0) const {
    return mem.data() + page * page_size() + off;
  }
  GuestCmd::Outcome hvc(uint64_t fn, uint64_t a0 = 0) {
    return cmd->op(CVM_CMD_HYPERCALL, fn, a0, 0);
  }
};

class Pkvm : public ::testing::Test {
 protected:
  void SetUp() override {
    RecordProperty("platform", "arm64-pkvm");
    CVM_SKIP_IF(pkvm_unavailable());
    auto k = Kvm::open();
    if (!k) GTEST_SKIP() << testing::kCapabilityAbsent << k.error();
    kvm_.emplace(std::move(k.value()));
  }
  // The guest writes a pattern over test page `page` (donating it) and checks it reads back.
  void guest_fills(Pvm& p, uint64_t page, uint64_t seed) {
    auto f = p.cmd->op(CVM_CMD_FILL_PATTERN, p.gpa(page), page_size(), seed);
    CVM_ASSERT_CMD(f);
    auto c = p.cmd->op(CVM_CMD_CHECK_PATTERN, p.gpa(page), page_size(), seed);
    CVM_ASSERT_CMD(c);
    ASSERT_EQ(c.value, UINT64_MAX) << "the guest's own page does not read back at " << c.value;
  }
  std::optional<Kvm> kvm_;
};

// PKVM-001: payloads boot in a protected VM; the guest finds the pKVM services of 7.2.
CVM_TEST_F(Pkvm, PayloadBootsAndFindsMemShareServices, "PKVM-001", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  auto f = p.hvc(uapi::pkvm::kSmcccFeatures);
  CVM_ASSERT_CMD(f);
  auto g = p.hvc(uapi::pkvm::kSmcccHypMeminfo);
  CVM_ASSERT_CMD(g);
  auto guard = p.hvc(uapi::pkvm::kSmcccMmioGuard, CVM_UCALL_MMIO_GPA);
  CVM_ASSERT_CMD(guard);
  RecordProperty("observation", "features " + hex(f.value) + ", granule " + std::to_string(g.value) +
                                    ", MMIO_GUARD -> " + std::to_string(static_cast<int64_t>(guard.value)));
  for (unsigned bit : {uapi::pkvm::kFuncHypMeminfo, uapi::pkvm::kFuncMemShare,
                       uapi::pkvm::kFuncMemUnshare})
    EXPECT_TRUE((f.value >> bit) & 1) << "features bitmap " << hex(f.value) << " lacks bit " << bit;
  EXPECT_EQ(g.value, page_size()) << "HYP_MEMINFO granule";
  // The guest ran its payload through the shared ucall slot; its private data works too.
  guest_fills(p, 0, 0x1234);
  CVM_ASSERT_CMD(p.cmd->exit());
}

// A second vCPU of a protected VM, powered off, started by vCPU 0 with PSCI CPU_ON: it sets
// up its own MMU, shares its ucall page back and runs the payload in its boot info.
CVM_TEST_F(Pkvm, PsciCpuOnStartsASecondVcpu, "PKVM-001", "PKVM-008") {
  GuestVmOptions o;
  o.platform = find_platform("arm64-pkvm");
  o.vcpus = 2;
  auto gv = GuestVm::create(*kvm_, o);
  ASSERT_TRUE(gv.ok()) << testing::harness_error("GuestVm::create", gv.error());
  GuestVm& g = *gv.value();
  auto loaded = g.start(1, "hello", {0x99});
  ASSERT_TRUE(loaded.ok()) << testing::harness_error("loading vCPU 1's payload", loaded);
  kvm_mp_state off{KVM_MP_STATE_STOPPED};
  ASSERT_TRUE(ok(g.vcpu(1).ioctl(KVM_SET_MP_STATE, &off, "KVM_SET_MP_STATE")));
  UcallEvent e1;
  std::thread second([&] { e1 = g.run(1, 30s); });
  auto started = g.start(0, "psci_cpu_on", {1});
  UcallEvent e0;
  if (started.ok()) e0 = g.run(0);
  if (!started.ok() || e0.kind != Kind::Sync) g.vcpu(1).kick();
  second.join();
  ASSERT_TRUE(started.ok()) << testing::harness_error("starting vCPU 0", started);
  ASSERT_EQ(e0.kind, Kind::Sync) << e0.describe();
  EXPECT_EQ(e0.args.at(1), 0u) << "PSCI CPU_ON must return SUCCESS";
  ASSERT_EQ(e1.kind, Kind::Sync) << e1.describe();
  EXPECT_EQ(e1.args.at(2), 0x99u);
}

// PKVM-002: host reads and writes of memory the guest did not share back get SIGSEGV.
CVM_TEST_F(Pkvm, HostReadOfUnsharedPageIsSigsegv, "PKVM-002", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 1, 0xabcd);
  FaultResult r = probe_read(p.hva(1, 8), 8);
  EXPECT_TRUE(r.sigsegv()) << "host read of a donated page: " << r.describe();
  // The guest is unaffected and still sees its data.
  auto c = p.cmd->op(CVM_CMD_CHECK_PATTERN, p.gpa(1), page_size(), 0xabcd);
  CVM_ASSERT_CMD(c);
  EXPECT_EQ(c.value, UINT64_MAX);
}

CVM_TEST_F(Pkvm, HostWriteOfUnsharedPageIsSigsegv, "PKVM-002", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 1, 0xabce);
  FaultResult r = probe_write(p.hva(1, 16), 0x5a, 8);
  EXPECT_TRUE(r.sigsegv()) << "host write to a donated page: " << r.describe();
  auto c = p.cmd->op(CVM_CMD_CHECK_PATTERN, p.gpa(1), page_size(), 0xabce);
  CVM_ASSERT_CMD(c);
  EXPECT_EQ(c.value, UINT64_MAX) << "a refused host write changed the guest's page at " << c.value;
}

// From another thread while the vCPU keeps touching its pages.
CVM_TEST_F(Pkvm, HostAccessFromAnotherThreadWhileVcpuRunsIsSigsegv, "PKVM-002", "PKVM-008") {
  auto g = [&]() -> Result<std::unique_ptr<GuestVm>> {
    GuestVmOptions o;
    o.platform = find_platform("arm64-pkvm");
    return GuestVm::create(*kvm_, o);
  }();
  ASSERT_TRUE(g.ok()) << testing::harness_error("GuestVm::create", g.error());
  GuestVm& gvm = *g.value();
  auto mem = Mapping::anonymous(kPages * page_size());
  ASSERT_TRUE(mem.ok()) << testing::harness_error("mapping the memslot's memory", mem.error());
  MemslotSpec s;
  s.slot = kTestSlot;
  s.gpa = CVM_TEST_MEM_GPA;
  s.size = mem->size();
  s.hva = reinterpret_cast<uint64_t>(mem->data());
  ASSERT_TRUE(ok(gvm.vm().set_memslot_compat(s)));
  const uint64_t slot_gpa = CVM_COMM_GPA;  // vCPU 0's ucall slot page, shared at entry
  auto* stop = reinterpret_cast<volatile uint64_t*>(gvm.boot_hva(slot_gpa + kStopOff));
  auto* count = reinterpret_cast<volatile uint64_t*>(gvm.boot_hva(slot_gpa + kCountOff));
  *stop = 0;
  *count = 0;
  auto started = gvm.start(0, "touch_until_stopped", {CVM_TEST_MEM_GPA, kPages * page_size(),
                                                      slot_gpa + kStopOff, slot_gpa + kCountOff});
  ASSERT_TRUE(started.ok()) << testing::harness_error("starting the payload", started);
  UcallEvent ev;
  std::thread vcpu([&] { ev = gvm.run(0, 60s); });
  // The counter's page is the guest's from its first touch until it shares it back at entry:
  // a read in that moment faults and counts as "no pass yet".
  auto passes = [&]() -> uint64_t {
    uint64_t v = 0;
    return probe_read(const_cast<uint64_t*>(count), 8, reinterpret_cast<uint8_t*>(&v)).faulted()
               ? 0
               : v;
  };
  // Wait until the guest completed a pass (all pages donated), reading the shared counter.
  auto deadline = std::chrono::steady_clock::now() + 30s;
  while (passes() < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  const uint64_t before = passes();
  int segv = 0, other = 0;
  std::string first_other;
  std::thread prober([&] {
    for (int i = 0; i < 64; i++) {
      uint64_t page = static_cast<uint64_t>(i) % kPages;
      FaultResult r = (i & 1) ? probe_write(mem->data() + page * page_size() + 64, 1)
                              : probe_read(mem->data() + page * page_size() + 64, 1);
      if (r.sigsegv()) segv++;
      else if (other++ == 0) first_other = r.describe();
    }
  });
  prober.join();
  std::this_thread::sleep_for(20ms);
  const uint64_t after = passes();
  *stop = 1;
  vcpu.join();
  EXPECT_GE(before, 2u) << "the guest did not complete its passes over the test memory";
  EXPECT_EQ(segv, 64) << other << " host accesses did not fault with SIGSEGV, first: " << first_other;
  EXPECT_GT(after, before) << "the vCPU stopped making progress during the host's accesses";
  CVM_ASSERT_SYNC(ev, 1);
}

// The default action: the accessing process dies of SIGSEGV; the host (and the test process
// that watches it) carries on. The child builds its own pVM, as a forked child of a process
// that owns one could not touch the parent's guest memory anyway.
CVM_TEST_F(Pkvm, UnsharedAccessKillsOnlyTheAccessingProcess, "PKVM-002", "PKVM-008") {
  for (Access a : {Access::Read, Access::Write}) {
    ChildOutcome o = run_in_child([&](const ChildReport& rep) {
      auto k = Kvm::open();
      if (!k) return 10;
      auto p = Pvm::create(k.value());
      if (!p) {
        rep.write(p.error().message());
        return 11;
      }
      auto f = p->cmd->op(CVM_CMD_FILL8, p->gpa(0), page_size(), 0x77);
      if (!f.ok) return 12;
      rep.write("accessing");
      volatile uint8_t* addr = p->hva(0, 100);
      if (a == Access::Read) {
        uint8_t v = *addr;
        rep.write(" read " + std::to_string(v));
      } else {
        *addr = 1;
        rep.write(" wrote");
      }
      return 0;
    }, 60s);
    const char* what = a == Access::Read ? "read" : "write";
    EXPECT_TRUE(o.killed_by(SIGSEGV)) << what << ": " << o.describe();
    EXPECT_EQ(o.output, "accessing") << what << ": the child must die at the access";
  }
  // The host is alive: a new protected guest still runs.
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 0, 0x55);
}

// PKVM-003: a syscall that touches unshared memory fails with EFAULT or reclaims the page
// (then zeroed, and the guest's next access makes KVM_RUN fail with EFAULT).
// Whether `len` bytes the host obtained from guest page data (read at page offset 0) hold any
// word of the pattern the guest wrote there with `seed` (a reclaim must not hand them out).
bool holds_guest_pattern(const void* data, size_t len, uint64_t seed) {
  const auto* w = static_cast<const uint64_t*>(data);
  for (size_t i = 0; i < len / 8; i++)
    if (w[i] == (seed ^ (i * CVM_PATTERN_MUL))) return true;
  return false;
}

void check_syscall_outcome(Pvm& p, uint64_t page, long rc, int err, const char* what) {
  if (rc < 0) {
    EXPECT_EQ(err, EFAULT) << what << " into a donated page failed with " << errno_name(err);
    ::testing::Test::RecordProperty("observation", std::string(what) + " -> " + errno_name(err));
    // The guest keeps its page.
    auto c = p.cmd->op(CVM_CMD_READ64, p.gpa(page));
    EXPECT_TRUE(c.ok) << c.event.describe();
    return;
  }
  ::testing::Test::RecordProperty("observation", std::string(what) + " succeeded (reclaim)");
  auto c = p.cmd->op(CVM_CMD_READ64, p.gpa(page));
  ASSERT_FALSE(c.ok) << what << " succeeded on a donated page, yet the guest still reads it ("
                     << hex(c.value) << "): neither EFAULT nor a reclaim";
  EXPECT_EQ(c.event.kind, Kind::Exit) << c.event.describe();
  EXPECT_EQ(c.event.exit.run_errno, EFAULT) << c.event.describe();
}

CVM_TEST_F(Pkvm, ReadSyscallIntoUnsharedPage, "PKVM-003", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 2, 0x77);
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  char buf[64];
  std::memset(buf, 0x3c, sizeof buf);
  ASSERT_EQ(write(fds[1], buf, sizeof buf), static_cast<ssize_t>(sizeof buf));
  errno = 0;
  long rc = read(fds[0], p.hva(2), sizeof buf);
  int err = errno;
  close(fds[0]);
  close(fds[1]);
  check_syscall_outcome(p, 2, rc, err, "read()");
}

CVM_TEST_F(Pkvm, ProcessVmReadvOfUnsharedPage, "PKVM-003", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 3, 0x78);
  char buf[64];
  iovec local{buf, sizeof buf}, remote{p.hva(3), sizeof buf};
  errno = 0;
  std::memset(buf, 0xee, sizeof buf);
  long rc = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
  int err = errno;
  if (rc > 0) {
    EXPECT_FALSE(holds_guest_pattern(buf, static_cast<size_t>(rc), 0x78))
        << "process_vm_readv handed the guest's private data to the host";
  }
  check_syscall_outcome(p, 3, rc, err, "process_vm_readv()");
}

// io_uring: registering a donated page as a fixed buffer takes a long-term pin (KVM already
// holds one: the "exclusive pin" question of seed 004); a read into it must then fail or
// reclaim. The observation records what the kernel did at each step.
CVM_TEST_F(Pkvm, IoUringFixedBufferOnUnsharedPage, "PKVM-003", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 4, 0x79);
  io_uring ring;
  int rc = io_uring_queue_init(4, &ring, 0);
  if (rc < 0) GTEST_SKIP() << testing::kCapabilityAbsent << "io_uring_queue_init: " << errno_name(-rc);
  iovec iov{p.hva(4), page_size()};
  rc = io_uring_register_buffers(&ring, &iov, 1);
  if (rc < 0) {
    RecordProperty("pin", std::string("io_uring_register_buffers -> ") + errno_name(-rc));
    io_uring_queue_exit(&ring);
    EXPECT_EQ(-rc, EFAULT) << "registering a donated page failed with " << errno_name(-rc);
    auto c = p.cmd->op(CVM_CMD_CHECK_PATTERN, p.gpa(4), page_size(), 0x79);
    CVM_ASSERT_CMD(c);
    EXPECT_EQ(c.value, UINT64_MAX);
    return;
  }
  RecordProperty("pin", "io_uring_register_buffers succeeded (a second long-term pin)");
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  char buf[64];
  std::memset(buf, 0x3d, sizeof buf);
  ASSERT_EQ(write(fds[1], buf, sizeof buf), static_cast<ssize_t>(sizeof buf));
  io_uring_sqe* sqe = io_uring_get_sqe(&ring);
  io_uring_prep_read_fixed(sqe, fds[0], p.hva(4), sizeof buf, static_cast<__u64>(-1), 0);
  io_uring_submit(&ring);
  io_uring_cqe* cqe = nullptr;
  int res = -EIO;
  if (io_uring_wait_cqe(&ring, &cqe) == 0) {
    res = cqe->res;
    io_uring_cqe_seen(&ring, cqe);
  }
  io_uring_unregister_buffers(&ring);
  io_uring_queue_exit(&ring);
  close(fds[0]);
  close(fds[1]);
  check_syscall_outcome(p, 4, res < 0 ? -1 : res, res < 0 ? -res : 0, "io_uring READ_FIXED");
}

// PKVM-004: a page the guest shares back is the host's to read (with the guest's data) and
// write; after MEM_UNSHARE host access faults again.
CVM_TEST_F(Pkvm, SharedPageIsAccessibleAndUnshareRevokesIt, "PKVM-004", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 5, 0x4242);
  auto sh = p.hvc(uapi::pkvm::kSmcccMemShare, p.gpa(5));
  CVM_ASSERT_CMD(sh);
  ASSERT_EQ(static_cast<int64_t>(sh.value), uapi::pkvm::kSmcccSuccess) << "MEM_SHARE";
  uint64_t w = 0;
  FaultResult r = probe_read(p.hva(5, 8), 8, reinterpret_cast<uint8_t*>(&w));
  ASSERT_FALSE(r.faulted()) << "host read of a shared page: " << r.describe();
  EXPECT_EQ(w, 0x4242ull ^ (1 * CVM_PATTERN_MUL)) << "the host must see the guest's data";
  r = probe_write(p.hva(5, 16), 0x11, 1);
  ASSERT_FALSE(r.faulted()) << "host write to a shared page: " << r.describe();
  auto g = p.cmd->read8(p.gpa(5, 16));
  CVM_ASSERT_CMD(g);
  EXPECT_EQ(g.value, 0x11u) << "the guest must see the host's write";
  auto un = p.hvc(uapi::pkvm::kSmcccMemUnshare, p.gpa(5));
  CVM_ASSERT_CMD(un);
  ASSERT_EQ(static_cast<int64_t>(un.value), uapi::pkvm::kSmcccSuccess) << "MEM_UNSHARE";
  r = probe_read(p.hva(5, 8), 8);
  EXPECT_TRUE(r.sigsegv()) << "host read after MEM_UNSHARE: " << r.describe();
  auto c = p.cmd->read8(p.gpa(5, 16));
  CVM_ASSERT_CMD(c);
  EXPECT_EQ(c.value, 0x11u) << "unsharing keeps the page's contents for the guest";
}

// Sharing a page that is not the guest's (never touched) or twice is refused.
CVM_TEST_F(Pkvm, DoubleShareIsRefused, "PKVM-004", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 6, 1);
  auto a = p.hvc(uapi::pkvm::kSmcccMemShare, p.gpa(6));
  CVM_ASSERT_CMD(a);
  ASSERT_EQ(static_cast<int64_t>(a.value), 0);
  auto b = p.hvc(uapi::pkvm::kSmcccMemShare, p.gpa(6));
  CVM_ASSERT_CMD(b);
  EXPECT_EQ(static_cast<int64_t>(b.value), uapi::pkvm::kSmcccInvalidParameter)
      << "sharing an already shared page";
}

// PKVM-005: memslots cannot be moved or deleted once the pVM ran.
CVM_TEST_F(Pkvm, MemslotsAreFixedAfterThePvmRan, "PKVM-005", "PKVM-008") {
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_));
  guest_fills(p, 0, 2);
  auto del = p.gvm->vm().set_user_memory_region(kTestSlot, 0, CVM_TEST_MEM_GPA, 0, 0);
  ASSERT_FALSE(del.ok()) << "deleting a memslot of a pVM that ran succeeded";
  EXPECT_EQ(del.err(), EPERM) << del.error();
  auto mv = p.gvm->vm().set_user_memory_region(kTestSlot, 0, CVM_TEST_MEM_GPA + (1ULL << 30),
                                               p.mem.size(),
                                               reinterpret_cast<uint64_t>(p.mem.data()));
  ASSERT_FALSE(mv.ok()) << "moving a memslot of a pVM that ran succeeded";
  EXPECT_EQ(mv.err(), EPERM) << mv.error();
  auto c = p.cmd->op(CVM_CMD_CHECK_PATTERN, p.gpa(0), page_size(), 2);
  CVM_ASSERT_CMD(c);
  EXPECT_EQ(c.value, UINT64_MAX) << "the slot must still be where it was";
}

// PKVM-006: file-backed memory cannot back a pVM: the guest's first access to it fails
// KVM_RUN (a page-cache page is not mapped into the guest), and the host survives. The file is
// on a ramfs: its pages are page cache and not swap-backed (shmem/tmpfs and memfd pages are
// swap-backed, which pkvm.rst allows: "with the exception of swap").
CVM_TEST_F(Pkvm, FileBackedMemoryCannotBackThePvm, "PKVM-006", "PKVM-008") {
  char dir[] = "/tmp/cvmconf-ramfs-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr) << "mkdtemp: " << errno_name(errno);
  if (mount("ramfs", dir, "ramfs", 0, nullptr) != 0) {
    int e = errno;
    rmdir(dir);
    GTEST_SKIP() << testing::kCapabilityAbsent << "mounting a ramfs (page cache that is not "
                 << "swap-backed) failed: " << errno_name(e);
  }
  std::string path = std::string(dir) + "/backing";
  int fd = open(path.c_str(), O_RDWR | O_CREAT, 0600);
  int open_errno = errno;
  Result<Mapping> m = SysError{open_errno, "open " + path};
  if (fd >= 0 && ftruncate(fd, static_cast<off_t>(kPages * page_size())) == 0)
    m = Mapping::map(kPages * page_size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (fd >= 0) close(fd);
  umount2(dir, MNT_DETACH);  // the mapping keeps the file; the mount point goes now
  rmdir(dir);
  ASSERT_TRUE(m.ok()) << testing::harness_error("mapping a tmpfs file", m.error());
  std::memset(m->data(), 0x21, kPages * page_size());
  CVM_ASSIGN_OR_FAIL(Pvm p, Pvm::create(*kvm_, 1, std::move(m.value())));
  auto c = p.cmd->read8(p.gpa(0));
  ASSERT_FALSE(c.ok) << "the pVM read file-backed (ramfs) memory (" << hex(c.value) << ")";
  EXPECT_EQ(c.event.kind, Kind::Exit) << c.event.describe();
  EXPECT_NE(c.event.exit.run_errno, 0) << "KVM_RUN must fail: " << c.event.describe();
  RecordProperty("observation", "KVM_RUN -> " + std::string(errno_name(c.event.exit.run_errno)));
}

// PKVM-007: donated pages count against RLIMIT_MEMLOCK: without CAP_IPC_LOCK and with a limit
// below what the guest touches, KVM_RUN fails cleanly (ENOMEM) instead of over-committing.
CVM_TEST_F(Pkvm, PvmLargerThanMemlockLimitFailsCleanly, "PKVM-007", "PKVM-008") {
  ChildOutcome o = run_in_child([&](const ChildReport& rep) {
    // Drop CAP_IPC_LOCK (14) from the effective set; keep the rest.
    struct {
      uint32_t version;
      int pid;
    } hdr{0x20080522, 0};
    struct {
      uint32_t effective, permitted, inheritable;
    } data[2]{};
    if (syscall(SYS_capget, &hdr, data) != 0) return 20;
    data[0].effective &= ~(1u << 14);
    if (syscall(SYS_capset, &hdr, data) != 0) return 21;
    auto k = Kvm::open();
    if (!k) return 22;
    auto p = Pvm::create(k.value());
    if (!p) {
      rep.write("boot: " + p.error().message());
      return 23;
    }
    // The boot pages are donated now; allow only what is locked already plus two pages.
    rlimit rl{};
    getrlimit(RLIMIT_MEMLOCK, &rl);
    std::string status;
    {
      FILE* f = std::fopen("/proc/self/status", "r");
      char line[256];
      while (f && std::fgets(line, sizeof line, f))
        if (std::strncmp(line, "VmLck:", 6) == 0) status = line + 6;
      if (f) std::fclose(f);
    }
    uint64_t locked_kb = std::strtoull(status.c_str(), nullptr, 10);
    rl.rlim_cur = locked_kb * 1024 + 2 * page_size();
    if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0) return 24;
    for (uint64_t i = 0; i < kPages; i++) {
      auto w = p->cmd->write8(p->gpa(i), 1);
      if (!w.ok) {
        rep.write("page " + std::to_string(i) + ": " + w.event.describe() + "|errno " +
                  errno_name(w.event.exit.run_errno));
        return 0;
      }
    }
    rep.write("all " + std::to_string(kPages) + " pages mapped with VmLck " + status);
    return 1;
  }, 60s);
  ASSERT_EQ(o.kind, ChildOutcome::Exited) << o.describe();
  ASSERT_NE(o.code, 1) << "the limit was not enforced: " << o.output;
  ASSERT_EQ(o.code, 0) << "set-up failed in the child: " << o.describe();
  RecordProperty("observation", o.output);
  EXPECT_NE(o.output.find("errno ENOMEM"), std::string::npos) << o.output;
}

}  // namespace
}  // namespace cvm::suites

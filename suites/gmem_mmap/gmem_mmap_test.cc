// guest_memfd mappings: who may map, SIGBUS on private pages and past the end of the file (also
// while a vCPU runs), a second process that receives the fd, lazy faulting.
// Requirements: MMAP-003 .. MMAP-007, MMAP-010, MMAP-013 (suites/requirements.yaml).
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "busy_vcpu.h"
#include "cvmconf/fault.h"
#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint64_t kMmap = uapi::kGmemFlagMmap;
constexpr uint64_t kShared = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;

class GmemMmap : public PlatformTest {
 protected:
  // Probes every page of [addr, addr+len) for read and write from the calling thread; returns a
  // description of the first page that did not raise SIGBUS, or "" if all did.
  static std::string expect_all_sigbus(uint8_t* addr, size_t len) {
    for (size_t off = 0; off < len; off += page_size()) {
      for (Access a : {Access::Read, Access::Write}) {
        FaultResult r = a == Access::Read ? probe_read(addr + off) : probe_write(addr + off, 0x5a);
        if (!r.sigbus() || r.fault_addr != reinterpret_cast<uintptr_t>(addr + off))
          return std::string(a == Access::Read ? "read" : "write") + " of page " +
                 std::to_string(off / page_size()) + ": " + r.describe();
      }
    }
    return "";
  }

  // A guest_memfd of `vm` (file_pages pages) mapped over map_pages pages, for probes that run
  // while a vCPU runs: they cannot ASSERT on another thread, so the error comes back as text.
  struct MappedGmem {
    GuestMemfd file;
    Mapping map;
  };
  static Result<MappedGmem> map_gmem(const Vm& vm, uint64_t file_pages, uint64_t flags,
                                     uint64_t map_pages) {
    auto g = vm.create_guest_memfd(file_pages * page_size(), flags);
    if (!g) return g.error();
    auto m = g->map(map_pages * page_size());
    if (!m) return m.error();
    return MappedGmem{std::move(g.value()), std::move(m.value())};
  }

  // Runs probe (which returns "" on success) on this thread and on a second thread while a vCPU
  // of a payload VM of this platform runs; both must succeed, and the vCPU must keep running.
  void while_vcpu_runs(const std::function<std::string(GuestVm&)>& probe) {
    GuestVmOptions o;
    o.platform = &platform();
    auto g = GuestVm::create(kvm(), o);
    ASSERT_TRUE(g.ok()) << testing::harness_error("GuestVm::create", g.error());
    auto busy = BusyVcpu::start(*g.value());
    ASSERT_TRUE(busy.ok()) << testing::harness_error("booting the busy-loop payload", busy.error());
    ASSERT_TRUE(busy.value()->running()) << "the guest loop did not start";
    std::string other;
    std::thread t([&] {
      for (int i = 0; i < 50 && other.empty(); i++) other = probe(*g.value());
    });
    std::string here;
    for (int i = 0; i < 50 && here.empty(); i++) here = probe(*g.value());
    t.join();
    EXPECT_EQ(here, "") << "main thread";
    EXPECT_EQ(other, "") << "second thread";
    UcallEvent ev = busy.value()->stop();
    CVM_EXPECT_SYNC(ev, 1);
    EXPECT_GT(ev.args.size() > 1 ? ev.args[1] : 0, 0u) << "the vCPU made no progress";
  }
};

CVM_TEST_P(GmemMmap, MmapWithoutMmapFlagIsEnodev, "MMAP-003") {
  GuestMemfd g = new_gmem(4, 0);
  ASSERT_TRUE(g.valid());
  auto one = g.map(page_size());
  EXPECT_EQ(one.err(), ENODEV) << (one.ok() ? std::string("mapped") : one.error().message());
  auto all = g.map(4 * page_size());
  EXPECT_EQ(all.err(), ENODEV) << (all.ok() ? std::string("mapped") : all.error().message());
}

CVM_TEST_P(GmemMmap, MapPrivateRefused, "MMAP-004") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  for (uint64_t flags : {kMmap, kShared}) {
    if (gmem_flags_unsupported(flags)) continue;
    GuestMemfd g = new_gmem(4, flags);
    ASSERT_TRUE(g.valid());
    auto m = g.map(4 * page_size(), PROT_READ | PROT_WRITE, 0, MAP_PRIVATE);
    EXPECT_EQ(m.err(), EINVAL) << "flags " << hexval(static_cast<long>(flags)) << ": "
                               << (m.ok() ? std::string("MAP_PRIVATE accepted") : m.error().message());
  }
}

CVM_TEST_P(GmemMmap, ProtExecBehaviourRecorded, "MMAP-005") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  GuestMemfd g = new_gmem(1, kShared);
  ASSERT_TRUE(g.valid());
  auto rw = g.map(page_size());
  ASSERT_TRUE(ok(rw));
  std::memset(rw->data(), 0xc3, page_size());
  auto x = g.map(page_size(), PROT_READ | PROT_EXEC);
  if (!x.ok()) {
    RecordProperty("observation", std::string("PROT_EXEC mapping refused with ") +
                                      errno_name(x.err()));
    EXPECT_TRUE(x.err() == EPERM || x.err() == EACCES || x.err() == EINVAL)
        << "a refusal must be a permission or argument error: " << x.error();
    return;
  }
  RecordProperty("observation", "PROT_EXEC mapping allowed");
  uint8_t b = 0;
  auto r = probe_read(x->data(), 1, &b);
  EXPECT_FALSE(r.faulted()) << "an allowed executable mapping must be readable: " << r.describe();
  EXPECT_EQ(b, 0xc3) << "and show the same shared data";
}

CVM_TEST_P(GmemMmap, PrivatePagesSigbusOnReadAndWrite, "MMAP-006") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  GuestMemfd g = new_gmem(4, kMmap);  // no INIT_SHARED: every page is private
  ASSERT_TRUE(g.valid());
  CVM_ASSIGN_OR_FAIL(Mapping m, g.map(4 * page_size()));
  EXPECT_EQ(expect_all_sigbus(m.data(), m.size()), "");
  // Allocated private pages are just as inaccessible as unallocated ones.
  ASSERT_TRUE(ok(g.allocate(0, 4 * page_size())));
  EXPECT_EQ(expect_all_sigbus(m.data(), m.size()), "");
}

CVM_TEST_P(GmemMmap, PrivatePagesSigbusWhileVcpuRuns, "MMAP-006") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  CVM_SKIP_IF(payloads_unsupported());
  while_vcpu_runs([&](GuestVm& gvm) -> std::string {
    auto g = map_gmem(gvm.vm(), 4, kMmap, 4);
    if (!g) return g.error().message();
    return expect_all_sigbus(g->map.data(), g->map.size());
  });
}

CVM_TEST_P(GmemMmap, PastEndOfFileSigbus, "MMAP-007") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  const size_t ps = page_size();
  GuestMemfd g = new_gmem(4, kShared);
  ASSERT_TRUE(g.valid());
  auto m = g.map(8 * ps);  // mapping twice the file size is allowed; the tail must SIGBUS
  ASSERT_TRUE(ok(m));
  FaultResult w = probe_write(m->data(), 0xaa, 4 * ps);
  EXPECT_FALSE(w.faulted()) << "inside the file: " << w.describe();
  EXPECT_EQ(expect_all_sigbus(m->data() + 4 * ps, 4 * ps), "");
  // A write that runs off the end faults exactly at the end and keeps what it wrote before.
  FaultResult over = probe_write(m->data() + 3 * ps, 0xbb, 2 * ps);
  EXPECT_TRUE(over.sigbus()) << over.describe();
  EXPECT_EQ(over.bytes_done, ps);
  EXPECT_EQ(m->data()[0], 0xaa);
  EXPECT_EQ(m->data()[4 * ps - 1], 0xbb);
}

CVM_TEST_P(GmemMmap, PastEndOfFileSigbusWhileVcpuRuns, "MMAP-007") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  CVM_SKIP_IF(payloads_unsupported());
  while_vcpu_runs([&](GuestVm& gvm) -> std::string {
    auto g = map_gmem(gvm.vm(), 2, kShared, 4);  // mapped twice the file size
    if (!g) return g.error().message();
    FaultResult in = probe_write(g->map.data(), 1, 2 * page_size());
    if (in.faulted()) return "inside the file: " + in.describe();
    return expect_all_sigbus(g->map.data() + 2 * page_size(), 2 * page_size());
  });
}

// One byte and room for one SCM_RIGHTS fd: what send_fd sends and recv_fd receives.
struct FdMessage {
  char byte = 'F';
  iovec iov{&byte, 1};
  alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  FdMessage() {
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl;
    msg.msg_controllen = sizeof ctrl;
  }
  FdMessage(const FdMessage&) = delete;
};

// Sends fd over a unix socket.
bool send_fd(int sock, int fd) {
  FdMessage m;
  cmsghdr* c = CMSG_FIRSTHDR(&m.msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  return sendmsg(sock, &m.msg, 0) == 1;
}

int recv_fd(int sock) {
  FdMessage m;
  if (recvmsg(sock, &m.msg, 0) != 1) return -1;
  cmsghdr* c = CMSG_FIRSTHDR(&m.msg);
  if (!c || c->cmsg_type != SCM_RIGHTS) return -1;
  int fd;
  std::memcpy(&fd, CMSG_DATA(c), sizeof fd);
  return fd;
}

CVM_TEST_P(GmemMmap, ReceivedFdSeesSameDataAndPunchedZeroes, "MMAP-010") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  const size_t ps = page_size();
  GuestMemfd g = new_gmem(4, kShared);
  ASSERT_TRUE(g.valid());
  CVM_ASSIGN_OR_FAIL(Mapping m, g.map(4 * ps));
  for (size_t i = 0; i < 4; i++) std::memset(m.data() + i * ps, 0x10 + static_cast<int>(i), ps);
  int sv[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  const int inherited = g.fd();
  // The child drops the fd it inherited and works only with the one it receives.
  auto child = ChildProcess::spawn(
      [&](const ChildReport& rep) -> int {
        close(sv[0]);
        close(inherited);
        int fd = recv_fd(sv[1]);
        if (fd < 0) return rep.write("no fd received"), 10;
        void* p = mmap(nullptr, 4 * ps, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) return rep.write("mmap failed"), 11;
        auto* c = static_cast<uint8_t*>(p);
        for (size_t i = 0; i < 4; i++)
          for (size_t off = 0; off < ps; off += 512)
            if (c[i * ps + off] != 0x10 + i) return rep.write("page " + std::to_string(i) + " differs"), 12;
        c[3 * ps] = 0x99;  // a write the parent must see
        char go = 'r';
        if (write(sv[1], &go, 1) != 1 || read(sv[1], &go, 1) != 1) return 13;
        // The parent punched page 1: it must read as zeroes here too, never the old bytes.
        for (size_t off = 0; off < ps; off++)
          if (c[ps + off] != 0) return rep.write("punched page not zero at " + std::to_string(off)), 14;
        if (c[0] != 0x10 || c[2 * ps] != 0x12) return rep.write("neighbours changed"), 15;
        return 0;
      });
  close(sv[1]);
  ASSERT_TRUE(send_fd(sv[0], g.fd())) << strerror(errno);
  char msg = 0;
  pollfd pf{sv[0], POLLIN, 0};
  bool ready = poll(&pf, 1, 20000) == 1 && read(sv[0], &msg, 1) == 1 && msg == 'r';
  if (ready) {
    EXPECT_EQ(m.data()[3 * ps], 0x99) << "the child's write must be visible here";
    ASSERT_TRUE(ok(g.punch_hole(ps, ps)));
    msg = 'g';
    EXPECT_EQ(write(sv[0], &msg, 1), 1);
  }
  ChildOutcome out = child.wait(std::chrono::seconds(20));
  close(sv[0]);
  EXPECT_TRUE(ready) << "the child never reported that it mapped the fd";
  EXPECT_TRUE(out.exited_with(0)) << "child " << out.describe() << ": " << out.output;
}

CVM_TEST_P(GmemMmap, MappingFaultsLazily, "MMAP-013") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  const size_t ps = page_size();
  GuestMemfd g = new_gmem(4, kShared);
  ASSERT_TRUE(g.valid());
  CVM_ASSIGN_OR_FAIL(Mapping m, g.map(4 * ps));
  auto resident = [&] {
    unsigned char v[4] = {};
    EXPECT_EQ(mincore(m.data(), 4 * ps, v), 0) << strerror(errno);
    std::string s;
    for (unsigned char c : v) s += (c & 1) ? '1' : '0';
    return s;
  };
  EXPECT_EQ(resident(), "0000") << "mapping alone must not fault anything in";
  m.data()[ps] = 1;
  EXPECT_EQ(resident(), "0100") << "touching page 1 faults in exactly page 1";
  (void)*static_cast<volatile uint8_t*>(m.data() + 3 * ps);
  EXPECT_EQ(resident(), "0101") << "a read faults the page in too";
  ASSERT_TRUE(ok(g.punch_hole(ps, ps)));
  EXPECT_EQ(resident(), "0001") << "a punched page is gone until touched again";
  EXPECT_EQ(m.data()[ps], 0) << "and reads back as zero";
  EXPECT_EQ(resident(), "0101");
}

CVM_INSTANTIATE_FOR_PLATFORMS(GmemMmap);

}  // namespace
}  // namespace cvm::suites

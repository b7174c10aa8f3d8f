// Kvm / Vm / Vcpu / GuestMemfd objects against the real kernel.
#include <gtest/gtest.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cvmconf/kvm.h"
#include "cvmconf/probe.h"

namespace cvm {
namespace {

class KvmObjects : public ::testing::Test {
 protected:
  void SetUp() override {
    auto k = Kvm::open();
    if (!k) GTEST_SKIP() << "capability absent: " << k.error();
    kvm.emplace(std::move(k.value()));
  }
  std::optional<Kvm> kvm;
};

TEST_F(KvmObjects, OpenReportsMissingDeviceWithPath) {
  auto k = Kvm::open("/nonexistent/kvm");
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.err(), ENOENT);
  EXPECT_NE(k.error().message().find("/nonexistent/kvm"), std::string::npos);
}

TEST_F(KvmObjects, OpenRejectsANonKvmDevice) {
  auto k = Kvm::open("/dev/null");
  ASSERT_FALSE(k.ok());
  EXPECT_EQ(k.err(), ENOTTY) << k.error();
}

TEST_F(KvmObjects, CreateVmAndVcpu) {
  auto vm = kvm->create_vm(0);
  ASSERT_TRUE(vm.ok()) << vm.error();
  auto v = vm->create_vcpu(0);
  ASSERT_TRUE(v.ok()) << v.error();
  EXPECT_EQ(v->id(), 0);
  // Creating the same vCPU id twice fails with EEXIST.
  auto dup = vm->create_vcpu(0);
  EXPECT_EQ(dup.err(), EEXIST);
}

TEST_F(KvmObjects, KickBeforeRunMakesRunReturnAtOnce) {
  auto vm = kvm->create_vm(0);
  ASSERT_TRUE(vm.ok());
  auto v = vm->create_vcpu(0);
  ASSERT_TRUE(v.ok());
  v->kick();  // sets immediate_exit: the next KVM_RUN returns EINTR without entering the guest
  ExitInfo e = v->run(std::chrono::seconds(5));
  EXPECT_EQ(e.kind, ExitKind::Interrupted) << e.describe();
  EXPECT_FALSE(v->last_run_timed_out());
  EXPECT_TRUE(v->last_run_kicked());
  EXPECT_EQ(v->run_struct()->immediate_exit, 0) << "immediate_exit must be cleared after use";
}

TEST_F(KvmObjects, GuestMemfdBasics) {
  if (kvm->check_extension(uapi::cap::kGuestMemfd) <= 0)
    GTEST_SKIP() << "capability absent: KVM_CAP_GUEST_MEMFD";
  auto vm = kvm->create_vm(0);
  ASSERT_TRUE(vm.ok());
  const uint64_t sz = 4 * page_size();
  auto g = vm->create_guest_memfd(sz, 0);
  ASSERT_TRUE(g.ok()) << g.error();
  struct stat st {};
  ASSERT_EQ(fstat(g->fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), sz);
  EXPECT_TRUE(g->allocate(0, sz).ok());
  EXPECT_TRUE(g->punch_hole(0, page_size()).ok());
  auto bad = vm->create_guest_memfd(page_size() + 1, 0);
  EXPECT_EQ(bad.err(), EINVAL);
  EXPECT_NE(bad.error().message().find("KVM_CREATE_GUEST_MEMFD"), std::string::npos);
}

TEST_F(KvmObjects, MemslotWithGuestMemfd) {
  auto vm = kvm->create_vm(0);
  ASSERT_TRUE(vm.ok());
  if (vm->check_extension(uapi::cap::kUserMemory2) <= 0 ||
      vm->check_extension(uapi::cap::kGuestMemfd) <= 0)
    GTEST_SKIP() << "capability absent: KVM_CAP_USER_MEMORY2/KVM_CAP_GUEST_MEMFD";
  auto g = vm->create_guest_memfd(2 * page_size(), 0);
  ASSERT_TRUE(g.ok());
  MemslotSpec s;
  s.slot = 1;
  s.flags = uapi::kMemGuestMemfd;
  s.gpa = 1ULL << 32;
  s.size = 2 * page_size();
  s.gmem_fd = g->fd();
  auto backing = Mapping::anonymous(s.size);
  ASSERT_TRUE(backing.ok());
  s.hva = reinterpret_cast<uint64_t>(backing->data());
  EXPECT_TRUE(vm->set_memslot(s).ok());
  // Binding past the end of the file is refused (virt/kvm/guest_memfd.c, kvm_gmem_bind).
  MemslotSpec s2 = s;
  s2.slot = 2;
  s2.gpa = 2ULL << 32;
  s2.gmem_offset = page_size() * 2;
  EXPECT_EQ(vm->set_memslot(s2).err(), EINVAL);
  EXPECT_TRUE(vm->delete_memslot(1).ok());
}

}  // namespace
}  // namespace cvm

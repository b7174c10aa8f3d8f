// The asserting forms (gtest_support.h) and the one ioctl path (fd.h, kvm.h), without a kernel
// feature: what a failing call reports, and that a success assigns the value.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <string>

#include "cvmconf/gtest_support.h"
#include "cvmconf/kvm.h"

namespace cvm {
namespace {

Result<int> seven() { return 7; }
Result<int> refused() { return SysError{EINVAL, "KVM_SOMETHING(arg=0x1)"}; }

void assign_refused() {
  CVM_ASSIGN_OR_FAIL(int v, refused());
  (void)v;
}

TEST(AssertingForms, AssignOrFailDeclaresTheValue) {
  CVM_ASSIGN_OR_FAIL(int v, seven());
  EXPECT_EQ(v, 7);
  int w = 0;
  CVM_ASSIGN_OR_FAIL(w, seven());
  EXPECT_EQ(w, 7);
}

TEST(AssertingForms, AssignOrFailFailsNamingTheCallAndItsErrno) {
  EXPECT_FATAL_FAILURE(assign_refused(), "refused(): KVM_SOMETHING(arg=0x1): Invalid argument (EINVAL)");
}

TEST(AssertingForms, OkCarriesTheError) {
  EXPECT_TRUE(testing::ok(Result<void>()));
  const auto r = testing::ok(Result<void>(SysError{EBADF, "KVM_RUN"}));
  EXPECT_FALSE(r);
  EXPECT_EQ(std::string(r.message()), "KVM_RUN: Bad file descriptor (EBADF)");
}

TEST(OneIoctlPath, ErrorsComeBackAsMinusErrno) {
  EXPECT_EQ(ioctl_retrying(-1, KVM_GET_API_VERSION, 0ul), -EBADF);
  auto r = kvm_ioctl(-1, -1, KVM_GET_API_VERSION, 0ul, "KVM_GET_API_VERSION");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.err(), EBADF);
  EXPECT_EQ(r.error().dead_vm_fd, -1);
}

TEST(OneIoctlPath, AKilledVmIsNamedInTheMessage) {
  SysError e{EIO, "KVM_SET_USER_MEMORY_REGION2(slot=1)"};
  e.dead_vm_fd = 9;
  EXPECT_EQ(e.message(),
            "KVM_SET_USER_MEMORY_REGION2(slot=1): Input/output error (EIO); KVM has killed the VM "
            "(fd 9): every ioctl on it fails with EIO, the kernel log says why");
}

TEST(OneIoctlPath, ALiveVmIsNotDead) {
  EXPECT_FALSE(vm_is_dead(-1));
  auto kvm = Kvm::open();
  if (!kvm) GTEST_SKIP() << "capability absent: " << kvm.error();
  auto vm = kvm->create_vm(0);
  ASSERT_TRUE(vm.ok()) << vm.error();
  EXPECT_FALSE(vm_is_dead(vm->fd()));
  // A failing ioctl on a live VM is that ioctl's error, not a killed VM.
  auto r = kvm_ioctl(vm->fd(), vm->fd(), 0xdeadul, 0ul, "bogus");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.error().dead_vm_fd, -1);
}

}  // namespace
}  // namespace cvm

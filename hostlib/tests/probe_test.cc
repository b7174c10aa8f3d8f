// The capability probe against the real kernel, and its JSON form.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"

namespace cvm {
namespace {

TEST(Probe, MissingDeviceIsReportedNotFatal) {
  setenv("CVMCONF_KVM_DEVICE", "/nonexistent/kvm", 1);
  Capabilities c = probe_capabilities();
  unsetenv("CVMCONF_KVM_DEVICE");
  EXPECT_FALSE(c.kvm_available);
  EXPECT_EQ(c.kvm_errno, ENOENT);
  EXPECT_NE(c.kvm_error.find("/nonexistent/kvm"), std::string::npos) << c.kvm_error;
  auto j = c.to_json();
  EXPECT_EQ(j["kvm_available"], false);
  EXPECT_EQ(j["kvm_errno"], "ENOENT");
}

TEST(Probe, AgreesWithTheKernel) {
  Capabilities c = probe_capabilities();
  if (!c.kvm_available) GTEST_SKIP() << "capability absent: " << c.kvm_error;
  EXPECT_EQ(c.api_version, 12);
  // The default VM type always exists and is creatable.
  ASSERT_TRUE(c.has_vm_type(0));
  const VmTypeCaps* d = c.vm(0);
  ASSERT_NE(d, nullptr);
  EXPECT_TRUE(d->creatable);
  // Every type reported creatable really was created; every advertised-but-failing type says why.
  for (const auto& t : c.per_type) {
    if (t.creatable) {
      EXPECT_TRUE(c.has_vm_type(t.type)) << t.name;
    } else {
      EXPECT_FALSE(t.create_error.empty()) << t.name;
    }
  }
  // GUEST_MEMFD_FLAGS is a bitmask: INIT_SHARED implies MMAP where reported
  // (guest_memfd_test.c, test_guest_memfd).
  for (const auto& t : c.per_type) {
    if (t.creatable && t.guest_memfd_flags > 0 && (t.guest_memfd_flags & 2)) {
      EXPECT_TRUE(t.guest_memfd_flags & 1) << t.name;
    }
  }
  auto j = c.to_json();
  EXPECT_TRUE(j.contains("vm_types"));
  EXPECT_EQ(j["system"]["KVM_CAP_GUEST_MEMFD"], c.guest_memfd);
}

}  // namespace
}  // namespace cvm

// Platform registry and availability rules (unit: synthetic capability sets).
#include <gtest/gtest.h>

#include <set>

#include "cvmconf/platform.h"

namespace cvm {
namespace {

TEST(Platforms, IdsAreUniqueAndDefaultComesFirst) {
  std::set<std::string> ids;
  for (const Platform* p : platforms()) EXPECT_TRUE(ids.insert(p->id()).second) << p->id();
  EXPECT_EQ(&default_platform(), platforms().front());
  EXPECT_FALSE(default_platform().has_private_memory());
  EXPECT_EQ(find_platform(default_platform().id()), &default_platform());
  EXPECT_EQ(find_platform("no-such-platform"), nullptr);
}

TEST(Platforms, UnavailableWithoutKvmNamesTheError) {
  Capabilities c;
  c.kvm_available = false;
  c.kvm_error = "open /dev/kvm: No such file or directory (ENOENT)";
  for (const Platform* p : platforms()) {
    auto why = p->unavailable(c);
    ASSERT_TRUE(why.has_value()) << p->id();
    EXPECT_NE(why->find("/dev/kvm"), std::string::npos) << *why;
    EXPECT_EQ(why->rfind("capability absent: ", 0), 0u) << *why;
  }
}

TEST(Platforms, VmTypeMustBeCreatable) {
  Capabilities c;
  c.kvm_available = true;
  c.vm_types = 1;  // only the default type
  VmTypeCaps d;
  d.type = default_platform().vm_type();
  d.creatable = true;
  c.per_type.push_back(d);
  VmTypeCaps t;
  t.type = 4;
  t.name = "x86-snp";
  t.create_error = "not advertised in KVM_CAP_VM_TYPES (0x1)";
  c.per_type.push_back(t);
  EXPECT_FALSE(default_platform().unavailable(c).has_value());
  auto why = vm_type_unavailable(c, 4);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("KVM_CAP_VM_TYPES (0x1)"), std::string::npos) << *why;
}

// arm64's protected type is bit 31: availability must come from creating it, not from a
// shift of the 64-bit vm_types mask (which is undefined for such a type).
TEST(Platforms, HighBitVmTypeIsAvailableWhenCreated) {
  Capabilities c;
  c.kvm_available = true;
  VmTypeCaps t;
  t.type = 1UL << 31;
  t.creatable = true;
  c.per_type.push_back(t);
  EXPECT_TRUE(c.has_vm_type(1UL << 31));
  EXPECT_FALSE(vm_type_unavailable(c, 1UL << 31).has_value());
  c.per_type[0].creatable = false;
  c.per_type[0].create_error = "KVM_CREATE_VM: Invalid argument (EINVAL)";
  EXPECT_FALSE(c.has_vm_type(1UL << 31));
  auto why = vm_type_unavailable(c, 1UL << 31);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("EINVAL"), std::string::npos) << *why;
}

#if defined(__x86_64__)
TEST(Platforms, X86SetIsDefaultSwProtectedSnpTdx) {
  std::vector<std::string> ids;
  for (const Platform* p : platforms()) ids.push_back(p->id());
  EXPECT_EQ(ids, (std::vector<std::string>{"x86-default", "x86-sw-protected", "x86-snp",
                                           "x86-tdx"}));
  EXPECT_TRUE(find_platform("x86-sw-protected")->has_private_memory());
  EXPECT_FALSE(find_platform("x86-sw-protected")->cannot_run_payloads().has_value());
  EXPECT_TRUE(find_platform("x86-snp")->cannot_run_payloads().has_value());
  EXPECT_TRUE(find_platform("x86-tdx")->cannot_run_payloads().has_value());
}
#endif

}  // namespace
}  // namespace cvm

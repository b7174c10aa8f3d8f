#include "platform_fixture.h"

#include "cvmconf/uapi.h"

namespace cvm::suites {

std::string platform_param_name(const ::testing::TestParamInfo<const Platform*>& info) {
  std::string s = info.param->id();
  for (char& c : s)
    if (c == '-') c = '_';
  return s;
}

void PlatformTest::SetUp() {
  RecordProperty("platform", platform().id());
  const Capabilities& caps = cached_capabilities();
  if (auto why = platform().unavailable(caps)) GTEST_SKIP() << *why;
  auto k = Kvm::open();
  if (!k) GTEST_SKIP() << testing::kCapabilityAbsent << k.error();
  kvm_.emplace(std::move(k.value()));
  auto v = platform().create_vm(*kvm_);
  ASSERT_TRUE(v.ok()) << testing::harness_error("creating a VM of an offered platform", v.error());
  vm_.emplace(std::move(v.value()));
  vm_caps_.type = platform().vm_type();
  vm_caps_.guest_memfd = vm_->check_extension(uapi::cap::kGuestMemfd);
  vm_caps_.guest_memfd_flags = vm_->check_extension(uapi::cap::kGuestMemfdFlags);
  vm_caps_.memory_attributes = vm_->check_extension(uapi::cap::kMemoryAttributes);
  vm_caps_.exit_hypercall = vm_->check_extension(uapi::cap::kExitHypercall);
  vm_caps_.user_memory2 = vm_->check_extension(uapi::cap::kUserMemory2);
  if (vm_caps_.guest_memfd <= 0)
    GTEST_SKIP() << testing::kCapabilityAbsent << "KVM_CAP_GUEST_MEMFD absent (a "
                 << platform().id() << " VM reports " << hexval(vm_caps_.guest_memfd) << ")";
}

std::optional<std::string> PlatformTest::gmem_flags_unsupported(uint64_t flags) const {
  return suites::gmem_flags_unsupported(platform(), vm_caps_, flags);
}

std::optional<std::string> gmem_flags_unsupported(const Platform& p, const VmTypeCaps& caps,
                                                  uint64_t flags) {
  long have = caps.guest_memfd_flags < 0 ? 0 : caps.guest_memfd_flags;
  uint64_t missing = flags & ~static_cast<uint64_t>(have);
  if (!missing) return std::nullopt;
  std::string names;
  if (missing & uapi::kGmemFlagMmap) names += "GUEST_MEMFD_FLAG_MMAP";
  if (missing & uapi::kGmemFlagInitShared)
    names += std::string(names.empty() ? "" : "|") + "GUEST_MEMFD_FLAG_INIT_SHARED";
  if (names.empty()) names = hexval(static_cast<long>(missing));
  return std::string(testing::kCapabilityAbsent) + names + " for " + p.id() +
         " (KVM_CAP_GUEST_MEMFD_FLAGS=" + hexval(caps.guest_memfd_flags) + ")";
}

std::optional<std::string> PlatformTest::payloads_unsupported() const {
  return suites::payloads_unsupported(platform());
}

std::optional<std::string> payloads_unsupported(const Platform& p) {
  if (auto why = p.cannot_run_payloads()) return p.id() + ": " + *why;
  return std::nullopt;
}

GuestMemfd PlatformTest::new_gmem(uint64_t pages, uint64_t flags) {
  auto g = vm_->create_guest_memfd(pages * page_size(), flags);
  EXPECT_TRUE(g.ok()) << g.error();
  return g.ok() ? std::move(g.value()) : GuestMemfd();
}

}  // namespace cvm::suites

// Base fixture for suites that run once per platform (VM type) of this architecture. Every
// platform is instantiated on every machine, so test names are stable across kernels; a
// platform the kernel does not offer makes its tests SKIP with the exact missing capability.
#pragma once

#include <gtest/gtest.h>

#include <optional>
#include <string>

#include "cvmconf/gtest_support.h"
#include "cvmconf/guest_vm.h"
#include "cvmconf/kvm.h"
#include "cvmconf/platform.h"
#include "cvmconf/probe.h"

namespace cvm::suites {

// Suites write ASSERT_TRUE(ok(call)) for calls that must succeed (gtest_support.h).
using ::cvm::testing::ok;

class PlatformTest : public ::testing::TestWithParam<const Platform*> {
 protected:
  void SetUp() override;

  const Platform& platform() const { return *GetParam(); }
  Kvm& kvm() { return *kvm_; }
  Vm& vm() { return *vm_; }
  const VmTypeCaps& vm_caps() const { return vm_caps_; }

  // Why this VM type cannot create guest_memfd files with `flags`, or nullopt if it can.
  std::optional<std::string> gmem_flags_unsupported(uint64_t flags) const;
  // Why payload guests cannot run here, or nullopt.
  std::optional<std::string> payloads_unsupported() const;
  // A guest_memfd of `pages` pages on the test's VM (fails the test on error).
  GuestMemfd new_gmem(uint64_t pages, uint64_t flags);

  std::optional<Kvm> kvm_;
  std::optional<Vm> vm_;
  VmTypeCaps vm_caps_;
};

// Why VM type `p` (with capabilities caps) cannot create guest_memfd files with `flags`, or
// nullopt if it can (what PlatformTest::gmem_flags_unsupported answers, usable without a fixture).
std::optional<std::string> gmem_flags_unsupported(const Platform& p, const VmTypeCaps& caps,
                                                  uint64_t flags);
// Why payload guests cannot run on `p`, or nullopt (PlatformTest::payloads_unsupported).
std::optional<std::string> payloads_unsupported(const Platform& p);

// "x86-sw-protected" -> "x86_sw_protected" (GoogleTest parameter names).
std::string platform_param_name(const ::testing::TestParamInfo<const Platform*>& info);

#define CVM_INSTANTIATE_FOR_PLATFORMS(fixture)                                              \
  INSTANTIATE_TEST_SUITE_P(Platforms, fixture,                                              \
                           ::testing::ValuesIn(::cvm::platforms().begin(),                  \
                                               ::cvm::platforms().end()),                   \
                           ::cvm::suites::platform_param_name)

}  // namespace cvm::suites

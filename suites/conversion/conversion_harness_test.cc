// Tests of the conversion suite's own machinery on any KVM host (not conformance tests): the
// environment's memory layout per back-end, its page-state observers, the GPA map, the PTE and
// fault-injection helpers and the hypercall-exit probe. On a host without private memory the
// conversions themselves fail, but everything around them is exercised for real, so the parts
// that only run on conversion-capable kernels rest on checked plumbing.
#include <gtest/gtest.h>

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include "conversion_env.h"
#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"
#include "fault_injection.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

class ConversionHarness : public ::testing::Test {
 protected:
  void SetUp() override {
    auto k = Kvm::open();
    if (!k) GTEST_SKIP() << "capability absent: " << k.error();
    kvm_.emplace(std::move(k.value()));
    const VmTypeCaps* d = cached_capabilities().vm(default_platform().vm_type());
    ASSERT_NE(d, nullptr);
    caps_ = *d;
  }
  // Why the default VM type cannot create guest_memfd files with `flags`, or nullopt.
  std::optional<std::string> no_gmem(uint64_t flags = 0) const {
    if (caps_.guest_memfd <= 0) return "capability absent: KVM_CAP_GUEST_MEMFD";
    return gmem_flags_unsupported(default_platform(), caps_, flags);
  }
  // Why payload guests cannot run on the default VM type, or nullopt (tests that boot one).
  static std::optional<std::string> no_payloads() { return default_platform().cannot_run_payloads(); }
  Result<std::unique_ptr<ConversionEnv>> make(ConversionAbi abi, const ConversionEnvOptions& o) {
    return ConversionEnv::create(*kvm_, default_platform(), abi, o);
  }
  std::optional<Kvm> kvm_;
  VmTypeCaps caps_;
};

TEST_F(ConversionHarness, InPlaceLayoutIsTheGuestMemfdMapping) {
  if (auto why = no_gmem(3)) GTEST_SKIP() << *why;
  if (auto why = no_payloads()) GTEST_SKIP() << *why;
  CVM_ASSIGN_OR_FAIL(auto env, make(ConversionAbi::GmemAttributesIoctl, {.pages = 4, .guest = true}));
  EXPECT_EQ(env->gmem().flags(), uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared);
  EXPECT_EQ(env->states(), "SSSS") << "the host observer reads through the guest_memfd mapping";
  ASSERT_EQ(env->host_fill(2, 0x3c), "");
  EXPECT_EQ(env->guest_check(2, 0x3c), "") << "the memslot maps the same pages for the guest";
  ASSERT_EQ(env->guest_fill(1, 0x4d), "");
  EXPECT_EQ(env->host_check(1, 0x4d), "");
  EXPECT_NE(env->host_check(1, 0x4e), "") << "a mismatch is reported";
  if (caps_.conversion_facts.attrs2_invalid_errno == ENOTTY) {
    // This kernel has no such ioctl: the back-end reports the errno, changes nothing.
    ConversionResult r = env->to_private(0, 2);
    EXPECT_EQ(r.err, ENOTTY) << r.describe();
    EXPECT_EQ(r.offset_report, OffsetReport::NotReported);
    EXPECT_NE(r.op.find("KVM_SET_MEMORY_ATTRIBUTES2(gmem offset=0x0, size=0x2000"), std::string::npos) << r.op;
    EXPECT_EQ(env->states(), "SSSS");
  }
}

TEST_F(ConversionHarness, InPlaceObserverSeesPrivateAsSigbus) {
  if (auto why = no_gmem(1)) GTEST_SKIP() << *why;
  // MMAP without INIT_SHARED: every page private (mainline)
  CVM_ASSIGN_OR_FAIL(auto env,
                     make(ConversionAbi::GmemAttributesIoctl, {.pages = 2, .init_shared = false}));
  EXPECT_EQ(env->states(), "PP");
  EXPECT_NE(env->host_check(0, 0), "") << "reading a private page is reported, not fatal";
}

TEST_F(ConversionHarness, PerVmLayoutKeepsSharedMemorySeparate) {
  if (auto why = no_gmem()) GTEST_SKIP() << *why;
  CVM_ASSIGN_OR_FAIL(auto env, make(ConversionAbi::PerVmAttributes, {.pages = 4}));
  EXPECT_EQ(env->gmem().flags(), 0u) << "the per-VM file only backs private memory";
  EXPECT_FALSE(env->can_observe_state()) << "without a guest the per-VM state is invisible";
  EXPECT_FALSE(env->state(0).ok());
  env.reset();
  // The rest needs the guest that observes the per-VM state.
  if (auto why = no_payloads()) GTEST_SKIP() << *why;
  CVM_ASSIGN_OR_FAIL(env, make(ConversionAbi::PerVmAttributes, {.pages = 4, .guest = true}));
  EXPECT_EQ(env->states(), "SSSS") << "the guest sees the host's markers in the shared memory";
  ASSERT_EQ(env->host_fill(3, 0x21), "");
  EXPECT_EQ(env->guest_check(3, 0x21), "");
  ASSERT_EQ(env->guest_fill(0, 0x12), "");
  EXPECT_EQ(env->host_check(0, 0x12), "");
  EXPECT_EQ(env->host_check(3, 0x21), "") << "the observer restores what its marker replaced";
  if (!caps_.conversion.backend) {
    ConversionResult r = env->to_private(1);
    EXPECT_FALSE(r.ok()) << "no per-VM attributes here: " << r.describe();
    EXPECT_EQ(r.offset_report, OffsetReport::NotInAbi);
    EXPECT_NE(r.op.find("KVM_SET_MEMORY_ATTRIBUTES(gpa=0x100001000, size=0x1000, attributes=0x8"),
              std::string::npos) << r.op;
    EXPECT_EQ(env->states(), "SSSS");
  }
}

TEST_F(ConversionHarness, TwoMemslotsCoverConsecutiveGpasAndOffsets) {
  if (auto why = no_gmem(3)) GTEST_SKIP() << *why;
  if (auto why = no_payloads()) GTEST_SKIP() << *why;
  CVM_ASSIGN_OR_FAIL(auto env, make(ConversionAbi::GmemAttributesIoctl,
                                    {.pages = 4, .guest = true, .slots = 2}));
  for (uint64_t p = 0; p < 4; p++) ASSERT_EQ(env->host_fill(p, static_cast<uint8_t>(0x70 + p)), "");
  for (uint64_t p = 0; p < 4; p++)
    EXPECT_EQ(env->guest_check(p, static_cast<uint8_t>(0x70 + p)), "") << "page " << p;
  GpaMap m = env->gpa_map();
  CVM_ASSIGN_OR_FAIL(const GmemRange second, m.lookup(env->gpa(3), page_size()));
  EXPECT_EQ(second.offset, env->offset(3));
  EXPECT_EQ(m.lookup(env->gpa(1), 2 * page_size()).err(), EINVAL) << "crosses the two slots";
  EXPECT_EQ(env->range(1, 2).offset, env->offset(1));
  EXPECT_EQ(env->range(1, 2).gpa, env->gpa(1));
}

TEST_F(ConversionHarness, PteProbe) {
  CVM_ASSIGN_OR_FAIL(auto m, Mapping::map(2 * page_size(), PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  CVM_ASSIGN_OR_FAIL(const bool before, pte_present(m.data() + page_size()));
  EXPECT_FALSE(before);
  m.data()[page_size()] = 1;
  CVM_ASSIGN_OR_FAIL(const bool after, pte_present(m.data() + page_size()));
  EXPECT_TRUE(after);
  EXPECT_FALSE(pte_present(m.data()).value()) << "the other page was not touched";
}

TEST_F(ConversionHarness, FaultInjectionIsUsableOrSaysExactlyWhy) {
  auto why = ThreadFaultInjection::unavailable();
  if (why) {
    EXPECT_EQ(why->rfind("capability absent: fault injection: ", 0), 0u) << *why;
    EXPECT_FALSE(ThreadFaultInjection::setup().ok());
    return;
  }
  CVM_ASSIGN_OR_FAIL(auto fi, ThreadFaultInjection::setup());
  // eventfd() allocates its context: failing the first injection point makes it fail.
  ASSERT_TRUE(ok(fi->arm(1)));
  int fd = eventfd(0, EFD_CLOEXEC);
  const int err = errno;
  CVM_ASSIGN_OR_FAIL(const bool injected, fi->disarm());
  EXPECT_TRUE(injected) << "eventfd() reached an injection point";
  EXPECT_LT(fd, 0) << "and failed there";
  if (fd < 0) {
    EXPECT_EQ(err, ENOMEM);
  }
  if (fd >= 0) close(fd);
  int again = eventfd(0, EFD_CLOEXEC);
  EXPECT_GE(again, 0) << "disarmed again";
  if (again >= 0) close(again);
}

TEST_F(ConversionHarness, HypercallExitProbeIsPreciseAndCached) {
  if (auto why = no_payloads()) GTEST_SKIP() << *why;
  const HypercallExitProbe& a = probe_map_gpa_range_exit(*kvm_, default_platform());
  EXPECT_TRUE(a.failure.empty()) << a.failure;
  if (!a.exits) {
    EXPECT_EQ(a.skip_reason.rfind("capability absent: a guest KVM_HC_MAP_GPA_RANGE hypercall does "
                                  "not exit to userspace on this kernel (vCPU still at ", 0),
              0u)
        << a.skip_reason;
  }
  const HypercallExitProbe& b = probe_map_gpa_range_exit(*kvm_, default_platform());
  EXPECT_EQ(&a, &b) << "probed once per platform";
}

}  // namespace
}  // namespace cvm::suites

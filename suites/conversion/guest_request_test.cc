// Guest-initiated conversion requests (seeds 003, 004): the guest asks through
// KVM_HC_MAP_GPA_RANGE, the request reaches the host as KVM_EXIT_HYPERCALL, the host answers
// through the conversion back-end (or with an error when there is none) and the guest sees the
// answer. Needs only KVM, payloads and a hypercall that exits: no guest_memfd, no
// KVM_SET_USER_MEMORY_REGION2, so it runs on Debian's 6.1 under QEMU too.
// Requirement: CONV-010 (suites/requirements.yaml).
#include <gtest/gtest.h>

#include "conversion_env.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

class GuestRequest : public ::testing::TestWithParam<const Platform*> {
 protected:
  const Platform& platform() const { return *GetParam(); }

  void SetUp() override {
    RecordProperty("platform", platform().id());
    const Capabilities& caps = cached_capabilities();
    if (auto why = platform().unavailable(caps)) GTEST_SKIP() << *why;
    if (auto why = platform().cannot_run_payloads()) GTEST_SKIP() << platform().id() << ": " << *why;
    auto k = Kvm::open();
    if (!k) GTEST_SKIP() << testing::kCapabilityAbsent << k.error();
    kvm_.emplace(std::move(k.value()));
    const VmTypeCaps* vc = caps.vm(platform().vm_type());
    ASSERT_NE(vc, nullptr);
    selection_ = vc->conversion;
    if (vc->exit_hypercall < 0 ||
        !((static_cast<uint64_t>(vc->exit_hypercall) >> uapi::kHcMapGpaRange) & 1))
      GTEST_SKIP() << testing::kCapabilityAbsent << "KVM_CAP_EXIT_HYPERCALL="
                   << hexval(vc->exit_hypercall) << " lacks KVM_HC_MAP_GPA_RANGE (bit 12) for "
                   << platform().id();
    const HypercallExitProbe& p = probe_map_gpa_range_exit(*kvm_, platform());
    RecordProperty("hypercall_exit", p.exits ? p.observation : p.skip_reason + p.failure);
    if (!p.failure.empty()) FAIL() << p.failure;
    if (!p.exits) GTEST_SKIP() << p.skip_reason;
  }

  // A payload guest with the MAP_GPA_RANGE exit enabled, answering through the probe's back-end
  // (none: every request is answered EINVAL) for memory that no memslot backs.
  void boot(GpaMap map = {}) {
    GuestVmOptions o;
    o.platform = &platform();
    auto g = GuestVm::create(*kvm_, o);
    ASSERT_TRUE(g.ok()) << testing::harness_error("GuestVm::create", g.error());
    guest_ = std::move(g.value());
    ASSERT_TRUE(ok(enable_map_gpa_range_exit(guest_->vm())));
    if (selection_.backend) backend_ = make_conversion_backend(*selection_.backend, guest_->vm());
    RecordProperty("conversion_backend",
                   backend_ ? backend_->name() : "none: " + selection_.reason);
    handler_ = std::make_unique<GuestConversionHandler>(backend_.get(), std::move(map),
                                                        selection_.reason);
    GuestConversionHandler* h = handler_.get();
    guest_->set_exit_handler([h](int i, Vcpu& v, const ExitInfo& e) { return (*h)(i, v, e); });
    auto c = GuestCmd::start(*guest_, 0);
    ASSERT_TRUE(c.ok()) << testing::harness_error("booting the cmd_loop payload", c.error());
    cmd_.emplace(std::move(c.value()));
  }

  void TearDown() override {
    if (cmd_) (void)cmd_->exit();
  }

  std::optional<Kvm> kvm_;
  ConversionSelection selection_;
  std::unique_ptr<GuestVm> guest_;
  std::unique_ptr<ConversionBackend> backend_;
  std::unique_ptr<GuestConversionHandler> handler_;
  std::optional<GuestCmd> cmd_;
};

CVM_TEST_P(GuestRequest, HostAnswerReachesGuest, "CONV-010") {
  ASSERT_NO_FATAL_FAILURE(boot());
  struct Case {
    uint64_t gpa, npages, attrs;
    bool to_private;
  };
  const Case cases[] = {
      {CVM_TEST_MEM_GPA + 0x200000, 3, uapi::kMapGpaRangeEncrypted, true},
      {CVM_TEST_MEM_GPA + 0x400000, 512, uapi::kMapGpaRangeDecrypted | uapi::kMapGpaRangePageSz2M,
       false},
  };
  std::string seen;
  for (const Case& c : cases) {
    SCOPED_TRACE("MAP_GPA_RANGE(" + std::to_string(c.gpa) + ", " + std::to_string(c.npages) + ")");
    const size_t before = handler_->log().size();
    GuestCmd::Outcome o = cmd_->map_gpa_range(c.gpa, c.npages, c.attrs);
    CVM_ASSERT_CMD(o);
    auto log = handler_->log();
    ASSERT_EQ(log.size(), before + 1) << "the request must reach the host as KVM_EXIT_HYPERCALL";
    const HandledConversion& h = log.back();
    EXPECT_EQ(h.request.gpa, c.gpa);
    EXPECT_EQ(h.request.npages, c.npages);
    EXPECT_EQ(h.request.attributes, c.attrs);
    EXPECT_EQ(h.request.to_private, c.to_private);
    EXPECT_EQ(h.request.size, c.npages * 4096);
    EXPECT_EQ(h.request.exit_flags & uapi::kExitHypercallLongMode, uapi::kExitHypercallLongMode)
        << "a 64-bit guest's hypercall";
    EXPECT_EQ(o.value, h.ret) << "the guest must see the host's answer (" << h.result.describe() << ")";
    if (!backend_) {
      EXPECT_EQ(h.ret, static_cast<uint64_t>(EINVAL)) << "no back-end: the request is refused";
      EXPECT_EQ(h.result.err, EOPNOTSUPP);
    }
    seen += (seen.empty() ? "" : "; ") + std::string(c.to_private ? "to private" : "to shared") +
            ": host answered " + std::to_string(h.ret) + " (" +
            (backend_ ? h.result.describe() : std::string("no conversion back-end")) +
            "), guest saw " + std::to_string(o.value);
  }
  RecordProperty("observation", seen);
}

CVM_TEST_P(GuestRequest, MalformedRequestAnsweredByKvm, "CONV-010") {
  ASSERT_NO_FATAL_FAILURE(boot());
  constexpr uint64_t kKvmEinval = 0 - uapi::kKvmHcEinval;  // -KVM_EINVAL as the guest sees it
  struct Case {
    const char* what;
    uint64_t gpa, npages;
  } const cases[] = {
      {"unaligned gpa", CVM_TEST_MEM_GPA + 1, 1},
      {"zero pages", CVM_TEST_MEM_GPA, 0},
      {"gfn + npages wraps around", CVM_TEST_MEM_GPA, ~0ULL},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    GuestCmd::Outcome o = cmd_->map_gpa_range(c.gpa, c.npages, uapi::kMapGpaRangeEncrypted);
    CVM_ASSERT_CMD(o);
    EXPECT_EQ(o.value, kKvmEinval) << "KVM refuses a malformed request itself";
  }
  EXPECT_TRUE(handler_->log().empty()) << "a malformed request must not reach the host";
}

CVM_TEST_P(GuestRequest, AppliedThroughBackend, "CONV-010") {
  CVM_SKIP_IF(conversion_unavailable(platform().id(), selection_));
  ConversionEnvOptions opts;
  opts.pages = 4;
  opts.guest_requests = true;
  CVM_SKIP_IF(conversion_env_unsupported(
      *selection_.backend, platform(), *cached_capabilities().vm(platform().vm_type()), opts));
  CVM_ASSIGN_OR_FAIL(auto env, new_conversion_env(*kvm_, platform(), *selection_.backend, opts));
  ConversionEnv& e = *env;
  RecordProperty("conversion_backend", e.backend().name());
  for (uint64_t p = 0; p < 4; p++) ASSERT_EQ(e.host_fill(p, static_cast<uint8_t>(0x60 + p)), "");
  GuestCmd& cmd = *e.cmd();
  auto request = [&](uint64_t page, uint64_t n, bool to_private) {
    return cmd.map_gpa_range(e.gpa(page), n,
                             to_private ? uapi::kMapGpaRangeEncrypted : uapi::kMapGpaRangeDecrypted);
  };
  GuestCmd::Outcome o = request(1, 1, true);
  CVM_ASSERT_CMD(o);
  EXPECT_EQ(o.value, 0u) << e.requests()->log().back().result.describe();
  EXPECT_EQ(e.states(), "SPSS") << "the guest's request converted exactly its page";
  o = request(1, 1, false);
  CVM_ASSERT_CMD(o);
  EXPECT_EQ(o.value, 0u);
  EXPECT_EQ(e.states(), "SSSS");
  o = request(0, 4, true);
  CVM_ASSERT_CMD(o);
  EXPECT_EQ(o.value, 0u);
  EXPECT_EQ(e.states(), "PPPP");
  o = request(0, 4, false);
  CVM_ASSERT_CMD(o);
  EXPECT_EQ(o.value, 0u);
  EXPECT_EQ(e.states(), "SSSS");
  if (e.in_place()) {
    // Past the end of the guest_memfd binding: refused, nothing changes.
    o = request(3, 2, true);
    CVM_ASSERT_CMD(o);
    EXPECT_EQ(o.value, static_cast<uint64_t>(EINVAL));
    EXPECT_EQ(e.states(), "SSSS");
  }
  for (uint64_t p = 0; p < 4; p++)
    if (content_preserved_expected(*selection_.backend, platform())) {
      EXPECT_EQ(e.host_check(p, static_cast<uint8_t>(0x60 + p)), "");
    }
}

CVM_INSTANTIATE_FOR_PLATFORMS(GuestRequest);

}  // namespace
}  // namespace cvm::suites

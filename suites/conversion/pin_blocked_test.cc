// Conversion refused while pages are pinned (seeds 003, 004): a page pinned by each available
// provider blocks to-private conversion of every range containing it with EAGAIN and an error
// offset naming the first pinned page; other ranges convert; after unpinning the same
// conversion succeeds; to-shared is never blocked.
// Requirements: PINBLK-001 .. PINBLK-005 (suites/requirements.yaml).
#include <functional>

#include "conversion_fixture.h"

namespace cvm::suites {
namespace {

class PinBlocked : public ConversionTest {
 protected:
  void SetUp() override {
    ConversionTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    if (!in_place())
      GTEST_SKIP() << testing::kNotApplicable
                   << "the per-vm-attributes back-end keeps shared memory in separate host "
                      "memory: a pin there holds no guest_memfd page, and per-VM conversion has "
                      "no reference-count check for a pin to block";
    std::string none;
    providers_ = usable_pin_providers(none);
    if (providers_.empty()) GTEST_SKIP() << none;
    std::string names;
    for (const PinProvider* p : providers_) names += (names.empty() ? "" : ", ") + p->name();
    RecordProperty("pin_providers", names);
    CVM_SKIP_IF(env_unsupported(env_options()));
  }

  // Each provider's environment: 4 shared pages, with the guest where it checks contents.
  ConversionEnvOptions env_options() const {
    return {.pages = 4, .guest = payloads_ok() && preserves_content()};
  }

  // Runs body once per available provider, each with a fresh 4-page shared environment whose
  // page i holds 0x10 + i. body gets a pin function for that provider: pin(page, n) pins
  // [page, page + n) (nullptr when the provider cannot pin shared guest_memfd pages; body then
  // returns). Bodies hold one pin at a time (gup_test has one pinned set per system). Stops at
  // the first fatal failure; SKIPs when no provider could pin at all.
  using PinFn = std::function<std::unique_ptr<Pin>(uint64_t page, uint64_t n)>;
  using Body = std::function<void(ConversionEnv&, const PinFn&)>;
  void each_provider(const Body& body) {
    std::string cannot;
    size_t usable = 0;
    for (const PinProvider* p : providers_) {
      SCOPED_TRACE("pin provider " + p->name() + " (" + p->kind().describe() + ")");
      ASSERT_NO_FATAL_FAILURE(with_provider(*p, body, usable, cannot));
    }
    if (usable == 0)
      GTEST_SKIP() << testing::kCapabilityAbsent << "no pin provider can pin a shared guest_memfd page (" << cannot << ")";
  }

  // One round of each_provider: counts p in usable when it pinned a page, adds to cannot why
  // it could not.
  void with_provider(const PinProvider& p, const Body& body, size_t& usable, std::string& cannot) {
    CVM_ASSIGN_OR_FAIL(auto env, new_env(env_options()));
    for (uint64_t i = 0; i < 4; i++) ASSERT_EQ(env->host_fill(i, static_cast<uint8_t>(0x10 + i)), "");
    bool pinned_any = false, refused = false;
    PinFn pin = [&](uint64_t page, uint64_t n) -> std::unique_ptr<Pin> {
      std::string why;
      auto pn = pin_page(*env, page, p, &why, n);
      if (pn) pinned_any = true;
      else if (!refused) refused = true, cannot += (cannot.empty() ? "" : "; ") + why;
      return pn;
    };
    body(*env, pin);
    if (pinned_any) usable++;
  }

  // Every page still shared with its data.
  static void expect_all_shared_intact(ConversionEnv& env) {
    EXPECT_EQ(env.states(), "SSSS") << "a refused conversion changes nothing";
    for (uint64_t i = 0; i < 4; i++)
      EXPECT_EQ(env.host_check(i, static_cast<uint8_t>(0x10 + i)), "") << "page " << i;
  }

  std::vector<const PinProvider*> providers_;
};

CVM_TEST_P(PinBlocked, PinnedPageBlocksToPrivate, "PINBLK-001") {
  each_provider([&](ConversionEnv& env, const PinFn& pin) {
    auto p = pin(2, 1);
    if (!p) return;
    const std::pair<uint64_t, uint64_t> ranges[] = {{0, 4}, {2, 1}, {1, 2}, {2, 2}};
    for (auto [first, n] : ranges) {
      SCOPED_TRACE("pages [" + std::to_string(first) + ", " + std::to_string(first + n) + ")");
      ConversionResult r = env.to_private(first, n);
      EXPECT_EQ(r.err, EAGAIN) << r.describe();
      expect_all_shared_intact(env);
    }
    EXPECT_TRUE(ok(p->release()));
  });
}

CVM_TEST_P(PinBlocked, ErrorOffsetNamesFirstPinnedPage, "PINBLK-002") {
  bool not_reported = false;
  std::string observed;
  each_provider([&](ConversionEnv& env, const PinFn& pin) {
    auto check = [&](const ConversionResult& r, uint64_t want_page, const char* what) {
      EXPECT_EQ(r.err, EAGAIN) << what << ": " << r.describe();
      observed += std::string(observed.empty() ? "" : "; ") + what + ": " + r.describe();
      switch (r.offset_report) {
        case OffsetReport::Reported:
          EXPECT_EQ(r.error_offset, env.offset(want_page))
              << what << ": error_offset must name page " << want_page << ", the first pinned one";
          break;
        case OffsetReport::NotReported:
          if (env.abi() == ConversionAbi::GmemAttributesIoctl)
            ADD_FAILURE() << what << ": KVM_SET_MEMORY_ATTRIBUTES2 (v8) documents error_offset for EAGAIN: " << r.describe();
          else
            not_reported = true;
          break;
        default:
          ADD_FAILURE() << what << ": " << r.describe();
      }
    };
    {
      auto p = pin(1, 3);  // pages 1, 2 and 3
      if (!p) return;
      check(env.to_private(0, 4), 1, "pages 1-3 pinned, range [0, 4)");
      check(env.to_private(2, 2), 2, "pages 1-3 pinned, range [2, 4)");
      check(env.to_private(3, 1), 3, "pages 1-3 pinned, range [3, 4)");
      EXPECT_TRUE(ok(p->release()));
    }
    {
      auto p = pin(3, 1);
      if (!p) return;
      check(env.to_private(0, 4), 3, "page 3 pinned, range [0, 4)");
      EXPECT_TRUE(ok(p->release()));
    }
    expect_all_shared_intact(env);
  });
  RecordProperty("observation", observed);
  if (not_reported && !HasFailure())
    GTEST_SKIP() << testing::kNotApplicable << conversion_abi_name(abi())
                 << " on this kernel does not report error_offset for EAGAIN (recorded)";
}

CVM_TEST_P(PinBlocked, UnpinnedRangesConvert, "PINBLK-003") {
  each_provider([&](ConversionEnv& env, const PinFn& pin) {
    auto p = pin(2, 1);
    if (!p) return;
    ConversionResult a = env.to_private(0, 2);
    EXPECT_TRUE(a.ok()) << "pages [0, 2) hold no pin: " << a.describe();
    ConversionResult b = env.to_private(3, 1);
    EXPECT_TRUE(b.ok()) << "page 3 holds no pin: " << b.describe();
    EXPECT_EQ(env.states(), "PPSP");
    EXPECT_EQ(env.host_check(2, 0x12), "") << "the pinned page keeps its data";
    EXPECT_TRUE(ok(p->release()));
  });
}

CVM_TEST_P(PinBlocked, RetryAfterUnpinSucceeds, "PINBLK-004") {
  std::string observed;
  each_provider([&](ConversionEnv& env, const PinFn& pin) {
    auto p = pin(2, 1);
    if (!p) return;
    ConversionResult blocked = env.to_private(0, 4);
    EXPECT_EQ(blocked.err, EAGAIN) << blocked.describe();
    ASSERT_TRUE(ok(p->release()));
    ASSERT_TRUE(ok(env.to_private(0, 4)));
    EXPECT_EQ(env.states(), "PPPP");
    if (env.cmd()) {
      for (uint64_t i = 0; i < 4; i++)
        EXPECT_EQ(env.guest_check(i, static_cast<uint8_t>(0x10 + i)), "") << "private page " << i;
    }
    ASSERT_TRUE(ok(env.to_shared(0, 4)));
    EXPECT_EQ(env.states(), "SSSS");
    std::string changed;
    for (uint64_t i = 0; i < 4; i++)
      if (!env.host_check(i, static_cast<uint8_t>(0x10 + i)).empty())
        changed += (changed.empty() ? "" : ", ") + std::to_string(i);
    observed = changed.empty() ? "data intact after retry and round trip"
                               : "data changed on page(s) " + changed + " (contents unspecified)";
    if (preserves_content()) {
      EXPECT_EQ(changed, "") << "this back-end keeps contents";
    }
  });
  RecordProperty("observation", observed);
}

CVM_TEST_P(PinBlocked, ToSharedNeverBlocked, "PINBLK-005") {
  each_provider([&](ConversionEnv& env, const PinFn& pin) {
    ASSERT_TRUE(ok(env.to_private(1)));
    ASSERT_TRUE(ok(env.to_private(3)));
    auto p = pin(2, 1);
    if (!p) return;
    EXPECT_EQ(env.states(), "SPSP");
    ConversionResult r = env.to_shared(0, 4);
    EXPECT_TRUE(r.ok()) << "a pinned shared page in the range must not block to-shared: " << r.describe();
    ConversionResult again = env.to_shared(2, 1);
    EXPECT_TRUE(again.ok()) << "nor does converting the pinned page itself: " << again.describe();
    EXPECT_EQ(env.states(), "SSSS");
    EXPECT_EQ(env.host_check(0, 0x10), "");
    EXPECT_EQ(env.host_check(2, 0x12), "") << "the pinned page keeps its data";
    EXPECT_TRUE(ok(p->release()));
  });
}

CVM_INSTANTIATE_FOR_PLATFORMS(PinBlocked);

}  // namespace
}  // namespace cvm::suites

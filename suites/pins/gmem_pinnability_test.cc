// Long-term pins of guest_memfd memory through its host mapping, per platform and per pin
// provider (seeds 002, 003, 004): private pages (a guest_memfd created with MMAP but without
// INIT_SHARED) refuse every pin with EFAULT and leave no kernel splat; shared pages (MMAP |
// INIT_SHARED) can be pinned long-term, as vhost or an IOMMU would.
// Requirements: PIN-008 (private), PIN-009 (shared); the io_uring cases also MMAP-008 and MMAP-009
// (io_uring buffer registration through the host mapping).
#include <sys/mman.h>

#include <cstring>

#include "cvmconf/uapi.h"
#include "pin_cases.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

using pins::check_bytes;
using pins::check_through_pin;
using pins::record_case;

constexpr uint64_t kMmap = uapi::kGmemFlagMmap;
constexpr uint64_t kShared = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;
constexpr uint64_t kPages = 4;

class GmemPinnability : public PlatformTest {
 protected:
  // Records provider and backing before the platform check, so results of platforms this kernel
  // does not offer carry them too (the test name is "<Private|Shared>..._<provider>"). Then maps
  // a guest_memfd of the test's kind through its host mapping: private pages (MMAP) or shared
  // ones (MMAP | INIT_SHARED).
  void SetUp() override {
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    auto us = name.find('_'), slash = name.find('/');
    provider_ =
        us == std::string::npos ? nullptr : pin_provider_by_name(name.substr(us + 1, slash - us - 1));
    ASSERT_NE(provider_, nullptr) << "test " << name << " names no known pin provider";
    const bool shared = name.rfind("Private", 0) != 0;
    record_case(provider_, shared ? "guest_memfd_shared" : "guest_memfd_private");
    PlatformTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    if (auto why = provider_->unavailable()) GTEST_SKIP() << *why;
    const uint64_t flags = shared ? kShared : kMmap;
    if (auto why = gmem_flags_unsupported(flags)) GTEST_SKIP() << *why;
    gmem_ = new_gmem(kPages, flags);
    ASSERT_TRUE(gmem_.valid());
    CVM_ASSIGN_OR_FAIL(map_, gmem_.map(kPages * page_size()));
  }
  void TearDown() override { map_.reset(); }

  // Private pages: every pin is refused with EFAULT.
  void private_refused() {
    const PinProvider& p = *provider_;
    auto pin = p.pin(map_.data(), map_.size());
    if (auto why = pins::pin_unsupported(p, pin)) GTEST_SKIP() << *why;
    if (pin.ok()) {
      RecordProperty("outcome", "pinned");
      ADD_FAILURE() << p.name() << " pinned private guest_memfd pages";
      (void)pin.value()->release();
    } else {
      RecordProperty("outcome", std::string("refused (") + errno_name(pin.err()) + ")");
      EXPECT_EQ(pin.err(), EFAULT) << p.name() << " on private guest_memfd pages: " << pin.error();
    }
  }

  // Shared pages: pinned, and the pin reaches the guest_memfd page both ways where it can.
  void shared_pinnable() {
    const PinProvider& p = *provider_;
    std::memset(map_.data(), 0xa5, map_.size());
    auto pin = p.pin(map_.data(), map_.size());
    if (auto why = pins::pin_unsupported(p, pin)) GTEST_SKIP() << *why;
    RecordProperty("outcome", pin.ok() ? std::string("pinned")
                                       : std::string("refused (") + errno_name(pin.err()) + ")");
    ASSERT_TRUE(pin.ok()) << p.name() << " could not pin shared guest_memfd pages: " << pin.error();
    if (p.kind().reads_through) {
      EXPECT_EQ(check_through_pin(*pin.value(), map_.size(), 0xa5), "");
    }
    auto w = pin.value()->write_through(page_size(), std::vector<uint8_t>(page_size(), 0x3b));
    if (w.ok()) {
      EXPECT_EQ(check_bytes(map_.data() + page_size(), page_size(), 0x3b, "the guest_memfd mapping"),
                "")
          << "a write through the pin must land in the guest_memfd page";
    } else {
      EXPECT_EQ(w.err(), ENOTSUP) << w.error();
    }
    EXPECT_TRUE(ok(pin.value()->release()));
  }

  const PinProvider* provider_ = nullptr;
  GuestMemfd gmem_;
  Mapping map_;
};

// One pair of tests per provider (keep in step with pin_providers()).
#define CVM_GMEM_PIN_TESTS(provider)                                                   \
  CVM_TEST_P(GmemPinnability, PrivateRefused_##provider, "PIN-008") {                  \
    private_refused();                                                                 \
  }                                                                                    \
  CVM_TEST_P(GmemPinnability, SharedPinnable_##provider, "PIN-009") {                  \
    shared_pinnable();                                                                 \
  }

// io_uring's pair is also the io_uring buffer registration of MMAP-008 (a private page: EFAULT)
// and MMAP-009 (a shared page registers, and a fixed-buffer read lands in the guest_memfd page).
CVM_TEST_P(GmemPinnability, PrivateRefused_io_uring, "PIN-008", "MMAP-008") {
  private_refused();
}
CVM_TEST_P(GmemPinnability, SharedPinnable_io_uring, "PIN-009", "MMAP-009") {
  shared_pinnable();
}

CVM_GMEM_PIN_TESTS(vmsplice)
CVM_GMEM_PIN_TESTS(gup_test_ro)
CVM_GMEM_PIN_TESTS(gup_test_ro_fast)
CVM_GMEM_PIN_TESTS(gup_test_rw)
CVM_GMEM_PIN_TESTS(gup_test_rw_fast)
CVM_GMEM_PIN_TESTS(rdma_ro)
CVM_GMEM_PIN_TESTS(rdma_rw)

CVM_INSTANTIATE_FOR_PLATFORMS(GmemPinnability);

}  // namespace
}  // namespace cvm::suites

// A guest whose only memory is guest_memfd: boot region and test memory are both guest_memfd
// (MMAP | INIT_SHARED), the host's view is the file's mapping. Host and guest must see each
// other's writes, and after a hole punch both must see zeroes, never stale data.
// Requirement: MMAP-012.
#include <cstring>

#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint64_t kShared = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;
constexpr uint32_t kTestSlot = 1;
constexpr uint64_t kPages = 4;

class GmemGuest : public PlatformTest {
 protected:
  void SetUp() override {
    PlatformTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    CVM_SKIP_IF(gmem_flags_unsupported(kShared));
    CVM_SKIP_IF(payloads_unsupported());
    GuestVmOptions o;
    o.platform = &platform();
    o.boot_memory = BootMemory::GuestMemfd;
    auto g = GuestVm::create(kvm(), o);
    ASSERT_TRUE(g.ok()) << testing::harness_error("GuestVm::create", g.error());
    gvm_ = std::move(g.value());
    CVM_ASSIGN_OR_FAIL(mem_, gvm_->vm().create_guest_memfd(kPages * page_size(), kShared));
    CVM_ASSIGN_OR_FAIL(map_, mem_.map(kPages * page_size()));
    ASSERT_TRUE(ok(gvm_->vm().bind_gmem(kTestSlot, CVM_TEST_MEM_GPA, mem_, 0,
                                        kPages * page_size(), map_.data())));
    // Booting from guest_memfd is the behaviour under test, not set-up: the same payload boots
    // from anonymous memory elsewhere, so a refusal here is the kernel's (MMAP-012).
    auto c = GuestCmd::start(*gvm_, 0);
    ASSERT_TRUE(c.ok()) << "a guest whose only memory is guest_memfd did not run: " << c.error();
    cmd_.emplace(std::move(c.value()));
  }
  uint64_t gpa(uint64_t page, uint64_t off = 0) const {
    return CVM_TEST_MEM_GPA + page * page_size() + off;
  }
  uint8_t* hva(uint64_t page, uint64_t off = 0) const {
    return map_.data() + page * page_size() + off;
  }
  std::unique_ptr<GuestVm> gvm_;
  GuestMemfd mem_;
  Mapping map_;
  std::optional<GuestCmd> cmd_;
};

CVM_TEST_P(GmemGuest, HostAndGuestSeeEachOthersWrites, "MMAP-012") {
  const uint64_t ps = page_size();
  std::memset(hva(0), 0xaa, kPages * ps);
  auto c = cmd_->check8(gpa(0), kPages * ps, 0xaa);
  CVM_ASSERT_CMD(c);
  EXPECT_EQ(c.value, UINT64_MAX) << "the guest sees a byte the host did not write at offset "
                                 << c.value;
  CVM_ASSERT_CMD(cmd_->fill8(gpa(1), ps, 0xff));
  for (uint64_t off = 0; off < ps; off += 61) ASSERT_EQ(*hva(1, off), 0xff) << "offset " << off;
  EXPECT_EQ(*hva(0, ps - 1), 0xaa) << "the page before was not touched";
  EXPECT_EQ(*hva(2), 0xaa) << "the page after was not touched";
  // And again in the other direction after the guest has the page mapped.
  *hva(1, 8) = 0x11;
  auto r = cmd_->read8(gpa(1, 8));
  CVM_ASSERT_CMD(r);
  EXPECT_EQ(r.value, 0x11u);
  CVM_ASSERT_CMD(cmd_->exit());
}

CVM_TEST_P(GmemGuest, PunchHoleZeroesForGuestAndHost, "MMAP-012") {
  const uint64_t ps = page_size();
  // The guest writes every page, so KVM has them mapped for the guest.
  CVM_ASSERT_CMD(cmd_->fill8(gpa(0), kPages * ps, 0x77));
  ASSERT_EQ(*hva(2, 5), 0x77);
  ASSERT_TRUE(ok(mem_.punch_hole(2 * ps, ps)));
  for (uint64_t off = 0; off < ps; off++) ASSERT_EQ(*hva(2, off), 0) << "host, offset " << off;
  auto g = cmd_->check8(gpa(2), ps, 0);
  CVM_ASSERT_CMD(g);
  EXPECT_EQ(g.value, UINT64_MAX) << "the guest still sees old data at offset " << g.value
                                 << " of the punched page";
  // Neighbours keep their data.
  auto n = cmd_->check8(gpa(1), ps, 0x77);
  CVM_ASSERT_CMD(n);
  EXPECT_EQ(n.value, UINT64_MAX);
  // The punched page is usable again, by both sides.
  CVM_ASSERT_CMD(cmd_->write8(gpa(2, 9), 0x33));
  EXPECT_EQ(*hva(2, 9), 0x33);
  // Host writes, punch, guest must not see the host's old write either.
  std::memset(hva(3), 0x5c, ps);
  ASSERT_TRUE(ok(mem_.punch_hole(3 * ps, ps)));
  auto z = cmd_->check8(gpa(3), ps, 0);
  CVM_ASSERT_CMD(z);
  EXPECT_EQ(z.value, UINT64_MAX) << "stale host data visible to the guest";
  CVM_ASSERT_CMD(cmd_->exit());
}

CVM_INSTANTIATE_FOR_PLATFORMS(GmemGuest);

}  // namespace
}  // namespace cvm::suites

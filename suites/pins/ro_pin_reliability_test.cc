// R/O long-term pin reliability in private writable (COW) mappings (seed 001, selftests/mm/cow.c
// do_test_ro_pin): take a R/O long-term pin, modify the page through the page table, read
// through the pin: the pin must see the modification, for every backing and for GUP and
// GUP-fast. And its consequence: R/O long-term pinning populates an exclusive anonymous page
// instead of pinning the shared zeropage.
// Requirements: PIN-001 (non-anonymous backings), PIN-002 (anonymous), PIN-003 (zeropage);
// PIN-005 (INFO) records what a short-term R/O reference (vmsplice) sees instead.
//
// These need a R/O long-term pinner that can be read through: gup_test (CONFIG_GUP_TEST). io_uring
// only takes R/W pins (rw_pin_reliability_test.cc), vmsplice takes short-term references.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#include "pin_cases.h"

namespace cvm::suites::pins {
namespace {

using testing::kCapabilityAbsent;

constexpr uint8_t kModified = 0x5c;

// do_test_ro_pin: pin R/O long-term, write through the page table, read through the pin.
// r_o_mapped: map the page R/O while pinning (cow.c's "R/O-mapped" anonymous cases).
void pin_write_and_read_back(const PinProvider& p, CowRegion& r, bool r_o_mapped) {
  if (r_o_mapped) {
    ASSERT_EQ(mprotect(r.data, r.size, PROT_READ), 0) << strerror(errno);
  }
  auto pin = p.pin(r.data, r.size);
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  ASSERT_TRUE(pin.ok()) << "R/O long-term pin with " << p.name() << " failed: " << pin.error();
  if (r_o_mapped) {
    ASSERT_EQ(mprotect(r.data, r.size, PROT_READ | PROT_WRITE), 0) << strerror(errno);
  }
  std::memset(r.data, kModified, r.size);
  EXPECT_EQ(check_through_pin(*pin.value(), r.size, kModified), "")
      << "Longterm R/O pin is not reliable: after the page table was written with 0x5c, the pin ("
      << p.name() << ") does not see it: it pinned a page the process no longer maps";
  EXPECT_TRUE(ok(pin.value()->release()));
}

// --- PIN-001: non-anonymous backings -----------------------------------------------------------
class RoPinReliabilityNonAnon : public PinCaseTest<NonAnonBacking> {};

CVM_TEST_P(RoPinReliabilityNonAnon, PinObservesLaterWrite, "PIN-001") {
  pin_write_and_read_back(*provider_, region_, false);
}

INSTANTIATE_TEST_SUITE_P(Cases, RoPinReliabilityNonAnon,
                         ::testing::ValuesIn(pin_cases(ro_longterm_choices(), non_anon_backings())),
                         PinCaseName());

// --- PIN-002: anonymous memory -----------------------------------------------------------------
const std::vector<AnonState> kRoAnonStates = {AnonState::Exclusive, AnonState::SharedAfterFork,
                                              AnonState::PreviouslyShared};

class RoPinReliabilityAnon : public AnonPinTest {};

CVM_TEST_P(RoPinReliabilityAnon, PinObservesLaterWrite, "PIN-002") {
  pin_write_and_read_back(*provider_, region_, true);
  EXPECT_EQ(finish_sharer(), "") << "the other process must keep its own copy (COW)";
}

INSTANTIATE_TEST_SUITE_P(Cases, RoPinReliabilityAnon,
                         ::testing::ValuesIn(pin_cases(ro_longterm_choices(),
                                                       anon_backings(kRoAnonStates))),
                         PinCaseName());

// --- PIN-002 as the kernel's cow selftest sets the page up -----------------------------------------
// The cases above pin while the VMA is R/O (mprotect around the pin). cow.c pins with the VMA
// writable: a page shared after fork (or previously shared) is R/O in the page table because of
// COW; an exclusive page is made R/O in the page table by mprotect(PROT_READ), clearing the
// soft-dirty bits (/proc/self/clear_refs "4": the next write must fault for soft-dirty tracking)
// and mprotect(PROT_READ|PROT_WRITE), so the mprotect optimisation cannot map it writable again
// and the write after the pin takes the write-fault path that must reuse the pinned page.
// The soft-dirty bit (bit 55) of the page's /proc/self/pagemap entry; an error text otherwise.
std::optional<bool> soft_dirty(const void* addr, std::string* why) {
  int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    *why = std::string("/proc/self/pagemap: ") + strerror(errno);
    return std::nullopt;
  }
  uint64_t entry = 0;
  off_t off = static_cast<off_t>(reinterpret_cast<uintptr_t>(addr) / getpagesize()) * 8;
  ssize_t n = pread(fd, &entry, sizeof entry, off);
  close(fd);
  if (n != static_cast<ssize_t>(sizeof entry)) {
    *why = "reading /proc/self/pagemap failed";
    return std::nullopt;
  }
  return ((entry >> 55) & 1) != 0;
}

// Writing "4" to clear_refs is accepted also by kernels without CONFIG_MEM_SOFT_DIRTY, where it
// does nothing: the page (just written) must show soft-dirty before and clean after, else the
// page-table write protection this case needs was not set up.
bool clear_soft_dirty(const void* page, std::string* why) {
  auto before = soft_dirty(page, why);
  if (!before) return false;
  if (!*before) {
    *why = "soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY): a written page's pagemap soft-dirty bit "
           "is clear, so clear_refs cannot write-protect it";
    return false;
  }
  int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) {
    *why = std::string("/proc/self/clear_refs: ") + strerror(errno);
    return false;
  }
  ssize_t n = write(fd, "4", 1);
  int err = errno;
  close(fd);
  if (n != 1) {
    *why = std::string("writing 4 (soft-dirty) to /proc/self/clear_refs: ") + strerror(err);
    return false;
  }
  auto after = soft_dirty(page, why);
  if (!after) return false;
  if (*after) {
    *why = "clear_refs 4 left the page soft-dirty";
    return false;
  }
  return true;
}

// Exclusive pages are write-protected in the page table as cow.c does; shared ones are by COW.
class RoPinReliabilityAnonCowStyle : public AnonPinTest {
 protected:
  void SetUp() override {
    AnonPinTest::SetUp();
    if (IsSkipped() || HasFatalFailure()) return;
    const bool exclusive = GetParam().backing.state == AnonState::Exclusive;
    RecordProperty("setup", exclusive
                                ? "mprotect R/O, clear soft-dirty, mprotect R/W (PTE write-protected)"
                                : "VMA writable, PTE R/O by COW");
    if (!exclusive) return;
    ASSERT_EQ(mprotect(region_.data, region_.size, PROT_READ), 0) << strerror(errno);
    std::string why;
    bool cleared = clear_soft_dirty(region_.data, &why);
    ASSERT_EQ(mprotect(region_.data, region_.size, PROT_READ | PROT_WRITE), 0) << strerror(errno);
    if (!cleared) GTEST_SKIP() << kCapabilityAbsent << why;
  }
};

CVM_TEST_P(RoPinReliabilityAnonCowStyle, PinObservesLaterWrite, "PIN-002") {
  pin_write_and_read_back(*provider_, region_, false);
  EXPECT_EQ(finish_sharer(), "") << "the other process must keep its own copy (COW)";
}

INSTANTIATE_TEST_SUITE_P(Cases, RoPinReliabilityAnonCowStyle,
                         ::testing::ValuesIn(pin_cases(ro_longterm_choices(),
                                                       anon_backings(kRoAnonStates))),
                         PinCaseName());

// --- PIN-003: the zeropage is not pinned; an exclusive anonymous page is populated ---------------
class RoPinZeropage : public ZeropagePinTest {};

CVM_TEST_P(RoPinZeropage, PopulatesInsteadOfPinningZeropage, "PIN-003") {
  const bool huge = GetParam().backing.kind == NonAnon::HugeZeropage;
  const PinProvider& p = *provider_;
  CowRegion& r = region_;
  CVM_ASSIGN_OR_FAIL(PageIdentity before, page_identity(r.data));
  CVM_ASSIGN_OR_FAIL(auto rss_before, smaps_fields(r.data));

  auto pin = p.pin(r.data, r.size);
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  ASSERT_TRUE(pin.ok()) << "R/O long-term pin of a zeropage-mapped range with " << p.name()
                        << " failed: " << pin.error();
  CVM_ASSIGN_OR_FAIL(PageIdentity after, page_identity(r.data));
  EXPECT_FALSE(after.zero_page || after.huge_zero_page)
      << "the R/O long-term pin left the " << (huge ? "huge " : "") << "zeropage mapped (pfn "
      << after.pfn << "): the kernel pinned the shared zeropage";
  EXPECT_TRUE(after.anon && after.exclusive)
      << "an exclusive anonymous page must have been populated (pfn " << after.pfn << ")";
  EXPECT_NE(after.pfn, before.pfn);
  CVM_ASSIGN_OR_FAIL(auto rss_after, smaps_fields(r.data));
  EXPECT_GT(rss_after["Rss"], rss_before["Rss"]) << "populating must raise the RSS";
  RecordProperty("observation", "pfn " + std::to_string(before.pfn) + " (zeropage) -> " +
                                    std::to_string(after.pfn) + "; Rss " +
                                    std::to_string(rss_before["Rss"]) + " -> " +
                                    std::to_string(rss_after["Rss"]) + " kB");
  // The populated page still reads as zeroes and is the page the process maps.
  EXPECT_EQ(check_through_pin(*pin.value(), r.size, 0), "");
  std::memset(r.data, kModified, r.size);
  EXPECT_EQ(check_through_pin(*pin.value(), r.size, kModified), "");
  EXPECT_TRUE(ok(pin.value()->release()));
}

// Backing-major, as the names were first listed.
std::vector<PinCase<NonAnonBacking>> ro_zeropage_cases() {
  std::vector<PinCase<NonAnonBacking>> v;
  for (const NonAnonBacking& b : zeropage_backings())
    for (const PinChoice& pin : ro_longterm_choices()) v.push_back({b, pin});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RoPinZeropage, ::testing::ValuesIn(ro_zeropage_cases()),
                         PinCaseName());

// --- PIN-005 (INFO): a short-term R/O reference may keep a snapshot ---------------------------
// vmsplice takes plain R/O page references (no FOLL_LONGTERM): the same procedure records whether
// the reference still shows the replaced page (snapshot semantics) or the later write. Either is
// allowed; a mix of both within one page is not.
class ShortTermReference : public ::testing::TestWithParam<NonAnonBacking> {
 protected:
  void SetUp() override {
    vmsplice_ = pin_provider_by_name("vmsplice");
    ASSERT_NE(vmsplice_, nullptr);
    ChosenProvider chosen = choose_provider({vmsplice_}, GetParam().recorded());
    if (!chosen.provider) GTEST_SKIP() << chosen.absent;
    prepare_non_anon(GetParam(), region_);
  }
  void TearDown() override { region_.reset(); }

  const PinProvider* vmsplice_ = nullptr;
  CowRegion region_;
};

CVM_TEST_P(ShortTermReference, SnapshotOrLaterWriteRecorded, "PIN-005") {
  CowRegion& r = region_;
  const size_t len = std::min<size_t>(r.size, 64 << 10);  // what an undrained pipe holds
  auto pin = vmsplice_->pin(r.data, len);
  ASSERT_TRUE(pin.ok()) << "vmsplice of a private mapping: " << pin.error();
  std::memset(r.data, kModified, r.size);
  CVM_ASSIGN_OR_FAIL(std::vector<uint8_t> d, pin.value()->read_through(0, len));
  const bool old_page = check_bytes(d.data(), len, r.initial, "the reference").empty();
  const bool new_page = check_bytes(d.data(), len, kModified, "the reference").empty();
  EXPECT_TRUE(old_page || new_page)
      << "the reference shows neither the page before the write nor after it, nor all of one";
  RecordProperty("observation", old_page ? "snapshot: the reference kept the replaced page"
                                         : "the reference observed the later write");
}

INSTANTIATE_TEST_SUITE_P(Cases, ShortTermReference, ::testing::ValuesIn(non_anon_backings()),
                         [](const auto& i) { return param_safe(i.param.name() + "_vmsplice"); });

}  // namespace
}  // namespace cvm::suites::pins

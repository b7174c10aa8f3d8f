// R/W long-term pins in private writable (COW) mappings stay coherent with the page table
// (seed 001): a R/W long-term pin (io_uring fixed buffer; gup_test R/W where the kernel has it)
// breaks COW when it is taken, so afterwards writes through the mapping are seen through the pin
// and writes through the pin (io_uring reading into the fixed buffer) are seen through the
// mapping. Same backings as the R/O reliability cases, plus a fork while the page is pinned.
// Also: a R/W long-term pin of a zeropage-mapped range pins a populated exclusive anonymous page,
// never the zeropage. Requirement: PIN-004.
#include <sys/mman.h>

#include <cstring>

#include "pin_cases.h"

namespace cvm::suites::pins {
namespace {

constexpr uint8_t kViaMapping = 0x5c;  // written through the page table
constexpr uint8_t kViaPin = 0x3b;      // written through the pin
constexpr uint8_t kInChild = 0xd7;     // written by a forked child into its copy

// After the pin: page-table writes visible through the pin, pin writes visible in the mapping.
void check_coherent(const PinProvider& p, Pin& pin, CowRegion& r) {
  std::memset(r.data, kViaMapping, r.size);
  EXPECT_EQ(check_through_pin(pin, r.size, kViaMapping), "")
      << "a write through the mapping after the R/W long-term pin (" << p.name()
      << ") is not seen through the pin";
  for (auto [off, len] : sample_ranges(r.size)) {
    auto w = pin.write_through(off, std::vector<uint8_t>(len, kViaPin));
    if (!w.ok() && w.err() == ENOTSUP) {
      ::testing::Test::RecordProperty("write_through", p.name() + " cannot write through its pin");
      return;
    }
    ASSERT_TRUE(w.ok()) << "writing through the pin: " << w.error();
    EXPECT_EQ(check_bytes(r.data + off, len, kViaPin, "the mapping"), "")
        << "a write through the pin (" << p.name() << ") is not seen through the mapping";
  }
  ::testing::Test::RecordProperty("write_through", "checked");
}

// A child forked while the page is pinned must get its own copy: its writes stay out of the pin.
void fork_while_pinned(Pin& pin, CowRegion& r) {
  uint8_t* data = r.data;
  size_t size = r.size;
  ChildOutcome o = run_in_child([=](const ChildReport& rep) {
    std::memset(data, kInChild, size);
    std::string bad = check_bytes(data, size, kInChild, "the child's copy");
    if (!bad.empty()) {
      rep.write(bad);
      return 1;
    }
    return 0;
  });
  ASSERT_TRUE(o.exited_with(0)) << o.describe() << " " << o.output;
  EXPECT_EQ(check_bytes(r.data, r.size, r.initial, "the parent's mapping"), "")
      << "a child's write after fork leaked into the parent's pinned page";
  EXPECT_EQ(check_through_pin(pin, r.size, r.initial), "")
      << "a child's write after fork reached the parent's pin";
}

// Pins, optionally forks while pinned, checks coherence, releases.
void run_rw_case(const PinProvider& p, CowRegion& r, bool fork_while_pinned_too) {
  auto pin = p.pin(r.data, r.size);
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  ASSERT_TRUE(pin.ok()) << "R/W long-term pin of a private mapping with " << p.name()
                        << " failed (MAP_PRIVATE can always be pinned): " << pin.error();
  if (fork_while_pinned_too) {
    fork_while_pinned(*pin.value(), r);
  }
  check_coherent(p, *pin.value(), r);
  EXPECT_TRUE(ok(pin.value()->release()));
}

// --- non-anonymous backings --------------------------------------------------------------------
class RwPinReliabilityNonAnon : public PinCaseTest<NonAnonBacking> {};

CVM_TEST_P(RwPinReliabilityNonAnon, PinAndPageTableStayCoherent, "PIN-004") {
  run_rw_case(*provider_, region_, false);
}

INSTANTIATE_TEST_SUITE_P(Cases, RwPinReliabilityNonAnon,
                         ::testing::ValuesIn(pin_cases(rw_longterm_choices(), non_anon_backings())),
                         PinCaseName());

// --- anonymous memory --------------------------------------------------------------------------
class RwPinReliabilityAnon : public AnonPinTest {};

CVM_TEST_P(RwPinReliabilityAnon, PinAndPageTableStayCoherent, "PIN-004") {
  run_rw_case(*provider_, region_, GetParam().backing.state == AnonState::ForkedWhilePinned);
  EXPECT_EQ(finish_sharer(), "") << "the other process must keep its own copy (COW)";
}

INSTANTIATE_TEST_SUITE_P(
    Cases, RwPinReliabilityAnon,
    ::testing::ValuesIn(pin_cases(
        rw_longterm_choices(), anon_backings({AnonState::Exclusive, AnonState::SharedAfterFork,
                                              AnonState::PreviouslyShared,
                                              AnonState::ForkedWhilePinned}))),
    PinCaseName());

// --- a R/W long-term pin of a zeropage-mapped range --------------------------------------------
class RwPinZeropage : public ZeropagePinTest {};

CVM_TEST_P(RwPinZeropage, PinsAPopulatedPageNotTheZeropage, "PIN-004") {
  const PinProvider& p = *provider_;
  CowRegion& r = region_;
  CVM_ASSIGN_OR_FAIL(PageIdentity before, page_identity(r.data));
  auto pin = p.pin(r.data, r.size);
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  ASSERT_TRUE(pin.ok()) << "R/W long-term pin of a zeropage-mapped range: " << pin.error();
  CVM_ASSIGN_OR_FAIL(PageIdentity after, page_identity(r.data));
  EXPECT_FALSE(after.zero_page || after.huge_zero_page)
      << "the R/W long-term pin left the zeropage mapped (pfn " << after.pfn << ")";
  EXPECT_TRUE(after.anon && after.exclusive)
      << "an exclusive anonymous page must be mapped after the pin (pfn " << after.pfn << ")";
  RecordProperty("observation", "pfn " + std::to_string(before.pfn) + " (zeropage) -> " +
                                    std::to_string(after.pfn) + " (exclusive anonymous)");
  EXPECT_EQ(check_through_pin(*pin.value(), r.size, 0), "") << "the populated page reads as zeroes";
  check_coherent(p, *pin.value(), r);
  EXPECT_TRUE(ok(pin.value()->release()));
}

INSTANTIATE_TEST_SUITE_P(Cases, RwPinZeropage,
                         ::testing::ValuesIn(pin_cases(rw_longterm_choices(), zeropage_backings())),
                         PinCaseName());

}  // namespace
}  // namespace cvm::suites::pins

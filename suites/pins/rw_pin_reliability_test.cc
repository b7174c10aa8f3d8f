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

using testing::kCapabilityAbsent;

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

// Pins, optionally forks while pinned, checks coherence, releases.
void run_rw_case(const PinProvider& p, CowRegion& r, bool fork_while_pinned) {
  auto pin = p.pin(r.data, r.size);
  CVM_SKIP_IF_PIN_UNSUPPORTED(p, pin);
  ASSERT_TRUE(pin.ok()) << "R/W long-term pin of a private mapping with " << p.name()
                        << " failed (MAP_PRIVATE can always be pinned): " << pin.error();
  if (fork_while_pinned) {
    // The child must get its own copy of the pinned page: its writes stay out of the pin.
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
    EXPECT_EQ(check_through_pin(*pin.value(), r.size, r.initial), "")
        << "a child's write after fork reached the parent's pin";
  }
  check_coherent(p, *pin.value(), r);
  auto rel = pin.value()->release();
  EXPECT_TRUE(rel.ok()) << rel.error();
}

std::string provider_tag(const PinProvider* p) { return p->name(); }

// --- non-anonymous backings --------------------------------------------------------------------
struct NonAnonCase {
  NonAnonBacking backing;
  const PinProvider* provider;
};
std::ostream& operator<<(std::ostream& os, const NonAnonCase& c) {
  return os << c.backing.name() << " " << c.provider->name();
}

class RwPinReliabilityNonAnon : public ::testing::TestWithParam<NonAnonCase> {};

CVM_TEST_P(RwPinReliabilityNonAnon, PinAndPageTableStayCoherent, "PIN-004") {
  const NonAnonCase& c = GetParam();
  record_case(c.provider, c.backing.name());
  CVM_SKIP_IF(c.provider->unavailable());
  CowRegion r;
  prepare_non_anon(c.backing, r);
  if (IsSkipped() || HasFatalFailure()) return;
  RecordProperty("backing_verified", r.verified);
  run_rw_case(*c.provider, r, false);
}

std::vector<NonAnonCase> non_anon_cases() {
  std::vector<NonAnonCase> v;
  for (const PinProvider* p : rw_longterm_providers())
    for (const auto& b : non_anon_backings()) v.push_back({b, p});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RwPinReliabilityNonAnon, ::testing::ValuesIn(non_anon_cases()),
                         [](const auto& i) {
                           return param_safe(i.param.backing.name() + "_" + provider_tag(i.param.provider));
                         });

// --- anonymous memory --------------------------------------------------------------------------
struct AnonCase {
  AnonBacking backing;
  const PinProvider* provider;
};
std::ostream& operator<<(std::ostream& os, const AnonCase& c) {
  return os << c.backing.name() << " " << c.provider->name();
}

class RwPinReliabilityAnon : public ::testing::TestWithParam<AnonCase> {};

CVM_TEST_P(RwPinReliabilityAnon, PinAndPageTableStayCoherent, "PIN-004") {
  const AnonCase& c = GetParam();
  record_case(c.provider, "anon_" + c.backing.name());
  CVM_SKIP_IF(c.provider->unavailable());
  CowRegion r;
  prepare_anon(c.backing.size, r);
  if (IsSkipped() || HasFatalFailure()) return;
  RecordProperty("backing_verified", r.verified);
  std::optional<Sharer> sharer;
  if (c.backing.state == AnonState::SharedAfterFork || c.backing.state == AnonState::PreviouslyShared)
    sharer.emplace(Sharer::fork_child(r, r.initial, c.backing.state == AnonState::PreviouslyShared));
  run_rw_case(*c.provider, r, c.backing.state == AnonState::ForkedWhilePinned);
  if (sharer) {
    EXPECT_EQ(sharer->finish(), "") << "the other process must keep its own copy (COW)";
  }
}

std::vector<AnonCase> anon_cases() {
  std::vector<AnonCase> v;
  for (const PinProvider* p : rw_longterm_providers())
    for (AnonSize s : {AnonSize::Base, AnonSize::Thp})
      for (AnonState st : {AnonState::Exclusive, AnonState::SharedAfterFork,
                           AnonState::PreviouslyShared, AnonState::ForkedWhilePinned})
        v.push_back({{st, s}, p});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RwPinReliabilityAnon, ::testing::ValuesIn(anon_cases()),
                         [](const auto& i) {
                           return param_safe(i.param.backing.name() + "_" + provider_tag(i.param.provider));
                         });

// --- a R/W long-term pin of a zeropage-mapped range --------------------------------------------
struct ZeroCase {
  bool huge;
  const PinProvider* provider;
};
std::ostream& operator<<(std::ostream& os, const ZeroCase& c) {
  return os << (c.huge ? "huge_zeropage " : "shared_zeropage ") << c.provider->name();
}

class RwPinZeropage : public ::testing::TestWithParam<ZeroCase> {};

CVM_TEST_P(RwPinZeropage, PinsAPopulatedPageNotTheZeropage, "PIN-004") {
  const ZeroCase& c = GetParam();
  NonAnonBacking b{c.huge ? NonAnon::HugeZeropage : NonAnon::SharedZeropage};
  record_case(c.provider, b.name());
  CVM_SKIP_IF(c.provider->unavailable());
  if (auto why = page_identity_unavailable())
    GTEST_SKIP() << kCapabilityAbsent << "cannot tell which page is mapped: " << *why;
  CowRegion r;
  prepare_non_anon(b, r);
  if (IsSkipped() || HasFatalFailure()) return;
  RecordProperty("backing_verified", r.verified);
  auto before = page_identity(r.data);
  ASSERT_TRUE(before.ok()) << before.error();
  auto pin = c.provider->pin(r.data, r.size);
  CVM_SKIP_IF_PIN_UNSUPPORTED(*c.provider, pin);
  ASSERT_TRUE(pin.ok()) << "R/W long-term pin of a zeropage-mapped range: " << pin.error();
  auto after = page_identity(r.data);
  ASSERT_TRUE(after.ok()) << after.error();
  EXPECT_FALSE(after->zero_page || after->huge_zero_page)
      << "the R/W long-term pin left the zeropage mapped (pfn " << after->pfn << ")";
  EXPECT_TRUE(after->anon && after->exclusive)
      << "an exclusive anonymous page must be mapped after the pin (pfn " << after->pfn << ")";
  RecordProperty("observation", "pfn " + std::to_string(before->pfn) + " (zeropage) -> " +
                                    std::to_string(after->pfn) + " (exclusive anonymous)");
  EXPECT_EQ(check_through_pin(*pin.value(), r.size, 0), "") << "the populated page reads as zeroes";
  check_coherent(*c.provider, *pin.value(), r);
  EXPECT_TRUE(pin.value()->release().ok());
}

std::vector<ZeroCase> zero_cases() {
  std::vector<ZeroCase> v;
  for (const PinProvider* p : rw_longterm_providers())
    for (bool huge : {false, true}) v.push_back({huge, p});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, RwPinZeropage, ::testing::ValuesIn(zero_cases()),
                         [](const auto& i) {
                           return std::string(i.param.huge ? "huge_zeropage_" : "shared_zeropage_") +
                                  provider_tag(i.param.provider);
                         });

}  // namespace
}  // namespace cvm::suites::pins

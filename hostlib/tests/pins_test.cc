// Pin providers on the real kernel, and request matching.
#include <gtest/gtest.h>

#include <cstring>

#include "cvmconf/fd.h"
#include "cvmconf/pins.h"

namespace cvm {
namespace {

TEST(PinRequest, MatchesKinds) {
  PinKind ro_long_fast{false, true, true, GupFlavour::Fast};
  PinKind rw_long_any{true, true, true, GupFlavour::Either};
  PinRequest ro_long;
  ro_long.write = false;
  ro_long.longterm = true;
  EXPECT_TRUE(ro_long.matches(ro_long_fast));
  EXPECT_FALSE(ro_long.matches(rw_long_any));
  PinRequest fast;
  fast.flavour = GupFlavour::Fast;
  EXPECT_TRUE(fast.matches(ro_long_fast));
  EXPECT_FALSE(fast.matches(rw_long_any)) << "a provider of either flavour is not specifically fast";
  EXPECT_TRUE(PinRequest{}.matches(rw_long_any));
  EXPECT_EQ(ro_long.describe(), "R/O long-term pin");
  EXPECT_EQ(ro_long_fast.describe(), "R/O long-term FOLL_PIN (GUP-fast)");
}

TEST(PinProviders, MissingKindNamesWhatIsMissing) {
  PinRequest req;
  req.write = true;
  req.longterm = false;
  req.foll_pin = true;  // no provider of this build takes short-term R/W FOLL_PIN pins
  auto p = find_pin_provider(req);
  bool any = false;
  for (const PinProvider* pp : pin_providers()) any |= req.matches(pp->kind()) && !pp->unavailable();
  if (any) GTEST_SKIP() << "not applicable: this build has such a provider";
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message().rfind("capability absent: no R/W short-term FOLL_PIN pin provider", 0), 0u)
      << p.error();
}

class ProviderTest : public ::testing::TestWithParam<const PinProvider*> {};

TEST_P(ProviderTest, PinsAnonymousMemoryAndReadsThroughThePin) {
  const PinProvider* p = GetParam();
  if (auto why = p->unavailable()) GTEST_SKIP() << *why;
  auto m = Mapping::anonymous(4 * page_size());
  ASSERT_TRUE(m.ok());
  std::memset(m->data(), 0x3c, m->size());
  auto pin = p->pin(m->data(), m->size());
  ASSERT_TRUE(pin.ok()) << p->name() << ": " << pin.error();
  auto data = pin.value()->read_through(0, m->size());
  ASSERT_TRUE(data.ok()) << data.error();
  ASSERT_EQ(data->size(), m->size());
  EXPECT_EQ((*data)[0], 0x3c);
  EXPECT_EQ((*data)[m->size() - 1], 0x3c);
  EXPECT_TRUE(pin.value()->release().ok());
  EXPECT_TRUE(pin.value()->release().ok()) << "release is idempotent";
}

TEST_P(ProviderTest, RefusesUnmappedMemoryWithEfault) {
  const PinProvider* p = GetParam();
  if (auto why = p->unavailable()) GTEST_SKIP() << *why;
  auto m = Mapping::map(page_size(), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_TRUE(m.ok());
  auto pin = p->pin(m->data(), m->size());
  ASSERT_FALSE(pin.ok()) << p->name() << " pinned PROT_NONE memory";
  EXPECT_EQ(pin.err(), EFAULT) << pin.error();
}

INSTANTIATE_TEST_SUITE_P(All, ProviderTest, ::testing::ValuesIn(pin_providers()),
                         [](const auto& pinfo) { return pinfo.param->name(); });

}  // namespace
}  // namespace cvm

// Pin providers on the real kernel, and request matching.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <set>

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
  if (!available_pin_providers(req).empty())
    GTEST_SKIP() << "not applicable: this build has such a provider";
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.error().message().rfind("capability absent: no R/W short-term FOLL_PIN pin provider", 0), 0u)
      << p.error();
}

TEST(PinRequest, ReadsThroughExcludesProvidersThatCannot) {
  PinKind rdma{false, true, true, GupFlavour::Fast};
  rdma.reads_through = false;
  PinRequest ro_long;
  ro_long.write = false;
  ro_long.longterm = true;
  EXPECT_TRUE(ro_long.matches(rdma));
  ro_long.reads_through = true;
  EXPECT_FALSE(ro_long.matches(rdma));
}

TEST(PinProviders, NoReadThroughProviderNamesWhatIsMissing) {
  PinRequest ro_long;
  ro_long.write = false;
  ro_long.longterm = true;
  ro_long.reads_through = true;
  auto p = find_pin_provider(ro_long);
  if (p.ok()) GTEST_SKIP() << "not applicable: this kernel has " << p.value()->name();
  EXPECT_EQ(p.error().message().rfind("capability absent: no R/O long-term pin provider that can read "
                                      "through the pin (", 0), 0u) << p.error();
}

TEST(PinProviders, EveryProviderHasAUniqueNameAndIsFoundByIt) {
  std::set<std::string> names;
  for (const PinProvider* p : pin_providers()) {
    EXPECT_TRUE(names.insert(p->name()).second) << p->name();
    EXPECT_EQ(pin_provider_by_name(p->name()), p);
  }
  for (const char* n : {"io_uring", "vmsplice", "gup_test_ro", "gup_test_ro_fast", "gup_test_rw",
                        "gup_test_rw_fast", "rdma_ro", "rdma_rw"})
    EXPECT_NE(pin_provider_by_name(n), nullptr) << n;
  EXPECT_EQ(pin_provider_by_name("nope"), nullptr);
  // gup_test's kinds are exactly R/O|R/W x GUP|GUP-fast, all long-term FOLL_PIN.
  auto k = pin_provider_by_name("gup_test_ro_fast")->kind();
  EXPECT_FALSE(k.write);
  EXPECT_TRUE(k.longterm && k.foll_pin && k.reads_through);
  EXPECT_EQ(k.flavour, GupFlavour::Fast);
  EXPECT_EQ(pin_provider_by_name("gup_test_rw")->kind().flavour, GupFlavour::Slow);
  EXPECT_TRUE(pin_provider_by_name("gup_test_rw")->kind().write);
}

TEST(PinProviders, FailureClassification) {
  const PinProvider* io = pin_provider_by_name("io_uring");
  for (int e : {EFAULT, EOPNOTSUPP, ENOSPC}) EXPECT_TRUE(io->is_refusal(e)) << errno_name(e);
  EXPECT_FALSE(io->is_refusal(EINVAL));
  const PinProvider* gup = pin_provider_by_name("gup_test_ro");
  EXPECT_TRUE(gup->is_refusal(EFAULT));
  EXPECT_TRUE(gup->is_unsupported(EINVAL)) << "START failing with EINVAL means unsupported";
  EXPECT_FALSE(gup->is_refusal(EINVAL));
  EXPECT_FALSE(pin_provider_by_name("vmsplice")->is_unsupported(EINVAL));
}

TEST(GupTestProbe, MissingFileNamesConfigGupTest) {
  auto why = gup_test_unavailable("/nonexistent-cvmconf/gup_test");
  ASSERT_TRUE(why);
  EXPECT_EQ(*why, "capability absent: /nonexistent-cvmconf/gup_test absent (kernel built without "
                  "CONFIG_GUP_TEST)");
}

TEST(GupTestProbe, FileWithoutTheIoctlIsNotGupTest) {
  auto why = gup_test_unavailable("/dev/null");
  ASSERT_TRUE(why);
  EXPECT_NE(why->find("does not implement PIN_LONGTERM_TEST_START (ENOTTY)"), std::string::npos)
      << *why;
}

TEST(GupTestProbe, ProviderReasonNamesConfigGupTestWhenAbsent) {
  if (access(kGupTestPath, F_OK) == 0) GTEST_SKIP() << "not applicable: this kernel has gup_test";
  auto why = pin_provider_by_name("gup_test_ro")->unavailable();
  ASSERT_TRUE(why);
  // Either debugfs could not be mounted (says so), or gup_test is absent.
  if (why->find("debugfs") == std::string::npos) {
    EXPECT_NE(why->find("CONFIG_GUP_TEST"), std::string::npos) << *why;
  }
  PinRequest ro_long;
  ro_long.write = false;
  ro_long.longterm = true;
  ro_long.reads_through = true;
  auto p = find_pin_provider(ro_long);
  ASSERT_FALSE(p.ok()) << "no R/O long-term pinner that reads through without gup_test";
  EXPECT_NE(p.error().message().find("gup_test_ro: "), std::string::npos) << p.error();
  EXPECT_NE(p.error().message().find("gup_test_ro_fast: "), std::string::npos) << p.error();
}

TEST(RdmaProbe, NoDeviceDirectory) {
  auto why = rdma_unavailable("/nonexistent-cvmconf/infiniband");
  ASSERT_TRUE(why);
  EXPECT_EQ(why->rfind("capability absent: no RDMA device (/nonexistent-cvmconf/infiniband: ", 0), 0u)
      << *why;
}

TEST(RdmaProbe, EmptyDeviceDirectory) {
  char tmpl[] = "/tmp/cvmconf-ib-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  auto why = rdma_unavailable(tmpl);
  rmdir(tmpl);
  ASSERT_TRUE(why);
  EXPECT_EQ(*why, std::string("capability absent: no RDMA device (") + tmpl + " is empty)");
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
  if (!p->kind().reads_through) {   // e.g. RDMA: the pin holds, the data is not readable here
    ASSERT_FALSE(data.ok());
    EXPECT_EQ(data.error().err, ENOTSUP) << data.error();
  } else {
    ASSERT_TRUE(data.ok()) << data.error();
    ASSERT_EQ(data->size(), m->size());
    EXPECT_EQ((*data)[0], 0x3c);
    EXPECT_EQ((*data)[m->size() - 1], 0x3c);
  }
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

TEST_P(ProviderTest, WritesThroughThePinWhenItCan) {
  const PinProvider* p = GetParam();
  if (auto why = p->unavailable()) GTEST_SKIP() << *why;
  auto m = Mapping::anonymous(2 * page_size());
  ASSERT_TRUE(m.ok());
  std::memset(m->data(), 0x11, m->size());
  auto pin = p->pin(m->data(), m->size());
  ASSERT_TRUE(pin.ok()) << pin.error();
  std::vector<uint8_t> data(100, 0xab);
  auto w = pin.value()->write_through(page_size() - 50, data);
  if (!w.ok()) {
    EXPECT_EQ(w.err(), ENOTSUP) << w.error();
    GTEST_SKIP() << "not applicable: " << p->name() << " cannot write through its pin";
  }
  EXPECT_EQ(m->data()[page_size() - 51], 0x11);
  EXPECT_EQ(m->data()[page_size() - 50], 0xab);
  EXPECT_EQ(m->data()[page_size() + 49], 0xab);
  EXPECT_EQ(m->data()[page_size() + 50], 0x11);
}

INSTANTIATE_TEST_SUITE_P(All, ProviderTest, ::testing::ValuesIn(pin_providers()),
                         [](const auto& pinfo) { return pinfo.param->name(); });

}  // namespace
}  // namespace cvm

// Fixtures of the conversion suite: every test runs once per platform; the back-end comes from
// the capability probe (hostlib/include/cvmconf/conversion.h) and is recorded per test.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "conversion_env.h"
#include "cvmconf/pins.h"
#include "platform_fixture.h"

namespace cvm::suites {

class ConversionTest : public PlatformTest {
 protected:
  // PlatformTest::SetUp, then the probe's back-end for this VM type; SKIPs with the probe's
  // exact reason when there is none.
  void SetUp() override;

  ConversionAbi abi() const { return *selection_.backend; }
  bool in_place() const { return abi() != ConversionAbi::PerVmAttributes; }
  bool payloads_ok() const { return !payloads_unsupported(); }
  bool preserves_content() const { return content_preserved_expected(abi(), platform()); }

  // An environment for the back-end with options o, the way tests make one:
  //   const ConversionEnvOptions o{.pages = 4};
  //   CVM_SKIP_IF(env_unsupported(o));
  //   CVM_ASSIGN_OR_FAIL(auto env, new_env(o));
  // env_unsupported: why this platform cannot have it (a SKIP reason), or nullopt. new_env: the
  // environment; failing to build it is a harness error (new_conversion_env). A per-VM
  // environment always gets a guest (its page state is only visible to one).
  std::optional<std::string> env_unsupported(ConversionEnvOptions o) const;
  Result<std::unique_ptr<ConversionEnv>> new_env(const ConversionEnvOptions& o);

  // The available pin providers; none, and in `why` the SKIP reason that names every provider's
  // missing capability, when no provider is available.
  static std::vector<const PinProvider*> usable_pin_providers(std::string& why);

  // One pin on the shared pages [page, page + n) of env by provider p; nullptr (reason in
  // *why) when the provider cannot pin them. (gup_test holds one pinned set per system: take
  // one pin at a time.)
  static std::unique_ptr<Pin> pin_page(ConversionEnv& env, uint64_t page, const PinProvider& p,
                                       std::string* why, uint64_t n = 1);
  // A pin by the first available provider that can pin the page; nullptr and a SKIP reason
  // (in *why) when none can.
  static std::unique_ptr<Pin> pin_page_any(ConversionEnv& env, uint64_t page, std::string* why,
                                           std::string* provider = nullptr);

  // What else the current test needs that is missing, appended to the no-back-end SKIP reason
  // so a report names every missing capability at once.
  virtual std::optional<std::string> also_missing() const { return std::nullopt; }

  ConversionSelection selection_;
};

}  // namespace cvm::suites

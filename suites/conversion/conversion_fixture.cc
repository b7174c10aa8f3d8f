#include "conversion_fixture.h"

#include <cstring>

#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"

namespace cvm::suites {

void ConversionTest::SetUp() {
  PlatformTest::SetUp();
  if (IsSkipped() || HasFatalFailure()) return;
  selection_ = probed_conversion_selection(platform());
  RecordProperty("conversion_backend",
                 selection_.backend ? conversion_abi_name(*selection_.backend)
                                    : "none: " + selection_.reason);
  if (auto why = conversion_unavailable(platform().id(), selection_)) {
    if (auto more = also_missing()) {
      std::string m = *more;
      if (m.rfind(testing::kCapabilityAbsent, 0) == 0) m = m.substr(std::strlen(testing::kCapabilityAbsent));
      *why += "; also absent: " + m;
    }
    GTEST_SKIP() << *why;
  }
}

std::optional<std::string> ConversionTest::env_unsupported(ConversionEnvOptions o) const {
  return conversion_env_unsupported(abi(), platform(), vm_caps(), o);
}

Result<std::unique_ptr<ConversionEnv>> ConversionTest::new_env(const ConversionEnvOptions& o) {
  return new_conversion_env(kvm(), platform(), abi(), o);
}

std::vector<const PinProvider*> ConversionTest::usable_pin_providers(std::string& why) {
  // find_pin_provider fails exactly when no provider is available, and says why.
  auto first = find_pin_provider({});
  if (!first) {
    why = first.error().op;
    return {};
  }
  return available_pin_providers();
}

std::unique_ptr<Pin> ConversionTest::pin_page(ConversionEnv& env, uint64_t page,
                                              const PinProvider& p, std::string* why, uint64_t n) {
  auto pin = p.pin(env.shared_hva(page), n * page_size());
  if (!pin) {
    if (why) *why = p.name() + " cannot pin a shared guest_memfd page here: " + pin.error().message();
    return nullptr;
  }
  return std::move(pin.value());
}

std::unique_ptr<Pin> ConversionTest::pin_page_any(ConversionEnv& env, uint64_t page,
                                                  std::string* why, std::string* provider) {
  std::string none;
  auto all = usable_pin_providers(none);
  if (all.empty()) {
    if (why) *why = none;
    return nullptr;
  }
  std::string reasons;
  for (const PinProvider* p : all) {
    std::string w;
    if (auto pin = pin_page(env, page, *p, &w)) {
      if (provider) *provider = p->name();
      return pin;
    }
    reasons += (reasons.empty() ? "" : "; ") + w;
  }
  if (why) *why = std::string(testing::kCapabilityAbsent) + "no pin provider can pin a shared "
                  "guest_memfd page (" + reasons + ")";
  return nullptr;
}

}  // namespace cvm::suites

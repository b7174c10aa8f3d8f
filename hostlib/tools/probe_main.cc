// cvm-probe: prints what this kernel supports (hostlib/include/cvmconf/probe.h) as JSON, plus the
// pin providers this build knows and whether each is usable here (hostlib/include/cvmconf/pins.h).
// The runner stores this output whole in the run's fingerprint, so fields added here appear in
// results without runner changes.
// Exit status: 0 when KVM could be opened, 2 when it could not (the JSON still says why).
#include <iostream>
#include <nlohmann/json.hpp>

#include "cvmconf/pins.h"
#include "cvmconf/probe.h"

namespace {

nlohmann::json pin_providers_json() {
  nlohmann::json out = nlohmann::json::array();
  for (const cvm::PinProvider* p : cvm::pin_providers()) {
    const cvm::PinKind k = p->kind();
    auto why = p->unavailable();
    nlohmann::json j = {{"name", p->name()},
                        {"kind", k.describe()},
                        {"write", k.write},
                        {"longterm", k.longterm},
                        {"foll_pin", k.foll_pin},
                        {"gup", cvm::gup_flavour_name(k.flavour)},
                        {"available", !why.has_value()}};
    if (why) j["reason"] = *why;
    out.push_back(j);
  }
  return out;
}

}  // namespace

int main() {
  cvm::Capabilities c = cvm::probe_capabilities();
  nlohmann::json j = c.to_json();
  j["pin_providers"] = pin_providers_json();
  std::cout << j.dump(2) << std::endl;
  return c.kvm_available ? 0 : 2;
}

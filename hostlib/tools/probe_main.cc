// cvm-probe: prints what this kernel supports (hostlib/include/cvmconf/probe.h) as JSON.
// Exit status: 0 when KVM could be opened, 2 when it could not (the JSON still says why).
#include <iostream>
#include <nlohmann/json.hpp>

#include "cvmconf/probe.h"

int main() {
  cvm::Capabilities c = cvm::probe_capabilities();
  std::cout << c.to_json().dump(2) << std::endl;
  return c.kvm_available ? 0 : 2;
}

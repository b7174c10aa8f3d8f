#include "cvmconf/platform.h"

namespace cvm {

std::optional<std::string> vm_type_unavailable(const Capabilities& caps, unsigned long type) {
  if (!caps.kvm_available) return "capability absent: " + caps.kvm_error;
  if (!caps.has_vm_type(type)) {
    const VmTypeCaps* v = caps.vm(type);
    std::string why = v ? v->create_error : "not probed";
    return "capability absent: VM type " + std::to_string(type) + " (" + vm_type_name(type) +
           ") not offered by this kernel: " + why;
  }
  return std::nullopt;
}

std::optional<std::string> Platform::unavailable(const Capabilities& caps) const {
  return vm_type_unavailable(caps, vm_type());
}

Result<Vm> Platform::create_vm(const Kvm& kvm) const { return kvm.create_vm(vm_type()); }

const Platform* find_platform(std::string_view id) {
  for (const Platform* p : platforms())
    if (p->id() == id) return p;
  return nullptr;
}

const Platform& default_platform() { return *platforms().front(); }

}  // namespace cvm

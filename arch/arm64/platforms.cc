// arm64 platforms: default VM and pKVM protected VM. Only compiled for aarch64 builds.
// The arm64 guest runtime (MMU setup, ONE_REG entry, MMIO ucall) is not built yet: both
// platforms report that payloads cannot run, and their VM creation is real.
#include "cvmconf/platform.h"
#include "cvmconf/uapi.h"

namespace cvm {
namespace {

constexpr const char* kNoRuntime =
    "not implemented: the arm64 guest runtime (MMU setup, KVM_SET_ONE_REG entry, MMIO ucall "
    "doorbell) is not built yet";

class Arm64Base : public Platform {
 public:
  std::optional<std::string> cannot_run_payloads() const override { return kNoRuntime; }
  Result<void> prepare_boot_region(uint8_t*, uint64_t) const override {
    return SysError{0, kNoRuntime};
  }
  Result<void> init_vcpu(const Kvm&, const Vm&, Vcpu&) const override {
    return SysError{0, kNoRuntime};
  }
  Result<void> setup_vcpu(Vcpu&, uint64_t, uint64_t, uint64_t) const override {
    return SysError{0, kNoRuntime};
  }
  uint32_t ucall_transport() const override { return CVM_TRANSPORT_MMIO; }
};

class Arm64Default final : public Arm64Base {
 public:
  std::string id() const override { return "arm64-default"; }
  std::string description() const override { return "arm64 default VM"; }
  unsigned long vm_type() const override { return 0; }
};

// pKVM protected VM. Mainline has no protected VM type in its uapi; Android's downstream ABI
// uses bit 31 (facts §6). Availability is decided by whether KVM_CREATE_VM accepts that type,
// which needs a pKVM host (kvm-arm.mode=protected).
class Arm64Pkvm final : public Arm64Base {
 public:
  std::string id() const override { return "arm64-pkvm"; }
  std::string description() const override {
    return "arm64 pKVM protected VM (KVM_VM_TYPE_ARM_PROTECTED, Android downstream ABI)";
  }
  unsigned long vm_type() const override { return uapi::vmtype::kArmProtectedAndroid; }
  bool has_private_memory() const override { return true; }
  bool confidential() const override { return true; }
  std::optional<std::string> unavailable(const Capabilities& caps) const override {
    if (!caps.kvm_available) return "capability absent: " + caps.kvm_error;
    if (!caps.has_vm_type(vm_type())) {
      std::string mode = caps.arm64_kvm_mode.empty() ? "not set" : caps.arm64_kvm_mode;
      const VmTypeCaps* v = caps.vm(vm_type());
      return "capability absent: KVM_CREATE_VM does not accept the protected VM type (bit 31; "
             "kvm-arm.mode " + mode + "): " + (v ? v->create_error : std::string("not probed"));
    }
    return std::nullopt;
  }
};

const Arm64Default kDefault;
const Arm64Pkvm kPkvm;
const Platform* const kAll[] = {&kDefault, &kPkvm};

}  // namespace

std::span<const Platform* const> platforms() { return kAll; }

}  // namespace cvm

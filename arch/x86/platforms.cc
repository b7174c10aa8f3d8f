// x86 platforms: default VM, SW_PROTECTED VM, SEV-SNP VM, TDX VM.
#include <sys/ioctl.h>

#include "cvmconf/platform.h"
#include "cvmconf/uapi.h"
#include "long_mode.h"

namespace cvm {
namespace {

// VMs whose vCPU registers the host may set: entered directly in 64-bit mode.
class X86LongModePlatform : public Platform {
 public:
  Result<void> prepare_boot_region(uint8_t* hva, uint64_t size) const override {
    return x86::build_boot_tables(hva, size);
  }
  Result<void> init_vcpu(const Kvm& kvm, const Vm&, Vcpu& vcpu) const override {
    return x86::set_supported_cpuid(kvm, vcpu);
  }
  Result<void> setup_vcpu(Vcpu& vcpu, uint64_t entry, uint64_t stack_top,
                          uint64_t boot_info_gva) const override {
    return x86::enter_long_mode(vcpu, entry, stack_top, boot_info_gva);
  }
  uint32_t boot_flags() const override {
    return x86::host_is_amd() ? CVM_BOOT_FLAG_AMD_HYPERCALL : 0;
  }
};

class X86Default final : public X86LongModePlatform {
 public:
  std::string id() const override { return "x86-default"; }
  std::string description() const override { return "x86 default VM (non-CoCo)"; }
  unsigned long vm_type() const override { return uapi::vmtype::kX86Default; }
};

class X86SwProtected final : public X86LongModePlatform {
 public:
  std::string id() const override { return "x86-sw-protected"; }
  std::string description() const override {
    return "x86 KVM_X86_SW_PROTECTED_VM (software-protected private memory, no encryption)";
  }
  unsigned long vm_type() const override { return uapi::vmtype::kX86SwProtected; }
  bool has_private_memory() const override { return true; }
};

// Hardware-isolated x86 VMs. The host cannot set their registers, so the long-mode entry above
// does not apply; booting payloads needs the platform's launch flow and a confidential ucall
// transport. cvmconf creates these VMs (guest_memfd file semantics, conversion ioctls) but does
// not boot payloads in them yet: there is no SNP/TDX hardware on which that code could be run.
class X86Confidential : public Platform {
 public:
  bool has_private_memory() const override { return true; }
  bool confidential() const override { return true; }
  Result<void> prepare_boot_region(uint8_t*, uint64_t) const override {
    return SysError{0, *cannot_run_payloads()};
  }
  Result<void> init_vcpu(const Kvm&, const Vm&, Vcpu&) const override {
    return SysError{0, *cannot_run_payloads()};
  }
  Result<void> setup_vcpu(Vcpu&, uint64_t, uint64_t, uint64_t) const override {
    return SysError{0, *cannot_run_payloads()};
  }
};

class X86Snp final : public X86Confidential {
 public:
  std::string id() const override { return "x86-snp"; }
  std::string description() const override { return "AMD SEV-SNP VM (KVM_X86_SNP_VM)"; }
  unsigned long vm_type() const override { return uapi::vmtype::kX86Snp; }
  std::optional<std::string> cannot_run_payloads() const override {
    return "not implemented: SNP payload launch (SNP_LAUNCH_START/UPDATE/FINISH, PVALIDATE, "
           "GHCB ucall transport) is not built yet";
  }
  Result<Vm> create_vm(const Kvm& kvm) const override {
    auto vm = kvm.create_vm(vm_type());
    if (!vm) return vm;
    // KVM_SEV_INIT2 with default features (amd-memory-encryption.rst 1. KVM_SEV_INIT2;
    // tools/testing/selftests/kvm/lib/x86/sev.c does the same).
    uapi::sev::kvm_sev_init init{};
    struct kvm_sev_cmd cmd {};
    cmd.id = uapi::sev::kCmdInit2;
    cmd.data = reinterpret_cast<__u64>(&init);
    if (auto r = vm->ioctl(KVM_MEMORY_ENCRYPT_OP, &cmd, "KVM_SEV_INIT2"); !r) return r.error();
    return vm;
  }
};

class X86Tdx final : public X86Confidential {
 public:
  std::string id() const override { return "x86-tdx"; }
  std::string description() const override { return "Intel TDX VM (KVM_X86_TDX_VM)"; }
  unsigned long vm_type() const override { return uapi::vmtype::kX86Tdx; }
  std::optional<std::string> cannot_run_payloads() const override {
    return "not implemented: TDX payload launch (KVM_TDX_INIT_VM/INIT_VCPU/INIT_MEM_REGION/"
           "FINALIZE_VM, reset-vector boot, TDVMCALL ucall transport) is not built yet";
  }
};

const X86Default kDefault;
const X86SwProtected kSwProtected;
const X86Snp kSnp;
const X86Tdx kTdx;
const Platform* const kAll[] = {&kDefault, &kSwProtected, &kSnp, &kTdx};

}  // namespace

std::span<const Platform* const> platforms() { return kAll; }

}  // namespace cvm

// arm64 platforms: default VM and pKVM protected VM. Only compiled for aarch64 builds.
//
// Boot: the host builds an identity map in the boot region (4 KiB granule, 39-bit VA), then
// initialises each vCPU with KVM_ARM_VCPU_INIT (PSCI 0.2) and enters the image through
// KVM_SET_ONE_REG: PC, SP_EL1, X0 = &boot_info, PSTATE = EL1h with DAIF masked, and the MMU
// already on (MAIR_EL1, TCR_EL1, TTBR0_EL1, SCTLR_EL1.{M,C,I}), as the KVM selftests do, so
// GuestVm starts and runs each vCPU on its own like on x86. A vCPU can also be left powered off
// and started by the guest with PSCI CPU_ON (payload psci_cpu_on; it then sets these registers
// itself, cvmconf_guest/arm64.h). Ucalls ring the MMIO doorbell (abi.h).
//
// A protected VM is booted the same way: in 7.2 the host still provides the vCPU's register
// state (pkvm.rst: "CPU state isolation: Unimplemented"), and the pages the host wrote before
// the first run (tables, image, boot info) are donated to the guest with their contents. The
// guest then shares the boot info page and its ucall slot back (CVM_BOOT_FLAG_ARM64_PROTECTED).
#include <sys/ioctl.h>

#include <cstddef>
#include <cstring>

#include "cvmconf/platform.h"
#include "cvmconf/uapi.h"
#include "cvmconf_guest/arm64.h"

namespace cvm {
namespace {

static_assert(CVM_SMCCC_KVM_FEATURES == uapi::pkvm::kSmcccFeatures);
static_assert(CVM_SMCCC_KVM_HYP_MEMINFO == uapi::pkvm::kSmcccHypMeminfo);
static_assert(CVM_SMCCC_KVM_MEM_SHARE == uapi::pkvm::kSmcccMemShare);
static_assert(CVM_SMCCC_KVM_MEM_UNSHARE == uapi::pkvm::kSmcccMemUnshare);
static_assert(CVM_SMCCC_KVM_MMIO_GUARD == uapi::pkvm::kSmcccMmioGuard);
static_assert(CVM_SMCCC_KVM_FUNC_MMIO_GUARD == uapi::pkvm::kFuncMmioGuard);

constexpr uint64_t core_reg(size_t offset) {
  return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / sizeof(__u32));
}
constexpr uint64_t kRegX0 = core_reg(offsetof(struct kvm_regs, regs.regs[0]));
constexpr uint64_t kRegPc = core_reg(offsetof(struct kvm_regs, regs.pc));
constexpr uint64_t kRegPstate = core_reg(offsetof(struct kvm_regs, regs.pstate));
constexpr uint64_t kRegSpEl1 = core_reg(offsetof(struct kvm_regs, sp_el1));
// System registers (op0, op1, CRn, CRm, op2), Arm ARM.
constexpr uint64_t kSctlrEl1 = ARM64_SYS_REG(3, 0, 1, 0, 0);
constexpr uint64_t kCpacrEl1 = ARM64_SYS_REG(3, 0, 1, 0, 2);
constexpr uint64_t kTtbr0El1 = ARM64_SYS_REG(3, 0, 2, 0, 0);
constexpr uint64_t kTcrEl1 = ARM64_SYS_REG(3, 0, 2, 0, 2);
constexpr uint64_t kMairEl1 = ARM64_SYS_REG(3, 0, 10, 2, 0);

constexpr uint64_t kAttrDevice = CVM_ARM64_ATTR_DEVICE, kAttrNormal = CVM_ARM64_ATTR_NORMAL;
constexpr uint64_t kMair = CVM_ARM64_MAIR;
static_assert(kMair == ((0x04ULL << (8 * kAttrDevice)) | (0xffULL << (8 * kAttrNormal))));
constexpr uint64_t kTcr = CVM_ARM64_TCR;
static_assert(kTcr == (25 | (1ULL << 8) | (1ULL << 10) | (3ULL << 12) | (0ULL << 14) |
                       (1ULL << 23) | (2ULL << 32)));
constexpr uint64_t kSctlrOn = CVM_ARM64_SCTLR_ON;
static_assert(kSctlrOn == ((1ULL << 0) | (1ULL << 2) | (1ULL << 12)));  // M, C, I
static_assert(CVM_ARM64_TTBR0 == CVM_ARM64_L1_GPA);
static_assert(CVM_ARM64_STACK_BASE == CVM_STACK_GPA && CVM_ARM64_STACK_SIZE == CVM_STACK_SIZE);
constexpr uint64_t kCpacrFpen = CVM_ARM64_CPACR;
static_assert(kCpacrFpen == 3ULL << 20);  // FP/SIMD not trapped
// PSTATE: EL1 with SP_EL1 (EL1h), D, A, I, F masked.
constexpr uint64_t kPstateEl1hMasked = 0x5 | (0xfULL << 6);

// Stage-1 descriptors.
constexpr uint64_t kValid = 1, kTable = 3, kPage = 3, kBlock = 1;
constexpr uint64_t kAf = 1ULL << 10, kShInner = 3ULL << 8;
constexpr uint64_t normal(uint64_t pa, uint64_t type) {
  return pa | type | (kAttrNormal << 2) | kShInner | kAf;
}
constexpr uint64_t device(uint64_t pa, uint64_t type) {
  return pa | type | (kAttrDevice << 2) | kAf | (1ULL << 53) | (1ULL << 54);  // PXN, UXN
}
static_assert(kValid == 1);

Result<void> build_identity_map(uint8_t* hva, uint64_t size) {
  if (size < CVM_BOOT_REGION_SIZE) return SysError{0, "boot region smaller than the layout"};
  auto* l1 = reinterpret_cast<uint64_t*>(hva + CVM_ARM64_L1_GPA);
  auto* l2 = reinterpret_cast<uint64_t*>(hva + CVM_ARM64_L2_GPA);
  auto* l3 = reinterpret_cast<uint64_t*>(hva + CVM_ARM64_L3_GPA);
  std::memset(l1, 0, 4096);
  const uint64_t doorbell_gib = CVM_UCALL_MMIO_GPA >> 30;
  for (uint64_t g = 0; g < CVM_ARM64_MAP_GIB; g++)
    l1[g] = g == doorbell_gib ? device(g << 30, kBlock) : normal(g << 30, kBlock);
  l1[0] = CVM_ARM64_L2_GPA | kTable;
  for (uint64_t i = 0; i < 512; i++) l2[i] = normal(i << 21, kBlock);
  l2[0] = CVM_ARM64_L3_GPA | kTable;
  l3[0] = 0;  // page 0 not mapped: a null dereference is a data abort
  for (uint64_t i = 1; i < 512; i++) l3[i] = normal(i << 12, kPage);
  return {};
}

class Arm64Base : public Platform {
 public:
  Result<void> prepare_boot_region(uint8_t* hva, uint64_t size) const override {
    return build_identity_map(hva, size);
  }
  Result<void> init_vcpu(const Kvm&, const Vm& vm, Vcpu& vcpu) const override {
    kvm_vcpu_init init{};
    // A protected VM refuses KVM_ARM_PREFERRED_TARGET (7.2 allows only a few VM ioctls for
    // pVMs); the generic target is what it would answer on any v8 host.
    if (!vm.ioctl(KVM_ARM_PREFERRED_TARGET, &init, "KVM_ARM_PREFERRED_TARGET")) {
      init = {};
      init.target = KVM_ARM_TARGET_GENERIC_V8;
    }
    init.features[0] |= 1U << KVM_ARM_VCPU_PSCI_0_2;
    if (auto r = vcpu.ioctl(KVM_ARM_VCPU_INIT, &init, "KVM_ARM_VCPU_INIT"); !r) return r.error();
    return {};
  }
  Result<void> setup_vcpu(Vcpu& vcpu, uint64_t entry, uint64_t stack_top,
                          uint64_t boot_info_gva) const override {
    auto sctlr = vcpu.get_one_reg(kSctlrEl1);
    if (!sctlr) return sctlr.error();
    const std::pair<uint64_t, uint64_t> regs[] = {
        {kCpacrEl1, kCpacrFpen},
        {kMairEl1, kMair},
        {kTcrEl1, kTcr},
        {kTtbr0El1, CVM_ARM64_L1_GPA},
        {kSctlrEl1, sctlr.value() | kSctlrOn},
        {kRegX0, boot_info_gva},
        {kRegSpEl1, stack_top},
        {kRegPc, entry},
        {kRegPstate, kPstateEl1hMasked},
    };
    for (const auto& [id, value] : regs)
      if (auto r = vcpu.set_one_reg(id, value); !r) return r.error();
    return {};
  }
  uint32_t ucall_transport() const override { return CVM_TRANSPORT_MMIO; }
};

class Arm64Default final : public Arm64Base {
 public:
  std::string id() const override { return "arm64-default"; }
  std::string description() const override { return "arm64 default VM"; }
  unsigned long vm_type() const override { return 0; }
};

// pKVM protected VM (KVM_VM_TYPE_ARM_PROTECTED, mainline 7.2). Availability is decided by
// whether KVM_CREATE_VM accepts that type (the probe creates one), which needs a pKVM host
// (kvm-arm.mode=protected); the SKIP reason carries the probe's errno.
class Arm64Pkvm final : public Arm64Base {
 public:
  std::string id() const override { return "arm64-pkvm"; }
  std::string description() const override {
    return "arm64 pKVM protected VM (KVM_VM_TYPE_ARM_PROTECTED)";
  }
  unsigned long vm_type() const override { return uapi::vmtype::kArmProtected; }
  bool has_private_memory() const override { return true; }
  bool confidential() const override { return true; }
  uint32_t boot_flags() const override { return CVM_BOOT_FLAG_ARM64_PROTECTED; }
  std::optional<std::string> memslots_fixed_after_run() const override {
    return "not applicable: memslots of a pKVM protected VM cannot be deleted or moved once it "
           "has run (7.2 pkvm.rst; checked by PKVM-005)";
  }
  std::optional<std::string> unavailable(const Capabilities& caps) const override {
    if (!caps.kvm_available) return "capability absent: " + caps.kvm_error;
    if (!caps.has_vm_type(vm_type())) {
      std::string mode = caps.arm64_kvm_mode.empty() ? "not set" : caps.arm64_kvm_mode;
      const VmTypeCaps* v = caps.vm(vm_type());
      return "capability absent: KVM_CREATE_VM refused the protected VM type (bit 31; "
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

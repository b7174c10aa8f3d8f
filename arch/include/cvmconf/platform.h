// Platforms: how a VM of one kind (x86 default, SW_PROTECTED, SNP, TDX; arm64 default, pKVM) is
// created, booted into the guest image, and told apart. A platform's quirks live only here;
// suites ask the platform and never spell out a VM type themselves.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>

#include "cvmconf/kvm.h"
#include "cvmconf/probe.h"
#include "cvmconf/result.h"
#include "cvmconf_guest/abi.h"

namespace cvm {

class Platform {
 public:
  virtual ~Platform() = default;
  // Stable identifier used in test names, the catalogue's `platforms` and reports.
  virtual std::string id() const = 0;
  virtual std::string description() const = 0;
  virtual unsigned long vm_type() const = 0;
  // Guest memory can be private to the guest (SW_PROTECTED, SNP, TDX, pKVM protected).
  virtual bool has_private_memory() const { return false; }
  // Hardware-isolated: the host cannot read guest registers or private memory.
  virtual bool confidential() const { return false; }
  // Memslots cannot be deleted or moved once the VM has run (pKVM protected VMs, pkvm.rst):
  // nullopt when they can, otherwise why not ("not applicable: ...").
  virtual std::optional<std::string> memslots_fixed_after_run() const { return std::nullopt; }

  // nullopt when this kernel offers the platform; otherwise the exact missing capability,
  // suitable as a SKIP reason ("capability absent: ...").
  virtual std::optional<std::string> unavailable(const Capabilities& caps) const;
  // Creates a VM of this platform, including any platform initialisation the VM needs before
  // memory can be added (e.g. SEV INIT2).
  virtual Result<Vm> create_vm(const Kvm& kvm) const;

  // nullopt when cvmconf can boot payload guests on this platform; otherwise why not.
  virtual std::optional<std::string> cannot_run_payloads() const { return std::nullopt; }
  // Fills the boot region (page tables, descriptor tables) before the image is copied in.
  virtual Result<void> prepare_boot_region(uint8_t* hva, uint64_t size) const = 0;
  // One-time vCPU initialisation after KVM_CREATE_VCPU (e.g. CPUID).
  virtual Result<void> init_vcpu(const Kvm& kvm, const Vm& vm, Vcpu& vcpu) const = 0;
  // Makes vcpu enter `entry` with the boot info pointer and stack (on every payload start).
  virtual Result<void> setup_vcpu(Vcpu& vcpu, uint64_t entry, uint64_t stack_top,
                                  uint64_t boot_info_gva) const = 0;
  virtual uint32_t ucall_transport() const { return CVM_TRANSPORT_PIO; }
  virtual uint32_t boot_flags() const { return 0; }
};

// GoogleTest prints parameters of type const Platform* with this (instead of an address).
inline void PrintTo(const Platform* p, std::ostream* os) { *os << (p ? p->id() : "null"); }

// All platforms of the architecture this binary was built for, in a fixed order (test names
// are stable across machines: a platform the kernel lacks is listed and its tests SKIP).
std::span<const Platform* const> platforms();
const Platform* find_platform(std::string_view id);
// The platform that every KVM of this architecture offers (x86-default / arm64-default).
const Platform& default_platform();

// Common availability rule: KVM present and the VM type creatable.
std::optional<std::string> vm_type_unavailable(const Capabilities& caps, unsigned long type);

}  // namespace cvm

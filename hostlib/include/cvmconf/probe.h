// Capability probe: what this kernel supports, learned by asking it (KVM_CHECK_EXTENSION on the
// system fd and on a VM of every type, creating each VM type, reading KVM module parameters).
// Never inferred from a version number, never from an unmerged series' cap number.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "cvmconf/conversion.h"

namespace cvm {

struct VmTypeCaps {
  unsigned long type = 0;
  std::string name;             // "x86-default", "x86-sw-protected", ...
  bool creatable = false;
  std::string create_error;     // why KVM_CREATE_VM failed, if it did
  // Per-VM KVM_CHECK_EXTENSION values (>= 0), or -errno when the query itself failed.
  long guest_memfd = 0;
  long guest_memfd_flags = 0;   // bitmask of GUEST_MEMFD_FLAG_* for this VM
  long memory_attributes = 0;   // bitmask (PRIVATE = 1<<3)
  long exit_hypercall = 0;      // bitmask of hypercall nrs that can exit to userspace
  long pre_fault_memory = 0;
  long memory_fault_info = 0;
  long user_memory2 = 0;
  // Shared <-> private conversion (conversion.h): the kernel's answers and the back-end chosen
  // from them ("none" with the reason when no back-end answered).
  ConversionProbeFacts conversion_facts;
  ConversionSelection conversion;
};

struct Capabilities {
  bool kvm_available = false;
  std::string kvm_error;        // one line, e.g. "open /dev/kvm: No such file or directory"
  int kvm_errno = 0;
  std::string kvm_device;
  std::string arch;             // "x86_64" / "aarch64"
  int api_version = 0;
  long vm_types_cap = 0;        // raw system KVM_CAP_VM_TYPES
  uint64_t vm_types = 0;        // bit N: type N < 64 creatable (cap confirmed by creating a VM)
  // System-fd values:
  long guest_memfd = 0;
  long guest_memfd_flags = 0;
  long memory_attributes = 0;
  long exit_hypercall = 0;
  long pre_fault_memory = 0;
  long memory_fault_info = 0;
  long user_memory2 = 0;
  std::vector<VmTypeCaps> per_type;
  // Host platform hints from module parameters / command line ("" when absent).
  std::string kvm_amd_sev_snp, kvm_intel_tdx, arm64_kvm_mode;
  // arm64: the kernel log says protected nVHE or hVHE (pKVM) mode was initialized.
  bool arm64_pkvm_initialized = false;

  const VmTypeCaps* vm(unsigned long type) const;
  // Whether creating a VM of this type succeeded. Types are not small numbers everywhere
  // (arm64's protected type is bit 31), so this asks per_type, not the vm_types bitmask.
  bool has_vm_type(unsigned long type) const;
  nlohmann::json to_json() const;
};

// Human-readable name of a VM type on this architecture ("x86-default", "type-7").
std::string vm_type_name(unsigned long type);

// Probes the kernel now. Cheap enough to call per test suite; cached_capabilities() probes once
// per process.
Capabilities probe_capabilities();
const Capabilities& cached_capabilities();

// "KVM_CAP_X=0x.." style text for skip reasons.
std::string hexval(long v);

}  // namespace cvm

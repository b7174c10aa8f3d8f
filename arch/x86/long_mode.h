// x86_64 long-mode boot shared by the platforms that let the host set guest registers
// (default and SW_PROTECTED VMs): identity page tables, GDT with a TSS, 64-bit segments.
#pragma once

#include "cvmconf/kvm.h"

namespace cvm::x86 {

// Writes GDT, TSS and identity page tables ([0, CVM_X86_MAP_GIB GiB), page 0 unmapped) into the
// boot region at hva (guest physical 0).
Result<void> build_boot_tables(uint8_t* hva, uint64_t size);
// Copies KVM's supported CPUID into the vCPU (as the KVM selftests do).
Result<void> set_supported_cpuid(const Kvm& kvm, Vcpu& vcpu);
// Puts the vCPU in 64-bit mode at entry with RSP = stack_top and RDI = rdi.
Result<void> enter_long_mode(Vcpu& vcpu, uint64_t entry, uint64_t stack_top, uint64_t rdi);
// True on AMD/Hygon hosts: guests should use vmmcall rather than vmcall.
bool host_is_amd();

}  // namespace cvm::x86

/* arm64 part of the guest runtime: image header, exceptions, MMIO doorbell, SMCCC hypercalls,
 * the protected-VM start-up (pKVM hypercalls), halt. */
#include "cvmconf_guest/guest.h"

extern char __cvm_image_start[], __cvm_image_end[], __cvm_payloads_start[], __cvm_payloads_end[];
extern void cvm_start(void);

__attribute__((section(".cvm_header"), used)) const struct cvm_image_header cvm_image_header = {
    CVM_IMAGE_MAGIC,
    CVM_GUEST_ABI_VERSION,
    CVM_ARCH_AARCH64,
    (uint64_t)__cvm_image_start,
    (uint64_t)cvm_start,
    (uint64_t)__cvm_image_end,
    (uint64_t)__cvm_payloads_start,
    (uint64_t)__cvm_payloads_end,
};

/* args: vector index (0..15), ESR_EL1, ELR_EL1, FAR_EL1. */
void cvm_arm64_exception(uint64_t vector, uint64_t esr, uint64_t elr, uint64_t far) {
  uint64_t args[4] = {vector, esr, elr, far};
  for (;;) cvm_ucall(CVM_UCALL_EXCEPTION, 4, args, 0, 0, "exception");
}

void cvm_arch_doorbell(const struct cvm_boot_info *bi) {
  /* The slot must be visible to the host before it handles the exit. A single STR without
   * writeback, so the data abort carries a valid syndrome (ISV) and KVM can emulate it. */
  __asm__ volatile("dsb ish" ::: "memory");
  __asm__ volatile("str %0, [%1]" ::"r"(bi->ucall_gpa), "r"(bi->mmio_doorbell_gpa) : "memory");
}

uint64_t cvm_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3) {
  register uint64_t x0 __asm__("x0") = nr;
  register uint64_t x1 __asm__("x1") = a0;
  register uint64_t x2 __asm__("x2") = a1;
  register uint64_t x3 __asm__("x3") = a2;
  register uint64_t x4 __asm__("x4") = a3;
  __asm__ volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : "r"(x4) : "memory");
  return x0;
}

/* Protected VMs (pKVM): before the first ucall, declare the doorbell page as MMIO where the
 * hypervisor offers MMIO_GUARD, and make the boot info page and this vCPU's ucall slot visible
 * to the host again (MEM_SHARE, one granule each; until then every page the guest touched is
 * its own). The boot info page holds every vCPU's entry, so sharing it again (another vCPU, a
 * second payload) fails harmlessly. The payload "pkvm_info" reports what these calls return. */
void cvm_arm64_boot(const struct cvm_boot_info *bi) {
  if (!(bi->flags & CVM_BOOT_FLAG_ARM64_PROTECTED)) return;
  uint64_t features = cvm_hypercall(CVM_SMCCC_KVM_FEATURES, 0, 0, 0, 0);
  uint64_t granule = cvm_hypercall(CVM_SMCCC_KVM_HYP_MEMINFO, 0, 0, 0, 0);
  if ((int64_t)granule <= 0) granule = 4096;
  uint64_t mask = ~(granule - 1);
  if (features & (1ull << CVM_SMCCC_KVM_FUNC_MMIO_GUARD))
    cvm_hypercall(CVM_SMCCC_KVM_MMIO_GUARD, bi->mmio_doorbell_gpa & mask, 0, 0, 0);
  cvm_hypercall(CVM_SMCCC_KVM_MEM_SHARE, (uint64_t)bi & mask, 0, 0, 0);
  cvm_hypercall(CVM_SMCCC_KVM_MEM_SHARE, bi->ucall_gpa & mask, 0, 0, 0);
}

void cvm_halt(void) {
  for (;;) __asm__ volatile("msr daifset, #0xf\n\twfi");
}

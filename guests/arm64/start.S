/* arm64 guest entry and exception vectors. The host enters cvm_start at EL1h with
 * X0 = &struct cvm_boot_info, SP_EL1 = top of this vCPU's stack, DAIF masked, and the MMU
 * already on (SCTLR_EL1/TCR_EL1/MAIR_EL1/TTBR0_EL1 set through KVM_SET_ONE_REG, identity map
 * built by the host in the boot region). */
#include "cvmconf_guest/arm64.h"

  .section .text.cvm_start, "ax"
  .global cvm_start
cvm_start:
  adrp x1, cvm_arm64_vectors
  add x1, x1, :lo12:cvm_arm64_vectors
  msr vbar_el1, x1
  isb
  mov x29, #0
  mov x30, #0
  mov x19, x0
  bl cvm_arm64_boot          /* protected VMs: share the boot info and ucall pages */
  mov x0, x19
  bl cvm_guest_main
1:
  wfi
  b 1b

/* A vCPU started by PSCI CPU_ON (payload psci_cpu_on) enters here at EL1 with the MMU off and
 * X0 = the context id = its &struct cvm_boot_info. It sets up what the host sets through
 * KVM_SET_ONE_REG for the other vCPUs (arm64.h), takes its stack from its vCPU id, and joins
 * cvm_start. */
  .global cvm_arm64_secondary_start
cvm_arm64_secondary_start:
  ldr x1, =CVM_ARM64_MAIR
  msr mair_el1, x1
  ldr x1, =CVM_ARM64_TCR
  msr tcr_el1, x1
  ldr x1, =CVM_ARM64_TTBR0
  msr ttbr0_el1, x1
  ldr x1, =CVM_ARM64_CPACR
  msr cpacr_el1, x1
  isb
  tlbi vmalle1
  dsb nsh
  isb
  mrs x1, sctlr_el1
  mov x2, #CVM_ARM64_SCTLR_ON
  orr x1, x1, x2
  msr sctlr_el1, x1
  isb
  ldr w1, [x0, #8]           /* boot_info.vcpu_id */
  add x1, x1, #1
  ldr x2, =CVM_ARM64_STACK_SIZE
  mul x1, x1, x2
  ldr x2, =CVM_ARM64_STACK_BASE
  add x1, x1, x2
  mov sp, x1
  b cvm_start
  .ltorg

/* 16 vectors of 0x80 bytes: {current EL with SP0, current EL with SPx, lower EL AArch64,
 * lower EL AArch32} x {synchronous, IRQ, FIQ, SError}. Each reports its index, ESR_EL1,
 * ELR_EL1 and FAR_EL1 through the exception ucall; nothing returns. */
.macro VEC idx
  .balign 0x80
  mov x0, #\idx
  mrs x1, esr_el1
  mrs x2, elr_el1
  mrs x3, far_el1
  b cvm_arm64_exception
.endm

  .section .text.cvm_vectors, "ax"
  .balign 2048
  .global cvm_arm64_vectors
cvm_arm64_vectors:
  .irp v,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
  VEC \v
  .endr

  .section .note.GNU-stack, "", %progbits

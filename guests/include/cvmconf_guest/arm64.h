/*
 * arm64 boot constants shared by the host (arch/arm64/platforms.cc, which sets them through
 * KVM_SET_ONE_REG) and the guest (guests/arm64/start.S, which sets them itself on a vCPU that
 * PSCI CPU_ON started with the MMU off). Plain #defines, usable from C, C++ and assembly.
 */
#ifndef CVMCONF_GUEST_ARM64_H
#define CVMCONF_GUEST_ARM64_H

/* MAIR_EL1: attribute 0 Device-nGnRE, attribute 1 Normal write-back (inner and outer). */
#define CVM_ARM64_ATTR_DEVICE 0
#define CVM_ARM64_ATTR_NORMAL 1
#define CVM_ARM64_MAIR 0xff04
/* TCR_EL1: T0SZ = 25 (39-bit VA, walks start at level 1), TTBR0 walks inner/outer write-back
 * cacheable and inner shareable, 4 KiB granule, TTBR1 walks disabled (EPD1), 40-bit IPS. */
#define CVM_ARM64_TCR 0x200803519
/* SCTLR_EL1 bits the guest runs with: M (MMU), C (data cache), I (instruction cache). */
#define CVM_ARM64_SCTLR_ON 0x1005
/* CPACR_EL1.FPEN: FP/SIMD not trapped. */
#define CVM_ARM64_CPACR 0x300000

/* The same layout values as abi.h (which uses C suffixes), for assembly: TTBR0 = the level-1
 * table, and the per-vCPU stacks (checked equal at compile time in arch/arm64/platforms.cc). */
#define CVM_ARM64_TTBR0 0x3000
#define CVM_ARM64_STACK_BASE 0x200000
#define CVM_ARM64_STACK_SIZE 0x20000

/* PSCI 0.2 (SMCCC, Arm DEN 0022): CPU_ON (SMC64) with X1 = target MPIDR, X2 = entry point,
 * X3 = context id (the new vCPU's X0). The entry runs at EL1 with the MMU off. */
#define CVM_PSCI_CPU_ON 0xc4000003

#endif

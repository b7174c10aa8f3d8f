/* PSCI CPU_ON: vCPU 0 starts a powered-off vCPU, which enters cvm_arm64_secondary_start and
 * runs the payload the host put in its boot info. */
#include "cvmconf_guest/arm64.h"
#include "cvmconf_guest/guest.h"

extern void cvm_arm64_secondary_start(void);

/* args[0] = target vCPU (MPIDR Aff0 as KVM numbers vCPUs); SYNC(1, PSCI return value). */
CVM_PAYLOAD(psci_cpu_on) {
  uint64_t target = bi->args[0];
  uint64_t r = cvm_hypercall(CVM_PSCI_CPU_ON, target, (uint64_t)&cvm_arm64_secondary_start,
                             CVM_BOOTINFO_GPA + target * CVM_BOOTINFO_STRIDE, 0);
  CVM_GUEST_SYNC(1, r);
}

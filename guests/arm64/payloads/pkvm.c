/* arm64 pKVM payloads: what the hypervisor offers a protected guest. */
#include "cvmconf_guest/guest.h"

/* Reports the vendor-hypervisor features bitmap and HYP_MEMINFO's granule:
 * SYNC(1, features, granule). */
CVM_PAYLOAD(pkvm_info) {
  uint64_t features = cvm_hypercall(CVM_SMCCC_KVM_FEATURES, 0, 0, 0, 0);
  uint64_t granule = cvm_hypercall(CVM_SMCCC_KVM_HYP_MEMINFO, 0, 0, 0, 0);
  CVM_GUEST_SYNC(1, features, granule);
}

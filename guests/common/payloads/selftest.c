/* Payloads that exercise the guest runtime itself (tests of the harness). */
#include "cvmconf_guest/guest.h"

/* Prints, syncs with values, returns. */
CVM_PAYLOAD(hello) {
  CVM_GUEST_PRINT("hello from vcpu %u of %u", bi->vcpu_id, bi->nr_vcpus);
  uint64_t reply = CVM_GUEST_SYNC(1, 0x1111, bi->args[0]);
  CVM_GUEST_SYNC(2, reply + 1);
}

/* Fails an assertion on purpose: the host must report this file and line. */
CVM_PAYLOAD(assert_fail) {
  uint64_t x = bi->args[0];
  CVM_GUEST_ASSERT_EQ(x, 42); /* CVM-SELFTEST-ASSERT-LINE */
}

/* Touches an unmapped guest virtual address (page 0 is never mapped): #PF on x86, a data abort
 * on arm64, reported as an exception ucall. */
CVM_PAYLOAD(page_fault) {
  uint64_t addr = 0x8;
  __asm__ volatile("" : "+r"(addr)); /* hide the constant from the compiler's bounds checks */
  (void)cvm_read8(addr);
}

/* Never exits: the watchdog must turn this into a clear failure. */
CVM_PAYLOAD(spin) {
  for (;;) cvm_cpu_relax();
}

/* Issues KVM_HC_MAP_GPA_RANGE(args[0], args[1], args[2]) and reports what it returned (x86; on
 * arm64 the same numbers go out as an SMCCC call, which KVM answers NOT_SUPPORTED). */
CVM_PAYLOAD(map_gpa_range) {
  uint64_t r = cvm_map_gpa_range(bi->args[0], bi->args[1], bi->args[2]);
  CVM_GUEST_SYNC(1, r);
}

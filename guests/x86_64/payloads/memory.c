/* Memory payloads that run without host round trips. */
#include "cvmconf_guest/guest.h"

/* Reads and writes [args[0], +args[1]) until the word at args[2] becomes non-zero, counting
 * passes; used to keep a vCPU busy on the same memory while the host probes it. */
CVM_PAYLOAD(touch_until_stopped) {
  uint64_t gva = bi->args[0], len = bi->args[1], stop = bi->args[2], passes = 0;
  while (!cvm_read64(stop)) {
    for (uint64_t off = 0; off < len; off += 4096) cvm_write8(gva + off, cvm_read8(gva + off));
    passes++;
  }
  GUEST_SYNC(1, passes);
}

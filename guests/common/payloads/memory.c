/* Memory payloads that run without host round trips. */
#include "cvmconf_guest/guest.h"

/* Reads and writes [args[0], +args[1]) until the word at args[2] becomes non-zero, counting
 * passes in the word at args[3]; keeps a vCPU busy while the host probes other memory. */
CVM_PAYLOAD(touch_until_stopped) {
  uint64_t gva = bi->args[0], len = bi->args[1], stop = bi->args[2], count = bi->args[3];
  uint64_t passes = 0;
  while (!cvm_read64(stop)) {
    for (uint64_t off = 0; off < len; off += 4096) cvm_write8(gva + off, cvm_read8(gva + off));
    cvm_write64(count, ++passes);
  }
  CVM_GUEST_SYNC(1, passes);
}

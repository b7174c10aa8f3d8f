/* The command loop: executes host-chosen memory operations one at a time (see cmd.h). */
#include "cvmconf_guest/cmd.h"
#include "cvmconf_guest/guest.h"

CVM_PAYLOAD(cmd_loop) {
  uint64_t result = 0, status = 0;
  for (;;) {
    CVM_GUEST_SYNC(CVM_STAGE_CMD, result, status);
    volatile struct cvm_ucall *u = cvm_ucall_slot();
    uint64_t op = u->reply[0], a0 = u->reply[1], a1 = u->reply[2], a2 = u->reply[3];
    result = 0;
    status = 0;
    switch (op) {
      case CVM_CMD_NOP: break;
      case CVM_CMD_EXIT: return;
      case CVM_CMD_READ8: result = cvm_read8(a0); break;
      case CVM_CMD_WRITE8: cvm_write8(a0, (uint8_t)a1); break;
      case CVM_CMD_READ64: result = cvm_read64(a0); break;
      case CVM_CMD_WRITE64: cvm_write64(a0, a1); break;
      case CVM_CMD_FILL8: cvm_fill8(a0, (uint8_t)a2, a1); break;
      case CVM_CMD_CHECK8: result = (uint64_t)cvm_check8(a0, (uint8_t)a2, a1); break;
      case CVM_CMD_FILL_PATTERN: cvm_fill_pattern(a0, a2, a1); break;
      case CVM_CMD_CHECK_PATTERN: result = (uint64_t)cvm_check_pattern(a0, a2, a1); break;
      case CVM_CMD_MAP_GPA_RANGE: result = cvm_map_gpa_range(a0, a1, a2); break;
      case CVM_CMD_HYPERCALL: result = cvm_hypercall(a0, a1, a2, 0, 0); break;
      default: status = 1; break;
    }
  }
}

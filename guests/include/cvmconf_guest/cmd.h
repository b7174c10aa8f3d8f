/*
 * Command-loop protocol: the "cmd_loop" payload lets a host test drive the guest step by step.
 * The guest sends SYNC(CVM_STAGE_CMD, result, status); the host answers in reply[0..3] with
 * {opcode, a0, a1, a2}. status is 0 on success, otherwise a CVM_CMD_ERR_* value.
 */
#ifndef CVMCONF_GUEST_CMD_H
#define CVMCONF_GUEST_CMD_H

#define CVM_STAGE_CMD 0xc3d0ull

enum cvm_cmd_op {
  CVM_CMD_NOP = 0,
  CVM_CMD_EXIT = 1,          /* payload returns -> DONE */
  CVM_CMD_READ8 = 2,         /* a0 = gva -> result = byte */
  CVM_CMD_WRITE8 = 3,        /* a0 = gva, a1 = value */
  CVM_CMD_READ64 = 4,        /* a0 = gva -> result */
  CVM_CMD_WRITE64 = 5,       /* a0 = gva, a1 = value */
  CVM_CMD_FILL8 = 6,         /* a0 = gva, a1 = len, a2 = value */
  CVM_CMD_CHECK8 = 7,        /* a0 = gva, a1 = len, a2 = value -> result = first bad offset or -1 */
  CVM_CMD_FILL_PATTERN = 8,  /* a0 = gva, a1 = len, a2 = seed */
  CVM_CMD_CHECK_PATTERN = 9, /* a0 = gva, a1 = len, a2 = seed -> result = first bad offset or -1 */
  CVM_CMD_MAP_GPA_RANGE = 10,/* a0 = gpa, a1 = npages, a2 = attrs -> result = hypercall return */
  CVM_CMD_HYPERCALL = 11,    /* a0 = nr / SMCCC function id, a1, a2 = first two arguments
                                -> result = return value (arm64: X0) */
};

#endif

/*
 * Punch-hole race against guest accesses (payload "punch_race", host: suites/races): the control
 * block the host and the vCPUs share, and the per-vCPU pattern. Plain C, used by both sides.
 *
 * vCPU v owns pages [v * pages_per_vcpu, (v + 1) * pages_per_vcpu) of the test memory. In RUN
 * mode it passes over its pages again and again: it reads every word (each must be 0 or its
 * own tag of an earlier pass: anything else is foreign or garbage data), writes its tag for the
 * current pass, and reads the page back (its tag, or 0 only if a host punch overlapped the
 * write: a 0 without a punch is a lost write, anything else is stale or foreign data). In HOLD
 * mode it only reads; in ZERO mode it only reads and pages [zero_first, zero_first+zero_npages)
 * of its region must read 0 (the host punched them while the vCPU held still).
 *
 * Conversion races (RACE-006) also convert the pages between shared and private. Where a
 * conversion may change what the guest reads (contents not preserved, or the per-VM back-end,
 * whose shared and private pages are different memory), the host counts it in conv_begin /
 * conv_end; a read-back that overlapped such a conversion may then also see 0 or one of the
 * vCPU's own earlier tags (never foreign or garbage data). Where contents must be preserved the
 * host leaves the counters alone and the read-back check stays exact.
 */
#ifndef CVMCONF_GUEST_RACE_H
#define CVMCONF_GUEST_RACE_H

#include <stdint.h>

#include "cvmconf_guest/abi.h"

#define CVM_RACE_MODE_RUN 0u
#define CVM_RACE_MODE_HOLD 1u
#define CVM_RACE_MODE_ZERO 2u
#define CVM_RACE_REQ(epoch, mode) (((uint64_t)(epoch) << 8) | (mode))
#define CVM_RACE_REQ_MODE(req) ((uint32_t)((req) & 0xffu))

#define CVM_RACE_TAG_MARK 0xc5ull
static inline uint64_t cvm_race_tag(uint64_t vcpu, uint64_t page, uint64_t pass) {
  return (CVM_RACE_TAG_MARK << 56) | ((vcpu & 0xffull) << 48) | ((page & 0xffffull) << 32) |
         (pass & 0xffffffffull);
}
#define CVM_RACE_TAG_VCPU(t) (((t) >> 48) & 0xffull)
#define CVM_RACE_TAG_PAGE(t) (((t) >> 32) & 0xffffull)
#define CVM_RACE_TAG_PASS(t) ((t) & 0xffffffffull)
#define CVM_RACE_TAG_IS_MARKED(t) (((t) >> 56) == CVM_RACE_TAG_MARK)

enum cvm_race_violation {
  CVM_RACE_OK = 0,
  CVM_RACE_FOREIGN = 1,        /* another vCPU's or another page's tag */
  CVM_RACE_GARBAGE = 2,        /* a value nobody wrote */
  CVM_RACE_FUTURE = 3,         /* own tag of a pass that has not happened */
  CVM_RACE_LOST_WRITE = 4,     /* read-back 0 although no punch overlapped the write */
  CVM_RACE_STALE = 5,          /* read-back of an older own tag right after writing */
  CVM_RACE_NOT_ZERO = 6,       /* ZERO mode: a punched page does not read 0 */
};

/* What a violation kind means, for the host's reports. */
static inline const char *cvm_race_violation_name(uint64_t k) {
  switch (k) {
    case CVM_RACE_FOREIGN: return "foreign data (another vCPU's or another page's pattern)";
    case CVM_RACE_GARBAGE: return "garbage (a value nobody wrote)";
    case CVM_RACE_FUTURE: return "its own pattern of a pass that has not happened";
    case CVM_RACE_LOST_WRITE: return "a lost write (0 read back, no punch overlapped the write)";
    case CVM_RACE_STALE: return "stale data (an older pattern read back right after writing)";
    case CVM_RACE_NOT_ZERO: return "stale data after the punch (a punched page does not read 0)";
  }
  return "unknown violation";
}

struct cvm_race_vcpu {
  uint64_t req;          /* host -> guest: CVM_RACE_REQ(epoch, mode) */
  uint64_t zero_first;   /* host -> guest: first page (of the own region) that must read 0 */
  uint64_t zero_npages;
  uint64_t ack;          /* guest: the req read at the start of the current pass */
  uint64_t done;         /* guest: the req of the last completed pass */
  uint64_t passes;       /* guest: completed passes */
  uint64_t violations;   /* guest: number of violations seen */
  uint64_t v_kind;       /* first violation: enum cvm_race_violation */
  uint64_t v_gpa;
  uint64_t v_value;
  uint64_t v_expected;
  uint64_t v_iteration;  /* the host's iteration when it was seen */
  uint64_t v_pass;
  uint64_t pad[19];
};

struct cvm_race_ctl {
  uint64_t stop;         /* host: non-zero ends the payload */
  uint64_t iteration;    /* host: its current iteration */
  uint64_t punch_begin;  /* host: punches started */
  uint64_t punch_end;    /* host: punches finished */
  uint64_t conv_begin;   /* host: conversions (that may change what the guest reads) started */
  uint64_t conv_end;     /* host: ... finished */
  uint64_t pad[2];
  struct cvm_race_vcpu vcpu[CVM_MAX_VCPUS];
};

#ifdef __cplusplus
static_assert(sizeof(struct cvm_race_vcpu) == 256, "cvm_race_vcpu layout");
#else
_Static_assert(sizeof(struct cvm_race_vcpu) == 256, "cvm_race_vcpu layout");
#endif
#ifdef __cplusplus
static_assert(sizeof(struct cvm_race_ctl) == 64 + 256 * CVM_MAX_VCPUS, "cvm_race_ctl layout");
#else
_Static_assert(sizeof(struct cvm_race_ctl) == 64 + 256 * CVM_MAX_VCPUS, "cvm_race_ctl layout");
#endif

#endif /* CVMCONF_GUEST_RACE_H */

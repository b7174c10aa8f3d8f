/* Punch-hole and conversion races, guest side (protocol: cvmconf_guest/race.h).
 * args[0] = GVA of the test memory, args[1] = pages per vCPU, args[2] = GVA of the control
 * block, args[3] = stride in words between the words checked and written (0: every word; guest
 * memory accesses are slow on some hosts, so the host picks a sample). Runs until ctl->stop;
 * ends with CVM_GUEST_SYNC(1, passes, violations). */
#include "cvmconf_guest/guest.h"
#include "cvmconf_guest/race.h"

#define RACE_PAGE 4096ull
#define RACE_WORDS (RACE_PAGE / 8)

static void race_report(volatile struct cvm_race_ctl *ctl, volatile struct cvm_race_vcpu *me,
                        uint64_t kind, uint64_t gpa, uint64_t value, uint64_t expected,
                        uint64_t pass) {
  if (me->violations == 0) {
    me->v_kind = kind;
    me->v_gpa = gpa;
    me->v_value = value;
    me->v_expected = expected;
    me->v_iteration = ctl->iteration;
    me->v_pass = pass;
  }
  me->violations = me->violations + 1;
}

/* The kind of a value read outside of ZERO mode that is neither 0 nor an own earlier tag. */
static uint64_t race_classify(uint64_t v, uint64_t vcpu, uint64_t page, uint64_t pass) {
  if (v == 0) return CVM_RACE_OK;
  if (!CVM_RACE_TAG_IS_MARKED(v)) return CVM_RACE_GARBAGE;
  if (CVM_RACE_TAG_VCPU(v) != vcpu || CVM_RACE_TAG_PAGE(v) != page) return CVM_RACE_FOREIGN;
  if (CVM_RACE_TAG_PASS(v) == 0 || CVM_RACE_TAG_PASS(v) > (pass & 0xffffffffull))
    return CVM_RACE_FUTURE;
  return CVM_RACE_OK;
}

CVM_PAYLOAD(punch_race) {
  const uint64_t vcpu = bi->vcpu_id;
  const uint64_t ppv = bi->args[1];
  const uint64_t region = bi->args[0] + vcpu * ppv * RACE_PAGE;
  volatile struct cvm_race_ctl *ctl = (volatile struct cvm_race_ctl *)bi->args[2];
  volatile struct cvm_race_vcpu *me = &ctl->vcpu[vcpu];
  const uint64_t stride = bi->args[3] ? bi->args[3] : 1;
  uint64_t pass = 0;

  while (!ctl->stop) {
    const uint64_t req = me->req;
    const uint32_t mode = CVM_RACE_REQ_MODE(req);
    const uint64_t zf = me->zero_first, zn = me->zero_npages;
    me->ack = req;
    pass++;
    for (uint64_t p = 0; p < ppv && !ctl->stop; p++) {
      const uint64_t page = vcpu * ppv + p; /* page index in the test memory */
      const uint64_t gva = region + p * RACE_PAGE;
      const int must_be_zero = mode == CVM_RACE_MODE_ZERO && p >= zf && p < zf + zn;
      for (uint64_t i = 0; i < RACE_WORDS; i += stride) {
        uint64_t v = cvm_read64(gva + i * 8);
        if (must_be_zero) {
          if (v != 0) {
            race_report(ctl, me, CVM_RACE_NOT_ZERO, gva + i * 8, v, 0, pass);
            break;
          }
          continue;
        }
        uint64_t k = race_classify(v, vcpu, page, pass);
        if (k != CVM_RACE_OK) {
          race_report(ctl, me, k, gva + i * 8, v, cvm_race_tag(vcpu, page, pass), pass);
          break;
        }
      }
      if (mode != CVM_RACE_MODE_RUN) continue;
      const uint64_t end0 = ctl->punch_end;
      const uint64_t cend0 = ctl->conv_end;
      const uint64_t t = cvm_race_tag(vcpu, page, pass);
      for (uint64_t i = 0; i < RACE_WORDS; i += stride) cvm_write64(gva + i * 8, t);
      for (uint64_t i = 0; i < RACE_WORDS; i += stride) {
        uint64_t v = cvm_read64(gva + i * 8);
        if (v == t) continue;
        if (v == 0 && ctl->punch_begin > end0) continue;
        /* A conversion that may change what the guest reads overlapped the write: 0 or an own
         * earlier tag are possible, foreign or garbage data never. */
        if (ctl->conv_begin > cend0 && race_classify(v, vcpu, page, pass) == CVM_RACE_OK) continue;
        uint64_t k = v == 0 ? CVM_RACE_LOST_WRITE : race_classify(v, vcpu, page, pass);
        if (k == CVM_RACE_OK) k = CVM_RACE_STALE;
        race_report(ctl, me, k, gva + i * 8, v, t, pass);
        break;
      }
    }
    me->done = req;
    me->passes = pass;
  }
  CVM_GUEST_SYNC(1, pass, me->violations);
}

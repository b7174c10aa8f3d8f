/*
 * The guest runtime as payloads see it: ucalls (SYNC / PRINT / ASSERT / DONE), memory helpers,
 * and conversion requests. Freestanding C; no libc.
 */
#ifndef CVMCONF_GUEST_GUEST_H
#define CVMCONF_GUEST_GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "cvmconf_guest/abi.h"

/* Defines a payload the host can start by name: CVM_PAYLOAD(hello) { ... bi->args[0] ... } */
#define CVM_PAYLOAD(pname)                                                                 \
  static void cvm_payload_fn_##pname(const struct cvm_boot_info *bi);                      \
  __attribute__((used, section(".cvm_payloads"), aligned(8))) static const struct          \
      cvm_payload_desc cvm_payload_desc_##pname = {#pname, (uint64_t)&cvm_payload_fn_##pname}; \
  static void cvm_payload_fn_##pname(const struct cvm_boot_info *bi __attribute__((unused)))

/* ---- ucalls ---- */
const struct cvm_boot_info *cvm_boot_info(void);
volatile struct cvm_ucall *cvm_ucall_slot(void);
/* Sends a ucall with up to CVM_UCALL_ARGS values; returns reply[0]. */
uint64_t cvm_ucall(uint32_t cmd, uint32_t nargs, const uint64_t *args, const char *file,
                   uint32_t line, const char *text);
void cvm_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int cvm_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int cvm_snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void cvm_assert_fail(const char *file, uint32_t line, const char *expr, uint32_t nargs,
                     uint64_t a, uint64_t b) __attribute__((noreturn));
void cvm_halt(void) __attribute__((noreturn));

#define CVM_NARGS_(...) CVM_NARGS_IMPL_(0, ##__VA_ARGS__, 7, 6, 5, 4, 3, 2, 1, 0)
#define CVM_NARGS_IMPL_(_0, _1, _2, _3, _4, _5, _6, _7, N, ...) N

/* The CVM_GUEST_ prefix keeps these apart from kvm_util's GUEST_SYNC/GUEST_ASSERT, which they
 * resemble but do not match: a sync here carries up to 7 values and returns the host's reply.
 * CVM_GUEST_SYNC(stage, values...): host sees stage and values; returns the host's reply[0]. */
#define CVM_GUEST_SYNC(...)                                                                  \
  ({                                                                                     \
    const uint64_t cvm_sync_args_[] = {__VA_ARGS__};                                     \
    cvm_ucall(CVM_UCALL_SYNC, CVM_NARGS_(__VA_ARGS__), cvm_sync_args_, __FILE__, __LINE__, \
              0);                                                                        \
  })
#define CVM_GUEST_PRINT(...) cvm_printf(__VA_ARGS__)
#define CVM_GUEST_ASSERT(cond)                                                   \
  do {                                                                       \
    if (!(cond)) cvm_assert_fail(__FILE__, __LINE__, #cond, 0, 0, 0);        \
  } while (0)
#define CVM_GUEST_ASSERT_EQ(a, b)                                                      \
  do {                                                                             \
    uint64_t cvm_a_ = (uint64_t)(a), cvm_b_ = (uint64_t)(b);                       \
    if (cvm_a_ != cvm_b_)                                                          \
      cvm_assert_fail(__FILE__, __LINE__, #a " == " #b, 2, cvm_a_, cvm_b_);        \
  } while (0)
#define CVM_GUEST_FAIL(msg) cvm_assert_fail(__FILE__, __LINE__, msg, 0, 0, 0)

/* ---- memory helpers (volatile: every access really happens, in order) ---- */
static inline uint8_t cvm_read8(uint64_t gva) { return *(volatile uint8_t *)gva; }
static inline void cvm_write8(uint64_t gva, uint8_t v) { *(volatile uint8_t *)gva = v; }
static inline uint64_t cvm_read64(uint64_t gva) { return *(volatile uint64_t *)gva; }
static inline void cvm_write64(uint64_t gva, uint64_t v) { *(volatile uint64_t *)gva = v; }
void cvm_fill8(uint64_t gva, uint8_t v, uint64_t len);
/* Returns the offset of the first byte != v, or -1 when all match. */
int64_t cvm_check8(uint64_t gva, uint8_t v, uint64_t len);
/* 64-bit pattern helpers: word i holds seed ^ (i * CVM_PATTERN_MUL) (abi.h). */
void cvm_fill_pattern(uint64_t gva, uint64_t seed, uint64_t len);
int64_t cvm_check_pattern(uint64_t gva, uint64_t seed, uint64_t len);

/* Spin-loop hint. */
static inline void cvm_cpu_relax(void) {
#if defined(__x86_64__)
  __asm__ volatile("pause" ::: "memory");
#elif defined(__aarch64__)
  __asm__ volatile("yield" ::: "memory");
#endif
}

/* ---- hypercalls ---- */
/* x86: vmcall/vmmcall with RAX = nr, RBX/RCX/RDX/RSI = a0..a3. arm64: an SMCCC HVC64 call with
 * X0 = function id (nr), X1..X4 = a0..a3; returns X0. */
uint64_t cvm_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3);
/* KVM_HC_MAP_GPA_RANGE: a0 = gpa, a1 = npages, a2 = attributes (ENC_STAT | PAGE_SZ). */
uint64_t cvm_map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs);
#define CVM_HC_MAP_GPA_RANGE 12ull
#define CVM_MAP_GPA_RANGE_ENCRYPTED (1ull << 4)
#define CVM_MAP_GPA_RANGE_DECRYPTED 0ull

#endif /* CVMCONF_GUEST_GUEST_H */

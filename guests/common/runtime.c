/* Architecture-neutral guest runtime: ucall framing, formatting, memory helpers. */
#include "cvmconf_guest/guest.h"

/* Provided by the architecture: rings the doorbell for this vCPU's slot. */
void cvm_arch_doorbell(const struct cvm_boot_info *bi);

/* vCPUs share the image's data, so per-vCPU state is found from the stack: vCPU i always runs
 * on [CVM_STACK_GPA + i * CVM_STACK_SIZE, + CVM_STACK_SIZE) (abi.h). */
const struct cvm_boot_info *cvm_boot_info(void) {
  volatile char here;
  uint64_t i = ((uint64_t)&here - CVM_STACK_GPA) / CVM_STACK_SIZE;
  return (const struct cvm_boot_info *)(CVM_BOOTINFO_GPA + i * CVM_BOOTINFO_STRIDE);
}
volatile struct cvm_ucall *cvm_ucall_slot(void) {
  return (volatile struct cvm_ucall *)cvm_boot_info()->ucall_gpa;
}

static void copy_str(volatile char *dst, const char *src, size_t max) {
  size_t i = 0;
  if (src)
    for (; i + 1 < max && src[i]; i++) dst[i] = src[i];
  dst[i] = 0;
}

uint64_t cvm_ucall(uint32_t cmd, uint32_t nargs, const uint64_t *args, const char *file,
                   uint32_t line, const char *text) {
  volatile struct cvm_ucall *u = cvm_ucall_slot();
  if (nargs > CVM_UCALL_ARGS) nargs = CVM_UCALL_ARGS;
  u->magic = CVM_UCALL_MAGIC;
  u->cmd = cmd;
  u->nargs = nargs;
  for (uint32_t i = 0; i < CVM_UCALL_ARGS; i++) u->args[i] = i < nargs ? args[i] : 0;
  u->line = line;
  copy_str(u->file, file, CVM_UCALL_FILE_MAX);
  copy_str(u->text, text, CVM_UCALL_TEXT_MAX);
  u->reply[0] = 0;
  u->seq = u->seq + 1;
  __asm__ volatile("" ::: "memory");
  cvm_arch_doorbell(cvm_boot_info());
  __asm__ volatile("" ::: "memory");
  return u->reply[0];
}

void cvm_assert_fail(const char *file, uint32_t line, const char *expr, uint32_t nargs,
                     uint64_t a, uint64_t b) {
  uint64_t args[2] = {a, b};
  for (;;) cvm_ucall(CVM_UCALL_ASSERT, nargs, args, file, line, expr);
}

/* ---- formatting: %d %i %u %x %X %p %s %c %% with l/ll/z length modifiers ---- */
struct out {
  char *buf;
  size_t size, len;
};
static void put(struct out *o, char c) {
  if (o->len + 1 < o->size) o->buf[o->len] = c;
  o->len++;
}
static void put_num(struct out *o, uint64_t v, unsigned base, int neg, int upper, int width,
                    char pad) {
  char tmp[24];
  int n = 0;
  const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
  do {
    tmp[n++] = digits[v % base];
    v /= base;
  } while (v);
  if (neg) tmp[n++] = '-';
  while (n < width) tmp[n++] = pad;
  while (n) put(o, tmp[--n]);
}

int cvm_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap) {
  struct out o = {buf, size, 0};
  for (const char *p = fmt; *p; p++) {
    if (*p != '%') {
      put(&o, *p);
      continue;
    }
    p++;
    char pad = ' ';
    int width = 0, lng = 0;
    if (*p == '0') pad = '0', p++;
    while (*p >= '0' && *p <= '9') width = width * 10 + (*p++ - '0');
    while (*p == 'l' || *p == 'z') lng++, p++;
    switch (*p) {
      case 'd':
      case 'i': {
        int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
        put_num(&o, v < 0 ? (uint64_t)(-v) : (uint64_t)v, 10, v < 0, 0, width, pad);
        break;
      }
      case 'u':
        put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10, 0, 0, width, pad);
        break;
      case 'x':
      case 'X':
        put_num(&o, lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16, 0, *p == 'X', width,
                pad);
        break;
      case 'p':
        put(&o, '0'), put(&o, 'x');
        put_num(&o, (uint64_t)va_arg(ap, void *), 16, 0, 0, 0, ' ');
        break;
      case 's': {
        const char *s = va_arg(ap, const char *);
        for (s = s ? s : "(null)"; *s; s++) put(&o, *s);
        break;
      }
      case 'c':
        put(&o, (char)va_arg(ap, int));
        break;
      case '%':
        put(&o, '%');
        break;
      case 0:
        p--;
        break;
      default:
        put(&o, '%'), put(&o, *p);
    }
  }
  if (o.size) o.buf[o.len < o.size ? o.len : o.size - 1] = 0;
  return (int)o.len;
}

int cvm_snprintf(char *buf, size_t size, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = cvm_vsnprintf(buf, size, fmt, ap);
  va_end(ap);
  return n;
}

void cvm_printf(const char *fmt, ...) {
  char buf[CVM_UCALL_TEXT_MAX];
  va_list ap;
  va_start(ap, fmt);
  cvm_vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  cvm_ucall(CVM_UCALL_PRINT, 0, 0, 0, 0, buf);
}

/* ---- memory helpers ---- */
void cvm_fill8(uint64_t gva, uint8_t v, uint64_t len) {
  for (uint64_t i = 0; i < len; i++) ((volatile uint8_t *)gva)[i] = v;
}

int64_t cvm_check8(uint64_t gva, uint8_t v, uint64_t len) {
  for (uint64_t i = 0; i < len; i++)
    if (((volatile uint8_t *)gva)[i] != v) return (int64_t)i;
  return -1;
}

void cvm_fill_pattern(uint64_t gva, uint64_t seed, uint64_t len) {
  for (uint64_t i = 0; i < len / 8; i++) ((volatile uint64_t *)gva)[i] = seed ^ (i * CVM_PATTERN_MUL);
}

int64_t cvm_check_pattern(uint64_t gva, uint64_t seed, uint64_t len) {
  for (uint64_t i = 0; i < len / 8; i++)
    if (((volatile uint64_t *)gva)[i] != (seed ^ (i * CVM_PATTERN_MUL))) return (int64_t)(i * 8);
  return -1;
}

uint64_t cvm_map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs) {
  return cvm_hypercall(CVM_HC_MAP_GPA_RANGE, gpa, npages, attrs, 0);
}

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *d, int c, size_t n) {
  unsigned char *p = d;
  while (n--) *p++ = (unsigned char)c;
  return d;
}
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *dp = d;
  const unsigned char *sp = s;
  while (n--) *dp++ = *sp++;
  return d;
}

/* Called by the architecture's start stub. */
void cvm_guest_main(const struct cvm_boot_info *bi) {
  if (bi->magic != CVM_BOOT_MAGIC || bi != cvm_boot_info()) cvm_halt();
  void (*fn)(const struct cvm_boot_info *) = (void (*)(const struct cvm_boot_info *))bi->payload;
  fn(bi);
  for (;;) cvm_ucall(CVM_UCALL_DONE, 0, 0, 0, 0, 0);
}

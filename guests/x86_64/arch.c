/* x86_64 part of the guest runtime: image header, IDT, doorbell, hypercall, halt. */
#include "cvmconf_guest/guest.h"

extern char __cvm_image_start[], __cvm_image_end[], __cvm_payloads_start[], __cvm_payloads_end[];
extern void cvm_start(void);
extern const uint64_t cvm_x86_stub_table[32];

__attribute__((section(".cvm_header"), used)) const struct cvm_image_header cvm_image_header = {
    CVM_IMAGE_MAGIC,
    CVM_GUEST_ABI_VERSION,
    CVM_ARCH_X86_64,
    (uint64_t)__cvm_image_start,
    (uint64_t)cvm_start,
    (uint64_t)__cvm_image_end,
    (uint64_t)__cvm_payloads_start,
    (uint64_t)__cvm_payloads_end,
};

struct idt_gate {
  uint16_t off0, sel;
  uint8_t ist, type;
  uint16_t off1;
  uint32_t off2, zero;
} __attribute__((packed));

static struct idt_gate idt[32] __attribute__((aligned(16)));

void cvm_x86_install_idt(void) {
  for (int i = 0; i < 32; i++) {
    uint64_t a = cvm_x86_stub_table[i];
    idt[i].off0 = (uint16_t)a;
    idt[i].sel = 0x8; /* code64 selector of the host-built GDT */
    idt[i].ist = 0;
    idt[i].type = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
    idt[i].off1 = (uint16_t)(a >> 16);
    idt[i].off2 = (uint32_t)(a >> 32);
    idt[i].zero = 0;
  }
  struct {
    uint16_t limit;
    uint64_t base;
  } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)idt};
  __asm__ volatile("lidt %0" ::"m"(idtr));
}

void cvm_x86_exception(uint64_t vector, uint64_t error, uint64_t rip, uint64_t cr2) {
  uint64_t args[4] = {vector, error, rip, cr2};
  for (;;) cvm_ucall(CVM_UCALL_EXCEPTION, 4, args, 0, 0, "exception");
}

void cvm_arch_doorbell(const struct cvm_boot_info *bi) {
  if (bi->transport == CVM_TRANSPORT_MMIO) {
    *(volatile uint64_t *)bi->mmio_doorbell_gpa = bi->ucall_gpa;
  } else {
    uint32_t v = bi->vcpu_id;
    uint16_t port = CVM_UCALL_PORT;
    __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port) : "memory");
  }
}

uint64_t cvm_hypercall(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3) {
  uint64_t ret;
  if (cvm_boot_info()->flags & CVM_BOOT_FLAG_AMD_HYPERCALL)
    __asm__ volatile("vmmcall" : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1), "d"(a2), "S"(a3) : "memory");
  else
    __asm__ volatile("vmcall" : "=a"(ret) : "a"(nr), "b"(a0), "c"(a1), "d"(a2), "S"(a3) : "memory");
  return ret;
}

void cvm_halt(void) {
  for (;;) __asm__ volatile("cli; hlt");
}

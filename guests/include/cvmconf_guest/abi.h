/*
 * The contract between host and guest payloads: guest memory layout, the image header, boot
 * information, and the ucall message. Plain C, included by the freestanding guest runtime and by
 * the host (C++). Changing anything here means bumping CVM_GUEST_ABI_VERSION.
 *
 * Ucall transport: the message lives in guest memory at a per-vCPU slot inside the "comm"
 * region; the guest then rings a doorbell (port I/O on ordinary x86 VMs, an MMIO write
 * elsewhere). The host finds the message by slot, never by reading guest registers, so a
 * confidential guest can use the same protocol once the comm region is shared memory.
 */
#ifndef CVMCONF_GUEST_ABI_H
#define CVMCONF_GUEST_ABI_H

#include <stdint.h>

#define CVM_GUEST_ABI_VERSION 2u
#define CVM_MAX_VCPUS 16u

/* ---- x86_64 guest physical layout of the boot region (GPA == GVA, identity mapped) ---- */
#define CVM_X86_GDT_GPA 0x1000ull       /* GDT (null, code64, data, TSS descriptor) */
#define CVM_X86_TSS_GPA 0x1800ull       /* 64-bit TSS (unused stacks, present for VMX) */
#define CVM_X86_IDT_GPA 0x2000ull       /* 256 x 16-byte gates */
#define CVM_X86_PML4_GPA 0x3000ull
#define CVM_X86_PDPT_GPA 0x4000ull
#define CVM_X86_PT0_GPA 0x5000ull       /* 4 KiB PTEs for the first 2 MiB (page 0 not present) */
#define CVM_X86_PD_GPA 0x10000ull       /* CVM_X86_MAP_GIB page directories of 2 MiB PDEs */
#define CVM_X86_MAP_GIB 64ull           /* identity map covers [0, 64 GiB) */

/* ---- arm64 (4 KiB granule, 39-bit VA from TTBR0, GPA == GVA, MMU on from the first
 * instruction): level-1 table of 1 GiB blocks for [0, CVM_ARM64_MAP_GIB GiB); the first GiB
 * through a level-2 table of 2 MiB blocks and the first 2 MiB through a level-3 table, so that
 * page 0 is not mapped. The GiB holding the MMIO doorbell is Device-nGnRE, the rest Normal
 * write-back. The same boot region offsets as x86 below (boot info, comm, image, stacks). */
#define CVM_ARM64_L1_GPA 0x3000ull
#define CVM_ARM64_L2_GPA 0x4000ull
#define CVM_ARM64_L3_GPA 0x5000ull
#define CVM_ARM64_MAP_GIB 64ull

#define CVM_BOOTINFO_GPA 0x50000ull     /* struct cvm_boot_info[CVM_MAX_VCPUS], 256 B each */
#define CVM_BOOTINFO_STRIDE 0x100ull
#define CVM_COMM_GPA 0x60000ull         /* comm region: one 4 KiB ucall slot per vCPU */
#define CVM_COMM_STRIDE 0x1000ull
/* Offset in each vCPU's comm page where words host and guest share for a payload begin (stop
 * flags, counters): the page is the one memory a protected guest shares back at entry. */
#define CVM_COMM_WORDS_OFF 0x800ull
#define CVM_SCRATCH_GPA 0x80000ull      /* free for tests: [0x80000, 0x100000) */
#define CVM_SCRATCH_SIZE 0x80000ull
#define CVM_IMAGE_GPA 0x100000ull       /* guest image load address */
#define CVM_IMAGE_MAX 0x100000ull       /* image incl. bss must fit in 1 MiB */
#define CVM_STACK_GPA 0x200000ull       /* vCPU i's stack: [base + i*size, base + (i+1)*size) */
#define CVM_STACK_SIZE 0x20000ull
#define CVM_BOOT_REGION_SIZE 0x400000ull /* boot memslot: [0, 4 MiB) */

/* Guest-visible addresses for test memory start here (above the boot region, below 64 GiB). */
#define CVM_TEST_MEM_GPA 0x100000000ull  /* 4 GiB, as the KVM selftests use */

/* ---- doorbells ---- */
#define CVM_TRANSPORT_PIO 1u            /* out %eax, $CVM_UCALL_PORT with eax = vcpu id */
#define CVM_TRANSPORT_MMIO 2u           /* 8-byte write of the slot GPA to CVM_UCALL_MMIO_GPA */
#define CVM_UCALL_PORT 0x7c0u
#define CVM_UCALL_MMIO_GPA 0xfe000000ull /* never backed by a memslot */

/* ---- image header: first bytes of every guest image ---- */
#define CVM_IMAGE_MAGIC 0x4547414d494d5643ull /* "CVMIMAGE" little endian */
#define CVM_ARCH_X86_64 1u
#define CVM_ARCH_AARCH64 2u

struct cvm_image_header {
  uint64_t magic;
  uint32_t abi_version;
  uint32_t arch;
  uint64_t load_addr;      /* where the image must be placed (GPA == GVA) */
  uint64_t entry;          /* start stub: expects RDI/X0 = &boot_info, RSP/SP_EL1 = stack top */
  uint64_t image_end;      /* end of bss */
  uint64_t payloads_start; /* struct cvm_payload_desc[] */
  uint64_t payloads_end;
};

#define CVM_PAYLOAD_NAME_MAX 56
struct cvm_payload_desc {
  char name[CVM_PAYLOAD_NAME_MAX];
  uint64_t entry; /* void fn(const struct cvm_boot_info *) */
};

/* ---- per-vCPU boot information ---- */
#define CVM_BOOT_MAGIC 0x544f4f424d5643ull /* "CVMBOOT" */
#define CVM_BOOT_FLAG_AMD_HYPERCALL (1u << 0) /* use vmmcall rather than vmcall */
/* arm64 pKVM protected VM: at entry, MMIO-guard the doorbell (when offered) and share the boot
 * info page and the vCPU's ucall slot back with the host (guests/arm64/arch.c). */
#define CVM_BOOT_FLAG_ARM64_PROTECTED (1u << 1)

/* ---- arm64 pKVM guest hypercalls (SMCCC HVC64, vendor hypervisor service; Linux 7.2
 * Documentation/virt/kvm/arm/hypercalls.rst; the host's copy with the same citation is in
 * hostlib/include/cvmconf/uapi.h, checked equal at compile time). ---- */
#define CVM_SMCCC_KVM_FEATURES 0x86000000ull    /* bitmap of the functions below */
#define CVM_SMCCC_KVM_HYP_MEMINFO 0xc6000002ull /* -> protection granule in bytes */
#define CVM_SMCCC_KVM_MEM_SHARE 0xc6000003ull   /* x1 = IPA of one granule */
#define CVM_SMCCC_KVM_MEM_UNSHARE 0xc6000004ull
#define CVM_SMCCC_KVM_MMIO_GUARD 0xc6000007ull  /* x1 = IPA of one granule to treat as MMIO */
#define CVM_SMCCC_KVM_FUNC_MMIO_GUARD 7u        /* its bit in the features bitmap */
#define CVM_BOOT_ARGS 8

struct cvm_boot_info {
  uint64_t magic;
  uint32_t vcpu_id;
  uint32_t nr_vcpus;
  uint64_t ucall_gpa;  /* this vCPU's slot in the comm region */
  uint64_t payload;    /* GVA of the payload function */
  uint32_t transport;  /* CVM_TRANSPORT_* */
  uint32_t flags;      /* CVM_BOOT_FLAG_* */
  uint64_t mmio_doorbell_gpa;
  uint64_t args[CVM_BOOT_ARGS];
};

/* The pattern of CVM_CMD_FILL_PATTERN / CHECK_PATTERN (cmd.h): 64-bit word i of the range
 * holds seed ^ (i * CVM_PATTERN_MUL), so the host can check what the guest wrote. */
#define CVM_PATTERN_MUL 0x9e3779b97f4a7c15ull

/* ---- ucall ---- */
#define CVM_UCALL_MAGIC 0x4c4c4143554d5643ull /* "CVMUCALL" */
enum cvm_ucall_cmd {
  CVM_UCALL_NONE = 0,
  CVM_UCALL_SYNC = 1,      /* args[0] = stage, args[1..] = values; host may write reply[] */
  CVM_UCALL_PRINT = 2,     /* text */
  CVM_UCALL_ASSERT = 3,    /* file, line, text = expression, args = values */
  CVM_UCALL_DONE = 4,      /* payload returned */
  CVM_UCALL_EXCEPTION = 5, /* args x86: vector, error code, rip, cr2;
                              arm64: vector index (0..15), ESR_EL1, ELR_EL1, FAR_EL1 */
};

#define CVM_UCALL_ARGS 8
#define CVM_UCALL_FILE_MAX 128
#define CVM_UCALL_TEXT_MAX 512

struct cvm_ucall {
  uint64_t magic;
  uint32_t cmd;
  uint32_t nargs;
  uint64_t seq; /* incremented by the guest per ucall */
  uint64_t args[CVM_UCALL_ARGS];
  uint32_t line;
  uint32_t reserved;
  char file[CVM_UCALL_FILE_MAX];
  char text[CVM_UCALL_TEXT_MAX];
  uint64_t reply[4]; /* host -> guest, valid after the doorbell returns */
};

#endif /* CVMCONF_GUEST_ABI_H */

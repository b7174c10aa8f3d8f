// The project's only list of kernel constants and structures that the system headers
// (Debian 12: linux-libc-dev 6.1) lack: guest_memfd, memory attributes, VM types, new exits,
// and the out-of-tree conversion ABIs. The classic KVM API that 6.1 already has (KVM_CREATE_VM,
// KVM_RUN, struct kvm_run, regs/sregs, KVM_CHECK_EXTENSION, ...) comes from <linux/kvm.h>.
//
// Every item names the kernel version or series it comes from. Source of the numbers:
// include/uapi/linux/kvm.h and Documentation/virt/kvm/api.rst of Linux 7.2 for mainline items,
// the series' lore postings (named where used) for the out-of-tree ones.
//
// Names live in namespace cvm::uapi and are deliberately NOT the kernel's macro names, so a
// newer system header that does define KVM_CAP_GUEST_MEMFD etc. cannot collide with them.
//
// Capability numbers of UNMERGED series move between versions (RFC v2 used 240-242, the
// in-place series 246, 249 and 250): they are listed
// here for documentation and unit tests only; feature detection is by behaviour (probe.h).
#pragma once

#include <linux/ioctl.h>
#include <linux/kvm.h>
#include <linux/types.h>

#include <cstdint>

namespace cvm::uapi {

inline constexpr unsigned kKvmIo = 0xAE;  // KVMIO, all versions

// ---------------------------------------------------------------------------------------------
// Capabilities (mainline; include/uapi/linux/kvm.h, Linux 7.2)
namespace cap {
inline constexpr long kExitHypercall = 201;        // KVM_CAP_EXIT_HYPERCALL, 5.18; bitmask of nrs
inline constexpr long kUserMemory2 = 231;          // KVM_CAP_USER_MEMORY2, 6.8
inline constexpr long kMemoryFaultInfo = 232;      // KVM_CAP_MEMORY_FAULT_INFO, 6.8
inline constexpr long kMemoryAttributes = 233;     // KVM_CAP_MEMORY_ATTRIBUTES, 6.8; attr mask
inline constexpr long kGuestMemfd = 234;           // KVM_CAP_GUEST_MEMFD, 6.8
inline constexpr long kVmTypes = 235;              // KVM_CAP_VM_TYPES, 6.8; bit N = type N
inline constexpr long kPreFaultMemory = 236;       // KVM_CAP_PRE_FAULT_MEMORY, 6.10
inline constexpr long kGuestMemfdFlags = 244;      // KVM_CAP_GUEST_MEMFD_FLAGS, 6.18 (was ..._MMAP)
inline constexpr long kCheckExtensionVm = 105;     // KVM_CAP_CHECK_EXTENSION_VM, 4.0
inline constexpr long kMaxVcpus = 66;              // KVM_CAP_MAX_VCPUS
// Out-of-tree numbers, documentation only (never probe with them; see the series below):
inline constexpr long kDocOnlyGmemMemoryAttributesV8 = 250;   // in-place conversion v8
inline constexpr long kDocOnlyGmemConversionRfcV2 = 241;      // RFC v2; = mainline ARM_EL2_E2H0
}  // namespace cap

// ---------------------------------------------------------------------------------------------
// CPUID (KVM_GET_SUPPORTED_CPUID 2.6.25, KVM_SET_CPUID2 2.6.25; the classic API). Redefined here
// although <linux/kvm.h> has them: that header declares struct kvm_cpuid2's entries with
// __DECLARE_FLEX_ARRAY, whose empty helper struct has size 1 in C++, so sizeof(kvm_cpuid2) is 12
// there instead of the kernel's 8, and _IOWR() encodes a request number no kernel knows (the
// /dev/kvm ioctl fails with EINVAL; a vCPU then has no CPUID, and 7.2 refuses its long-mode sregs).
struct kvm_cpuid2_header {
  __u32 nent;
  __u32 padding;
  // followed by nent struct kvm_cpuid_entry2
};
static_assert(sizeof(kvm_cpuid2_header) == 8);
inline constexpr unsigned long kGetSupportedCpuid = _IOWR(kKvmIo, 0x05, kvm_cpuid2_header);
inline constexpr unsigned long kSetCpuid2 = _IOW(kKvmIo, 0x90, kvm_cpuid2_header);
static_assert(kGetSupportedCpuid == 0xc008ae05 && kSetCpuid2 == 0x4008ae90);

// ---------------------------------------------------------------------------------------------
// guest_memfd creation (6.8; flags 6.18; api.rst 4.142 KVM_CREATE_GUEST_MEMFD, Linux 7.2)
struct kvm_create_guest_memfd {
  __u64 size;
  __u64 flags;
  __u64 reserved[6];
};
static_assert(sizeof(kvm_create_guest_memfd) == 64);

inline constexpr __u64 kGmemFlagMmap = 1ULL << 0;        // GUEST_MEMFD_FLAG_MMAP, 6.18
inline constexpr __u64 kGmemFlagInitShared = 1ULL << 1;  // GUEST_MEMFD_FLAG_INIT_SHARED, 6.18
// RFC v2 (1G hugetlb + conversion, May 2025) gave bit 1 the OPPOSITE meaning:
inline constexpr __u64 kRfcV2GmemFlagSupportShared = 1ULL << 0;  // GUEST_MEMFD_FLAG_SUPPORT_SHARED
inline constexpr __u64 kRfcV2GmemFlagInitPrivate = 1ULL << 1;    // GUEST_MEMFD_FLAG_INIT_PRIVATE

inline constexpr unsigned long kCreateGuestMemfd =
    _IOWR(kKvmIo, 0xd4, kvm_create_guest_memfd);  // KVM_CREATE_GUEST_MEMFD, 6.8
static_assert(kCreateGuestMemfd == 0xC040AED4UL);

// ---------------------------------------------------------------------------------------------
// Memslots (6.8; api.rst 4.140 KVM_SET_USER_MEMORY_REGION2, Linux 7.2)
struct kvm_userspace_memory_region2 {
  __u32 slot;
  __u32 flags;
  __u64 guest_phys_addr;
  __u64 memory_size;
  __u64 userspace_addr;
  __u64 guest_memfd_offset;
  __u32 guest_memfd;
  __u32 pad1;
  __u64 pad2[14];
};
static_assert(sizeof(kvm_userspace_memory_region2) == 160);

inline constexpr __u32 kMemLogDirtyPages = 1U << 0;  // KVM_MEM_LOG_DIRTY_PAGES
inline constexpr __u32 kMemReadonly = 1U << 1;       // KVM_MEM_READONLY
inline constexpr __u32 kMemGuestMemfd = 1U << 2;     // KVM_MEM_GUEST_MEMFD, 6.8

inline constexpr unsigned long kSetUserMemoryRegion2 =
    _IOW(kKvmIo, 0x49, kvm_userspace_memory_region2);  // KVM_SET_USER_MEMORY_REGION2, 6.8
static_assert(kSetUserMemoryRegion2 == 0x40A0AE49UL);

// ---------------------------------------------------------------------------------------------
// Per-VM memory attributes (6.8; api.rst 4.141 KVM_SET_MEMORY_ATTRIBUTES, Linux 7.2)
struct kvm_memory_attributes {
  __u64 address;
  __u64 size;
  __u64 attributes;
  __u64 flags;
};
static_assert(sizeof(kvm_memory_attributes) == 32);
inline constexpr __u64 kMemoryAttributePrivate = 1ULL << 3;  // KVM_MEMORY_ATTRIBUTE_PRIVATE
inline constexpr unsigned long kSetMemoryAttributes =
    _IOW(kKvmIo, 0xd2, kvm_memory_attributes);  // KVM_SET_MEMORY_ATTRIBUTES, 6.8 (VM ioctl)
static_assert(kSetMemoryAttributes == 0x4020AED2UL);

// In-place conversion series v8 ("[PATCH v8 00/46] guest_memfd: In-place conversion support",
// 2026-06-18, lore): guest_memfd ioctl.
struct kvm_memory_attributes2 {
  union {
    __u64 address;
    __u64 offset;
  };
  __u64 size;
  __u64 attributes;
  __u64 flags;
  __u64 error_offset;  // out, written only on error
  __u64 reserved[11];
};
static_assert(sizeof(kvm_memory_attributes2) == 128);
inline constexpr unsigned long kSetMemoryAttributes2 =
    _IOWR(kKvmIo, 0xd2, kvm_memory_attributes2);  // KVM_SET_MEMORY_ATTRIBUTES2, v8 (gmem fd)
static_assert(kSetMemoryAttributes2 == 0xC080AED2UL);
// RFC v4/v5 content modes in flags (superseded by v8, which has none; lore
// 20260428-gmem-inplace-conversion-v5-0-d8608ccfca22@google.com):
inline constexpr __u64 kRfcV4Attr2ModeZero = 1ULL << 0;
inline constexpr __u64 kRfcV4Attr2ModePreserve = 1ULL << 1;

// RFC v2 (May 2025, 1G hugetlb + conversion) conversion ioctls on the guest_memfd fd (its
// selftest: guest_memfd_conversions_test.c in the AMDESE/linux and intel/tdx trees).
inline constexpr unsigned kGmemIo = 0xAF;  // KVM_GMEM_IO, RFC v2
struct kvm_gmem_convert {
  __u64 offset;
  __u64 size;
  __u64 error_offset;
  __u64 reserved[5];
};
static_assert(sizeof(kvm_gmem_convert) == 64);
inline constexpr unsigned long kGmemConvertShared = _IOWR(kGmemIo, 0x41, kvm_gmem_convert);
inline constexpr unsigned long kGmemConvertPrivate = _IOWR(kGmemIo, 0x42, kvm_gmem_convert);
static_assert(kGmemConvertShared == 0xC040AF41UL);
static_assert(kGmemConvertPrivate == 0xC040AF42UL);

// ---------------------------------------------------------------------------------------------
// Pre-fault (6.10; api.rst 4.143 KVM_PRE_FAULT_MEMORY, Linux 7.2)
struct kvm_pre_fault_memory {
  __u64 gpa;
  __u64 size;
  __u64 flags;
  __u64 padding[5];
};
static_assert(sizeof(kvm_pre_fault_memory) == 64);
inline constexpr unsigned long kPreFaultMemory = _IOWR(kKvmIo, 0xd5, kvm_pre_fault_memory);
static_assert(kPreFaultMemory == 0xC040AED5UL);

// ---------------------------------------------------------------------------------------------
// VM types (api.rst 8.41 KVM_CAP_VM_TYPES; arch/x86/include/uapi/asm/kvm.h, Linux 7.2)
namespace vmtype {
inline constexpr unsigned long kX86Default = 0;      // KVM_X86_DEFAULT_VM
inline constexpr unsigned long kX86SwProtected = 1;  // KVM_X86_SW_PROTECTED_VM, 6.8
inline constexpr unsigned long kX86Sev = 2;          // KVM_X86_SEV_VM, 6.10
inline constexpr unsigned long kX86SevEs = 3;        // KVM_X86_SEV_ES_VM, 6.10
inline constexpr unsigned long kX86Snp = 4;          // KVM_X86_SNP_VM, 6.11
inline constexpr unsigned long kX86Tdx = 5;          // KVM_X86_TDX_VM, 6.16
inline constexpr unsigned long kArmIpaSizeMask = 0xff;  // KVM_VM_TYPE_ARM_IPA_SIZE_MASK
// KVM_VM_TYPE_ARM_PROTECTED: mainline since 7.2 (include/uapi/linux/kvm.h of 7.2;
// Documentation/virt/kvm/arm/pkvm.rst), the same bit Android's downstream ABI used
// ("ANDROID: KVM: arm64: Introduce KVM_VM_TYPE_ARM_PROTECTED machine type for PVMs").
// KVM_CREATE_VM accepts it only on a pKVM host (kvm-arm.mode=protected); otherwise EINVAL.
inline constexpr unsigned long kArmProtected = 1UL << 31;
inline constexpr unsigned long kArmProtectedAndroid = kArmProtected;  // ACK downstream ABI
inline constexpr unsigned long kArmProtected2022 = 1UL << 8;      // 2022 posting, never merged
}  // namespace vmtype

// ---------------------------------------------------------------------------------------------
// Exits (api.rst 5. The kvm_run structure, Linux 7.2)
inline constexpr __u32 kExitHypercall = 3;      // KVM_EXIT_HYPERCALL
inline constexpr __u32 kExitMemoryFault = 39;   // KVM_EXIT_MEMORY_FAULT, 6.8
inline constexpr __u32 kExitTdx = 40;           // KVM_EXIT_TDX, 6.16
inline constexpr __u64 kMemoryExitFlagPrivate = 1ULL << 3;  // KVM_MEMORY_EXIT_FLAG_PRIVATE
inline constexpr __u64 kExitHypercallLongMode = 1ULL << 0;  // KVM_EXIT_HYPERCALL_LONG_MODE

// kvm_run.memory_fault (6.8) lives in the exit union, which 6.1's struct kvm_run lacks by name.
struct kvm_run_memory_fault {
  __u64 flags;
  __u64 gpa;
  __u64 size;
};
// Offset of the exit union inside struct kvm_run (unchanged since the union was introduced).
inline constexpr unsigned kKvmRunExitUnionOffset = 32;

// ---------------------------------------------------------------------------------------------
// KVM_HC_MAP_GPA_RANGE (5.13; Documentation/virt/kvm/x86/hypercalls.rst 9.; api.rst 7.40
// KVM_CAP_EXIT_HYPERCALL, Linux 7.2)
inline constexpr __u64 kHcMapGpaRange = 12;                // KVM_HC_MAP_GPA_RANGE
inline constexpr __u64 kMapGpaRangePageSz4K = 0;           // KVM_MAP_GPA_RANGE_PAGE_SZ_4K
inline constexpr __u64 kMapGpaRangePageSz2M = 1ULL << 0;   // KVM_MAP_GPA_RANGE_PAGE_SZ_2M
inline constexpr __u64 kMapGpaRangePageSz1G = 1ULL << 1;   // KVM_MAP_GPA_RANGE_PAGE_SZ_1G
inline constexpr __u64 kMapGpaRangeEncrypted = 1ULL << 4;  // KVM_MAP_GPA_RANGE_ENCRYPTED
inline constexpr __u64 kMapGpaRangeDecrypted = 0;          // KVM_MAP_GPA_RANGE_DECRYPTED
inline constexpr unsigned kFeatureHcMapGpaRangeBit = 16;   // CPUID 0x40000001 bit
// Hypercall error codes KVM itself returns to the guest in RAX, negated (kvm_para.h, all
// versions): a malformed MAP_GPA_RANGE gets -KVM_EINVAL, one whose exit is not enabled -KVM_ENOSYS.
inline constexpr __u64 kKvmHcEinval = 22;     // KVM_EINVAL
inline constexpr __u64 kKvmHcEnosys = 1000;   // KVM_ENOSYS

// ---------------------------------------------------------------------------------------------
// SEV / SNP (Documentation/virt/kvm/x86/amd-memory-encryption.rst, Linux 7.2).
// KVM_MEMORY_ENCRYPT_OP and struct kvm_sev_cmd are in 6.1's header.
namespace sev {
inline constexpr __u32 kCmdInit2 = 22;            // KVM_SEV_INIT2, 6.10
inline constexpr __u32 kCmdSnpLaunchStart = 100;  // KVM_SEV_SNP_LAUNCH_START, 6.11
inline constexpr __u32 kCmdSnpLaunchUpdate = 101;
inline constexpr __u32 kCmdSnpLaunchFinish = 102;
struct kvm_sev_init {                             // 6.10
  __u64 vmsa_features;
  __u32 flags;
  __u16 ghcb_version;
  __u16 pad1;
  __u32 pad2[8];
};
static_assert(sizeof(kvm_sev_init) == 48);
}  // namespace sev

// TDX (Documentation/virt/kvm/x86/intel-tdx.rst, Linux 7.2): commands through
// KVM_MEMORY_ENCRYPT_OP with struct kvm_tdx_cmd, 6.16.
namespace tdx {
struct kvm_tdx_cmd {
  __u32 id;
  __u32 flags;
  __u64 data;
  __u64 hw_error;
};
static_assert(sizeof(kvm_tdx_cmd) == 24);
inline constexpr __u32 kCmdCapabilities = 0;  // KVM_TDX_CAPABILITIES
inline constexpr __u32 kCmdInitVm = 1;        // KVM_TDX_INIT_VM
inline constexpr __u32 kCmdInitVcpu = 2;
inline constexpr __u32 kCmdInitMemRegion = 3;
inline constexpr __u32 kCmdFinalizeVm = 4;
}  // namespace tdx

// ---------------------------------------------------------------------------------------------
// arm64 pKVM guest hypercalls: SMCCC HVC64 function ids of the vendor hypervisor service
// (Linux 7.2 Documentation/virt/kvm/arm/hypercalls.rst). Answered in the hypervisor
// for protected guests only; each takes one granule (HYP_MEMINFO) at the IPA in X1, X2/X3 must
// be 0, and returns 0 or INVALID_PARAMETER (-3). 7.2's hypervisor implements MEMINFO, MEM_SHARE
// and MEM_UNSHARE (its features bitmap has bits 0, 2, 3, 4); MMIO_GUARD is documented but not
// answered there (the call reaches the host, which answers NOT_SUPPORTED, -1).
namespace pkvm {
inline constexpr uint64_t kSmcccFeatures = 0x86000000;   // ARM_SMCCC_VENDOR_HYP_KVM_FEATURES
inline constexpr uint64_t kSmcccHypMeminfo = 0xC6000002; // ARM_SMCCC_KVM_FUNC_HYP_MEMINFO 2
inline constexpr uint64_t kSmcccMemShare = 0xC6000003;   // ARM_SMCCC_KVM_FUNC_MEM_SHARE 3
inline constexpr uint64_t kSmcccMemUnshare = 0xC6000004; // ARM_SMCCC_KVM_FUNC_MEM_UNSHARE 4
inline constexpr uint64_t kSmcccMmioGuard = 0xC6000007;  // ARM_SMCCC_KVM_FUNC_MMIO_GUARD 7
inline constexpr unsigned kFuncHypMeminfo = 2, kFuncMemShare = 3, kFuncMemUnshare = 4,
                          kFuncMmioGuard = 7;            // bits of the features bitmap
inline constexpr int64_t kSmcccSuccess = 0;
inline constexpr int64_t kSmcccNotSupported = -1;
inline constexpr int64_t kSmcccInvalidParameter = -3;
}  // namespace pkvm

// ---------------------------------------------------------------------------------------------
// gup_test debugfs interface (mm/gup_test.h, CONFIG_GUP_TEST, Linux 7.2)
struct pin_longterm_test {
  __u64 addr;
  __u64 size;
  __u32 flags;
};
static_assert(sizeof(pin_longterm_test) == 24);
inline constexpr __u32 kPinLongtermTestFlagUseWrite = 1;
inline constexpr __u32 kPinLongtermTestFlagUseFast = 2;
inline constexpr unsigned long kPinLongtermTestStart = _IOW('g', 7, pin_longterm_test);
inline constexpr unsigned long kPinLongtermTestStop = _IO('g', 8);
inline constexpr unsigned long kPinLongtermTestRead = _IOW('g', 9, __u64);
static_assert(kPinLongtermTestStart == 0x40186707UL);
static_assert(kPinLongtermTestStop == 0x6708UL);
static_assert(kPinLongtermTestRead == 0x40086709UL);

}  // namespace cvm::uapi

#include "long_mode.h"

#include <cpuid.h>
#include <sys/ioctl.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "cvmconf/uapi.h"
#include "cvmconf_guest/abi.h"

namespace cvm::x86 {
namespace {

constexpr uint64_t kPresent = 1, kWritable = 2, kHuge = 0x80;
constexpr uint64_t kCr0Pe = 1, kCr0Mp = 2, kCr0Et = 0x10, kCr0Ne = 0x20, kCr0Pg = 1ULL << 31;
constexpr uint64_t kCr4Pae = 0x20;
constexpr uint64_t kEferLme = 0x100, kEferLma = 0x400;
constexpr uint16_t kSelCode = 0x8, kSelData = 0x10, kSelTss = 0x18;

kvm_segment segment(uint16_t sel, uint8_t type, bool code) {
  kvm_segment s{};
  s.base = 0;
  s.limit = 0xffffffff;
  s.selector = sel;
  s.type = type;
  s.present = 1;
  s.dpl = 0;
  s.s = 1;
  s.g = 1;
  s.l = code ? 1 : 0;
  s.db = code ? 0 : 1;
  return s;
}

}  // namespace

Result<void> build_boot_tables(uint8_t* hva, uint64_t size) {
  if (size < CVM_BOOT_REGION_SIZE) return SysError{0, "boot region smaller than the layout"};
  auto* gdt = reinterpret_cast<uint64_t*>(hva + CVM_X86_GDT_GPA);
  gdt[0] = 0;
  gdt[1] = 0x00af9a000000ffffULL;  // code: present, DPL0, exec/read, L=1, G=1
  gdt[2] = 0x00cf92000000ffffULL;  // data: present, DPL0, read/write, D/B=1, G=1
  // 64-bit TSS descriptor (16 bytes): base CVM_X86_TSS_GPA, limit 0x67, type 9, present.
  const uint64_t base = CVM_X86_TSS_GPA, limit = 0x67;
  gdt[3] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
           (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
  gdt[4] = base >> 32;

  auto* pml4 = reinterpret_cast<uint64_t*>(hva + CVM_X86_PML4_GPA);
  auto* pdpt = reinterpret_cast<uint64_t*>(hva + CVM_X86_PDPT_GPA);
  auto* pt0 = reinterpret_cast<uint64_t*>(hva + CVM_X86_PT0_GPA);
  pml4[0] = CVM_X86_PDPT_GPA | kPresent | kWritable;
  for (uint64_t g = 0; g < CVM_X86_MAP_GIB; g++) {
    uint64_t pd_gpa = CVM_X86_PD_GPA + g * 0x1000;
    pdpt[g] = pd_gpa | kPresent | kWritable;
    auto* pd = reinterpret_cast<uint64_t*>(hva + pd_gpa);
    for (uint64_t i = 0; i < 512; i++)
      pd[i] = ((g << 30) + (i << 21)) | kPresent | kWritable | kHuge;
  }
  // First 2 MiB with 4 KiB pages so that guest page 0 is not present (null dereference = #PF).
  auto* pd0 = reinterpret_cast<uint64_t*>(hva + CVM_X86_PD_GPA);
  pd0[0] = CVM_X86_PT0_GPA | kPresent | kWritable;
  pt0[0] = 0;
  for (uint64_t i = 1; i < 512; i++) pt0[i] = (i << 12) | kPresent | kWritable;
  return {};
}

bool host_is_amd() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  char v[13];
  std::memcpy(v, &b, 4);
  std::memcpy(v + 4, &d, 4);
  std::memcpy(v + 8, &c, 4);
  v[12] = 0;
  return std::strcmp(v, "AuthenticAMD") == 0 || std::strcmp(v, "HygonGenuine") == 0;
}

Result<void> set_supported_cpuid(const Kvm& kvm, Vcpu& vcpu) {
  // The vCPU must have a CPUID before its sregs are set: since 7.2 KVM_SET_SREGS checks CR0, CR4
  // and EFER against the vCPU's CPUID (EFER.LME/LMA need X86_FEATURE_LM) and refuses long mode
  // on a vCPU without one (arch/x86/kvm/regs.c, kvm_is_valid_sregs).
  for (int nent = 128; nent <= 4096; nent *= 2) {
    size_t bytes = sizeof(uapi::kvm_cpuid2_header) + nent * sizeof(kvm_cpuid_entry2);
    std::unique_ptr<uint8_t[]> buf(new uint8_t[bytes]());
    auto* cpuid = reinterpret_cast<uapi::kvm_cpuid2_header*>(buf.get());
    cpuid->nent = static_cast<__u32>(nent);
    auto got = kvm_ioctl(kvm.fd(), -1, uapi::kGetSupportedCpuid, cpuid, "KVM_GET_SUPPORTED_CPUID");
    if (got) {
      if (auto r = vcpu.ioctl(uapi::kSetCpuid2, cpuid, "KVM_SET_CPUID2"); !r) return r.error();
      return {};
    }
    if (got.err() != E2BIG) return got.error();
  }
  return SysError{E2BIG, "KVM_GET_SUPPORTED_CPUID (more than 4096 entries)"};
}

Result<void> enter_long_mode(Vcpu& vcpu, uint64_t entry, uint64_t stack_top, uint64_t rdi) {
  auto sr = vcpu.get_sregs();
  if (!sr) return sr.error();
  kvm_sregs s = sr.value();
  s.cr0 = kCr0Pe | kCr0Mp | kCr0Et | kCr0Ne | kCr0Pg;
  s.cr4 = kCr4Pae;
  s.cr3 = CVM_X86_PML4_GPA;
  s.efer = kEferLme | kEferLma;
  s.cs = segment(kSelCode, 11, true);
  s.ds = s.es = s.fs = s.gs = s.ss = segment(kSelData, 3, false);
  s.tr = {};
  s.tr.base = CVM_X86_TSS_GPA;
  s.tr.limit = 0x67;
  s.tr.selector = kSelTss;
  s.tr.type = 11;  // busy 64-bit TSS
  s.tr.present = 1;
  s.gdt.base = CVM_X86_GDT_GPA;
  s.gdt.limit = 5 * 8 - 1;
  s.idt.base = 0;
  s.idt.limit = 0;  // the guest runtime installs its own IDT first thing
  if (auto r = vcpu.set_sregs(s); !r) return r.error();

  kvm_regs regs{};
  regs.rip = entry;
  regs.rsp = stack_top;
  regs.rdi = rdi;
  regs.rflags = 0x2;
  return vcpu.set_regs(regs);
}

}  // namespace cvm::x86

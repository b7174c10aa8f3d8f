#include "cvmconf/probe.h"

#include <fcntl.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <string_view>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cvmconf/kmsg.h"
#include "cvmconf/kvm.h"
#include "cvmconf/uapi.h"

namespace cvm {
namespace {

std::string read_first_line(const char* path) {
  std::ifstream f(path);
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

// VM types worth probing on this architecture, beyond what KVM_CAP_VM_TYPES reports.
std::vector<unsigned long> candidate_types() {
#if defined(__x86_64__)
  return {uapi::vmtype::kX86Default, uapi::vmtype::kX86SwProtected, uapi::vmtype::kX86Sev,
          uapi::vmtype::kX86SevEs,   uapi::vmtype::kX86Snp,         uapi::vmtype::kX86Tdx};
#elif defined(__aarch64__)
  // arm64 has no KVM_CAP_VM_TYPES: types are probed by creating them. Type 0 is the default
  // VM; bit 31 is KVM_VM_TYPE_ARM_PROTECTED (mainline 7.2; Android used it before).
  return {0, uapi::vmtype::kArmProtected};
#else
  return {0};
#endif
}

// Whether KVM_CAP_VM_TYPES is how this architecture advertises VM types.
constexpr bool kHasVmTypesCap =
#if defined(__x86_64__)
    true;
#else
    false;
#endif

void fill_vm_caps(const Vm& vm, VmTypeCaps& c) {
  c.guest_memfd = vm.check_extension(uapi::cap::kGuestMemfd);
  c.guest_memfd_flags = vm.check_extension(uapi::cap::kGuestMemfdFlags);
  c.memory_attributes = vm.check_extension(uapi::cap::kMemoryAttributes);
  c.exit_hypercall = vm.check_extension(uapi::cap::kExitHypercall);
  c.pre_fault_memory = vm.check_extension(uapi::cap::kPreFaultMemory);
  c.memory_fault_info = vm.check_extension(uapi::cap::kMemoryFaultInfo);
  c.user_memory2 = vm.check_extension(uapi::cap::kUserMemory2);
}

// The conversion probe of one VM type: the back-end chosen (or null), why, and the raw answers
// (errno names; "not tried" where a step was skipped).
nlohmann::json conversion_json(const VmTypeCaps& v) {
  const ConversionProbeFacts& f = v.conversion_facts;
  nlohmann::json j;
  j["backend"] = v.conversion.backend ? nlohmann::json(conversion_abi_name(*v.conversion.backend))
                                      : nlohmann::json(nullptr);
  j["available"] = nlohmann::json::array();
  for (ConversionAbi a : v.conversion.available) j["available"].push_back(conversion_abi_name(a));
  j["reason"] = v.conversion.reason;
  if (f.vm_creatable) {
    nlohmann::json facts = {
        {"KVM_CAP_MEMORY_ATTRIBUTES", f.memory_attributes_cap},
        {"KVM_CAP_GUEST_MEMFD", f.guest_memfd_cap},
        {"KVM_SET_MEMORY_ATTRIBUTES_noop", probe_errno_text(f.per_vm_noop_errno)},
        {"KVM_SET_MEMORY_ATTRIBUTES2_unknown_flag", probe_errno_text(f.attrs2_invalid_errno)},
        {"KVM_SET_MEMORY_ATTRIBUTES2_noop", probe_errno_text(f.attrs2_noop_errno)},
        {"KVM_GMEM_CONVERT_PRIVATE_unaligned", probe_errno_text(f.convert_invalid_errno)},
        {"KVM_GMEM_CONVERT_PRIVATE_noop", probe_errno_text(f.convert_noop_errno)}};
    if (!f.gmem_error.empty()) facts["guest_memfd_error"] = f.gmem_error;
    if (!f.attrs2_gmem_error.empty())
      facts["KVM_SET_MEMORY_ATTRIBUTES2_guest_memfd_error"] = f.attrs2_gmem_error;
    if (!f.convert_gmem_error.empty())
      facts["KVM_GMEM_CONVERT_PRIVATE_guest_memfd_error"] = f.convert_gmem_error;
    j["facts"] = facts;
  }
  return j;
}

}  // namespace

std::string hexval(long v) {
  char b[32];
  if (v < 0)
    std::snprintf(b, sizeof b, "-%s", errno_name(static_cast<int>(-v)));
  else
    std::snprintf(b, sizeof b, "%#lx", static_cast<unsigned long>(v));
  return b;
}

std::string vm_type_name(unsigned long type) {
#if defined(__x86_64__)
  switch (type) {
    case uapi::vmtype::kX86Default: return "x86-default";
    case uapi::vmtype::kX86SwProtected: return "x86-sw-protected";
    case uapi::vmtype::kX86Sev: return "x86-sev";
    case uapi::vmtype::kX86SevEs: return "x86-sev-es";
    case uapi::vmtype::kX86Snp: return "x86-snp";
    case uapi::vmtype::kX86Tdx: return "x86-tdx";
  }
#elif defined(__aarch64__)
  if (type == 0) return "arm64-default";
  if (type == uapi::vmtype::kArmProtected) return "arm64-pkvm-protected";
#endif
  return "type-" + std::to_string(type);
}

bool Capabilities::has_vm_type(unsigned long type) const {
  const VmTypeCaps* v = vm(type);
  return v ? v->creatable : false;
}

const VmTypeCaps* Capabilities::vm(unsigned long type) const {
  for (const auto& v : per_type)
    if (v.type == type) return &v;
  return nullptr;
}

Capabilities probe_capabilities() {
  Capabilities c;
  struct utsname u {};
  uname(&u);
  c.arch = u.machine;
  c.kvm_device = kvm_device_path();
  c.kvm_amd_sev_snp = read_first_line("/sys/module/kvm_amd/parameters/sev_snp");
  c.kvm_intel_tdx = read_first_line("/sys/module/kvm_intel/parameters/tdx");
#if defined(__aarch64__)
  {
    std::string cmdline = read_first_line("/proc/cmdline");
    auto pos = cmdline.find("kvm-arm.mode=");
    if (pos != std::string::npos) {
      auto end = cmdline.find(' ', pos);
      c.arm64_kvm_mode = cmdline.substr(pos + 13, end == std::string::npos ? end : end - pos - 13);
    }
    // Asking for protected mode is not getting it: the hypervisor says so in the kernel log.
    if (auto log = KmsgWatcher::open()) {
      log->rewind();
      for (const KmsgRecord& r : log->drain())
        // 6.x logs "Protected nVHE mode initialized", 7.2 on a VHE-capable CPU "Protected hVHE
        // mode initialized".
        if (r.text.find("Protected nVHE mode initialized") != std::string::npos ||
            r.text.find("Protected hVHE mode initialized") != std::string::npos)
          c.arm64_pkvm_initialized = true;
    }
  }
#endif
  auto kvm = Kvm::open();
  if (!kvm) {
    c.kvm_error = kvm.error().message();
    c.kvm_errno = kvm.error().err;
    return c;
  }
  c.kvm_available = true;
  if (auto v = kvm->api_version()) c.api_version = v.value();
  c.guest_memfd = kvm->check_extension(uapi::cap::kGuestMemfd);
  c.guest_memfd_flags = kvm->check_extension(uapi::cap::kGuestMemfdFlags);
  c.memory_attributes = kvm->check_extension(uapi::cap::kMemoryAttributes);
  c.exit_hypercall = kvm->check_extension(uapi::cap::kExitHypercall);
  c.pre_fault_memory = kvm->check_extension(uapi::cap::kPreFaultMemory);
  c.memory_fault_info = kvm->check_extension(uapi::cap::kMemoryFaultInfo);
  c.user_memory2 = kvm->check_extension(uapi::cap::kUserMemory2);
  c.vm_types_cap = kvm->check_extension(uapi::cap::kVmTypes);

  // A kernel without KVM_CAP_VM_TYPES (or reporting 0) still creates the default type.
  uint64_t advertised = c.vm_types_cap > 0 ? static_cast<uint64_t>(c.vm_types_cap) : 1;
  for (unsigned long t : candidate_types()) {
    VmTypeCaps vc;
    vc.type = t;
    vc.name = vm_type_name(t);
    bool adv = !kHasVmTypesCap || ((advertised >> t) & 1);
    if (!adv) {
      vc.create_error = "not advertised in KVM_CAP_VM_TYPES (" + hexval(c.vm_types_cap) + ")";
    } else if (auto vm = kvm->create_vm(t); !vm) {
      vc.create_error = vm.error().message();
    } else {
      vc.creatable = true;
      if (t < 64) c.vm_types |= 1ULL << t;
      fill_vm_caps(vm.value(), vc);
      vc.conversion_facts = probe_conversion(vm.value(), vc.guest_memfd, vc.memory_attributes);
    }
    if (!vc.creatable) vc.conversion_facts = conversion_facts_without_vm(vc.create_error);
    vc.conversion = select_conversion_backend(vc.conversion_facts);
    c.per_type.push_back(vc);
  }
  return c;
}

const Capabilities& cached_capabilities() {
  static const Capabilities c = probe_capabilities();
  return c;
}

nlohmann::json Capabilities::to_json() const {
  nlohmann::json j;
  j["kvm_available"] = kvm_available;
  j["kvm_device"] = kvm_device;
  if (!kvm_available) {
    j["kvm_error"] = kvm_error;
    j["kvm_errno"] = errno_name(kvm_errno);
  }
  j["arch"] = arch;
  j["api_version"] = api_version;
  j["system"] = {{"KVM_CAP_VM_TYPES", vm_types_cap},
                 {"KVM_CAP_GUEST_MEMFD", guest_memfd},
                 {"KVM_CAP_GUEST_MEMFD_FLAGS", guest_memfd_flags},
                 {"KVM_CAP_MEMORY_ATTRIBUTES", memory_attributes},
                 {"KVM_CAP_EXIT_HYPERCALL", exit_hypercall},
                 {"KVM_CAP_PRE_FAULT_MEMORY", pre_fault_memory},
                 {"KVM_CAP_MEMORY_FAULT_INFO", memory_fault_info},
                 {"KVM_CAP_USER_MEMORY2", user_memory2}};
  j["vm_types_creatable"] = nlohmann::json::array();
  auto types = nlohmann::json::array();
  for (const auto& v : per_type) {
    nlohmann::json t = {{"type", v.type}, {"name", v.name}, {"creatable", v.creatable}};
    if (v.creatable) {
      j["vm_types_creatable"].push_back(v.name);
      t["caps"] = {{"KVM_CAP_GUEST_MEMFD", v.guest_memfd},
                   {"KVM_CAP_GUEST_MEMFD_FLAGS", v.guest_memfd_flags},
                   {"KVM_CAP_MEMORY_ATTRIBUTES", v.memory_attributes},
                   {"KVM_CAP_EXIT_HYPERCALL", v.exit_hypercall},
                   {"KVM_CAP_PRE_FAULT_MEMORY", v.pre_fault_memory},
                   {"KVM_CAP_MEMORY_FAULT_INFO", v.memory_fault_info},
                   {"KVM_CAP_USER_MEMORY2", v.user_memory2}};
    } else {
      t["create_error"] = v.create_error;
    }
    t["conversion"] = conversion_json(v);
    types.push_back(t);
  }
  j["vm_types"] = types;
  j["host_hints"] = {{"kvm_amd.sev_snp", kvm_amd_sev_snp},
                     {"kvm_intel.tdx", kvm_intel_tdx},
                     {"kvm-arm.mode", arm64_kvm_mode},
                     {"arm64_pkvm_initialized", arm64_pkvm_initialized}};
  return j;
}

}  // namespace cvm

#include "cvmconf/conversion.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>

#include "cvmconf/probe.h"

namespace cvm {
namespace {


constexpr uint64_t kSmallPage = 4096;  // MAP_GPA_RANGE counts 4 KiB pages on every x86 host

// --- back-ends -----------------------------------------------------------------------------------
class PerVmBackend final : public ConversionBackend {
 public:
  explicit PerVmBackend(int vm_fd) : vm_fd_(vm_fd) {}
  ConversionAbi abi() const override { return ConversionAbi::PerVmAttributes; }
  int issue(const ConversionRequest& r, uint64_t* raw_error_offset) const override {
    uapi::kvm_memory_attributes a = encode_per_vm_request(r);
    const long rc = ioctl_retrying(vm_fd_, uapi::kSetMemoryAttributes, &a);
    const int err = rc < 0 ? static_cast<int>(-rc) : 0;
    *raw_error_offset = kErrorOffsetUnset;  // no such field in this ABI
    return err;
  }
  std::string describe_request(const ConversionRequest& r) const override {
    uapi::kvm_memory_attributes a = encode_per_vm_request(r);
    return "KVM_SET_MEMORY_ATTRIBUTES(gpa=" + hex(a.address) + ", size=" + hex(a.size) +
           ", attributes=" + hex(a.attributes) + (a.flags ? ", flags=" + hex(a.flags) : "") + ")";
  }

 private:
  int vm_fd_;
};

class GmemAttributesIoctlBackend final : public ConversionBackend {
 public:
  ConversionAbi abi() const override { return ConversionAbi::GmemAttributesIoctl; }
  int issue(const ConversionRequest& r, uint64_t* raw_error_offset) const override {
    uapi::kvm_memory_attributes2 a = encode_gmem_attributes2_request(r);
    const long rc = ioctl_retrying(r.range.gmem_fd, uapi::kSetMemoryAttributes2, &a);
    const int err = rc < 0 ? static_cast<int>(-rc) : 0;
    *raw_error_offset = a.error_offset;
    return err;
  }
  std::string describe_request(const ConversionRequest& r) const override {
    uapi::kvm_memory_attributes2 a = encode_gmem_attributes2_request(r);
    return "KVM_SET_MEMORY_ATTRIBUTES2(gmem offset=" + hex(a.offset) + ", size=" + hex(a.size) +
           ", attributes=" + hex(a.attributes) + (a.flags ? ", flags=" + hex(a.flags) : "") +
           (r.nonzero_reserved ? ", reserved[0]=1" : "") + ")";
  }
};

class GmemConvertIoctlsBackend final : public ConversionBackend {
 public:
  ConversionAbi abi() const override { return ConversionAbi::GmemConvertIoctls; }
  int issue(const ConversionRequest& r, uint64_t* raw_error_offset) const override {
    GmemConvertEncoded e = encode_gmem_convert_request(r);
    const long rc = ioctl_retrying(r.range.gmem_fd, e.ioctl, &e.arg);
    const int err = rc < 0 ? static_cast<int>(-rc) : 0;
    *raw_error_offset = e.arg.error_offset;
    return err;
  }
  std::string describe_request(const ConversionRequest& r) const override {
    GmemConvertEncoded e = encode_gmem_convert_request(r);
    return std::string(r.to_private ? "KVM_GMEM_CONVERT_PRIVATE" : "KVM_GMEM_CONVERT_SHARED") +
           "(offset=" + hex(e.arg.offset) + ", size=" + hex(e.arg.size) +
           (r.nonzero_reserved ? ", reserved[0]=1" : "") + ")";
  }
};

// Why one in-place style back-end is or is not usable, from its two probe answers.
std::optional<std::string> ioctl_probe_problem(const char* what, int invalid_errno,
                                               int noop_errno, const std::string& gmem_error,
                                               const char* invalid_desc) {
  if (invalid_errno == -1) return std::string("not probed");
  if (invalid_errno == ENOTTY) return std::string(what) + " on a guest_memfd fails with ENOTTY";
  if (invalid_errno == 0)
    return std::string(what) + " accepted " + invalid_desc + " (not the documented ABI)";
  if (!gmem_error.empty())
    return std::string(what) + " exists (" + invalid_desc + ": " + errno_name(invalid_errno) +
           ") but the file for a no-op could not be created: " + gmem_error;
  if (noop_errno != 0)
    return std::string(what) + " exists (" + invalid_desc + ": " + errno_name(invalid_errno) +
           ") but refuses a request that changes nothing with " + probe_errno_text(noop_errno) +
           (noop_errno == EINVAL ? " (no private memory for this VM type)" : "");
  return std::nullopt;
}

}  // namespace

const char* conversion_abi_name(ConversionAbi abi) {
  switch (abi) {
    case ConversionAbi::PerVmAttributes: return "per-vm-attributes";
    case ConversionAbi::GmemAttributesIoctl: return "gmem-set-attributes2";
    case ConversionAbi::GmemConvertIoctls: return "gmem-convert-ioctls";
  }
  return "?";
}

// --- encoding ------------------------------------------------------------------------------------
namespace {

// The words both attribute ioctls share: size, attributes (PRIVATE or not, plus any crafted
// bits) and flags.
template <typename Attributes>
void encode_attribute_words(const ConversionRequest& r, Attributes& a) {
  a.size = r.range.size;
  a.attributes = (r.to_private ? uapi::kMemoryAttributePrivate : 0) | r.extra_attributes;
  a.flags = r.extra_flags;
}

}  // namespace

uapi::kvm_memory_attributes encode_per_vm_request(const ConversionRequest& r) {
  uapi::kvm_memory_attributes a{};
  a.address = r.range.gpa;  // by guest physical address
  encode_attribute_words(r, a);
  return a;
}

uapi::kvm_memory_attributes2 encode_gmem_attributes2_request(const ConversionRequest& r) {
  uapi::kvm_memory_attributes2 a{};
  a.offset = r.range.offset;  // by guest_memfd offset
  encode_attribute_words(r, a);
  a.error_offset = kErrorOffsetUnset;
  if (r.nonzero_reserved) a.reserved[0] = 1;
  return a;
}

GmemConvertEncoded encode_gmem_convert_request(const ConversionRequest& r) {
  GmemConvertEncoded e;
  e.ioctl = r.to_private ? uapi::kGmemConvertPrivate : uapi::kGmemConvertShared;
  e.arg.offset = r.range.offset;
  e.arg.size = r.range.size;
  e.arg.error_offset = kErrorOffsetUnset;
  if (r.nonzero_reserved) e.arg.reserved[0] = 1;
  return e;
}

uint64_t conversion_gmem_flags(ConversionAbi abi, bool init_shared) {
  switch (abi) {
    case ConversionAbi::PerVmAttributes: return 0;
    case ConversionAbi::GmemAttributesIoctl:
      return uapi::kGmemFlagMmap | (init_shared ? uapi::kGmemFlagInitShared : 0);
    case ConversionAbi::GmemConvertIoctls:
      return uapi::kRfcV2GmemFlagSupportShared | (init_shared ? 0 : uapi::kRfcV2GmemFlagInitPrivate);
  }
  return 0;
}

bool conversion_initially_shared(ConversionAbi abi, bool init_shared) {
  // Per-VM attributes start at 0 (shared) whatever the file's flags.
  return abi == ConversionAbi::PerVmAttributes ? true : init_shared;
}

// --- results -------------------------------------------------------------------------------------
ConversionResult interpret_conversion(ConversionAbi abi, const ConversionRequest& req, int err,
                                      uint64_t raw_error_offset, std::string op) {
  ConversionResult r;
  r.abi = abi;
  r.err = err;
  r.op = std::move(op);
  if (err == 0) {
    r.offset_report = OffsetReport::None;
  } else if (abi == ConversionAbi::PerVmAttributes) {
    r.offset_report = OffsetReport::NotInAbi;
  } else if (raw_error_offset == kErrorOffsetUnset) {
    r.offset_report = OffsetReport::NotReported;
  } else {
    r.error_offset = raw_error_offset;
    const uint64_t start = req.range.offset, end = req.range.offset + req.range.size;
    r.offset_report = raw_error_offset >= start && raw_error_offset < end
                          ? OffsetReport::Reported
                          : OffsetReport::OutOfRange;
  }
  return r;
}

std::string ConversionResult::describe() const {
  if (ok()) return "ok (" + op + ")";
  std::string s = std::string(errno_name(err)) + " from " + op;
  switch (offset_report) {
    case OffsetReport::Reported: s += ", error_offset " + hex(error_offset); break;
    case OffsetReport::OutOfRange:
      s += ", error_offset " + hex(error_offset) + " (outside the request's range)";
      break;
    case OffsetReport::NotReported: s += ", error_offset not reported"; break;
    case OffsetReport::NotInAbi: s += " (this ABI has no error offset)"; break;
    case OffsetReport::None: break;
  }
  return s;
}

std::unique_ptr<ConversionBackend> make_conversion_backend(ConversionAbi abi, const Vm& vm) {
  switch (abi) {
    case ConversionAbi::PerVmAttributes: return std::make_unique<PerVmBackend>(vm.fd());
    case ConversionAbi::GmemAttributesIoctl: return std::make_unique<GmemAttributesIoctlBackend>();
    case ConversionAbi::GmemConvertIoctls: return std::make_unique<GmemConvertIoctlsBackend>();
  }
  return nullptr;
}

// --- probing and selection -------------------------------------------------------------------
std::string probe_errno_text(int e) {
  if (e < 0) return "not tried";
  return e == 0 ? "success" : errno_name(e);
}

ConversionSelection select_conversion_backend(const ConversionProbeFacts& f) {
  ConversionSelection s;
  if (!f.vm_creatable) {
    s.reason = "VM type not offered: " + f.vm_error;
    return s;
  }
  std::vector<std::string> why_not;

  // Per-VM attributes: the merged mainline cap says PRIVATE, a no-op is accepted, and private
  // memory can be provided (guest_memfd).
  std::optional<std::string> per_vm;
  if (f.memory_attributes_cap < 0)
    per_vm = "KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES) failed with " +
             std::string(errno_name(static_cast<int>(-f.memory_attributes_cap)));
  else if (!(static_cast<uint64_t>(f.memory_attributes_cap) & uapi::kMemoryAttributePrivate))
    per_vm = "KVM_CAP_MEMORY_ATTRIBUTES=" + hexval(f.memory_attributes_cap) +
             " lacks KVM_MEMORY_ATTRIBUTE_PRIVATE (0x8)";
  else if (f.per_vm_noop_errno != 0)
    per_vm = "KVM_SET_MEMORY_ATTRIBUTES refuses a request that changes nothing with " +
             (f.per_vm_noop_errno < 0 ? std::string("(not probed)") : probe_errno_text(f.per_vm_noop_errno));
  else if (f.guest_memfd_cap <= 0)
    per_vm = "private memory needs guest_memfd: KVM_CAP_GUEST_MEMFD=" + hexval(f.guest_memfd_cap);

  std::optional<std::string> attrs2, convert;
  if (f.guest_memfd_cap <= 0 || !f.gmem_error.empty()) {
    std::string g = f.guest_memfd_cap <= 0 ? "KVM_CAP_GUEST_MEMFD=" + hexval(f.guest_memfd_cap)
                                           : "no guest_memfd for the probe: " + f.gmem_error;
    attrs2 = convert = "needs guest_memfd (" + g + ")";
  } else {
    attrs2 = ioctl_probe_problem("KVM_SET_MEMORY_ATTRIBUTES2", f.attrs2_invalid_errno,
                                 f.attrs2_noop_errno, f.attrs2_gmem_error, "an unknown flag bit");
    convert = ioctl_probe_problem("KVM_GMEM_CONVERT_PRIVATE", f.convert_invalid_errno,
                                  f.convert_noop_errno, f.convert_gmem_error, "an unaligned offset");
  }

  if (!attrs2) s.available.push_back(ConversionAbi::GmemAttributesIoctl);
  if (!convert) s.available.push_back(ConversionAbi::GmemConvertIoctls);
  if (!per_vm) s.available.push_back(ConversionAbi::PerVmAttributes);
  if (!s.available.empty()) {
    s.backend = s.available.front();
    switch (*s.backend) {
      case ConversionAbi::GmemAttributesIoctl:
        s.reason = "gmem-set-attributes2: KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd refuses an unknown "
                   "flag with " + std::string(errno_name(f.attrs2_invalid_errno)) +
                   " and accepts a request that changes nothing";
        break;
      case ConversionAbi::GmemConvertIoctls:
        s.reason = "gmem-convert-ioctls: KVM_GMEM_CONVERT_PRIVATE on guest_memfd refuses an unaligned offset "
                   "with " + std::string(errno_name(f.convert_invalid_errno)) +
                   " and accepts a request that changes nothing";
        break;
      case ConversionAbi::PerVmAttributes:
        s.reason = "per-vm-attributes: KVM_CAP_MEMORY_ATTRIBUTES=" +
                   hexval(f.memory_attributes_cap) +
                   " has PRIVATE and KVM_SET_MEMORY_ATTRIBUTES accepts a request that changes "
                   "nothing";
        break;
    }
    for (size_t i = 1; i < s.available.size(); i++)
      s.reason += std::string(i == 1 ? "; also available: " : ", ") +
                  conversion_abi_name(s.available[i]);
    return s;
  }
  s.reason = "per-vm-attributes: " + *per_vm + "; gmem-set-attributes2: " + *attrs2 +
             "; gmem-convert-ioctls: " + *convert;
  return s;
}

ConversionProbeFacts conversion_facts_without_vm(const std::string& why) {
  ConversionProbeFacts f;
  f.vm_creatable = false;
  f.vm_error = why;
  return f;
}

ConversionProbeFacts probe_conversion(const Vm& vm, long guest_memfd_cap,
                                      long memory_attributes_cap) {
  ConversionProbeFacts f;
  f.vm_creatable = true;
  const uint64_t ps = page_size();
  f.memory_attributes_cap = memory_attributes_cap;
  f.guest_memfd_cap = guest_memfd_cap;
  if (f.memory_attributes_cap > 0 &&
      (static_cast<uint64_t>(f.memory_attributes_cap) & uapi::kMemoryAttributePrivate))
    f.per_vm_noop_errno = vm.set_memory_attributes(0, ps, 0).err();  // shared -> shared
  if (f.guest_memfd_cap <= 0) return f;

  auto plain = vm.create_guest_memfd(2 * ps, 0);
  if (!plain) {
    f.gmem_error = plain.error().message();
    return f;
  }
  // The requests go through the back-ends the tests then use.
  const GmemAttributesIoctlBackend attrs2;
  const GmemConvertIoctlsBackend convert;
  uint64_t raw_offset = 0;
  // KVM_SET_MEMORY_ATTRIBUTES2: an unknown flag bit must be refused (EINVAL); ENOTTY means no such ioctl.
  {
    ConversionRequest bad{{plain->fd(), 0, ps, 0}, false};
    bad.extra_flags = 1ULL << 63;
    f.attrs2_invalid_errno = attrs2.issue(bad, &raw_offset);
  }
  if (f.attrs2_invalid_errno != ENOTTY && f.attrs2_invalid_errno != 0) {
    // A file that starts private (MMAP, no INIT_SHARED): setting PRIVATE on it changes nothing.
    auto g = vm.create_guest_memfd(2 * ps, conversion_gmem_flags(ConversionAbi::GmemAttributesIoctl, false));
    if (!g) {
      f.attrs2_gmem_error = g.error().message();
    } else {
      f.attrs2_noop_errno = attrs2.issue({{g->fd(), 0, 2 * ps, 0}, true}, &raw_offset);
    }
  }
  // KVM_GMEM_CONVERT_PRIVATE: an unaligned offset must be refused; ENOTTY means no such ioctl.
  f.convert_invalid_errno = convert.issue({{plain->fd(), 1, ps, 0}, true}, &raw_offset);
  if (f.convert_invalid_errno != ENOTTY && f.convert_invalid_errno != 0) {
    // SUPPORT_SHARED | INIT_PRIVATE (the RFC v2 meaning of bits 0 and 1): starts private.
    auto g = vm.create_guest_memfd(2 * ps, conversion_gmem_flags(ConversionAbi::GmemConvertIoctls, false));
    if (!g) {
      f.convert_gmem_error = g.error().message();
    } else {
      f.convert_noop_errno = convert.issue({{g->fd(), 0, ps, 0}, true}, &raw_offset);
    }
  }
  return f;
}

std::optional<std::string> conversion_unavailable(const std::string& vm_name,
                                                  const ConversionSelection& sel) {
  if (sel.backend) return std::nullopt;
  return "capability absent: no conversion back-end for " + vm_name + ": " + sel.reason;
}

// --- guest-initiated and implicit conversion -------------------------------------------------------
std::optional<GuestConversionRequest> decode_map_gpa_range(const ExitInfo& e) {
  if (e.kind != ExitKind::Hypercall || e.hypercall.nr != uapi::kHcMapGpaRange) return std::nullopt;
  GuestConversionRequest r;
  r.source = GuestConversionRequest::Source::MapGpaRange;
  r.gpa = e.hypercall.args[0];
  r.npages = e.hypercall.args[1];
  r.attributes = e.hypercall.args[2];
  r.exit_flags = e.hypercall.flags;
  // KVM refuses npages that overflow the GFN space before exiting; saturate all the same.
  r.size = r.npages > (~0ULL / kSmallPage) ? ~0ULL : r.npages * kSmallPage;
  r.to_private = (r.attributes & uapi::kMapGpaRangeEncrypted) != 0;
  return r;
}

std::optional<GuestConversionRequest> decode_memory_fault(const ExitInfo& e) {
  if (e.kind != ExitKind::MemoryFault) return std::nullopt;
  GuestConversionRequest r;
  r.source = GuestConversionRequest::Source::MemoryFault;
  r.gpa = e.memory_fault.gpa;
  r.size = e.memory_fault.size;
  r.exit_flags = e.memory_fault.flags;
  r.to_private = (e.memory_fault.flags & uapi::kMemoryExitFlagPrivate) != 0;
  return r;
}

uint64_t map_gpa_range_ret(const ConversionResult& r) {
  if (r.ok()) return 0;
  if (r.err == EAGAIN) return EAGAIN;
  return EINVAL;
}

void GpaMap::add(uint64_t gpa, uint64_t size, int gmem_fd, uint64_t gmem_offset) {
  bindings_.push_back({gpa, size, gmem_fd, gmem_offset});
}

Result<GmemRange> GpaMap::lookup(uint64_t gpa, uint64_t size) const {
  for (const Binding& b : bindings_) {
    if (gpa < b.gpa || gpa >= b.gpa + b.size) continue;
    if (size > b.gpa + b.size - gpa)
      return SysError{EINVAL, "GPA range [" + hex(gpa) + ", +" + hex(size) +
                                  ") runs past the guest_memfd binding at " + hex(b.gpa) +
                                  " (size " + hex(b.size) + ")"};
    return GmemRange{b.fd, b.offset + (gpa - b.gpa), size, gpa};
  }
  return SysError{EINVAL, "GPA " + hex(gpa) + " is not backed by guest_memfd"};
}

HandledConversion handle_guest_conversion(const GuestConversionRequest& req, const GpaMap& map,
                                          const ConversionBackend* backend,
                                          const std::string& no_backend_reason) {
  HandledConversion h;
  h.request = req;
  if (!backend) {
    h.result.err = EOPNOTSUPP;
    h.result.op = "no conversion back-end: " + no_backend_reason;
  } else if (backend->abi() == ConversionAbi::PerVmAttributes) {
    // Attributes are per GPA: no guest_memfd offset is needed (and the range may span slots).
    h.result = backend->apply({GmemRange{-1, 0, req.size, req.gpa}, req.to_private});
  } else if (auto range = map.lookup(req.gpa, req.size); !range) {
    h.result.abi = backend->abi();
    h.result.err = range.error().err;
    h.result.op = range.error().op;
  } else {
    h.result = backend->apply({range.value(), req.to_private});
  }
  h.ret = map_gpa_range_ret(h.result);
  return h;
}

GuestConversionHandler::GuestConversionHandler(const ConversionBackend* backend, GpaMap map,
                                               std::string no_backend_reason)
    : backend_(backend), map_(std::move(map)), no_backend_reason_(std::move(no_backend_reason)) {}

bool GuestConversionHandler::operator()(int vcpu, Vcpu& v, const ExitInfo& e) {
  std::optional<GuestConversionRequest> req = decode_map_gpa_range(e);
  if (!req && memory_faults_) req = decode_memory_fault(e);
  if (!req) return false;
  HandledConversion h = handle_guest_conversion(*req, map_, backend_, no_backend_reason_);
  h.vcpu = vcpu;
  bool resume = true;
  if (req->source == GuestConversionRequest::Source::MapGpaRange)
    v.run_struct()->hypercall.ret = h.ret;  // completes the hypercall on the next KVM_RUN
  else
    resume = h.result.ok();  // re-entering retries the access: only useful after a conversion
  std::lock_guard<std::mutex> g(mu_);
  log_.push_back(std::move(h));
  return resume;
}

std::vector<HandledConversion> GuestConversionHandler::log() const {
  std::lock_guard<std::mutex> g(mu_);
  return log_;
}

Result<void> enable_map_gpa_range_exit(const Vm& vm) {
  return vm.enable_cap(static_cast<uint32_t>(uapi::cap::kExitHypercall),
                       1ULL << uapi::kHcMapGpaRange);
}

}  // namespace cvm

// Shared <-> private conversion: three kernel ABIs behind one interface, chosen per VM by
// probing behaviour (never by the cap number of an unmerged series: they moved with every
// rebase), plus the host side of guest-initiated conversion (KVM_HC_MAP_GPA_RANGE exits) and
// implicit conversion (KVM_EXIT_MEMORY_FAULT).
//
// Back-ends (Documentation/virt/kvm/api.rst 4.141; the in-place conversion series v8; the 1G
// hugetlb + conversion RFC v2), each named for the ioctls it issues:
//   per-vm-attributes     KVM_SET_MEMORY_ATTRIBUTES on the VM fd, by GPA (mainline 6.8+). Private
//                         memory is the guest_memfd, shared memory is separate host memory (the
//                         memslot's userspace_addr). No error offset in the ABI.
//   gmem-set-attributes2  KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd fd, by file offset (the
//                         in-place conversion series v8; RFC v4/v5 share the ioctl). Shared pages
//                         live in the guest_memfd itself and are host-mapped through it.
//                         error_offset on failure.
//   gmem-convert-ioctls   KVM_GMEM_CONVERT_SHARED / KVM_GMEM_CONVERT_PRIVATE on the guest_memfd fd
//                         (the 1G hugetlb + conversion RFC v2, May 2025). Bit 1 of the creation
//                         flags means INIT_PRIVATE there, the opposite of mainline's INIT_SHARED.
//
// Everything that can be decided without a kernel (request encoding, back-end selection from
// probe facts, errno/error-offset interpretation, exit decoding) is a pure function here so the
// unit tests cover every back-end's code path on any machine.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cvmconf/kvm.h"
#include "cvmconf/result.h"
#include "cvmconf/uapi.h"

namespace cvm {

enum class ConversionAbi { PerVmAttributes, GmemAttributesIoctl, GmemConvertIoctls };
// "per-vm-attributes", "gmem-set-attributes2", "gmem-convert-ioctls": the names used in reports
// and the fingerprint.
const char* conversion_abi_name(ConversionAbi abi);

// A range of guest memory to convert, named both ways: by guest_memfd file offset (in-place
// back-ends work on the file) and by guest physical address (the per-VM back-end works on GPAs).
struct GmemRange {
  int gmem_fd = -1;
  uint64_t offset = 0;  // in the guest_memfd
  uint64_t size = 0;
  uint64_t gpa = 0;     // where offset is bound in the guest
};

// A conversion request. set_private()/set_shared() build ordinary ones; tests of input
// validation set the extra fields to craft requests the kernel must refuse.
struct ConversionRequest {
  GmemRange range;
  bool to_private = false;
  uint64_t extra_flags = 0;       // OR'ed into flags (per-VM, gmem-set-attributes2): refused
  uint64_t extra_attributes = 0;  // OR'ed into attributes (per-VM, gmem-set-attributes2): refused
  bool nonzero_reserved = false;  // a reserved word set (both gmem ioctls): refused
};

// Written into the out-field error_offset before the ioctl; a value still equal to it after a
// failure means the kernel did not report an offset. Not page aligned, so never a real offset.
inline constexpr uint64_t kErrorOffsetUnset = ~0ULL;

// --- request encoding (pure) -----------------------------------------------------------------
uapi::kvm_memory_attributes encode_per_vm_request(const ConversionRequest& r);
uapi::kvm_memory_attributes2 encode_gmem_attributes2_request(const ConversionRequest& r);
struct GmemConvertEncoded {
  unsigned long ioctl = 0;  // KVM_GMEM_CONVERT_PRIVATE or KVM_GMEM_CONVERT_SHARED
  uapi::kvm_gmem_convert arg{};
};
GmemConvertEncoded encode_gmem_convert_request(const ConversionRequest& r);

// KVM_CREATE_GUEST_MEMFD flags that make a file the back-end can convert, starting shared
// (init_shared) or private, and host-mappable where the back-end maps shared pages in place.
// per-VM: 0 (the file holds only private memory and is never mapped; its initial state is the
//         VM's attributes, which start shared).
// gmem-set-attributes2: MMAP | (init_shared ? INIT_SHARED : 0)
// gmem-convert-ioctls:  SUPPORT_SHARED | (init_shared ? 0 : INIT_PRIVATE)   -- bit 1 inverted
uint64_t conversion_gmem_flags(ConversionAbi abi, bool init_shared);
// Whether a file created with conversion_gmem_flags(abi, init_shared) starts shared.
bool conversion_initially_shared(ConversionAbi abi, bool init_shared);

// --- results and their interpretation (pure) ------------------------------------------------
enum class OffsetReport {
  None,        // the call succeeded: nothing to report
  Reported,    // the kernel wrote an offset inside the request's range
  OutOfRange,  // the kernel wrote an offset outside the request's range (a kernel bug)
  NotReported, // the ABI has error_offset but the kernel left it untouched
  NotInAbi,    // the back-end's ABI has no error offset (per-VM attributes)
};

struct ConversionResult {
  ConversionAbi abi = ConversionAbi::PerVmAttributes;
  int err = 0;          // 0: converted; otherwise errno of the ioctl
  std::string op;       // the call, for messages
  OffsetReport offset_report = OffsetReport::None;
  uint64_t error_offset = 0;  // guest_memfd offset (valid when Reported / OutOfRange)

  bool ok() const { return err == 0; }
  // "ok" or "EAGAIN, error_offset 0x2000 (page 2 of the range)" etc.
  std::string describe() const;
};

// Builds the result of one ioctl: err is its errno (0 on success), raw_error_offset the value
// of the out-field afterwards (ignored for per-VM).
ConversionResult interpret_conversion(ConversionAbi abi, const ConversionRequest& req, int err,
                                      uint64_t raw_error_offset, std::string op);

// --- back-ends ---------------------------------------------------------------------------------
class ConversionBackend {
 public:
  virtual ~ConversionBackend() = default;
  virtual ConversionAbi abi() const = 0;
  std::string name() const { return conversion_abi_name(abi()); }
  // Shared pages live in the guest_memfd (host-mapped through it); false: separate host memory.
  bool in_place() const { return abi() != ConversionAbi::PerVmAttributes; }
  uint64_t gmem_flags(bool init_shared) const { return conversion_gmem_flags(abi(), init_shared); }
  // One ioctl. Never retries (EINTR included): tests decide what an errno means.
  ConversionResult apply(const ConversionRequest& r) const {
    uint64_t raw = kErrorOffsetUnset;
    const int err = issue(r, &raw);
    return interpret_conversion(abi(), r, err, raw, describe_request(r));
  }
  // The ioctl alone: encodes on the stack, makes exactly one system call, allocates nothing
  // (fault-injection tests arm the kernel right before it). Returns errno (0 on success) and the
  // error_offset out-field. apply() == issue() + interpret_conversion().
  virtual int issue(const ConversionRequest& r, uint64_t* raw_error_offset) const = 0;
  // "KVM_SET_MEMORY_ATTRIBUTES2(gmem offset=0x0, size=0x4000, attributes=0x8)"
  virtual std::string describe_request(const ConversionRequest& r) const = 0;
  ConversionResult set_private(const GmemRange& r) const { return apply({r, true}); }
  ConversionResult set_shared(const GmemRange& r) const { return apply({r, false}); }
};

// A back-end bound to vm (the per-VM back-end issues its ioctl on the VM fd; vm must outlive it).
std::unique_ptr<ConversionBackend> make_conversion_backend(ConversionAbi abi, const Vm& vm);

// --- probing and selection ---------------------------------------------------------------------
// What the kernel answered when asked, for one VM type. errno fields: -1 not tried, 0 success.
struct ConversionProbeFacts {
  bool vm_creatable = false;
  std::string vm_error;             // why no VM of the type exists
  long guest_memfd_cap = 0;         // KVM_CAP_GUEST_MEMFD on the VM
  long memory_attributes_cap = 0;   // KVM_CAP_MEMORY_ATTRIBUTES on the VM (merged mainline cap)
  int per_vm_noop_errno = -1;       // KVM_SET_MEMORY_ATTRIBUTES(gpa 0, 1 page, attrs 0)
  std::string gmem_error;           // why no guest_memfd could be created for the probe
  int attrs2_invalid_errno = -1;    // KVM_SET_MEMORY_ATTRIBUTES2 with an unknown flag bit
  int attrs2_noop_errno = -1;       // ... setting PRIVATE on a file that starts private
  std::string attrs2_gmem_error;    // creating that file (MMAP, no INIT_SHARED) failed
  int convert_invalid_errno = -1;   // KVM_GMEM_CONVERT_PRIVATE at an unaligned offset
  int convert_noop_errno = -1;      // ... on a SUPPORT_SHARED|INIT_PRIVATE file's first page
  std::string convert_gmem_error;   // creating that file failed
};
// One errno field of the facts as text: "not tried" (-1), "success" (0) or the errno's name.
std::string probe_errno_text(int e);

struct ConversionSelection {
  std::optional<ConversionAbi> backend;  // the back-end tests use
  std::vector<ConversionAbi> available;  // every back-end that answered correctly
  // backend set: the evidence ("gmem-set-attributes2: KVM_SET_MEMORY_ATTRIBUTES2 ..."); otherwise
  // why none, one clause per back-end ("per-vm-attributes: ...; gmem-set-attributes2: ...;
  // gmem-convert-ioctls: ...").
  std::string reason;
};

// Pure: which back-end the facts support. Preference when several answer: gmem-set-attributes2
// (in-place conversion v8), then gmem-convert-ioctls (RFC v2: the file's own state wins over
// per-VM attributes there), then per-vm-attributes.
ConversionSelection select_conversion_backend(const ConversionProbeFacts& f);

// Asks the kernel, on vm (a VM of the type being probed) whose KVM_CAP_GUEST_MEMFD and
// KVM_CAP_MEMORY_ATTRIBUTES answers the caller has already read (they are recorded in the
// facts). Creates and closes small guest_memfd files; issues only requests that must be refused
// or that change nothing.
ConversionProbeFacts probe_conversion(const Vm& vm, long guest_memfd_cap,
                                      long memory_attributes_cap);
// Facts for a VM type that could not be created.
ConversionProbeFacts conversion_facts_without_vm(const std::string& why);

// The SKIP reason when sel has no back-end: "capability absent: no conversion back-end for
// <vm>: <reason>"; nullopt when it has one.
std::optional<std::string> conversion_unavailable(const std::string& vm_name,
                                                  const ConversionSelection& sel);

// --- guest-initiated and implicit conversion ---------------------------------------------------
// A conversion the guest asked for, decoded from an exit.
struct GuestConversionRequest {
  enum class Source { MapGpaRange, MemoryFault } source = Source::MapGpaRange;
  uint64_t gpa = 0;
  uint64_t size = 0;        // bytes
  bool to_private = false;
  uint64_t npages = 0;      // MAP_GPA_RANGE: args[1] (4 KiB units)
  uint64_t attributes = 0;  // MAP_GPA_RANGE: args[2]
  uint64_t exit_flags = 0;  // hypercall flags / memory_fault flags
};
// KVM_EXIT_HYPERCALL with nr KVM_HC_MAP_GPA_RANGE: args[0] gpa, args[1] npages, args[2] attrs
// (ENCRYPTED = to private; bits 0-1 a page-size hint; npages always counts 4 KiB pages).
std::optional<GuestConversionRequest> decode_map_gpa_range(const ExitInfo& e);
// KVM_EXIT_MEMORY_FAULT: the access was private iff KVM_MEMORY_EXIT_FLAG_PRIVATE; implicit
// conversion makes [gpa, gpa+size) what the access wanted.
std::optional<GuestConversionRequest> decode_memory_fault(const ExitInfo& e);

// The value written to kvm_run.hypercall.ret to complete a MAP_GPA_RANGE (api.rst
// KVM_EXIT_HYPERCALL):
// 0 on success, EAGAIN when the conversion may be retried after its cause goes away (pins),
// EINVAL for every other failure (KVM accepts only 0, EINVAL and EAGAIN for SNP/TDX).
uint64_t map_gpa_range_ret(const ConversionResult& r);

// Where guest_memfd ranges are bound in guest physical memory (one entry per memslot).
class GpaMap {
 public:
  void add(uint64_t gpa, uint64_t size, int gmem_fd, uint64_t gmem_offset);
  // The guest_memfd range behind [gpa, gpa+size), which must lie inside one binding.
  Result<GmemRange> lookup(uint64_t gpa, uint64_t size) const;

 private:
  struct Binding {
    uint64_t gpa, size;
    int fd;
    uint64_t offset;
  };
  std::vector<Binding> bindings_;
};

// One guest request and what the host did with it.
struct HandledConversion {
  int vcpu = 0;
  GuestConversionRequest request;
  ConversionResult result;
  uint64_t ret = 0;  // hypercall.ret written (MapGpaRange)
};

// Pure core of the handler: applies req through backend (nullptr: none available, the reason
// says why) and says what to answer.
HandledConversion handle_guest_conversion(const GuestConversionRequest& req, const GpaMap& map,
                                          const ConversionBackend* backend,
                                          const std::string& no_backend_reason);

// Exit handler for GuestVm::set_exit_handler: consumes MAP_GPA_RANGE hypercall exits (and, when
// enabled, memory-fault exits), converts through the back-end, completes the hypercall with
// map_gpa_range_ret(), and keeps a log. Thread-safe (several vCPUs may exit at once).
class GuestConversionHandler {
 public:
  GuestConversionHandler(const ConversionBackend* backend, GpaMap map,
                         std::string no_backend_reason);
  void handle_memory_faults(bool on) { memory_faults_ = on; }
  // Returns true when the exit was a conversion request it answered.
  bool operator()(int vcpu, Vcpu& v, const ExitInfo& e);
  std::vector<HandledConversion> log() const;

 private:
  const ConversionBackend* backend_;
  GpaMap map_;
  std::string no_backend_reason_;
  bool memory_faults_ = false;
  mutable std::mutex mu_;
  std::vector<HandledConversion> log_;
};

// Enables KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE on vm.
Result<void> enable_map_gpa_range_exit(const Vm& vm);

}  // namespace cvm

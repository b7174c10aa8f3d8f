// Conversion back-ends without a conversion-capable kernel: request encoding for each ABI,
// back-end selection from synthetic probe facts (one per back-end, plus none), errno and
// error-offset interpretation, guest-request decoding and the handler's answer.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>

#include "cvmconf/conversion.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/probe.h"
#include "cvmconf/uapi.h"

namespace cvm {
namespace {

constexpr uint64_t kPs = 4096;

ConversionRequest req(uint64_t offset, uint64_t size, bool to_private, uint64_t gpa = 0) {
  return ConversionRequest{GmemRange{7, offset, size, gpa}, to_private};
}

// --- encoding -------------------------------------------------------------------------------------
TEST(ConversionEncoding, PerVmAttributesUseGpaAndPrivateBit) {
  auto a = encode_per_vm_request(req(0x2000, 3 * kPs, true, 0x100002000));
  EXPECT_EQ(a.address, 0x100002000u) << "the per-VM ioctl works on guest physical addresses";
  EXPECT_EQ(a.size, 3 * kPs);
  EXPECT_EQ(a.attributes, uapi::kMemoryAttributePrivate);
  EXPECT_EQ(a.attributes, 0x8u);
  EXPECT_EQ(a.flags, 0u);
  auto s = encode_per_vm_request(req(0, kPs, false, 0x100000000));
  EXPECT_EQ(s.attributes, 0u) << "shared is the absence of PRIVATE";
  ConversionRequest bad = req(0, kPs, false, 0x100000000);
  bad.extra_flags = 1;
  bad.extra_attributes = 1ULL << 5;
  auto b = encode_per_vm_request(bad);
  EXPECT_EQ(b.flags, 1u);
  EXPECT_EQ(b.attributes, 1ULL << 5);
}

TEST(ConversionEncoding, GmemAttributes2UsesFileOffsetAndPresetsErrorOffset) {
  auto a = encode_gmem_attributes2_request(req(0x3000, 2 * kPs, true, 0x100003000));
  EXPECT_EQ(a.offset, 0x3000u) << "KVM_SET_MEMORY_ATTRIBUTES2 works on guest_memfd offsets, not GPAs";
  EXPECT_EQ(a.address, a.offset) << "address and offset share the first word";
  EXPECT_EQ(a.size, 2 * kPs);
  EXPECT_EQ(a.attributes, uapi::kMemoryAttributePrivate);
  EXPECT_EQ(a.flags, 0u) << "no content modes (v8): any flag is refused";
  EXPECT_EQ(a.error_offset, kErrorOffsetUnset);
  for (uint64_t r : a.reserved) EXPECT_EQ(r, 0u);
  ConversionRequest bad = req(0, kPs, false);
  bad.nonzero_reserved = true;
  bad.extra_flags = uapi::kRfcV4Attr2ModePreserve;
  auto b = encode_gmem_attributes2_request(bad);
  EXPECT_EQ(b.reserved[0], 1u);
  EXPECT_EQ(b.flags, uapi::kRfcV4Attr2ModePreserve);
  EXPECT_EQ(b.attributes, 0u);
  // The first four words overlay struct kvm_memory_attributes (in-place series v8).
  EXPECT_EQ(offsetof(uapi::kvm_memory_attributes2, error_offset), 32u);
  EXPECT_EQ(uapi::kSetMemoryAttributes2, 0xC080AED2UL);
}

TEST(ConversionEncoding, GmemConvertChoosesTheIoctlByDirection) {
  auto p = encode_gmem_convert_request(req(0x4000, kPs, true));
  EXPECT_EQ(p.ioctl, uapi::kGmemConvertPrivate);
  EXPECT_EQ(p.ioctl, 0xC040AF42UL);
  EXPECT_EQ(p.arg.offset, 0x4000u);
  EXPECT_EQ(p.arg.size, kPs);
  EXPECT_EQ(p.arg.error_offset, kErrorOffsetUnset);
  for (uint64_t r : p.arg.reserved) EXPECT_EQ(r, 0u);
  auto s = encode_gmem_convert_request(req(0, 8 * kPs, false));
  EXPECT_EQ(s.ioctl, uapi::kGmemConvertShared);
  EXPECT_EQ(s.ioctl, 0xC040AF41UL);
  EXPECT_EQ(s.arg.size, 8 * kPs);
}

TEST(ConversionEncoding, CreationFlagsPerAbiWithGmemConvertBit1Inverted) {
  // Mainline / gmem-set-attributes2 (v8): bit 0 MMAP, bit 1 INIT_SHARED.
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::GmemAttributesIoctl, true), 0x3u);
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::GmemAttributesIoctl, false), 0x1u);
  // gmem-convert-ioctls (RFC v2): bit 0 SUPPORT_SHARED, bit 1 INIT_PRIVATE: the same bit, the
  // opposite meaning.
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::GmemConvertIoctls, true), 0x1u);
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::GmemConvertIoctls, false), 0x3u);
  EXPECT_EQ(uapi::kRfcV2GmemFlagInitPrivate, uapi::kGmemFlagInitShared);
  // Per-VM: the file holds only private memory and is never mapped.
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::PerVmAttributes, true), 0u);
  EXPECT_EQ(conversion_gmem_flags(ConversionAbi::PerVmAttributes, false), 0u);
  EXPECT_TRUE(conversion_initially_shared(ConversionAbi::GmemAttributesIoctl, true));
  EXPECT_FALSE(conversion_initially_shared(ConversionAbi::GmemAttributesIoctl, false));
  EXPECT_FALSE(conversion_initially_shared(ConversionAbi::GmemConvertIoctls, false));
  EXPECT_TRUE(conversion_initially_shared(ConversionAbi::PerVmAttributes, false))
      << "per-VM attributes start shared whatever the file's flags";
}

// --- selection ------------------------------------------------------------------------------------
ConversionProbeFacts base_facts() {
  ConversionProbeFacts f;
  f.vm_creatable = true;
  f.guest_memfd_cap = 1;
  f.memory_attributes_cap = 0;
  f.attrs2_invalid_errno = ENOTTY;
  f.convert_invalid_errno = ENOTTY;
  return f;
}

TEST(ConversionSelection, PerVmAttributesOnMainline68) {
  ConversionProbeFacts f = base_facts();
  f.memory_attributes_cap = 0x8;
  f.per_vm_noop_errno = 0;
  ConversionSelection s = select_conversion_backend(f);
  ASSERT_TRUE(s.backend);
  EXPECT_EQ(*s.backend, ConversionAbi::PerVmAttributes);
  EXPECT_EQ(s.available.size(), 1u);
  EXPECT_NE(s.reason.find("per-vm-attributes"), std::string::npos) << s.reason;
  EXPECT_FALSE(conversion_unavailable("x86-sw-protected", s));
}

TEST(ConversionSelection, GmemAttributesIoctl) {
  ConversionProbeFacts f = base_facts();
  f.attrs2_invalid_errno = EINVAL;
  f.attrs2_noop_errno = 0;
  ConversionSelection s = select_conversion_backend(f);
  ASSERT_TRUE(s.backend);
  EXPECT_EQ(*s.backend, ConversionAbi::GmemAttributesIoctl);
  EXPECT_NE(s.reason.find("KVM_SET_MEMORY_ATTRIBUTES2"), std::string::npos) << s.reason;
}

TEST(ConversionSelection, GmemConvertIoctlsPreferredOverPerVmAttributes) {
  ConversionProbeFacts f = base_facts();
  f.memory_attributes_cap = 0x8;
  f.per_vm_noop_errno = 0;
  f.convert_invalid_errno = EINVAL;
  f.convert_noop_errno = 0;
  ConversionSelection s = select_conversion_backend(f);
  ASSERT_TRUE(s.backend);
  EXPECT_EQ(*s.backend, ConversionAbi::GmemConvertIoctls);
  ASSERT_EQ(s.available.size(), 2u);
  EXPECT_EQ(s.available[1], ConversionAbi::PerVmAttributes);
  EXPECT_NE(s.reason.find("also available: per-vm-attributes"), std::string::npos) << s.reason;
}

TEST(ConversionSelection, NoneOnAKernelWithoutPrivateMemory) {
  // What this development host (6.18, default VM only) answers.
  ConversionSelection s = select_conversion_backend(base_facts());
  EXPECT_FALSE(s.backend);
  EXPECT_TRUE(s.available.empty());
  EXPECT_EQ(s.reason,
            "per-vm-attributes: KVM_CAP_MEMORY_ATTRIBUTES=0 lacks KVM_MEMORY_ATTRIBUTE_PRIVATE "
            "(0x8); gmem-set-attributes2: KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd fails with "
            "ENOTTY; gmem-convert-ioctls: KVM_GMEM_CONVERT_PRIVATE on a guest_memfd fails with "
            "ENOTTY");
  auto why = conversion_unavailable("x86-default", s);
  ASSERT_TRUE(why);
  EXPECT_EQ(why->rfind("capability absent: no conversion back-end for x86-default: ", 0), 0u)
      << *why;
}

TEST(ConversionSelection, NoneWithoutGuestMemfd) {
  // Debian's 6.1: no guest_memfd, no memory attributes; the gmem ioctls are never tried.
  ConversionProbeFacts f;
  f.vm_creatable = true;
  ConversionSelection s = select_conversion_backend(f);
  EXPECT_FALSE(s.backend);
  EXPECT_NE(s.reason.find("gmem-set-attributes2: needs guest_memfd (KVM_CAP_GUEST_MEMFD=0)"),
            std::string::npos)
      << s.reason;
}

TEST(ConversionSelection, NoneWhenTheVmTypeIsNotOffered) {
  ConversionSelection s =
      select_conversion_backend(conversion_facts_without_vm("not advertised in KVM_CAP_VM_TYPES (0x1)"));
  EXPECT_FALSE(s.backend);
  EXPECT_EQ(s.reason, "VM type not offered: not advertised in KVM_CAP_VM_TYPES (0x1)");
}

TEST(ConversionSelection, IoctlPresentButUnusableIsNotSelected) {
  // The default VM of a kernel with KVM_SET_MEMORY_ATTRIBUTES2 (v8): the ioctl exists, but a
  // no-op is refused (no private memory).
  ConversionProbeFacts f = base_facts();
  f.attrs2_invalid_errno = EINVAL;
  f.attrs2_noop_errno = EINVAL;
  ConversionSelection s = select_conversion_backend(f);
  EXPECT_FALSE(s.backend);
  EXPECT_NE(s.reason.find("refuses a request that changes nothing with EINVAL"), std::string::npos)
      << s.reason;
  // An ioctl that accepts an invalid request is not the documented ABI.
  f.attrs2_invalid_errno = 0;
  f.attrs2_noop_errno = 0;
  s = select_conversion_backend(f);
  EXPECT_FALSE(s.backend);
  EXPECT_NE(s.reason.find("accepted an unknown flag bit"), std::string::npos) << s.reason;
  // Per-VM attributes without guest_memfd cannot provide private memory.
  ConversionProbeFacts g;
  g.vm_creatable = true;
  g.memory_attributes_cap = 0x8;
  g.per_vm_noop_errno = 0;
  s = select_conversion_backend(g);
  EXPECT_FALSE(s.backend);
  EXPECT_NE(s.reason.find("private memory needs guest_memfd"), std::string::npos) << s.reason;
}

// --- results ------------------------------------------------------------------------------------
TEST(ConversionResultInterpretation, SuccessHasNoOffset) {
  auto r = interpret_conversion(ConversionAbi::GmemAttributesIoctl, req(0, 4 * kPs, true), 0, kErrorOffsetUnset, "op");
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.offset_report, OffsetReport::None);
  EXPECT_EQ(r.describe(), "ok (op)");
}

TEST(ConversionResultInterpretation, EagainWithOffsetNamesThePage) {
  auto r = interpret_conversion(ConversionAbi::GmemAttributesIoctl, req(0, 4 * kPs, true), EAGAIN, 2 * kPs,
                                "KVM_SET_MEMORY_ATTRIBUTES2(...)");
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.err, EAGAIN);
  EXPECT_EQ(r.offset_report, OffsetReport::Reported);
  EXPECT_EQ(r.error_offset, 2 * kPs);
  EXPECT_EQ(r.describe(), "EAGAIN from KVM_SET_MEMORY_ATTRIBUTES2(...), error_offset 0x2000");
}

TEST(ConversionResultInterpretation, OffsetLeftUntouchedIsNotReported) {
  // AMDESE's RFC v2: "error_offset is reserved for unrecoverable errors, and not set for EAGAIN".
  auto r = interpret_conversion(ConversionAbi::GmemConvertIoctls, req(0, 4 * kPs, true), EAGAIN,
                                kErrorOffsetUnset, "KVM_GMEM_CONVERT_PRIVATE(...)");
  EXPECT_EQ(r.offset_report, OffsetReport::NotReported);
  EXPECT_NE(r.describe().find("error_offset not reported"), std::string::npos) << r.describe();
  auto attrs2 = interpret_conversion(ConversionAbi::GmemAttributesIoctl, req(0, kPs, true), ENOMEM,
                                 kErrorOffsetUnset, "op");
  EXPECT_EQ(attrs2.offset_report, OffsetReport::NotReported);
}

TEST(ConversionResultInterpretation, OffsetOutsideTheRangeIsFlagged) {
  auto r = interpret_conversion(ConversionAbi::GmemAttributesIoctl, req(4 * kPs, 2 * kPs, true), EAGAIN, 0, "op");
  EXPECT_EQ(r.offset_report, OffsetReport::OutOfRange);
  EXPECT_EQ(r.error_offset, 0u);
  auto end = interpret_conversion(ConversionAbi::GmemConvertIoctls, req(4 * kPs, 2 * kPs, true), EAGAIN, 6 * kPs, "op");
  EXPECT_EQ(end.offset_report, OffsetReport::OutOfRange) << "the end is exclusive";
}

TEST(ConversionResultInterpretation, PerVmAttributesHaveNoOffsetInTheAbi) {
  auto r = interpret_conversion(ConversionAbi::PerVmAttributes, req(0, kPs, true), EINVAL, 0, "op");
  EXPECT_EQ(r.offset_report, OffsetReport::NotInAbi);
  EXPECT_NE(r.describe().find("no error offset"), std::string::npos);
}

TEST(ConversionResultInterpretation, HypercallAnswer) {
  ConversionResult r;
  EXPECT_EQ(map_gpa_range_ret(r), 0u);
  r.err = EAGAIN;
  EXPECT_EQ(map_gpa_range_ret(r), static_cast<uint64_t>(EAGAIN)) << "retry after unpinning";
  for (int e : {EINVAL, ENOMEM, EFAULT, EOPNOTSUPP}) {
    r.err = e;
    EXPECT_EQ(map_gpa_range_ret(r), static_cast<uint64_t>(EINVAL)) << errno_name(e);
  }
}

// --- guest requests -------------------------------------------------------------------------------
ExitInfo hypercall_exit(uint64_t nr, uint64_t gpa, uint64_t npages, uint64_t attrs) {
  ExitInfo e;
  e.kind = ExitKind::Hypercall;
  e.reason = uapi::kExitHypercall;
  e.hypercall.nr = nr;
  e.hypercall.args[0] = gpa;
  e.hypercall.args[1] = npages;
  e.hypercall.args[2] = attrs;
  e.hypercall.flags = uapi::kExitHypercallLongMode;
  return e;
}

TEST(GuestConversionDecode, MapGpaRange) {
  auto r = decode_map_gpa_range(hypercall_exit(12, 0x100200000, 512,
                                               uapi::kMapGpaRangeEncrypted | uapi::kMapGpaRangePageSz2M));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->source, GuestConversionRequest::Source::MapGpaRange);
  EXPECT_EQ(r->gpa, 0x100200000u);
  EXPECT_EQ(r->npages, 512u);
  EXPECT_EQ(r->size, 2u << 20) << "npages counts 4 KiB pages whatever the size hint";
  EXPECT_TRUE(r->to_private);
  EXPECT_EQ(r->exit_flags, uapi::kExitHypercallLongMode);
  auto s = decode_map_gpa_range(hypercall_exit(12, 0x100000000, 1, uapi::kMapGpaRangeDecrypted));
  ASSERT_TRUE(s);
  EXPECT_FALSE(s->to_private);
  EXPECT_EQ(s->size, 4096u);
  EXPECT_FALSE(decode_map_gpa_range(hypercall_exit(11, 0, 1, 0))) << "another hypercall";
  ExitInfo io;
  io.kind = ExitKind::Io;
  EXPECT_FALSE(decode_map_gpa_range(io));
}

TEST(GuestConversionDecode, MemoryFault) {
  ExitInfo e;
  e.kind = ExitKind::MemoryFault;
  e.memory_fault = {uapi::kMemoryExitFlagPrivate, 0xc0000000, 4096};
  auto r = decode_memory_fault(e);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->source, GuestConversionRequest::Source::MemoryFault);
  EXPECT_TRUE(r->to_private) << "a private access asks for private memory";
  EXPECT_EQ(r->gpa, 0xc0000000u);
  EXPECT_EQ(r->size, 4096u);
  e.memory_fault.flags = 0;
  EXPECT_FALSE(decode_memory_fault(e)->to_private);
  EXPECT_FALSE(decode_memory_fault(hypercall_exit(12, 0, 1, 0)));
}

TEST(GuestConversionDecode, GpaMapLookup) {
  GpaMap m;
  m.add(0x100000000, 4 * kPs, 5, 0);
  m.add(0x100004000, 4 * kPs, 5, 4 * kPs);
  m.add(0x200000000, 2 * kPs, 9, 0x10000);
  auto a = m.lookup(0x100001000, 2 * kPs);
  ASSERT_TRUE(a.ok()) << a.error();
  EXPECT_EQ(a->gmem_fd, 5);
  EXPECT_EQ(a->offset, kPs);
  EXPECT_EQ(a->size, 2 * kPs);
  EXPECT_EQ(a->gpa, 0x100001000u);
  auto b = m.lookup(0x200001000, kPs);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(b->gmem_fd, 9);
  EXPECT_EQ(b->offset, 0x11000u);
  EXPECT_EQ(m.lookup(0x100003000, 2 * kPs).err(), EINVAL) << "spans two memslots";
  EXPECT_EQ(m.lookup(0x300000000, kPs).err(), EINVAL) << "not guest_memfd";
}

// Records what it was asked; answers with a fixed errno. A unit-test double for the handler's
// logic, never used to claim conformance.
class RecordingBackend final : public ConversionBackend {
 public:
  RecordingBackend(ConversionAbi abi, int err) : abi_(abi), err_(err) {}
  ConversionAbi abi() const override { return abi_; }
  int issue(const ConversionRequest& r, uint64_t* raw) const override {
    calls.push_back(r);
    *raw = err_ ? r.range.offset : kErrorOffsetUnset;
    return err_;
  }
  std::string describe_request(const ConversionRequest&) const override { return "recorded"; }
  mutable std::vector<ConversionRequest> calls;

 private:
  ConversionAbi abi_;
  int err_;
};

TEST(GuestConversionHandling, InPlaceRequestIsTranslatedToTheFileRange) {
  GpaMap m;
  m.add(0x100000000, 8 * kPs, 5, 0x40000);
  RecordingBackend be(ConversionAbi::GmemAttributesIoctl, 0);
  auto req = decode_map_gpa_range(hypercall_exit(12, 0x100002000, 2, uapi::kMapGpaRangeEncrypted));
  HandledConversion h = handle_guest_conversion(*req, m, &be, "");
  ASSERT_EQ(be.calls.size(), 1u);
  EXPECT_EQ(be.calls[0].range.gmem_fd, 5);
  EXPECT_EQ(be.calls[0].range.offset, 0x42000u);
  EXPECT_EQ(be.calls[0].range.size, 2 * kPs);
  EXPECT_TRUE(be.calls[0].to_private);
  EXPECT_TRUE(h.result.ok());
  EXPECT_EQ(h.ret, 0u);
}

TEST(GuestConversionHandling, PerVmRequestUsesTheGpaEvenAcrossSlots) {
  RecordingBackend be(ConversionAbi::PerVmAttributes, 0);
  auto req = decode_map_gpa_range(hypercall_exit(12, 0x100003000, 2, uapi::kMapGpaRangeDecrypted));
  HandledConversion h = handle_guest_conversion(*req, GpaMap{}, &be, "");
  ASSERT_EQ(be.calls.size(), 1u);
  EXPECT_EQ(be.calls[0].range.gpa, 0x100003000u);
  EXPECT_EQ(be.calls[0].range.size, 2 * kPs);
  EXPECT_FALSE(be.calls[0].to_private);
  EXPECT_EQ(h.ret, 0u);
}

TEST(GuestConversionHandling, FailuresAreAnsweredToTheGuest) {
  GpaMap m;
  m.add(0x100000000, 4 * kPs, 5, 0);
  RecordingBackend pinned(ConversionAbi::GmemAttributesIoctl, EAGAIN);
  auto req = decode_map_gpa_range(hypercall_exit(12, 0x100000000, 4, uapi::kMapGpaRangeEncrypted));
  EXPECT_EQ(handle_guest_conversion(*req, m, &pinned, "").ret, static_cast<uint64_t>(EAGAIN));
  // Outside every binding: refused without calling the back-end.
  RecordingBackend untouched(ConversionAbi::GmemAttributesIoctl, 0);
  auto far = decode_map_gpa_range(hypercall_exit(12, 0x900000000, 1, uapi::kMapGpaRangeEncrypted));
  HandledConversion h = handle_guest_conversion(*far, m, &untouched, "");
  EXPECT_TRUE(untouched.calls.empty());
  EXPECT_EQ(h.result.err, EINVAL);
  EXPECT_EQ(h.ret, static_cast<uint64_t>(EINVAL));
  // No back-end at all (e.g. a 6.1 kernel): the guest gets EINVAL, the log says why.
  HandledConversion none = handle_guest_conversion(*req, m, nullptr, "KVM_CAP_GUEST_MEMFD=0");
  EXPECT_EQ(none.result.err, EOPNOTSUPP);
  EXPECT_EQ(none.ret, static_cast<uint64_t>(EINVAL));
  EXPECT_NE(none.result.op.find("KVM_CAP_GUEST_MEMFD=0"), std::string::npos);
}

TEST(GuestConversionHandling, HandlerCompletesTheHypercallInKvmRun) {
  // Uses a real vCPU's kvm_run page (nothing is run).
  auto kvm = Kvm::open();
  if (!kvm) GTEST_SKIP() << "capability absent: " << kvm.error();
  CVM_ASSIGN_OR_FAIL(auto vm, kvm->create_vm(0));
  CVM_ASSIGN_OR_FAIL(auto vcpu, vm.create_vcpu(0));
  GpaMap m;
  m.add(0x100000000, 4 * kPs, 5, 0);
  RecordingBackend be(ConversionAbi::GmemAttributesIoctl, EAGAIN);
  GuestConversionHandler h(&be, m, "");
  vcpu.run_struct()->hypercall.ret = 12345;
  EXPECT_TRUE(h(0, vcpu, hypercall_exit(12, 0x100000000, 1, uapi::kMapGpaRangeEncrypted)));
  EXPECT_EQ(vcpu.run_struct()->hypercall.ret, static_cast<uint64_t>(EAGAIN));
  ExitInfo other;
  other.kind = ExitKind::Hlt;
  EXPECT_FALSE(h(0, vcpu, other)) << "not a conversion request";
  ExitInfo mf;
  mf.kind = ExitKind::MemoryFault;
  mf.memory_fault = {0, 0x100000000, kPs};
  EXPECT_FALSE(h(0, vcpu, mf)) << "memory faults are handled only when enabled";
  h.handle_memory_faults(true);
  EXPECT_FALSE(h(0, vcpu, mf)) << "a failed implicit conversion must not resume the vCPU";
  RecordingBackend ok(ConversionAbi::GmemAttributesIoctl, 0);
  GuestConversionHandler h2(&ok, m, "");
  h2.handle_memory_faults(true);
  EXPECT_TRUE(h2(0, vcpu, mf));
  ASSERT_EQ(ok.calls.size(), 1u);
  EXPECT_FALSE(ok.calls[0].to_private);
  auto log = h.log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0].request.source, GuestConversionRequest::Source::MapGpaRange);
  EXPECT_EQ(log[1].request.source, GuestConversionRequest::Source::MemoryFault);
}

// --- the probe on this kernel ---------------------------------------------------------------
// The selected back-end converts a page of a guest_memfd bound in a memslot of a fresh VM.
void expect_selected_backend_converts(const Vm& vm, ConversionAbi abi) {
  const uint64_t ps = page_size();
  const uint64_t gpa = 1ULL << 32;
  auto backend = make_conversion_backend(abi, vm);
  CVM_ASSIGN_OR_FAIL(auto gmem, vm.create_guest_memfd(ps, conversion_gmem_flags(abi, true)));
  // Shared memory: the guest_memfd itself (in place) or separate host memory (per-VM).
  CVM_ASSIGN_OR_FAIL(auto shared, backend->in_place() ? gmem.map(ps) : Mapping::anonymous(ps));
  ASSERT_TRUE(testing::ok(vm.bind_gmem(1, gpa, gmem, 0, ps, shared.data())));
  ConversionResult r = backend->set_private(GmemRange{gmem.fd(), 0, ps, gpa});
  EXPECT_TRUE(r.ok()) << conversion_abi_name(abi)
                      << " was selected, but converting a page to private failed: " << r.describe();
}

// Without a back-end: asked again on a fresh VM, the kernel answers each back-end's probe
// requests as recorded in f.
void expect_probe_answers_again(const Vm& vm, const ConversionProbeFacts& f) {
  const uint64_t ps = page_size();
  uint64_t raw = 0;
  if (f.per_vm_noop_errno != -1) {
    auto per_vm = make_conversion_backend(ConversionAbi::PerVmAttributes, vm);
    const ConversionRequest noop{{-1, 0, ps, 0}, false};
    EXPECT_EQ(probe_errno_text(per_vm->issue(noop, &raw)), probe_errno_text(f.per_vm_noop_errno))
        << per_vm->describe_request(noop);
  }
  if (f.guest_memfd_cap <= 0 || !f.gmem_error.empty()) return;
  CVM_ASSIGN_OR_FAIL(auto plain, vm.create_guest_memfd(2 * ps, 0));
  struct InPlace {
    ConversionAbi abi;
    int invalid_errno, noop_errno;
    ConversionRequest invalid;
    uint64_t noop_size;
  };
  ConversionRequest unknown_flag{{plain.fd(), 0, ps, 0}, false};
  unknown_flag.extra_flags = 1ULL << 63;
  const ConversionRequest unaligned{{plain.fd(), 1, ps, 0}, true};
  const InPlace in_place[] = {
      {ConversionAbi::GmemAttributesIoctl, f.attrs2_invalid_errno, f.attrs2_noop_errno, unknown_flag, 2 * ps},
      {ConversionAbi::GmemConvertIoctls, f.convert_invalid_errno, f.convert_noop_errno, unaligned, ps}};
  for (const InPlace& b : in_place) {
    auto backend = make_conversion_backend(b.abi, vm);
    EXPECT_EQ(probe_errno_text(backend->issue(b.invalid, &raw)), probe_errno_text(b.invalid_errno))
        << backend->describe_request(b.invalid);
    if (b.noop_errno == -1) continue;
    // A file that starts private: setting PRIVATE on it changes nothing.
    CVM_ASSIGN_OR_FAIL(auto g, vm.create_guest_memfd(2 * ps, conversion_gmem_flags(b.abi, false)));
    const ConversionRequest noop{{g.fd(), 0, b.noop_size, 0}, true};
    EXPECT_EQ(probe_errno_text(backend->issue(noop, &raw)), probe_errno_text(b.noop_errno))
        << backend->describe_request(noop);
  }
}

// The probe's record (and its JSON) for every VM type, checked against the kernel through the
// back-ends on a fresh VM of the type: the selected back-end converts a page of a guest_memfd
// bound in a memslot; without one, each back-end's requests get exactly the errnos recorded.
TEST(ConversionProbe, BackendsBehaveAsTheFactsSayForEveryVmType) {
  const Capabilities& c = cached_capabilities();
  if (!c.kvm_available) GTEST_SKIP() << "capability absent: " << c.kvm_error;
  CVM_ASSIGN_OR_FAIL(auto kvm, Kvm::open());
  auto j = c.to_json();
  ASSERT_EQ(j["vm_types"].size(), c.per_type.size());
  for (size_t i = 0; i < c.per_type.size(); i++) {
    const VmTypeCaps& t = c.per_type[i];
    const ConversionProbeFacts& f = t.conversion_facts;
    SCOPED_TRACE(t.name + ": " + t.conversion.reason);
    EXPECT_EQ(f.vm_creatable, t.creatable);
    EXPECT_FALSE(t.conversion.reason.empty());
    const auto& jc = j["vm_types"][i]["conversion"];
    EXPECT_EQ(jc["reason"], t.conversion.reason);
    if (t.conversion.backend)
      EXPECT_EQ(jc["backend"], conversion_abi_name(*t.conversion.backend));
    else
      EXPECT_TRUE(jc["backend"].is_null());
    if (!t.creatable) {
      EXPECT_FALSE(t.conversion.backend) << "no back-end without a VM";
      continue;
    }
    EXPECT_TRUE(jc.contains("facts"));
    if (f.guest_memfd_cap > 0) {
      // Each ioctl probe got an answer: the probe files were created whenever the VM has
      // guest_memfd.
      EXPECT_NE(f.attrs2_invalid_errno, -1);
      EXPECT_NE(f.convert_invalid_errno, -1);
    }
    auto vm = kvm.create_vm(t.type);
    ASSERT_TRUE(vm.ok()) << "the probe created this VM type: " << vm.error();
    if (t.conversion.backend) {
      ASSERT_NO_FATAL_FAILURE(expect_selected_backend_converts(vm.value(), *t.conversion.backend));
    } else {
      ASSERT_NO_FATAL_FAILURE(expect_probe_answers_again(vm.value(), f));
    }
  }
}

}  // namespace
}  // namespace cvm

#include "cvmconf/guest_vm.h"

#include <cstdio>
#include <cstring>

namespace cvm {
namespace {

constexpr size_t kMaxPrints = 1000;


}  // namespace

Result<std::unique_ptr<GuestVm>> GuestVm::create(const Kvm& kvm, GuestVmOptions o) {
  const Platform* p = o.platform ? o.platform : &default_platform();
  if (auto why = p->cannot_run_payloads()) return SysError{0, p->id() + ": " + *why};
  if (o.vcpus < 1 || o.vcpus > static_cast<int>(CVM_MAX_VCPUS))
    return SysError{EINVAL, "GuestVm: vcpus must be 1.." + std::to_string(CVM_MAX_VCPUS)};
  auto image = GuestImage::embedded();
  if (!image) return image.error();

  auto vm = p->create_vm(kvm);
  if (!vm) return vm.error();
  std::unique_ptr<GuestVm> g(new GuestVm(std::move(vm.value()), p));
  g->image_ = image.value();
  g->default_timeout_ = o.default_timeout;

  // Boot region: [0, CVM_BOOT_REGION_SIZE) in slot 0.
  MemslotSpec slot;
  slot.slot = 0;
  slot.gpa = 0;
  slot.size = CVM_BOOT_REGION_SIZE;
  if (o.boot_memory == BootMemory::GuestMemfd) {
    auto gmem = g->vm_.create_guest_memfd(
        CVM_BOOT_REGION_SIZE, uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared);
    if (!gmem) return gmem.error();
    auto map = gmem->map(CVM_BOOT_REGION_SIZE);
    if (!map) return map.error();
    g->boot_map_ = std::move(map.value());
    slot.flags = uapi::kMemGuestMemfd;
    slot.gmem_fd = gmem->fd();
    slot.gmem_offset = 0;
    // The slot's userspace address is the guest_memfd's own mapping (as the v8 conversion
    // selftests do), so the file is the only memory behind the slot. With userspace_addr = 0
    // (upstream test_guest_memfd_guest) this host's PVM backend cannot walk guest page tables
    // and the first instruction fetch triple-faults.
    slot.hva = reinterpret_cast<uint64_t>(g->boot_map_.data());
    g->boot_gmem_ = std::move(gmem.value());
  } else {
    auto map = Mapping::map(CVM_BOOT_REGION_SIZE, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (!map) return map.error();
    g->boot_map_ = std::move(map.value());
    slot.hva = reinterpret_cast<uint64_t>(g->boot_map_.data());
  }
  // Anonymous boot memory also works on kernels without KVM_SET_USER_MEMORY_REGION2 (6.1).
  if (auto r = g->vm_.set_memslot_compat(slot); !r) return r.error();

  if (auto r = p->prepare_boot_region(g->boot_map_.data(), g->boot_map_.size()); !r)
    return r.error();
  std::memcpy(g->boot_map_.data() + CVM_IMAGE_GPA, g->image_.bytes().data(),
              g->image_.bytes().size());

  g->prints_.resize(static_cast<size_t>(o.vcpus));
  for (int i = 0; i < o.vcpus; i++) {
    auto v = g->vm_.create_vcpu(i);
    if (!v) return v.error();
    if (auto r = p->init_vcpu(kvm, g->vm_, v.value()); !r) return r.error();
    g->vcpus_.push_back(std::move(v.value()));
    auto* bi = reinterpret_cast<cvm_boot_info*>(g->boot_map_.data() + CVM_BOOTINFO_GPA +
                                                static_cast<uint64_t>(i) * CVM_BOOTINFO_STRIDE);
    std::memset(bi, 0, sizeof *bi);
    bi->vcpu_id = static_cast<uint32_t>(i);
    bi->nr_vcpus = static_cast<uint32_t>(o.vcpus);
    bi->ucall_gpa = CVM_COMM_GPA + static_cast<uint64_t>(i) * CVM_COMM_STRIDE;
    bi->transport = p->ucall_transport();
    bi->flags = p->boot_flags();
    bi->mmio_doorbell_gpa = CVM_UCALL_MMIO_GPA;
  }
  return g;
}

GuestVm::~GuestVm() = default;

volatile cvm_ucall& GuestVm::ucall_slot(int vcpu) const {
  return *reinterpret_cast<volatile cvm_ucall*>(boot_hva(CVM_COMM_GPA + static_cast<uint64_t>(vcpu) *
                                                                            CVM_COMM_STRIDE));
}

Result<void> GuestVm::start(int i, std::string_view payload, std::vector<uint64_t> args) {
  if (i < 0 || i >= nr_vcpus()) return SysError{EINVAL, "GuestVm::start: no vCPU " + std::to_string(i)};
  auto entry = image_.payload(payload);
  if (!entry) return SysError{ENOENT, "guest image has no payload \"" + std::string(payload) + "\""};
  if (args.size() > CVM_BOOT_ARGS) return SysError{E2BIG, "too many payload arguments"};
  auto* bi = reinterpret_cast<cvm_boot_info*>(boot_hva(CVM_BOOTINFO_GPA +
                                                       static_cast<uint64_t>(i) * CVM_BOOTINFO_STRIDE));
  bi->payload = *entry;
  for (size_t k = 0; k < CVM_BOOT_ARGS; k++) bi->args[k] = k < args.size() ? args[k] : 0;
  bi->magic = CVM_BOOT_MAGIC;
  std::memset(const_cast<cvm_ucall*>(&ucall_slot(i)), 0, sizeof(cvm_ucall));
  uint64_t stack_top = CVM_STACK_GPA + static_cast<uint64_t>(i + 1) * CVM_STACK_SIZE;
  uint64_t bi_gva = CVM_BOOTINFO_GPA + static_cast<uint64_t>(i) * CVM_BOOTINFO_STRIDE;
  return platform_->setup_vcpu(vcpus_[static_cast<size_t>(i)], image_.header().entry, stack_top,
                               bi_gva);
}

UcallEvent GuestVm::run(int i, std::optional<std::chrono::milliseconds> timeout) {
  Vcpu& v = vcpus_.at(static_cast<size_t>(i));
  const auto budget = timeout.value_or(default_timeout_);
  const auto deadline = std::chrono::steady_clock::now() + budget;
  const uint32_t transport = platform_->ucall_transport();
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() < 1) left = std::chrono::milliseconds(1);
    ExitInfo e = v.run(left);
    bool doorbell =
        (transport == CVM_TRANSPORT_PIO && e.kind == ExitKind::Io && e.io.out &&
         e.io.port == CVM_UCALL_PORT) ||
        (transport == CVM_TRANSPORT_MMIO && e.kind == ExitKind::Mmio && e.mmio.write &&
         e.mmio.gpa == CVM_UCALL_MMIO_GPA);
    if (doorbell) {
      UcallEvent ev = decode_ucall(ucall_slot(i));
      if (ev.kind == UcallEvent::Kind::Print) {
        std::lock_guard<std::mutex> g(prints_mu_);
        auto& pr = prints_[static_cast<size_t>(i)];
        if (pr.size() < kMaxPrints) pr.push_back(ev.text);
        continue;
      }
      return ev;
    }
    if (e.kind == ExitKind::Interrupted && v.last_run_timed_out()) {
      UcallEvent ev;
      ev.kind = UcallEvent::Kind::Timeout;
      ev.exit = e;
      ev.text = "vCPU " + std::to_string(i) + " made no exit within " +
                std::to_string(budget.count()) + " ms";
#if defined(__x86_64__)
      if (auto r = v.get_regs()) ev.text += " (stuck at rip " + hex(r->rip) + ")";
#elif defined(__aarch64__)
      if (auto pc = v.pc()) ev.text += " (stuck at pc " + hex(*pc) + ")";
#endif
      return ev;
    }
    if (e.kind == ExitKind::Interrupted && !v.last_run_kicked()) continue;  // spurious EINTR
    if (exit_handler_ && exit_handler_(i, v, e)) continue;
    UcallEvent ev;
    ev.kind = UcallEvent::Kind::Exit;
    ev.exit = e;
#if defined(__x86_64__)
    if (e.kind != ExitKind::Interrupted)
      if (auto r = v.get_regs()) ev.text = "rip " + hex(r->rip);
#elif defined(__aarch64__)
    if (e.kind != ExitKind::Interrupted)
      if (auto pc = v.pc()) ev.text = "pc " + hex(*pc);
#endif
    return ev;
  }
}

void GuestVm::reply(int i, std::initializer_list<uint64_t> values) {
  volatile cvm_ucall& u = ucall_slot(i);
  size_t k = 0;
  for (uint64_t x : values)
    if (k < 4) u.reply[k++] = x;
  for (; k < 4; k++) u.reply[k] = 0;
}

std::vector<std::string> GuestVm::prints(int i) const {
  std::lock_guard<std::mutex> g(prints_mu_);
  return prints_.at(static_cast<size_t>(i));
}

// --- GuestCmd ------------------------------------------------------------------------------------
Result<GuestCmd> GuestCmd::start(GuestVm& vm, int vcpu, std::chrono::milliseconds timeout) {
  if (auto r = vm.start(vcpu, "cmd_loop"); !r) return r.error();
  UcallEvent ev = vm.run(vcpu, timeout);
  if (ev.kind != UcallEvent::Kind::Sync || ev.stage() != CVM_STAGE_CMD)
    return SysError{0, "cmd_loop did not reach its prompt: " + ev.describe()};
  return GuestCmd(vm, vcpu, timeout);
}

GuestCmd::Outcome GuestCmd::op(cvm_cmd_op op, uint64_t a0, uint64_t a1, uint64_t a2) {
  Outcome o;
  vm_->reply(vcpu_, {static_cast<uint64_t>(op), a0, a1, a2});
  UcallEvent ev = vm_->run(vcpu_, timeout_);
  if (ev.kind == UcallEvent::Kind::Sync && ev.stage() == CVM_STAGE_CMD && ev.args.size() >= 3 &&
      ev.args[2] == 0) {
    o.ok = true;
    o.value = ev.args[1];
    return o;
  }
  if (ev.kind == UcallEvent::Kind::Sync && ev.stage() == CVM_STAGE_CMD) {
    ev.kind = UcallEvent::Kind::Error;
    ev.text = "cmd_loop rejected opcode " + std::to_string(op);
  }
  o.event = std::move(ev);
  return o;
}

GuestCmd::Outcome GuestCmd::exit() {
  Outcome o;
  vm_->reply(vcpu_, {CVM_CMD_EXIT});
  UcallEvent ev = vm_->run(vcpu_, timeout_);
  o.ok = ev.kind == UcallEvent::Kind::Done;
  o.event = std::move(ev);
  return o;
}

}  // namespace cvm

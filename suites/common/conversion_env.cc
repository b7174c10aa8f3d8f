#include "conversion_env.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "cvmconf/fault.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/mm.h"
#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint32_t kFirstSlot = 1;  // slot 0 is the boot region

}  // namespace

Result<std::unique_ptr<ConversionEnv>> ConversionEnv::create(const Kvm& kvm,
                                                             const Platform& platform,
                                                             ConversionAbi abi,
                                                             ConversionEnvOptions o) {
  const uint64_t ps = page_size();
  if (o.pages == 0 || o.slots < 1 || o.pages % static_cast<uint64_t>(o.slots))
    return SysError{EINVAL, "ConversionEnv: pages must be a non-zero multiple of slots"};
  std::unique_ptr<ConversionEnv> e(new ConversionEnv());
  e->opts_ = o;
  if (o.guest || o.guest_requests) {
    GuestVmOptions go;
    go.platform = &platform;
    go.vcpus = o.vcpus;
    auto g = GuestVm::create(kvm, go);
    if (!g) return g.error();
    e->guest_ = std::move(g.value());
  } else {
    auto v = platform.create_vm(kvm);
    if (!v) return v.error();
    e->own_vm_.emplace(std::move(v.value()));
  }
  Vm& vm = e->vm();
  e->backend_ = make_conversion_backend(abi, vm);

  const uint64_t size = o.pages * ps;
  auto g = vm.create_guest_memfd(size, e->backend_->gmem_flags(o.init_shared));
  if (!g) return g.error();
  e->gmem_ = std::move(g.value());
  if (e->in_place()) {
    auto m = e->gmem_.map(size);
    if (!m) return m.error();
    e->shared_ = std::move(m.value());
  } else {
    auto m = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (!m) return m.error();
    e->shared_ = std::move(m.value());
  }
  const uint64_t per_slot = size / static_cast<uint64_t>(o.slots);
  for (int k = 0; k < o.slots; k++) {
    const uint64_t off = static_cast<uint64_t>(k) * per_slot;
    auto r = vm.bind_gmem(kFirstSlot + static_cast<uint32_t>(k), CVM_TEST_MEM_GPA + off, e->gmem_,
                          off, per_slot, e->shared_.data() + off);
    if (!r) return r.error();
  }
  if (abi == ConversionAbi::PerVmAttributes && !o.init_shared && !o.raw_initial_state) {
    ConversionResult r = e->to_private(0, o.pages);
    if (!r.ok()) return SysError{r.err, "making the per-VM range private: " + r.describe()};
  }
  if (o.guest_requests) {
    if (auto r = enable_map_gpa_range_exit(vm); !r) return r.error();
    e->handler_ = std::make_unique<GuestConversionHandler>(e->backend_.get(), e->gpa_map(), "");
    GuestConversionHandler* h = e->handler_.get();
    e->guest_->set_exit_handler([h](int i, Vcpu& v, const ExitInfo& x) { return (*h)(i, v, x); });
  }
  if (e->guest_) {
    auto c = GuestCmd::start(*e->guest_, 0);
    if (!c) return c.error();
    e->cmd_.emplace(std::move(c.value()));
  }
  return e;
}

ConversionEnv::~ConversionEnv() {
  if (cmd_) (void)cmd_->exit();
}

std::string ConversionEnv::describe() const {
  return std::string(conversion_abi_name(backend_->abi())) + ", " + std::to_string(opts_.pages) +
         " pages, init " + (opts_.init_shared ? "shared" : "private") + ", " +
         std::to_string(opts_.slots) + " memslot(s)" + (guest_ ? ", guest" : "");
}

uint64_t ConversionEnv::gpa(uint64_t page, uint64_t off) const {
  return CVM_TEST_MEM_GPA + page * page_size() + off;
}
uint64_t ConversionEnv::offset(uint64_t page) const { return page * page_size(); }
uint8_t* ConversionEnv::shared_hva(uint64_t page, uint64_t off) const {
  return shared_.data() + page * page_size() + off;
}
GmemRange ConversionEnv::range(uint64_t first, uint64_t n) const {
  return GmemRange{gmem_.fd(), offset(first), n * page_size(), gpa(first)};
}
GpaMap ConversionEnv::gpa_map() const {
  GpaMap m;
  const uint64_t per_slot = opts_.pages * page_size() / static_cast<uint64_t>(opts_.slots);
  for (int k = 0; k < opts_.slots; k++)
    m.add(CVM_TEST_MEM_GPA + static_cast<uint64_t>(k) * per_slot, per_slot, gmem_.fd(),
          static_cast<uint64_t>(k) * per_slot);
  return m;
}

ConversionResult ConversionEnv::to_private(uint64_t first, uint64_t n) const {
  return backend_->set_private(range(first, n));
}
ConversionResult ConversionEnv::to_shared(uint64_t first, uint64_t n) const {
  return backend_->set_shared(range(first, n));
}

Result<PageState> ConversionEnv::state(uint64_t page) {
  if (page >= opts_.pages) return SysError{EINVAL, "no page " + std::to_string(page)};
  if (in_place()) {
    FaultResult r = probe_read(shared_hva(page));
    if (!r.faulted()) return PageState::Shared;
    if (r.sigbus()) return PageState::Private;
    return SysError{0, "host read of page " + std::to_string(page) + ": " + r.describe()};
  }
  if (!cmd_)
    return SysError{0, "the per-VM back-end's page state is only visible to a guest"};
  // A marker in the last word of the shared copy: the guest sees it iff it maps the shared copy.
  const uint64_t off = page_size() - 8;
  auto* word = reinterpret_cast<volatile uint64_t*>(shared_hva(page, off));
  const uint64_t old = *word;
  const uint64_t marker = 0x5eed000000000000ULL | (++marker_seq_ << 16) | page;
  *word = marker;
  GuestCmd::Outcome o = cmd_->read64(gpa(page, off));
  *word = old;
  if (!o.ok) return SysError{0, "guest read of page " + std::to_string(page) + ": " + o.event.describe()};
  return o.value == marker ? PageState::Shared : PageState::Private;
}

std::string ConversionEnv::states() {
  std::string s;
  for (uint64_t p = 0; p < opts_.pages; p++) {
    auto st = state(p);
    if (!st) return "error: " + st.error().message();
    s += state_char(st.value());
  }
  return s;
}

std::string ConversionEnv::host_fill(uint64_t page, uint8_t v) {
  FaultResult r = probe_write(shared_hva(page), v, page_size());
  return r.faulted() ? "host write of page " + std::to_string(page) + ": " + r.describe() : "";
}

std::string ConversionEnv::host_check(uint64_t page, uint8_t v) {
  std::vector<uint8_t> buf(page_size());
  FaultResult r = probe_read(shared_hva(page), page_size(), buf.data());
  if (r.faulted()) return "host read of page " + std::to_string(page) + ": " + r.describe();
  for (size_t i = 0; i < buf.size(); i++)
    if (buf[i] != v)
      return "page " + std::to_string(page) + " byte " + std::to_string(i) + " is " +
             hex(buf[i]) + ", expected " + hex(v);
  return "";
}

std::string ConversionEnv::guest_fill(uint64_t page, uint8_t v) {
  if (!cmd_) return "no guest";
  auto o = cmd_->fill8(gpa(page), page_size(), v);
  return o.ok ? "" : "guest fill of page " + std::to_string(page) + ": " + o.event.describe();
}

std::string ConversionEnv::guest_check(uint64_t page, uint8_t v) {
  if (!cmd_) return "no guest";
  auto o = cmd_->check8(gpa(page), page_size(), v);
  if (!o.ok) return "guest read of page " + std::to_string(page) + ": " + o.event.describe();
  if (o.value != UINT64_MAX)
    return "guest sees page " + std::to_string(page) + " differ from " + hex(v) + " at byte " +
           std::to_string(o.value);
  return "";
}

ConversionSelection probed_conversion_selection(const Platform& p) {
  if (const VmTypeCaps* caps = cached_capabilities().vm(p.vm_type())) return caps->conversion;
  ConversionSelection none;
  none.reason = "VM type " + p.id() + " was not probed";
  return none;
}

bool conversion_env_needs_guest(ConversionAbi abi) {
  return abi == ConversionAbi::PerVmAttributes;
}

std::optional<std::string> conversion_env_unsupported(ConversionAbi abi, const Platform& p,
                                                      const VmTypeCaps& caps,
                                                      ConversionEnvOptions& o) {
  if (conversion_env_needs_guest(abi)) {
    if (auto why = payloads_unsupported(p))
      return std::string(testing::kNotApplicable) +
             "the per-vm-attributes back-end's page state is visible only to a guest, and " + *why;
    o.guest = true;
  }
  if (o.guest || o.guest_requests)
    if (auto why = payloads_unsupported(p)) return why;
  if (abi == ConversionAbi::GmemAttributesIoctl)
    if (auto why = gmem_flags_unsupported(p, caps, conversion_gmem_flags(abi, o.init_shared)))
      return why;
  return std::nullopt;
}

Result<std::unique_ptr<ConversionEnv>> new_conversion_env(const Kvm& kvm, const Platform& p,
                                                          ConversionAbi abi,
                                                          ConversionEnvOptions o) {
  if (conversion_env_needs_guest(abi)) o.guest = true;
  auto e = ConversionEnv::create(kvm, p, abi, o);
  if (!e) {
    // A harness-level error (errno 0): its message is the harness_error text alone.
    return SysError{0, testing::harness_error("setting up " + std::string(conversion_abi_name(abi)) +
                                                  " conversion memory on " + p.id(),
                                              e.error())};
  }
  return e;
}

void make_conversion_env(std::unique_ptr<ConversionEnv>& env, const Kvm& kvm, const Platform& p,
                         const VmTypeCaps& caps, ConversionAbi abi, ConversionEnvOptions o) {
  env.reset();
  CVM_SKIP_IF(conversion_env_unsupported(abi, p, caps, o));
  auto e = new_conversion_env(kvm, p, abi, o);
  if (!e) {
    ADD_FAILURE() << e.error();
    return;
  }
  env = std::move(e.value());
}

void reenter_conversion_memory_faults(GuestVm& vm, uint64_t lo, uint64_t hi,
                                      std::shared_ptr<std::atomic<uint64_t>> count) {
  vm.set_exit_handler([lo, hi, count](int, Vcpu&, const ExitInfo& e) {
    if (e.kind != ExitKind::MemoryFault || e.memory_fault.gpa < lo || e.memory_fault.gpa >= hi)
      return false;
    count->fetch_add(1);
    return true;
  });
}

bool content_preserved_expected(ConversionAbi abi, const Platform& p) {
  return abi == ConversionAbi::GmemAttributesIoctl && p.id() == "x86-sw-protected";
}

Result<bool> pte_present(const void* addr) {
  auto e = pagemap_entry(addr);
  if (!e) return e.error();
  return e->present;
}

// --- MAP_GPA_RANGE exit probe -------------------------------------------------------------------
namespace {

HypercallExitProbe run_hypercall_probe(const Kvm& kvm, const Platform& platform) {
  using namespace std::chrono_literals;
  constexpr auto kBudget = 1000ms;
  HypercallExitProbe p;
  GuestVmOptions o;
  o.platform = &platform;
  auto g = GuestVm::create(kvm, o);
  if (!g) {
    p.failure = "cannot boot the hypercall probe guest: " + g.error().message();
    return p;
  }
  GuestVm& vm = *g.value();
  if (auto r = enable_map_gpa_range_exit(vm.vm()); !r) {
    p.skip_reason = "capability absent: KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL, 1 << "
                    "KVM_HC_MAP_GPA_RANGE) failed on " + platform.id() + ": " + r.error().message();
    return p;
  }
  bool exited = false;
  vm.set_exit_handler([&](int, Vcpu& v, const ExitInfo& e) {
    if (e.kind != ExitKind::Hypercall || e.hypercall.nr != uapi::kHcMapGpaRange) return false;
    exited = true;
    v.run_struct()->hypercall.ret = 0;
    return true;
  });
  if (auto r = vm.start(0, "map_gpa_range", {CVM_TEST_MEM_GPA, 1, uapi::kMapGpaRangeEncrypted}); !r) {
    p.failure = "cannot start the hypercall probe payload: " + r.error().message();
    return p;
  }
  UcallEvent ev = vm.run(0, kBudget);
  if (exited) {
    p.exits = true;
    p.observation = "a guest KVM_HC_MAP_GPA_RANGE exits to userspace as KVM_EXIT_HYPERCALL";
    if (ev.kind != UcallEvent::Kind::Sync)
      p.failure = "after the hypercall exit was completed the guest did not continue: " +
                  ev.describe();
    return p;
  }
  if (ev.kind == UcallEvent::Kind::Timeout) {
    std::string where = "the hypercall";
#if defined(__x86_64__)
    if (auto regs = vm.vcpu(0).get_regs(); regs && regs->rip + 3 < CVM_BOOT_REGION_SIZE) {
      const uint8_t* ins = vm.boot_hva(regs->rip);
      if (ins[0] == 0x0f && ins[1] == 0x01 && ins[2] == 0xc1) where = "the vmcall";
      else if (ins[0] == 0x0f && ins[1] == 0x01 && ins[2] == 0xd9) where = "the vmmcall";
      else where = "rip " + hex(regs->rip) + " (not a hypercall instruction)";
      if (where.rfind("the ", 0) == 0) where += " (rip " + hex(regs->rip) + ")";
    }
#endif
    p.skip_reason = "capability absent: a guest KVM_HC_MAP_GPA_RANGE hypercall does not exit to "
                    "userspace on this kernel (vCPU still at " + where + " after " +
                    std::to_string(kBudget.count()) + " ms)";
    p.observation = p.skip_reason;
    return p;
  }
  if (ev.kind == UcallEvent::Kind::Sync && ev.args.size() >= 2) {
    p.failure = "KVM answered the guest's KVM_HC_MAP_GPA_RANGE itself (returned " +
                hex(ev.args[1]) + ") although the exit to userspace is enabled";
    return p;
  }
  p.failure = "the hypercall probe guest ended unexpectedly: " + ev.describe();
  return p;
}

}  // namespace

const HypercallExitProbe& probe_map_gpa_range_exit(const Kvm& kvm, const Platform& platform) {
  static std::mutex mu;
  static std::map<std::string, HypercallExitProbe> cache;
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(platform.id());
  if (it == cache.end()) it = cache.emplace(platform.id(), run_hypercall_probe(kvm, platform)).first;
  return it->second;
}

}  // namespace cvm::suites

#include "busy_vcpu.h"

#include <chrono>

#include "cvmconf/fault.h"

namespace cvm::suites {
namespace {
constexpr uint64_t kTouchGpa = CVM_SCRATCH_GPA + 0x1000;
constexpr uint64_t kTouchLen = 0x10000;
// The stop flag and the pass counter live in the vCPU's comm page, which a protected guest
// shares back with the host at entry; the memory it touches stays private there.
uint64_t stop_gpa(int vcpu) {
  return CVM_COMM_GPA + static_cast<uint64_t>(vcpu) * CVM_COMM_STRIDE + CVM_COMM_WORDS_OFF;
}
uint64_t passes_gpa(int vcpu) { return stop_gpa(vcpu) + 8; }
}  // namespace

Result<std::unique_ptr<BusyVcpu>> BusyVcpu::start(GuestVm& vm, int vcpu,
                                                  std::chrono::milliseconds timeout) {
  *reinterpret_cast<volatile uint64_t*>(vm.boot_hva(stop_gpa(vcpu))) = 0;
  *reinterpret_cast<volatile uint64_t*>(vm.boot_hva(passes_gpa(vcpu))) = 0;
  if (auto r = vm.start(vcpu, "touch_until_stopped",
                        {kTouchGpa, kTouchLen, stop_gpa(vcpu), passes_gpa(vcpu)});
      !r)
    return r.error();
  std::unique_ptr<BusyVcpu> b(new BusyVcpu(vm, vcpu));
  b->thread_ = std::thread([p = b.get(), timeout] { p->final_ = p->vm_.run(p->vcpu_, timeout); });
  // Wait until the guest is really running its loop.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!b->running() && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return b;
}

bool BusyVcpu::running() const {
  // A protected guest owns the page from its first touch until it shares it back (a moment
  // later, at entry): a read in between faults, which means "not yet".
  uint64_t passes = 0;
  if (probe_read(vm_.boot_hva(passes_gpa(vcpu_)), sizeof passes,
                 reinterpret_cast<uint8_t*>(&passes))
          .faulted())
    return false;
  return passes > 0;
}

UcallEvent BusyVcpu::stop() {
  if (!stopped_) {
    *reinterpret_cast<volatile uint64_t*>(vm_.boot_hva(stop_gpa(vcpu_))) = 1;
    thread_.join();
    stopped_ = true;
  }
  return final_;
}

BusyVcpu::~BusyVcpu() { stop(); }

}  // namespace cvm::suites

#include "busy_vcpu.h"

#include <chrono>

namespace cvm::suites {
namespace {
constexpr uint64_t kStopFlagGpa = CVM_SCRATCH_GPA;  // one word; the loop touches the rest
constexpr uint64_t kTouchGpa = CVM_SCRATCH_GPA + 0x1000;
constexpr uint64_t kTouchLen = 0x10000;
constexpr uint64_t kPassesGpa = CVM_SCRATCH_GPA + 8;
}  // namespace

Result<std::unique_ptr<BusyVcpu>> BusyVcpu::start(GuestVm& vm, int vcpu,
                                                  std::chrono::milliseconds timeout) {
  auto* stop = reinterpret_cast<volatile uint64_t*>(vm.boot_hva(kStopFlagGpa));
  *stop = 0;
  if (auto r = vm.start(vcpu, "touch_until_stopped", {kTouchGpa, kTouchLen, kStopFlagGpa, kPassesGpa}); !r)
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
  return *reinterpret_cast<volatile uint64_t*>(vm_.boot_hva(kPassesGpa)) > 0;
}

UcallEvent BusyVcpu::stop() {
  if (!stopped_) {
    *reinterpret_cast<volatile uint64_t*>(vm_.boot_hva(kStopFlagGpa)) = 1;
    thread_.join();
    stopped_ = true;
  }
  return final_;
}

BusyVcpu::~BusyVcpu() { stop(); }

}  // namespace cvm::suites

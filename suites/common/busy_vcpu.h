// A vCPU kept busy in the guest (payload touch_until_stopped) on its own thread, so that host
// operations can be checked "while a vCPU is running".
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

#include "cvmconf/guest_vm.h"

namespace cvm::suites {

class BusyVcpu {
 public:
  // Starts vCPU `vcpu` of vm touching the scratch area until stop(), for at most `timeout`
  // (the run's watchdog). The GuestVm must outlive it.
  static Result<std::unique_ptr<BusyVcpu>> start(
      GuestVm& vm, int vcpu = 0, std::chrono::milliseconds timeout = std::chrono::seconds(120));
  ~BusyVcpu();
  // Stops the guest loop and joins; returns the guest's final event (SYNC with the pass count).
  UcallEvent stop();
  // True once the guest has made at least one pass over its memory.
  bool running() const;

 private:
  BusyVcpu(GuestVm& vm, int vcpu) : vm_(vm), vcpu_(vcpu) {}
  GuestVm& vm_;
  int vcpu_;
  std::thread thread_;
  UcallEvent final_;
  bool stopped_ = false;
};

}  // namespace cvm::suites

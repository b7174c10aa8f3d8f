// GuestVm: a VM of some platform running payloads from the guest image, with a boot region in
// anonymous memory or in guest_memfd, per-vCPU ucall slots, and a watchdog on every run.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvmconf/guest.h"
#include "cvmconf/kvm.h"
#include "cvmconf/platform.h"
#include "cvmconf_guest/cmd.h"

namespace cvm {

enum class BootMemory {
  Anonymous,   // boot slot backed by anonymous memory (ordinary memslot)
  GuestMemfd,  // boot slot backed only by guest_memfd (MMAP | INIT_SHARED), host view via mmap
};

struct GuestVmOptions {
  const Platform* platform = nullptr;  // nullptr: default_platform()
  int vcpus = 1;
  BootMemory boot_memory = BootMemory::Anonymous;
  // Watchdog for run() when the caller passes no timeout.
  std::chrono::milliseconds default_timeout{10000};
};

class GuestVm {
 public:
  static Result<std::unique_ptr<GuestVm>> create(const Kvm& kvm, GuestVmOptions options = {});
  ~GuestVm();

  Vm& vm() { return vm_; }
  const Platform& platform() const { return *platform_; }
  Vcpu& vcpu(int i) { return vcpus_.at(static_cast<size_t>(i)); }
  int nr_vcpus() const { return static_cast<int>(vcpus_.size()); }
  // Host pointer to guest physical address gpa inside the boot region.
  uint8_t* boot_hva(uint64_t gpa) const { return boot_map_.data() + gpa; }
  // The boot region's guest_memfd (BootMemory::GuestMemfd only).
  const GuestMemfd* boot_gmem() const { return boot_gmem_.valid() ? &boot_gmem_ : nullptr; }

  // Points vCPU i at payload `name` with up to CVM_BOOT_ARGS arguments.
  Result<void> start(int vcpu, std::string_view payload, std::vector<uint64_t> args = {});
  // Runs vCPU i until the guest makes a ucall other than PRINT (prints are kept, see prints()),
  // or exits for another reason that the exit handler does not consume, or the watchdog fires.
  UcallEvent run(int vcpu, std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // Answers the SYNC that vCPU i is waiting in (reply[0..3]), before the next run().
  void reply(int vcpu, std::initializer_list<uint64_t> values);
  std::vector<std::string> prints(int vcpu) const;

  // Handler for vCPU exits that are not ucalls (e.g. KVM_EXIT_HYPERCALL). Return true when the
  // exit was handled and the vCPU should be resumed.
  using ExitHandler = std::function<bool(int vcpu, Vcpu&, const ExitInfo&)>;
  void set_exit_handler(ExitHandler h) { exit_handler_ = std::move(h); }

  volatile cvm_ucall& ucall_slot(int vcpu) const;

 private:
  GuestVm(Vm vm, const Platform* p) : vm_(std::move(vm)), platform_(p) {}
  Vm vm_;
  const Platform* platform_;
  GuestMemfd boot_gmem_;
  Mapping boot_map_;
  std::vector<Vcpu> vcpus_;
  GuestImage image_;
  std::chrono::milliseconds default_timeout_{10000};
  ExitHandler exit_handler_;
  mutable std::mutex prints_mu_;
  std::vector<std::vector<std::string>> prints_;
};

// Client of the "cmd_loop" payload (guests/include/cvmconf_guest/cmd.h): host tests drive guest
// memory accesses one operation at a time. Every operation returns the guest's result, or the
// event that broke the loop (assertion, exception, unexpected exit, timeout).
class GuestCmd {
 public:
  struct Outcome {
    bool ok = false;
    uint64_t value = 0;
    UcallEvent event;  // what happened instead, when !ok
  };
  // Starts cmd_loop on vCPU `vcpu` and runs it to its first command prompt.
  static Result<GuestCmd> start(GuestVm& vm, int vcpu,
                                std::chrono::milliseconds timeout = std::chrono::seconds(10));
  Outcome op(cvm_cmd_op op, uint64_t a0 = 0, uint64_t a1 = 0, uint64_t a2 = 0);
  Outcome read8(uint64_t gva) { return op(CVM_CMD_READ8, gva); }
  Outcome write8(uint64_t gva, uint8_t v) { return op(CVM_CMD_WRITE8, gva, v); }
  Outcome read64(uint64_t gva) { return op(CVM_CMD_READ64, gva); }
  Outcome write64(uint64_t gva, uint64_t v) { return op(CVM_CMD_WRITE64, gva, v); }
  Outcome fill8(uint64_t gva, uint64_t len, uint8_t v) { return op(CVM_CMD_FILL8, gva, len, v); }
  // value = offset of the first byte != v, or UINT64_MAX (-1) when all match.
  Outcome check8(uint64_t gva, uint64_t len, uint8_t v) { return op(CVM_CMD_CHECK8, gva, len, v); }
  Outcome map_gpa_range(uint64_t gpa, uint64_t npages, uint64_t attrs) {
    return op(CVM_CMD_MAP_GPA_RANGE, gpa, npages, attrs);
  }
  Outcome exit();

 private:
  GuestCmd(GuestVm& vm, int vcpu, std::chrono::milliseconds t) : vm_(&vm), vcpu_(vcpu), timeout_(t) {}
  GuestVm* vm_;
  int vcpu_;
  std::chrono::milliseconds timeout_;
};

}  // namespace cvm

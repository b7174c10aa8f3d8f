// The test environment of the conversion suites and of the conversion races: a VM of one
// platform, a guest_memfd created the way the selected back-end needs it, bound at
// CVM_TEST_MEM_GPA in one or more memslots, the host's view of shared memory, optionally a
// payload guest driven through the command loop, and a page state observer that works for every
// back-end:
//   in place (gmem-set-attributes2, gmem-convert-ioctls): a host access through the
//                          guest_memfd mapping: SIGBUS = private;
//   per-vm-attributes      the guest reads a marker the host just wrote into the separate shared
//                          memory: seen = shared (a private page is served from guest_memfd).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include <gtest/gtest.h>

#include "cvmconf/conversion.h"
#include "cvmconf/guest_vm.h"
#include "cvmconf/kvm.h"
#include "cvmconf/platform.h"
#include "cvmconf/probe.h"

namespace cvm::suites {

enum class PageState { Shared, Private };
inline char state_char(PageState s) { return s == PageState::Shared ? 'S' : 'P'; }

struct ConversionEnvOptions {
  uint64_t pages = 4;
  bool init_shared = true;
  // Per-VM attributes have no per-file initial state: unless raw_initial_state is set, a
  // per-VM environment that should start private is made private with one conversion.
  bool raw_initial_state = false;
  bool guest = false;    // boot a payload guest with the command loop on vCPU 0
  int vcpus = 1;
  int slots = 1;         // memslots the file is split across (consecutive GPAs and offsets)
  bool guest_requests = false;  // answer the guest's MAP_GPA_RANGE through the back-end
};

class ConversionEnv {
 public:
  static Result<std::unique_ptr<ConversionEnv>> create(const Kvm& kvm, const Platform& platform,
                                                       ConversionAbi abi, ConversionEnvOptions o);
  ~ConversionEnv();

  const ConversionBackend& backend() const { return *backend_; }
  ConversionAbi abi() const { return backend_->abi(); }
  bool in_place() const { return backend_->in_place(); }
  uint64_t pages() const { return opts_.pages; }
  const ConversionEnvOptions& options() const { return opts_; }
  Vm& vm() { return guest_ ? guest_->vm() : *own_vm_; }
  GuestMemfd& gmem() { return gmem_; }
  GuestVm* guest() { return guest_.get(); }
  GuestCmd* cmd() { return cmd_ ? &*cmd_ : nullptr; }
  GuestConversionHandler* requests() { return handler_.get(); }
  // "gmem-set-attributes2, 4 pages, init shared, 1 memslot, guest"
  std::string describe() const;
  // For tests of the harness only (never in a conformance test): replaces the back-end by a
  // test double, e.g. one that emulates conversion on a kernel without it, so the machinery
  // around conversions can be exercised (and shown to catch a broken back-end) anywhere.
  void replace_backend_for_harness_test(std::unique_ptr<ConversionBackend> b) {
    backend_ = std::move(b);
  }

  uint64_t gpa(uint64_t page, uint64_t off = 0) const;
  uint64_t offset(uint64_t page) const;  // in the guest_memfd
  // Host address of the page's shared memory: the guest_memfd mapping (in place; SIGBUS while
  // private) or the separate shared memory (per-VM; always accessible, never the private copy).
  uint8_t* shared_hva(uint64_t page, uint64_t off = 0) const;
  GmemRange range(uint64_t first, uint64_t n) const;
  GpaMap gpa_map() const;

  ConversionResult to_private(uint64_t first, uint64_t n = 1) const;
  ConversionResult to_shared(uint64_t first, uint64_t n = 1) const;
  ConversionResult apply(const ConversionRequest& r) const { return backend_->apply(r); }

  // The page's state as observed (see above); an error when it cannot be observed.
  Result<PageState> state(uint64_t page);
  // Every page's state as "SSPS", or "error: ..." (comparable in EXPECT_EQ).
  std::string states();
  // Whether state() can observe pages in this environment (per-VM needs the guest).
  bool can_observe_state() const { return in_place() || cmd_.has_value(); }

  // Host data helpers on shared memory, fault-safe: "" on success, else what went wrong.
  std::string host_fill(uint64_t page, uint8_t v);
  std::string host_check(uint64_t page, uint8_t v);
  // Guest data helpers (need the guest): "" on success.
  std::string guest_fill(uint64_t page, uint8_t v);
  std::string guest_check(uint64_t page, uint8_t v);

 private:
  ConversionEnv() = default;
  ConversionEnvOptions opts_;
  std::unique_ptr<GuestVm> guest_;
  std::optional<Vm> own_vm_;
  std::unique_ptr<ConversionBackend> backend_;
  GuestMemfd gmem_;
  Mapping shared_;  // in place: the guest_memfd mapping; per-VM: separate shared memory
  std::optional<GuestCmd> cmd_;
  std::unique_ptr<GuestConversionHandler> handler_;
  uint64_t marker_seq_ = 0;
};

// The conversion back-end the capability probe chose for p's VM type (cached per process); a
// selection without back-end, saying why, when the VM type was not probed.
ConversionSelection probed_conversion_selection(const Platform& p);

// Whether every environment of the back-end has the payload guest: per-VM attributes, whose
// page state is visible only to a guest.
bool conversion_env_needs_guest(ConversionAbi abi);

// Why an environment with options o cannot be made for abi on platform p (a SKIP reason), or
// nullopt. When the back-end needs the guest (conversion_env_needs_guest), o.guest is set.
std::optional<std::string> conversion_env_unsupported(ConversionAbi abi, const Platform& p,
                                                      const VmTypeCaps& caps,
                                                      ConversionEnvOptions& o);

// The environment for abi on p with options o (o.guest switched on when the back-end needs the
// guest). A failure is the harness's, not the kernel's: it is recorded as testing::harness_error
// and the returned error says so. Check conversion_env_unsupported first.
Result<std::unique_ptr<ConversionEnv>> new_conversion_env(const Kvm& kvm, const Platform& p,
                                                          ConversionAbi abi,
                                                          ConversionEnvOptions o);

// Both in one (for callers that check the result themselves): the environment for abi on p
// (VM type capabilities caps) with options o, in env; leaves env empty after a SKIP
// (conversion_env_unsupported's reason) or a harness error (new_conversion_env failed).
void make_conversion_env(std::unique_ptr<ConversionEnv>& env, const Kvm& kvm, const Platform& p,
                         const VmTypeCaps& caps, ConversionAbi abi, ConversionEnvOptions o);

// Whether the back-end on this platform is expected to keep page contents across conversion:
// gmem-set-attributes2 on SW_PROTECTED VMs (the in-place conversion v8 selftests rely on it).
// Elsewhere contents are unspecified (v8's api.rst text on KVM_SET_MEMORY_ATTRIBUTES2; RFC v4/v5
// made it a content mode; RFC v2 did not promise it) and only recorded.
bool content_preserved_expected(ConversionAbi abi, const Platform& p);

// Asserting form of a conversion that must succeed:
//   ASSERT_TRUE(ok(env->to_private(0)));
// fails with the result's description ("EAGAIN from KVM_SET_MEMORY_ATTRIBUTES2(...), ...").
inline ::testing::AssertionResult ok(const ConversionResult& r) {
  if (r.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << r.describe();
}

// KVM reads a page's attribute when a fault starts and again once it holds the MMU notifier
// sequence; a conversion in between makes KVM_RUN exit with KVM_EXIT_MEMORY_FAULT (EFAULT),
// which the VMM resolves and re-enters (Documentation/virt/kvm/api.rst, KVM_EXIT_MEMORY_FAULT).
// Where the host is the only converter, resolving is re-entering: this installs an exit handler
// on `vm` that re-enters memory-fault exits for GPAs in [lo, hi) and counts them in *count
// (other exits are left to the caller). set_exit_handler(nullptr) removes it.
void reenter_conversion_memory_faults(GuestVm& vm, uint64_t lo, uint64_t hi,
                                      std::shared_ptr<std::atomic<uint64_t>> count);

// /proc/self/pagemap: whether the page containing addr has a present PTE in this process.
Result<bool> pte_present(const void* addr);

// Behaviour probe of the MAP_GPA_RANGE exit for a platform (cached per platform): boots a tiny
// payload that issues the hypercall under a watchdog. skip_reason is set when the exit does not
// happen on this kernel, failure when KVM misbehaved in a way that is a test failure.
struct HypercallExitProbe {
  bool exits = false;
  std::string skip_reason;
  std::string failure;
  std::string observation;  // what happened, for the test's record
};
const HypercallExitProbe& probe_map_gpa_range_exit(const Kvm& kvm, const Platform& platform);

}  // namespace cvm::suites

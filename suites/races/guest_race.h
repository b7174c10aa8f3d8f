// The host's side of the punch_race guest protocol (guests/include/cvmconf_guest/race.h), shared
// by the races that run punch_race on vCPUs (guest_race_test.cc, conversion_race.cc): volatile
// access to the control block, the vCPU runners, the tag check of guest pages read by the host,
// the punch counters the guest watches, and the report of what the guest found.
#pragma once

#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>

#include "cvmconf/guest_vm.h"
#include "cvmconf/result.h"
#include "cvmconf_guest/race.h"
#include "race.h"

namespace cvm::suites {

// The control block is shared with a running guest: every access is volatile.
template <typename T>
T vload(const T& x) {
  return *const_cast<const volatile T*>(&x);
}
template <typename T>
void vstore(T& x, std::type_identity_t<T> v) {
  *const_cast<volatile T*>(&x) = v;
}

// The control block at CVM_SCRATCH_GPA of vm, zeroed.
inline cvm_race_ctl* reset_race_ctl(GuestVm& vm) {
  auto* ctl = reinterpret_cast<cvm_race_ctl*>(vm.boot_hva(CVM_SCRATCH_GPA));
  std::memset(ctl, 0, sizeof *ctl);
  return ctl;
}

// How long a vCPU may run: until 30 s after the race's deadline (it stops when told to).
inline std::chrono::milliseconds guest_run_timeout(const Race& race) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(race.deadline() -
                                                               std::chrono::steady_clock::now()) +
         std::chrono::seconds(30);
}

// Spawns worker "vcpu v", which runs vCPU v (started on punch_race over `pages` pages) until the
// payload reports its final pass (stored in passes; each pass counts `pages` operations). Any
// other exit is a violation. exited is set once the vCPU left its loop, either way.
inline void spawn_guest_runner(Race& race, GuestVm& vm, int v, std::chrono::milliseconds timeout,
                               uint64_t pages, std::atomic<bool>& exited, uint64_t& passes) {
  race.spawn("vcpu " + std::to_string(v), [&race, &vm, v, timeout, pages, &exited,
                                           &passes](RaceWorker& me) {
    UcallEvent ev = vm.run(v, timeout);
    exited = true;
    if (ev.kind == UcallEvent::Kind::Sync && ev.stage() == 1 && ev.args.size() >= 2) {
      passes = ev.args[1];
      me.ops(ev.args[1] * pages);
    } else {
      race.violation(race.iteration(), me.name(), "the guest stopped early: " + ev.describe());
    }
  });
}

// Whether word v of guest page p, read by the host, is 0 or vCPU owner's pattern for p.
inline bool guest_word_ok(uint64_t v, uint64_t owner, uint64_t p) {
  if (v == 0) return true;
  return CVM_RACE_TAG_IS_MARKED(v) && CVM_RACE_TAG_VCPU(v) == owner && CVM_RACE_TAG_PAGE(v) == p &&
         CVM_RACE_TAG_PASS(v) != 0;
}

// Runs punch() (the host's punch of guest memory) between the punch counters the guest reads
// to tell a punched page from a lost write (ctl may be null: no guest). Only one thread
// punches, so the counters are incremented without atomics.
template <typename F>
auto guest_visible_punch(cvm_race_ctl* ctl, F&& punch) {
  if (ctl) vstore(ctl->punch_begin, vload(ctl->punch_begin) + 1);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  auto r = punch();
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ctl) vstore(ctl->punch_end, vload(ctl->punch_end) + 1);
  return r;
}

// Reports the first violation each of vCPUs [first, last] recorded, with the host iteration it
// happened in. why_exact says why a read-back had to be exactly what was just written.
inline void report_guest_violations(Race& race, const cvm_race_ctl& ctl, int first, int last,
                                    const std::string& why_exact) {
  for (int v = first; v <= last; v++) {
    const cvm_race_vcpu& vc = ctl.vcpu[v];
    if (vload(vc.violations) == 0) continue;
    const uint64_t kind = vload(vc.v_kind);
    const std::string expected =
        kind == CVM_RACE_NOT_ZERO ? std::string("0")
        : kind == CVM_RACE_LOST_WRITE || kind == CVM_RACE_STALE
            ? hex(vload(vc.v_expected)) + " (" + why_exact + ")"
            : "0 or its own pattern (now " + hex(vload(vc.v_expected)) + ")";
    race.violation(vload(vc.v_iteration), "vcpu " + std::to_string(v),
                   std::string(cvm_race_violation_name(kind)) + " at gpa " + hex(vload(vc.v_gpa)) +
                       ": read " + hex(vload(vc.v_value)) + ", expected " + expected + " (pass " +
                       std::to_string(vload(vc.v_pass)) + ", " +
                       std::to_string(vload(vc.violations)) + " violation(s) on this vCPU)");
  }
}

}  // namespace cvm::suites

// The conversion races (RACE-006): seeded shared <-> private conversions of page ranges through
// the VM's conversion back-end (conversion_env.h), racing host faults from several threads, guest
// vCPUs running the punch_race payload where payloads run, and, for ConversionRace.VsPunch, a hole
// puncher. The driver thread is the only converter; conversion_model.h says which observations
// of a page's state that makes definitive.
//
// Memory layout: pages [0, kHostPages) belong to host writers (page p to writer p % writers) and
// are where the driver's checked iterations work; with a guest, vCPU v (1..kGuestVcpus) runs
// punch_race over pages [v * kHostPages, (v + 1) * kHostPages) (vCPU 0 is the environment's
// command loop, which the per-VM back-end's state observer uses). Host readers read every page.
//
// What the driver does each iteration (seeded):
//  - hot conversion: a random range of any pages to a random state; with an in-place back-end
//    the range is then checked page by page (host access: SIGBUS = private), which is definitive
//    because nobody else converts.
//  - round trip (stale-data check): a frozen host range is made shared, filled with a fresh
//    pattern, read, converted to private and back while everything else races, and read again:
//    each word must be what it was (or 0 after a racing punch, or when the back-end does not
//    promise to keep contents).
//  - punch while converting (ConversionRace.VsPunch): a frozen host range is filled with a pattern,
//    the puncher punches it while the driver converts it (seeded direction), and afterwards it
//    must read zeroes once shared again (in place: through two host mappings, and readers check
//    it for a while; per-VM: the guest reads its private copy, and the host's separate shared
//    memory must be unchanged).
// Invariants checked all the time: every conversion succeeds (EINTR is retried; anything else,
// EAGAIN included since these races hold no pins, is a violation); host accesses SIGBUS only
// when the page may be private at that moment and never complete on a page that is definitely
// private; host reads see 0 or the page's own pattern (never foreign, garbage, or future data;
// zeroes while a punched range is published); writers read back what they wrote (or 0 after a
// punch, or 0 / an older own pattern after a conversion that may change contents); the guest's
// own checks (race.h); at the end every page is in the state it was last set to.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "conversion_env.h"
#include "conversion_model.h"
#include "cvmconf/fault.h"
#include "cvmconf_guest/race.h"
#include "page_model.h"
#include "race.h"

namespace cvm::suites {

struct ConversionRaceOptions {
  bool punch = false;               // a puncher and checked punch-while-converting iterations
  bool contents_preserved = false;  // content_preserved_expected(abi, platform)
  int writers = 2;
  int readers = 2;
  uint64_t guest_stride = 31;  // punch_race checks every guest_stride-th word
};

class ConversionRaceDriver {
 public:
  static constexpr uint64_t kHostPages = 8;
  static constexpr int kGuestVcpus = 2;
  static constexpr uint64_t kMaxRange = 4;

  // The environment the race needs: with a guest (vCPU 0 the command loop, 1..kGuestVcpus
  // punch_race) or host pages only.
  static ConversionEnvOptions env_options(bool guest);

  // Every conversion counted; host accesses by outcome and by whether their window was
  // definitive; what the checked iterations did.
  struct Stats {
    std::atomic<uint64_t> conversions{0}, to_private{0}, to_shared{0}, failures{0},
        eintr_retries{0};
    std::atomic<uint64_t> state_checks{0};
    std::atomic<uint64_t> reads{0}, writes{0};
    std::atomic<uint64_t> definitive_shared{0};   // completed; the page was surely shared
    std::atomic<uint64_t> definitive_private{0};  // SIGBUS; the page was surely private
    std::atomic<uint64_t> window_completed{0};    // completed while a conversion was in flight
    std::atomic<uint64_t> window_sigbus{0};       // SIGBUS while a conversion was in flight
    std::atomic<uint64_t> separate_accesses{0};   // per-VM: completed on the separate memory
    std::atomic<uint64_t> reader_zero_checks{0};
    std::atomic<uint64_t> punches{0}, checked_punches{0}, overlapped_punches{0};
    std::atomic<uint64_t> fills_punched{0};  // checked punches abandoned: the puncher got there first
    // KVM_EXIT_MEMORY_FAULTs of the guest vCPUs that a conversion caused (re-entered)
    std::shared_ptr<std::atomic<uint64_t>> memory_fault_exits =
        std::make_shared<std::atomic<uint64_t>>(0);
    std::atomic<uint64_t> round_trips{0}, zeroed_by_round_trip{0}, hot_conversions{0};
    uint64_t guest_passes[kGuestVcpus + 1] = {};
  };

  ConversionRaceDriver(Race& race, ConversionEnv& env, ConversionRaceOptions o);
  ~ConversionRaceDriver();
  ConversionRaceDriver(const ConversionRaceDriver&) = delete;
  ConversionRaceDriver& operator=(const ConversionRaceDriver&) = delete;

  // Starts the workers, drives the race until its budget is used up, stops and joins the
  // workers and makes the final checks. Violations go to the Race; the caller finishes it.
  void run();
  // Records the counters (and the back-end) as GoogleTest properties.
  void record() const;
  const Stats& stats() const { return stats_; }
  bool has_guest() const { return guest_vcpus_ > 0; }

 private:
  struct Observed {
    FaultResult fault;
    StateSnapshot before, after;
    StateWindow window;
    bool converted_during() const { return after.seq != before.seq || before.in_flight(); }
  };

  bool in_place() const { return env_.in_place(); }
  bool is_host_page(uint64_t p) const { return p < kHostPages; }
  // A seeded range of at most kMaxRange pages inside [lo, hi).
  static Race::Range pick_range(std::mt19937_64& g, uint64_t lo, uint64_t hi) {
    return Race::pick_range(g, lo, hi, kMaxRange);
  }
  std::string pages_text(uint64_t first, uint64_t n) const;

  // Accesses (any thread).
  Observed access(uint64_t p, const std::function<void()>& body);
  // Reads the whole page p through addr (a mapping of it) into out, as one access().
  Observed access_read(uint64_t p, const uint8_t* addr, std::vector<uint64_t>& out);
  bool judge(const Observed& x, uint64_t p, const char* op, const std::string& actor, uint64_t it);
  bool write_page(uint64_t p, const std::string& actor, uint64_t it, bool owner_while_frozen);
  void read_page(uint64_t p, const std::string& actor, uint64_t it);
  bool read_whole(uint64_t p, std::vector<uint64_t>& out, const std::string& actor, uint64_t it);
  bool punch(uint64_t first, uint64_t n, const std::string& actor, uint64_t it);

  // Driver only.
  ConversionResult convert(uint64_t first, uint64_t n, PageState to, uint64_t it,
                           const std::string& why);
  bool bring(uint64_t first, uint64_t n, PageState to, uint64_t it, const std::string& why);
  bool check_states(uint64_t first, uint64_t n, uint64_t it, const std::string& when);
  bool punch_on_puncher(uint64_t first, uint64_t n, std::mt19937_64& rng, uint64_t it,
                        PageState to);
  // The middle of a checked punch of range r, which is in state home: converts it to `to`
  // (from the other state) while the puncher punches it, and brings it back home. False after
  // a violation.
  bool convert_while_punched(const Race::Range& r, PageState to, PageState home,
                             std::mt19937_64& rng, uint64_t it);
  void hot_conversion(std::mt19937_64& rng, uint64_t it);
  void round_trip(std::mt19937_64& rng, uint64_t it);
  void punch_while_converting_in_place(std::mt19937_64& rng, uint64_t it);
  void punch_while_converting_per_vm(std::mt19937_64& rng, uint64_t it);
  void map_second_view();
  // Spawns the writers, readers and (o_.punch) the puncher; returns how many.
  int spawn_host_workers();
  // The puncher: punches the driver's requested ranges, and seeded ranges in between.
  void punch_hot_and_on_request(RaceWorker& me);
  void wait_for_host_workers(int expected);
  // The driver's loop: one seeded kind of iteration after the other until the budget is used.
  void drive();
  enum class Kind { HotConversion = 0, RoundTrip = 1, PunchWhileConverting = 2 };
  Kind iteration_kind(uint64_t draw, uint64_t it) const;
  void start_guest();
  void wait_for_guest_passes();
  void collect_guest_results();
  void final_checks();

  Race& race_;
  ConversionEnv& env_;
  ConversionRaceOptions o_;
  uint64_t pages_;
  uint64_t words_;
  ConversionModel model_;
  // The host pages' bookkeeping (generations, punch counters, freezing, published zeroes);
  // the accesses themselves are this race's (bracketed by access()).
  PageModel host_;
  Mapping second_view_;  // in place: another mapping of the guest_memfd
  Stats stats_;

  // Guest.
  int guest_vcpus_ = 0;
  std::string no_guest_;
  cvm_race_ctl* ctl_ = nullptr;
  std::atomic<bool> guest_exited_[kGuestVcpus + 1] = {};

  // Driver -> puncher hand-off for checked punches.
  std::atomic<uint64_t> punch_req_{0}, punch_done_{0};
  std::atomic<uint64_t> req_first_{0}, req_n_{0};
  std::atomic<uint64_t> conv_started_{0}, conv_finished_{0};
  std::atomic<int> workers_started_{0};
  std::atomic<uint64_t> done_conv_finished_before_{0}, done_conv_started_after_{0};
};

}  // namespace cvm::suites

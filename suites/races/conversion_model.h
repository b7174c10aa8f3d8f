// What the conversion races (RACE-006) know about the shared/private state of each page while one
// thread converts pages and others access them, and which observations of it are definitive.
//
// The converter is a single thread (the race's driver). Around each conversion ioctl it calls
// begin() and end(), which bump the page's sequence counter (odd while a conversion of the page
// is in flight, like a seqlock) and publish the target and, on success, the new state. Every
// kernel-side effect of the conversion lies between begin() and end(): the ioctl is issued after
// begin() and has returned before end().
//
// An accessor takes a snapshot of the page before its access and one after it. From the two,
// state_window() says which states the page can have had at the moment of the access:
//  - no conversion of the page overlapped the access: exactly one state (definitive: SIGBUS
//    must mean private, a completed access must mean shared);
//  - one conversion was in flight, began or ended during the access: its old state and its
//    target (either outcome is allowed; that conversion's window is not definitive);
//  - several conversions overlapped: the states before and after, and what was in flight at
//    either end, as long as at most one conversion began and ended entirely inside the access
//    (its outcome is the state after); with more, any state.
// A failed conversion changes nothing in the model (the documented rollback guarantee: the
// kernel changes no page when it fails); the driver checks the pages afterwards.
//
// Content of host-written pages: word i of page p holds PageModel::tag(p, g) for the generation
// g of its last write, or 0 (never written, punched, or zeroed by a conversion).
// classify_word / describe_word / readback_ok (page_model.h, shared with the punch races) and
// the pure functions below classify what an access read.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "conversion_env.h"
#include "page_model.h"

namespace cvm::suites {

// States a page may have had during an access.
struct StateWindow {
  bool shared = false;
  bool priv = false;
  bool allows(PageState s) const { return s == PageState::Shared ? shared : priv; }
  // Exactly one state: the access is definitive evidence about it.
  bool definitive() const { return shared != priv; }
  // "shared", "private", "shared or private"
  std::string describe() const;
};

// A consistent view of one page's conversion state.
struct StateSnapshot {
  uint64_t seq = 0;                      // even: no conversion of the page in flight
  PageState state = PageState::Shared;   // after the last completed conversion
  PageState target = PageState::Shared;  // the in-flight conversion's target (seq odd)
  bool in_flight() const { return seq & 1; }
};

// Pure: the states page can have had during an access bracketed by `before` and `after`.
StateWindow state_window(const StateSnapshot& before, const StateSnapshot& after);

// The pages' conversion state (thread-safe; one converter, any number of readers).
class ConversionModel {
 public:
  ConversionModel(uint64_t pages, PageState initial);
  uint64_t pages() const { return pages_; }

  // Converter only: a conversion of [first, first + n) to `to` is about to be issued / returned.
  void begin(uint64_t first, uint64_t n, PageState to);
  void end(uint64_t first, uint64_t n, bool ok);

  StateSnapshot snapshot(uint64_t p) const;
  // The state the page was last set to (the converter's view; exact when nothing is in flight).
  PageState state(uint64_t p) const;
  // Whether every page of [first, first + n) was last set to s.
  bool all(uint64_t first, uint64_t n, PageState s) const;
  // Completed conversions of page p (successful or not).
  uint64_t conversions(uint64_t p) const { return st_[p].seq.load() / 2; }

 private:
  struct Page {
    std::atomic<uint64_t> seq{0};
    std::atomic<int> state{0};
    std::atomic<int> target{0};
  };
  uint64_t pages_;
  std::unique_ptr<Page[]> st_;
};

// --- content classification (pure) -------------------------------------------------------------

// Whether a value a reader saw is possible for a page whose current generation is gen_now (0,
// or one of its own generations up to gen_now); when must_be_zero only 0 is.
bool read_value_ok(uint64_t p, uint64_t v, uint64_t gen_now, bool must_be_zero);

// What a page may read after a round trip through private (shared -> private -> shared) with
// nothing written to it meanwhile, when it read `before` word for word before the trip.
struct RoundTripRules {
  bool punched = false;             // a punch overlapped the trip: 0 allowed
  bool contents_preserved = false;  // the back-end keeps contents (else 0 is allowed too)
};
bool round_trip_ok(uint64_t before, uint64_t after, const RoundTripRules& r);

}  // namespace cvm::suites

// What the host-side punch-hole races know about every page of the guest_memfd under test, and
// the checks they make with it. Writers own pages (page p belongs to writer p % writers) and fill
// a page with its tag: word i of page p at generation g holds tag(p, g) for every i. Punches
// are counted per page (begin / end counters), and a "checked" punch first freezes its pages
// (writers stay out), so afterwards they must read as zeroes.
//
// Invariants (each violation is reported to the Race with the iteration that found it):
//  - domain: any word read anywhere is 0 or tag(p, g) of its own page with g <= the page's
//    current generation. Anything else is foreign data (another page's tag) or garbage.
//  - read-back: a writer that filled page p with generation g reads back only tag(p, g), or 0
//    when a punch of p overlapped the fill (a zero without a punch is a lost write; an older
//    generation is stale data).
//  - zero after punch: once a checked punch returned, every view of the punched pages reads
//    zeroes until the pages are unfrozen (stale data after the punch otherwise), both for the
//    driver's verification and for readers that fault the pages concurrently.
//
// The conversion race (conversion_race.h) keeps its host pages' bookkeeping in a PageModel too
// (enter/leave, next_gen, punch_started/punch_finished, freeze, publish_zero) but makes its own
// accesses. The pure functions after the class decode a tag for both.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cvmconf/fault.h"
#include "cvmconf/kvm.h"
#include "race.h"

namespace cvm::suites {

class PageModel {
 public:
  // Bits 63..56: kMark; 55..32: the page; 31..0: the generation (classify_word below decodes it).
  static constexpr uint64_t kMark = 0x5aull << 56;
  static uint64_t tag(uint64_t page, uint64_t gen) { return kMark | (page << 32) | (gen & 0xffffffffu); }

  // `registered` names the threads that enter() pages, for freeze()'s stall report.
  PageModel(Race& race, uint64_t pages, int writers, std::string registered = "a writer");
  uint64_t pages() const { return pages_; }
  // A page owned by writer w, chosen by its schedule stream.
  uint64_t pick_owned(std::mt19937_64& g, int w) const;

  // Writer w fills page p (mapped at page_addr) with a new generation and checks the read-back.
  // Returns false when the page was frozen and left alone.
  bool write_page(uint8_t* page_addr, uint64_t p, const std::string& actor, uint64_t it);
  // Reads page p (mapped at page_addr) and checks the domain and zero-after-punch invariants.
  void read_page(const uint8_t* page_addr, uint64_t p, const std::string& actor, uint64_t it);

  // Punches pages [first, first+n) of gmem with the per-page counters maintained. A failure is
  // a violation (returns false).
  bool punch(const GuestMemfd& gmem, uint64_t first, uint64_t n, const std::string& actor,
             uint64_t it);
  // Allocates pages [first, first+n) (fallocate KEEP_SIZE). It must not change any data; the
  // read-back and domain checks see it if it does. EINTR is retried.
  bool allocate(const GuestMemfd& gmem, uint64_t first, uint64_t n, const std::string& actor,
                uint64_t it);

  // A checked punch: freezes the pages, waits for their writers to leave, punches, verifies
  // through each of `views` (base addresses of mappings of the whole file; nullptr entries are
  // skipped) that the pages read zeroes, publishes "zeroes expected" for hold_us microseconds
  // so concurrent readers check it too, then unfreezes. The verification goes through
  // Race::observe (the stale-value self-test hook). Returns false on a violation.
  bool checked_punch(const GuestMemfd& gmem, uint64_t first, uint64_t n,
                     const std::vector<const uint8_t*>& views, uint64_t hold_us,
                     const std::string& actor, uint64_t it);

  // Declares that frozen pages [first, first+n) must read zeroes for hold_us microseconds (the
  // readers check it), then returns; unfreeze() ends it.
  void publish_zero(uint64_t first, uint64_t n, uint64_t hold_us);
  // Freeze/unfreeze without punching (for races that do other things to frozen pages).
  bool freeze(uint64_t first, uint64_t n, const std::string& actor, uint64_t it);
  void unfreeze(uint64_t first, uint64_t n);
  // The bookkeeping write_page() does, for races that access pages themselves: a thread that
  // writes page p (or otherwise must keep out of frozen pages) enters it first and leaves it
  // after; enter() registers nothing and returns false when the page is frozen. freeze() waits
  // for the entered threads to leave.
  bool enter(uint64_t p);
  void leave(uint64_t p);
  // The generation about to be written to page p (counts it as the page's current one).
  uint64_t next_gen(uint64_t p) { return st_[p].gen.fetch_add(1) + 1; }
  // The punch counters of punch(), for races that issue the punch themselves: punch_started
  // before it, punch_finished once it returned. Pages past pages() are ignored.
  void punch_started(uint64_t first, uint64_t n);
  void punch_finished(uint64_t first, uint64_t n);
  // Checks that page p reads zeroes through view (base of a whole-file mapping).
  bool verify_zero(const uint8_t* view, uint64_t p, const char* view_name, const std::string& actor,
                   uint64_t it);

  // Per-page counters: punches started and finished, the last generation written.
  uint64_t punch_begin(uint64_t p) const { return st_[p].punch_begin.load(); }
  uint64_t punch_end(uint64_t p) const { return st_[p].punch_end.load(); }
  uint64_t gen(uint64_t p) const { return st_[p].gen.load(); }
  // != 0 while publish_zero() says page p must read zeroes.
  uint64_t zero_epoch(uint64_t p) const { return st_[p].zero_epoch.load(); }

  uint64_t punches() const { return punches_.load(); }
  uint64_t checked_punches() const { return checked_.load(); }
  uint64_t zero_checks_by_readers() const { return reader_zero_checks_.load(); }

 private:
  struct PageState {
    std::atomic<uint64_t> punch_begin{0};
    std::atomic<uint64_t> punch_end{0};
    std::atomic<uint64_t> gen{0};
    std::atomic<bool> frozen{false};
    std::atomic<int> in_write{0};
    std::atomic<uint64_t> zero_epoch{0};  // != 0: the page must read zeroes
  };
  // Checks one word against the domain invariant; returns "" or what is wrong.
  static std::string domain_error(uint64_t p, uint64_t v, uint64_t gen_now);

  Race& race_;
  uint64_t pages_;
  int writers_;
  std::string registered_;
  uint64_t words_;
  std::unique_ptr<PageState[]> st_;
  std::atomic<uint64_t> epoch_{0};
  std::atomic<uint64_t> punches_{0}, checked_{0}, reader_zero_checks_{0};
};

// --- page content (pure): decoding PageModel::tag ---------------------------------------------

// What word v read from page p is, given the page's current generation gen_now.
enum class WordKind {
  Zero,
  Current,  // tag(p, g) of the current generation (the value a read-back expects)
  Older,    // tag(p, g') with 0 < g' < current: an older generation of the page itself
  Future,   // tag(p, g') with g' > current or g' == 0: never written
  Foreign,  // another page's tag
  Garbage,  // a value this test never writes
};
WordKind classify_word(uint64_t p, uint64_t v, uint64_t gen_now);
// "0", "0x... (its current pattern)", "foreign data 0x... (the pattern of page 3)", ...
std::string describe_word(uint64_t p, uint64_t v, uint64_t gen_now);

// What a writer may read back right after writing tag(p, gen) to page p.
struct ReadbackRules {
  bool punched = false;                // a punch of the page overlapped the write: 0 allowed
  bool conversion_may_change = false;  // a conversion that may change contents overlapped:
                                       // 0 or an older own generation allowed
};
bool readback_ok(uint64_t p, uint64_t v, uint64_t gen, const ReadbackRules& r);

// Word-wise copies of n words that fault as one access: callers run them under probe_call (or
// a bracket around it, like the conversion race's access()).
void read_words(const uint8_t* addr, uint64_t n, uint64_t* out);
void fill_words(uint8_t* addr, uint64_t n, uint64_t v);
// read_words under probe_call (a fault stops the copy and is returned).
FaultResult probe_read_words(const uint8_t* addr, uint64_t n, uint64_t* out);

}  // namespace cvm::suites

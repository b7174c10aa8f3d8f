// Punch hole racing pins of the same guest_memfd pages (RACE-003): long-term FOLL_PIN pins
// taken and dropped again and again (io_uring fixed buffers, or another long-term provider that
// can read through its pin), and vmsplice page references.
//
// Each iteration the driver fills a seeded range through the mapping, pins it, sometimes punches
// part of it itself, waits a seeded moment and reads the pinned pages through the pin, while a
// puncher thread punches seeded ranges of the file and a reader faults pages of the mapping.
// Invariants:
//  - the pinned buffer keeps the data it had when it was pinned: each pinned page holds the
//    pattern written before the pin (all of it when no punch overlapped the fill and the pin;
//    otherwise only the pattern or zeroes), and a second read through the pin returns exactly
//    what the first one did;
//  - once a punch that began after the pin has returned, the file (the mapping and a second
//    mapping) reads zeroes there, while the pin still holds the old data;
//  - a page no punch touched still shows the pinned data through the mapping;
//  - pinning and unpinning shared pages succeed; no kernel splat (the kmsg listener).
#include "cvmconf/pins.h"
#include "race_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint64_t kPages = 16;
constexpr uint64_t kMaxRange = 4;

struct PinRaceCounters {
  uint64_t pins = 0;
  uint64_t punched_while_pinned = 0;
  uint64_t intact_pages = 0;
};

// Checks a read through the pin of pages [first, first+n): returns false after a violation.
bool check_pinned(Race& race, uint64_t it, const std::vector<uint8_t>& data, uint64_t first,
                  const std::vector<uint64_t>& want, const std::vector<bool>& clean,
                  const char* when) {
  const uint64_t words = page_size() / sizeof(uint64_t);
  const uint64_t* w = reinterpret_cast<const uint64_t*>(data.data());
  for (uint64_t k = 0; k < want.size(); k++) {
    for (uint64_t i = 0; i < words; i++) {
      uint64_t v = w[k * words + i];
      if (v == want[k] || (!clean[k] && v == 0)) continue;
      race.violation(it, "pinner",
                     "the pin of page " + std::to_string(first + k) + " word " + std::to_string(i) +
                         " holds " + hex(v) + " " + when + ", expected " + hex(want[k]) +
                         (clean[k] ? " (filled before the pin, no punch overlapped)" : " or 0"));
      return false;
    }
  }
  return true;
}

// One iteration's pinned range and what the page model said about it.
struct PinnedRange {
  uint64_t first = 0, n = 0;
  std::vector<uint64_t> end_fill;   // punch_end of each page when its fill began
  std::vector<uint64_t> want;       // the tag written into each page before the pin
  std::vector<uint64_t> begin_pin;  // punch_begin of each page once pinned
  std::vector<bool> clean;          // no punch overlapped the fill and the pin
};

// Reads through the pin (twice when the provider can: the two reads must agree; once, checked
// against the fill, when it cannot), punching part of the range from here every other time.
bool check_reads_through_pin(Race& race, uint64_t it, std::mt19937_64& rng, PageModel& model,
                             const GuestMemfd& g, Pin& pin, bool rereadable,
                             const PinnedRange& r) {
  const uint64_t ps = page_size();
  std::vector<uint8_t> first_read;
  if (rereadable) {
    auto a = pin.read_through(0, r.n * ps);
    if (!a) {
      race.violation(it, "pinner", "reading through the pin: " + a.error().message());
      return false;
    }
    first_read = std::move(a.value());
    if (!check_pinned(race, it, first_read, r.first, r.want, r.clean, "right after pinning"))
      return false;
  }
  if (Race::chance(rng, 1, 2)) {
    // Punch part of the pinned range from here too, so every other iteration has a punch
    // while the pin is held, whatever the puncher thread does.
    const Race::Range sub = Race::pick_range(rng, r.first, r.first + r.n, r.n);
    model.punch(g, sub.first, sub.n, "pinner", it);
  }
  Race::jitter(rng, 200);
  auto b = pin.read_through(0, r.n * ps);
  if (!b) {
    race.violation(it, "pinner", "reading through the pin again: " + b.error().message());
    return false;
  }
  if (!rereadable) return check_pinned(race, it, b.value(), r.first, r.want, r.clean, "after the punches");
  if (b.value() == first_read) return true;
  size_t at = 0;
  while (at < first_read.size() && b.value()[at] == first_read[at]) at++;
  race.violation(it, "pinner", "the pinned buffer changed at byte " + std::to_string(at) +
                                   " (page " + std::to_string(r.first + at / ps) +
                                   ") between two reads through the pin");
  return false;
}

// The file after the pin's reads: where a punch that began after the pin has returned, both
// mappings read zeroes; a page no punch touched since its fill still shows the data.
void check_file_after_pin(Race& race, uint64_t it, PageModel& model, const PinnedRange& r,
                          uint8_t* racing, const uint8_t* second, PinRaceCounters& c) {
  const uint64_t ps = page_size();
  const uint64_t words = ps / sizeof(uint64_t);
  for (uint64_t k = 0; k < r.n; k++) {
    const uint64_t p = r.first + k;
    if (model.punch_end(p) >= r.begin_pin[k] + 1) {
      c.punched_while_pinned++;
      if (!model.verify_zero(racing, p, "the racing mapping", "pinner", it) ||
          !model.verify_zero(second, p, "a second mapping", "pinner", it))
        return;
      continue;
    }
    if (!r.clean[k]) continue;
    // Read first, then ask: a punch may start at any moment.
    std::vector<uint64_t> now(words);
    const volatile uint64_t* m = reinterpret_cast<const volatile uint64_t*>(racing + p * ps);
    for (uint64_t i = 0; i < words; i++) now[i] = m[i];
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (model.punch_begin(p) != r.end_fill[k]) continue;
    c.intact_pages++;
    for (uint64_t i = 0; i < words; i++) {
      if (now[i] == r.want[k]) continue;
      race.violation(it, "pinner", "page " + std::to_string(p) + " word " + std::to_string(i) +
                                       " reads " + hex(now[i]) + " through the mapping, expected " +
                                       hex(r.want[k]) + " (no punch touched it)");
      return;
    }
  }
}

PinRaceCounters run_pin_race(Race& race, const PinProvider& provider, bool rereadable,
                             const GuestMemfd& g, uint8_t* racing, const uint8_t* second) {
  const uint64_t ps = page_size();
  PageModel model(race, kPages, 1);  // the driver is the only writer
  PinRaceCounters c;

  race.spawn("puncher", [&](RaceWorker& me) {
    while (!race.stopping()) {
      const uint64_t it = race.iteration();
      const Race::Range r = Race::pick_range(me.rng(), 0, kPages, kMaxRange);
      model.punch(g, r.first, r.n, me.name(), it);
      me.ops();
      Race::jitter(me.rng(), 300);
    }
  });
  race.spawn("reader", [&](RaceWorker& me) {
    while (!race.stopping()) {
      const uint64_t it = race.iteration();
      uint64_t p = Race::pick(me.rng(), 0, kPages - 1);
      model.read_page(racing + p * ps, p, me.name(), it);
      me.ops();
    }
  });

  auto rng = race.rng(0);
  while (race.next_iteration()) {
    const uint64_t it = race.iteration();
    PinnedRange r;
    const Race::Range picked = Race::pick_range(rng, 0, kPages, kMaxRange);
    r.first = picked.first;
    r.n = picked.n;
    for (uint64_t k = 0; k < r.n; k++) r.end_fill.push_back(model.punch_end(r.first + k));
    for (uint64_t k = 0; k < r.n; k++) {
      model.write_page(racing + (r.first + k) * ps, r.first + k, "pinner", it);
      r.want.push_back(PageModel::tag(r.first + k, model.gen(r.first + k)));
    }
    auto pin = provider.pin(racing + r.first * ps, r.n * ps);
    if (!pin) {
      race.violation(it, "pinner", "pinning shared pages [" + std::to_string(r.first) + ", " +
                                       std::to_string(r.first + r.n) + "): " + pin.error().message());
      continue;
    }
    c.pins++;
    race.ops();
    for (uint64_t k = 0; k < r.n; k++) {
      r.begin_pin.push_back(model.punch_begin(r.first + k));
      r.clean.push_back(!(r.begin_pin[k] > r.end_fill[k]));
    }
    if (check_reads_through_pin(race, it, rng, model, g, *pin.value(), rereadable, r))
      check_file_after_pin(race, it, model, r, racing, second, c);
    if (auto rel = pin.value()->release(); !rel)
      race.violation(it, "pinner", "releasing the pin: " + rel.error().message());
  }
  race.join();
  return c;
}

void record_counters(const PinRaceCounters& c, const PinProvider& p) {
  ::testing::Test::RecordProperty("pin_provider", p.name() + ": " + p.kind().describe());
  ::testing::Test::RecordProperty("pins", std::to_string(c.pins));
  ::testing::Test::RecordProperty("punched_while_pinned", std::to_string(c.punched_while_pinned));
  ::testing::Test::RecordProperty("intact_pages", std::to_string(c.intact_pages));
}

CVM_TEST_P(PunchRace, PinsLongTerm, "RACE-003") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  PinRequest req;
  req.longterm = true;
  req.foll_pin = true;
  req.reads_through = true;  // the pinned data is compared through the pin
  auto provider = find_pin_provider(req);
  if (!provider) GTEST_SKIP() << provider.error().op;
  ASSERT_NO_FATAL_FAILURE(map_shared_file(kPages));

  Race race(defaults());
  PinRaceCounters c = run_pin_race(race, *provider.value(), true, gmem_, racing_.data(), second_.data());
  RaceSummary s = race.finish();
  record_counters(c, *provider.value());
  EXPECT_GT(s.iterations, 0u);
  EXPECT_GT(c.pins, 0u) << "no pin was taken";
  if (coverage_expected(s)) {
    EXPECT_GT(c.punched_while_pinned, 0u) << "no punch completed while a pin was held";
  }
}

CVM_TEST_P(PunchRace, Vmsplice, "RACE-003") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  const PinProvider* vmsplice = pin_provider_by_name("vmsplice");
  if (!vmsplice) GTEST_SKIP() << testing::kNotImplemented << "this build has no vmsplice provider";
  CVM_SKIP_IF(vmsplice->unavailable());
  ASSERT_NO_FATAL_FAILURE(map_shared_file(kPages));

  Race race(defaults());
  // vmsplice's reference can be read once (draining the pipe), so the data is compared with
  // what was written before the pin.
  PinRaceCounters c = run_pin_race(race, *vmsplice, false, gmem_, racing_.data(), second_.data());
  RaceSummary s = race.finish();
  record_counters(c, *vmsplice);
  EXPECT_GT(s.iterations, 0u);
  EXPECT_GT(c.pins, 0u) << "no vmsplice reference was taken";
  if (coverage_expected(s)) {
    EXPECT_GT(c.punched_while_pinned, 0u) << "no punch completed while a reference was held";
  }
}

}  // namespace
}  // namespace cvm::suites

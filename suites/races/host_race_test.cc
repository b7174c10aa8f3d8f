// Punch hole racing host-side users of the same guest_memfd pages: faults from several threads
// on one mapping (RACE-001), mappings created and torn down while punching, and fallocate
// re-allocating the punched range (RACE-004). Invariants: page_model.h.
#include <cstring>
#include <thread>

#include "race_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint64_t kPages = 16;
constexpr uint64_t kMaxRange = 4;

// Writers fill their own pages, readers read any page, through the mapping at base.
void spawn_faulters(Race& race, PageModel& model, uint8_t* base, int writers, int readers) {
  const uint64_t ps = page_size();
  for (int w = 0; w < writers; w++)
    race.spawn("writer " + std::to_string(w), [&race, &model, base, w, ps](RaceWorker& me) {
      while (!race.stopping()) {
        uint64_t it = race.iteration();
        uint64_t p = model.pick_owned(me.rng(), w);
        if (model.write_page(base + p * ps, p, me.name(), it)) me.ops();
        Race::jitter(me.rng(), 20);
      }
    });
  for (int r = 0; r < readers; r++)
    race.spawn("reader " + std::to_string(r), [&race, &model, base, ps](RaceWorker& me) {
      while (!race.stopping()) {
        uint64_t it = race.iteration();
        uint64_t p = Race::pick(me.rng(), 0, model.pages() - 1);
        model.read_page(base + p * ps, p, me.name(), it);
        me.ops();
      }
    });
}

void record_model(const PageModel& m) {
  ::testing::Test::RecordProperty("punches", std::to_string(m.punches()));
  ::testing::Test::RecordProperty("checked_punches", std::to_string(m.checked_punches()));
  ::testing::Test::RecordProperty("reader_zero_checks", std::to_string(m.zero_checks_by_readers()));
}

// The driver of the punch races: each iteration a seeded range, punched after a seeded delay,
// in half the iterations (and always the first) by checked_punch(range, hold_us, it), which
// returns false to end the race (hold_us: how long readers check the zeroes,
// PageModel::checked_punch). Returns how many checked punches the model counted.
uint64_t drive_punches(Race& race, PageModel& model, const GuestMemfd& g,
                   const std::function<bool(Race::Range, uint64_t, uint64_t)>& checked_punch) {
  auto rng = race.rng(0);
  while (race.next_iteration()) {
    const uint64_t it = race.iteration();
    Race::Range r = Race::pick_range(rng, 0, kPages, kMaxRange);
    Race::jitter(rng, 50);
    if (it == 0 || Race::chance(rng, 1, 2)) {
      if (!checked_punch(r, Race::pick(rng, 0, 200), it)) break;
    } else {
      model.punch(g, r.first, r.n, "puncher", it);
    }
    race.ops();
  }
  return model.checked_punches();
}

// Ends the race: once no worker touches the pages any more, the whole file punched reads
// zeroes through every view. Records the model's counters; returns the race's summary, which
// must count iterations.
RaceSummary finish_with_final_punch(Race& race, PageModel& model, const GuestMemfd& g,
                                    const std::vector<const uint8_t*>& views) {
  race.join();
  model.checked_punch(g, 0, model.pages(), views, 0, "final punch", race.iteration());
  RaceSummary s = race.finish();
  record_model(model);
  EXPECT_GT(s.iterations, 0u);
  return s;
}

CVM_TEST_P(PunchRace, HostFaults, "RACE-001") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  ASSERT_NO_FATAL_FAILURE(map_shared_file(kPages));

  Race race(defaults());
  PageModel model(race, kPages, 2);
  spawn_faulters(race, model, racing_.data(), 2, 2);
  const uint64_t checked = drive_punches(race, model, gmem_, [&](Race::Range r, uint64_t hold_us, uint64_t it) {
    model.checked_punch(gmem_, r.first, r.n, {racing_.data(), second_.data()}, hold_us,
                        "puncher", it);
    return true;
  });
  const RaceSummary s = finish_with_final_punch(race, model, gmem_, {racing_.data(), second_.data()});
  EXPECT_GT(checked, 0u) << "no checked punch ran: the invariant was not exercised";
  if (coverage_expected(s)) {
    EXPECT_GT(model.zero_checks_by_readers(), 0u) << "no reader checked a punched page";
  }
}

// Mappers map a seeded window of the file, touch it (own pages written, others read) and unmap
// it again, while the driver punches, and verifies checked punches through a fresh mapping it
// creates and tears down each time.
CVM_TEST_P(PunchRace, MmapMunmap, "RACE-004") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  ASSERT_NO_FATAL_FAILURE(map_shared_file(kPages, /*second=*/false));
  const Mapping& steady = racing_;  // stays while the mappers come and go
  const uint64_t ps = page_size();

  Race race(defaults());
  constexpr int kMappers = 2;
  PageModel model(race, kPages, kMappers);
  std::atomic<uint64_t> maps{0};
  for (int w = 0; w < kMappers; w++)
    race.spawn("mapper " + std::to_string(w), [&, w](RaceWorker& me) {
      while (!race.stopping()) {
        const uint64_t it = race.iteration();
        Race::Range r = Race::pick_range(me.rng(), 0, kPages, 6);
        auto m = gmem_.map(r.n * ps, PROT_READ | PROT_WRITE, r.first * ps);
        if (!m) {
          race.violation(it, me.name(), "mmap of pages [" + std::to_string(r.first) + ", " +
                                            std::to_string(r.first + r.n) + "): " + m.error().message());
          break;
        }
        maps.fetch_add(1, std::memory_order_relaxed);
        for (uint64_t p = r.first; p < r.first + r.n; p++) {
          uint8_t* a = m->data() + (p - r.first) * ps;
          if (p % kMappers == static_cast<uint64_t>(w))
            model.write_page(a, p, me.name(), it);
          else
            model.read_page(a, p, me.name(), it);
          me.ops();
        }
        Race::jitter(me.rng(), 30);
        // The Mapping's destructor unmaps, racing the next punch.
      }
    });
  race.spawn("reader", [&](RaceWorker& me) {
    while (!race.stopping()) {
      const uint64_t it = race.iteration();
      uint64_t p = Race::pick(me.rng(), 0, kPages - 1);
      model.read_page(steady.data() + p * ps, p, me.name(), it);
      me.ops();
    }
  });

  const uint64_t checked = drive_punches(race, model, gmem_, [&](Race::Range r, uint64_t hold_us, uint64_t it) {
    auto fresh = gmem_.map(gmem_.size());
    if (!fresh) {
      race.violation(it, "puncher", "mmap of the whole file: " + fresh.error().message());
      return false;
    }
    model.checked_punch(gmem_, r.first, r.n, {steady.data(), fresh->data()}, hold_us,
                        "puncher", it);
    return true;
  });
  const RaceSummary s = finish_with_final_punch(race, model, gmem_, {steady.data()});
  record("mappings", maps.load());
  EXPECT_GT(checked, 0u) << "no checked punch ran";
  if (coverage_expected(s)) {
    EXPECT_GT(maps.load(), 0u) << "no mapper ran";
  }
}

// fallocate re-allocating the range racing the punch: an allocator thread allocates seeded
// ranges all the time, writers and readers fault the pages, and the driver punches, punches and
// re-allocates under a freeze (the pages must read zeroes), or allocates over pages that hold
// data (which must not change them).
CVM_TEST_P(PunchRace, Reallocate, "RACE-004") {
  CVM_SKIP_IF(shared_gmem_unsupported());
  ASSERT_NO_FATAL_FAILURE(map_shared_file(kPages));
  const uint64_t ps = page_size();
  const uint64_t words = ps / sizeof(uint64_t);

  Race race(defaults());
  PageModel model(race, kPages, 2);
  spawn_faulters(race, model, racing_.data(), 2, 1);
  std::atomic<uint64_t> allocations{0};
  race.spawn("allocator", [&](RaceWorker& me) {
    while (!race.stopping()) {
      const uint64_t it = race.iteration();
      Race::Range r = Race::pick_range(me.rng(), 0, kPages, kMaxRange);
      if (model.allocate(gmem_, r.first, r.n, me.name(), it)) allocations.fetch_add(1, std::memory_order_relaxed);
      me.ops();
      Race::jitter(me.rng(), 100);
    }
  });

  uint64_t reallocated = 0, preserved = 0;
  auto rng = race.rng(0);
  while (race.next_iteration()) {
    const uint64_t it = race.iteration();
    Race::Range r = Race::pick_range(rng, 0, kPages, kMaxRange);
    Race::jitter(rng, 50);
    // The first iterations make sure that each checked operation runs at least once.
    switch (it < 2 ? it + 1 : Race::pick(rng, 0, 2)) {
      case 0:
        model.punch(gmem_, r.first, r.n, "puncher", it);
        break;
      case 1: {
        // Punch, re-allocate at once, then the range must read zeroes.
        if (!model.freeze(r.first, r.n, "puncher", it)) break;
        bool ok = model.punch(gmem_, r.first, r.n, "puncher", it) &&
                  model.allocate(gmem_, r.first, r.n, "puncher", it);
        for (uint64_t p = r.first; ok && p < r.first + r.n; p++)
          ok = model.verify_zero(racing_.data(), p, "the racing mapping", "puncher", it) &&
               model.verify_zero(second_.data(), p, "a second mapping", "puncher", it);
        if (ok) model.publish_zero(r.first, r.n, Race::pick(rng, 0, 200));
        model.unfreeze(r.first, r.n);
        reallocated++;
        break;
      }
      case 2: {
        // Allocating over pages that hold data leaves the data alone.
        if (!model.freeze(r.first, r.n, "puncher", it)) break;
        std::vector<uint64_t> before(r.n * words);
        std::memcpy(before.data(), racing_.data() + r.first * ps, r.n * ps);
        if (model.allocate(gmem_, r.first, r.n, "puncher", it)) {
          const volatile uint64_t* now = reinterpret_cast<const volatile uint64_t*>(racing_.data() + r.first * ps);
          for (uint64_t i = 0; i < r.n * words; i++) {
            if (now[i] != before[i]) {
              race.violation(it, "puncher", "page " + std::to_string(r.first + i / words) + " word " +
                                                std::to_string(i % words) + " changed from " +
                                                hex(before[i]) + " to " + hex(now[i]) +
                                                " when the range was allocated");
              break;
            }
          }
        }
        model.unfreeze(r.first, r.n);
        preserved++;
        break;
      }
    }
    race.ops();
  }
  const RaceSummary s = finish_with_final_punch(race, model, gmem_, {racing_.data(), second_.data()});
  record("allocations", allocations.load());
  record("punch_then_allocate", reallocated);
  record("allocate_over_data", preserved);
  if (s.iterations >= 2) {
    EXPECT_GT(reallocated, 0u) << "no punch was followed by a re-allocation";
    EXPECT_GT(preserved, 0u) << "no allocation over data ran";
  }
  if (coverage_expected(s)) {
    EXPECT_GT(allocations.load(), 0u) << "the allocator never ran";
  }
}

}  // namespace
}  // namespace cvm::suites

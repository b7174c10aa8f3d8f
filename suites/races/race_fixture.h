// The fixtures of the race suite, one instance per platform: RaceTest, what every race test
// shares, and PunchRace, hole punching racing faults, mappings, re-allocation, pins and guest
// accesses (RACE-001 .. RACE-004). MemslotRace (RACE-005) and ConversionRace (RACE-006) live
// with their tests.
#pragma once

#include <optional>
#include <string>

#include "cvmconf/uapi.h"
#include "page_model.h"
#include "platform_fixture.h"
#include "race.h"

namespace cvm::suites {

inline constexpr uint64_t kSharedGmem = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;

class RaceTest : public PlatformTest {
 protected:
  // Every race runs this long by default (the stress budget overrides it).
  static RaceDefaults defaults() {
    RaceDefaults d;
    d.duration = std::chrono::milliseconds(400);
    return d;
  }
  // Why host-mapped, initially shared guest_memfd is not available here, or nullopt.
  std::optional<std::string> shared_gmem_unsupported() const {
    return gmem_flags_unsupported(kSharedGmem);
  }
  // A whole-file MAP_SHARED mapping (fails the test on error).
  Mapping map_whole(const GuestMemfd& g) {
    auto m = g.map(g.size());
    EXPECT_TRUE(m.ok()) << m.error();
    return m.ok() ? std::move(m.value()) : Mapping();
  }
  // Whether the race ran long enough that each of its checks must have been exercised (a
  // replay of a few iterations need not have made, say, a checked punch). Records why not.
  static bool coverage_expected(const RaceSummary& s, uint64_t min_iterations = 20) {
    if (s.iterations >= min_iterations && s.duration_ms >= 100) return true;
    ::testing::Test::RecordProperty("coverage_checks", "skipped: only " + std::to_string(s.iterations) +
                                                           " iterations in " + std::to_string(s.duration_ms) + " ms");
    return false;
  }
  // Records a counter of the race as a GoogleTest property.
  static void record(const char* key, uint64_t v) {
    ::testing::Test::RecordProperty(key, std::to_string(v));
  }
};

class PunchRace : public RaceTest {
 protected:
  // The file the host races run on: a host-mapped, initially shared guest_memfd of `pages`
  // pages, mapped whole once (racing_), and a second time (second_) when `second` is set.
  void map_shared_file(uint64_t pages, bool second = true) {
    gmem_ = new_gmem(pages, kSharedGmem);
    ASSERT_TRUE(gmem_.valid());
    racing_ = map_whole(gmem_);
    if (second) second_ = map_whole(gmem_);
    ASSERT_TRUE(racing_.valid() && (!second || second_.valid()));
  }

  GuestMemfd gmem_;
  Mapping racing_, second_;
};

}  // namespace cvm::suites

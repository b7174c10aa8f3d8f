// The fixture of the punch-hole race suite (RACE-001 .. RACE-006), one instance per platform.
#pragma once

#include <optional>
#include <string>

#include "cvmconf/uapi.h"
#include "page_model.h"
#include "platform_fixture.h"
#include "race.h"

namespace cvm::suites {

inline constexpr uint64_t kSharedGmem = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;

class PunchRace : public PlatformTest {
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
  // Records a counter of the race as a GoogleTest property.
  static void record(const char* key, uint64_t v) {
    ::testing::Test::RecordProperty(key, std::to_string(v));
  }
};

}  // namespace cvm::suites

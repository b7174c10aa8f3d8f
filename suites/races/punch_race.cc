// Instantiates the punch-hole race fixture for every platform (tests: host_race_test.cc,
// pin_race_test.cc, guest_race_test.cc).
#include "race_fixture.h"

namespace cvm::suites {
CVM_INSTANTIATE_FOR_PLATFORMS(PunchRace);
}  // namespace cvm::suites

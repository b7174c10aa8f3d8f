// Instantiates the punch-hole race suite for every platform (tests: *_test.cc in this directory).
#include "punch_race.h"

namespace cvm::suites {
CVM_INSTANTIATE_FOR_PLATFORMS(PunchRace);
}  // namespace cvm::suites

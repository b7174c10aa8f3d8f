// Shared pieces of the long-term pin suites: the backings of a private writable (COW) mapping
// (seed 001's list: shared zeropage, memfd, tmpfile, huge zeropage, memfd hugetlb of every size,
// and anonymous memory exclusive / shared after fork / previously shared, base page and THP),
// provider lists, and the properties every result records (provider, backing, gup, pin_kind).
//
// Preparation helpers report through GoogleTest: they GTEST_SKIP with the exact missing
// capability or fail the test; callers return when IsSkipped() || HasFatalFailure().
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cvmconf/fault.h"
#include "cvmconf/fd.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/mm.h"
#include "cvmconf/pins.h"

namespace cvm::suites::pins {

// Huge page sizes to instantiate: the usual sizes of this architecture (so test names are the
// same on every machine of the architecture) plus any other size this kernel offers. A size the
// kernel does not offer SKIPs.
std::vector<size_t> hugetlb_sizes_to_test();

// Non-anonymous backings of a MAP_PRIVATE writable mapping (cow.c's non-anon cases).
enum class NonAnon { SharedZeropage, Memfd, Tmpfile, HugeZeropage, MemfdHugetlb };
struct NonAnonBacking {
  NonAnon kind;
  size_t huge = 0;           // MemfdHugetlb: the huge page size
  std::string name() const;  // "shared_zeropage", "memfd_hugetlb_2048kB"
};
std::vector<NonAnonBacking> non_anon_backings();

// Anonymous memory: what happened to the page before the pin, and its size.
enum class AnonState { Exclusive, SharedAfterFork, PreviouslyShared, ForkedWhilePinned };
const char* anon_state_name(AnonState s);
enum class AnonSize { Base, Thp };
const char* anon_size_name(AnonSize s);
struct AnonBacking {
  AnonState state;
  AnonSize size;
  std::string name() const;  // "shared_after_fork_thp"
};

// A private writable mapping prepared as one backing. Destruction unmaps, closes the file and
// then restores the hugetlb pool, failing the test if nr_hugepages did not go back (pins must be
// released before: declare them after the region).
struct CowRegion {
  CowRegion() = default;
  CowRegion(const CowRegion&) = delete;
  CowRegion& operator=(const CowRegion&) = delete;
  ~CowRegion();

  std::optional<HugetlbPool> pool;
  UniqueFd fd;
  Mapping raw;           // what mmap returned (larger than the region when aligned for THP)
  uint8_t* data = nullptr;
  size_t size = 0;
  uint8_t initial = 0;   // what every byte holds after preparation
  std::string fs;        // file system of the file, if any
  std::string verified;  // how the backing was confirmed, or why it could not be
};

// An unnamed file in dir: O_TMPFILE, else a created-and-unlinked one. -1 with errno on failure.
int unnamed_file_in(const std::string& dir);
// A hugetlb memfd (MFD_CLOEXEC) of huge page size `huge`, after reserving `pages` free pages of
// that size in `pool`. SKIPs (fd stays -1) when the kernel does not offer the size or the pool
// cannot grow; otherwise fd is the memfd, or -1 with errno set when memfd_create failed (the
// caller asserts).
void hugetlb_memfd(size_t huge, size_t pages, std::optional<HugetlbPool>& pool, int& fd);
// Sizes the file to `size` bytes and allocates its blocks (where fs supports fallocate); fails
// the test otherwise.
void size_file(int fd, size_t size, const std::string& fs);

// Prepares a non-anonymous backing (mapped and read-faulted: nothing is written through the
// private mapping, so the page table maps the zeropage or the page-cache page R/O).
void prepare_non_anon(const NonAnonBacking& b, CowRegion& r);
// Prepares anonymous memory filled with r.initial (written: an exclusive anonymous page).
void prepare_anon(AnonSize s, CowRegion& r);

// A child that shares the region (forked while it is mapped) and keeps it until finish();
// finish() makes it check that it still sees `expect` everywhere (COW isolation) and exit.
class Sharer {
 public:
  Sharer() = default;
  Sharer(Sharer&&) = default;
  // Forks now; previously_shared: the child exits at once and is reaped before returning.
  static Sharer fork_child(const CowRegion& r, uint8_t expect, bool previously_shared);
  // Tells the child to check and exit; returns "" or what went wrong.
  std::string finish();
  ~Sharer();

 private:
  std::optional<ChildProcess> child_;
  UniqueFd go_;
  std::string early_;  // result of a previously-shared child
};

// Reads the pinned range through the pin (all of it, or samples of a large one) and returns ""
// when every byte read equals `expect`, else what differed.
std::string check_through_pin(Pin& pin, size_t size, uint8_t expect);
// Offsets and length of the samples checked in a region of `size` bytes.
std::vector<std::pair<size_t, size_t>> sample_ranges(size_t size);
// "" when every byte of [p, p+len) equals v, else the first difference.
std::string check_bytes(const uint8_t* p, size_t len, uint8_t v, const char* where);

// Properties of a result: provider, pin kind, GUP flavour, backing.
void record_case(const PinProvider* provider, const std::string& backing);
// The same when no provider of the wanted kind exists: provider "none", the wanted kind.
void record_wanted(const PinRequest& req, const std::string& backing);
// What a R/O reliability test needs: a R/O long-term FOLL_PIN pin of the given GUP flavour that
// can be read through the pin (gup_test on most kernels).
PinRequest ro_longterm_request(GupFlavour flavour);

// R/W long-term FOLL_PIN pins that can be read through (io_uring, gup_test_rw[_fast]).
PinRequest rw_longterm_request();
// Every provider (available or not) of rw_longterm_request().
std::vector<const PinProvider*> rw_longterm_providers();

// GoogleTest parameter names: only [A-Za-z0-9_].
std::string param_safe(std::string s);

// Restores a hugetlb pool now, failing the test when nr_hugepages does not go back.
void restore_pool_or_fail(std::optional<HugetlbPool>& pool);

}  // namespace cvm::suites::pins

// SKIPs the test when pin_result (of provider.pin()) failed with an error the provider reports as
// a pin it cannot take at all (PinProvider::is_unsupported); does nothing otherwise.
#define CVM_SKIP_IF_PIN_UNSUPPORTED(provider, pin_result)                     \
  do {                                                                        \
    if (!(pin_result).ok() && (provider).is_unsupported((pin_result).err()))  \
      GTEST_SKIP() << ::cvm::testing::kCapabilityAbsent << (provider).name()  \
                   << " cannot take this pin: " << (pin_result).error();      \
  } while (0)

// Shared pieces of the long-term pin suites: the backings of a private writable (COW) mapping
// (seed 001's list: shared zeropage, memfd, tmpfile, huge zeropage, memfd hugetlb of every size,
// and anonymous memory exclusive / shared after fork / previously shared, base page and THP),
// the files a mapping can be backed by, provider lists, the case tables of the reliability suites
// (a backing and who takes the pin) with their fixtures, and the properties every result records
// (provider, backing, gup, pin_kind).
//
// Fixtures prepare in SetUp(): a missing capability SKIPs there with its exact reason, a set-up
// failure fails there, so test bodies only pin and check. Preparation helpers that report through
// GoogleTest (prepare_non_anon, prepare_anon) are called last in a SetUp(), or followed
// by the check GoogleTest documents: if (IsSkipped() || HasFatalFailure()) return;
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "cvmconf/fault.h"
#include "cvmconf/fd.h"
#include "cvmconf/gtest_support.h"
#include "cvmconf/mm.h"
#include "cvmconf/pins.h"

namespace cvm::suites::pins {

// Suites write ASSERT_TRUE(ok(call)) for calls that must succeed (gtest_support.h).
using ::cvm::testing::ok;

// Huge page sizes to instantiate: the usual sizes of this architecture (so test names are the
// same on every machine of the architecture) plus any other size this kernel offers. A size the
// kernel does not offer SKIPs.
std::vector<size_t> hugetlb_sizes_to_test();

// --- files -------------------------------------------------------------------------------------
// A file a mapping can be backed by: a memfd, an unnamed file on /tmp's file system (tmpfile()
// semantics), an unnamed file on a disk file system, a hugetlb memfd of one huge page size.
enum class FileKind { Memfd, Tmpfile, Ext4, Xfs, Btrfs, MemfdHugetlb };
struct FileBacking {
  FileKind kind;
  size_t huge = 0;           // MemfdHugetlb: the huge page size
  std::string name() const;  // "memfd", "tmpfile", "ext4_file", "memfd_hugetlb_2048kB"
};

// An unnamed file in dir: O_TMPFILE, else a created-and-unlinked one. -1 with errno on failure.
int unnamed_file_in(const std::string& dir);

// What open_test_file() made.
struct TestFile {
  std::optional<std::string> absent;  // this machine has no such file: the SKIP reason
  UniqueFd fd;                        // else the file, or invalid when creating it failed ...
  int err = 0;                        // ... with this errno
  std::string dir;                    // the directory of a disk file system's file
};
// Opens a file of backing b; a hugetlb memfd after reserving `huge_pages` free pages of its size
// in `pool` (absent when the kernel does not offer the size or the pool cannot grow).
TestFile open_test_file(const FileBacking& b, size_t huge_pages, std::optional<HugetlbPool>& pool);

// Sizes the file to `size` bytes and allocates its blocks (where its file system supports
// fallocate); the failed call otherwise (a set-up failure: report it with harness_error).
Result<void> size_file(int fd, size_t size);

// --- backings of a private writable mapping ----------------------------------------------------
// Non-anonymous backings of a MAP_PRIVATE writable mapping (cow.c's non-anon cases).
enum class NonAnon { SharedZeropage, HugeZeropage, File };
struct NonAnonBacking {
  NonAnon kind;
  FileBacking file{FileKind::Memfd};  // kind File: memfd, tmpfile or memfd hugetlb
  std::string name() const;           // "shared_zeropage", "memfd_hugetlb_2048kB"
  std::string recorded() const { return name(); }  // the "backing" property
};
std::ostream& operator<<(std::ostream& os, const NonAnonBacking& b);
// shared zeropage, memfd, tmpfile, huge zeropage, memfd hugetlb of every size to test.
std::vector<NonAnonBacking> non_anon_backings();
// shared zeropage, huge zeropage.
std::vector<NonAnonBacking> zeropage_backings();

// Anonymous memory: what happened to the page before the pin, and its size.
enum class AnonState { Exclusive, SharedAfterFork, PreviouslyShared, ForkedWhilePinned };
const char* anon_state_name(AnonState s);
enum class AnonSize { Base, Thp };
const char* anon_size_name(AnonSize s);
struct AnonBacking {
  AnonState state;
  AnonSize size;
  std::string name() const;  // "shared_after_fork_thp"
  std::string recorded() const { return "anon_" + name(); }
  // Another process shares the page when it is pinned (forked before, and alive or gone).
  bool shared_before_pin() const {
    return state == AnonState::SharedAfterFork || state == AnonState::PreviouslyShared;
  }
};
// Every size (base page, THP) in each of `states`, size-major.
std::vector<AnonBacking> anon_backings(const std::vector<AnonState>& states);

// A private writable mapping prepared as one backing. reset() (and destruction) unmaps, closes
// the file and then restores the hugetlb pool, failing the test if nr_hugepages did not go back
// (pins must be released before: declare them after the region).
struct CowRegion {
  CowRegion() = default;
  CowRegion(const CowRegion&) = delete;
  CowRegion& operator=(const CowRegion&) = delete;
  ~CowRegion() { reset(); }
  void reset();

  std::optional<HugetlbPool> pool;
  UniqueFd fd;
  Mapping raw;           // what mmap returned (larger than the region when aligned for THP)
  uint8_t* data = nullptr;
  size_t size = 0;
  uint8_t initial = 0;   // what every byte holds after preparation
  std::string fs;        // file system of the file, if any
  std::string verified;  // how the backing was confirmed, or why it could not be
};

// Prepare a backing in r: SKIP when this machine cannot make it, fail on a set-up error; on
// success record how the backing was confirmed (property "backing_verified").
// A non-anonymous backing is mapped and read-faulted: nothing is written through the private
// mapping, so the page table maps the zeropage or the page-cache page R/O.
void prepare_non_anon(const NonAnonBacking& b, CowRegion& r);
// Anonymous memory is filled with r.initial (written: an exclusive anonymous page).
void prepare_anon(AnonSize s, CowRegion& r);
inline void prepare(const NonAnonBacking& b, CowRegion& r) { prepare_non_anon(b, r); }
inline void prepare(const AnonBacking& b, CowRegion& r) { prepare_anon(b.size, r); }

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

// --- reading back ------------------------------------------------------------------------------
// Reads the pinned range through the pin (all of it, or samples of a large one) and returns ""
// when every byte read equals `expect`, else what differed.
std::string check_through_pin(Pin& pin, size_t size, uint8_t expect);
// Offsets and length of the samples checked in a region of `size` bytes.
std::vector<std::pair<size_t, size_t>> sample_ranges(size_t size);
// "" when every byte of [p, p+len) equals v, else the first difference.
std::string check_bytes(const uint8_t* p, size_t len, uint8_t v, const char* where);

// --- providers ---------------------------------------------------------------------------------
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

// Why `p` cannot take this kind of pin at all, judging by the failure of its pin()
// (PinProvider::is_unsupported): a SKIP reason, or nullopt (pinned, or refused by the kernel).
std::optional<std::string> pin_unsupported(const PinProvider& p,
                                           const Result<std::unique_ptr<Pin>>& pin);

// Who takes the pin of a case: a given provider, or (R/O reliability) the first available R/O
// long-term provider of a GUP flavour.
struct PinChoice {
  const PinProvider* provider = nullptr;
  GupFlavour flavour = GupFlavour::Either;  // without provider: ro_longterm_request(flavour)
  std::string tag() const;       // in test names: the provider's name, "gup", "gup_fast"
  std::string describe() const;  // in value_param: the provider's name, "GUP", "GUP-fast"
};
// R/O long-term pins of GUP and of GUP-fast.
std::vector<PinChoice> ro_longterm_choices();
// Each provider of R/W long-term pins.
std::vector<PinChoice> rw_longterm_choices();

// The provider of a case once chosen, or why there is none here (a SKIP reason). Chosen or not,
// the properties of the result are recorded (record_case / record_wanted).
struct ChosenProvider {
  const PinProvider* provider = nullptr;
  std::string absent;
};
ChosenProvider choose_provider(const PinChoice& pin, const std::string& backing);

// --- case tables of the reliability suites -----------------------------------------------------
template <typename Backing>
struct PinCase {
  Backing backing;
  PinChoice pin;
};
template <typename Backing>
std::ostream& operator<<(std::ostream& os, const PinCase<Backing>& c) {
  return os << c.backing.name() << " " << c.pin.describe();
}
// Every backing pinned by every choice, choice-major.
template <typename Backing>
std::vector<PinCase<Backing>> pin_cases(const std::vector<PinChoice>& pins,
                                        const std::vector<Backing>& backings) {
  std::vector<PinCase<Backing>> v;
  for (const PinChoice& pin : pins)
    for (const Backing& b : backings) v.push_back({b, pin});
  return v;
}

// GoogleTest parameter names: only [A-Za-z0-9_].
std::string param_safe(std::string s);
// Test name suffix of a case: "<backing>_<pin tag>".
struct PinCaseName {
  template <typename Backing>
  std::string operator()(const ::testing::TestParamInfo<PinCase<Backing>>& i) const {
    return param_safe(i.param.backing.name() + "_" + i.param.pin.tag());
  }
};

// A case on a prepared private writable mapping: SetUp() chooses the provider and prepares the
// backing in region_ (either SKIPs when this machine lacks it).
template <typename Backing>
class PinCaseTest : public ::testing::TestWithParam<PinCase<Backing>> {
 protected:
  void SetUp() override {
    const PinCase<Backing>& c = this->GetParam();
    ChosenProvider chosen = choose_provider(c.pin, c.backing.recorded());
    if (!chosen.provider) GTEST_SKIP() << chosen.absent;
    provider_ = chosen.provider;
    prepare(c.backing, region_);
  }
  void TearDown() override { region_.reset(); }

  const PinProvider* provider_ = nullptr;
  CowRegion region_;
};

// Anonymous memory, shared with another process before the pin where the case says so.
class AnonPinTest : public PinCaseTest<AnonBacking> {
 protected:
  void SetUp() override;
  void TearDown() override;
  // Lets the process that shares the page check its own copy; "" when it kept it (or none).
  std::string finish_sharer();

  std::optional<Sharer> sharer_;
};

// The shared or huge zeropage, where the test tells which page is mapped (pagemap/kpageflags).
class ZeropagePinTest : public PinCaseTest<NonAnonBacking> {
 protected:
  void SetUp() override;
};

// Restores a hugetlb pool now, failing the test when nr_hugepages does not go back.
void restore_pool_or_fail(std::optional<HugetlbPool>& pool);

}  // namespace cvm::suites::pins

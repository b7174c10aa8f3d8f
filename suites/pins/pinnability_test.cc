// Long-term pinnability matrix (seed 001; selftests/mm/gup_longterm.c): MAP_SHARED and MAP_PRIVATE
// mappings of memfd, a tmpfile on /tmp's file system, a file on each disk file system present
// (ext4, xfs, btrfs) and hugetlb (memfd, every huge page size), pinned by every provider.
// Expected, as upstream: R/O pins and pins of MAP_PRIVATE mappings work; R/W long-term pins of
// MAP_SHARED mappings work on tmpfs and hugetlbfs and are refused on writeback file systems.
// memfd_secret memory cannot be pinned at all. Requirements: PIN-006, PIN-007.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "pin_cases.h"

namespace cvm::suites::pins {
namespace {

using testing::kCapabilityAbsent;
using testing::kNotApplicable;

constexpr uint8_t kPattern = 0xa5;
// Pinnability is decided per folio: the first 64 KiB of a huge page are enough (and fit an
// undrained pipe for vmsplice).
constexpr size_t kMaxPinLen = 64 << 10;

struct MatrixCase {
  FileBacking file;
  bool shared = false;
  const PinProvider* provider = nullptr;

  std::string name() const {
    return file.name() + (shared ? "_shared_" : "_private_") + provider->name();
  }
};
std::ostream& operator<<(std::ostream& os, const MatrixCase& c) { return os << c.name(); }

// What upstream's rules (gup_longterm) say of a pin of kind k of the case's mapping on fs.
struct Expectation {
  bool applies = true;  // false: no rule for this combination
  bool pinned = false;
  std::string rule;
};
Expectation expected_outcome(const MatrixCase& c, const PinKind& k, const std::string& fs) {
  if (!(c.shared && k.write && k.longterm))
    return {true, true,
            c.shared ? "a R/O pin (or a short-term one) of a shared mapping works"
                     : "pins of a MAP_PRIVATE mapping work"};
  if (fs_longterm_shared_rw_ok(fs))
    return {true, true, "R/W long-term pins of shared " + fs + " mappings work (no writeback)"};
  if (fs_needs_writeback(fs))
    return {true, false,
            "R/W long-term pins of shared mappings on a writeback file system (" + fs +
                ") must be refused"};
  return {false, false, ""};
}

// The case's file, created and sized in SetUp() (SKIP when the backing does not exist here).
class Pinnability : public ::testing::TestWithParam<MatrixCase> {
 protected:
  void SetUp() override {
    const MatrixCase& c = GetParam();
    record_case(c.provider, c.file.name());
    RecordProperty("mapping", c.shared ? "MAP_SHARED" : "MAP_PRIVATE");
    if (auto why = c.provider->unavailable()) GTEST_SKIP() << *why;
    // MAP_PRIVATE hugetlb: writing the mapping copies the page-cache page, a second huge page.
    TestFile f = open_test_file(c.file, c.shared ? 1 : 2, pool_);
    if (f.absent) GTEST_SKIP() << *f.absent;
    if (!f.dir.empty()) RecordProperty("directory", f.dir);
    ASSERT_TRUE(f.fd.valid()) << "creating the " << c.file.name() << " file: " << strerror(f.err);
    fd_ = std::move(f.fd);
    size_ = c.file.kind == FileKind::MemfdHugetlb ? c.file.huge : 4 * page_size();
    CVM_ASSIGN_OR_FAIL(fs_, fs_type_of_fd(fd_.get()));
    RecordProperty("fs", fs_);
    auto sized = size_file(fd_.get(), size_);
    ASSERT_TRUE(sized.ok()) << testing::harness_error("sizing the " + fs_ + " file", sized);
  }

  // Unmaps, closes, and puts the hugetlb pool back (failing the test if it does not go back).
  void TearDown() override {
    map_.reset();
    fd_.reset();
    restore_pool_or_fail(pool_);
  }

  // Members in destruction order: the mapping goes first, the pool is restored last.
  std::optional<HugetlbPool> pool_;
  UniqueFd fd_;
  Mapping map_;
  size_t size_ = 0;
  std::string fs_;
};

CVM_TEST_P(Pinnability, FollowsLongtermRules, "PIN-006") {
  const MatrixCase& c = GetParam();
  const PinProvider& p = *c.provider;
  const Expectation want = expected_outcome(c, p.kind(), fs_);
  if (!want.applies)
    GTEST_SKIP() << kNotApplicable << "no rule for R/W long-term pins of shared mappings on "
                 << fs_;
  RecordProperty("expected", want.pinned ? "pinned" : "refused");

  CVM_ASSIGN_OR_FAIL(map_, Mapping::map(size_, PROT_READ | PROT_WRITE,
                                        c.shared ? MAP_SHARED : MAP_PRIVATE, fd_.get(), 0));
  std::memset(map_.data(), kPattern, size_);  // fully written, so GUP-fast can pin it

  const size_t len = std::min(size_, kMaxPinLen);
  auto pin = p.pin(map_.data(), len);
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  if (pin.ok()) {
    RecordProperty("outcome", "pinned");
    EXPECT_TRUE(want.pinned) << p.name() << " pinned " << c.name() << ", but " << want.rule;
    if (p.kind().reads_through) {
      EXPECT_EQ(check_through_pin(*pin.value(), len, kPattern), "") << "the pin holds other data";
    }
    EXPECT_TRUE(ok(pin.value()->release()));
  } else {
    RecordProperty("outcome", std::string("refused (") + errno_name(pin.err()) + ")");
    ASSERT_TRUE(p.is_refusal(pin.err()))
        << p.name() << " failed with an error that is not a refusal: " << pin.error();
    EXPECT_FALSE(want.pinned) << p.name() << " refused " << c.name() << " (" << pin.error()
                              << "), but " << want.rule;
  }
}

std::vector<MatrixCase> matrix_cases() {
  std::vector<FileBacking> files = {{FileKind::Memfd}, {FileKind::Tmpfile}, {FileKind::Ext4},
                                    {FileKind::Xfs}, {FileKind::Btrfs}};
  for (size_t s : hugetlb_sizes_to_test()) files.push_back({FileKind::MemfdHugetlb, s});
  std::vector<MatrixCase> v;
  for (const FileBacking& f : files)
    for (bool shared : {true, false})
      for (const PinProvider* p : pin_providers()) v.push_back({f, shared, p});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Matrix, Pinnability, ::testing::ValuesIn(matrix_cases()),
                         [](const auto& i) { return param_safe(i.param.name()); });

// --- memfd_secret: never pinnable --------------------------------------------------------------
// memfd_secret memory mapped in SetUp() (SKIP when the kernel has none or it cannot be mapped).
class SecretmemPinnability : public ::testing::TestWithParam<const PinProvider*> {
 protected:
  void SetUp() override {
    const PinProvider& p = *GetParam();
    record_case(&p, "memfd_secret");
    RecordProperty("mapping", "MAP_SHARED");
    if (auto why = p.unavailable()) GTEST_SKIP() << *why;
    auto fd = memfd_secret_create();
    if (!fd.ok())
      GTEST_SKIP() << kCapabilityAbsent << fd.error()
                   << (fd.err() == ENOSYS ? " (CONFIG_SECRETMEM off, or secretmem.enable=0)" : "");
    const size_t size = 4 * page_size();
    ASSERT_EQ(ftruncate(fd->get(), static_cast<off_t>(size)), 0) << strerror(errno);
    auto m = Mapping::map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0);
    if (!m.ok() && (m.err() == ENOMEM || m.err() == EAGAIN || m.err() == EPERM))
      GTEST_SKIP() << kCapabilityAbsent << "mapping memfd_secret memory (it is mlocked; "
                   << "RLIMIT_MEMLOCK?): " << m.error();
    ASSERT_TRUE(m.ok()) << testing::harness_error("mapping memfd_secret memory", m.error());
    secret_ = std::move(m.value());
  }
  void TearDown() override { secret_.reset(); }

  Mapping secret_;
};

CVM_TEST_P(SecretmemPinnability, Refused, "PIN-007") {
  const PinProvider& p = *GetParam();
  std::memset(secret_.data(), kPattern, secret_.size());  // the owner can use it
  auto pin = p.pin(secret_.data(), secret_.size());
  if (auto why = pin_unsupported(p, pin)) GTEST_SKIP() << *why;
  if (pin.ok()) {
    RecordProperty("outcome", "pinned");
    ADD_FAILURE() << p.name() << " pinned memfd_secret memory: secret memory must never be "
                  << "reachable through GUP";
    (void)pin.value()->release();
  } else {
    RecordProperty("outcome", std::string("refused (") + errno_name(pin.err()) + ")");
    EXPECT_TRUE(p.is_refusal(pin.err())) << "a refusal is expected, got " << pin.error();
  }
}

INSTANTIATE_TEST_SUITE_P(Providers, SecretmemPinnability, ::testing::ValuesIn(pin_providers()),
                         [](const auto& i) { return param_safe(i.param->name()); });

}  // namespace
}  // namespace cvm::suites::pins

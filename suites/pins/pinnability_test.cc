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

enum class Backing { Memfd, Tmpfile, FileExt4, FileXfs, FileBtrfs, Hugetlb };

struct MatrixCase {
  Backing backing;
  size_t huge = 0;
  bool shared = false;
  const PinProvider* provider = nullptr;

  std::string backing_name() const {
    switch (backing) {
      case Backing::Memfd: return "memfd";
      case Backing::Tmpfile: return "tmpfile";
      case Backing::FileExt4: return "ext4_file";
      case Backing::FileXfs: return "xfs_file";
      case Backing::FileBtrfs: return "btrfs_file";
      case Backing::Hugetlb: return "memfd_hugetlb_" + hugetlb_size_name(huge);
    }
    return "?";
  }
  std::string name() const {
    return backing_name() + (shared ? "_shared_" : "_private_") + provider->name();
  }
};
std::ostream& operator<<(std::ostream& os, const MatrixCase& c) { return os << c.name(); }

class Pinnability : public ::testing::TestWithParam<MatrixCase> {
 protected:
  // Creates and sizes the file; SKIPs when the backing does not exist here.
  void make_file(const MatrixCase& c) {
    size_ = 4 * page_size();
    int fd = -1;
    switch (c.backing) {
      case Backing::Memfd:
        fd = memfd_create("cvmconf-pinnability", MFD_CLOEXEC);
        break;
      case Backing::Tmpfile:
        fd = unnamed_file_in("/tmp");
        break;
      case Backing::FileExt4:
      case Backing::FileXfs:
      case Backing::FileBtrfs: {
        std::string fs = c.backing == Backing::FileExt4 ? "ext4"
                         : c.backing == Backing::FileXfs ? "xfs" : "btrfs";
        auto dir = writable_dir_on_fs(fs);
        if (!dir)
          GTEST_SKIP() << kCapabilityAbsent << "no writable " << fs << " file system mounted "
                       << "(looked at $TMPDIR, /var/tmp, /tmp, the current directory and every "
                       << fs << " mount)";
        RecordProperty("directory", *dir);
        fd = unnamed_file_in(*dir);
        break;
      }
      case Backing::Hugetlb:
        // MAP_PRIVATE: writing the mapping copies the page-cache page, a second huge page.
        hugetlb_memfd(c.huge, c.shared ? 1 : 2, pool_, fd);
        if (IsSkipped()) return;
        size_ = c.huge;
        break;
    }
    ASSERT_GE(fd, 0) << "creating the " << c.backing_name() << " file: " << strerror(errno);
    fd_.reset(fd);
    auto fs = fs_type_of_fd(fd);
    ASSERT_TRUE(fs.ok()) << fs.error();
    fs_ = *fs;
    RecordProperty("fs", fs_);
    size_file(fd, size_, fs_);
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
  record_case(&p, c.backing_name());
  RecordProperty("mapping", c.shared ? "MAP_SHARED" : "MAP_PRIVATE");
  CVM_SKIP_IF(p.unavailable());
  make_file(c);
  if (IsSkipped() || HasFatalFailure()) return;

  const PinKind k = p.kind();
  bool should_work;
  std::string rule;
  if (!(c.shared && k.write && k.longterm)) {
    should_work = true;
    rule = c.shared ? "a R/O pin (or a short-term one) of a shared mapping works"
                    : "pins of a MAP_PRIVATE mapping work";
  } else if (fs_longterm_shared_rw_ok(fs_)) {
    should_work = true;
    rule = "R/W long-term pins of shared " + fs_ + " mappings work (no writeback)";
  } else if (fs_needs_writeback(fs_)) {
    should_work = false;
    rule = "R/W long-term pins of shared mappings on a writeback file system (" + fs_ +
           ") must be refused";
  } else {
    GTEST_SKIP() << kNotApplicable << "no rule for R/W long-term pins of shared mappings on "
                 << fs_;
  }
  RecordProperty("expected", should_work ? "pinned" : "refused");

  auto m = Mapping::map(size_, PROT_READ | PROT_WRITE, c.shared ? MAP_SHARED : MAP_PRIVATE,
                        fd_.get(), 0);
  ASSERT_TRUE(m.ok()) << m.error();
  map_ = std::move(m.value());
  std::memset(map_.data(), kPattern, size_);  // fully written, so GUP-fast can pin it

  const size_t len = std::min(size_, kMaxPinLen);
  auto pin = p.pin(map_.data(), len);
  if (pin.ok()) {
    RecordProperty("outcome", "pinned");
    EXPECT_TRUE(should_work) << p.name() << " pinned " << c.name() << ", but " << rule;
    if (k.reads_through) {
      EXPECT_EQ(check_through_pin(*pin.value(), len, kPattern), "") << "the pin holds other data";
    }
    auto rel = pin.value()->release();
    EXPECT_TRUE(rel.ok()) << rel.error();
    return;
  }
  CVM_SKIP_IF_PIN_UNSUPPORTED(p, pin);
  RecordProperty("outcome", std::string("refused (") + errno_name(pin.err()) + ")");
  ASSERT_TRUE(p.is_refusal(pin.err()))
      << p.name() << " failed with an error that is not a refusal: " << pin.error();
  EXPECT_FALSE(should_work) << p.name() << " refused " << c.name() << " (" << pin.error()
                            << "), but " << rule;
}

std::vector<MatrixCase> matrix_cases() {
  std::vector<MatrixCase> v;
  std::vector<std::pair<Backing, size_t>> backings = {{Backing::Memfd, 0},
                                                      {Backing::Tmpfile, 0},
                                                      {Backing::FileExt4, 0},
                                                      {Backing::FileXfs, 0},
                                                      {Backing::FileBtrfs, 0}};
  for (size_t s : hugetlb_sizes_to_test()) backings.push_back({Backing::Hugetlb, s});
  for (auto [b, huge] : backings)
    for (bool shared : {true, false})
      for (const PinProvider* p : pin_providers()) v.push_back({b, huge, shared, p});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Matrix, Pinnability, ::testing::ValuesIn(matrix_cases()),
                         [](const auto& i) { return param_safe(i.param.name()); });

// --- memfd_secret: never pinnable --------------------------------------------------------------
class SecretmemPinnability : public ::testing::TestWithParam<const PinProvider*> {};

CVM_TEST_P(SecretmemPinnability, Refused, "PIN-007") {
  const PinProvider& p = *GetParam();
  record_case(&p, "memfd_secret");
  RecordProperty("mapping", "MAP_SHARED");
  CVM_SKIP_IF(p.unavailable());
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
  ASSERT_TRUE(m.ok()) << m.error();
  std::memset(m->data(), kPattern, size);  // the owner can use it
  auto pin = p.pin(m->data(), size);
  if (pin.ok()) {
    RecordProperty("outcome", "pinned");
    ADD_FAILURE() << p.name() << " pinned memfd_secret memory: secret memory must never be "
                  << "reachable through GUP";
    (void)pin.value()->release();
    return;
  }
  CVM_SKIP_IF_PIN_UNSUPPORTED(p, pin);
  RecordProperty("outcome", std::string("refused (") + errno_name(pin.err()) + ")");
  EXPECT_TRUE(p.is_refusal(pin.err())) << "a refusal is expected, got " << pin.error();
}

INSTANTIATE_TEST_SUITE_P(Providers, SecretmemPinnability, ::testing::ValuesIn(pin_providers()),
                         [](const auto& i) { return param_safe(i.param->name()); });

}  // namespace
}  // namespace cvm::suites::pins

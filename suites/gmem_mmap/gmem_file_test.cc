// guest_memfd as a file: creation flags and sizes, fallocate rules, refused file operations.
// Requirements: MMAP-001, MMAP-002, MMAP-011 (suites/requirements.yaml).
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

class GmemFile : public PlatformTest {};

CVM_TEST_P(GmemFile, FlagsAcceptedIffAdvertised, "MMAP-001") {
  const uint64_t advertised =
      vm_caps().guest_memfd_flags > 0 ? static_cast<uint64_t>(vm_caps().guest_memfd_flags) : 0;
  RecordProperty("advertised_flags", hexval(static_cast<long>(advertised)));
  auto none = vm().create_guest_memfd(page_size(), 0);
  EXPECT_TRUE(none.ok()) << "flags 0 must always be accepted: " << none.error();
  for (int bit = 0; bit < 64; bit++) {
    const uint64_t f = 1ULL << bit;
    auto g = vm().create_guest_memfd(page_size(), f);
    if (advertised & f) {
      EXPECT_TRUE(g.ok()) << "flag bit " << bit << " is advertised but refused: " << g.error();
    } else {
      EXPECT_EQ(g.err(), EINVAL) << "flag bit " << bit << " is not advertised (KVM_CAP_GUEST_MEMFD_FLAGS="
                                 << hexval(static_cast<long>(advertised)) << ") but "
                                 << (g.ok() ? std::string("was accepted") : g.error().message());
    }
  }
}

CVM_TEST_P(GmemFile, InvalidSizesRejected, "MMAP-002") {
  const uint64_t ps = page_size();
  for (uint64_t size : {uint64_t{0}, uint64_t{1}, ps / 2, ps - 1, ps + 1, 2 * ps - 1, ps * 3 + 7,
                        uint64_t{1} << 63}) {
    auto g = vm().create_guest_memfd(size, 0);
    EXPECT_EQ(g.err(), EINVAL) << "size " << size << ": "
                               << (g.ok() ? std::string("accepted") : g.error().message());
  }
}

CVM_TEST_P(GmemFile, MultipleFilesAreDistinct, "MMAP-002") {
  GuestMemfd a = new_gmem(1, 0), b = new_gmem(2, 0);
  ASSERT_TRUE(a.valid() && b.valid());
  struct stat sa {}, sb {};
  ASSERT_EQ(fstat(a.fd(), &sa), 0);
  ASSERT_EQ(fstat(b.fd(), &sb), 0);
  EXPECT_EQ(static_cast<uint64_t>(sa.st_size), page_size());
  EXPECT_EQ(static_cast<uint64_t>(sb.st_size), 2 * page_size());
  EXPECT_NE(sa.st_ino, sb.st_ino) << "two guest_memfd files must be distinct inodes";
  EXPECT_EQ(static_cast<uint64_t>(sa.st_blksize), page_size());
}

CVM_TEST_P(GmemFile, FallocateRules, "MMAP-011") {
  const uint64_t ps = page_size(), total = 4 * ps;
  GuestMemfd g = new_gmem(4, 0);
  ASSERT_TRUE(g.valid());
  const int keep = FALLOC_FL_KEEP_SIZE, punch = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE;

  EXPECT_TRUE(g.allocate(0, total).ok()) << "aligned allocation of the whole file";
  EXPECT_EQ(g.fallocate_raw(0, 0, ps).err(), EOPNOTSUPP) << "mode without KEEP_SIZE";
  EXPECT_EQ(g.fallocate_raw(FALLOC_FL_PUNCH_HOLE, 0, ps).err(), EOPNOTSUPP)
      << "PUNCH_HOLE without KEEP_SIZE";
  EXPECT_EQ(g.fallocate_raw(keep | FALLOC_FL_ZERO_RANGE, 0, ps).err(), EOPNOTSUPP)
      << "ZERO_RANGE is not supported";
  EXPECT_EQ(g.fallocate_raw(FALLOC_FL_COLLAPSE_RANGE, 0, ps).err(), EOPNOTSUPP)
      << "COLLAPSE_RANGE is not supported";

  EXPECT_EQ(g.fallocate_raw(keep, ps - 1, ps).err(), EINVAL) << "unaligned offset";
  EXPECT_EQ(g.fallocate_raw(keep, 0, ps + 1).err(), EINVAL) << "unaligned length";
  EXPECT_EQ(g.fallocate_raw(keep, total, ps).err(), EINVAL) << "allocation at the end";
  EXPECT_EQ(g.fallocate_raw(keep, total + ps, ps).err(), EINVAL) << "allocation beyond the end";
  EXPECT_EQ(g.fallocate_raw(keep, 3 * ps, 2 * ps).err(), EINVAL) << "allocation across the end";

  EXPECT_TRUE(g.fallocate_raw(punch, total, ps).ok()) << "punch at the end is a no-op";
  EXPECT_TRUE(g.fallocate_raw(punch, total + ps, ps).ok()) << "punch beyond the end is a no-op";
  EXPECT_EQ(g.fallocate_raw(punch, ps, ps - 1).err(), EINVAL) << "punch with unaligned length";
  EXPECT_TRUE(g.punch_hole(ps, ps).ok()) << "aligned punch";
  EXPECT_TRUE(g.allocate(ps, ps).ok()) << "re-allocating the punched page";
}

CVM_TEST_P(GmemFile, InvalidPunchHoleMatrix, "MMAP-011") {
  const uint64_t ps = page_size();
  GuestMemfd g = new_gmem(4, 0);
  ASSERT_TRUE(g.valid());
  const std::pair<uint64_t, uint64_t> cases[] = {{0, 1},      {0, ps - 1}, {0, ps + 1}, {1, 1},
                                                 {1, ps - 1}, {1, ps},     {1, ps + 1}, {ps, 1},
                                                 {ps, ps - 1}, {ps, ps + 1}};
  for (auto [off, len] : cases)
    EXPECT_EQ(g.punch_hole(off, len).err(), EINVAL) << "punch offset " << off << " len " << len;
}

CVM_TEST_P(GmemFile, ReadWriteAndTruncateRefused, "MMAP-011") {
  GuestMemfd g = new_gmem(4, 0);
  ASSERT_TRUE(g.valid());
  char buf[64] = {};
  errno = 0;
  EXPECT_LT(read(g.fd(), buf, sizeof buf), 0);
  EXPECT_EQ(errno, EINVAL) << "read";
  errno = 0;
  EXPECT_LT(write(g.fd(), buf, sizeof buf), 0);
  EXPECT_EQ(errno, EINVAL) << "write";
  // Positional I/O is refused before the missing read/write methods are even looked at: the
  // file has no FMODE_PREAD/PWRITE (ESPIPE); EINVAL is accepted as the equivalent refusal.
  errno = 0;
  EXPECT_LT(pread(g.fd(), buf, sizeof buf, 0), 0);
  EXPECT_TRUE(errno == ESPIPE || errno == EINVAL) << "pread: " << errno_name(errno);
  errno = 0;
  EXPECT_LT(pwrite(g.fd(), buf, sizeof buf, 0), 0);
  EXPECT_TRUE(errno == ESPIPE || errno == EINVAL) << "pwrite: " << errno_name(errno);
  errno = 0;
  EXPECT_LT(ftruncate(g.fd(), static_cast<off_t>(8 * page_size())), 0);
  EXPECT_EQ(errno, EINVAL) << "ftruncate";
  struct stat st {};
  ASSERT_EQ(fstat(g.fd(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), 4 * page_size()) << "size unchanged";
}

CVM_INSTANTIATE_FOR_PLATFORMS(GmemFile);

}  // namespace
}  // namespace cvm::suites

// mm.h: parsers on fixed inputs, and the helpers on the real kernel (hugetlb pool restore,
// page identity, system locks).
#include <fcntl.h>
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstring>

#include "cvmconf/mm.h"

namespace cvm {
namespace {

TEST(KernelFiles, TextRoundTripAndErrorsNameThePath) {
  char tmpl[] = "/tmp/cvmconf-kf-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl, file = dir + "/attr";
  int fd = ::open(file.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ::close(fd);
  ASSERT_TRUE(write_text(file, "Y\n").ok());
  auto t = read_text(file);
  ASSERT_TRUE(t.ok()) << t.error();
  EXPECT_EQ(t.value(), "Y\n");
  auto missing = read_text(dir + "/missing");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.err(), ENOENT);
  EXPECT_NE(missing.error().message().find(dir + "/missing"), std::string::npos) << missing.error();
  auto w = write_text(dir + "/missing", "1");
  ASSERT_FALSE(w.ok()) << "write_text writes existing attributes only";
  EXPECT_NE(w.error().message().find(dir + "/missing"), std::string::npos) << w.error();
  ::unlink(file.c_str());
  ::rmdir(dir.c_str());
}

TEST(KernelFiles, EnsureDebugfsMountsItOrSaysWhy) {
  EXPECT_FALSE(is_debugfs("/proc")) << "procfs is not debugfs";
  auto why = ensure_debugfs();
  if (why) {
    EXPECT_EQ(why->rfind("debugfs is not mounted at /sys/kernel/debug and mounting it failed: ", 0), 0u)
        << *why;
    EXPECT_FALSE(is_debugfs(kDebugfsDir));
    return;
  }
  EXPECT_TRUE(is_debugfs(kDebugfsDir));
  EXPECT_EQ(ensure_debugfs(), std::nullopt) << "mounted once, found mounted again";
}

TEST(Hugetlb, ParsesSysfsDirectoryNames) {
  EXPECT_EQ(parse_hugepages_dirname("hugepages-2048kB"), std::optional<size_t>(2u << 20));
  EXPECT_EQ(parse_hugepages_dirname("hugepages-1048576kB"), std::optional<size_t>(1u << 30));
  EXPECT_EQ(parse_hugepages_dirname("hugepages-64kB"), std::optional<size_t>(64u << 10));
  EXPECT_FALSE(parse_hugepages_dirname("hugepages-kB"));
  EXPECT_FALSE(parse_hugepages_dirname("hugepages-2048MB"));
  EXPECT_FALSE(parse_hugepages_dirname("hugepages-0kB"));
  EXPECT_FALSE(parse_hugepages_dirname("hugepages-12x4kB"));
  EXPECT_FALSE(parse_hugepages_dirname("."));
  EXPECT_EQ(hugetlb_size_name(2u << 20), "2048kB");
  EXPECT_EQ(hugetlb_size_name(1u << 30), "1048576kB");
}

TEST(Hugetlb, MemfdFlagsEncodeTheSize) {
  EXPECT_EQ(memfd_hugetlb_flags(2u << 20), static_cast<unsigned>(MFD_HUGETLB | MFD_HUGE_2MB));
  EXPECT_EQ(memfd_hugetlb_flags(1u << 30), static_cast<unsigned>(MFD_HUGETLB | MFD_HUGE_1GB));
  EXPECT_EQ(memfd_hugetlb_flags(64u << 10), static_cast<unsigned>(MFD_HUGETLB | MFD_HUGE_64KB));
}

TEST(Hugetlb, SizesComeFromSysfs) {
  char tmpl[] = "/tmp/cvmconf-hp-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  std::string root = tmpl;
  for (const char* d : {"hugepages-1048576kB", "hugepages-2048kB", "not-a-size"})
    ASSERT_EQ(mkdir((root + "/" + d).c_str(), 0755), 0);
  auto sizes = hugetlb_sizes(root);
  EXPECT_EQ(sizes, (std::vector<size_t>{2u << 20, 1u << 30}));
  for (const char* d : {"hugepages-1048576kB", "hugepages-2048kB", "not-a-size"})
    rmdir((root + "/" + d).c_str());
  rmdir(root.c_str());
  EXPECT_TRUE(hugetlb_sizes("/nonexistent").empty());
}

// The pool is grown for the test and put back exactly, also when pages were used meanwhile.
TEST(HugetlbPool, GrowsAndRestoresThePool) {
  const size_t sz = 2u << 20;
  auto sizes = hugetlb_sizes();
  if (std::find(sizes.begin(), sizes.end(), sz) == sizes.end())
    GTEST_SKIP() << "capability absent: no 2048kB hugetlb size";
  long original;
  {
    auto pool = HugetlbPool::reserve(sz, 2);
    if (!pool && (pool.err() == EACCES || pool.err() == EPERM || pool.err() == ENOMEM))
      GTEST_SKIP() << "capability absent: " << pool.error();
    ASSERT_TRUE(pool.ok()) << pool.error();
    original = pool->original_nr();
    auto c = hugetlb_counters(sz);
    ASSERT_TRUE(c.ok()) << c.error();
    EXPECT_GE(c->free - c->resv, 2);
    int fd = memfd_create("cvmconf-hp", MFD_CLOEXEC | memfd_hugetlb_flags(sz));
    ASSERT_GE(fd, 0) << strerror(errno);
    UniqueFd f(fd);
    ASSERT_EQ(ftruncate(fd, static_cast<off_t>(sz)), 0);
    {
      auto m = Mapping::map(sz, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      ASSERT_TRUE(m.ok()) << m.error();
      std::memset(m->data(), 0x5a, sz);
    }
    f.reset();
    auto r = pool->restore();
    EXPECT_TRUE(r.ok()) << r.error();
    EXPECT_TRUE(pool->restore().ok()) << "restore is idempotent";
  }
  auto c = hugetlb_counters(sz);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->nr, original);
}

TEST(HugetlbPool, UnofferedSizeNamesTheSize) {
  auto pool = HugetlbPool::reserve(3u << 20, 1);
  ASSERT_FALSE(pool.ok());
  EXPECT_EQ(pool.err(), ENOENT);
  EXPECT_NE(pool.error().message().find("3072kB"), std::string::npos) << pool.error();
}

TEST(SystemLock, SecondHolderWaitsAndTimesOut) {
  auto a = SystemLock::acquire("unit-test", std::chrono::seconds(5));
  ASSERT_TRUE(a.ok()) << a.error();
  auto b = SystemLock::acquire("unit-test", std::chrono::milliseconds(100));
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.err(), EBUSY) << b.error();
  a->unlock();
  auto c = SystemLock::acquire("unit-test", std::chrono::milliseconds(100));
  EXPECT_TRUE(c.ok()) << c.error();
}

TEST(Thp, SelectedChoice) {
  EXPECT_EQ(selected_choice("always [madvise] never\n"), "madvise");
  EXPECT_EQ(selected_choice("[always] madvise never"), "always");
  EXPECT_EQ(selected_choice("no brackets"), "");
  ThpSettings s;
  s.enabled = "never";
  s.pmd_size = 2u << 20;
  ASSERT_TRUE(anon_thp_unavailable(s));
  EXPECT_NE(anon_thp_unavailable(s)->find("never"), std::string::npos);
  s.enabled = "madvise";
  EXPECT_FALSE(anon_thp_unavailable(s));
}

TEST(Smaps, FieldsOfTheContainingVma) {
  const std::string text =
      "00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/dbus-daemon\n"
      "Size:                328 kB\n"
      "Rss:                 100 kB\n"
      "AnonHugePages:         0 kB\n"
      "VmFlags: rd ex mr mw me dw\n"
      "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n"
      "Size:               4096 kB\n"
      "Rss:                2048 kB\n"
      "AnonHugePages:      2048 kB\n"
      "THPeligible:    1\n"
      "VmFlags: rd wr mr mw me ac hg\n";
  auto f = smaps_fields_from_text(text, 0x7f0000200000);
  ASSERT_TRUE(f);
  EXPECT_EQ((*f)["AnonHugePages"], 2048);
  EXPECT_EQ((*f)["Size"], 4096);
  EXPECT_EQ(f->count("THPeligible"), 0u) << "only kB fields";
  auto g = smaps_fields_from_text(text, 0x400000);
  ASSERT_TRUE(g);
  EXPECT_EQ((*g)["Rss"], 100);
  EXPECT_FALSE(smaps_fields_from_text(text, 0x1000));
  EXPECT_FALSE(smaps_fields_from_text(text, 0x7f0000400000)) << "end is exclusive";
}

TEST(Smaps, RealMappingIsFound) {
  auto m = Mapping::anonymous(4 * page_size());
  ASSERT_TRUE(m.ok());
  std::memset(m->data(), 1, m->size());
  auto f = smaps_fields(m->data() + page_size());
  ASSERT_TRUE(f.ok()) << f.error();
  EXPECT_GE((*f)["Size"], static_cast<long>(4 * page_size() / 1024));
  EXPECT_GE((*f)["Rss"], static_cast<long>(4 * page_size() / 1024));
}

TEST(Pagemap, DecodesBits) {
  uint64_t raw = (uint64_t{1} << 63) | (uint64_t{1} << 56) | 0x1234;
  auto e = decode_pagemap(raw);
  EXPECT_TRUE(e.present);
  EXPECT_TRUE(e.exclusive);
  EXPECT_FALSE(e.swapped);
  EXPECT_FALSE(e.file_or_shared_anon);
  EXPECT_EQ(e.pfn, 0x1234u);
  auto s = decode_pagemap((uint64_t{1} << 62) | 0x55);
  EXPECT_FALSE(s.present);
  EXPECT_TRUE(s.swapped);
  EXPECT_EQ(s.pfn, 0u) << "a swap entry is not a PFN";
}

// A read fault on private anonymous memory maps the shared zeropage; a write replaces it with
// an exclusive anonymous page. This validates the observation the pin suites rely on.
TEST(Pagemap, ZeropageThenExclusiveAnonPage) {
  if (auto why = page_identity_unavailable()) GTEST_SKIP() << "capability absent: " << *why;
  auto m = Mapping::anonymous(page_size());
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(madvise(m->data(), m->size(), MADV_NOHUGEPAGE), 0);
  auto before = page_identity(m->data());
  ASSERT_TRUE(before.ok()) << before.error();
  EXPECT_FALSE(before->present) << "nothing mapped before the first access";
  volatile uint8_t sink = m->data()[0];
  (void)sink;
  auto zp = page_identity(m->data());
  ASSERT_TRUE(zp.ok()) << zp.error();
  EXPECT_TRUE(zp->present);
  EXPECT_TRUE(zp->zero_page) << "pfn " << zp->pfn;
  m->data()[0] = 1;
  auto anon = page_identity(m->data());
  ASSERT_TRUE(anon.ok());
  EXPECT_FALSE(anon->zero_page);
  EXPECT_TRUE(anon->anon);
  EXPECT_TRUE(anon->exclusive);
  EXPECT_NE(anon->pfn, zp->pfn);
}

TEST(Mounts, ParsesEscapesAndOptions) {
  auto v = parse_mounts(
      "/dev/vda / ext4 rw,relatime 0 0\n"
      "tmpfs /dev/shm tmpfs rw,nosuid 0 0\n"
      "/dev/vdb /mnt/with\\040space xfs ro,relatime 0 0\n"
      "garbage\n");
  ASSERT_EQ(v.size(), 3u);
  EXPECT_EQ(v[0].type, "ext4");
  EXPECT_FALSE(v[0].read_only());
  EXPECT_EQ(v[2].dir, "/mnt/with space");
  EXPECT_TRUE(v[2].read_only());
}

TEST(FileSystems, NamesAndRules) {
  EXPECT_EQ(fs_name_from_magic(0x01021994), "tmpfs");
  EXPECT_EQ(fs_name_from_magic(0xEF53), "ext4");
  EXPECT_EQ(fs_name_from_magic(0x58465342), "xfs");
  EXPECT_EQ(fs_name_from_magic(0x9123683E), "btrfs");
  EXPECT_EQ(fs_name_from_magic(0x958458f6), "hugetlbfs");
  EXPECT_EQ(fs_name_from_magic(0x1234), "0x1234");
  EXPECT_TRUE(fs_needs_writeback("ext4"));
  EXPECT_FALSE(fs_needs_writeback("tmpfs"));
  EXPECT_TRUE(fs_longterm_shared_rw_ok("hugetlbfs"));
  EXPECT_FALSE(fs_longterm_shared_rw_ok("xfs"));
  int fd = memfd_create("cvmconf-fs", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  UniqueFd f(fd);
  auto t = fs_type_of_fd(fd);
  ASSERT_TRUE(t.ok()) << t.error();
  EXPECT_EQ(*t, "tmpfs") << "memfd lives on tmpfs";
}

TEST(FileSystems, WritableDirIsOnTheAskedFileSystem) {
  auto fs = fs_type_of_path("/tmp");
  ASSERT_TRUE(fs.ok());
  auto d = writable_dir_on_fs(*fs);
  ASSERT_TRUE(d) << "/tmp itself is a writable " << *fs << " directory";
  EXPECT_EQ(fs_type_of_path(*d).value(), *fs);
  EXPECT_FALSE(writable_dir_on_fs("no-such-fs"));
}

TEST(Secretmem, CreatesOrSaysWhy) {
  auto fd = memfd_secret_create();
  if (!fd.ok()) {
    EXPECT_TRUE(fd.err() == ENOSYS || fd.err() == EPERM || fd.err() == ENOMEM) << fd.error();
    GTEST_SKIP() << "capability absent: " << fd.error();
  }
  auto t = fs_type_of_fd(fd->get());
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(*t, "secretmem");
}

}  // namespace
}  // namespace cvm

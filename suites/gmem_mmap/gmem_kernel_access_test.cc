// Kernel users of a guest_memfd mapping: read() and O_DIRECT into it (copy_to_user / GUP),
// process_vm_readv/writev (GUP of a remote range). On private pages each must fail with EFAULT
// (and the kernel log stays clean: the listener fails any test with a splat); on shared pages each
// must work. Requirements: MMAP-008 (private), MMAP-009 (shared). Their io_uring buffer
// registration (GUP, FOLL_LONGTERM) is GmemPinnability.{PrivateRefused,SharedPinnable}_io_uring
// (suites/pins/gmem_pinnability_test.cc).
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cvmconf/uapi.h"
#include "platform_fixture.h"

namespace cvm::suites {
namespace {

constexpr uint64_t kMmap = uapi::kGmemFlagMmap;
constexpr uint64_t kShared = uapi::kGmemFlagMmap | uapi::kGmemFlagInitShared;

// A page-sized regular file on a disk file system, filled with a pattern, for read()/O_DIRECT.
class DataFile {
 public:
  DataFile() {
    const char* dir = std::getenv("CVMCONF_DIRECT_IO_DIR");
    std::string tmpl = std::string(dir && *dir ? dir : "/var/tmp") + "/cvmconf-dio-XXXXXX";
    std::vector<char> path(tmpl.begin(), tmpl.end());
    path.push_back(0);
    fd_ = mkstemp(path.data());
    if (fd_ < 0) {
      error_ = "mkstemp " + tmpl + ": " + std::strerror(errno);
      return;
    }
    path_ = path.data();
    std::string data(page_size(), 0);
    for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>(i * 7 + 3);
    if (pwrite(fd_, data.data(), data.size(), 0) != static_cast<ssize_t>(data.size()) ||
        fsync(fd_) != 0)
      error_ = "writing " + path_ + ": " + std::strerror(errno);
  }
  ~DataFile() {
    if (fd_ >= 0) close(fd_);
    if (!path_.empty()) unlink(path_.c_str());
  }
  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  static uint8_t expected(size_t i) { return static_cast<uint8_t>(i * 7 + 3); }

 private:
  int fd_ = -1;
  std::string path_;
  std::string error_;
};

class GmemKernelAccess : public PlatformTest {
 protected:
  // A one-page mapping of a guest_memfd created with flags.
  void map_one(uint64_t flags) {
    gmem_ = new_gmem(1, flags);
    ASSERT_TRUE(gmem_.valid());
    auto m = gmem_.map(page_size());
    ASSERT_TRUE(ok(m));
    map_ = std::move(m.value());
  }
  GuestMemfd gmem_;
  Mapping map_;
};

CVM_TEST_P(GmemKernelAccess, ReadIntoPrivatePageFails, "MMAP-008") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  map_one(kMmap);
  DataFile f;
  ASSERT_TRUE(f.ok()) << testing::harness_error("creating the data file", f.error());
  errno = 0;
  ssize_t n = pread(f.fd(), map_.data(), page_size(), 0);
  EXPECT_EQ(n, -1);
  EXPECT_EQ(errno, EFAULT) << "read() into a private guest_memfd page";
}

CVM_TEST_P(GmemKernelAccess, ReadIntoSharedPageWorks, "MMAP-009") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  map_one(kShared);
  DataFile f;
  ASSERT_TRUE(f.ok()) << testing::harness_error("creating the data file", f.error());
  ssize_t n = pread(f.fd(), map_.data(), page_size(), 0);
  ASSERT_EQ(n, static_cast<ssize_t>(page_size())) << strerror(errno);
  EXPECT_EQ(map_.data()[100], DataFile::expected(100));
}

// Opens the data file with O_DIRECT, or says why the file system cannot.
std::optional<std::string> open_direct(const DataFile& f, int& fd) {
  fd = open(f.path().c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
  if (fd < 0)
    return std::string(testing::kNotApplicable) + "O_DIRECT on " + f.path() + ": " +
           strerror(errno) + " (set CVMCONF_DIRECT_IO_DIR to a directory that supports it)";
  return std::nullopt;
}

CVM_TEST_P(GmemKernelAccess, DirectIoIntoPrivatePageFails, "MMAP-008") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  map_one(kMmap);
  DataFile f;
  ASSERT_TRUE(f.ok()) << testing::harness_error("creating the data file", f.error());
  int dfd;
  CVM_SKIP_IF(open_direct(f, dfd));
  errno = 0;
  ssize_t n = pread(dfd, map_.data(), page_size(), 0);
  int err = errno;
  close(dfd);
  EXPECT_EQ(n, -1);
  EXPECT_EQ(err, EFAULT) << "O_DIRECT read into a private guest_memfd page";
}

CVM_TEST_P(GmemKernelAccess, DirectIoIntoSharedPageWorks, "MMAP-009") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  map_one(kShared);
  DataFile f;
  ASSERT_TRUE(f.ok()) << testing::harness_error("creating the data file", f.error());
  int dfd;
  CVM_SKIP_IF(open_direct(f, dfd));
  ssize_t n = pread(dfd, map_.data(), page_size(), 0);
  int err = errno;
  close(dfd);
  ASSERT_EQ(n, static_cast<ssize_t>(page_size())) << strerror(err);
  EXPECT_EQ(map_.data()[4095 % page_size()], DataFile::expected(4095 % page_size()));
}

CVM_TEST_P(GmemKernelAccess, ProcessVmReadvOfPrivatePageFails, "MMAP-008") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  map_one(kMmap);
  std::vector<uint8_t> buf(page_size());
  iovec local{buf.data(), buf.size()}, remote{map_.data(), page_size()};
  errno = 0;
  ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
  int err = errno;
  EXPECT_EQ(n, -1);
  EXPECT_EQ(err, EFAULT) << "process_vm_readv of a private guest_memfd page";
}

CVM_TEST_P(GmemKernelAccess, ProcessVmWritevToPrivatePageFails, "MMAP-008") {
  CVM_SKIP_IF(gmem_flags_unsupported(kMmap));
  map_one(kMmap);
  std::vector<uint8_t> buf(page_size(), 0x42);
  iovec local{buf.data(), buf.size()}, remote{map_.data(), page_size()};
  errno = 0;
  ssize_t n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
  int err = errno;
  EXPECT_EQ(n, -1);
  EXPECT_EQ(err, EFAULT) << "process_vm_writev to a private guest_memfd page";
}

CVM_TEST_P(GmemKernelAccess, ProcessVmReadvWritevOnSharedPageWork, "MMAP-009") {
  CVM_SKIP_IF(gmem_flags_unsupported(kShared));
  map_one(kShared);
  std::vector<uint8_t> out(page_size(), 0x42), in(page_size(), 0);
  iovec lw{out.data(), out.size()}, rw{map_.data(), page_size()};
  ASSERT_EQ(process_vm_writev(getpid(), &lw, 1, &rw, 1, 0), static_cast<ssize_t>(page_size()))
      << strerror(errno);
  EXPECT_EQ(map_.data()[17], 0x42);
  map_.data()[17] = 0x43;
  iovec lr{in.data(), in.size()};
  ASSERT_EQ(process_vm_readv(getpid(), &lr, 1, &rw, 1, 0), static_cast<ssize_t>(page_size()))
      << strerror(errno);
  EXPECT_EQ(in[17], 0x43);
  EXPECT_EQ(in[18], 0x42);
}

CVM_INSTANTIATE_FOR_PLATFORMS(GmemKernelAccess);

}  // namespace
}  // namespace cvm::suites

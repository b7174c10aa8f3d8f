#include "cvmconf/fd.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <string>

namespace cvm {

long ioctl_retrying(int fd, unsigned long request, unsigned long arg) {
  long r;
  do {
    r = ::ioctl(fd, request, arg);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? -errno : r;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

Result<Mapping> Mapping::map(size_t len, int prot, int flags, int fd, off_t offset) {
  void* p = ::mmap(nullptr, len, prot, flags, fd, offset);
  if (p == MAP_FAILED)
    return last_error("mmap(len=" + std::to_string(len) + ", prot=" + std::to_string(prot) +
                      ", flags=" + hex(static_cast<unsigned>(flags)) + ", fd=" + std::to_string(fd) +
                      ", off=" + std::to_string(offset) + ")");
  return Mapping(p, len);
}

Result<Mapping> Mapping::anonymous(size_t len, int extra_flags) {
  return map(len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | extra_flags, -1, 0);
}

void Mapping::reset() {
  if (addr_) ::munmap(addr_, len_);
  addr_ = nullptr;
  len_ = 0;
}

size_t page_size() {
  static const size_t ps = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return ps;
}

}  // namespace cvm

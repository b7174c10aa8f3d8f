#include "cvmconf/result.h"

#include <cstdio>
#include <cstring>

namespace cvm {

const char* errno_name(int err) {
  switch (err) {
#define CVM_E(x) \
  case x:        \
    return #x;
    CVM_E(EPERM) CVM_E(ENOENT) CVM_E(ESRCH) CVM_E(EINTR) CVM_E(EIO) CVM_E(ENXIO) CVM_E(E2BIG)
    CVM_E(EBADF) CVM_E(EAGAIN) CVM_E(ENOMEM) CVM_E(EACCES) CVM_E(EFAULT) CVM_E(EBUSY)
    CVM_E(EEXIST) CVM_E(ENODEV) CVM_E(EINVAL) CVM_E(ENOSPC) CVM_E(ESPIPE) CVM_E(EROFS)
    CVM_E(EPIPE) CVM_E(ERANGE) CVM_E(ENOSYS) CVM_E(ENOTTY) CVM_E(EFBIG) CVM_E(EMFILE)
    CVM_E(EOPNOTSUPP) CVM_E(EHWPOISON) CVM_E(ENOEXEC)
    CVM_E(ETIMEDOUT) CVM_E(EOVERFLOW) CVM_E(EMLINK) CVM_E(ENOTCONN) CVM_E(EISDIR)
#undef CVM_E
    case 0:
      return "0";
    default: {
      static thread_local char buf[16];
      std::snprintf(buf, sizeof buf, "E%d", err);
      return buf;
    }
  }
}

std::string SysError::message() const {
  if (err == 0) return op;
  std::string m = op + ": " + std::strerror(err) + " (" + errno_name(err) + ")";
  if (dead_vm_fd >= 0)
    m += "; KVM has killed the VM (fd " + std::to_string(dead_vm_fd) +
         "): every ioctl on it fails with EIO, the kernel log says why";
  return m;
}

std::ostream& operator<<(std::ostream& os, const SysError& e) { return os << e.message(); }

std::string hex(uint64_t v) {
  char b[24];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

}  // namespace cvm

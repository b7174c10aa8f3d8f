#include "cvmconf/pins.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

#include "cvmconf/fd.h"

namespace cvm {
namespace {

// --- io_uring fixed buffers: FOLL_WRITE | FOLL_PIN | FOLL_LONGTERM ------------------------------
class IoUringPin final : public Pin {
 public:
  IoUringPin(io_uring ring, void* addr, size_t len) : ring_(ring), addr_(addr), len_(len) {}
  ~IoUringPin() override { (void)release(); }
  Result<void> release() override {
    if (!held_) return {};
    held_ = false;
    int r = io_uring_unregister_buffers(&ring_);
    io_uring_queue_exit(&ring_);
    if (r < 0) return SysError{-r, "io_uring_unregister_buffers"};
    return {};
  }
  // Writes the fixed buffer (the pinned pages) into a memfd and reads that back.
  Result<std::vector<uint8_t>> read_through(size_t offset, size_t len) override {
    if (!held_) return SysError{EINVAL, "io_uring pin already released"};
    if (offset + len > len_) return SysError{EINVAL, "read_through beyond the pinned range"};
    int mfd = memfd_create("cvmconf-pin-read", MFD_CLOEXEC);
    if (mfd < 0) return last_error("memfd_create");
    UniqueFd f(mfd);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return SysError{EBUSY, "io_uring_get_sqe"};
    io_uring_prep_write_fixed(sqe, mfd, static_cast<uint8_t*>(addr_) + offset,
                              static_cast<unsigned>(len), 0, 0);
    int r = io_uring_submit(&ring_);
    if (r != 1) return SysError{r < 0 ? -r : EIO, "io_uring_submit(write_fixed)"};
    io_uring_cqe* cqe = nullptr;
    r = io_uring_wait_cqe(&ring_, &cqe);
    if (r < 0) return SysError{-r, "io_uring_wait_cqe"};
    int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (res < 0) return SysError{-res, "io_uring write_fixed"};
    std::vector<uint8_t> out(len);
    if (pread(mfd, out.data(), len, 0) != static_cast<ssize_t>(len))
      return last_error("pread(memfd)");
    return out;
  }

 private:
  io_uring ring_;
  void* addr_;
  size_t len_;
  bool held_ = true;
};

class IoUringProvider final : public PinProvider {
 public:
  std::string name() const override { return "io_uring"; }
  PinKind kind() const override { return {true, true, true, GupFlavour::Either}; }
  std::optional<std::string> unavailable() const override {
    io_uring ring;
    int r = io_uring_queue_init(2, &ring, 0);
    if (r < 0)
      return std::string("capability absent: io_uring_setup: ") + strerror(-r) +
             " (kernel.io_uring_disabled or no CONFIG_IO_URING)";
    io_uring_queue_exit(&ring);
    return std::nullopt;
  }
  Result<std::unique_ptr<Pin>> pin(void* addr, size_t len) const override {
    io_uring ring;
    int r = io_uring_queue_init(4, &ring, 0);
    if (r < 0) return SysError{-r, "io_uring_queue_init"};
    iovec iov{addr, len};
    r = io_uring_register_buffers(&ring, &iov, 1);
    if (r < 0) {
      io_uring_queue_exit(&ring);
      return SysError{-r, "io_uring_register_buffers"};
    }
    return std::unique_ptr<Pin>(new IoUringPin(ring, addr, len));
  }
};

// --- vmsplice into a pipe that is not drained: a R/O page reference (FOLL_GET) ------------------
class VmsplicePin final : public Pin {
 public:
  VmsplicePin(UniqueFd r, UniqueFd w, size_t len) : r_(std::move(r)), w_(std::move(w)), len_(len) {}
  Result<void> release() override {
    r_.reset();
    w_.reset();
    return {};
  }
  // Reading the pipe returns the referenced pages' contents, and drains (releases) them: the
  // pin is gone afterwards. Only a read of the whole range from offset 0 is possible.
  Result<std::vector<uint8_t>> read_through(size_t offset, size_t len) override {
    if (!r_.valid()) return SysError{EINVAL, "vmsplice pin already released"};
    if (offset != 0 || len != len_)
      return SysError{ENOTSUP, "vmsplice can only read the whole range, once"};
    std::vector<uint8_t> out(len);
    size_t got = 0;
    while (got < len) {
      ssize_t n = read(r_.get(), out.data() + got, len - got);
      if (n <= 0) return last_error("read(pipe)");
      got += static_cast<size_t>(n);
    }
    (void)release();
    return out;
  }

 private:
  UniqueFd r_, w_;
  size_t len_;
};

class VmspliceProvider final : public PinProvider {
 public:
  std::string name() const override { return "vmsplice"; }
  PinKind kind() const override { return {false, false, false, GupFlavour::Either}; }
  std::optional<std::string> unavailable() const override { return std::nullopt; }
  Result<std::unique_ptr<Pin>> pin(void* addr, size_t len) const override {
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) return last_error("pipe2");
    UniqueFd r(p[0]), w(p[1]);
    // Room for the whole range without blocking (pipe-max-size permitting).
    size_t want = len < 4096 ? 4096 : len;
    if (fcntl(w.get(), F_SETPIPE_SZ, static_cast<int>(want)) < 0 && len > 65536)
      return last_error("fcntl(F_SETPIPE_SZ)");
    iovec iov{addr, len};
    size_t done = 0;
    while (done < len) {
      iovec part{static_cast<uint8_t*>(iov.iov_base) + done, len - done};
      ssize_t n = vmsplice(w.get(), &part, 1, SPLICE_F_NONBLOCK);
      if (n < 0) return last_error("vmsplice");
      done += static_cast<size_t>(n);
    }
    return std::unique_ptr<Pin>(new VmsplicePin(std::move(r), std::move(w), len));
  }
};

const IoUringProvider kIoUring;
const VmspliceProvider kVmsplice;

}  // namespace

const char* gup_flavour_name(GupFlavour f) {
  switch (f) {
    case GupFlavour::Slow: return "GUP";
    case GupFlavour::Fast: return "GUP-fast";
    case GupFlavour::Either: return "GUP (kernel's choice)";
  }
  return "?";
}

std::string PinKind::describe() const {
  std::string s = write ? "R/W " : "R/O ";
  s += longterm ? "long-term " : "short-term ";
  s += foll_pin ? "FOLL_PIN" : "reference (FOLL_GET)";
  s += std::string(" (") + gup_flavour_name(flavour) + ")";
  return s;
}

std::string PinRequest::describe() const {
  std::string s;
  if (write) s += *write ? "R/W " : "R/O ";
  if (longterm) s += *longterm ? "long-term " : "short-term ";
  s += foll_pin ? (*foll_pin ? "FOLL_PIN pin" : "page reference") : "pin";
  if (flavour) s += std::string(" via ") + gup_flavour_name(*flavour);
  return s;
}

bool PinRequest::matches(const PinKind& k) const {
  if (write && *write != k.write) return false;
  if (longterm && *longterm != k.longterm) return false;
  if (foll_pin && *foll_pin != k.foll_pin) return false;
  if (flavour && *flavour != GupFlavour::Either && k.flavour != *flavour) return false;
  return true;
}

const std::vector<const PinProvider*>& pin_providers() {
  static const std::vector<const PinProvider*> all = {&kIoUring, &kVmsplice};
  return all;
}

std::vector<const PinProvider*> available_pin_providers(const PinRequest& req) {
  std::vector<const PinProvider*> out;
  for (const PinProvider* p : pin_providers())
    if (req.matches(p->kind()) && !p->unavailable()) out.push_back(p);
  return out;
}

Result<const PinProvider*> find_pin_provider(const PinRequest& req) {
  std::string why;
  for (const PinProvider* p : pin_providers()) {
    if (!req.matches(p->kind())) continue;
    auto u = p->unavailable();
    if (!u) return p;
    std::string r = *u;
    const std::string prefix = "capability absent: ";
    if (r.rfind(prefix, 0) == 0) r = r.substr(prefix.size());
    why += (why.empty() ? "" : "; ") + p->name() + ": " + r;
  }
  if (why.empty()) why = "this build has no provider of that kind";
  return SysError{0, "capability absent: no " + req.describe() + " provider (" + why + ")"};
}

}  // namespace cvm

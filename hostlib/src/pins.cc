#include "cvmconf/pins.h"

#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <liburing.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

#include "cvmconf/fd.h"
#include "cvmconf/mm.h"
#include "cvmconf/uapi.h"

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
  // Puts data into a memfd and lets io_uring read it into the fixed buffer (the pinned pages).
  Result<void> write_through(size_t offset, const std::vector<uint8_t>& data) override {
    if (!held_) return SysError{EINVAL, "io_uring pin already released"};
    if (offset + data.size() > len_) return SysError{EINVAL, "write_through beyond the pinned range"};
    int mfd = memfd_create("cvmconf-pin-write", MFD_CLOEXEC);
    if (mfd < 0) return last_error("memfd_create");
    UniqueFd f(mfd);
    if (pwrite(mfd, data.data(), data.size(), 0) != static_cast<ssize_t>(data.size()))
      return last_error("pwrite(memfd)");
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) return SysError{EBUSY, "io_uring_get_sqe"};
    io_uring_prep_read_fixed(sqe, mfd, static_cast<uint8_t*>(addr_) + offset,
                             static_cast<unsigned>(data.size()), 0, 0);
    int r = io_uring_submit(&ring_);
    if (r != 1) return SysError{r < 0 ? -r : EIO, "io_uring_submit(read_fixed)"};
    io_uring_cqe* cqe = nullptr;
    r = io_uring_wait_cqe(&ring_, &cqe);
    if (r < 0) return SysError{-r, "io_uring_wait_cqe"};
    int res = cqe->res;
    io_uring_cqe_seen(&ring_, cqe);
    if (res < 0) return SysError{-res, "io_uring read_fixed"};
    if (static_cast<size_t>(res) != data.size()) return SysError{EIO, "io_uring read_fixed: short read"};
    return {};
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
  // io_uring reports an unpinnable buffer as EFAULT, EOPNOTSUPP or ENOSPC (as
  // tools/testing/selftests/mm/gup_longterm.c accepts).
  bool is_refusal(int err) const override {
    return err == EFAULT || err == EOPNOTSUPP || err == ENOSPC;
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

// --- gup_test: PIN_LONGTERM_TEST_START/STOP/READ (CONFIG_GUP_TEST) ------------------------------
// One pinned set for the whole system (mm/gup_test.c, Linux 7.2): a process-local flag and
// the system lock "gup_test" keep cvmconf's users from stepping on each other.
std::atomic<bool> g_gup_test_pin_held{false};

class GupTestPin final : public Pin {
 public:
  GupTestPin(SystemLock lock, UniqueFd fd, size_t len)
      : lock_(std::move(lock)), fd_(std::move(fd)), len_(len) {}
  ~GupTestPin() override { (void)release(); }
  Result<void> release() override {
    if (!fd_.valid()) return {};
    Result<void> out;
    if (long rc = ioctl_retrying(fd_.get(), uapi::kPinLongtermTestStop, 0ul); rc < 0)
      out = SysError{static_cast<int>(-rc), "gup_test PIN_LONGTERM_TEST_STOP"};
    fd_.reset();  // closing also unpins (gup_test_release)
    lock_.unlock();
    g_gup_test_pin_held = false;
    return out;
  }
  // PIN_LONGTERM_TEST_READ copies every pinned page (from the pinned pages themselves).
  bool reads_whole_range() const override { return true; }
  Result<std::vector<uint8_t>> read_through(size_t offset, size_t len) override {
    if (!fd_.valid()) return SysError{EINVAL, "gup_test pin already released"};
    if (offset + len > len_) return SysError{EINVAL, "read_through beyond the pinned range"};
    std::vector<uint8_t> all(len_);
    __u64 user_addr = reinterpret_cast<uintptr_t>(all.data());
    if (long rc = ioctl_retrying(fd_.get(), uapi::kPinLongtermTestRead, &user_addr); rc < 0)
      return SysError{static_cast<int>(-rc), "gup_test PIN_LONGTERM_TEST_READ"};
    if (offset == 0 && len == len_) return all;
    return std::vector<uint8_t>(all.begin() + static_cast<long>(offset),
                                all.begin() + static_cast<long>(offset + len));
  }

 private:
  SystemLock lock_;
  UniqueFd fd_;
  size_t len_;
};

// START with `flags` on [addr, addr+len) through a fresh fd of `path`, holding the system lock.
Result<std::unique_ptr<Pin>> gup_test_start(const std::string& path, void* addr, size_t len,
                                            __u32 flags, const std::string& what) {
  bool expected = false;
  if (!g_gup_test_pin_held.compare_exchange_strong(expected, true))
    return SysError{EBUSY, what + ": gup_test holds one pinned set system-wide and this "
                                  "process already holds it"};
  auto lock = SystemLock::acquire("gup_test", std::chrono::seconds(60));
  if (!lock) {
    g_gup_test_pin_held = false;
    return SysError{lock.err(), what + ": " + lock.error().message()};
  }
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    SysError e = last_error(what + ": open " + path);
    g_gup_test_pin_held = false;
    return e;
  }
  UniqueFd f(fd);
  uapi::pin_longterm_test args{};
  args.addr = reinterpret_cast<uintptr_t>(addr);
  args.size = len;
  args.flags = flags;
  if (long rc = ioctl_retrying(fd, uapi::kPinLongtermTestStart, &args); rc < 0) {
    SysError e{static_cast<int>(-rc), what + ": PIN_LONGTERM_TEST_START"};
    g_gup_test_pin_held = false;
    return e;
  }
  return std::unique_ptr<Pin>(new GupTestPin(std::move(lock.value()), std::move(f), len));
}

class GupTestProvider final : public PinProvider {
 public:
  GupTestProvider(bool write, bool fast) : write_(write), fast_(fast) {}
  std::string name() const override {
    return std::string("gup_test_") + (write_ ? "rw" : "ro") + (fast_ ? "_fast" : "");
  }
  PinKind kind() const override {
    return {write_, true, true, fast_ ? GupFlavour::Fast : GupFlavour::Slow};
  }
  std::optional<std::string> unavailable() const override {
    static const std::optional<std::string> why = gup_test_unavailable(kGupTestPath);
    return why;
  }
  Result<std::unique_ptr<Pin>> pin(void* addr, size_t len) const override {
    __u32 flags = (write_ ? uapi::kPinLongtermTestFlagUseWrite : 0) |
                  (fast_ ? uapi::kPinLongtermTestFlagUseFast : 0);
    return gup_test_start(kGupTestPath, addr, len, flags, name());
  }
  bool is_unsupported(int err) const override { return err == EINVAL; }

 private:
  bool write_, fast_;
};

// --- RDMA memory registration through libibverbs (loaded at run time) ---------------------------
struct Verbs {
  void* handle = nullptr;
  std::string error;
  decltype(&::ibv_get_device_list) get_device_list = nullptr;
  decltype(&::ibv_free_device_list) free_device_list = nullptr;
  decltype(&::ibv_get_device_name) get_device_name = nullptr;
  decltype(&::ibv_open_device) open_device = nullptr;
  decltype(&::ibv_close_device) close_device = nullptr;
  decltype(&::ibv_alloc_pd) alloc_pd = nullptr;
  decltype(&::ibv_dealloc_pd) dealloc_pd = nullptr;
  decltype(&::ibv_reg_mr) reg_mr = nullptr;
  decltype(&::ibv_dereg_mr) dereg_mr = nullptr;
};

const Verbs& verbs() {
  static const Verbs v = [] {
    Verbs x;
    x.handle = ::dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!x.handle) {
      const char* e = ::dlerror();
      x.error = std::string("libibverbs.so.1 cannot be loaded (Debian: libibverbs1, ibverbs-providers): ") +
                (e ? e : "?");
      return x;
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(::dlsym(x.handle, name));
      if (!fn) {
        ok = false;
        x.error += std::string(x.error.empty() ? "" : ", ") + name;
      }
    };
    sym(x.get_device_list, "ibv_get_device_list");
    sym(x.free_device_list, "ibv_free_device_list");
    sym(x.get_device_name, "ibv_get_device_name");
    sym(x.open_device, "ibv_open_device");
    sym(x.close_device, "ibv_close_device");
    sym(x.alloc_pd, "ibv_alloc_pd");
    sym(x.dealloc_pd, "ibv_dealloc_pd");
    sym(x.reg_mr, "ibv_reg_mr");
    sym(x.dereg_mr, "ibv_dereg_mr");
    if (!ok) x.error = "libibverbs.so.1 lacks " + x.error;
    return x;
  }();
  return v;
}

// A protection domain on the first RDMA device.
struct RdmaDomain {
  ibv_context* ctx = nullptr;
  ibv_pd* pd = nullptr;
  std::string device;
  void close() {
    if (pd) verbs().dealloc_pd(pd);
    if (ctx) verbs().close_device(ctx);
    pd = nullptr;
    ctx = nullptr;
  }
};

Result<RdmaDomain> open_rdma_domain() {
  const Verbs& v = verbs();
  if (!v.error.empty()) return SysError{ENOSYS, v.error};
  int n = 0;
  ibv_device** list = v.get_device_list(&n);
  if (!list) return last_error("ibv_get_device_list");
  if (n <= 0) {
    v.free_device_list(list);
    return SysError{ENODEV, "libibverbs lists no device (no user-space provider for the kernel's "
                            "RDMA devices? Debian: ibverbs-providers)"};
  }
  RdmaDomain d;
  d.device = v.get_device_name(list[0]);
  d.ctx = v.open_device(list[0]);
  v.free_device_list(list);
  if (!d.ctx) return last_error("ibv_open_device(" + d.device + ")");
  d.pd = v.alloc_pd(d.ctx);
  if (!d.pd) {
    SysError e = last_error("ibv_alloc_pd(" + d.device + ")");
    d.close();
    return e;
  }
  return d;
}

class RdmaPin final : public Pin {
 public:
  RdmaPin(RdmaDomain d, ibv_mr* mr) : d_(d), mr_(mr) {}
  ~RdmaPin() override { (void)release(); }
  Result<void> release() override {
    Result<void> out;
    if (mr_) {
      int r = verbs().dereg_mr(mr_);
      if (r) out = SysError{r, "ibv_dereg_mr"};
      mr_ = nullptr;
    }
    d_.close();
    return out;
  }
  Result<std::vector<uint8_t>> read_through(size_t, size_t) override {
    return SysError{ENOTSUP, "not implemented: reading through an RDMA MR needs a loopback queue pair"};
  }

 private:
  RdmaDomain d_;
  ibv_mr* mr_;
};

class RdmaProvider final : public PinProvider {
 public:
  explicit RdmaProvider(bool write) : write_(write) {}
  std::string name() const override { return write_ ? "rdma_rw" : "rdma_ro"; }
  PinKind kind() const override {
    PinKind k{write_, true, true, GupFlavour::Fast};
    k.reads_through = false;
    return k;
  }
  std::optional<std::string> unavailable() const override {
    static const std::optional<std::string> why = rdma_unavailable(kRdmaSysfs);
    return why;
  }
  Result<std::unique_ptr<Pin>> pin(void* addr, size_t len) const override {
    auto d = open_rdma_domain();
    if (!d) return d.error();
    int access = write_ ? IBV_ACCESS_LOCAL_WRITE : 0;
    ibv_mr* mr = verbs().reg_mr(d->pd, addr, len, access);
    if (!mr) {
      SysError e = last_error(name() + ": ibv_reg_mr on " + d->device);
      d->close();
      return e;
    }
    return std::unique_ptr<Pin>(new RdmaPin(d.value(), mr));
  }

 private:
  bool write_;
};

const GupTestProvider kGupTestRo(false, false), kGupTestRoFast(false, true),
    kGupTestRw(true, false), kGupTestRwFast(true, true);
const RdmaProvider kRdmaRo(false), kRdmaRw(true);

}  // namespace

Result<void> Pin::write_through(size_t, const std::vector<uint8_t>&) {
  return SysError{ENOTSUP, "this provider cannot write through its pin"};
}

bool PinProvider::is_refusal(int err) const { return err == EFAULT; }
bool PinProvider::is_unsupported(int) const { return false; }

std::optional<std::string> gup_test_unavailable(const std::string& path) {
  if (path.rfind(std::string(kDebugfsDir) + "/", 0) == 0)
    if (auto why = ensure_debugfs()) return "capability absent: " + *why;
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    int e = errno;
    if (e == ENOENT)
      return "capability absent: " + path + " absent (kernel built without CONFIG_GUP_TEST)";
    return "capability absent: stat " + path + ": " + strerror(e) + " (" + errno_name(e) + ")";
  }
  // A real START on a page of our own: EINVAL means the interface lacks the long-term pin test.
  auto m = Mapping::anonymous(page_size());
  if (!m) return "capability absent: mmap for the gup_test probe: " + m.error().message();
  m->data()[0] = 1;
  auto p = gup_test_start(path, m->data(), m->size(), 0, "gup_test probe");
  if (!p) {
    int e = p.err();
    if (e == EINVAL)
      return "capability absent: " + path + " refuses PIN_LONGTERM_TEST_START with EINVAL (a "
             "gup_test without the long-term pin test ioctls)";
    if (e == ENOTTY)
      return "capability absent: " + path + " does not implement PIN_LONGTERM_TEST_START (ENOTTY)";
    return "capability absent: " + p.error().message();
  }
  auto r = p.value()->release();
  if (!r) return "capability absent: " + r.error().message();
  return std::nullopt;
}

std::optional<std::string> rdma_unavailable(const std::string& sysfs_dir) {
  DIR* d = ::opendir(sysfs_dir.c_str());
  if (!d) {
    int e = errno;
    return "capability absent: no RDMA device (" + sysfs_dir + ": " + strerror(e) + ")";
  }
  std::string first;
  while (dirent* e = ::readdir(d))
    if (e->d_name[0] != '.') {
      first = e->d_name;
      break;
    }
  ::closedir(d);
  if (first.empty()) return "capability absent: no RDMA device (" + sysfs_dir + " is empty)";
  auto dom = open_rdma_domain();
  if (!dom) return "capability absent: RDMA device " + first + ": " + dom.error().message();
  dom->close();
  return std::nullopt;
}

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
  if (reads_through && *reads_through && !k.reads_through) return false;
  return true;
}

const std::vector<const PinProvider*>& pin_providers() {
  static const std::vector<const PinProvider*> all = {
      &kIoUring, &kVmsplice, &kGupTestRo, &kGupTestRoFast, &kGupTestRw, &kGupTestRwFast,
      &kRdmaRo, &kRdmaRw};
  return all;
}

const PinProvider* pin_provider_by_name(const std::string& name) {
  for (const PinProvider* p : pin_providers())
    if (p->name() == name) return p;
  return nullptr;
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
  std::string what = req.describe() + " provider";
  if (req.reads_through && *req.reads_through) what += " that can read through the pin";
  return SysError{0, "capability absent: no " + what + " (" + why + ")"};
}

}  // namespace cvm

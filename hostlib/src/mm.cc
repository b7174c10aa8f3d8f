#include "cvmconf/mm.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <linux/memfd.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

namespace cvm {

// --- sysfs, procfs and debugfs files ------------------------------------------------------------
Result<std::string> read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) return last_error("open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return last_error("read " + path);
  return ss.str();
}

Result<void> write_text(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return last_error("open " + path + " for writing");
  UniqueFd f(fd);
  if (::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size()))
    return last_error("write " + text + " to " + path);
  return {};
}

bool is_debugfs(const std::string& dir) {
  struct statfs s;
  return ::statfs(dir.c_str(), &s) == 0 && static_cast<unsigned long>(s.f_type) == DEBUGFS_MAGIC;
}

std::optional<std::string> ensure_debugfs() {
  static std::mutex mu;
  std::lock_guard<std::mutex> g(mu);
  if (is_debugfs(kDebugfsDir)) return std::nullopt;
  if (::mount("debugfs", kDebugfsDir, "debugfs", 0, nullptr) == 0 || is_debugfs(kDebugfsDir))
    return std::nullopt;
  int e = errno;
  return std::string("debugfs is not mounted at ") + kDebugfsDir + " and mounting it failed: " +
         strerror(e) + " (" + errno_name(e) + ")" + (e == EPERM ? " (needs root)" : "");
}

namespace {

Result<long> read_long(const std::string& path) {
  auto t = read_text(path);
  if (!t) return t.error();
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(t->c_str(), &end, 10);
  if (errno || end == t->c_str()) return SysError{EINVAL, "parse a number from " + path};
  return v;
}

Result<void> write_long(const std::string& path, long v) { return write_text(path, std::to_string(v)); }

std::string size_dir(const std::string& root, size_t bytes) {
  return root + "/hugepages-" + hugetlb_size_name(bytes);
}

}  // namespace

// --- system-wide locks ------------------------------------------------------------------------
std::string system_lock_path(const std::string& name) {
  std::string dir = "/run/lock";
  if (::access(dir.c_str(), W_OK) != 0) {
    const char* t = std::getenv("TMPDIR");
    dir = t && *t ? t : "/tmp";
  }
  return dir + "/cvmconf-" + name + ".lock";
}

Result<SystemLock> SystemLock::acquire(const std::string& name, std::chrono::milliseconds timeout) {
  std::string path = system_lock_path(name);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
  if (fd < 0) return last_error("open lock file " + path);
  UniqueFd f(fd);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return SystemLock(std::move(f));
    if (errno != EWOULDBLOCK && errno != EINTR) return last_error("flock " + path);
    if (std::chrono::steady_clock::now() >= deadline)
      return SysError{EBUSY, "lock " + path + " held by another process for more than " +
                                 std::to_string(timeout.count()) + " ms"};
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// --- hugetlb ------------------------------------------------------------------------------------
std::string hugetlb_size_name(size_t bytes) { return std::to_string(bytes / 1024) + "kB"; }

std::optional<size_t> parse_hugepages_dirname(const std::string& name) {
  const std::string pre = "hugepages-", suf = "kB";
  if (name.size() <= pre.size() + suf.size() || name.rfind(pre, 0) != 0 ||
      name.compare(name.size() - suf.size(), suf.size(), suf) != 0)
    return std::nullopt;
  std::string num = name.substr(pre.size(), name.size() - pre.size() - suf.size());
  if (num.empty() || !std::all_of(num.begin(), num.end(), ::isdigit)) return std::nullopt;
  size_t kb = std::stoull(num);
  if (kb == 0) return std::nullopt;
  return kb * 1024;
}

std::vector<size_t> hugetlb_sizes(const std::string& sysfs_root) {
  std::vector<size_t> out;
  DIR* d = ::opendir(sysfs_root.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d))
    if (auto b = parse_hugepages_dirname(e->d_name)) out.push_back(*b);
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

Result<HugetlbCounters> hugetlb_counters(size_t bytes, const std::string& sysfs_root) {
  std::string dir = size_dir(sysfs_root, bytes);
  HugetlbCounters c;
  auto nr = read_long(dir + "/nr_hugepages");
  if (!nr) return nr.error();
  auto fr = read_long(dir + "/free_hugepages");
  if (!fr) return fr.error();
  auto rs = read_long(dir + "/resv_hugepages");
  if (!rs) return rs.error();
  auto su = read_long(dir + "/surplus_hugepages");
  if (!su) return su.error();
  c.nr = *nr, c.free = *fr, c.resv = *rs, c.surplus = *su;
  return c;
}

Result<std::map<size_t, long>> hugetlb_pool_sizes(const std::string& sysfs_root) {
  std::map<size_t, long> out;
  for (size_t s : hugetlb_sizes(sysfs_root)) {
    auto nr = read_long(size_dir(sysfs_root, s) + "/nr_hugepages");
    if (!nr) return nr.error();
    out[s] = *nr;
  }
  return out;
}

HugetlbPool::HugetlbPool(HugetlbPool&& o) noexcept
    : lock_(std::move(o.lock_)), bytes_(o.bytes_), original_(o.original_), changed_(o.changed_),
      active_(std::exchange(o.active_, false)) {}

HugetlbPool& HugetlbPool::operator=(HugetlbPool&& o) noexcept {
  if (this != &o) {
    (void)restore();
    lock_ = std::move(o.lock_);
    bytes_ = o.bytes_;
    original_ = o.original_;
    changed_ = o.changed_;
    active_ = std::exchange(o.active_, false);
  }
  return *this;
}

HugetlbPool::~HugetlbPool() { (void)restore(); }

Result<HugetlbPool> HugetlbPool::reserve(size_t page_bytes, long free_pages,
                                         std::chrono::milliseconds lock_timeout) {
  const std::string name = hugetlb_size_name(page_bytes);
  const std::string dir = size_dir(kHugepagesSysfs, page_bytes);
  if (::access(dir.c_str(), F_OK) != 0)
    return SysError{ENOENT, "hugetlb " + name + ": the kernel does not offer this size (" + dir +
                                " absent)"};
  auto lock = SystemLock::acquire("hugetlb", lock_timeout);
  if (!lock) return lock.error();
  auto before = hugetlb_counters(page_bytes);
  if (!before) return before.error();
  HugetlbPool p;
  p.lock_ = std::move(lock.value());
  p.bytes_ = page_bytes;
  p.original_ = before->nr;
  p.active_ = true;
  long available = before->free - before->resv;
  if (available >= free_pages) return p;
  long want = before->nr + (free_pages - available);
  p.changed_ = true;
  auto w = write_long(dir + "/nr_hugepages", want);
  if (!w) {
    (void)p.restore();
    return SysError{w.err(), "hugetlb " + name + ": cannot grow the pool: " + w.error().message()};
  }
  auto after = hugetlb_counters(page_bytes);
  if (!after) {
    (void)p.restore();
    return after.error();
  }
  if (after->free - after->resv < free_pages) {
    std::string msg = "hugetlb " + name + ": asked for " + std::to_string(free_pages) +
                      " free pages; nr_hugepages " + std::to_string(before->nr) + " -> " +
                      std::to_string(after->nr) + " (wanted " + std::to_string(want) + "), " +
                      std::to_string(after->free) + " free: the kernel could not allocate enough " +
                      "contiguous memory";
    (void)p.restore();
    return SysError{ENOMEM, msg};
  }
  return p;
}

Result<void> HugetlbPool::restore() {
  if (!active_) return {};
  active_ = false;
  Result<void> out;
  if (changed_) {
    const std::string dir = size_dir(kHugepagesSysfs, bytes_);
    // A page can still be held for a moment after its last user went: io_uring drops its
    // registered buffers in the ring's exit work, after close() returned. Write back again for
    // up to 2 s before calling the pool leaked.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    Result<long> nr = 0L;
    Result<void> w;
    for (;;) {
      w = write_long(dir + "/nr_hugepages", original_);
      if (!w) break;
      nr = read_long(dir + "/nr_hugepages");
      if (!nr || *nr == original_ || std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    if (!w) {
      out = w;
    } else {
      if (!nr)
        out = nr.error();
      else if (*nr != original_)
        out = SysError{EBUSY, "hugetlb " + hugetlb_size_name(bytes_) + ": nr_hugepages is " +
                                  std::to_string(*nr) + " after writing back " +
                                  std::to_string(original_) + " (pages still in use?)"};
    }
  }
  lock_.unlock();
  return out;
}

unsigned int memfd_hugetlb_flags(size_t bytes) {
  unsigned shift = 0;
  while ((size_t{1} << shift) < bytes) shift++;
  return MFD_HUGETLB | (shift << MFD_HUGE_SHIFT);
}

// --- THP --------------------------------------------------------------------------------------
std::string selected_choice(const std::string& text) {
  auto a = text.find('[');
  auto b = text.find(']', a == std::string::npos ? 0 : a);
  if (a == std::string::npos || b == std::string::npos) return "";
  return text.substr(a + 1, b - a - 1);
}

ThpSettings thp_settings(const std::string& sysfs_root) {
  ThpSettings s;
  auto en = read_text(sysfs_root + "/enabled");
  if (!en) {
    s.error = en.error().message() + " (kernel without CONFIG_TRANSPARENT_HUGEPAGE)";
    return s;
  }
  s.enabled = selected_choice(*en);
  auto zp = read_long(sysfs_root + "/use_zero_page");
  s.use_zero_page = zp.ok() && *zp == 1;
  auto pmd = read_long(sysfs_root + "/hpage_pmd_size");
  if (pmd) s.pmd_size = static_cast<size_t>(*pmd);
  return s;
}

std::optional<std::string> anon_thp_unavailable(const ThpSettings& s) {
  if (!s.error.empty()) return "transparent huge pages: " + s.error;
  if (s.enabled == "never")
    return std::string("transparent huge pages disabled (") + kThpSysfs + "/enabled = never)";
  if (s.pmd_size == 0) return std::string("THP PMD size unknown (") + kThpSysfs + "/hpage_pmd_size)";
  return std::nullopt;
}

// --- smaps ------------------------------------------------------------------------------------
std::optional<std::map<std::string, long>> smaps_fields_from_text(const std::string& text,
                                                                  uintptr_t addr) {
  std::istringstream in(text);
  std::string line;
  bool inside = false;
  std::map<std::string, long> out;
  while (std::getline(in, line)) {
    // A VMA header: "start-end perms offset dev inode [path]" (hex start-end, no colon key).
    auto dash = line.find('-');
    auto sp = line.find(' ');
    bool header = dash != std::string::npos && sp != std::string::npos && dash < sp &&
                  std::all_of(line.begin(), line.begin() + static_cast<long>(dash), ::isxdigit);
    if (header) {
      if (inside) return out;
      uintptr_t lo = std::stoull(line.substr(0, dash), nullptr, 16);
      uintptr_t hi = std::stoull(line.substr(dash + 1, sp - dash - 1), nullptr, 16);
      inside = addr >= lo && addr < hi;
      continue;
    }
    if (!inside) continue;
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::istringstream v(line.substr(colon + 1));
    long n;
    std::string unit;
    if (v >> n) {
      v >> unit;
      if (unit == "kB") out[line.substr(0, colon)] = n;
    }
  }
  if (inside) return out;
  return std::nullopt;
}

Result<std::map<std::string, long>> smaps_fields(const void* addr) {
  auto t = read_text("/proc/self/smaps");
  if (!t) return t.error();
  auto f = smaps_fields_from_text(*t, reinterpret_cast<uintptr_t>(addr));
  if (!f) return SysError{ENOENT, "no VMA in /proc/self/smaps contains the address"};
  return *f;
}

// --- pagemap ----------------------------------------------------------------------------------
PagemapEntry decode_pagemap(uint64_t raw) {
  PagemapEntry e;
  e.present = raw >> 63 & 1;
  e.swapped = raw >> 62 & 1;
  e.file_or_shared_anon = raw >> 61 & 1;
  e.exclusive = raw >> 56 & 1;
  e.soft_dirty = raw >> 55 & 1;
  if (e.present) e.pfn = raw & ((uint64_t{1} << 55) - 1);
  return e;
}

Result<PagemapEntry> pagemap_entry(const void* addr) {
  int fd = ::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return last_error("open /proc/self/pagemap");
  UniqueFd f(fd);
  uint64_t raw = 0;
  off_t off = static_cast<off_t>(reinterpret_cast<uintptr_t>(addr) / page_size() * 8);
  if (::pread(fd, &raw, 8, off) != 8) return last_error("pread /proc/self/pagemap");
  return decode_pagemap(raw);
}

Result<uint64_t> kpageflags(uint64_t pfn) {
  int fd = ::open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return last_error("open /proc/kpageflags");
  UniqueFd f(fd);
  uint64_t v = 0;
  if (::pread(fd, &v, 8, static_cast<off_t>(pfn * 8)) != 8) return last_error("pread /proc/kpageflags");
  return v;
}

std::optional<std::string> page_identity_unavailable() {
  static const std::optional<std::string> why = []() -> std::optional<std::string> {
    // A populated page of our own: its PFN must be visible and its flags readable.
    auto m = Mapping::anonymous(page_size());
    if (!m) return "mmap: " + m.error().message();
    m->data()[0] = 1;
    auto e = pagemap_entry(m->data());
    if (!e) return "/proc/self/pagemap: " + e.error().message();
    if (!e->present || e->pfn == 0)
      return std::string("/proc/self/pagemap hides PFNs from this process (needs CAP_SYS_ADMIN)");
    auto fl = kpageflags(e->pfn);
    if (!fl) return "/proc/kpageflags: " + fl.error().message();
    return std::nullopt;
  }();
  return why;
}

Result<PageIdentity> page_identity(const void* addr) {
  auto e = pagemap_entry(addr);
  if (!e) return e.error();
  PageIdentity id;
  id.present = e->present;
  id.pfn = e->pfn;
  id.exclusive = e->exclusive;
  if (!e->present || e->pfn == 0) return id;
  auto fl = kpageflags(e->pfn);
  if (!fl) return fl.error();
  bool zero = *fl >> kKpfZeroPage & 1, thp = *fl >> kKpfThp & 1;
  id.zero_page = zero && !thp;
  id.huge_zero_page = zero && thp;
  id.anon = *fl >> kKpfAnon & 1;
  return id;
}

// --- file systems -----------------------------------------------------------------------------
std::string fs_name_from_magic(unsigned long magic) {
  switch (magic) {
    case TMPFS_MAGIC: return "tmpfs";
    case EXT4_SUPER_MAGIC: return "ext4";  // ext2/ext3/ext4 share it
    case XFS_SUPER_MAGIC: return "xfs";
    case BTRFS_SUPER_MAGIC: return "btrfs";
    case HUGETLBFS_MAGIC: return "hugetlbfs";
    case SECRETMEM_MAGIC: return "secretmem";
    case OVERLAYFS_SUPER_MAGIC: return "overlay";
    case NFS_SUPER_MAGIC: return "nfs";
    case F2FS_SUPER_MAGIC: return "f2fs";
    case 0x2fc12fc1UL: return "zfs";
    case 0x65735546UL: return "fuse";
  }
  return hex(magic);
}

Result<std::string> fs_type_of_fd(int fd) {
  struct statfs s;
  if (::fstatfs(fd, &s) != 0) return last_error("fstatfs");
  return fs_name_from_magic(static_cast<unsigned long>(s.f_type));
}

Result<std::string> fs_type_of_path(const std::string& path) {
  struct statfs s;
  if (::statfs(path.c_str(), &s) != 0) return last_error("statfs " + path);
  return fs_name_from_magic(static_cast<unsigned long>(s.f_type));
}

bool fs_needs_writeback(const std::string& fs) {
  return fs == "ext4" || fs == "xfs" || fs == "btrfs";
}

bool fs_longterm_shared_rw_ok(const std::string& fs) { return fs == "tmpfs" || fs == "hugetlbfs"; }

bool MountEntry::read_only() const {
  std::istringstream in(options);
  std::string o;
  while (std::getline(in, o, ','))
    if (o == "ro") return true;
  return false;
}

namespace {
// /proc/self/mounts escapes space, tab, newline and backslash as octal.
std::string unescape_mount_field(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == '\\' && i + 3 < s.size() && std::isdigit(static_cast<unsigned char>(s[i + 1]))) {
      out.push_back(static_cast<char>(std::stoi(s.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

bool can_create_file_in(const std::string& dir) {
  std::string tmpl = dir + "/.cvmconf-probe-XXXXXX";
  std::vector<char> p(tmpl.begin(), tmpl.end());
  p.push_back(0);
  int fd = ::mkstemp(p.data());
  if (fd < 0) return false;
  ::close(fd);
  ::unlink(p.data());
  return true;
}
}  // namespace

std::vector<MountEntry> parse_mounts(const std::string& text) {
  std::vector<MountEntry> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    MountEntry m;
    if (!(ls >> m.device >> m.dir >> m.type >> m.options)) continue;
    m.device = unescape_mount_field(m.device);
    m.dir = unescape_mount_field(m.dir);
    out.push_back(m);
  }
  return out;
}

std::optional<std::string> writable_dir_on_fs(const std::string& fs) {
  std::vector<std::string> candidates;
  if (const char* t = std::getenv("TMPDIR"); t && *t) candidates.push_back(t);
  candidates.insert(candidates.end(), {"/var/tmp", "/tmp"});
  char cwd[4096];
  if (::getcwd(cwd, sizeof cwd)) candidates.push_back(cwd);
  if (auto t = read_text("/proc/self/mounts"))
    for (const auto& m : parse_mounts(*t))
      if (m.type == fs && !m.read_only()) candidates.push_back(m.dir);
  for (const auto& d : candidates) {
    struct stat st;
    if (::stat(d.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) continue;
    auto t = fs_type_of_path(d);
    if (!t || *t != fs) continue;
    if (can_create_file_in(d)) return d;
  }
  return std::nullopt;
}

// --- memfd_secret -----------------------------------------------------------------------------
Result<UniqueFd> memfd_secret_create(unsigned int flags) {
#ifdef __NR_memfd_secret
  long fd = ::syscall(__NR_memfd_secret, flags);
  if (fd < 0) return last_error("memfd_secret");
  return UniqueFd(static_cast<int>(fd));
#else
  (void)flags;
  return SysError{ENOSYS, "memfd_secret: no syscall number on this architecture"};
#endif
}

}  // namespace cvm

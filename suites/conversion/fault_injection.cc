#include "fault_injection.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace cvm::suites {
namespace {

constexpr const char* kDebugfs = "/sys/kernel/debug";
constexpr const char* kFailNth = "/proc/thread-self/fail-nth";
constexpr long kDebugfsMagic = 0x64626720;

bool exists(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0;
}

std::string read_value(const std::string& p) {
  std::ifstream f(p);
  std::string s;
  std::getline(f, s);
  return s;
}

bool write_value(const std::string& p, const std::string& v) {
  int fd = ::open(p.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::write(fd, v.data(), v.size()) == static_cast<ssize_t>(v.size());
  ::close(fd);
  return ok;
}

// Mounts debugfs when it is not mounted; "" on success, otherwise why not.
std::string ensure_debugfs() {
  struct statfs sf {};
  if (statfs(kDebugfs, &sf) == 0 && static_cast<long>(sf.f_type) == kDebugfsMagic) return "";
  if (mount("debugfs", kDebugfs, "debugfs", 0, nullptr) == 0) return "";
  return std::string("debugfs is not mounted at ") + kDebugfs + " and mounting it failed: " +
         strerror(errno);
}

// Settings that make ordinary allocations eligible, per injection point directory.
const std::vector<std::pair<const char*, std::vector<std::pair<const char*, const char*>>>>&
point_settings() {
  static const std::vector<std::pair<const char*, std::vector<std::pair<const char*, const char*>>>> s = {
      {"failslab", {{"ignore-gfp-wait", "N"}, {"cache-filter", "N"}, {"verbose", "0"}}},
      {"fail_page_alloc",
       {{"ignore-gfp-wait", "N"}, {"ignore-gfp-highmem", "N"}, {"min-order", "0"}, {"verbose", "0"}}},
  };
  return s;
}

}  // namespace

std::optional<std::string> ThreadFaultInjection::unavailable() {
  const std::string prefix = "capability absent: fault injection: ";
  if (!exists(kFailNth))
    return prefix + kFailNth + " is missing (kernel built without CONFIG_FAULT_INJECTION)";
  if (std::string why = ensure_debugfs(); !why.empty()) return prefix + why;
  bool any = false;
  for (const auto& [dir, _] : point_settings())
    if (exists(std::string(kDebugfs) + "/" + dir)) any = true;
  if (!any)
    return prefix + "neither " + kDebugfs + "/failslab nor " + kDebugfs +
           "/fail_page_alloc exists (CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC)";
  return std::nullopt;
}

Result<std::unique_ptr<ThreadFaultInjection>> ThreadFaultInjection::setup() {
  if (auto why = unavailable()) return SysError{0, *why};
  std::unique_ptr<ThreadFaultInjection> t(new ThreadFaultInjection());
  for (const auto& [dir, settings] : point_settings()) {
    const std::string base = std::string(kDebugfs) + "/" + dir;
    if (!exists(base)) continue;
    for (const auto& [name, value] : settings) {
      const std::string p = base + "/" + name;
      if (!exists(p)) continue;
      t->saved_.emplace_back(p, read_value(p));
      if (!write_value(p, value)) return last_error("write " + std::string(value) + " to " + p);
    }
    t->points_.push_back(dir);
  }
  // Opened once: opening allocates, which must not consume the armed count.
  int fd = ::open(kFailNth, O_RDWR | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + kFailNth);
  t->fail_nth_.reset(fd);
  return t;
}

ThreadFaultInjection::~ThreadFaultInjection() {
  if (fail_nth_.valid()) (void)disarm();
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) write_value(it->first, it->second);
}

std::string ThreadFaultInjection::points() const {
  std::string s;
  for (const auto& p : points_) s += (s.empty() ? "" : ", ") + p;
  return s;
}

Result<void> ThreadFaultInjection::arm(unsigned n) {
  const std::string v = std::to_string(n);
  if (::pwrite(fail_nth_.get(), v.data(), v.size(), 0) != static_cast<ssize_t>(v.size()))
    return last_error("write " + v + " to " + kFailNth);
  return {};
}

Result<bool> ThreadFaultInjection::disarm() {
  char buf[32] = {};
  ssize_t n = ::pread(fail_nth_.get(), buf, sizeof buf - 1, 0);
  if (n < 0) return last_error(std::string("read ") + kFailNth);
  const bool injected = std::strtoul(buf, nullptr, 10) == 0;
  if (!injected && ::pwrite(fail_nth_.get(), "0", 1, 0) != 1)
    return last_error(std::string("write 0 to ") + kFailNth);
  return injected;
}

}  // namespace cvm::suites

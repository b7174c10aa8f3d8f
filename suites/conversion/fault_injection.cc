#include "fault_injection.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include "cvmconf/mm.h"

namespace cvm::suites {
namespace {

constexpr const char* kFailNth = "/proc/thread-self/fail-nth";
constexpr const char* kMakeItFail = "/proc/thread-self/make-it-fail";

bool exists(const std::string& p) {
  struct stat st {};
  return stat(p.c_str(), &st) == 0;
}

std::string point_dir(const char* point) { return std::string(kDebugfsDir) + "/" + point; }

// Settings that make ordinary allocations eligible, per injection point directory. fail-nth
// (one failure) ignores probability and task-filter; arm_all() fails every allocation of the
// tasks whose make-it-fail is set (task-filter), and of no other task.
const std::vector<std::pair<const char*, std::vector<std::pair<const char*, const char*>>>>&
point_settings() {
  static const std::vector<std::pair<const char*, std::vector<std::pair<const char*, const char*>>>> s = {
      {"failslab", {{"ignore-gfp-wait", "N"}, {"cache-filter", "N"}, {"verbose", "0"},
                    {"task-filter", "Y"}, {"probability", "100"}, {"interval", "1"},
                    {"times", "-1"}, {"space", "0"}}},
      {"fail_page_alloc",
       {{"ignore-gfp-wait", "N"}, {"ignore-gfp-highmem", "N"}, {"min-order", "0"}, {"verbose", "0"},
        {"task-filter", "Y"}, {"probability", "100"}, {"interval", "1"}, {"times", "-1"},
        {"space", "0"}}},
  };
  return s;
}

}  // namespace

std::optional<std::string> ThreadFaultInjection::unavailable() {
  const std::string prefix = "capability absent: fault injection: ";
  if (!exists(kFailNth))
    return prefix + kFailNth + " is missing (kernel built without CONFIG_FAULT_INJECTION)";
  if (auto why = ensure_debugfs()) return prefix + *why;
  bool any = false;
  for (const auto& [dir, _] : point_settings())
    if (exists(point_dir(dir))) any = true;
  if (!any)
    return prefix + "neither " + point_dir("failslab") + " nor " + point_dir("fail_page_alloc") +
           " exists (CONFIG_FAILSLAB, CONFIG_FAIL_PAGE_ALLOC)";
  return std::nullopt;
}

Result<std::unique_ptr<ThreadFaultInjection>> ThreadFaultInjection::setup() {
  if (auto why = unavailable()) return SysError{0, *why};
  std::unique_ptr<ThreadFaultInjection> t(new ThreadFaultInjection());
  for (const auto& [dir, settings] : point_settings()) {
    const std::string base = point_dir(dir);
    if (!exists(base)) continue;
    for (const auto& [name, value] : settings) {
      const std::string p = base + "/" + name;
      if (!exists(p)) continue;
      auto old = read_text(p);
      if (!old) return old.error();
      // The value alone (the attribute's first line), as it is written back.
      t->saved_.emplace_back(p, old->substr(0, old->find('\n')));
      if (auto w = write_text(p, value); !w) return w.error();
    }
    t->points_.push_back(dir);
  }
  // Opened once: opening allocates, which must not consume the armed count.
  int fd = ::open(kFailNth, O_RDWR | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + kFailNth);
  t->fail_nth_.reset(fd);
  fd = ::open(kMakeItFail, O_RDWR | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + kMakeItFail);
  t->make_it_fail_.reset(fd);
  return t;
}

ThreadFaultInjection::~ThreadFaultInjection() {
  if (fail_nth_.valid()) (void)disarm();
  if (make_it_fail_.valid()) (void)disarm_all();
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) (void)write_text(it->first, it->second);
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

Result<void> ThreadFaultInjection::arm_all() {
  if (::pwrite(make_it_fail_.get(), "1", 1, 0) != 1)
    return last_error(std::string("write 1 to ") + kMakeItFail);
  return {};
}

Result<void> ThreadFaultInjection::disarm_all() {
  if (::pwrite(make_it_fail_.get(), "0", 1, 0) != 1)
    return last_error(std::string("write 0 to ") + kMakeItFail);
  return {};
}

}  // namespace cvm::suites

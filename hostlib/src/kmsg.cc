#include "cvmconf/kmsg.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <regex>

namespace cvm {
namespace {

const char* kmsg_path() {
  const char* p = std::getenv("CVMCONF_KMSG_PATH");
  return (p && *p) ? p : "/dev/kmsg";
}

template <typename T>
bool parse_num(std::string_view s, T& out) {
  auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

struct SplatPattern {
  const char* kind;
  std::regex re;
};

const std::vector<SplatPattern>& splat_patterns() {
  // Splats start their record: anchoring at the start keeps informational lines such as
  // "Speculative Return Stack Overflow: WARNING: See ..." from counting. Order matters: the
  // first match names the kind, and lockdep reports start with "WARNING:" too.
  static const std::vector<SplatPattern> p = [] {
    auto R = [](const char* s) { return std::regex(s, std::regex::extended); };
    return std::vector<SplatPattern>{
        {"lockdep", R("^WARNING: (possible (circular|recursive) locking|possible irq lock "
                      "inversion|inconsistent lock state|suspicious RCU usage|bad unlock "
                      "balance|held lock freed|lock held when returning)")},
        {"lockdep", R("^INFO: (possible (circular|recursive) locking|inconsistent lock state|"
                      "trying to register non-static key)")},
        {"KASAN", R("^BUG: KASAN: ")},
        {"KFENCE", R("^BUG: KFENCE: ")},
        {"UBSAN", R("^UBSAN: ")},
        {"soft lockup", R("^(watchdog: )?BUG: soft lockup")},
        {"hard lockup", R("^(NMI watchdog: )?Watchdog detected hard LOCKUP")},
        {"RCU stall", R("^(rcu: )?INFO: rcu_[a-z_]+ (self-)?detected (stall|stalls)")},
        {"RCU stall", R("^(rcu: )?INFO: rcu_[a-z_]+ detected expedited stalls")},
        {"hung task", R("^INFO: task .* blocked for more than [0-9]+ seconds")},
        {"general protection", R("^(Oops: )?general protection fault")},
        {"BUG", R("^BUG: ")},
        {"BUG", R("^kernel BUG at ")},
        {"Oops", R("^Oops( |:)")},
        {"Oops", R("^Unable to handle kernel (paging request|NULL pointer dereference)")},
        {"WARNING", R("^WARNING: ")},
        {"panic", R("^Kernel panic - not syncing")},
    };
  }();
  return p;
}

}  // namespace

std::string classify_splat(std::string_view text) {
  std::string s(text);
  for (const auto& p : splat_patterns())
    if (std::regex_search(s, p.re)) return p.kind;
  return {};
}

std::optional<KmsgRecord> parse_kmsg_record(std::string_view raw) {
  auto semi = raw.find(';');
  if (semi == std::string_view::npos) return std::nullopt;
  std::string_view header = raw.substr(0, semi);
  std::string_view body = raw.substr(semi + 1);
  // Only the first line is the message; continuation lines (" KEY=VALUE") are dictionary data.
  auto nl = body.find('\n');
  if (nl != std::string_view::npos) body = body.substr(0, nl);

  std::string_view fields[4];
  size_t n = 0, start = 0;
  while (n < 4) {
    auto comma = header.find(',', start);
    fields[n++] = header.substr(start, comma == std::string_view::npos ? std::string_view::npos
                                                                        : comma - start);
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  if (n < 3) return std::nullopt;
  KmsgRecord r;
  unsigned prio = 0;
  if (!parse_num(fields[0], prio) || !parse_num(fields[1], r.seq) || !parse_num(fields[2], r.usec))
    return std::nullopt;
  r.priority = static_cast<int>(prio & 7);
  r.facility = static_cast<int>(prio >> 3);
  // Unescape \xNN sequences the kernel uses for non-printable bytes.
  std::string text;
  for (size_t i = 0; i < body.size(); i++) {
    if (body[i] == '\\' && i + 3 < body.size() && body[i + 1] == 'x') {
      unsigned v = 0;
      auto rr = std::from_chars(body.data() + i + 2, body.data() + i + 4, v, 16);
      if (rr.ec == std::errc() && rr.ptr == body.data() + i + 4) {
        text.push_back(static_cast<char>(v));
        i += 3;
        continue;
      }
    }
    text.push_back(body[i]);
  }
  r.text = std::move(text);
  r.splat = classify_splat(r.text);
  return r;
}

Result<KmsgWatcher> KmsgWatcher::open() {
  int fd = ::open(kmsg_path(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + kmsg_path());
  KmsgWatcher w{UniqueFd(fd)};
  w.start();
  return w;
}

void KmsgWatcher::rewind() { ::lseek(fd_.get(), 0, SEEK_SET); }

void KmsgWatcher::start() {
  // SEEK_END positions after the last record; nothing before start() is reported.
  ::lseek(fd_.get(), 0, SEEK_END);
}

std::vector<KmsgRecord> KmsgWatcher::drain() {
  std::vector<KmsgRecord> out;
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd_.get(), buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE) {  // overwritten records; the next read continues from the oldest
        lost_++;
        continue;
      }
      break;  // EAGAIN: nothing more
    }
    if (n == 0) break;
    if (auto r = parse_kmsg_record(std::string_view(buf, static_cast<size_t>(n))))
      out.push_back(std::move(*r));
  }
  return out;
}

Result<void> kmsg_write(const std::string& line) {
  int fd = ::open(kmsg_path(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return last_error(std::string("open ") + kmsg_path() + " for writing");
  UniqueFd ufd(fd);
  // A record without a trailing newline stays open for continuation and readers do not see it
  // until the next record arrives, so always terminate the line.
  std::string rec = line;
  if (rec.empty() || rec.back() != '\n') rec.push_back('\n');
  if (::write(fd, rec.data(), rec.size()) < 0) return last_error("write /dev/kmsg");
  return {};
}

}  // namespace cvm

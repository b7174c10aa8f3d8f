#include "cvmconf/gtest_support.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cvmconf/kmsg.h"

namespace cvm::testing {
namespace {

std::map<std::string, std::vector<std::string>>& registry() {
  static std::map<std::string, std::vector<std::string>> r;
  return r;
}

std::mutex expected_mu;
std::vector<std::string>& expected_lines() {
  static std::vector<std::string> v;
  return v;
}

// The harness's own self-test writes "WARNING: cvmconf selftest <nonce>" lines into the kernel
// log on purpose. Other cvmconf processes on the same kernel (parallel ctest, a second run) must
// not fail on them; only the process that wrote the line (CVM_SELFTEST_LINE) treats it as a
// splat. Any other text is judged normally.
constexpr const char* kSelftestMarker = "WARNING: cvmconf selftest ";

bool is_expected(const std::string& text) {
  if (text.rfind(kSelftestMarker, 0) == 0) {
    const char* mine = std::getenv("CVM_SELFTEST_LINE");
    if (!mine || text != mine) return true;
  }
  std::lock_guard<std::mutex> g(expected_mu);
  for (const auto& s : expected_lines())
    if (text.find(s) != std::string::npos) return true;
  return false;
}

StressBudget& mutable_budget() {
  static StressBudget b;
  return b;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == sep) {
      out.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  out.push_back(cur);
  return out;
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); i++) s += (i ? sep : "") + v[i];
  return s;
}

}  // namespace

std::string harness_error(const std::string& step, const std::string& cause) {
  std::string text = step + ": " + cause;
  ::testing::Test::RecordProperty("harness_error", text);
  return "harness set-up failed (the test could not build its own environment): " + text;
}

namespace {

// Records the requirement IDs of every test as the property "requirements", and the GTEST_SKIP
// message as "skip_reason" (GoogleTest 1.12's JSON report does not carry it).
class PropertiesListener : public ::testing::EmptyTestEventListener {
  void OnTestStart(const ::testing::TestInfo& info) override {
    auto ids = requirements_of(info);
    if (!ids.empty()) ::testing::Test::RecordProperty("requirements", join(ids, " "));
  }
  // Called with GoogleTest's own lock held: only remember the message here.
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.skipped() && skip_reason_.empty()) skip_reason_ = r.message();
  }
  void OnTestEnd(const ::testing::TestInfo&) override {
    if (!skip_reason_.empty()) ::testing::Test::RecordProperty("skip_reason", skip_reason_);
    skip_reason_.clear();
  }
  std::string skip_reason_;
};

// Fails a test during which the kernel logged a splat; attaches the kernel-log lines.
class KmsgListener : public ::testing::EmptyTestEventListener {
 public:
  KmsgListener() {
    auto w = KmsgWatcher::open();
    if (w)
      watcher_ = std::make_unique<KmsgWatcher>(std::move(w.value()));
    else
      error_ = w.error().message();
  }

 private:
  void OnTestStart(const ::testing::TestInfo&) override {
    {
      std::lock_guard<std::mutex> g(expected_mu);
      expected_lines().clear();
    }
    if (watcher_) watcher_->start();
  }
  void OnTestEnd(const ::testing::TestInfo&) override {
    if (!watcher_) {
      ::testing::Test::RecordProperty("kmsg_watch", "unavailable: " + error_);
      return;
    }
    auto recs = watcher_->drain();
    if (watcher_->lost())
      ::testing::Test::RecordProperty("kmsg_lost", std::to_string(watcher_->lost()));
    if (recs.empty()) return;
    std::vector<std::string> lines, splats;
    constexpr size_t kMaxLines = 200;
    for (const auto& r : recs) {
      std::string line = "[" + std::to_string(r.usec / 1000000) + "." +
                         std::to_string(r.usec % 1000000 / 1000) + "] " + r.text;
      if (!r.splat.empty() && !is_expected(r.text)) splats.push_back("[" + r.splat + "] " + r.text);
      if (lines.size() < kMaxLines) lines.push_back(line);
    }
    ::testing::Test::RecordProperty("kernel_log", join(lines, "\n"));
    if (!splats.empty()) {
      ::testing::Test::RecordProperty("kernel_splats", join(splats, "\n"));
      ADD_FAILURE() << "kernel log splat during this test (" << splats.size()
                    << " line(s)):\n  " << join(splats, "\n  ") << "\nkernel log during the test:\n  "
                    << join(lines, "\n  ");
    }
  }

  std::unique_ptr<KmsgWatcher> watcher_;
  std::string error_;
};

// Streams one JSON line per test start and end to the file named by $CVMCONF_EVENTS, written
// with one write() and fsync'd as it happens: when the binary crashes, hangs or exits without
// its JSON report, the runner still knows which tests finished (with outcome, properties and
// failure messages) and which one was running. When $CVMCONF_EVENTS_TEE names a second file (the
// QEMU runner's virtio-serial "cvmconf.events" port), every line is also written there at once,
// so the host has a test's start event even if the test takes the whole guest kernel down before
// anyone could read the file. Appended before the other listeners, so its
// OnTestEnd runs after theirs (GoogleTest calls OnTestEnd in reverse order) and sees the
// properties and failures they add.
class EventStreamListener : public ::testing::EmptyTestEventListener {
 public:
  static EventStreamListener* from_env() {
    const char* path = std::getenv("CVMCONF_EVENTS");
    if (!path || !*path) return nullptr;
    int fd = ::open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      std::cerr << "cvmconf: cannot open event stream " << path << ": " << std::strerror(errno)
                << "\n";
      return nullptr;
    }
    int tee = -1;
    if (const char* t = std::getenv("CVMCONF_EVENTS_TEE"); t && *t)
      tee = ::open(t, O_WRONLY | O_CLOEXEC);
    return new EventStreamListener(fd, tee);
  }
  ~EventStreamListener() override {
    ::close(fd_);
    if (tee_ >= 0) ::close(tee_);
  }

 private:
  EventStreamListener(int fd, int tee) : fd_(fd), tee_(tee) {}

  static void write_all(int fd, const std::string& line) {
    const char* p = line.data();
    size_t left = line.size();
    while (left > 0) {
      ssize_t n = ::write(fd, p, left);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      p += n;
      left -= static_cast<size_t>(n);
    }
  }

  static int64_t mono_us() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000 + ts.tv_nsec / 1000;
  }
  static std::string full_name(const ::testing::TestInfo& info) {
    return std::string(info.test_suite_name()) + "." + info.name();
  }
  void emit(nlohmann::json j) {
    j["mono_us"] = mono_us();
    std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
    if (tee_ >= 0) write_all(tee_, line);  // first: the guest may not live to the fsync
    write_all(fd_, line);
    ::fsync(fd_);
  }

  void OnTestProgramStart(const ::testing::UnitTest&) override {
    emit({{"event", "program_start"}, {"pid", static_cast<int64_t>(getpid())}});
  }
  void OnTestStart(const ::testing::TestInfo& info) override {
    emit({{"event", "start"}, {"test", full_name(info)}});
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    const ::testing::TestResult* r = info.result();
    nlohmann::json props = nlohmann::json::object();
    for (int i = 0; i < r->test_property_count(); i++) {
      const auto& p = r->GetTestProperty(i);
      props[p.key()] = p.value();
    }
    nlohmann::json failures = nlohmann::json::array();
    for (int i = 0; i < r->total_part_count(); i++) {
      const auto& part = r->GetTestPartResult(i);
      if (!part.failed()) continue;
      std::string where = part.file_name() ? std::string(part.file_name()) + ":" +
                                                 std::to_string(part.line_number()) + "\n"
                                           : std::string();
      failures.push_back(where + part.message());
    }
    emit({{"event", "end"},
          {"test", full_name(info)},
          {"skipped", r->Skipped()},
          {"failures", failures},
          {"elapsed_ms", static_cast<int64_t>(r->elapsed_time())},
          {"properties", props}});
  }
  void OnTestProgramEnd(const ::testing::UnitTest& ut) override {
    emit({{"event", "program_end"}, {"passed", ut.Passed()}});
  }

  int fd_;
  int tee_ = -1;
};

void list_requirements_json() {
  nlohmann::json tests = nlohmann::json::array();
  const auto* ut = ::testing::UnitTest::GetInstance();
  for (int i = 0; i < ut->total_test_suite_count(); i++) {
    const auto* suite = ut->GetTestSuite(i);
    for (int j = 0; j < suite->total_test_count(); j++) {
      const auto* info = suite->GetTestInfo(j);
      nlohmann::json t;
      t["name"] = std::string(info->test_suite_name()) + "." + info->name();
      t["requirements"] = requirements_of(*info);
      t["file"] = info->file();
      t["line"] = info->line();
      if (info->value_param()) t["value_param"] = info->value_param();
      tests.push_back(t);
    }
  }
  std::cout << nlohmann::json{{"tests", tests}}.dump(1) << std::endl;
}

bool parse_u64(const char* s, uint64_t& out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 0);
  if (errno || !end || *end || end == s) return false;
  out = v;
  return true;
}

}  // namespace

Covers::Covers(const char* suite, const char* name, std::initializer_list<const char*> ids) {
  auto& v = registry()[std::string(suite) + "." + name];
  for (const char* id : ids) v.emplace_back(id);
}

std::vector<std::string> requirements_of(const ::testing::TestInfo& info) {
  // Parameterised names: "Prefix/Suite" + "Name/param"; typed: "Suite/0" or "Prefix/Suite/0".
  std::string base_name = split(info.name(), '/').front();
  for (const auto& part : split(info.test_suite_name(), '/')) {
    auto it = registry().find(part + "." + base_name);
    if (it != registry().end()) return it->second;
  }
  return {};
}

const StressBudget& stress_budget() { return mutable_budget(); }

void expect_kernel_log(const std::string& substring) {
  std::lock_guard<std::mutex> g(expected_mu);
  expected_lines().push_back(substring);
}

void report_event(const UcallEvent& ev, const char* what, const char* file, int line,
                  bool fatal) {
  auto type = fatal ? ::testing::TestPartResult::kFatalFailure
                    : ::testing::TestPartResult::kNonFatalFailure;
  if (ev.kind == UcallEvent::Kind::Assert && !ev.file.empty()) {
    std::ostringstream os;
    os << "guest assertion failed: " << ev.text;
    if (ev.args.size() == 2)
      os << " (left " << hex(ev.args[0]) << ", right " << hex(ev.args[1]) << ")";
    os << "\n  (" << what << ", host side at " << file << ":" << line << ")";
    GTEST_MESSAGE_AT_(ev.file.c_str(), static_cast<int>(ev.line), os.str().c_str(), type);
    return;
  }
  std::string msg = std::string(what) + ": guest reported " + ev.describe();
  GTEST_MESSAGE_AT_(file, line, msg.c_str(), type);
}

bool check_event(const UcallEvent& ev, UcallEvent::Kind kind, std::optional<uint64_t> stage,
                 const char* file, int line, bool fatal) {
  if (ev.kind == kind && (!stage || kind != UcallEvent::Kind::Sync || ev.stage() == *stage))
    return true;
  std::string what = std::string("expected ") + ucall_kind_name(kind);
  if (stage && kind == UcallEvent::Kind::Sync) what += " at stage " + std::to_string(*stage);
  report_event(ev, what.c_str(), file, line, fatal);
  return false;
}

int main(int argc, char** argv) {
  // A "threadsafe" death test re-executes this binary for one test: that child must not write
  // into the parent's event stream (InitGoogleMock removes the flag from argv, so look first).
  bool death_test_child = false;
  for (int i = 1; i < argc; i++)
    if (std::strncmp(argv[i], "--gtest_internal_run_death_test", 31) == 0) death_test_child = true;
  ::testing::InitGoogleMock(&argc, argv);
  bool list_reqs = false;
  auto& b = mutable_budget();
  auto env_u64 = [](const char* name, uint64_t& out) {
    const char* v = std::getenv(name);
    return v && *v && parse_u64(v, out);
  };
  uint64_t v;
  if (env_u64("CVMCONF_DURATION", v)) b.duration = std::chrono::seconds(v);
  if (env_u64("CVMCONF_ITERATIONS", v)) b.iterations = v;
  if (env_u64("CVMCONF_SEED", v)) b.seed = v;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      size_t n = std::strlen(flag);
      return a.compare(0, n, flag) == 0 && a.size() > n && a[n] == '=' ? argv[i] + n + 1 : nullptr;
    };
    if (a == "--cvm_list_requirements") {
      list_reqs = true;
    } else if (const char* d = value("--cvm_duration")) {
      if (!parse_u64(d, v)) {
        std::cerr << "cvmconf: --cvm_duration expects seconds, got '" << d << "'\n";
        return 2;
      }
      b.duration = std::chrono::seconds(v);
    } else if (const char* it = value("--cvm_iterations")) {
      if (!parse_u64(it, v)) {
        std::cerr << "cvmconf: --cvm_iterations expects a number, got '" << it << "'\n";
        return 2;
      }
      b.iterations = v;
    } else if (const char* s = value("--cvm_seed")) {
      if (!parse_u64(s, v)) {
        std::cerr << "cvmconf: --cvm_seed expects a number, got '" << s << "'\n";
        return 2;
      }
      b.seed = v;
    } else if (a.rfind("--cvm_", 0) == 0) {
      std::cerr << "cvmconf: unknown flag " << a << "\n";
      return 2;
    }
  }
  if (list_reqs) {
    list_requirements_json();
    return 0;
  }
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (!death_test_child)
    if (auto* events = EventStreamListener::from_env()) listeners.Append(events);  // first: see above
  listeners.Append(new PropertiesListener);
  listeners.Append(new KmsgListener);
  return RUN_ALL_TESTS();
}

}  // namespace cvm::testing

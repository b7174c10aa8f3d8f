// cvm-agent: runs inside a guest booted by the QEMU runner (runners/cvmconf/qemu). It speaks
// JSON lines over a virtio-serial port named "cvmconf.agent":
//
//   guest -> host  {"hello": 1, "kernel": "...", "arch": "..."}            once, at start
//   host -> guest  {"op": "run", "id": N, "argv": [...], "env": {...}, "cwd": "...",
//                   "timeout": seconds, "events": "/path", "report": "/path",
//                   "output_max": bytes of output to return (default 16 KiB, the tail)}
//   guest -> host  {"id": N, "event": "<one line of the events file>"}     while it runs
//                  {"id": N, "kmsg": "<text>", "usec": printk time}        while it runs
//   host -> guest  {"op": "kill", "id": N}      while N runs: kill its process group now
//                  {"id": N, "done": true, "exit": code|null, "signal": sig|null,
//                   "timed_out": bool, "output_tail": "...", "report": "<file>"|null}
//   host -> guest  {"op": "read", "id": N, "path": "..."}  ->  {"id": N, "content": ...|null}
//   host -> guest  {"op": "poweroff"}  ->  {"bye": 1}; the agent exits, init reports its exit
//                  status on the "cvmconf.status" port and powers the guest off
//
// Events are forwarded as they are written, so when the guest kernel panics the host already
// knows which test was running. The agent never interprets test results: the host runner does.
#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "cvmconf/kmsg.h"

namespace {

using nlohmann::json;

constexpr const char* kPortName = "cvmconf.agent";
// Suite binaries also write their event lines straight to this port (CVMCONF_EVENTS_TEE), so a
// test that panics the guest before the agent forwarded its start event is still known.
constexpr const char* kEventsPortName = "cvmconf.events";
std::string g_events_port;
constexpr size_t kOutputTail = 16384;
// The batch's output file lives in the guest's RAM (/tmp is a tmpfs): once it is larger than
// this, its tail is kept in memory and the file is truncated, so a binary that floods stdout
// costs bounded memory.
constexpr off_t kOutputFileCap = 4 << 20;

// Keeps the last `keep` bytes of `tail` + `more`, counting the rest as dropped.
void keep_tail(std::string& tail, const std::string& more, size_t keep, uint64_t& dropped) {
  tail += more;
  if (tail.size() > keep) {
    dropped += tail.size() - keep;
    tail.erase(0, tail.size() - keep);
  }
}

// Keeps the output file bounded: when it exceeds kOutputFileCap, moves its last `keep` bytes
// into `tail`, counts the rest as dropped and truncates it (the child appends: O_APPEND).
void bound_output(const std::string& path, size_t keep, std::string& tail, uint64_t& dropped) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0 || st.st_size <= kOutputFileCap) return;
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return;
  const off_t from = st.st_size > static_cast<off_t>(keep) ? st.st_size - static_cast<off_t>(keep) : 0;
  std::string buf(static_cast<size_t>(st.st_size - from), '\0');
  ssize_t n = pread(fd, buf.data(), buf.size(), from);
  if (n >= 0 && ftruncate(fd, 0) == 0) {
    buf.resize(static_cast<size_t>(n));
    dropped += static_cast<uint64_t>(st.st_size) - buf.size();
    keep_tail(tail, buf, keep, dropped);
  }
  close(fd);
}

int g_port = -1;

void send(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = write(g_port, s.data() + off, s.size() - off);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) {
        usleep(1000);
        continue;
      }
      return;
    }
    off += static_cast<size_t>(n);
  }
}

std::string find_port(const char* wanted) {
  DIR* d = opendir("/sys/class/virtio-ports");
  if (!d) return "";
  std::string found;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(std::string("/sys/class/virtio-ports/") + e->d_name + "/name");
    std::string name;
    std::getline(f, name);
    if (name == wanted) found = std::string("/dev/") + e->d_name;
  }
  closedir(d);
  return found;
}

std::optional<std::string> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::nullopt;
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Forwards complete lines appended to `path` since `offset`.
void forward_events(const std::string& path, off_t& offset, std::string& partial, int64_t id) {
  if (path.empty()) return;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[8192];
  for (;;) {
    ssize_t n = pread(fd, buf, sizeof buf, offset);
    if (n <= 0) break;
    offset += n;
    partial.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  size_t nl;
  while ((nl = partial.find('\n')) != std::string::npos) {
    send({{"id", id}, {"event", partial.substr(0, nl)}});
    partial.erase(0, nl + 1);
  }
}

// Commands that arrive while a batch runs (only "kill" is acted on then; others wait).
std::string g_inbuf;
bool poll_kill(int64_t id) {
  pollfd p{g_port, POLLIN, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  char chunk[4096];
  ssize_t n = read(g_port, chunk, sizeof chunk);
  if (n > 0) g_inbuf.append(chunk, static_cast<size_t>(n));
  bool kill_now = false;
  size_t start = 0, nl;
  std::string keep;
  while ((nl = g_inbuf.find('\n', start)) != std::string::npos) {
    std::string line = g_inbuf.substr(start, nl - start);
    start = nl + 1;
    json c = json::parse(line, nullptr, false);
    if (!c.is_discarded() && c.is_object() && c.value("op", std::string()) == "kill" &&
        c.value("id", int64_t{-1}) == id)
      kill_now = true;
    else
      keep += line + "\n";
  }
  g_inbuf = keep + g_inbuf.substr(start);
  return kill_now;
}

void send_kmsg(std::optional<cvm::KmsgWatcher>& kmsg, int64_t id) {
  if (!kmsg) return;
  for (const auto& r : kmsg->drain())
    send({{"id", id}, {"kmsg", r.text}, {"usec", r.usec}});
}

void run_command(const json& cmd) {
  const int64_t id = cmd.value("id", int64_t{0});
  std::vector<std::string> argv_s = cmd.value("argv", std::vector<std::string>{});
  if (argv_s.empty()) {
    send({{"id", id}, {"done", true}, {"error", "empty argv"}});
    return;
  }
  const double timeout = cmd.value("timeout", 600.0);
  const std::string events = cmd.value("events", std::string());
  const std::string report = cmd.value("report", std::string());
  const std::string cwd = cmd.value("cwd", std::string("/"));
  const size_t output_max = cmd.value("output_max", kOutputTail);
  const std::string out_path = "/tmp/agent-output-" + std::to_string(id);
  if (!events.empty()) unlink(events.c_str());
  if (!report.empty()) unlink(report.c_str());

  std::optional<cvm::KmsgWatcher> kmsg;
  if (auto w = cvm::KmsgWatcher::open()) kmsg.emplace(std::move(w.value()));
  pid_t pid = fork();
  if (pid < 0) {
    send({{"id", id}, {"done", true}, {"error", std::string("fork: ") + strerror(errno)}});
    return;
  }
  if (pid == 0) {
    setsid();
    if (chdir(cwd.c_str()) != 0) _exit(126);
    int o = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (o >= 0) {
      dup2(o, 1);
      dup2(o, 2);
    }
    if (!g_events_port.empty()) setenv("CVMCONF_EVENTS_TEE", g_events_port.c_str(), 1);
    if (cmd.contains("env"))
      for (auto& [k, v] : cmd["env"].items()) setenv(k.c_str(), v.get<std::string>().c_str(), 1);
    std::vector<char*> argv;
    for (auto& s : argv_s) argv.push_back(s.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    dprintf(2, "cvm-agent: exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  auto start = std::chrono::steady_clock::now();
  off_t ev_off = 0;
  std::string ev_partial;
  int status = 0;
  bool timed_out = false, reaped = false, killed = false;
  std::string kept_tail;  // output from before the file was last truncated (bound_output)
  uint64_t dropped = 0;
  while (!reaped) {
    usleep(50 * 1000);
    bound_output(out_path, output_max, kept_tail, dropped);
    forward_events(events, ev_off, ev_partial, id);
    send_kmsg(kmsg, id);
    if (waitpid(pid, &status, WNOHANG) == pid) {
      reaped = true;
      break;
    }
    if (poll_kill(id)) {
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      killed = true;
      reaped = true;
      break;
    }
    double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed > timeout) {
      kill(-pid, SIGKILL);
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      timed_out = true;
      reaped = true;
    }
  }
  kill(-pid, SIGKILL);  // leftovers of the process group
  forward_events(events, ev_off, ev_partial, id);
  send_kmsg(kmsg, id);
  json done = {{"id", id}, {"done", true}, {"timed_out", timed_out}, {"killed", killed}};
  done["exit"] = WIFEXITED(status) && !timed_out ? json(WEXITSTATUS(status)) : json(nullptr);
  done["signal"] = WIFSIGNALED(status) ? json(WTERMSIG(status)) : json(nullptr);
  std::string out = std::move(kept_tail);
  keep_tail(out, read_file(out_path).value_or(""), output_max, dropped);
  if (dropped > 0)
    out = "[cvm-agent: " + std::to_string(dropped) + " bytes of earlier output dropped]\n" + out;
  done["output_tail"] = out;
  auto rep = report.empty() ? std::nullopt : read_file(report);
  done["report"] = rep ? json(*rep) : json(nullptr);
  unlink(out_path.c_str());
  send(done);
}

}  // namespace

int main() {
  signal(SIGPIPE, SIG_IGN);
  std::string port;
  for (int i = 0; i < 100 && port.empty(); i++) {
    port = find_port(kPortName);
    if (port.empty()) usleep(100 * 1000);
  }
  if (port.empty()) {
    fprintf(stderr, "cvm-agent: no virtio-serial port named %s\n", kPortName);
    return 2;
  }
  g_events_port = find_port(kEventsPortName);
  g_port = open(port.c_str(), O_RDWR | O_CLOEXEC);
  if (g_port < 0) {
    fprintf(stderr, "cvm-agent: open %s: %s\n", port.c_str(), strerror(errno));
    return 2;
  }
  struct utsname u {};
  uname(&u);
  send({{"hello", 1}, {"kernel", u.release}, {"arch", u.machine}});
  std::string& buf = g_inbuf;
  char chunk[4096];
  for (;;) {
    if (buf.find('\n') == std::string::npos) {
      ssize_t n = read(g_port, chunk, sizeof chunk);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        usleep(100 * 1000);  // host not connected yet / reconnecting
        continue;
      }
      buf.append(chunk, static_cast<size_t>(n));
    }
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      std::string line = buf.substr(0, nl);
      buf.erase(0, nl + 1);
      json cmd = json::parse(line, nullptr, false);
      if (cmd.is_discarded() || !cmd.is_object()) {
        send({{"error", "malformed command"}});
        continue;
      }
      const std::string op = cmd.value("op", std::string());
      if (op == "run") {
        run_command(cmd);
      } else if (op == "kill") {
        // The batch it named has already finished.
      } else if (op == "read") {
        auto c = read_file(cmd.value("path", std::string()));
        send({{"id", cmd.value("id", int64_t{0})}, {"content", c ? json(*c) : json(nullptr)}});
      } else if (op == "poweroff") {
        // Exit; init reports the status on the status port and powers the guest off.
        send({{"bye", 1}});
        sync();
        return 0;
      } else {
        send({{"id", cmd.value("id", int64_t{0})}, {"error", "unknown op " + op}});
      }
    }
  }
}

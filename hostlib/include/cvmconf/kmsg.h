// Kernel log watcher: reads /dev/kmsg records that appear between start() and drain(), and
// classifies kernel splats (WARNING, BUG, Oops, KASAN, UBSAN, lockdep, RCU stall, soft/hard
// lockup, hung task, general protection fault, panic).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "cvmconf/fd.h"
#include "cvmconf/result.h"

namespace cvm {

struct KmsgRecord {
  int priority = 0;    // syslog level (prio & 7)
  int facility = 0;    // prio >> 3 (0 = kernel, 1 = user, ...)
  uint64_t seq = 0;
  uint64_t usec = 0;   // timestamp since boot
  std::string text;
  std::string splat;   // splat kind if this record is one ("WARNING", "KASAN", ...), else empty
};

// Parses one /dev/kmsg record ("prio,seq,usec,flags[,...];text\n[ KEY=VALUE\n]..."). Returns
// nullopt for malformed input.
std::optional<KmsgRecord> parse_kmsg_record(std::string_view raw);

// Returns the splat kind a kernel log line announces ("" if none).
std::string classify_splat(std::string_view text);

class KmsgWatcher {
 public:
  // Opens /dev/kmsg (or CVMCONF_KMSG_PATH) and positions after the newest record.
  static Result<KmsgWatcher> open();
  // Skips everything logged so far.
  void start();
  // Goes back to the oldest record still in the ring buffer (to read the boot log).
  void rewind();
  // Returns the records logged since start()/the previous drain(). Non-blocking.
  std::vector<KmsgRecord> drain();
  // Number of records lost to ring-buffer overwrite while watching (EPIPE from /dev/kmsg).
  uint64_t lost() const { return lost_; }

 private:
  explicit KmsgWatcher(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
  uint64_t lost_ = 0;
};

// Writes a line into the kernel log (needs root); for tests of the watcher itself.
Result<void> kmsg_write(const std::string& line);

}  // namespace cvm

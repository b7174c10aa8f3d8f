// Host side of the guest payload contract (guests/include/cvmconf_guest/abi.h): the embedded
// guest image and its payload table, and ucall messages decoded from guest memory.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "cvmconf/kvm.h"
#include "cvmconf/result.h"
#include "cvmconf_guest/abi.h"

namespace cvm {

class GuestImage {
 public:
  // Validates an image: header magic, ABI version, architecture, sizes, payload table.
  static Result<GuestImage> parse(std::span<const uint8_t> bytes, uint32_t expected_arch);
  // The image built into this binary for the host architecture.
  static Result<GuestImage> embedded();

  const cvm_image_header& header() const { return header_; }
  std::span<const uint8_t> bytes() const { return bytes_; }
  // GVA of the payload's function, if the image has a payload of that name.
  std::optional<uint64_t> payload(std::string_view name) const;
  std::vector<std::string> payload_names() const;

 private:
  std::span<const uint8_t> bytes_;
  cvm_image_header header_{};
  std::vector<std::pair<std::string, uint64_t>> payloads_;
};

// What the guest told the host (or why it could not).
struct UcallEvent {
  enum class Kind {
    Sync,       // CVM_GUEST_SYNC(stage, values...): args[0] = stage
    Print,      // CVM_GUEST_PRINT: text
    Assert,     // CVM_GUEST_ASSERT*: file, line, text (expression), args (values)
    Done,       // payload returned
    Exception,  // guest CPU exception: args = vector, error code, rip, cr2
    Exit,       // a vCPU exit that is not a ucall (exit holds it)
    Timeout,    // the watchdog fired: no exit within the deadline
    Error,      // malformed ucall or host-side failure: text says what
  };
  Kind kind = Kind::Error;
  uint64_t seq = 0;
  std::vector<uint64_t> args;
  std::string file;
  uint32_t line = 0;
  std::string text;
  ExitInfo exit;

  uint64_t stage() const { return args.empty() ? 0 : args[0]; }
  std::string describe() const;
};
const char* ucall_kind_name(UcallEvent::Kind k);
inline std::ostream& operator<<(std::ostream& os, UcallEvent::Kind k) { return os << ucall_kind_name(k); }

// Decodes the message in a ucall slot (host view of guest memory).
UcallEvent decode_ucall(const volatile cvm_ucall& slot);

}  // namespace cvm

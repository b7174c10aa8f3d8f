#include "cvmconf/guest.h"

#include <cstdio>
#include <cstring>
#include <sstream>

extern "C" const uint8_t cvm_guest_image_start[];
extern "C" const uint8_t cvm_guest_image_end[];

namespace cvm {
namespace {

std::string bounded_string(const volatile char* s, size_t max) {
  std::string out;
  for (size_t i = 0; i < max && s[i]; i++) out.push_back(s[i]);
  return out;
}


uint32_t native_arch() {
#if defined(__x86_64__)
  return CVM_ARCH_X86_64;
#else
  return CVM_ARCH_AARCH64;
#endif
}

}  // namespace

Result<GuestImage> GuestImage::parse(std::span<const uint8_t> bytes, uint32_t expected_arch) {
  auto bad = [](const std::string& why) { return SysError{0, "guest image: " + why}; };
  if (bytes.size() < sizeof(cvm_image_header)) return bad("empty or truncated image");
  GuestImage img;
  img.bytes_ = bytes;
  std::memcpy(&img.header_, bytes.data(), sizeof img.header_);
  const auto& h = img.header_;
  if (h.magic != CVM_IMAGE_MAGIC) return bad("bad magic");
  if (h.abi_version != CVM_GUEST_ABI_VERSION)
    return bad("ABI version " + std::to_string(h.abi_version) + ", host expects " +
               std::to_string(CVM_GUEST_ABI_VERSION));
  if (h.arch != expected_arch) return bad("built for architecture " + std::to_string(h.arch));
  if (h.load_addr != CVM_IMAGE_GPA) return bad("load address " + hex(h.load_addr));
  if (h.image_end < h.load_addr + bytes.size() || h.image_end - h.load_addr > CVM_IMAGE_MAX)
    return bad("image end " + hex(h.image_end) + " outside the image region");
  if (h.entry < h.load_addr || h.entry >= h.load_addr + bytes.size())
    return bad("entry " + hex(h.entry) + " outside the image");
  if (h.payloads_end < h.payloads_start || h.payloads_start < h.load_addr ||
      h.payloads_end > h.load_addr + bytes.size() ||
      (h.payloads_end - h.payloads_start) % sizeof(cvm_payload_desc) != 0)
    return bad("payload table out of bounds");
  for (uint64_t a = h.payloads_start; a < h.payloads_end; a += sizeof(cvm_payload_desc)) {
    cvm_payload_desc d;
    std::memcpy(&d, bytes.data() + (a - h.load_addr), sizeof d);
    d.name[CVM_PAYLOAD_NAME_MAX - 1] = 0;
    if (d.entry < h.load_addr || d.entry >= h.load_addr + bytes.size())
      return bad(std::string("payload ") + d.name + " entry outside the image");
    img.payloads_.emplace_back(d.name, d.entry);
  }
  return img;
}

Result<GuestImage> GuestImage::embedded() {
  std::span<const uint8_t> bytes(cvm_guest_image_start,
                                 static_cast<size_t>(cvm_guest_image_end - cvm_guest_image_start));
  if (bytes.empty())
    return SysError{0, "no guest runtime is built for this architecture"};
  return parse(bytes, native_arch());
}

std::optional<uint64_t> GuestImage::payload(std::string_view name) const {
  for (const auto& [n, e] : payloads_)
    if (n == name) return e;
  return std::nullopt;
}

std::vector<std::string> GuestImage::payload_names() const {
  std::vector<std::string> v;
  for (const auto& p : payloads_) v.push_back(p.first);
  return v;
}

const char* ucall_kind_name(UcallEvent::Kind k) {
  switch (k) {
    case UcallEvent::Kind::Sync: return "SYNC";
    case UcallEvent::Kind::Print: return "PRINT";
    case UcallEvent::Kind::Assert: return "ASSERT";
    case UcallEvent::Kind::Done: return "DONE";
    case UcallEvent::Kind::Exception: return "EXCEPTION";
    case UcallEvent::Kind::Exit: return "EXIT";
    case UcallEvent::Kind::Timeout: return "TIMEOUT";
    case UcallEvent::Kind::Error: return "ERROR";
  }
  return "?";
}

UcallEvent decode_ucall(const volatile cvm_ucall& u) {
  UcallEvent e;
  if (u.magic != CVM_UCALL_MAGIC) {
    e.kind = UcallEvent::Kind::Error;
    e.text = "doorbell without a valid ucall message (magic " + hex(u.magic) + ")";
    return e;
  }
  e.seq = u.seq;
  uint32_t n = u.nargs > CVM_UCALL_ARGS ? CVM_UCALL_ARGS : u.nargs;
  for (uint32_t i = 0; i < n; i++) e.args.push_back(static_cast<uint64_t>(u.args[i]));
  e.file = bounded_string(u.file, CVM_UCALL_FILE_MAX);
  e.line = u.line;
  e.text = bounded_string(u.text, CVM_UCALL_TEXT_MAX);
  switch (u.cmd) {
    case CVM_UCALL_SYNC: e.kind = UcallEvent::Kind::Sync; break;
    case CVM_UCALL_PRINT: e.kind = UcallEvent::Kind::Print; break;
    case CVM_UCALL_ASSERT: e.kind = UcallEvent::Kind::Assert; break;
    case CVM_UCALL_DONE: e.kind = UcallEvent::Kind::Done; break;
    case CVM_UCALL_EXCEPTION: e.kind = UcallEvent::Kind::Exception; break;
    default:
      e.kind = UcallEvent::Kind::Error;
      e.text = "unknown ucall command " + std::to_string(u.cmd);
  }
  return e;
}

std::string UcallEvent::describe() const {
  std::ostringstream os;
  os << ucall_kind_name(kind);
  switch (kind) {
    case Kind::Sync:
      os << " stage " << stage();
      for (size_t i = 1; i < args.size(); i++) os << (i == 1 ? " values " : ", ") << hex(args[i]);
      break;
    case Kind::Print:
      os << " \"" << text << "\"";
      break;
    case Kind::Assert:
      os << " at " << file << ":" << line << ": " << text;
      if (args.size() == 2) os << " (left " << hex(args[0]) << ", right " << hex(args[1]) << ")";
      break;
    case Kind::Exception:
#if defined(__aarch64__)
      if (args.size() >= 4)
        os << " vector " << args[0] << " esr " << hex(args[1]) << " elr " << hex(args[2])
           << " far " << hex(args[3]);
#else
      if (args.size() >= 4)
        os << " vector " << args[0] << " error " << hex(args[1]) << " rip " << hex(args[2])
           << " cr2 " << hex(args[3]);
#endif
      break;
    case Kind::Exit:
    case Kind::Timeout:
      os << ": " << exit.describe();
      if (!text.empty()) os << " (" << text << ")";
      break;
    case Kind::Error:
      os << ": " << text;
      break;
    case Kind::Done:
      break;
  }
  return os.str();
}

}  // namespace cvm

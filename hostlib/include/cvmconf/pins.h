// Pin providers: ways to take a GUP reference or pin on user memory, each detected at run time
// with a precise reason when absent, each stating what kind of pin it takes. A suite asks for a
// kind ("a R/O long-term pin") and gets a provider or the SKIP reason naming what is missing.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cvmconf/result.h"

namespace cvm {

enum class GupFlavour {
  Slow,    // get_user_pages / pin_user_pages
  Fast,    // GUP-fast (lockless page-table walk, falls back to slow)
  Either,  // the kernel picks (io_uring, vmsplice)
};
const char* gup_flavour_name(GupFlavour f);

struct PinKind {
  bool write = false;      // FOLL_WRITE: R/W pin (breaks COW at pin time)
  bool longterm = false;   // FOLL_LONGTERM
  bool foll_pin = false;   // FOLL_PIN (pin_user_pages); false: a plain page reference (FOLL_GET)
  GupFlavour flavour = GupFlavour::Either;
  std::string describe() const;  // e.g. "R/O long-term FOLL_PIN (GUP-fast)"
};

// A held pin over [addr, addr+len). Destroying it releases the pin.
class Pin {
 public:
  virtual ~Pin() = default;
  // Releases the pin now (idempotent).
  virtual Result<void> release() = 0;
  // Reads `len` bytes at `offset` of the pinned range through the pin (the pinned pages, not
  // the process page table). Not every provider can; those return ENOTSUP.
  virtual Result<std::vector<uint8_t>> read_through(size_t offset, size_t len) = 0;
};

class PinProvider {
 public:
  virtual ~PinProvider() = default;
  virtual std::string name() const = 0;  // "gup_test", "io_uring", "vmsplice", "rdma", ...
  virtual PinKind kind() const = 0;
  // nullopt when usable here; otherwise the exact missing capability (a SKIP reason).
  virtual std::optional<std::string> unavailable() const = 0;
  // Pins [addr, addr+len). A refusal by the kernel comes back as an error with its errno
  // (EFAULT for memory that cannot be pinned; io_uring may also report EOPNOTSUPP/ENOSPC).
  virtual Result<std::unique_ptr<Pin>> pin(void* addr, size_t len) const = 0;
};

// What a suite needs; unset fields match anything.
struct PinRequest {
  std::optional<bool> write;
  std::optional<bool> longterm;
  std::optional<bool> foll_pin;
  std::optional<GupFlavour> flavour;
  std::string describe() const;  // "R/O long-term pin"
  bool matches(const PinKind& k) const;
};

// Every provider this build knows, available or not, in a fixed order.
const std::vector<const PinProvider*>& pin_providers();
// The first available provider that satisfies req, or an error whose message is the SKIP
// reason: "capability absent: no R/O long-term pin provider (gup_test: ...; ...)".
Result<const PinProvider*> find_pin_provider(const PinRequest& req);
// All available providers that satisfy req (possibly none).
std::vector<const PinProvider*> available_pin_providers(const PinRequest& req = {});

}  // namespace cvm

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
  // Pin::read_through works (the pinned pages can be read without the page table).
  bool reads_through = true;
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
  // Whether every read_through costs a copy of the whole pinned range, whatever it asks for
  // (gup_test's PIN_LONGTERM_TEST_READ copies every pinned page): then read it once.
  virtual bool reads_whole_range() const { return false; }
  // Writes `data` at `offset` of the pinned range through the pin (e.g. a device or io_uring
  // writing into the pinned pages), not through the page table. Default: ENOTSUP.
  virtual Result<void> write_through(size_t offset, const std::vector<uint8_t>& data);
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
  // Whether a pin() failure with this errno means "the kernel refused to pin this memory"
  // (default: EFAULT; io_uring also reports EOPNOTSUPP and ENOSPC, as gup_longterm.c accepts).
  virtual bool is_refusal(int err) const;
  // Whether a pin() failure with this errno means "this provider cannot take such pins at all"
  // (gup_test: PIN_LONGTERM_TEST_START failing with EINVAL, as cow.c skips). Default: never.
  virtual bool is_unsupported(int err) const;
};

// What a suite needs; unset fields match anything.
struct PinRequest {
  std::optional<bool> write;
  std::optional<bool> longterm;
  std::optional<bool> foll_pin;
  std::optional<GupFlavour> flavour;
  std::optional<bool> reads_through;  // true: only providers whose Pin::read_through works
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
// The provider with this name (available or not), or nullptr.
const PinProvider* pin_provider_by_name(const std::string& name);

// --- gup_test (CONFIG_GUP_TEST, mm/gup_test.c) --------------------------------------------------
// Four providers, one per kind: "gup_test_ro", "gup_test_ro_fast", "gup_test_rw",
// "gup_test_rw_fast" (R/O or R/W x pin_user_pages or pin_user_pages_fast, all FOLL_LONGTERM).
// The kernel keeps ONE pinned set for the whole system (any fd's STOP or close drops it, and a
// second START fails with EINVAL), so every gup_test Pin owns its fd and holds the system lock
// "gup_test" (mm.h) while it exists; a second gup_test pin in the same process fails with EBUSY.
inline constexpr const char* kGupTestPath = "/sys/kernel/debug/gup_test";
// Why gup_test at `path` cannot take long-term pins, or nullopt. Mounts debugfs at
// /sys/kernel/debug when `path` is below it and it is not mounted. Probes PIN_LONGTERM_TEST_START
// on a page of its own: EINVAL there means "unsupported". Uncached (the providers cache it).
std::optional<std::string> gup_test_unavailable(const std::string& path = kGupTestPath);

// --- RDMA memory registration (ibv_reg_mr: pin_user_pages_fast with FOLL_LONGTERM) -------------
// "rdma_rw" (IBV_ACCESS_LOCAL_WRITE: FOLL_WRITE) and "rdma_ro" (no write access: a R/O long-term
// pin). libibverbs is loaded at run time (dlopen), so binaries do not depend on it. Their pins
// cannot be read through (reads_through = false).
inline constexpr const char* kRdmaSysfs = "/sys/class/infiniband";
// Why no RDMA memory registration is possible here, or nullopt. Uncached.
std::optional<std::string> rdma_unavailable(const std::string& sysfs_dir = kRdmaSysfs);

}  // namespace cvm

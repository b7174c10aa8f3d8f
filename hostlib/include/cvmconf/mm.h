// Host memory-management helpers for the pin suites: system-wide locks for global kernel state,
// hugetlb pools that are put back as they were, THP and huge-zeropage settings, /proc/self/smaps
// and /proc/self/pagemap, file-system types and mounts, memfd_secret. Everything reports the
// exact reason when the kernel or the permissions do not allow it.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cvmconf/fd.h"
#include "cvmconf/result.h"

namespace cvm {

// --- sysfs, procfs and debugfs files ------------------------------------------------------------
// The whole content of a (small) kernel text file.
Result<std::string> read_text(const std::string& path);
// One write(2) of `text` to an existing file (sysfs and debugfs attributes take a value in one
// write); the error names the path and the value.
Result<void> write_text(const std::string& path, const std::string& text);

inline constexpr const char* kDebugfsDir = "/sys/kernel/debug";
// Whether dir is a mounted debugfs.
bool is_debugfs(const std::string& dir);
// Mounts debugfs at kDebugfsDir when it is not mounted there (serialised within the process;
// another process mounting it at the same moment counts as mounted). nullopt: mounted now;
// otherwise why not: "debugfs is not mounted at /sys/kernel/debug and mounting it failed: ...".
std::optional<std::string> ensure_debugfs();

// --- system-wide locks ------------------------------------------------------------------------
// An advisory lock (flock on /run/lock/cvmconf-<name>.lock, or $TMPDIR/... when /run/lock is not
// writable) that serialises cvmconf processes which change global kernel state (hugetlb pool
// sizes) or use a global kernel test interface (gup_test keeps ONE pinned set for the whole
// system). ctest runs tests as parallel processes, and several worktrees may test at once.
class SystemLock {
 public:
  SystemLock() = default;
  // Waits at most `timeout` for the lock; EBUSY when another holder keeps it longer.
  static Result<SystemLock> acquire(const std::string& name, std::chrono::milliseconds timeout);
  bool held() const { return fd_.valid(); }
  void unlock() { fd_.reset(); }

 private:
  explicit SystemLock(UniqueFd fd) : fd_(std::move(fd)) {}
  UniqueFd fd_;
};
std::string system_lock_path(const std::string& name);

// --- hugetlb ------------------------------------------------------------------------------------
inline constexpr const char* kHugepagesSysfs = "/sys/kernel/mm/hugepages";

// Huge page sizes (bytes) the kernel offers: one per hugepages-<N>kB directory, ascending.
std::vector<size_t> hugetlb_sizes(const std::string& sysfs_root = kHugepagesSysfs);
// "2048kB" (the kernel's own spelling, as in hugepages-2048kB).
std::string hugetlb_size_name(size_t bytes);
// Parses "hugepages-2048kB" into bytes; nullopt for anything else.
std::optional<size_t> parse_hugepages_dirname(const std::string& name);

struct HugetlbCounters {
  long nr = 0, free = 0, resv = 0, surplus = 0;
};
Result<HugetlbCounters> hugetlb_counters(size_t bytes, const std::string& sysfs_root = kHugepagesSysfs);

// For its lifetime, at least `free_pages` huge pages of one size are free (nr_hugepages is raised
// when needed); destruction (or restore()) writes the original nr_hugepages back. Holds the
// system lock "hugetlb" all the while, so concurrent cvmconf users never see each other's pages
// and every restore puts back the value from before any of them. Unmap everything that uses
// the pool before it is destroyed. One pool per process at a time: a second reserve() in the
// same process waits for its own lock and fails with EBUSY after lock_timeout.
class HugetlbPool {
 public:
  HugetlbPool() = default;
  HugetlbPool(HugetlbPool&& o) noexcept;
  HugetlbPool& operator=(HugetlbPool&& o) noexcept;
  HugetlbPool(const HugetlbPool&) = delete;
  HugetlbPool& operator=(const HugetlbPool&) = delete;
  ~HugetlbPool();

  // Fails with a message naming exactly what happened: the size is not offered (ENOENT),
  // nr_hugepages cannot be written (EACCES/EPERM), or the kernel allocated fewer pages than
  // asked (ENOMEM: "asked for 2 free 1048576kB pages; nr_hugepages 0 -> 1, 1 free").
  static Result<HugetlbPool> reserve(size_t page_bytes, long free_pages,
                                     std::chrono::milliseconds lock_timeout = std::chrono::seconds(120));
  // Writes the original nr_hugepages back and checks it took effect (idempotent).
  Result<void> restore();
  long original_nr() const { return original_; }

 private:
  SystemLock lock_;
  size_t bytes_ = 0;
  long original_ = 0;
  bool changed_ = false;
  bool active_ = false;
};

// "hugetlb-2048kB=0 hugetlb-1048576kB=0": nr_hugepages of every size (for snapshots/checks).
Result<std::map<size_t, long>> hugetlb_pool_sizes(const std::string& sysfs_root = kHugepagesSysfs);

// memfd_create flag selecting a huge page size (MFD_HUGETLB | log2(size) << MFD_HUGE_SHIFT).
unsigned int memfd_hugetlb_flags(size_t bytes);

// --- THP --------------------------------------------------------------------------------------
inline constexpr const char* kThpSysfs = "/sys/kernel/mm/transparent_hugepage";
// The selected word of a sysfs choice file: "always [madvise] never" -> "madvise".
std::string selected_choice(const std::string& text);
struct ThpSettings {
  std::string enabled;         // "always" / "madvise" / "never" / "" (no THP)
  bool use_zero_page = false;  // huge zeropage enabled
  size_t pmd_size = 0;         // hpage_pmd_size, 0 when unknown
  std::string error;           // why the settings could not be read
};
ThpSettings thp_settings(const std::string& sysfs_root = kThpSysfs);
// nullopt when anonymous THP can be had with MADV_HUGEPAGE; otherwise the reason.
std::optional<std::string> anon_thp_unavailable(const ThpSettings& s);

// --- /proc/self/smaps -------------------------------------------------------------------------
// The "Key: N kB" fields of the VMA containing addr, parsed from smaps text; nullopt when no
// VMA contains addr.
std::optional<std::map<std::string, long>> smaps_fields_from_text(const std::string& text,
                                                                  uintptr_t addr);
Result<std::map<std::string, long>> smaps_fields(const void* addr);

// --- /proc/self/pagemap and /proc/kpageflags ----------------------------------------------------
struct PagemapEntry {
  bool present = false;
  bool swapped = false;
  bool file_or_shared_anon = false;  // bit 61
  bool exclusive = false;            // bit 56: mapped exclusively (only this process)
  bool soft_dirty = false;           // bit 55
  uint64_t pfn = 0;                  // 0 when not present or hidden (needs CAP_SYS_ADMIN)
};
PagemapEntry decode_pagemap(uint64_t raw);
Result<PagemapEntry> pagemap_entry(const void* addr);
Result<uint64_t> kpageflags(uint64_t pfn);
inline constexpr int kKpfThp = 22;       // KPF_THP (include/uapi/linux/kernel-page-flags.h)
inline constexpr int kKpfZeroPage = 24;  // KPF_ZERO_PAGE: the zero page or the huge zero page
inline constexpr int kKpfAnon = 12;      // KPF_ANON
// What backs the page at addr, as the kernel reports it.
struct PageIdentity {
  bool present = false;
  uint64_t pfn = 0;
  bool zero_page = false;       // the shared zeropage (KPF_ZERO_PAGE without KPF_THP)
  bool huge_zero_page = false;  // the huge zeropage (KPF_ZERO_PAGE with KPF_THP)
  bool anon = false;
  bool exclusive = false;
};
// nullopt when the kernel hides PFNs or page flags from this process; otherwise the reason.
std::optional<std::string> page_identity_unavailable();
Result<PageIdentity> page_identity(const void* addr);

// --- file systems -----------------------------------------------------------------------------
// "tmpfs", "ext4" (ext2/3/4 share a magic), "xfs", "btrfs", "hugetlbfs", "secretmem", ... or
// "0x<magic>".
std::string fs_name_from_magic(unsigned long magic);
Result<std::string> fs_type_of_fd(int fd);
Result<std::string> fs_type_of_path(const std::string& path);
// File systems that need writeback (dirty tracking) of shared file mappings: a R/W long-term
// pin of a MAP_SHARED mapping of them must be refused
// (tools/testing/selftests/mm/gup_longterm.c, fs_supports_writable_longterm_pinning).
bool fs_needs_writeback(const std::string& fs);
// File systems whose shared mappings may be pinned R/W long-term (tmpfs, hugetlbfs).
bool fs_longterm_shared_rw_ok(const std::string& fs);

struct MountEntry {
  std::string device, dir, type, options;
  bool read_only() const;
};
std::vector<MountEntry> parse_mounts(const std::string& text);  // /proc/self/mounts format
// A directory on a mounted file system of type `fs` in which this process can create files
// (tries $TMPDIR, /var/tmp, /tmp, the current directory, then every mount of that type), or
// nullopt.
std::optional<std::string> writable_dir_on_fs(const std::string& fs);

// --- memfd_secret -----------------------------------------------------------------------------
// memfd_secret(2) (5.14; may need secretmem.enable=1 on older kernels). ENOSYS: not built in.
Result<UniqueFd> memfd_secret_create(unsigned int flags = 0);

}  // namespace cvm

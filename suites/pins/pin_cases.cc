#include "pin_cases.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace cvm::suites::pins {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
using testing::kCapabilityAbsent;

// The region of `len` bytes inside `raw` that starts at an `align` boundary.
uint8_t* align_up(uint8_t* p, size_t align) {
  uintptr_t a = (reinterpret_cast<uintptr_t>(p) + align - 1) & ~(uintptr_t{align} - 1);
  return reinterpret_cast<uint8_t*>(a);
}

void verify_identity(CowRegion& r, bool expect_zero, bool expect_huge_zero, bool expect_anon) {
  if (auto why = page_identity_unavailable()) {
    r.verified = "not verified: " + *why;
    return;
  }
  auto id = page_identity(r.data);
  ASSERT_TRUE(id.ok()) << id.error();
  ASSERT_TRUE(id->present) << "the prepared page is not mapped";
  if (expect_zero) {
    ASSERT_TRUE(id->zero_page) << "a read fault on private anonymous memory did not map the shared "
                                  "zeropage (pfn " << id->pfn << ")";
    r.verified = "pagemap/kpageflags: shared zeropage";
  } else if (expect_huge_zero) {
    r.verified = "pagemap/kpageflags: huge zeropage";
  } else if (expect_anon) {
    ASSERT_TRUE(id->anon && id->exclusive) << "the written page is not an exclusive anonymous page";
    r.verified = "pagemap/kpageflags: exclusive anonymous page";
  } else {
    ASSERT_FALSE(id->anon) << "a read fault on a private file mapping mapped an anonymous page";
    ASSERT_FALSE(id->zero_page);
    r.verified = "pagemap/kpageflags: page-cache page mapped R/O";
  }
}

// Creates the file of a file backing, sizes it, fills it through a shared mapping.
void make_file(NonAnon kind, size_t huge, CowRegion& r) {
  int fd = -1;
  switch (kind) {
    case NonAnon::Memfd:
      fd = memfd_create("cvmconf-pin-memfd", MFD_CLOEXEC);
      ASSERT_GE(fd, 0) << "memfd_create: " << strerror(errno);
      break;
    case NonAnon::Tmpfile:
      // tmpfile() semantics: an unnamed file in /tmp, on whatever file system /tmp is.
      fd = unnamed_file_in("/tmp");
      ASSERT_GE(fd, 0) << "no temporary file in /tmp: " << strerror(errno);
      break;
    case NonAnon::MemfdHugetlb:
      // Two pages: the page-cache page and the anonymous copy a write (or unsharing) creates.
      hugetlb_memfd(huge, 2, r.pool, fd);
      if (::testing::Test::IsSkipped()) return;
      ASSERT_GE(fd, 0) << "memfd_create(MFD_HUGETLB " << hugetlb_size_name(huge)
                       << "): " << strerror(errno);
      break;
    default:
      FAIL() << "not a file backing";
  }
  r.fd.reset(fd);
  auto fs = fs_type_of_fd(fd);
  r.fs = fs ? *fs : "unknown";
  size_file(fd, r.size, r.fs);
  if (::testing::Test::HasFatalFailure()) return;
  auto shared = Mapping::map(r.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ASSERT_TRUE(shared.ok()) << shared.error();
  std::memset(shared->data(), r.initial, r.size);
}

}  // namespace

std::vector<size_t> hugetlb_sizes_to_test() {
#if defined(__x86_64__)
  std::vector<size_t> v = {2 * kMiB, 1024 * kMiB};
#elif defined(__aarch64__)
  std::vector<size_t> v = {64 << 10, 2 * kMiB, 32 * kMiB, 1024 * kMiB};
#else
  std::vector<size_t> v;
#endif
  for (size_t s : hugetlb_sizes())
    if (std::find(v.begin(), v.end(), s) == v.end()) v.push_back(s);
  std::sort(v.begin(), v.end());
  return v;
}

int unnamed_file_in(const std::string& dir) {
  int fd = open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return fd;
  std::string path = dir + "/cvmconf-pin-XXXXXX";
  fd = mkstemp(path.data());
  if (fd >= 0) unlink(path.c_str());
  return fd;
}

void hugetlb_memfd(size_t huge, size_t pages, std::optional<HugetlbPool>& pool, int& fd) {
  fd = -1;
  auto sizes = hugetlb_sizes();
  if (std::find(sizes.begin(), sizes.end(), huge) == sizes.end())
    GTEST_SKIP() << kCapabilityAbsent << "hugetlb " << hugetlb_size_name(huge)
                 << " pages: not offered by this kernel (" << kHugepagesSysfs << ")";
  auto reserved = HugetlbPool::reserve(huge, pages);
  if (!reserved) GTEST_SKIP() << kCapabilityAbsent << reserved.error().message();
  pool.emplace(std::move(reserved.value()));
  fd = memfd_create("cvmconf-pin-hugetlb", MFD_CLOEXEC | memfd_hugetlb_flags(huge));
}

void size_file(int fd, size_t size, const std::string& fs) {
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(size)), 0) << strerror(errno);
  // hugetlbfs's fallocate stops with EINTR whenever signal_pending(), which io_uring's task
  // work (TIF_NOTIFY_SIGNAL) makes true for a moment: the allocation is simply retried.
  int r = -1;
  for (int i = 0; i < 100; i++) {
    r = fallocate(fd, 0, 0, static_cast<off_t>(size));
    if (r == 0 || errno != EINTR) break;
  }
  if (r != 0 && errno != EOPNOTSUPP)
    FAIL() << testing::harness_error("fallocate on " + fs, std::string(strerror(errno)));
}

std::string NonAnonBacking::name() const {
  switch (kind) {
    case NonAnon::SharedZeropage: return "shared_zeropage";
    case NonAnon::Memfd: return "memfd";
    case NonAnon::Tmpfile: return "tmpfile";
    case NonAnon::HugeZeropage: return "huge_zeropage";
    case NonAnon::MemfdHugetlb: return "memfd_hugetlb_" + hugetlb_size_name(huge);
  }
  return "?";
}

std::vector<NonAnonBacking> non_anon_backings() {
  std::vector<NonAnonBacking> v = {{NonAnon::SharedZeropage}, {NonAnon::Memfd}, {NonAnon::Tmpfile},
                                   {NonAnon::HugeZeropage}};
  for (size_t s : hugetlb_sizes_to_test()) v.push_back({NonAnon::MemfdHugetlb, s});
  return v;
}

const char* anon_state_name(AnonState s) {
  switch (s) {
    case AnonState::Exclusive: return "exclusive";
    case AnonState::SharedAfterFork: return "shared_after_fork";
    case AnonState::PreviouslyShared: return "previously_shared";
    case AnonState::ForkedWhilePinned: return "forked_while_pinned";
  }
  return "?";
}

const char* anon_size_name(AnonSize s) { return s == AnonSize::Base ? "base_page" : "thp"; }

std::string AnonBacking::name() const {
  return std::string(anon_state_name(state)) + "_" + anon_size_name(size);
}

void prepare_non_anon(const NonAnonBacking& b, CowRegion& r) {
  const size_t ps = page_size();
  switch (b.kind) {
    case NonAnon::SharedZeropage: {
      r.size = ps;
      r.initial = 0;
      auto m = Mapping::anonymous(ps);
      ASSERT_TRUE(m.ok()) << m.error();
      r.raw = std::move(m.value());
      r.data = r.raw.data();
      madvise(r.data, ps, MADV_NOHUGEPAGE);
      auto f = probe_read(r.data, 1);
      ASSERT_FALSE(f.faulted()) << f.describe();
      verify_identity(r, true, false, false);
      return;
    }
    case NonAnon::HugeZeropage: {
      ThpSettings s = thp_settings();
      if (auto why = anon_thp_unavailable(s)) GTEST_SKIP() << kCapabilityAbsent << *why;
      if (!s.use_zero_page)
        GTEST_SKIP() << kCapabilityAbsent << "the huge zeropage is disabled (" << kThpSysfs
                     << "/use_zero_page = 0)";
      r.size = s.pmd_size;
      r.initial = 0;
      auto m = Mapping::anonymous(2 * s.pmd_size);
      ASSERT_TRUE(m.ok()) << m.error();
      r.raw = std::move(m.value());
      r.data = align_up(r.raw.data(), s.pmd_size);
      ASSERT_EQ(madvise(r.data, r.size, MADV_HUGEPAGE), 0) << strerror(errno);
      auto f = probe_read(r.data, 1);
      ASSERT_FALSE(f.faulted()) << f.describe();
      if (!page_identity_unavailable()) {
        auto id = page_identity(r.data);
        ASSERT_TRUE(id.ok()) << id.error();
        if (!id->huge_zero_page)
          GTEST_SKIP() << kCapabilityAbsent << "a read fault in a MADV_HUGEPAGE region did not map "
                       << "the huge zeropage (pfn " << id->pfn
                       << (id->zero_page ? ", the small zeropage" : "") << ")";
      }
      verify_identity(r, false, true, false);
      return;
    }
    case NonAnon::Memfd:
    case NonAnon::Tmpfile:
    case NonAnon::MemfdHugetlb: {
      r.size = b.kind == NonAnon::MemfdHugetlb ? b.huge : ps;
      r.initial = 0xa5;
      make_file(b.kind, b.huge, r);
      if (::testing::Test::IsSkipped() || ::testing::Test::HasFatalFailure()) return;
      auto m = Mapping::map(r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE, r.fd.get(), 0);
      ASSERT_TRUE(m.ok()) << m.error();
      r.raw = std::move(m.value());
      r.data = r.raw.data();
      // Read-fault every page: the page table maps the page-cache pages R/O.
      auto f = probe_pages(r.data, r.size, Access::Read);
      ASSERT_FALSE(f.faulted()) << f.describe();
      ASSERT_EQ(check_bytes(r.data, r.size, r.initial, "the private mapping"), "");
      verify_identity(r, false, false, false);
      return;
    }
  }
}

void prepare_anon(AnonSize s, CowRegion& r) {
  r.initial = 0xa5;
  if (s == AnonSize::Base) {
    r.size = page_size();
    auto m = Mapping::anonymous(r.size);
    ASSERT_TRUE(m.ok()) << m.error();
    r.raw = std::move(m.value());
    r.data = r.raw.data();
    madvise(r.data, r.size, MADV_NOHUGEPAGE);
    std::memset(r.data, r.initial, r.size);
    verify_identity(r, false, false, true);
    return;
  }
  ThpSettings t = thp_settings();
  if (auto why = anon_thp_unavailable(t)) GTEST_SKIP() << kCapabilityAbsent << *why;
  r.size = t.pmd_size;
  auto m = Mapping::anonymous(2 * t.pmd_size);
  ASSERT_TRUE(m.ok()) << m.error();
  r.raw = std::move(m.value());
  r.data = align_up(r.raw.data(), t.pmd_size);
  ASSERT_EQ(madvise(r.data, r.size, MADV_HUGEPAGE), 0) << strerror(errno);
  std::memset(r.data, r.initial, r.size);
  auto f = smaps_fields(r.data);
  ASSERT_TRUE(f.ok()) << f.error();
  long thp_kb = (*f)["AnonHugePages"];
  if (thp_kb < static_cast<long>(r.size / 1024))
    GTEST_SKIP() << kCapabilityAbsent << "no THP obtained: AnonHugePages = " << thp_kb
                 << " kB after MADV_HUGEPAGE and writing " << r.size / 1024
                 << " kB (THP enabled: " << t.enabled << "; memory fragmented?)";
  r.verified = "smaps: AnonHugePages = " + std::to_string(thp_kb) + " kB";
}

Sharer Sharer::fork_child(const CowRegion& r, uint8_t expect, bool previously_shared) {
  Sharer s;
  if (previously_shared) {
    ChildOutcome o = run_in_child([](const ChildReport&) { return 0; });
    if (!o.exited_with(0)) s.early_ = "the sharing child failed: " + o.describe();
    return s;
  }
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) {
    s.early_ = std::string("pipe2: ") + strerror(errno);
    return s;
  }
  int rd = p[0], wr = p[1];
  const uint8_t* data = r.data;
  size_t size = r.size;
  s.child_.emplace(ChildProcess::spawn([=](const ChildReport& rep) {
    close(wr);
    char c;
    if (read(rd, &c, 1) != 1) return 0;  // parent gone: nothing to check
    std::string bad = check_bytes(data, size, expect, "the child's view");
    if (!bad.empty()) {
      rep.write(bad);
      return 1;
    }
    return 0;
  }));
  close(rd);
  s.go_.reset(wr);
  return s;
}

std::string Sharer::finish() {
  if (!child_) return early_;
  char c = 1;
  if (write(go_.get(), &c, 1) != 1) return std::string("signalling the child: ") + strerror(errno);
  ChildOutcome o = child_->wait(std::chrono::seconds(30));
  child_.reset();
  go_.reset();
  if (o.exited_with(0)) return "";
  return "the child that shares the page: " + o.describe() +
         (o.output.empty() ? "" : ": " + o.output);
}

Sharer::~Sharer() { go_.reset(); }

std::vector<std::pair<size_t, size_t>> sample_ranges(size_t size) {
  constexpr size_t kWhole = 4 * kMiB, kSample = 64 << 10;
  if (size <= kWhole) return {{0, size}};
  return {{0, kSample}, {size / 2 - kSample / 2, kSample}, {size - kSample, kSample}};
}

std::string check_bytes(const uint8_t* p, size_t len, uint8_t v, const char* where) {
  for (size_t i = 0; i < len; i++)
    if (p[i] != v) {
      char buf[160];
      std::snprintf(buf, sizeof buf, "%s holds 0x%02x at offset %zu, expected 0x%02x", where, p[i],
                    i, v);
      return buf;
    }
  return "";
}

std::string check_through_pin(Pin& pin, size_t size, uint8_t expect) {
  for (auto [off, len] : sample_ranges(size)) {
    auto d = pin.read_through(off, len);
    if (!d) return "reading through the pin failed: " + d.error().message();
    if (d->size() != len) return "reading through the pin returned a short buffer";
    std::string bad = check_bytes(d->data(), len, expect, "the pinned page");
    if (!bad.empty()) return bad + " (range at " + std::to_string(off) + ")";
  }
  return "";
}

void record_case(const PinProvider* provider, const std::string& backing) {
  ::testing::Test::RecordProperty("provider", provider->name());
  PinKind k = provider->kind();
  ::testing::Test::RecordProperty("pin_kind", k.describe());
  ::testing::Test::RecordProperty("gup", gup_flavour_name(k.flavour));
  ::testing::Test::RecordProperty("backing", backing);
}

void record_wanted(const PinRequest& req, const std::string& backing) {
  ::testing::Test::RecordProperty("provider", "none");
  ::testing::Test::RecordProperty("pin_kind", req.describe());
  ::testing::Test::RecordProperty("gup", req.flavour ? gup_flavour_name(*req.flavour) : "any");
  ::testing::Test::RecordProperty("backing", backing);
}

PinRequest ro_longterm_request(GupFlavour flavour) {
  PinRequest r;
  r.write = false;
  r.longterm = true;
  r.foll_pin = true;
  r.flavour = flavour;
  r.reads_through = true;
  return r;
}

PinRequest rw_longterm_request() {
  PinRequest r;
  r.write = true;
  r.longterm = true;
  r.foll_pin = true;
  r.reads_through = true;
  return r;
}

std::vector<const PinProvider*> rw_longterm_providers() {
  const PinRequest req = rw_longterm_request();
  std::vector<const PinProvider*> v;
  for (const PinProvider* p : pin_providers())
    if (req.matches(p->kind())) v.push_back(p);
  return v;
}

std::string param_safe(std::string s) {
  for (char& c : s)
    if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
  return s;
}

void restore_pool_or_fail(std::optional<HugetlbPool>& pool) {
  if (!pool) return;
  auto r = pool->restore();
  EXPECT_TRUE(r.ok()) << "the hugetlb pool was not put back: " << r.error();
  pool.reset();
}

CowRegion::~CowRegion() {
  raw.reset();
  fd.reset();
  restore_pool_or_fail(pool);
}

}  // namespace cvm::suites::pins
